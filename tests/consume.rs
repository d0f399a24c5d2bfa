//! The core consume path on the real broker: declaration, ack after success, decode
//! failures and handler errors to the DLQ with headers, panics, start-up checks, graceful
//! shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use reliable_mq::{
    App, ConsumerConfig, Error, ExchangeKind, HandlerError, RetryBackoff, handler_fn,
};
use reliable_mq_tests::{Broker, Cleanup, eventually, init_tracing, test_config, unique};
use serde::Deserialize;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize)]
struct Order {
    id: u64,
    qty: u32,
}

fn counting_ok(counter: &Arc<AtomicUsize>) -> impl reliable_mq::Handler {
    let counter = Arc::clone(counter);
    handler_fn(move |_o: Order| {
        let counter = Arc::clone(&counter);
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, HandlerError>(())
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declares_every_derived_object_and_binds_the_exchange() {
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique("decl");
    let (dlx, ex) = (format!("{q}.dlx"), format!("{q}.shop"));
    let _cleanup = Cleanup::consumer(&q, &["1s", "2s"], &[&ex]);
    let handled = Arc::new(AtomicUsize::new(0));
    let consumer = ConsumerConfig::new(&q, &dlx, counting_ok(&handled))
        .with_exchange(&ex, ExchangeKind::Topic, "order.*")
        .with_retries(
            2,
            Duration::from_secs(1),
            RetryBackoff::Exponential { factor: 2 },
        )
        .idempotent(Duration::from_secs(60));
    let app = App::new(test_config(&q))
        .consumer(consumer)
        .start()
        .await
        .expect("start");

    assert!(broker.queue_exists(&q).await, "work queue");
    assert!(broker.queue_exists(&format!("{q}.dlq")).await, "dlq");
    assert!(
        broker.queue_exists(&format!("{q}.retry.1s")).await,
        "retry tier 1s"
    );
    assert!(
        broker.queue_exists(&format!("{q}.retry.2s")).await,
        "retry tier 2s"
    );
    assert!(
        !broker.queue_exists(&format!("{q}.retry.4s")).await,
        "no tier past max_retries"
    );
    assert!(broker.exchange_exists(&dlx).await, "dlx");
    assert!(broker.exchange_exists(&ex).await, "exchange");

    // The binding works: a message published to the exchange with a matching key arrives.
    broker
        .publish_json(
            &ex,
            "order.created",
            &serde_json::json!({"id": 1, "qty": 1}),
            "m-1",
        )
        .await;
    assert!(eventually(WAIT, || async { handled.load(Ordering::SeqCst) == 1 }).await);

    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_after_success_and_leaves_nothing_behind() {
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique("ack");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["1s", "2s", "4s"], &[]);
    let handled = Arc::new(AtomicUsize::new(0));
    let app = App::new(test_config(&q))
        .consumer(ConsumerConfig::new(&q, &dlx, counting_ok(&handled)).with_concurrency(4))
        .start()
        .await
        .expect("start");
    for i in 0..20 {
        broker
            .publish_json(
                "",
                &q,
                &serde_json::json!({"id": i, "qty": 1}),
                &format!("m-{i}"),
            )
            .await;
    }
    // The runtime counts a message as handled just after the handler returns.
    assert!(
        eventually(WAIT, || async {
            handled.load(Ordering::SeqCst) == 20 && app.stats(&q).is_some_and(|s| s.handled == 20)
        })
        .await
    );
    let stats = app.stats(&q).expect("stats");
    assert_eq!(stats.handled, 20);
    assert_eq!(stats.dead_lettered, 0);
    app.shutdown().await.expect("clean shutdown");
    // Acked: nothing comes back after the consumer is gone.
    assert_eq!(broker.ready_count(&q).await, Some(0));
    assert_eq!(broker.ready_count(&format!("{q}.dlq")).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_bodies_go_to_the_dlq_with_the_reason() {
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique("decode");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["1s", "2s", "4s"], &[]);
    let dlq = format!("{q}.dlq");
    let handled = Arc::new(AtomicUsize::new(0));
    let app = App::new(test_config(&q))
        .consumer(ConsumerConfig::new(&q, &dlx, counting_ok(&handled)))
        .start()
        .await
        .expect("start");

    // Malformed JSON, the wrong shape, and a non-JSON content type.
    let json = BasicProperties::default().with_content_type("application/json".into());
    broker
        .publish_raw(
            "",
            &q,
            b"{not json",
            json.clone().with_message_id("bad-1".into()),
        )
        .await;
    broker
        .publish_raw(
            "",
            &q,
            br#"{"id":"seven"}"#,
            json.with_message_id("bad-2".into()),
        )
        .await;
    let text = BasicProperties::default().with_content_type("text/plain".into());
    broker
        .publish_raw(
            "",
            &q,
            br#"{"id":1,"qty":1}"#,
            text.with_message_id("bad-3".into()),
        )
        .await;

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(broker.get_within(&dlq, WAIT).await.expect("dead letter"));
    }
    got.sort_by_key(|m| m.message_id());
    for m in &got {
        assert_eq!(
            m.header("x-error-kind").as_deref(),
            Some("decode"),
            "{:?}",
            m.headers()
        );
        assert_eq!(m.header("x-original-queue").as_deref(), Some(q.as_str()));
        assert_eq!(m.header("x-original-exchange").as_deref(), Some(""));
        assert_eq!(
            m.header("x-original-routing-key").as_deref(),
            Some(q.as_str())
        );
        assert_eq!(m.header_int("x-attempts"), Some(1));
        assert!(m.header_int("x-first-failure").is_some());
        assert!(m.header_int("x-last-failure").is_some());
    }
    assert_eq!(got[0].body, b"{not json", "body kept as it was");
    assert!(
        got[0]
            .header("x-exception-message")
            .unwrap_or_default()
            .contains("key must be a string")
    );
    assert!(
        got[1]
            .header("x-exception-message")
            .unwrap_or_default()
            .contains("invalid type")
    );
    assert!(
        got[2]
            .header("x-exception-message")
            .unwrap_or_default()
            .contains("text/plain")
    );
    assert_eq!(
        handled.load(Ordering::SeqCst),
        0,
        "handler never saw bad input"
    );

    app.shutdown().await.expect("clean shutdown");
    assert_eq!(
        broker.ready_count(&q).await,
        Some(0),
        "no requeue loop: originals acked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_and_panicking_handlers_dead_letter_and_the_consumer_keeps_going() {
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique("reject");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &[], &[]);
    let dlq = format!("{q}.dlq");
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let handler = handler_fn(move |o: Order| {
        let c = Arc::clone(&c);
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            match o.qty {
                0 => Err(HandlerError::reject(format!("order {} has no items", o.id))),
                13 => panic!("unlucky order {}", o.id),
                _ => Ok(()),
            }
        }
    });
    // No retries: failures go straight to the DLQ, with their own kind.
    let consumer = ConsumerConfig::new(&q, &dlx, handler).with_retries(
        0,
        Duration::from_secs(1),
        RetryBackoff::Fixed,
    );
    let app = App::new(test_config(&q))
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    broker
        .publish_json("", &q, &serde_json::json!({"id": 1, "qty": 0}), "r-1")
        .await;
    let m = broker
        .get_within(&dlq, WAIT)
        .await
        .expect("rejected message dead-lettered");
    assert_eq!(m.header("x-error-kind").as_deref(), Some("rejected"));
    assert_eq!(
        m.header("x-exception-message").as_deref(),
        Some("order 1 has no items")
    );

    broker
        .publish_json("", &q, &serde_json::json!({"id": 2, "qty": 13}), "p-1")
        .await;
    let m = broker
        .get_within(&dlq, WAIT)
        .await
        .expect("panicking message dead-lettered");
    assert_eq!(m.header("x-error-kind").as_deref(), Some("panic"));
    assert!(
        m.header("x-exception-message")
            .unwrap_or_default()
            .contains("unlucky order 2")
    );

    // Still consuming after the panic.
    broker
        .publish_json("", &q, &serde_json::json!({"id": 3, "qty": 1}), "ok-1")
        .await;
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 1)
        })
        .await
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "each handler ran exactly once"
    );
    let stats = app.stats(&q).expect("stats");
    assert_eq!(stats.dead_lettered, 2);
    assert_eq!(stats.sessions, 1, "the panic did not cost a reconnect");
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_queue_with_other_arguments_stops_start_up_and_is_not_deleted() {
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique("mismatch");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &[], &[]);
    // Someone declared the queue before us with another dead-letter exchange and left a
    // message in it.
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("somewhere-else".into()),
    );
    broker
        .fresh_channel()
        .await
        .queue_declare(q.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .expect("pre-declare");
    broker
        .publish_json("", &q, &serde_json::json!({"id": 1, "qty": 1}), "keep-me")
        .await;

    let handled = Arc::new(AtomicUsize::new(0));
    let err = App::new(test_config(&q))
        .consumer(ConsumerConfig::new(&q, &dlx, counting_ok(&handled)))
        .start()
        .await
        .expect_err("start-up must fail");
    let text = err.to_string();
    assert!(matches!(err, Error::TopologyMismatch { .. }), "{text}");
    assert!(
        text.contains(&format!("queue '{q}'")),
        "names the object: {text}"
    );
    assert!(
        text.contains("x-dead-letter-exchange"),
        "names the argument: {text}"
    );
    assert!(
        text.contains("never deletes"),
        "says nothing was deleted: {text}"
    );
    assert_eq!(
        broker.ready_count(&q).await,
        Some(1),
        "queue and its message untouched"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_handlers_and_loses_nothing() {
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique("shutdown");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["1s", "2s", "4s"], &[]);
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let (s, f) = (Arc::clone(&started), Arc::clone(&finished));
    let handler = handler_fn(move |_o: Order| {
        let (s, f) = (Arc::clone(&s), Arc::clone(&f));
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(800)).await;
            f.fetch_add(1, Ordering::SeqCst);
            Ok::<_, HandlerError>(())
        }
    });
    let consumer = ConsumerConfig::new(&q, &dlx, handler)
        .with_prefetch(10)
        .with_concurrency(4);
    let app = App::new(test_config(&q))
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    for i in 0..30 {
        broker
            .publish_json(
                "",
                &q,
                &serde_json::json!({"id": i, "qty": 1}),
                &format!("g-{i}"),
            )
            .await;
    }
    assert!(eventually(WAIT, || async { started.load(Ordering::SeqCst) >= 4 }).await);
    app.shutdown().await.expect("clean shutdown");

    let (started, finished) = (
        started.load(Ordering::SeqCst),
        finished.load(Ordering::SeqCst),
    );
    assert_eq!(
        started, finished,
        "every started handler was allowed to finish"
    );
    assert!(finished < 30, "shutdown stopped taking new messages");
    // Everything not handled is back in the queue: handled + waiting = published.
    let waiting = broker.ready_count(&q).await.expect("queue") as usize;
    assert_eq!(
        finished + waiting,
        30,
        "handled {finished}, waiting {waiting}"
    );
}

