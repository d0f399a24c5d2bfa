//! The confirmed publisher on the real broker: what a confirmed message looks like,
//! unroutable and oversized messages, nacks republished under the same id, caller ids and
//! headers, many concurrent publishers, per-message batch outcomes, a connection killed
//! mid-stream, and publishing from inside a handler.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use reliable_mq::{
    App, ConsumerConfig, Delivery, HandlerError, PublishError, PublishOptions, Publisher,
    delivery_handler_fn,
};
use reliable_mq_tests::{Broker, Got, close_connections_named, eventually, test_config, unique};
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Event {
    n: u32,
    text: String,
}

fn event(n: u32) -> Event {
    Event {
        n,
        text: "x".repeat(32),
    }
}

// --- log capture: the publisher's debug events say when it republishes --------------

fn log_lines() -> &'static Mutex<Vec<String>> {
    static LINES: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    LINES.get_or_init(|| Mutex::new(Vec::new()))
}

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf).into_owned();
        if std::env::var_os("RUST_LOG").is_some() {
            eprint!("{text}");
        }
        log_lines().lock().expect("log lock").push(text);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Capture the publisher's debug logs (once per test process).
fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let filter = std::env::var("RUST_LOG").unwrap_or_default();
        let filter = if filter.is_empty() {
            "warn,reliable_mq::publisher=debug".to_owned()
        } else {
            format!("{filter},reliable_mq::publisher=debug")
        };
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init();
    });
}

/// Log lines announcing a republish that mention `needle` (a message id or queue name).
fn republishes_mentioning(needle: &str) -> usize {
    log_lines()
        .lock()
        .expect("log lock")
        .iter()
        .filter(|l| l.contains("republishing with the same message_id") && l.contains(needle))
        .count()
}

// --- helpers ---------------------------------------------------------------------------

async fn declare_queue(broker: &Broker, name: &str, args: FieldTable) {
    broker
        .channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("declare queue");
}

async fn declare_exchange(broker: &Broker, name: &str) {
    broker
        .channel
        .exchange_declare(
            name.into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare exchange");
}

/// A queue that holds one message and nacks publishes beyond it.
fn one_slot() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args
}

/// Take every message from `queue` (expects `at_least` of them).
async fn drain(broker: &Broker, queue: &str, at_least: usize) -> Vec<Got> {
    let mut got = Vec::new();
    while got.len() < at_least {
        match broker.get_within(queue, WAIT).await {
            Some(m) => got.push(m),
            None => break,
        }
    }
    while let Some(m) = broker.get(queue).await {
        got.push(m);
    }
    got
}

fn is_uuid_v7(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok_and(|u| u.get_version_num() == 7)
}

async fn publisher(config: reliable_mq::Config) -> Publisher {
    Publisher::from_config(&config)
        .await
        .expect("publisher connects")
}

