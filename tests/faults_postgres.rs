//! Fault suite for the transactional inbox and outbox (opt-in: `RELIABLE_MQ_FAULTS=1`;
//! the last scenario restarts this machine's PostgreSQL). The consumer runs as a separate
//! process (`tests/bin/inbox_worker.rs`) that SIGKILLs itself at the chosen point; 3,000
//! messages per scenario. The checker reads the business table: every message must be
//! applied exactly once (rows = distinct = 3,000), nothing dead-lettered.
//!
//! `RELIABLE_MQ_FAULTS=1 cargo test -p reliable-mq-tests --test faults_postgres -- --nocapture --test-threads=1`

#[path = "pg_support.rs"]
mod pg_support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pg_support::TestSchema;
use reliable_mq::postgres::Outbox;
use reliable_mq_tests::{Broker, Cleanup, amqp_url, init_tracing, sh};
use sqlx::PgPool;

const QUEUE: &str = "rmq-fault-inbox";
const MESSAGES: i64 = 3_000;
/// Self-kills per scenario before the worker is left to finish.
const KILLS: u32 = 5;

/// One worker process, killed (SIGKILL) when dropped if still running.
struct Worker {
    child: Child,
}

impl Worker {
    fn spawn(schema: &str, kill: &str, kill_after: u64, role: &str, log: &str) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("worker log");
        let child = Command::new(env!("CARGO_BIN_EXE_inbox_worker"))
            .env("FAULT_SCHEMA", schema)
            .env("FAULT_KILL", kill)
            .env("FAULT_KILL_AFTER", kill_after.to_string())
            .env("FAULT_ROLE", role)
            .env("AMQP_URL", amqp_url())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn inbox_worker");
        Self { child }
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn stop(mut self) {
        sh(&format!("kill -INT {}", self.child.id()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

/// What the checker found.
#[derive(Debug)]
struct Table {
    scenario: &'static str,
    kills: u32,
    rows: i64,
    distinct: i64,
    dead_lettered: u32,
    secs: u64,
}

impl Table {
    fn print(&self) {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {}s |",
            self.scenario,
            MESSAGES,
            self.kills,
            self.distinct,
            self.rows - self.distinct,
            MESSAGES - self.distinct,
            self.dead_lettered,
            self.secs
        );
    }

    fn assert_exactly_once(&self) {
        assert_eq!(self.distinct, MESSAGES, "every message applied: {self:?}");
        assert_eq!(self.rows, MESSAGES, "none applied twice: {self:?}");
        assert_eq!(self.dead_lettered, 0, "nothing dead-lettered: {self:?}");
    }
}

/// Run the worker, killing itself at `kill` after a varying number of passes, respawned
/// until every message is applied (the last run is never killed), then check the table.
async fn consumer_killed(scenario: &'static str, kill: &str) -> Table {
    init_tracing();
    // The scenarios share one queue and restart PostgreSQL: one at a time, whatever
    // the test harness's thread count.
    let _serial = reliable_mq_tests::fault::SCENARIO_LOCK.lock().await;
    let _cleanup = Cleanup::consumer(QUEUE, &["1s", "2s", "4s"], &[]);
    let db = TestSchema::new("fault").await;
    sqlx::query("CREATE TABLE orders (n bigint NOT NULL, message_id text NOT NULL)")
        .execute(&db.pool)
        .await
        .expect("orders");
    let log = format!("/tmp/rmq-fault-inbox-{kill}.log");
    let _ = std::fs::remove_file(&log);
    let started = Instant::now();
    let broker = Broker::connect().await;
    let mut kills = 0;
    let mut worker = Worker::spawn(&db.name, kill, 150, "consumer", &log);
    // The worker declares the queue; publish once it exists.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !broker.queue_exists(QUEUE).await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in 0..MESSAGES {
        broker
            .publish_json("", QUEUE, &serde_json::json!(n), &format!("fault-{n}"))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if worker.exited() {
            kills += 1;
            let (point, after) = if kills >= KILLS {
                ("none", u64::MAX)
            } else {
                (kill, 150 + 97 * u64::from(kills))
            };
            worker = Worker::spawn(&db.name, point, after, "consumer", &log);
        }
        let distinct = count(&db.pool, "SELECT count(DISTINCT n) FROM orders").await;
        if (distinct >= MESSAGES && broker.ready_count(QUEUE).await == Some(0))
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let late redeliveries (duplicates) arrive before the count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.stop();
    let dead = broker
        .ready_count(&format!("{QUEUE}.dlq"))
        .await
        .unwrap_or(0);
    Table {
        scenario,
        kills,
        rows: count(&db.pool, "SELECT count(*) FROM orders").await,
        distinct: count(&db.pool, "SELECT count(DISTINCT n) FROM orders").await,
        dead_lettered: dead,
        secs: started.elapsed().as_secs(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_consumer_killed_mid_handler() {
    if !reliable_mq_tests::faults_enabled("inbox_consumer_killed_mid_handler") {
        return;
    }
    let table = consumer_killed("consumer SIGKILL mid-handler", "handler").await;
    table.print();
    table.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_consumer_killed_between_write_and_commit() {
    if !reliable_mq_tests::faults_enabled("inbox_consumer_killed_between_write_and_commit") {
        return;
    }
    let table = consumer_killed("consumer SIGKILL after write, before commit", "write").await;
    table.print();
    table.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_consumer_killed_between_commit_and_ack() {
    if !reliable_mq_tests::faults_enabled("inbox_consumer_killed_between_commit_and_ack") {
        return;
    }
    let table = consumer_killed("consumer SIGKILL after commit, before ack", "commit").await;
    table.print();
    table.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_killed_mid_batch() {
    if !reliable_mq_tests::faults_enabled("outbox_relay_killed_mid_batch") {
        return;
    }
    init_tracing();
    // The scenarios share one queue and restart PostgreSQL: one at a time, whatever
    // the test harness's thread count.
    let _serial = reliable_mq_tests::fault::SCENARIO_LOCK.lock().await;
    let _cleanup = Cleanup::consumer(QUEUE, &["1s", "2s", "4s"], &[]);
    let db = TestSchema::new("fault_relay").await;
    sqlx::query("CREATE TABLE orders (n bigint NOT NULL, message_id text NOT NULL)")
        .execute(&db.pool)
        .await
        .expect("orders");
    // 3,000 events in the outbox, to the inbox consumer's queue.
    for chunk in 0..(MESSAGES / 500) {
        let mut tx = db.pool.begin().await.expect("begin");
        for n in 0..500 {
            Outbox::publish(&mut tx, "", QUEUE, &(chunk * 500 + n))
                .await
                .expect("outbox");
        }
        tx.commit().await.expect("commit");
    }
    let log = "/tmp/rmq-fault-inbox-relay.log";
    let _ = std::fs::remove_file(log);
    let started = Instant::now();
    let broker = Broker::connect().await;
    // The relay kills itself after its 3rd, 4th, ... confirmed batch, before marking it.
    let mut kills = 0;
    let mut worker = Worker::spawn(&db.name, "relay", 3, "relay", log);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if worker.exited() {
            kills += 1;
            let (point, after) = if kills >= KILLS {
                ("none", u64::MAX)
            } else {
                ("relay", 3 + u64::from(kills))
            };
            worker = Worker::spawn(&db.name, point, after, "relay", log);
        }
        let sent = Outbox::stats(&db.pool).await.map(|s| s.sent).unwrap_or(0);
        let distinct = count(&db.pool, "SELECT count(DISTINCT n) FROM orders").await;
        if (sent >= MESSAGES && distinct >= MESSAGES && broker.ready_count(QUEUE).await == Some(0))
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.stop();
    let duplicates_absorbed = count(&db.pool, "SELECT count(*) FROM reliable_mq_inbox").await;
    let table = Table {
        scenario: "relay SIGKILL mid-batch (confirmed, not marked)",
        kills,
        rows: count(&db.pool, "SELECT count(*) FROM orders").await,
        distinct: count(&db.pool, "SELECT count(DISTINCT n) FROM orders").await,
        dead_lettered: broker
            .ready_count(&format!("{QUEUE}.dlq"))
            .await
            .unwrap_or(0),
        secs: started.elapsed().as_secs(),
    };
    table.print();
    println!(
        "inbox rows {duplicates_absorbed}; outbox {:?}",
        Outbox::stats(&db.pool).await
    );
    assert!(kills >= 2, "the relay was killed mid-batch: {table:?}");
    table.assert_exactly_once();
}

/// Restores PostgreSQL when dropped, even if the test fails.
struct PostgresGuard;

fn pg_ctl(action: &str) -> bool {
    sh(&format!(
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main {action}"
    ))
}

impl Drop for PostgresGuard {
    fn drop(&mut self) {
        pg_ctl("start");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream() {
    if !reliable_mq_tests::faults_enabled("postgres_restarted_mid_stream") {
        return;
    }
    init_tracing();
    // The scenarios share one queue and restart PostgreSQL: one at a time, whatever
    // the test harness's thread count.
    let _serial = reliable_mq_tests::fault::SCENARIO_LOCK.lock().await;
    let _cleanup = Cleanup::consumer(QUEUE, &["1s", "2s", "4s"], &[]);
    let db = TestSchema::new("fault_pg").await;
    sqlx::query("CREATE TABLE orders (n bigint NOT NULL, message_id text NOT NULL)")
        .execute(&db.pool)
        .await
        .expect("orders");
    let log = "/tmp/rmq-fault-inbox-pg.log";
    let _ = std::fs::remove_file(log);
    let started = Instant::now();
    let broker = Broker::connect().await;
    let mut worker = Worker::spawn(&db.name, "none", u64::MAX, "consumer", log);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !broker.queue_exists(QUEUE).await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Published while the consumer runs, and through the outage.
    let publishing = tokio::spawn(async move {
        let broker = Broker::connect().await;
        for n in 0..MESSAGES {
            broker
                .publish_json("", QUEUE, &serde_json::json!(n), &format!("fault-{n}"))
                .await;
        }
    });
    // Mid-stream: a tenth applied.
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&db.pool, "SELECT count(*) FROM orders").await < MESSAGES / 10
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let guard = PostgresGuard;
    assert!(pg_ctl("stop"), "stopped PostgreSQL");
    // Down for a while: deliveries must wait in place, not be retried or dead-lettered.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let ready_while_down = broker.ready_count(QUEUE).await;
    let retry_tier_while_down = broker.ready_count(&format!("{QUEUE}.retry.1s")).await;
    assert!(pg_ctl("start"), "started PostgreSQL");
    drop(guard);
    let _ = publishing.await;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let distinct = count(&db.pool, "SELECT count(DISTINCT n) FROM orders").await;
        if (distinct >= MESSAGES && broker.ready_count(QUEUE).await == Some(0))
            || Instant::now() > deadline
            || worker.exited()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let crashed = worker.exited();
    worker.stop();
    let table = Table {
        scenario: "PostgreSQL stopped 8 s mid-stream, started",
        kills: 0,
        rows: count(&db.pool, "SELECT count(*) FROM orders").await,
        distinct: count(&db.pool, "SELECT count(DISTINCT n) FROM orders").await,
        dead_lettered: broker
            .ready_count(&format!("{QUEUE}.dlq"))
            .await
            .unwrap_or(0),
        secs: started.elapsed().as_secs(),
    };
    table.print();
    println!("while down: ready {ready_while_down:?}, retry tier {retry_tier_while_down:?}");
    assert!(
        ready_while_down.is_some_and(|r| r > 0),
        "the outage came mid-stream (messages waiting): {ready_while_down:?}"
    );
    assert!(!crashed, "the worker kept running");
    let stats = std::fs::read_to_string(log).unwrap_or_default();
    let last = stats
        .lines()
        .rev()
        .find(|l| l.contains("inbox_worker stats:"));
    println!("{last:?}");
    assert!(
        last.is_some_and(|l| l.contains("retried=0 dead_lettered=0")),
        "nothing retried or dead-lettered while PostgreSQL was down: {last:?}"
    );
    assert_eq!(
        retry_tier_while_down,
        Some(0),
        "nothing sent to the retry ladder while down"
    );
    table.assert_exactly_once();
}