#[tokio::test]
async fn conflicting_consumers_fail_before_touching_the_broker() {
    let q = unique("conflict");
    let a = ConsumerConfig::new(&q, "x.dlx", counting_ok(&Arc::new(AtomicUsize::new(0))));
    let b = a.clone().quorum(None);
    // An unreachable broker proves the check runs first.
    let config = test_config(&q).with_amqp_url("amqp://guest:guest@127.0.0.1:1/%2f");
    let err = App::new(config)
        .consumer(a)
        .consumer(b)
        .start()
        .await
        .expect_err("conflict");
    assert!(matches!(err, Error::ConflictingConsumers { .. }), "{err}");
    assert!(err.to_string().contains(&q), "{err}");
}

#[tokio::test]
async fn an_unreachable_broker_is_a_clear_error_without_the_password() {
    let q = unique("refused");
    let config = test_config(&q).with_amqp_url("amqp://guest:hunter2@127.0.0.1:1/%2f");
    let err = App::new(config)
        .consumer(ConsumerConfig::new(
            &q,
            "x.dlx",
            counting_ok(&Arc::new(AtomicUsize::new(0))),
        ))
        .start()
        .await
        .expect_err("no broker on port 1");
    let text = err.to_string();
    assert!(matches!(err, Error::Connect { .. }), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("hunter2"), "password leaked: {text}");
}
