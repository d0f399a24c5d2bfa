//! The transactional inbox on the real broker and PostgreSQL: each message's database
//! effects are committed once (duplicates are acked without a call), a handler error rolls
//! its writes back and takes the retry ladder, a serialization failure is run again in
//! place, a commit that fails is never acked, an unreachable database pauses the consumer
//! in place, and an outbox write in the handler commits with it.

#[path = "pg_support.rs"]
mod pg_support;

use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pg_support::TestSchema;
use reliable_mq::postgres::{InboxTx, Outbox};
use reliable_mq::{App, Delivery, Error, HandlerError, StatsSnapshot, consumer};
use reliable_mq_tests::{Broker, Cleanup, eventually, init_tracing, test_config};
use sqlx::PgPool;

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// The start of a test on `queue` (retry tiers `tiers`): tracing, the guard that deletes
/// its broker objects, and a schema of its own with an `orders` table.
async fn orders_schema(queue: &str, tiers: &[&str], schema: &str) -> (Cleanup, TestSchema) {
    init_tracing();
    let cleanup = Cleanup::consumer(queue, tiers, &[]);
    let db = TestSchema::new(schema).await;
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY, attempt int NOT NULL)")
        .execute(&db.pool)
        .await
        .expect("orders table");
    (cleanup, db)
}

/// Writes order `id` as seen on `attempt`, in the message's transaction.
async fn insert_order(tx: &mut InboxTx, id: i64, attempt: u32) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO orders (id, attempt) VALUES ($1, $2)")
        .bind(id)
        .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Publishes each of `ids` to `queue` as a JSON number with message id `{prefix}-{id}`.
async fn publish_ids(broker: &Broker, queue: &str, prefix: &str, ids: RangeInclusive<i64>) {
    for id in ids {
        broker
            .publish_json("", queue, &serde_json::json!(id), &format!("{prefix}-{id}"))
            .await;
    }
}

/// Asserts that no order row of a first attempt was committed and `n` of a second were.
async fn assert_committed_on_second_attempt(pool: &PgPool, n: i64) {
    assert_eq!(
        count(pool, "SELECT count(*) FROM orders WHERE attempt = 1").await,
        0
    );
    assert_eq!(
        count(pool, "SELECT count(*) FROM orders WHERE attempt = 2").await,
        n
    );
}

/// An app running `spec` with `pool` as its PostgreSQL (the queue is the spec's own).
async fn start_inbox(
    queue: &str,
    spec: reliable_mq::ConsumerSpec,
    pool: &PgPool,
) -> reliable_mq::RunningApp {
    App::new(test_config(queue))
        .consumer(spec)
        .with_postgres(pool.clone())
        .start()
        .await
        .expect("starts")
}

/// Whether `queue`'s consumer stats come to satisfy `done` within `within`.
async fn stats_reach(
    app: &reliable_mq::RunningApp,
    queue: &str,
    within: Duration,
    done: impl Fn(StatsSnapshot) -> bool,
) -> bool {
    let done = &done;
    eventually(within, || async move { app.stats(queue).is_some_and(done) }).await
}

/// [`stats_reach`], then `app` shut down: whether the stats came, and the last ones seen.
async fn settle(
    app: reliable_mq::RunningApp,
    queue: &str,
    within: Duration,
    done: impl Fn(StatsSnapshot) -> bool,
) -> (bool, Option<StatsSnapshot>) {
    let settled = stats_reach(&app, queue, within, done).await;
    let stats = app.stats(queue);
    app.shutdown().await.expect("clean shutdown");
    (settled, stats)
}

// ---- once, duplicates acked, outbox in the same transaction ----

#[consumer(
    queue = "rmq-test-inbox-once",
    dlx = "rmq-test-inbox-once.dlx",
    inbox,
    concurrency = 4
)]
async fn inbox_once(id: i64, tx: &mut InboxTx, delivery: &Delivery) -> Result<(), HandlerError> {
    insert_order(tx, id, delivery.attempt()).await?;
    Outbox::publish(
        tx,
        "",
        "rmq-test-inbox-once.events",
        &serde_json::json!({ "id": id }),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_is_committed_once_and_duplicates_are_acked() {
    const QUEUE: &str = "rmq-test-inbox-once";
    let (_cleanup, db) = orders_schema(QUEUE, &["1s", "2s", "4s"], "once").await;
    let app = start_inbox(QUEUE, inbox_once::SPEC, &db.pool).await;
    let broker = Broker::connect().await;
    publish_ids(&broker, QUEUE, "once", 1..=50).await;
    // The same ids again: already in the inbox, acked without a call.
    publish_ids(&broker, QUEUE, "once", 1..=10).await;
    let (settled, stats) = settle(app, QUEUE, Duration::from_secs(20), |s| {
        s.handled == 50 && s.duplicates == 10
    })
    .await;
    assert!(settled, "50 handled and 10 duplicates: {stats:?}");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM orders").await, 50);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM reliable_mq_inbox WHERE consumer = 'rmq-test-inbox-once'"
        )
        .await,
        50
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM reliable_mq_outbox WHERE status = 'pending'"
        )
        .await,
        50,
        "one outbox row per committed message"
    );
    assert_eq!(broker.ready_count(QUEUE).await, Some(0), "everything acked");
    assert_eq!(broker.ready_count(&format!("{QUEUE}.dlq")).await, Some(0));
}

