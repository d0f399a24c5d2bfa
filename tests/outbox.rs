//! The transactional outbox on the real broker and PostgreSQL: a message exists if and
//! only if its transaction committed, the relay publishes it with the row's `message_id`
//! and marks it sent after the confirm, wakes on the commit's notification, marks an
//! unroutable message failed with the reason (counted in the metrics, reported by the
//! health, without making the app unready), two relays never publish a row twice, and
//! relays ordered per aggregate publish each aggregate's rows in order.
//!
//! The tests take one lock each: `reliable_mq_outbox_relays_running` counts the relays of
//! the whole process, so a test reads it exactly only while no other test's relay runs
//! (the other series are labelled with each test's own schema).

#[path = "pg_support.rs"]
mod pg_support;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use pg_support::TestSchema;
use reliable_mq::postgres::{Outbox, OutboxMessage, OutboxRelay, OutboxStats};
use reliable_mq::{App, ConsumerConfig, HandlerError, Publisher, ShutdownHandle, handler_fn};
use reliable_mq_tests::{
    Broker, Cleanup, amqp_url, eventually, http_get, init_tracing, test_config, unique,
};
use tokio::sync::{Mutex, MutexGuard};

/// One relay-running test at a time (see the module).
async fn serial() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::const_new(());
    ONE.lock().await
}

/// A plain durable queue for the relay to publish to (through the default exchange).
async fn declare_queue(broker: &Broker, queue: &str) {
    broker
        .fresh_channel()
        .await
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
}

