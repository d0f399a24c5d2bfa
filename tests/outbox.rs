//! The transactional outbox on the real broker and PostgreSQL: a message exists if and
//! only if its transaction committed, the relay publishes it with the row's `message_id`
//! and marks it sent after the confirm, wakes on the commit's notification, marks an
//! unroutable message failed with the reason, and two relays never publish a row twice.

#[path = "pg_support.rs"]
mod pg_support;

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use pg_support::TestSchema;
use reliable_mq::postgres::{Outbox, OutboxMessage, OutboxRelay, OutboxStats};
use reliable_mq::{Publisher, ShutdownHandle};
use reliable_mq_tests::{Broker, Cleanup, amqp_url, eventually, init_tracing, unique};

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
