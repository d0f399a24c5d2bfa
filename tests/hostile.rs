//! Hostile frames on the real broker: messages that a well-behaved client never sends but
//! RabbitMQ accepts and delivers (invalid UTF-8 in short strings, odd header tables, huge
//! bodies, encodings we cannot read). They are published byte by byte with the raw client
//! in `reliable_mq_tests::raw`. For each, the consumer keeps running on one session (no
//! reconnect loop), the message lands in the DLQ with kind `decode` and the reason, and a
//! valid message queued behind it is handled.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reliable_mq::{App, ConsumerConfig, HandlerError, RunningApp, handler_fn};
use reliable_mq_tests::raw::{self, Property, RawProperties};
use reliable_mq_tests::{
    Broker, Cleanup, Got, amqp_url, eventually, init_tracing, test_config, unique,
};
use serde::Deserialize;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Deserialize)]
struct Order {
    id: u64,
}

const VALID_BODY: &[u8] = br#"{"id":1}"#;

/// What a hostile message left behind.
struct Outcome {
    dead_letter: Got,
    handled: usize,
    sessions: u64,
    attached: bool,
}

/// Start a consumer on a fresh queue, publish `properties`/`body` raw, then a valid
/// message behind it; wait for the valid one to be handled and the hostile one to be
/// dead-lettered.
async fn run_hostile(
    base: &str,
    properties: RawProperties,
    body: Vec<u8>,
    tune: impl FnOnce(ConsumerConfig) -> ConsumerConfig,
) -> Outcome {
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique(base);
    let dlx = format!("{q}.dlx");
    let dlq = format!("{q}.dlq");
    let _cleanup = Cleanup::consumer(&q, &["1s", "2s", "4s"], &[]);
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handled);
    let handler = handler_fn(move |_o: Order| {
        let counter = Arc::clone(&counter);
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, HandlerError>(())
        }
    });
    let app: RunningApp = App::new(test_config(&q))
        .consumer(tune(ConsumerConfig::new(&q, &dlx, handler)))
        .start()
        .await
        .expect("start");

    raw::publish(&amqp_url(), "", q.as_bytes(), properties, body)
        .await
        .expect("the broker accepts the hostile message");
    broker
        .publish_json("", &q, &serde_json::json!({"id": 2}), "valid-behind")
        .await;

    let handled_behind = eventually(WAIT, || async {
        app.stats(&q).is_some_and(|s| s.handled == 1)
    })
    .await;
    let dead_letter = broker.get_within(&dlq, WAIT).await;
    let stats = app.stats(&q).expect("stats");
    app.shutdown().await.expect("clean shutdown");
    assert!(
        handled_behind,
        "the valid message behind the hostile one was not handled: {stats:?}"
    );
    let dead_letter = dead_letter
        .unwrap_or_else(|| panic!("the hostile message did not reach the DLQ: {stats:?}"));
    assert_eq!(
        broker.ready_count(&q).await,
        Some(0),
        "nothing left in the work queue"
    );
    Outcome {
        dead_letter,
        handled: handled.load(Ordering::SeqCst),
        sessions: stats.sessions,
        attached: stats.attached,
    }
}

/// Every hostile input: one session (no reconnect loop), consumer attached until shutdown,
/// only the valid message handled, a `decode` dead letter whose reason mentions `reason`.
fn assert_dead_lettered(o: &Outcome, reason: &str) {
    assert_eq!(
        o.sessions, 1,
        "the consumer reconnected: a hostile frame broke the session"
    );
    assert!(o.attached, "the consumer was still attached");
    assert_eq!(o.handled, 1, "only the valid message reaches the handler");
    let m = &o.dead_letter;
    assert_eq!(
        m.header("x-error-kind").as_deref(),
        Some("decode"),
        "{:?}",
        m.headers()
    );
    let message = m.header("x-exception-message").unwrap_or_default();
    assert!(
        message.contains(reason),
        "the reason `{message}` does not mention `{reason}`"
    );
}