/// Every message in `queue` now: its message ids, acked.
async fn drain_ids(broker: &Broker, queue: &str) -> Vec<String> {
    let channel = broker.fresh_channel().await;
    let mut ids = Vec::new();
    while let Ok(Some(got)) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
    {
        if let Some(id) = got.delivery.properties.message_id() {
            ids.push(id.to_string());
        }
        let _ = got.delivery.acker.ack(BasicAckOptions::default()).await;
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_committed_messages_are_published_with_their_ids() {
    init_tracing();
    let _serial = serial().await;
    let queue = unique("rmq-test-outbox-commit");
    let _cleanup = Cleanup::consumer(&queue, &[], &[]);
    let broker = Broker::connect().await;
    declare_queue(&broker, &queue).await;
    let db = TestSchema::new("outbox_commit").await;

    let mut tx = db.pool.begin().await.expect("begin");
    let kept = Outbox::publish_with(
        &mut tx,
        "",
        &queue,
        &serde_json::json!({"n": 1}),
        OutboxMessage {
            message_id: Some("kept-1".into()),
            aggregate_key: Some("order-1".into()),
        },
    )
    .await
    .expect("write");
    tx.commit().await.expect("commit");
    let mut tx = db.pool.begin().await.expect("begin");
    Outbox::publish(&mut tx, "", &queue, &serde_json::json!({"n": 2}))
        .await
        .expect("write");
    tx.rollback().await.expect("rollback");

    let publisher = Publisher::connect(&amqp_url()).await.expect("publisher");
    let relay = OutboxRelay::new(db.pool.clone(), publisher.clone());
    let batch = relay.relay_batch().await.expect("batch");
    assert_eq!((batch.taken, batch.sent), (1, 1), "{batch:?}");
    assert_eq!(
        relay.relay_batch().await.expect("batch").taken,
        0,
        "sent once"
    );
    let got = broker
        .get_within(&queue, Duration::from_secs(5))
        .await
        .expect("published");
    assert_eq!(kept, "kept-1");
    assert_eq!(got.message_id().as_deref(), Some("kept-1"));
    assert_eq!(got.body, br#"{"n":1}"#);
    assert_eq!(
        broker.ready_count(&queue).await,
        Some(0),
        "the rolled-back one never"
    );
    assert_eq!(
        Outbox::stats(&db.pool).await.expect("stats"),
        OutboxStats {
            pending: 0,
            sent: 1,
            failed: 0
        }
    );
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_message_is_marked_failed_with_the_reason() {
    init_tracing();
    let _serial = serial().await;
    let db = TestSchema::new("outbox_unroutable").await;
    let nowhere = unique("rmq-test-outbox-nowhere");
    let mut tx = db.pool.begin().await.expect("begin");
    let id = Outbox::publish(&mut tx, "", &nowhere, &serde_json::json!(1))
        .await
        .expect("write");
    tx.commit().await.expect("commit");
    let publisher = Publisher::connect(&amqp_url()).await.expect("publisher");
    let relay = OutboxRelay::new(db.pool.clone(), publisher.clone());
    let batch = relay.relay_batch().await.expect("batch");
    assert_eq!(batch.failed, 1, "{batch:?}");
    let failed = Outbox::failed(&db.pool, 10).await.expect("query");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].message_id, id);
    assert!(
        failed[0].reason.contains("unroutable"),
        "{}",
        failed[0].reason
    );
    assert_eq!(
        relay.relay_batch().await.expect("batch").taken,
        0,
        "not retried on its own"
    );
    // Put back after the fix (here: the queue now exists), it goes out.
    let broker = Broker::connect().await;
    let _cleanup = Cleanup::consumer(&nowhere, &[], &[]);
    declare_queue(&broker, &nowhere).await;
    assert!(
        Outbox::retry_failed(&db.pool, failed[0].id)
            .await
            .expect("retry")
    );
    assert_eq!(relay.relay_batch().await.expect("batch").sent, 1);
    assert_eq!(drain_ids(&broker, &nowhere).await, vec![id]);
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_relay_wakes_on_commit_and_two_relays_never_publish_a_row_twice() {
    init_tracing();
    let _serial = serial().await;
    let queue = unique("rmq-test-outbox-relays");
    let _cleanup = Cleanup::consumer(&queue, &[], &[]);
    let broker = Broker::connect().await;
    declare_queue(&broker, &queue).await;
    let db = TestSchema::new("outbox_relays").await;
    let publisher = Publisher::connect(&amqp_url()).await.expect("publisher");
    let shutdown = ShutdownHandle::default();
    // Polls once a minute: anything sooner is the notification's doing.
    let relays: Vec<_> = (0..2)
        .map(|_| {
            OutboxRelay::new(db.pool.clone(), publisher.clone())
                .batch_size(32)
                .poll_every(Duration::from_secs(60))
                .spawn(shutdown.clone())
        })
        .collect();
    // Let both listen before the first commit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut tx = db.pool.begin().await.expect("begin");
    Outbox::publish(&mut tx, "", &queue, &serde_json::json!("first"))
        .await
        .expect("write");
    tx.commit().await.expect("commit");
    let woke = eventually(Duration::from_secs(10), || {
        let broker = &broker;
        let queue = &queue;
        async move { broker.ready_count(queue).await == Some(1) }
    })
    .await;
    assert!(
        woke,
        "published on the commit's notification, not the minute poll"
    );

    let total = 600usize;
    for chunk in 0..(total / 100) {
        let mut tx = db.pool.begin().await.expect("begin");
        for n in 0..100 {
            Outbox::publish(&mut tx, "", &queue, &serde_json::json!(chunk * 100 + n))
                .await
                .expect("write");
        }
        tx.commit().await.expect("commit");
    }
    let all_sent = eventually(Duration::from_secs(30), || {
        let pool = &db.pool;
        async move {
            Outbox::stats(pool)
                .await
                .is_ok_and(|s| s.sent == 601 && s.pending == 0)
        }
    })
    .await;
    shutdown.trigger();
    for relay in relays {
        let _ = relay.await;
    }
    let stats = Outbox::stats(&db.pool).await.expect("stats");
    assert!(all_sent, "{stats:?}");
    let ids = drain_ids(&broker, &queue).await;
    let distinct: HashSet<_> = ids.iter().collect();
    assert_eq!(ids.len(), 601, "every row once, none twice");
    assert_eq!(distinct.len(), 601);
    publisher.close().await;
}

/// Every `reliable_mq_outbox_*` series of a scrape, by name and labels (0 when absent).
fn outbox_series(scrape: &str) -> BTreeMap<String, f64> {
    scrape
        .lines()
        .filter(|l| l.starts_with("reliable_mq_outbox_"))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn value(series: &BTreeMap<String, f64>, name: &str) -> f64 {
    series.get(name).copied().unwrap_or(0.0)
}

/// The `database` label of the series of a relay on `db`'s schema: `host:port/database/
/// schema`.
fn database_label(db: &TestSchema) -> String {
    let options: sqlx::postgres::PgConnectOptions =
        pg_support::database_url().parse().expect("DATABASE_URL");
    let database = options
        .get_database()
        .unwrap_or_else(|| options.get_username());
    format!(
        "database=\"{}:{}/{database}/{}\"",
        options.get_host(),
        options.get_port(),
        db.name
    )
}

async fn write(pool: &sqlx::PgPool, queue: &str, value: serde_json::Value, key: Option<&str>) {
    let mut tx = pool.begin().await.expect("begin");
    Outbox::publish_with(
        &mut tx,
        "",
        queue,
        &value,
        OutboxMessage {
            message_id: None,
            aggregate_key: key.map(str::to_owned),
        },
    )
    .await
    .expect("write");
    tx.commit().await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rows_are_counted_and_reported_by_health_without_making_the_app_unready() {
    init_tracing();
    let _serial = serial().await;
    let queue = unique("rmq-test-outbox-health");
    let nowhere = unique("rmq-test-outbox-health-nowhere");
    let _cleanup = Cleanup::consumer(&queue, &[], &[]);
    let db = TestSchema::new("outbox_health").await;
    // The app consumes what the relay publishes (an app needs a consumer).
    let handler = handler_fn(|_: serde_json::Value| async { Ok::<_, HandlerError>(()) });
    let mut app = App::new(test_config(&queue))
        .consumer(ConsumerConfig::new(&queue, format!("{queue}.dlx"), handler))
        .with_postgres(db.pool.clone())
        .start()
        .await
        .expect("start");
    let addr = app.serve_http("127.0.0.1:0").await.expect("listen");
    let (_, scrape) = http_get(addr, "/metrics").await;
    let before = outbox_series(&scrape);

    app.spawn_outbox_relay(
        OutboxRelay::new(db.pool.clone(), app.publisher().clone())
            .poll_every(Duration::from_millis(50))
            .count_every(Duration::from_millis(50)),
    );
    write(&db.pool, &queue, serde_json::json!("fine"), None).await;
    write(&db.pool, &nowhere, serde_json::json!("lost 1"), None).await;
    write(&db.pool, &nowhere, serde_json::json!("lost 2"), None).await;

    let reported = eventually(Duration::from_secs(10), || {
        let app = &app;
        async move {
            app.health().await.outbox.is_some_and(|o| {
                o.backlog
                    .is_some_and(|b| b.failed == 2 && b.pending == 0 && b.oldest_pending.is_none())
            })
        }
    })
    .await;
    let health = app.health().await;
    assert!(reported, "{health:?}");
    let outbox = health.outbox.clone().expect("a relay");
    assert_eq!((outbox.relays, outbox.relays_running), (1, 1), "{outbox:?}");
    assert_eq!(outbox.error, None);
    assert!(
        health.is_ready(),
        "failed rows are reported, not unready: {health:?}"
    );

    let (status, body) = http_get(addr, "/health/ready").await;
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(doc["outbox"]["failed"], 2, "{doc}");
    assert_eq!(doc["outbox"]["pending"], 0, "{doc}");
    assert_eq!(doc["outbox"]["relays_running"], 1, "{doc}");

    let (_, scrape) = http_get(addr, "/metrics").await;
    let after = outbox_series(&scrape);
    let delta = |name: &str| value(&after, name) - value(&before, name);
    let label = database_label(&db);
    assert_eq!(
        delta(&format!(
            "reliable_mq_outbox_failed_total{{{label},kind=\"unroutable\"}}"
        )),
        2.0,
        "{scrape}"
    );
    assert_eq!(
        delta(&format!("reliable_mq_outbox_published_total{{{label}}}")),
        1.0,
        "{scrape}"
    );
    assert_eq!(
        value(
            &after,
            &format!("reliable_mq_outbox_failed_rows{{{label}}}")
        ),
        2.0,
        "{scrape}"
    );
    assert_eq!(
        value(&after, &format!("reliable_mq_outbox_pending{{{label}}}")),
        0.0,
        "{scrape}"
    );
    assert_eq!(
        value(&after, "reliable_mq_outbox_relays_running"),
        1.0,
        "{scrape}"
    );
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("reliable_mq_outbox_batch_duration_seconds_count")),
        "{scrape}"
    );

    // The query helper names them, with the broker's reason.
    let failed = Outbox::failed(&db.pool, 10).await.expect("query");
    assert_eq!(failed.len(), 2);
    assert!(
        failed
            .iter()
            .all(|f| f.routing_key == nowhere && f.reason.contains("unroutable"))
    );
    let handled = eventually(Duration::from_secs(10), || {
        let app = &app;
        let queue = &queue;
        async move { app.stats(queue).is_some_and(|s| s.handled == 1) }
    })
    .await;
    assert!(handled, "the routable one arrived: {:?}", app.stats(&queue));

    app.shutdown().await.expect("clean shutdown");
    let (_, scrape) = {
        // The relay ended with the app: the gauge says so.
        let rendered = reliable_mq::observe::metrics::render().unwrap_or_default();
        ((), rendered)
    };
    assert_eq!(
        value(&outbox_series(&scrape), "reliable_mq_outbox_relays_running"),
        0.0,
        "{scrape}"
    );
}

/// Two relays of two outbox tables (two schemas) in one process keep their gauges and
/// counters apart, by their `database` label: one table's failed rows do not overwrite
/// the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_of_two_outbox_tables_keep_their_series_apart() {
    init_tracing();
    let _serial = serial().await;
    reliable_mq::observe::metrics::install_prometheus();
    let nowhere = unique("rmq-test-outbox-two-nowhere");
    let (one, two) = (
        TestSchema::new("outbox_two_a").await,
        TestSchema::new("outbox_two_b").await,
    );
    let publisher = Publisher::connect(&amqp_url()).await.expect("publisher");
    let shutdown = ShutdownHandle::default();
    // Unroutable rows: two in the first table, one in the second.
    for (db, rows) in [(&one, 2), (&two, 1)] {
        for n in 0..rows {
            write(&db.pool, &nowhere, serde_json::json!(n), None).await;
        }
    }
    let relays: Vec<_> = [&one, &two]
        .iter()
        .map(|db| {
            OutboxRelay::new(db.pool.clone(), publisher.clone())
                .poll_every(Duration::from_millis(50))
                .count_every(Duration::from_millis(50))
                .spawn(shutdown.clone())
        })
        .collect();
    let series = || outbox_series(&reliable_mq::observe::metrics::render().unwrap_or_default());
    let failed_rows = |db: &TestSchema| {
        value(
            &series(),
            &format!("reliable_mq_outbox_failed_rows{{{}}}", database_label(db)),
        )
    };
    let counted = eventually(Duration::from_secs(10), || async {
        failed_rows(&one) == 2.0 && failed_rows(&two) == 1.0
    })
    .await;
    let scrape = reliable_mq::observe::metrics::render().unwrap_or_default();
    assert!(counted, "each table its own gauge:\n{scrape}");
    for (db, rows) in [(&one, 2.0), (&two, 1.0)] {
        assert_eq!(
            value(
                &series(),
                &format!(
                    "reliable_mq_outbox_failed_total{{{},kind=\"unroutable\"}}",
                    database_label(db)
                )
            ),
            rows,
            "{scrape}"
        );
    }
    assert_ne!(database_label(&one), database_label(&two));

    shutdown.trigger();
    for relay in relays {
        relay.await.expect("relay task");
    }
    publisher.close().await;
}

/// Rows of aggregates `a` and `b`, in order, and one without a key.
async fn write_aggregates(pool: &sqlx::PgPool, queue: &str) {
    for (n, key) in [(1, "a"), (2, "a"), (3, "a")] {
        write(
            pool,
            queue,
            serde_json::json!(format!("{key}{n}")),
            Some(key),
        )
        .await;
    }
    write(pool, queue, serde_json::json!("b1"), Some("b")).await;
    write(pool, queue, serde_json::json!("none"), None).await;
}

/// The bodies in `queue` now, in queue order, acked.
async fn drain_bodies(broker: &Broker, queue: &str) -> Vec<String> {
    let channel = broker.fresh_channel().await;
    let mut bodies = Vec::new();
    while let Ok(Some(got)) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
    {
        bodies.push(serde_json::from_slice(&got.delivery.data).expect("a JSON string"));
        let _ = got.delivery.acker.ack(BasicAckOptions::default()).await;
    }
    bodies
}

/// Lock the oldest row of aggregate `a`, as another relay's batch in flight would.
async fn hold_first_of_a(pool: &sqlx::PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query(
        "SELECT id FROM reliable_mq_outbox WHERE aggregate_key = 'a' ORDER BY id LIMIT 1 FOR UPDATE",
    )
    .fetch_one(&mut *holder)
    .await
    .expect("lock a1");
    holder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_relay_publishes_one_aggregate_in_order_and_waits_for_a_row_in_flight() {
    init_tracing();
    let _serial = serial().await;
    let queue = unique("rmq-test-outbox-ordered");
    let _cleanup = Cleanup::consumer(&queue, &[], &[]);
    let broker = Broker::connect().await;
    declare_queue(&broker, &queue).await;
    let publisher = Publisher::connect(&amqp_url()).await.expect("publisher");

    // Unordered, the later rows of `a` overtake the one held elsewhere.
    let db = TestSchema::new("outbox_unordered").await;
    write_aggregates(&db.pool, &queue).await;
    let holder = hold_first_of_a(&db.pool).await;
    let relay = OutboxRelay::new(db.pool.clone(), publisher.clone());
    assert_eq!(relay.relay_batch().await.expect("batch").sent, 4);
    holder.rollback().await.expect("release");
    assert_eq!(relay.relay_batch().await.expect("batch").sent, 1);
    assert_eq!(drain_bodies(&broker, &queue).await.len(), 5);

    // Ordered: while a1 is held, a2 and a3 wait; then one row of `a` per batch, in order.
    let db = TestSchema::new("outbox_ordered").await;
    write_aggregates(&db.pool, &queue).await;
    let relay = OutboxRelay::new(db.pool.clone(), publisher.clone()).ordered_per_aggregate(true);
    let holder = hold_first_of_a(&db.pool).await;
    let batch = relay.relay_batch().await.expect("batch");
    assert_eq!(
        (batch.taken, batch.sent),
        (2, 2),
        "b1 and the keyless row: {batch:?}"
    );
    assert_eq!(
        relay.relay_batch().await.expect("batch").taken,
        0,
        "a2, a3 wait for a1"
    );
    holder.rollback().await.expect("release");
    for _ in 0..3 {
        assert_eq!(
            relay.relay_batch().await.expect("batch").sent,
            1,
            "one of `a` at a time"
        );
    }
    assert_eq!(relay.relay_batch().await.expect("batch").taken, 0);
    assert_eq!(
        drain_bodies(&broker, &queue).await,
        ["b1", "none", "a1", "a2", "a3"]
    );

    // A failed row does not hold its aggregate back.
    let db = TestSchema::new("outbox_ordered_failed").await;
    let nowhere = unique("rmq-test-outbox-ordered-nowhere");
    write(&db.pool, &nowhere, serde_json::json!("c1"), Some("c")).await;
    write(&db.pool, &queue, serde_json::json!("c2"), Some("c")).await;
    let relay = OutboxRelay::new(db.pool.clone(), publisher.clone()).ordered_per_aggregate(true);
    assert_eq!(relay.relay_batch().await.expect("batch").failed, 1);
    assert_eq!(relay.relay_batch().await.expect("batch").sent, 1);
    assert_eq!(drain_bodies(&broker, &queue).await, ["c2"]);
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ordered_relays_publish_every_aggregate_in_order() {
    init_tracing();
    let _serial = serial().await;
    let queue = unique("rmq-test-outbox-ordered-two");
    let _cleanup = Cleanup::consumer(&queue, &[], &[]);
    let broker = Broker::connect().await;
    declare_queue(&broker, &queue).await;
    let db = TestSchema::new("outbox_ordered_two").await;
    let (aggregates, per_aggregate) = (3usize, 100usize);
    // Written interleaved, 100 transactions of one row per aggregate; small batches, so
    // the two relays' batches hold rows of the same aggregates at once.
    for n in 0..per_aggregate {
        let mut tx = db.pool.begin().await.expect("begin");
        for a in 0..aggregates {
            Outbox::publish_with(
                &mut tx,
                "",
                &queue,
                &serde_json::json!(format!("{a}:{n}")),
                OutboxMessage {
                    message_id: None,
                    aggregate_key: Some(format!("agg-{a}")),
                },
            )
            .await
            .expect("write");
        }
        tx.commit().await.expect("commit");
    }
    let publisher = Publisher::connect(&amqp_url()).await.expect("publisher");
    let shutdown = ShutdownHandle::default();
    let relays: Vec<_> = (0..2)
        .map(|_| {
            OutboxRelay::new(db.pool.clone(), publisher.clone())
                .ordered_per_aggregate(true)
                .batch_size(4)
                .poll_every(Duration::from_millis(20))
                .spawn(shutdown.clone())
        })
        .collect();
    let total = (aggregates * per_aggregate) as i64;
    let all_sent = eventually(Duration::from_secs(60), || {
        let pool = &db.pool;
        async move {
            Outbox::stats(pool)
                .await
                .is_ok_and(|s| s.sent == total && s.pending == 0)
        }
    })
    .await;
    shutdown.trigger();
    for relay in relays {
        let _ = relay.await;
    }
    assert!(all_sent, "{:?}", Outbox::stats(&db.pool).await);
    let bodies = drain_bodies(&broker, &queue).await;
    assert_eq!(bodies.len(), aggregates * per_aggregate);
    let mut next = vec![0usize; aggregates];
    for body in &bodies {
        let (a, n) = body.split_once(':').expect("a:n");
        let (a, n): (usize, usize) = (a.parse().expect("a"), n.parse().expect("n"));
        assert_eq!(n, next[a], "aggregate {a} out of order in {bodies:?}");
        next[a] += 1;
    }
    publisher.close().await;
}
