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

/// One scenario's world, held for its length: the lock that runs scenarios one at a time,
/// its broker objects and schema (with the `orders` table the worker writes), its worker
/// log (emptied), a broker connection and the clock its table reports.
struct Scenario {
    broker: Broker,
    log: String,
    started: Instant,
    db: TestSchema,
    _cleanup: Cleanup,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Scenario {
    /// Takes the lock and sets up the world; `schema` names the schema, `log` the worker log.
    async fn start(schema: &str, log: &str) -> Self {
        init_tracing();
        // The scenarios share one queue and restart PostgreSQL: one at a time, whatever
        // the test harness's thread count.
        let serial = reliable_mq_tests::fault::SCENARIO_LOCK.lock().await;
        let cleanup = Cleanup::consumer(QUEUE, &["1s", "2s", "4s"], &[]);
        let db = TestSchema::new(schema).await;
        sqlx::query("CREATE TABLE orders (n bigint NOT NULL, message_id text NOT NULL)")
            .execute(&db.pool)
            .await
            .expect("orders");
        let _ = std::fs::remove_file(log);
        Self {
            broker: Broker::connect().await,
            log: log.to_owned(),
            started: Instant::now(),
            db,
            _cleanup: cleanup,
            _serial: serial,
        }
    }

    /// A worker of this scenario's schema and log (see [`Worker::spawn`]).
    fn spawn(&self, kill: &str, kill_after: u64, role: &str) -> Worker {
        Worker::spawn(&self.db.name, kill, kill_after, role, &self.log)
    }

    /// Waits (up to 30 s) for the worker to declare the queue, so publishes are not lost.
    async fn await_queue(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.broker.queue_exists(QUEUE).await && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether every message is in the table and the queue is empty.
    async fn all_applied(&self) -> bool {
        count(&self.db.pool, "SELECT count(DISTINCT n) FROM orders").await >= MESSAGES
            && self.broker.ready_count(QUEUE).await == Some(0)
    }

    /// Respawns `worker` (a `role` spawned to kill itself at `kill` after `first_after`
    /// passes) each time it dies, `step` passes later each time, until `done` (or 300 s);
    /// the `KILLS`th respawn is never killed. Returns the kills and the running worker.
    async fn respawn_until<F, Fut>(
        &self,
        mut worker: Worker,
        role: &str,
        kill: &str,
        (first_after, step): (u64, u64),
        mut done: F,
    ) -> (u32, Worker)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let mut kills = 0;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if worker.exited() {
                kills += 1;
                let (point, after) = if kills >= KILLS {
                    ("none", u64::MAX)
                } else {
                    (kill, first_after + step * u64::from(kills))
                };
                worker = self.spawn(point, after, role);
            }
            if done().await || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (kills, worker)
    }

    /// What the checker finds in the table and the dead-letter queue now.
    async fn table(&self, scenario: &'static str, kills: u32) -> Table {
        Table {
            scenario,
            kills,
            rows: count(&self.db.pool, "SELECT count(*) FROM orders").await,
            distinct: count(&self.db.pool, "SELECT count(DISTINCT n) FROM orders").await,
            dead_lettered: self
                .broker
                .ready_count(&format!("{QUEUE}.dlq"))
                .await
                .unwrap_or(0),
            secs: self.started.elapsed().as_secs(),
        }
    }
}

/// Publishes the `MESSAGES` numbers to the queue, message ids `fault-{n}`.
async fn publish_all(broker: &Broker) {
    for n in 0..MESSAGES {
        broker
            .publish_json("", QUEUE, &serde_json::json!(n), &format!("fault-{n}"))
            .await;
    }
}

/// Run the worker, killing itself at `kill` after a varying number of passes, respawned
/// until every message is applied (the last run is never killed), then check the table.
/// Skipped unless `test` is enabled (`RELIABLE_MQ_FAULTS=1`).
async fn consumer_killed(test: &str, scenario: &'static str, kill: &str) {
    if !reliable_mq_tests::faults_enabled(test) {
        return;
    }
    let s = Scenario::start("fault", &format!("/tmp/rmq-fault-inbox-{kill}.log")).await;
    let worker = s.spawn(kill, 150, "consumer");
    s.await_queue().await;
    publish_all(&s.broker).await;
    let (kills, worker) = s
        .respawn_until(worker, "consumer", kill, (150, 97), || s.all_applied())
        .await;
    // Let late redeliveries (duplicates) arrive before the count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.stop();
    let table = s.table(scenario, kills).await;
    table.print();
    table.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_consumer_killed_mid_handler() {
    consumer_killed(
        "inbox_consumer_killed_mid_handler",
        "consumer SIGKILL mid-handler",
        "handler",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_consumer_killed_between_write_and_commit() {
    consumer_killed(
        "inbox_consumer_killed_between_write_and_commit",
        "consumer SIGKILL after write, before commit",
        "write",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_consumer_killed_between_commit_and_ack() {
    consumer_killed(
        "inbox_consumer_killed_between_commit_and_ack",
        "consumer SIGKILL after commit, before ack",
        "commit",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_killed_mid_batch() {
    if !reliable_mq_tests::faults_enabled("outbox_relay_killed_mid_batch") {
        return;
    }
    let mut s = Scenario::start("fault_relay", "/tmp/rmq-fault-inbox-relay.log").await;
    // 3,000 events in the outbox, to the inbox consumer's queue.
    for chunk in 0..(MESSAGES / 500) {
        let mut tx = s.db.pool.begin().await.expect("begin");
        for n in 0..500 {
            Outbox::publish(&mut tx, "", QUEUE, &(chunk * 500 + n))
                .await
                .expect("outbox");
        }
        tx.commit().await.expect("commit");
    }
    // The table's time is the relay's, not the outbox fill's.
    s.started = Instant::now();
    // The relay kills itself after its 3rd, 4th, ... confirmed batch, before marking it.
    let worker = s.spawn("relay", 3, "relay");
    let (kills, worker) = s
        .respawn_until(worker, "relay", "relay", (3, 1), || async {
            let sent = Outbox::stats(&s.db.pool).await.map(|s| s.sent).unwrap_or(0);
            sent >= MESSAGES && s.all_applied().await
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.stop();
    let duplicates_absorbed = count(&s.db.pool, "SELECT count(*) FROM reliable_mq_inbox").await;
    let table = s
        .table("relay SIGKILL mid-batch (confirmed, not marked)", kills)
        .await;
    table.print();
    println!(
        "inbox rows {duplicates_absorbed}; outbox {:?}",
        Outbox::stats(&s.db.pool).await
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
    let s = Scenario::start("fault_pg", "/tmp/rmq-fault-inbox-pg.log").await;
    let mut worker = s.spawn("none", u64::MAX, "consumer");
    s.await_queue().await;
    // Published while the consumer runs, and through the outage.
    let publishing = tokio::spawn(async move { publish_all(&Broker::connect().await).await });
    // Mid-stream: a tenth applied.
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&s.db.pool, "SELECT count(*) FROM orders").await < MESSAGES / 10
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let guard = PostgresGuard;
    assert!(pg_ctl("stop"), "stopped PostgreSQL");
    // Down for a while: deliveries must wait in place, not be retried or dead-lettered.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let ready_while_down = s.broker.ready_count(QUEUE).await;
    let retry_tier_while_down = s.broker.ready_count(&format!("{QUEUE}.retry.1s")).await;
    assert!(pg_ctl("start"), "started PostgreSQL");
    drop(guard);
    let _ = publishing.await;
    let deadline = Instant::now() + Duration::from_secs(180);
    while !(s.all_applied().await || Instant::now() > deadline || worker.exited()) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let crashed = worker.exited();
    worker.stop();
    let table = s
        .table("PostgreSQL stopped 8 s mid-stream, started", 0)
        .await;
    table.print();
    println!("while down: ready {ready_while_down:?}, retry tier {retry_tier_while_down:?}");
    assert!(
        ready_while_down.is_some_and(|r| r > 0),
        "the outage came mid-stream (messages waiting): {ready_while_down:?}"
    );
    assert!(!crashed, "the worker kept running");
    let stats = std::fs::read_to_string(&s.log).unwrap_or_default();
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