fn json_properties() -> RawProperties {
    RawProperties::persistent().short(Property::ContentType, b"application/json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_utf8_message_id_is_dead_lettered_without_a_reconnect_loop() {
    // Idempotent, so the id would be the dedup key: it must never be claimed.
    let props = json_properties().short(Property::MessageId, b"\xff\xfe");
    let o = run_hostile("hostile-mid", props, VALID_BODY.to_vec(), |c| {
        c.idempotent(Duration::from_secs(60))
    })
    .await;
    assert_dead_lettered(&o, "message_id");
    assert_eq!(o.dead_letter.body, VALID_BODY, "body kept as it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_utf8_content_type_is_dead_lettered() {
    let props = RawProperties::persistent()
        .short(Property::ContentType, b"application/\xc3\x28json")
        .short(Property::MessageId, b"bad-content-type");
    let o = run_hostile("hostile-ct", props, VALID_BODY.to_vec(), |c| c).await;
    assert_dead_lettered(&o, "content_type");
    assert_eq!(
        o.dead_letter.message_id().as_deref(),
        Some("bad-content-type")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_utf8_type_is_dead_lettered() {
    let props = json_properties()
        .short(Property::Type, b"order.\xffcreated")
        .short(Property::MessageId, b"bad-type");
    let o = run_hostile("hostile-type", props, VALID_BODY.to_vec(), |c| c).await;
    assert_dead_lettered(&o, "type");
    assert_eq!(o.dead_letter.message_id().as_deref(), Some("bad-type"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_key_with_invalid_bytes_is_dead_lettered() {
    let headers = raw::table(&[
        (b"tenant", raw::long_string_value(b"acme")),
        (b"bad-\xff\xfe-key", raw::long_string_value(b"v")),
    ]);
    let props = json_properties()
        .short(Property::MessageId, b"bad-header-key")
        .headers(headers);
    let o = run_hostile("hostile-hkey", props, VALID_BODY.to_vec(), |c| c).await;
    assert_dead_lettered(&o, "header key");
    assert_eq!(
        o.dead_letter.header("tenant").as_deref(),
        Some("acme"),
        "other headers kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_table_nested_100_deep_is_dead_lettered() {
    let props = json_properties()
        .short(Property::MessageId, b"deep-headers")
        .headers(raw::table(&[(
            b"deep",
            raw::table_value(raw::nested_table(100)),
        )]));
    let o = run_hostile("hostile-deep", props, VALID_BODY.to_vec(), |c| c).await;
    assert_dead_lettered(&o, "nested");
    assert_eq!(o.dead_letter.message_id().as_deref(), Some("deep-headers"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_body_over_the_consumer_limit_is_dead_lettered() {
    const SIZE: usize = 100 * 1024 * 1024;
    let props = json_properties().short(Property::MessageId, b"huge-body");
    let o = run_hostile("hostile-huge", props, vec![b' '; SIZE], |c| c).await;
    assert_dead_lettered(&o, "over this consumer's");
    assert_eq!(o.dead_letter.body.len(), SIZE, "the whole body is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_content_encoding_is_dead_lettered() {
    let props = json_properties()
        .short(Property::ContentEncoding, b"gzip")
        .short(Property::MessageId, b"gzipped");
    // Not even gzip: the body must never be read, whatever it holds.
    let o = run_hostile("hostile-enc", props, VALID_BODY.to_vec(), |c| c).await;
    assert_dead_lettered(&o, "content_encoding `gzip`");
    assert_eq!(o.dead_letter.body, VALID_BODY, "body kept as it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_table_nested_to_the_frame_limit_neither_crashes_nor_loops() {
    // 18 700 levels fill a 128 KiB frame. Parsed recursively, they overflowed the client's
    // I/O thread stack and aborted the process; the failure record does not fit beside
    // them in one frame, so the dead letter leaves the original headers out.
    let props = json_properties()
        .short(Property::MessageId, b"very-deep")
        .headers(raw::table(&[
            (b"tenant", raw::long_string_value(b"acme")),
            (b"deep", raw::table_value(raw::nested_table(18_700))),
        ]));
    let o = run_hostile("hostile-vdeep", props, VALID_BODY.to_vec(), |c| c).await;
    assert_dead_lettered(&o, "nested");
    let m = &o.dead_letter;
    let reason = m.header("x-exception-message").unwrap_or_default();
    assert!(reason.contains("left out of this dead letter"), "{reason}");
    assert_eq!(
        m.header("tenant"),
        None,
        "the original headers were dropped"
    );
    assert_eq!(m.message_id().as_deref(), Some("very-deep"));
    assert_eq!(m.body, VALID_BODY, "body kept as it was");
}

/// A header whose value the corrupting proxy turns into an unknown type.
const MARKER: &[u8] = b"x-hostile-marker";

/// A consumer reaching the broker through a [`raw::CorruptingProxy`], and a marked message
/// (which its client library cannot parse) with a valid one behind it.
struct Unreadable {
    broker: Broker,
    proxy: raw::CorruptingProxy,
    app: RunningApp,
    queue: String,
    /// Order ids in the order their handler calls finished.
    seen: Arc<std::sync::Mutex<Vec<u64>>>,
    _cleanup: Cleanup,
}

/// How many handler calls for order `id` finished.
fn calls(seen: &std::sync::Mutex<Vec<u64>>, id: u64) -> usize {
    seen.lock()
        .map_or(0, |s| s.iter().filter(|&&i| i == id).count())
}

/// `slow_before`: a valid message goes first, to a handler that takes that long, so the
/// unreadable delivery arrives while every slot is busy.
async fn start_unreadable(base: &str, quorum: bool, slow_before: Option<Duration>) -> Unreadable {
    init_tracing();
    let broker = Broker::connect().await;
    let proxy = raw::CorruptingProxy::start("127.0.0.1:5672", MARKER).expect("proxy");
    let queue = unique(base);
    let dlx = format!("{queue}.dlx");
    let cleanup = Cleanup::consumer(&queue, &["1s", "2s", "4s"], &[]);
    let pause = slow_before.unwrap_or_default();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let handler = handler_fn(move |o: Order| {
        let record = Arc::clone(&record);
        async move {
            tokio::time::sleep(pause).await;
            if let Ok(mut s) = record.lock() {
                s.push(o.id);
            }
            Ok::<_, HandlerError>(())
        }
    });
    let mut consumer = ConsumerConfig::new(&queue, &dlx, handler);
    if quorum {
        consumer = consumer.quorum(Some(2));
    }
    let config = test_config(&queue)
        .with_amqp_url(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()));
    let app = App::new(config)
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        String::from_utf8_lossy(MARKER).as_ref().into(),
        lapin::types::AMQPValue::LongString("x".into()),
    );
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("unreadable".into())
        .with_headers(headers);
    if slow_before.is_some() {
        // Two: one runs, the other waits for the slot when the unreadable one arrives.
        for id in [10, 11] {
            broker
                .publish_json(
                    "",
                    &queue,
                    &serde_json::json!({ "id": id }),
                    &format!("before-{id}"),
                )
                .await;
        }
    }
    broker.publish_raw("", &queue, VALID_BODY, props).await;
    broker
        .publish_json("", &queue, &serde_json::json!({"id": 2}), "valid-behind")
        .await;
    Unreadable {
        broker,
        proxy,
        app,
        queue,
        seen,
        _cleanup: cleanup,
    }
}

/// `reason` of the first `x-death` entry (the broker's own dead-lettering record).
fn death_reason(m: &Got) -> Option<String> {
    use lapin::types::AMQPValue;
    let headers = m.properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get("reason")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_frame_on_a_classic_queue_is_quarantined_into_the_dlq() {
    let u = start_unreadable("hostile-unread", false, None).await;
    let dlq = format!("{}.dlq", u.queue);
    // Every session dies on the delivery its client cannot read. The backoff keeps growing
    // (before: it restarted at 100 ms, 321 sessions in 40 s), the next sessions take one
    // delivery at a time, and after the third the quarantine rejects the queue's first
    // message into the DLQ over a raw connection; the valid message behind it runs.
    let handled = eventually(WAIT, || async {
        u.app.stats(&u.queue).is_some_and(|s| s.handled == 1)
    })
    .await;
    let dead = u.broker.get_within(&dlq, WAIT).await;
    let stats = u.app.stats(&u.queue).expect("stats");
    u.app.shutdown().await.expect("clean shutdown");
    assert!(
        u.proxy.corrupted() >= 3,
        "the marked delivery broke the sessions"
    );
    assert!(handled, "the valid message was not handled: {stats:?}");
    assert_eq!(stats.handled, 1, "handled once: {stats:?}");
    assert!(
        (4..=5).contains(&stats.sessions),
        "three unreadable sessions, then one that works: {stats:?}"
    );
    let dead = dead.expect("the unreadable message in the DLQ");
    assert_eq!(dead.message_id().as_deref(), Some("unreadable"));
    assert_eq!(dead.body, VALID_BODY, "the original bytes");
    assert_eq!(
        death_reason(&dead).as_deref(),
        Some("rejected"),
        "rejected by the quarantine: {:?}",
        dead.headers()
    );
    assert_eq!(u.broker.ready_count(&u.queue).await, Some(0));
    assert_eq!(
        u.broker.ready_count(&dlq).await,
        Some(0),
        "nothing else dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_frame_on_a_quorum_queue_is_dead_lettered_by_the_delivery_limit() {
    let u = start_unreadable("hostile-unread-q", true, None).await;
    let dlq = format!("{}.dlq", u.queue);
    // The broker counts each session that died holding the delivery; past the limit it
    // dead-letters the message itself, and the valid one behind it is handled.
    let handled = eventually(Duration::from_secs(30), || async {
        u.app.stats(&u.queue).is_some_and(|s| s.handled == 1)
    })
    .await;
    let dead = u.broker.get_within(&dlq, WAIT).await;
    // The window opens again: later messages flow on the same session.
    for i in 0..5 {
        u.broker
            .publish_json(
                "",
                &u.queue,
                &serde_json::json!({"id": i}),
                &format!("after-{i}"),
            )
            .await;
    }
    let later = eventually(WAIT, || async {
        u.app.stats(&u.queue).is_some_and(|s| s.handled == 6)
    })
    .await;
    let stats = u.app.stats(&u.queue).expect("stats");
    u.app.shutdown().await.expect("clean shutdown");
    assert!(handled, "the valid message was not handled: {stats:?}");
    assert!(
        later,
        "messages after it were not all handled once: {stats:?}"
    );
    assert_eq!(
        stats.handled, 6,
        "each valid message handled once: {stats:?}"
    );
    assert_eq!(
        u.broker.ready_count(&dlq).await,
        Some(0),
        "only the unreadable message was dead-lettered"
    );
    let dead = dead.expect("the unreadable message in the DLQ");
    assert_eq!(dead.message_id().as_deref(), Some("unreadable"));
    assert_eq!(
        death_reason(&dead).as_deref(),
        Some("delivery_limit"),
        "dead-lettered by the broker's delivery limit: {:?}",
        dead.headers()
    );
    assert!(stats.sessions <= 8, "reconnect loop: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_frame_arriving_while_every_slot_is_busy_is_quarantined_too() {
    // The unreadable delivery arrives while the only slot is busy and the next delivery
    // waits for it: the session then sees the dead connection through its link watch, not
    // through the delivery stream, and must still count it as an unreadable frame.
    let u = start_unreadable(
        "hostile-unread-busy",
        false,
        Some(Duration::from_millis(700)),
    )
    .await;
    let dlq = format!("{}.dlq", u.queue);
    let dead = u.broker.get_within(&dlq, Duration::from_secs(30)).await;
    let done = eventually(WAIT, || async {
        [10, 11, 2].iter().all(|&id| calls(&u.seen, id) >= 1)
    })
    .await;
    let stats = u.app.stats(&u.queue).expect("stats");
    u.app.shutdown().await.expect("clean shutdown");
    assert!(
        done,
        "the valid messages were not all handled: {:?} {stats:?}",
        u.seen
    );
    // A message whose handler ran while the connection died lost its ack and came back
    // (at-least-once; idempotent consumers absorb it): at most twice. The one behind the
    // unreadable message runs once.
    assert!(
        calls(&u.seen, 10) <= 2 && calls(&u.seen, 11) <= 2,
        "{:?}",
        u.seen
    );
    assert_eq!(calls(&u.seen, 2), 1, "{:?}", u.seen);
    let dead = dead.expect("the unreadable message in the DLQ");
    assert_eq!(dead.message_id().as_deref(), Some("unreadable"));
    assert_eq!(death_reason(&dead).as_deref(), Some("rejected"));
    assert!(stats.sessions <= 6, "reconnect loop: {stats:?}");
    assert_eq!(u.broker.ready_count(&u.queue).await, Some(0));
}
