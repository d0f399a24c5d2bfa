//! Recovery without the user doing anything: the broker closes our connection, deletes the
//! queue under us, or a handler is in flight when its channel dies.
//!
//! Connections are closed by name (`rabbitmqctl close_connection`), so these tests leave
//! other tests' connections alone and can run beside them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use reliable_mq::{App, ConsumerConfig, HandlerError, handler_fn};
use reliable_mq_tests::{
    Broker, Cleanup, close_connections_named, eventually, init_tracing, test_config, unique,
};

const WAIT: Duration = Duration::from_secs(20);

fn counter_handler(calls: &Arc<AtomicUsize>, delay: Duration) -> impl reliable_mq::Handler {
    let calls = Arc::clone(calls);
    handler_fn(move |_n: u64| {
        let calls = Arc::clone(&calls);
        async move {
            tokio::time::sleep(delay).await;
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, HandlerError>(())
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_resumes_after_the_broker_closes_its_connection() {
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique("recover");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["1s", "2s", "4s"], &[]);
    let calls = Arc::new(AtomicUsize::new(0));
    let config = test_config(&q).with_connection_name(format!("test-{q}"));
    let app = App::new(config)
        .consumer(ConsumerConfig::new(
            &q,
            &dlx,
            counter_handler(&calls, Duration::ZERO),
        ))
        .start()
        .await
        .expect("start");
    assert!(app.health().await.is_ready());

    broker
        .publish_json("", &q, &serde_json::json!(1), "before")
        .await;
    assert!(eventually(WAIT, || async { calls.load(Ordering::SeqCst) == 1 }).await);

    let closed = close_connections_named(&format!("test-{q} (consumer"));
    assert_eq!(closed, 1, "the consumer's connection was found and closed");
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.sessions == 2 && s.attached)
        })
        .await,
        "consumer reconnected: {:?}",
        app.stats(&q)
    );
    assert!(eventually(WAIT, || async { app.health().await.is_ready() }).await);

    broker
        .publish_json("", &q, &serde_json::json!(2), "after")
        .await;
    assert!(eventually(WAIT, || async { calls.load(Ordering::SeqCst) == 2 }).await);
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(broker.ready_count(&q).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_work_is_redelivered_not_acked_on_a_new_channel_and_dedup_absorbs_it() {
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique("inflight");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["1s", "2s", "4s"], &[]);
    let calls = Arc::new(AtomicUsize::new(0));
    // Handlers hold until the test has seen the connection closed (rabbitmqctl is slow to
    // start, so a fixed sleep could let them finish and ack before the close).
    let release = Arc::new(tokio::sync::Notify::new());
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (c, r, rd) = (
        Arc::clone(&calls),
        Arc::clone(&release),
        Arc::clone(&released),
    );
    let handler = handler_fn(move |_n: u64| {
        let (c, r, rd) = (Arc::clone(&c), Arc::clone(&r), Arc::clone(&rd));
        async move {
            while !rd.load(Ordering::SeqCst) {
                let _ = tokio::time::timeout(Duration::from_millis(50), r.notified()).await;
            }
            c.fetch_add(1, Ordering::SeqCst);
            Ok::<_, HandlerError>(())
        }
    });
    let config = test_config(&q).with_connection_name(format!("test-{q}"));
    let consumer = ConsumerConfig::new(&q, &dlx, handler)
        .with_concurrency(4)
        .idempotent(Duration::from_secs(300));
    let app = App::new(config)
        .with_dedup_store(reliable_mq::dedup::MemoryStore::new())
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    for i in 0..4u64 {
        broker
            .publish_json("", &q, &serde_json::json!(i), &format!("m-{i}"))
            .await;
    }
    // All four handlers are running when the connection dies under them.
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.received == 4)
        })
        .await
    );
    assert_eq!(close_connections_named(&format!("test-{q} (consumer")), 1);
    released.store(true, Ordering::SeqCst);
    release.notify_waiters();

    // Handlers finish (side effects done, `done` written), their acks fail on the dead
    // channel, the broker redelivers all four, and dedup acks them without a second call.
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.duplicates == 4)
        })
        .await,
        "redeliveries absorbed: {:?}",
        app.stats(&q)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4, "each side effect ran once");
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(
        broker.ready_count(&q).await,
        Some(0),
        "nothing left unacked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_deleted_under_the_consumer_is_redeclared_and_consumption_resumes() {
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique("cancelled");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["1s", "2s", "4s"], &[]);
    let calls = Arc::new(AtomicUsize::new(0));
    let app = App::new(test_config(&q))
        .consumer(ConsumerConfig::new(
            &q,
            &dlx,
            counter_handler(&calls, Duration::ZERO),
        ))
        .start()
        .await
        .expect("start");
    // The broker sends basic.cancel when the queue goes away.
    broker
        .fresh_channel()
        .await
        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete queue");
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.sessions >= 2 && s.attached)
        })
        .await,
        "resubscribed: {:?}",
        app.stats(&q)
    );
    assert!(broker.queue_exists(&q).await, "queue declared again");
    broker
        .publish_json("", &q, &serde_json::json!(7), "after-cancel")
        .await;
    assert!(eventually(WAIT, || async { calls.load(Ordering::SeqCst) == 1 }).await);
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_broker_addresses_fail_over_to_one_that_answers() {
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique("failover");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["1s", "2s", "4s"], &[]);
    let calls = Arc::new(AtomicUsize::new(0));
    // The first "node" refuses connections; the second is the real broker.
    let urls = format!(
        "amqp://guest:guest@127.0.0.1:1/%2f,{}",
        reliable_mq_tests::amqp_url()
    );
    let app = App::new(test_config(&q).with_amqp_url(urls))
        .consumer(ConsumerConfig::new(
            &q,
            &dlx,
            counter_handler(&calls, Duration::ZERO),
        ))
        .start()
        .await
        .expect("start through the second address");
    broker
        .publish_json("", &q, &serde_json::json!(1), "one")
        .await;
    assert!(eventually(WAIT, || async { calls.load(Ordering::SeqCst) == 1 }).await);
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_exchange_deleted_under_the_consumer_is_redeclared_and_nothing_is_lost() {
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique("dlx-gone");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["1s", "2s", "4s"], &[]);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let handler = handler_fn(move |n: u64| {
        let c = Arc::clone(&c);
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(HandlerError::reject(format!("order {n} is invalid")))
        }
    });
    let app = App::new(test_config(&q))
        .consumer(ConsumerConfig::new(&q, &dlx, handler))
        .start()
        .await
        .expect("start");
    // Someone deletes the DLX (and with it the DLQ's binding) while the consumer runs.
    broker.delete(&[], &[&dlx]).await;
    broker
        .publish_json("", &q, &serde_json::json!(5), "doomed")
        .await;

    // The dead-letter copy is refused; the original is held (unacked), the DLX declared
    // again on the same session, and the held copy goes through.
    let dead = broker
        .get_within(&format!("{q}.dlq"), WAIT)
        .await
        .expect("dead-lettered after the topology came back");
    assert_eq!(dead.message_id().as_deref(), Some("doomed"));
    assert_eq!(dead.header("x-error-kind").as_deref(), Some("rejected"));
    let stats = app.stats(&q).expect("stats");
    assert_eq!(
        stats.sessions, 1,
        "redeclared without a reconnect: {stats:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the handler did not run again"
    );
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(
        broker.ready_count(&q).await,
        Some(0),
        "original acked in the end"
    );
    assert_eq!(
        broker.ready_count(&format!("{q}.dlq")).await,
        Some(0),
        "exactly one dead letter"
    );
}