// --- tests -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_message_is_persistent_json_with_a_uuid7_id_and_a_timestamp() {
    capture_logs();
    let broker = Broker::connect().await;
    let q = unique("pub-ack");
    declare_queue(&broker, &q, FieldTable::default()).await;
    let publisher = publisher(test_config(&q)).await;

    let id = publisher
        .publish("", &q, &event(1))
        .await
        .expect("confirmed");

    assert!(is_uuid_v7(&id), "message id {id} is a UUIDv7");
    let got = broker.get_within(&q, WAIT).await.expect("message arrived");
    assert_eq!(got.message_id().as_deref(), Some(id.as_str()));
    assert_eq!(*got.properties.delivery_mode(), Some(2), "persistent");
    assert_eq!(
        got.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert!(
        got.properties
            .timestamp()
            .is_some_and(|t| t > 1_600_000_000)
    );
    let body: Event = serde_json::from_slice(&got.body).expect("json body");
    assert_eq!(body, event(1));

    publisher.close().await;
    broker.delete(&[&q], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_message_is_an_error_and_is_not_retried() {
    capture_logs();
    let broker = Broker::connect().await;
    let ex = unique("pub-noroute");
    declare_exchange(&broker, &ex).await;
    let publisher = publisher(test_config(&ex)).await;

    let err = publisher
        .publish(&ex, "nobody.listens", &event(1))
        .await
        .expect_err("no queue is bound");

    let PublishError::Unroutable {
        message_id,
        exchange,
        routing_key,
        reply,
    } = &err
    else {
        panic!("expected Unroutable, got {err:?}");
    };
    assert_eq!(exchange, &ex);
    assert_eq!(routing_key, "nobody.listens");
    assert!(reply.contains("NO_ROUTE"), "{reply}");
    assert!(is_uuid_v7(message_id));
    assert!(!err.outcome_unknown());
    assert_eq!(republishes_mentioning(message_id), 0, "unroutable is final");

    // The default exchange with no such queue is unroutable too; the channel survives.
    let missing = unique("pub-no-such-queue");
    let err = publisher
        .publish("", &missing, &event(2))
        .await
        .expect_err("no queue");
    assert!(matches!(err, PublishError::Unroutable { .. }), "{err:?}");
    let q = unique("pub-after-noroute");
    declare_queue(&broker, &q, FieldTable::default()).await;
    publisher
        .publish("", &q, &event(3))
        .await
        .expect("still publishes");

    publisher.close().await;
    broker.delete(&[&q], &[&ex]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_exchange_is_refused_and_the_publisher_recovers() {
    capture_logs();
    let broker = Broker::connect().await;
    let q = unique("pub-refused");
    declare_queue(&broker, &q, FieldTable::default()).await;
    let publisher = publisher(test_config(&q)).await;
    let missing = unique("pub-no-such-exchange");

    let err = publisher
        .publish(&missing, "k", &event(1))
        .await
        .expect_err("no exchange");
    let PublishError::Refused {
        exchange, reason, ..
    } = &err
    else {
        panic!("expected Refused, got {err:?}");
    };
    assert_eq!(exchange, &missing);
    assert!(reason.contains("NOT_FOUND"), "{reason}");

    let id = publisher
        .publish("", &q, &event(2))
        .await
        .expect("reconnected");
    let got = broker.get_within(&q, WAIT).await.expect("arrived");
    assert_eq!(got.message_id().as_deref(), Some(id.as_str()));

    publisher.close().await;
    broker.delete(&[&q], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_refused_before_sending_and_the_publisher_keeps_working() {
    capture_logs();
    let broker = Broker::connect().await;
    let q = unique("pub-large");
    declare_queue(&broker, &q, FieldTable::default()).await;
    let publisher = publisher(test_config(&q).with_max_body_size(1024)).await;

    let big = Event {
        n: 1,
        text: "y".repeat(4096),
    };
    let err = publisher
        .publish("", &q, &big)
        .await
        .expect_err("too large");
    let PublishError::TooLarge { size, max } = err else {
        panic!("expected TooLarge, got {err:?}");
    };
    assert!(size > 4096);
    assert_eq!(max, 1024);
    assert_eq!(broker.ready_count(&q).await, Some(0), "nothing was sent");

    let id = publisher
        .publish("", &q, &event(2))
        .await
        .expect("still works");
    let got = broker
        .get_within(&q, WAIT)
        .await
        .expect("small one arrives");
    assert_eq!(got.message_id().as_deref(), Some(id.as_str()));
    assert!(publisher.is_connected().await);

    publisher.close().await;
    broker.delete(&[&q], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacks_are_republished_with_the_same_id_until_the_budget_is_spent() {
    capture_logs();
    let broker = Broker::connect().await;
    let q = unique("pub-nack");
    declare_queue(&broker, &q, one_slot()).await;
    let publisher = publisher(test_config(&q).with_publish_retries(2)).await;
    let filler = publisher
        .publish("", &q, &event(0))
        .await
        .expect("first fits");

    let err = publisher
        .publish_with(
            "",
            &q,
            &event(1),
            PublishOptions::with_message_id("nack-me"),
        )
        .await
        .expect_err("queue is full");

    let PublishError::Nacked {
        message_id,
        retries,
    } = &err
    else {
        panic!("expected Nacked, got {err:?}");
    };
    assert_eq!(message_id, "nack-me");
    assert_eq!(*retries, 2);
    assert_eq!(
        republishes_mentioning("nack-me"),
        2,
        "two republishes, same id"
    );
    let got = drain(&broker, &q, 1).await;
    let ids: Vec<_> = got.iter().filter_map(Got::message_id).collect();
    assert_eq!(ids, vec![filler], "only the filler is in the queue");

    publisher.close().await;
    broker.delete(&[&q], &[]).await;
}

/// The numbers of the channels open on the connection whose client-given name contains
/// `name` (from `rabbitmqctl`).
fn channels_of(name: &str) -> Vec<u16> {
    let run = |args: &[&str]| {
        std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let connections = run(&["-q", "list_connections", "pid", "client_properties"]);
    let Some(pid) = connections
        .lines()
        .find(|l| l.contains(name))
        .and_then(|l| l.split_whitespace().next())
    else {
        return Vec::new();
    };
    let mut numbers: Vec<u16> = run(&["-q", "list_channels", "connection", "number"])
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next()? == pid).then(|| parts.next()?.parse().ok())?
        })
        .collect();
    numbers.sort_unstable();
    numbers
}

/// A nacked publish is retried on a fresh channel of the same connection (RabbitMQ 3.10
/// can keep nacking a quorum queue on one channel for as long as its former leader's node
/// is down: tests/cluster.rs), and the nacked channels are closed, not left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_moves_the_publisher_to_a_fresh_channel_and_closes_the_old_one() {
    capture_logs();
    let broker = Broker::connect().await;
    let q = unique("pub-nack-channel");
    declare_queue(&broker, &q, one_slot()).await;
    let name = format!("conn-{q}");
    let publisher = publisher(
        test_config(&q)
            .with_publish_retries(2)
            .with_connection_name(&name),
    )
    .await;
    publisher
        .publish("", &q, &event(0))
        .await
        .expect("first fits");
    assert_eq!(channels_of(&name), vec![1], "one channel before the nack");

    let err = publisher
        .publish("", &q, &event(1))
        .await
        .expect_err("queue is full");
    assert!(matches!(err, PublishError::Nacked { .. }), "{err:?}");
    drain(&broker, &q, 1).await;
    publisher
        .publish("", &q, &event(2))
        .await
        .expect("room again");
    // The first attempt and its two retries were nacked, each on its own channel (1, 2,
    // 3); the publish after them went on a fourth. The nacked ones are closed.
    assert!(
        eventually(WAIT, || async { channels_of(&name) == vec![4] }).await,
        "only the fresh channel is open: {:?}",
        channels_of(&name)
    );

    publisher.close().await;
    broker.delete(&[&q], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_message_republished_after_room_frees_up_arrives_once_with_its_id() {
    capture_logs();
    let broker = Broker::connect().await;
    let q = unique("pub-nack-then-ok");
    declare_queue(&broker, &q, one_slot()).await;
    let publisher = publisher(test_config(&q).with_publish_retries(20)).await;
    let filler = publisher
        .publish("", &q, &event(0))
        .await
        .expect("first fits");

    let task = {
        let (publisher, q) = (publisher.clone(), q.clone());
        tokio::spawn(async move { publisher.publish("", &q, &event(1)).await })
    };
    // Make room only once the publisher has been nacked and is republishing.
    assert!(eventually(WAIT, || async { republishes_mentioning(&q) > 0 }).await);
    let first = broker.get(&q).await.expect("filler");
    assert_eq!(first.message_id().as_deref(), Some(filler.as_str()));

    let id = task
        .await
        .expect("task")
        .expect("confirmed after a republish");
    assert!(is_uuid_v7(&id));
    assert!(
        republishes_mentioning(&id) > 0,
        "the republish carried the same id"
    );
    let got = drain(&broker, &q, 1).await;
    let ids: Vec<_> = got.iter().filter_map(Got::message_id).collect();
    assert_eq!(ids, vec![id], "arrived once, with the id publish returned");

    publisher.close().await;
    broker.delete(&[&q], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_message_id_and_headers_arrive_intact() {
    capture_logs();
    let broker = Broker::connect().await;
    let q = unique("pub-opts");
    declare_queue(&broker, &q, FieldTable::default()).await;
    let publisher = publisher(test_config(&q)).await;

    let options = PublishOptions::with_message_id("order-42")
        .header("tenant", "acme")
        .header("trace-id", "abc123");
    let id = publisher
        .publish_with("", &q, &event(42), options)
        .await
        .expect("confirmed");

    assert_eq!(id, "order-42");
    let got = broker.get_within(&q, WAIT).await.expect("arrived");
    assert_eq!(got.message_id().as_deref(), Some("order-42"));
    assert_eq!(got.header("tenant").as_deref(), Some("acme"));
    assert_eq!(got.header("trace-id").as_deref(), Some("abc123"));
    assert_eq!(*got.properties.delivery_mode(), Some(2));

    publisher.close().await;
    broker.delete(&[&q], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_publishing_at_once_are_all_confirmed_and_all_arrive() {
    capture_logs();
    let broker = Broker::connect().await;
    let q = unique("pub-many");
    declare_queue(&broker, &q, FieldTable::default()).await;
    let publisher = publisher(test_config(&q)).await;
    let (tasks, each) = (50u32, 20u32);

    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (publisher, q) = (publisher.clone(), q.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..each {
                    let id = publisher
                        .publish("", &q, &event(t * each + i))
                        .await
                        .expect("confirmed");
                    ids.push(id);
                }
                ids
            })
        })
        .collect();
    let mut confirmed = BTreeSet::new();
    for h in handles {
        confirmed.extend(h.await.expect("task"));
    }

    let total = (tasks * each) as usize;
    assert_eq!(confirmed.len(), total, "distinct ids");
    let got = drain(&broker, &q, total).await;
    let arrived: BTreeSet<_> = got.iter().filter_map(Got::message_id).collect();
    assert_eq!(
        arrived, confirmed,
        "every confirmed id arrived, nothing else"
    );
    // A copy beyond one per id can only come from a republish (a confirm that timed out on
    // a loaded machine); without one there must be no duplicate at all.
    let republished = republishes_mentioning(&q);
    assert!(
        got.len() == total || (republished > 0 && got.len() <= total + republished),
        "{} messages for {total} ids with {republished} republishes",
        got.len()
    );

    publisher.close().await;
    broker.delete(&[&q], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_all_reports_an_outcome_per_message_in_order() {
    capture_logs();
    let broker = Broker::connect().await;
    let q = unique("pub-all");
    declare_queue(&broker, &q, FieldTable::default()).await;
    let publisher = publisher(test_config(&q).with_max_body_size(512)).await;
    let values = vec![
        event(0),
        event(1),
        Event {
            n: 2,
            text: "z".repeat(1000),
        },
        event(3),
    ];

    let outcomes = publisher.publish_all("", &q, &values).await;

    assert_eq!(outcomes.len(), 4);
    assert!(
        matches!(outcomes[2], Err(PublishError::TooLarge { .. })),
        "{:?}",
        outcomes[2]
    );
    let ok: Vec<&String> = [0, 1, 3]
        .iter()
        .map(|&i| outcomes[i].as_ref().expect("confirmed"))
        .collect();
    let got = drain(&broker, &q, 3).await;
    assert_eq!(got.len(), 3);
    let by_id: HashMap<String, Event> = got
        .iter()
        .map(|m| {
            let body = serde_json::from_slice(&m.body).expect("json");
            (m.message_id().expect("id"), body)
        })
        .collect();
    for (i, id) in [0u32, 1, 3].into_iter().zip(ok) {
        assert_eq!(
            by_id.get(id).map(|e| e.n),
            Some(i),
            "outcome {i} is its own message"
        );
    }

    publisher.close().await;
    broker.delete(&[&q], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_killed_mid_stream_loses_nothing_and_keeps_ids() {
    capture_logs();
    let broker = Broker::connect().await;
    let q = unique("pub-kill");
    declare_queue(&broker, &q, FieldTable::default()).await;
    let name = unique("rmq-pub-kill");
    let config = test_config(&q)
        .with_connection_name(&name)
        .with_publish_retries(10);
    let publisher = publisher(config).await;

    // Four streams of batches, staggered so that some publishes are always in flight,
    // running until well after the kill, so the kill lands mid-batch.
    let killed = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..4u32)
        .map(|s| {
            let (publisher, q, killed) = (publisher.clone(), q.clone(), Arc::clone(&killed));
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                let mut after_kill = 0;
                let mut n = s * 1_000_000;
                while after_kill < 5 {
                    if killed.load(Ordering::SeqCst) {
                        after_kill += 1;
                    }
                    let batch: Vec<Event> = (n..n + 100).map(event).collect();
                    n += 100;
                    outcomes.extend(publisher.publish_all("", &q, &batch).await);
                }
                outcomes
            })
        })
        .collect();
    assert!(
        eventually(WAIT, || async {
            broker.ready_count(&q).await.unwrap_or(0) > 0
        })
        .await
    );
    let closed = tokio::task::spawn_blocking(move || close_connections_named(&name))
        .await
        .expect("rabbitmqctl");
    assert_eq!(closed, 1, "exactly the publisher's connection was closed");
    killed.store(true, Ordering::SeqCst);

    let mut confirmed = BTreeSet::new();
    for stream in streams {
        for outcome in stream.await.expect("stream task") {
            confirmed.insert(outcome.expect("every publish confirmed despite the kill"));
        }
    }
    assert!(
        republishes_mentioning(&q) > 0,
        "the kill forced republishes"
    );
    let got = drain(&broker, &q, confirmed.len()).await;
    let arrived: BTreeSet<String> = got.iter().filter_map(Got::message_id).collect();
    let missing: Vec<_> = confirmed.difference(&arrived).take(5).collect();
    assert!(missing.is_empty(), "confirmed but missing: {missing:?}");
    assert!(
        arrived.is_subset(&confirmed),
        "duplicates may arrive, but only under an id publish returned"
    );

    publisher.close().await;
    broker.delete(&[&q], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_publishes_an_event_through_its_delivery() {
    capture_logs();
    let broker = Broker::connect().await;
    let q = unique("pub-handler");
    let dlx = format!("{q}.dlx");
    let events = format!("{q}.events");
    declare_queue(&broker, &events, FieldTable::default()).await;

    #[derive(Deserialize)]
    struct Order {
        id: u64,
    }
    let handler = {
        let events = events.clone();
        delivery_handler_fn(move |order: Order, delivery: Arc<Delivery>| {
            let events = events.clone();
            async move {
                let publisher = delivery
                    .publisher()
                    .ok_or_else(|| HandlerError::reject("no publisher"))?;
                publisher
                    .publish_with(
                        "",
                        &events,
                        &serde_json::json!({"reserved": order.id}),
                        PublishOptions::with_message_id(format!("reserved-{}", order.id))
                            .header("caused-by", delivery.message_id().unwrap_or("")),
                    )
                    .await?;
                Ok::<_, HandlerError>(())
            }
        })
    };
    let app = App::new(test_config(&q))
        .consumer(ConsumerConfig::new(&q, &dlx, handler))
        .start()
        .await
        .expect("start");

    broker
        .publish_json("", &q, &serde_json::json!({"id": 7}), "order-7")
        .await;

    let got = broker
        .get_within(&events, WAIT)
        .await
        .expect("event arrived");
    assert_eq!(got.message_id().as_deref(), Some("reserved-7"));
    assert_eq!(got.header("caused-by").as_deref(), Some("order-7"));
    let body: serde_json::Value = serde_json::from_slice(&got.body).expect("json");
    assert_eq!(body, serde_json::json!({"reserved": 7}));

    app.shutdown().await.expect("clean shutdown");
    assert_eq!(broker.ready_count(&q).await, Some(0), "order acked");
    broker
        .delete_consumer_topology(&q, &dlx, &["1s", "2s", "4s"], &[])
        .await;
    broker.delete(&[&events], &[]).await;
}

// --- limits: one test per field, each over its limit -------------------------------------

/// Publish `build(options)` to `exchange`/`key` and expect `PublishError::Invalid` naming
/// `field`; then the same publisher must still deliver a valid message.
async fn over_limit(
    field: &str,
    exchange: Option<String>,
    key: Option<String>,
    build: impl FnOnce(PublishOptions) -> PublishOptions,
) {
    let broker = Broker::connect().await;
    let q = unique("pub-limit");
    declare_queue(&broker, &q, FieldTable::default()).await;
    let publisher = publisher(test_config(&q)).await;
    let options = build(PublishOptions::default());
    let exchange = exchange.unwrap_or_default();
    let key = key.unwrap_or_else(|| q.clone());

    let err = publisher
        .publish_with(&exchange, &key, &event(1), options)
        .await
        .expect_err("over the limit");
    let PublishError::Invalid {
        field: named,
        reason,
    } = &err
    else {
        panic!("expected Invalid for {field}, got {err:?}");
    };
    assert!(named.starts_with(field), "{named} vs {field}: {err}");
    assert!(!reason.is_empty(), "{err}");
    assert!(!err.outcome_unknown());
    assert_eq!(
        broker.ready_count(&q).await,
        Some(0),
        "nothing was sent for {field}"
    );

    // The connection survived: the next publish goes through on it.
    assert!(publisher.is_connected().await);
    let id = publisher
        .publish("", &q, &event(2))
        .await
        .expect("publisher still usable");
    let got = broker.get_within(&q, WAIT).await.expect("arrived");
    assert_eq!(got.message_id().as_deref(), Some(id.as_str()));
    publisher.close().await;
    broker.delete(&[&q], &[]).await;
}

fn long() -> String {
    "z".repeat(300)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_id_over_255_bytes_is_invalid() {
    over_limit("message_id", None, None, |mut o| {
        o.message_id = Some(long());
        o
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_key_over_255_bytes_is_invalid() {
    over_limit("header key", None, None, |o| o.header(&long(), "v")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_over_255_bytes_is_invalid() {
    over_limit("exchange", Some(long()), None, |o| o).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_key_over_255_bytes_is_invalid() {
    over_limit("routing_key", None, Some(long()), |o| o).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_type_over_255_bytes_is_invalid() {
    over_limit("content_type", None, None, |mut o| {
        o.content_type = Some(long());
        o
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_over_255_bytes_is_invalid() {
    over_limit("type", None, None, |mut o| {
        o.kind = Some(long());
        o
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_id_over_255_bytes_is_invalid() {
    over_limit("app_id", None, None, |mut o| {
        o.app_id = Some(long());
        o
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correlation_id_over_255_bytes_is_invalid() {
    over_limit("correlation_id", None, None, |mut o| {
        o.correlation_id = Some(long());
        o
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_over_255_bytes_is_invalid() {
    over_limit("reply_to", None, None, |mut o| {
        o.reply_to = Some(long());
        o
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiration_over_255_bytes_is_invalid() {
    over_limit("expiration", None, None, |mut o| {
        o.expiration = Some(long());
        o
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_id_over_255_bytes_is_invalid() {
    over_limit("user_id", None, None, |mut o| {
        o.user_id = Some(long());
        o
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_nested_too_deep_are_invalid() {
    let mut value = AMQPValue::LongString("leaf".into());
    for _ in 0..40 {
        let mut t = FieldTable::default();
        t.insert("n".into(), value);
        value = AMQPValue::FieldTable(t);
    }
    over_limit("headers", None, None, |mut o| {
        o.headers.insert("deep".into(), value);
        o
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_too_large_for_a_frame_are_invalid() {
    over_limit("headers", None, None, |mut o| {
        o.headers.insert(
            "big".into(),
            AMQPValue::LongString("x".repeat(200 * 1024).into()),
        );
        o
    })
    .await;
}

/// Deletes a broker user when dropped (also when the test fails).
struct UserGuard(String);

impl Drop for UserGuard {
    fn drop(&mut self) {
        reliable_mq_tests::sh(&format!(
            "rabbitmqctl delete_user '{}' >/dev/null 2>&1",
            self.0
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_refused_on_the_default_exchange_is_a_refusal_by_reply_code() {
    let broker = Broker::connect().await;
    let q = unique("pub-403");
    declare_queue(&broker, &q, FieldTable::default()).await;
    let user = unique("rmq-test-readonly");
    let _guard = UserGuard(user.clone());
    assert!(reliable_mq_tests::sh(&format!(
        "rabbitmqctl add_user '{user}' 'pw-{user}' >/dev/null 2>&1 && rabbitmqctl set_permissions -p / '{user}' '.*' '^$' '.*' >/dev/null 2>&1"
    )));
    let url = format!("amqp://{user}:pw-{user}@127.0.0.1:5672/%2f");
    let publisher = publisher(test_config(&q).with_amqp_url(url)).await;

    let err = publisher
        .publish("", &q, &event(1))
        .await
        .expect_err("this user may not write");
    let PublishError::Refused { code, exchange, .. } = &err else {
        panic!("expected Refused, got {err:?}");
    };
    assert_eq!(*code, 403, "{err}");
    assert_eq!(exchange, "");
    assert!(!err.outcome_unknown());
    assert_eq!(broker.ready_count(&q).await, Some(0));
    publisher.close().await;
    broker.delete(&[&q], &[]).await;
}