// ---- a handler error rolls back and takes the ladder ----

#[consumer(
    queue = "rmq-test-inbox-rollback",
    dlx = "rmq-test-inbox-rollback.dlx",
    inbox,
    retry_delay = "1s"
)]
async fn inbox_rollback(
    id: i64,
    tx: &mut InboxTx,
    delivery: &Delivery,
) -> Result<(), HandlerError> {
    insert_order(tx, id, delivery.attempt()).await?;
    if delivery.attempt() == 1 {
        return Err(HandlerError::retry("first attempt fails after its write"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_error_rolls_back_its_writes_and_retries() {
    const QUEUE: &str = "rmq-test-inbox-rollback";
    let (_cleanup, db) = orders_schema(QUEUE, &["1s", "2s", "4s"], "rollback").await;
    let app = start_inbox(QUEUE, inbox_rollback::SPEC, &db.pool).await;
    let broker = Broker::connect().await;
    publish_ids(&broker, QUEUE, "rb", 1..=5).await;
    let (settled, stats) = settle(app, QUEUE, Duration::from_secs(20), |s| s.handled == 5).await;
    assert!(settled, "5 handled on their second attempt: {stats:?}");
    assert_eq!(stats.map(|s| s.retried), Some(5));
    // The first attempt's writes (and inbox rows) were rolled back.
    assert_committed_on_second_attempt(&db.pool, 5).await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM reliable_mq_inbox").await,
        5
    );
}

// ---- a serialization failure runs again in place ----

static CONFLICT_CALLS: AtomicU32 = AtomicU32::new(0);

#[consumer(
    queue = "rmq-test-inbox-conflict",
    dlx = "rmq-test-inbox-conflict.dlx",
    inbox
)]
async fn inbox_conflict(id: i64, tx: &mut InboxTx) -> Result<(), HandlerError> {
    let call = CONFLICT_CALLS.fetch_add(1, Ordering::SeqCst);
    insert_order(tx, id, 1).await?;
    if call < 2 {
        // A real serialization failure from the server (as SERIALIZABLE raises it).
        sqlx::query(
            "DO $$ BEGIN RAISE EXCEPTION 'could not serialize' USING ERRCODE = '40001'; END $$",
        )
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serialization_failure_is_run_again_in_place() {
    const QUEUE: &str = "rmq-test-inbox-conflict";
    let (_cleanup, db) = orders_schema(QUEUE, &["1s", "2s", "4s"], "conflict").await;
    let app = start_inbox(QUEUE, inbox_conflict::SPEC, &db.pool).await;
    let broker = Broker::connect().await;
    publish_ids(&broker, QUEUE, "conflict", 7..=7).await;
    let (settled, stats) = settle(app, QUEUE, Duration::from_secs(15), |s| s.handled == 1).await;
    assert!(settled, "handled: {stats:?}");
    assert_eq!(
        CONFLICT_CALLS.load(Ordering::SeqCst),
        3,
        "two conflicts, then success"
    );
    assert_eq!(
        stats.map(|s| s.retried),
        Some(0),
        "not through the retry ladder"
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM orders").await, 1);
}

// ---- a failed commit is never acked ----

#[consumer(
    queue = "rmq-test-inbox-commit",
    dlx = "rmq-test-inbox-commit.dlx",
    inbox,
    retry_delay = "1s"
)]
async fn inbox_commit(id: i64, tx: &mut InboxTx, delivery: &Delivery) -> Result<(), HandlerError> {
    insert_order(tx, id, delivery.attempt()).await?;
    if delivery.attempt() == 1 {
        // Breaks a deferred constraint: only the commit finds out.
        sqlx::query("INSERT INTO commit_guard (id) VALUES ($1), ($1)")
            .bind(id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_is_not_acked_and_the_message_comes_back() {
    const QUEUE: &str = "rmq-test-inbox-commit";
    let (_cleanup, db) = orders_schema(QUEUE, &["1s", "2s", "4s"], "commit").await;
    sqlx::query(
        "CREATE TABLE commit_guard (id bigint, \
         CONSTRAINT commit_guard_once UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)",
    )
    .execute(&db.pool)
    .await
    .expect("guard table");
    let app = start_inbox(QUEUE, inbox_commit::SPEC, &db.pool).await;
    let broker = Broker::connect().await;
    publish_ids(&broker, QUEUE, "commit", 3..=3).await;
    let (settled, stats) = settle(app, QUEUE, Duration::from_secs(15), |s| s.handled == 1).await;
    assert!(settled, "handled on the second attempt: {stats:?}");
    assert_eq!(
        stats.map(|s| s.retried),
        Some(1),
        "the failed commit came back"
    );
    assert_committed_on_second_attempt(&db.pool, 1).await;
}

// ---- database unreachable: paused in place ----

static PAUSE_CALLS: AtomicU32 = AtomicU32::new(0);

#[consumer(
    queue = "rmq-test-inbox-pause",
    dlx = "rmq-test-inbox-pause.dlx",
    inbox,
    max_retries = 1
)]
async fn inbox_pause(id: i64, tx: &mut InboxTx) -> Result<(), HandlerError> {
    PAUSE_CALLS.fetch_add(1, Ordering::SeqCst);
    insert_order(tx, id, 1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_pauses_in_place_and_resumes() {
    const QUEUE: &str = "rmq-test-inbox-pause";
    let (_cleanup, db) = orders_schema(QUEUE, &["1s"], "pause").await;
    // A pool of one connection, which the test holds: no transaction can begin.
    let pool = db.pool(1).await;
    let held = pool.acquire().await.expect("the only connection");
    let app = start_inbox(QUEUE, inbox_pause::SPEC, &pool).await;
    let broker = Broker::connect().await;
    publish_ids(&broker, QUEUE, "pause", 1..=3).await;
    let paused = stats_reach(&app, QUEUE, Duration::from_secs(10), |s| s.paused >= 1).await;
    // Long enough for several tries of each (acquire gives up after a second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = app.stats(QUEUE);
    drop(held);
    let (resumed, after) = settle(app, QUEUE, Duration::from_secs(20), |s| {
        s.handled == 3 && s.paused == 0
    })
    .await;
    assert!(
        paused,
        "paused while the database is unreachable: {during:?}"
    );
    let during = during.expect("stats");
    assert_eq!(during.handled, 0);
    assert_eq!(
        (during.retried, during.dead_lettered),
        (0, 0),
        "nothing retried or dead-lettered"
    );
    assert_eq!(
        PAUSE_CALLS.load(Ordering::SeqCst),
        3,
        "no handler call while paused"
    );
    assert!(resumed, "resumed unaided: {after:?}");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM orders").await, 3);
    assert_eq!(broker.ready_count(&format!("{QUEUE}.dlq")).await, Some(0));
}

// ---- no message id, no pool, expiry ----

#[consumer(queue = "rmq-test-inbox-noid", dlx = "rmq-test-inbox-noid.dlx", inbox)]
async fn inbox_noid(_id: i64, _tx: &mut InboxTx) -> Result<(), HandlerError> {
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_id_is_dead_lettered_and_a_missing_pool_stops_start_up() {
    init_tracing();
    const QUEUE: &str = "rmq-test-inbox-noid";
    let _cleanup = Cleanup::consumer(QUEUE, &["1s", "2s", "4s"], &[]);
    let err = App::new(test_config(QUEUE))
        .consumer(inbox_noid::SPEC)
        .start()
        .await
        .expect_err("an inbox consumer without a pool cannot start");
    assert!(
        matches!(&err, Error::Config(m) if m.contains("App::with_postgres")),
        "{err}"
    );
    let db = TestSchema::new("noid").await;
    let app = start_inbox(QUEUE, inbox_noid::SPEC, &db.pool).await;
    let broker = Broker::connect().await;
    broker
        .publish_raw(
            "",
            QUEUE,
            b"1",
            lapin::BasicProperties::default().with_content_type("application/json".into()),
        )
        .await;
    let dead = broker
        .get_within(&format!("{QUEUE}.dlq"), Duration::from_secs(10))
        .await;
    app.shutdown().await.expect("clean shutdown");
    let dead = dead.expect("dead-lettered");
    assert_eq!(
        dead.header("x-error-kind").as_deref(),
        Some("missing-message-id")
    );
}

#[tokio::test]
async fn expired_inbox_rows_are_removed_in_bounded_batches() {
    let db = TestSchema::new("expiry").await;
    sqlx::query(
        "INSERT INTO reliable_mq_inbox (consumer, message_id, expires_at) \
         SELECT 'q', 'old-' || n, now() - interval '1 minute' FROM generate_series(1, 25) n \
         UNION ALL SELECT 'q', 'new-' || n, now() + interval '1 hour' FROM generate_series(1, 5) n",
    )
    .execute(&db.pool)
    .await
    .expect("rows");
    let first = reliable_mq::postgres::remove_expired_inbox_rows(&db.pool, 10)
        .await
        .expect("clean-up");
    assert_eq!(first, 10, "one bounded batch");
    while reliable_mq::postgres::remove_expired_inbox_rows(&db.pool, 10)
        .await
        .expect("clean-up")
        > 0
    {}
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM reliable_mq_inbox").await,
        5
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM reliable_mq_inbox WHERE message_id LIKE 'new-%'"
        )
        .await,
        5
    );
}
