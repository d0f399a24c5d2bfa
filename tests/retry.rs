//! Delayed retry and dead letters on the real broker: the retry ladder's delays, the
//! dead letter's headers, reject/timeout/panic, a waiting retry not blocking the consumer,
//! quorum queues, trimmed messages, and a crash between the retry publish and the ack.
//!
//! Timing assertions are lower bounds only ("the gap is at least the configured delay"),
//! taken from timestamps recorded inside the handler, never from sleeps.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use reliable_mq::{
    App, ConsumerConfig, Delivery, ExchangeKind, HandlerError, RetryBackoff, delivery_handler_fn,
};
use reliable_mq_tests::{Broker, Got, eventually, init_tracing, test_config, unique};
use serde::Deserialize;

const WAIT: Duration = Duration::from_secs(15);
/// Slack for the broker's TTL timer and clocks on a noisy machine, subtracted from a
/// configured delay before comparing it with a measured gap.
const TOLERANCE: Duration = Duration::from_millis(25);

#[derive(Debug, Deserialize)]
struct Job {
    name: String,
}

/// One handler call, as seen from inside the handler.
#[derive(Debug, Clone)]
struct Call {
    name: String,
    attempt: u32,
    redelivered: bool,
    at: Instant,
    /// `x-error-kind` on the delivery (set on retry copies).
    error_kind: Option<String>,
    /// `x-attempts` on the delivery.
    attempts_header: Option<String>,
    /// Length of `x-exception-message` on the delivery, if any.
    message_len: Option<usize>,
}

#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<Call>>>);

impl Calls {
    fn record(&self, job: &Job, d: &Delivery) -> u32 {
        let call = Call {
            name: job.name.clone(),
            attempt: d.attempt(),
            redelivered: d.redelivered(),
            at: Instant::now(),
            error_kind: d.header("x-error-kind").map(str::to_owned),
            attempts_header: d.headers().and_then(|h| match h.inner().get("x-attempts") {
                Some(AMQPValue::LongLongInt(n)) => Some(n.to_string()),
                Some(other) => Some(format!("{other:?}")),
                None => None,
            }),
            message_len: d.header("x-exception-message").map(str::len),
        };
        let attempt = call.attempt;
        self.0.lock().expect("calls").push(call);
        attempt
    }

    fn all(&self) -> Vec<Call> {
        self.0.lock().expect("calls").clone()
    }

    fn of(&self, name: &str) -> Vec<Call> {
        self.all().into_iter().filter(|c| c.name == name).collect()
    }

    fn len(&self) -> usize {
        self.0.lock().expect("calls").len()
    }
}

fn job(name: &str) -> serde_json::Value {
    serde_json::json!({ "name": name })
}

fn assert_gap_at_least(earlier: &Call, later: &Call, delay: Duration) {
    let gap = later.at.duration_since(earlier.at);
    assert!(
        gap + TOLERANCE >= delay,
        "attempt {} came {gap:?} after attempt {}; the configured delay is {delay:?}",
        later.attempt,
        earlier.attempt
    );
}

/// Ready messages in the work queue, its DLQ and the given tiers, by name.
async fn leftovers(broker: &Broker, q: &str, tiers: &[&str]) -> Vec<(String, u32)> {
    let mut names = vec![q.to_owned(), format!("{q}.dlq")];
    names.extend(tiers.iter().map(|t| format!("{q}.retry.{t}")));
    let mut out = Vec::new();
    for n in names {
        let count = broker.ready_count(&n).await.unwrap_or(u32::MAX);
        out.push((n, count));
    }
    out
}

/// Run a test `body` that declares a consumer of `q`, then delete everything it declared
/// (queue, DLQ, DLX, the given retry tiers and exchanges) even when it panicked: a failed
/// assertion must not leave queues behind on the shared broker.
async fn cleaned_up<F>(q: &str, tiers: &[&str], extra_exchanges: &[&str], body: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::spawn(body).await;
    let broker = Broker::connect().await;
    broker
        .delete_consumer_topology(q, &format!("{q}.dlx"), tiers, extra_exchanges)
        .await;
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(payload) => std::panic::resume_unwind(payload),
            Err(e) => panic!("test body did not finish: {e}"),
        }
    }
}

fn assert_all_empty(left: &[(String, u32)]) {
    assert!(
        left.iter().all(|(_, n)| *n == 0),
        "messages left behind: {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_twice_then_succeeds_on_attempt_3_after_the_configured_delays() {
    init_tracing();
    let q = unique("retry-ok3");
    cleaned_up(
        &q,
        &["300ms", "600ms", "1200ms"],
        &[],
        fails_twice_then_succeeds_on_attempt_3_after_the_configured_delays_body(q.clone()),
    )
    .await;
}

async fn fails_twice_then_succeeds_on_attempt_3_after_the_configured_delays_body(q: String) {
    let broker = Broker::connect().await;
    let dlx = format!("{q}.dlx");
    let calls = Calls::default();
    let c = calls.clone();
    let handler = delivery_handler_fn(move |j: Job, d: Arc<Delivery>| {
        let attempt = c.record(&j, &d);
        async move {
            if attempt < 3 {
                return Err(HandlerError::retry(format!("db blip on attempt {attempt}")));
            }
            Ok(())
        }
    });
    let base = Duration::from_millis(300);
    let consumer = ConsumerConfig::new(&q, &dlx, handler).with_retries(
        3,
        base,
        RetryBackoff::Exponential { factor: 2 },
    );
    let app = App::new(test_config(&q))
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    broker.publish_json("", &q, &job("flaky"), "flaky-1").await;

    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 1)
        })
        .await
    );
    let seen = calls.all();
    let attempts: Vec<u32> = seen.iter().map(|c| c.attempt).collect();
    assert_eq!(attempts, [1, 2, 3], "{seen:?}");
    // Retry 1 waits 300ms, retry 2 waits 600ms.
    assert_gap_at_least(&seen[0], &seen[1], base);
    assert_gap_at_least(&seen[1], &seen[2], base * 2);
    // What the retry copies carried: failed attempts so far, and why.
    assert_eq!(seen[0].attempts_header, None);
    assert_eq!(seen[1].attempts_header.as_deref(), Some("1"));
    assert_eq!(seen[2].attempts_header.as_deref(), Some("2"));
    assert_eq!(seen[1].error_kind.as_deref(), Some("error"));
    let stats = app.stats(&q).expect("stats");
    assert_eq!(
        (stats.retried, stats.dead_lettered, stats.handled),
        (2, 0, 1)
    );

    app.shutdown().await.expect("clean shutdown");
    assert_eq!(calls.len(), 3, "no call after success");
    let tiers = ["300ms", "600ms", "1200ms"];
    assert_all_empty(&leftovers(&broker, &q, &tiers).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_failing_is_dead_lettered_once_after_max_retries_plus_one_calls_with_every_header() {
    init_tracing();
    let q = unique("retry-exhaust");
    let body = always_failing_is_dead_lettered_once_after_max_retries_plus_one_calls_with_every_header_body(q.clone());
    cleaned_up(&q, &["200ms"], &[&format!("{q}.shop")], body).await;
}

async fn always_failing_is_dead_lettered_once_after_max_retries_plus_one_calls_with_every_header_body(
    q: String,
) {
    let broker = Broker::connect().await;
    let (dlx, ex) = (format!("{q}.dlx"), format!("{q}.shop"));
    let dlq = format!("{q}.dlq");
    let calls = Calls::default();
    let c = calls.clone();
    let handler = delivery_handler_fn(move |j: Job, d: Arc<Delivery>| {
        let attempt = c.record(&j, &d);
        async move { Err::<(), _>(HandlerError::retry(format!("db down on attempt {attempt}"))) }
    });
    let delay = Duration::from_millis(200);
    let max_retries = 2;
    let consumer = ConsumerConfig::new(&q, &dlx, handler)
        .with_exchange(&ex, ExchangeKind::Topic, "order.*")
        .with_retries(max_retries, delay, RetryBackoff::Fixed);
    let app = App::new(test_config(&q))
        .consumer(consumer)
        .start()
        .await
        .expect("start");

    let mut headers = FieldTable::default();
    headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
    let body = serde_json::to_vec(&job("doomed")).expect("json");
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("doomed-1".into())
        .with_headers(headers);
    broker.publish_raw(&ex, "order.created", &body, props).await;

    let m: Got = broker.get_within(&dlq, WAIT).await.expect("dead letter");
    assert_eq!(calls.len(), max_retries as usize + 1, "{:?}", calls.all());
    let h = m.headers();
    assert_eq!(
        m.header("x-error-kind").as_deref(),
        Some("retries-exhausted"),
        "{h:?}"
    );
    assert_eq!(
        m.header("x-last-error-kind").as_deref(),
        Some("error"),
        "{h:?}"
    );
    assert_eq!(
        m.header("x-exception-message").as_deref(),
        Some("db down on attempt 3")
    );
    assert_eq!(
        m.header_int("x-attempts"),
        Some(i64::from(max_retries) + 1),
        "total attempts"
    );
    assert_eq!(
        m.header("x-original-exchange").as_deref(),
        Some(ex.as_str())
    );
    assert_eq!(
        m.header("x-original-routing-key").as_deref(),
        Some("order.created")
    );
    assert_eq!(m.header("x-original-queue").as_deref(), Some(q.as_str()));
    let first = m.header_int("x-first-failure").expect("x-first-failure");
    let last = m.header_int("x-last-failure").expect("x-last-failure");
    assert!(first <= last, "first {first} > last {last}");
    // Two waits of 200ms lie between the first and the last failure.
    let waited = Duration::from_millis(u64::try_from(last - first).unwrap_or(0));
    assert!(
        waited + TOLERANCE >= delay * 2,
        "failures only {waited:?} apart"
    );
    assert_eq!(
        m.header("tenant").as_deref(),
        Some("acme"),
        "the publisher's headers stay"
    );
    assert!(
        !h.contains_key("x-death"),
        "broker history is not carried on: {h:?}"
    );
    assert_eq!(m.body, body, "original body");
    assert_eq!(
        m.message_id().as_deref(),
        Some("doomed-1"),
        "original message_id"
    );
    assert_eq!(
        m.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );

    // The copies seen by the handler on the way.
    let seen = calls.all();
    assert_gap_at_least(&seen[0], &seen[1], delay);
    assert_gap_at_least(&seen[1], &seen[2], delay);
    // Counters move after the ack, a moment after the dead letter is confirmed.
    let counted = || async {
        app.stats(&q)
            .is_some_and(|s| (s.retried, s.dead_lettered, s.handled) == (2, 1, 0))
    };
    assert!(eventually(WAIT, counted).await, "{:?}", app.stats(&q));
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(calls.len(), 3, "nothing ran after the dead letter");
    assert_all_empty(&leftovers(&broker, &q, &["200ms"]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_goes_to_the_dlq_at_once_without_retries() {
    init_tracing();
    let q = unique("retry-reject");
    cleaned_up(
        &q,
        &["300ms", "600ms", "1200ms"],
        &[],
        reject_goes_to_the_dlq_at_once_without_retries_body(q.clone()),
    )
    .await;
}

async fn reject_goes_to_the_dlq_at_once_without_retries_body(q: String) {
    let broker = Broker::connect().await;
    let (dlx, dlq) = (format!("{q}.dlx"), format!("{q}.dlq"));
    let calls = Calls::default();
    let c = calls.clone();
    let handler = delivery_handler_fn(move |j: Job, d: Arc<Delivery>| {
        c.record(&j, &d);
        async move {
            Err::<(), _>(HandlerError::reject(format!(
                "{} is not a valid order",
                j.name
            )))
        }
    });
    let consumer = ConsumerConfig::new(&q, &dlx, handler).with_retries(
        3,
        Duration::from_millis(300),
        RetryBackoff::Exponential { factor: 2 },
    );
    let app = App::new(test_config(&q))
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    // A per-message TTL must not make the dead letter expire out of the DLQ.
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("bad-1".into())
        .with_expiration("60000".into());
    let body = serde_json::to_vec(&job("bad")).expect("json");
    broker.publish_raw("", &q, &body, props).await;

    let m = broker.get_within(&dlq, WAIT).await.expect("dead letter");
    assert_eq!(m.header("x-error-kind").as_deref(), Some("rejected"));
    assert_eq!(m.header("x-last-error-kind"), None);
    assert_eq!(
        m.header("x-exception-message").as_deref(),
        Some("bad is not a valid order")
    );
    assert_eq!(m.header_int("x-attempts"), Some(1));
    assert_eq!(
        m.header_int("x-first-failure"),
        m.header_int("x-last-failure")
    );
    assert_eq!(
        m.properties.expiration(),
        &None,
        "dead letters do not expire"
    );
    assert_eq!(m.message_id().as_deref(), Some("bad-1"));
    let counted = || async {
        app.stats(&q)
            .is_some_and(|s| (s.retried, s.dead_lettered) == (0, 1))
    };
    assert!(eventually(WAIT, counted).await, "{:?}", app.stats(&q));
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(calls.len(), 1, "rejected: exactly one call");
    let tiers = ["300ms", "600ms", "1200ms"];
    assert_all_empty(&leftovers(&broker, &q, &tiers).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_panics_are_retried_then_dead_lettered_with_their_kind() {
    init_tracing();
    let q = unique("retry-tp");
    cleaned_up(
        &q,
        &["200ms"],
        &[],
        timeouts_and_panics_are_retried_then_dead_lettered_with_their_kind_body(q.clone()),
    )
    .await;
}

async fn timeouts_and_panics_are_retried_then_dead_lettered_with_their_kind_body(q: String) {
    let broker = Broker::connect().await;
    let (dlx, dlq) = (format!("{q}.dlx"), format!("{q}.dlq"));
    let calls = Calls::default();
    let c = calls.clone();
    let handler = delivery_handler_fn(move |j: Job, d: Arc<Delivery>| {
        c.record(&j, &d);
        async move {
            match j.name.as_str() {
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok(())
                }
                "boom" => panic!("boom on attempt {}", d.attempt()),
                _ => Ok::<(), HandlerError>(()),
            }
        }
    });
    let delay = Duration::from_millis(200);
    let consumer = ConsumerConfig::new(&q, &dlx, handler)
        .with_timeout(Duration::from_millis(300))
        .with_retries(1, delay, RetryBackoff::Fixed);
    let app = App::new(test_config(&q))
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    broker.publish_json("", &q, &job("slow"), "slow-1").await;
    broker.publish_json("", &q, &job("boom"), "boom-1").await;

    let mut dead = Vec::new();
    for _ in 0..2 {
        dead.push(broker.get_within(&dlq, WAIT).await.expect("dead letter"));
    }
    dead.sort_by_key(Got::message_id);
    let (boom, slow) = (&dead[0], &dead[1]);
    assert_eq!(slow.message_id().as_deref(), Some("slow-1"));
    assert_eq!(
        slow.header("x-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    assert_eq!(slow.header("x-last-error-kind").as_deref(), Some("timeout"));
    assert!(
        slow.header("x-exception-message")
            .unwrap_or_default()
            .contains("did not finish within")
    );
    assert_eq!(slow.header_int("x-attempts"), Some(2));
    assert_eq!(
        boom.header("x-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    assert_eq!(boom.header("x-last-error-kind").as_deref(), Some("panic"));
    assert!(
        boom.header("x-exception-message")
            .unwrap_or_default()
            .contains("boom on attempt 2")
    );
    assert_eq!(boom.header_int("x-attempts"), Some(2));

    // Each ran twice; the retry copy said why the first attempt failed.
    for (name, kind) in [("slow", "timeout"), ("boom", "panic")] {
        let seen = calls.of(name);
        assert_eq!(
            seen.iter().map(|c| c.attempt).collect::<Vec<_>>(),
            [1, 2],
            "{name}: {seen:?}"
        );
        assert_eq!(seen[1].error_kind.as_deref(), Some(kind), "{name}");
        assert_gap_at_least(&seen[0], &seen[1], delay);
    }
    let stats = app.stats(&q).expect("stats");
    assert_eq!(
        stats.sessions, 1,
        "neither a panic nor a timeout cost a reconnect"
    );
    app.shutdown().await.expect("clean shutdown");
    assert_all_empty(&leftovers(&broker, &q, &["200ms"]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_retry_does_not_block_the_next_message() {
    init_tracing();
    let q = unique("retry-overtake");
    cleaned_up(
        &q,
        &["2s"],
        &[],
        a_waiting_retry_does_not_block_the_next_message_body(q.clone()),
    )
    .await;
}

async fn a_waiting_retry_does_not_block_the_next_message_body(q: String) {
    let broker = Broker::connect().await;
    let dlx = format!("{q}.dlx");
    let calls = Calls::default();
    let c = calls.clone();
    let handler = delivery_handler_fn(move |j: Job, d: Arc<Delivery>| {
        let attempt = c.record(&j, &d);
        async move {
            if j.name == "failing" && attempt == 1 {
                return Err(HandlerError::retry("try again later"));
            }
            Ok(())
        }
    });
    // One slot and a prefetch of one: if the retry held either, "fast" would wait for it.
    let consumer = ConsumerConfig::new(&q, &dlx, handler)
        .with_prefetch(1)
        .with_concurrency(1)
        .with_retries(1, Duration::from_secs(2), RetryBackoff::Fixed);
    let app = App::new(test_config(&q))
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    broker
        .publish_json("", &q, &job("failing"), "failing-1")
        .await;
    broker.publish_json("", &q, &job("fast"), "fast-1").await;

    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 2)
        })
        .await
    );
    let order: Vec<(String, u32)> = calls
        .all()
        .into_iter()
        .map(|c| (c.name, c.attempt))
        .collect();
    assert_eq!(
        order,
        [
            ("failing".to_owned(), 1),
            ("fast".to_owned(), 1),
            ("failing".to_owned(), 2)
        ],
        "the fast message overtakes the waiting retry"
    );
    app.shutdown().await.expect("clean shutdown");
    assert_all_empty(&leftovers(&broker, &q, &["2s"]).await);
}

/// The `arguments` column of `rabbitmqctl list_queues` for `queue`.
fn queue_arguments(queue: &str) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "arguments"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{queue}\t")).map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queue_is_declared_with_a_delivery_limit_and_retries_through_quorum_tiers() {
    init_tracing();
    let q = unique("retry-quorum");
    cleaned_up(
        &q,
        &["300ms"],
        &[],
        quorum_queue_is_declared_with_a_delivery_limit_and_retries_through_quorum_tiers_body(
            q.clone(),
        ),
    )
    .await;
}

async fn quorum_queue_is_declared_with_a_delivery_limit_and_retries_through_quorum_tiers_body(
    q: String,
) {
    let broker = Broker::connect().await;
    let dlx = format!("{q}.dlx");
    let calls = Calls::default();
    let c = calls.clone();
    let handler = delivery_handler_fn(move |j: Job, d: Arc<Delivery>| {
        let attempt = c.record(&j, &d);
        async move {
            if attempt == 1 {
                return Err(HandlerError::retry("once"));
            }
            Ok(())
        }
    });
    let max_retries = 2;
    let consumer = ConsumerConfig::new(&q, &dlx, handler)
        .with_retries(max_retries, Duration::from_millis(300), RetryBackoff::Fixed)
        .quorum(None);
    let app = App::new(test_config(&q))
        .consumer(consumer)
        .start()
        .await
        .expect("start");

    let args = queue_arguments(&q).expect("rabbitmqctl lists the queue");
    let limit = max_retries + 5;
    assert!(
        args.contains(&format!("{{\"x-delivery-limit\",{limit}}}")),
        "{args}"
    );
    assert!(args.contains("{\"x-queue-type\",\"quorum\"}"), "{args}");
    assert!(
        args.contains(&format!("{{\"x-dead-letter-exchange\",\"{dlx}\"}}")),
        "{args}"
    );
    let tier = format!("{q}.retry.300ms");
    let tier_args = queue_arguments(&tier).expect("tier listed");
    assert!(
        tier_args.contains("{\"x-queue-type\",\"quorum\"}"),
        "{tier_args}"
    );
    assert!(tier_args.contains("{\"x-message-ttl\",300}"), "{tier_args}");

    // The ladder works on quorum queues too (message TTL and dead-lettering back).
    broker.publish_json("", &q, &job("q"), "q-1").await;
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 1)
        })
        .await
    );
    let seen = calls.all();
    assert_eq!(seen.iter().map(|c| c.attempt).collect::<Vec<_>>(), [1, 2]);
    assert_gap_at_least(&seen[0], &seen[1], Duration::from_millis(300));
    app.shutdown().await.expect("clean shutdown");
    assert_all_empty(&leftovers(&broker, &q, &["300ms"]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_exception_message_is_trimmed_on_retry_and_dead_letter_copies() {
    init_tracing();
    let q = unique("retry-trim");
    cleaned_up(
        &q,
        &["200ms"],
        &[],
        a_long_exception_message_is_trimmed_on_retry_and_dead_letter_copies_body(q.clone()),
    )
    .await;
}

async fn a_long_exception_message_is_trimmed_on_retry_and_dead_letter_copies_body(q: String) {
    let broker = Broker::connect().await;
    let (dlx, dlq) = (format!("{q}.dlx"), format!("{q}.dlq"));
    let calls = Calls::default();
    let c = calls.clone();
    // 1 MiB: far beyond the 128 KiB frame the headers must fit in.
    let huge = "é".repeat(512 * 1024);
    let handler = delivery_handler_fn(move |j: Job, d: Arc<Delivery>| {
        c.record(&j, &d);
        let message = huge.clone();
        async move { Err::<(), _>(HandlerError::retry(message)) }
    });
    let consumer = ConsumerConfig::new(&q, &dlx, handler).with_retries(
        1,
        Duration::from_millis(200),
        RetryBackoff::Fixed,
    );
    let app = App::new(test_config(&q))
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    broker.publish_json("", &q, &job("long"), "long-1").await;

    let m = broker
        .get_within(&dlq, WAIT)
        .await
        .expect("dead letter despite the huge message");
    let text = m.header("x-exception-message").expect("message header");
    assert!(
        text.len() <= reliable_mq::headers::MAX_MESSAGE_BYTES,
        "{} bytes",
        text.len()
    );
    assert!(
        text.starts_with("éé") && text.ends_with("..."),
        "cut on a char boundary, marked"
    );
    let seen = calls.all();
    assert_eq!(seen.len(), 2);
    let on_retry = seen[1]
        .message_len
        .expect("the retry copy carried the message");
    assert!(
        on_retry <= reliable_mq::headers::MAX_MESSAGE_BYTES,
        "{on_retry} bytes"
    );
    app.shutdown().await.expect("clean shutdown");
    assert_all_empty(&leftovers(&broker, &q, &["200ms"]).await);
}

/// A process killed after the retry copy is confirmed and before the original is acked.
///
/// The window is microseconds wide, so the test arms the crash seam (feature `testing`): the consumer
/// publishes the retry copy (confirmed, in the tier) and then leaves the original unacked,
/// as a dead process would. Stopping the app closes its channel, which for the broker is
/// the same as the process dying: the unacked original goes back to the queue. A second
/// app (the restarted process) must then see both the original and the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_retry_publish_and_the_ack_duplicates_and_loses_nothing() {
    init_tracing();
    let q = unique("retry-crash");
    cleaned_up(
        &q,
        &["1s"],
        &[],
        a_crash_between_the_retry_publish_and_the_ack_duplicates_and_loses_nothing_body(q.clone()),
    )
    .await;
}

async fn a_crash_between_the_retry_publish_and_the_ack_duplicates_and_loses_nothing_body(
    q: String,
) {
    let broker = Broker::connect().await;
    let dlx = format!("{q}.dlx");
    let tier = format!("{q}.retry.1s");
    let calls = Calls::default();
    let consumer = |calls: Calls| {
        let handler = delivery_handler_fn(move |j: Job, d: Arc<Delivery>| {
            let attempt = calls.record(&j, &d);
            let first_delivery = attempt == 1 && !d.redelivered();
            async move {
                if first_delivery {
                    return Err(HandlerError::retry("transient"));
                }
                Ok(())
            }
        });
        ConsumerConfig::new(&q, &dlx, handler).with_retries(
            2,
            Duration::from_secs(1),
            RetryBackoff::Fixed,
        )
    };

    let armed = reliable_mq::__private::crash_seam::arm(&q);
    let first = App::new(test_config(&q))
        .consumer(consumer(calls.clone()))
        .start()
        .await
        .expect("start");
    broker.publish_json("", &q, &job("crash"), "crash-1").await;
    assert!(
        eventually(WAIT, || async { armed.fired() }).await,
        "the retry copy was confirmed"
    );
    // "Kill": the channel goes away with the original unacked.
    first.shutdown().await.expect("stop");
    drop(armed);

    // Two copies now exist: the requeued original and the retry copy (in its tier, or
    // already back in the work queue, or already handled by the first app).
    let handled_before = calls.all().iter().filter(|c| c.attempt == 2).count();
    assert!(
        eventually(WAIT, || async {
            let waiting = broker.ready_count(&q).await.unwrap_or(0)
                + broker.ready_count(&tier).await.unwrap_or(0);
            waiting as usize + handled_before == 2
        })
        .await,
        "original and retry copy both exist: {:?}",
        leftovers(&broker, &q, &["1s"]).await
    );

    // The restarted process handles both: a duplicate, not a loss.
    let second = App::new(test_config(&q))
        .consumer(consumer(calls.clone()))
        .start()
        .await
        .expect("restart");
    let both = || async {
        let seen = calls.all();
        seen.iter().any(|c| c.attempt == 1 && c.redelivered) && seen.iter().any(|c| c.attempt == 2)
    };
    assert!(eventually(WAIT, both).await, "{:?}", calls.all());
    second.shutdown().await.expect("clean shutdown");
    let seen = calls.all();
    assert_eq!(
        seen.len(),
        3,
        "first try, redelivered original, retry copy: {seen:?}"
    );
    assert_all_empty(&leftovers(&broker, &q, &["1s"]).await);
}

/// The replay snippet of docs/error-handling.md, kept here so it is compiled and run.
///
/// Move the messages now in `dlq` back to the queue each failed in, with a fresh retry
/// ladder. Each is acked from the DLQ only after the broker confirmed the replayed copy,
/// so a crash mid-replay duplicates at most one message and loses none.
async fn replay_dlq(url: &str, dlq: &str) -> Result<usize, Box<dyn std::error::Error>> {
    use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
    use lapin::{Connection, ConnectionProperties};
    use reliable_mq::Publisher;
    use reliable_mq::headers::{self as failure, ORIGINAL_QUEUE};

    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let publisher = Publisher::connect(url).await?;
    // Only what is there now: a replayed message that fails again must not be replayed
    // again by this same run.
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let waiting = channel
        .queue_declare(dlq.into(), passive, FieldTable::default())
        .await?
        .message_count();
    let mut replayed = 0;
    for _ in 0..waiting {
        let get = BasicGetOptions { no_ack: false };
        let Some(message) = channel.basic_get(dlq.into(), get).await? else {
            break;
        };
        let d = message.delivery;
        let mut headers = d.properties.headers().clone().unwrap_or_default();
        let Some(queue) = failure::header_str(Some(&headers), ORIGINAL_QUEUE) else {
            // Not one of ours (e.g. dead-lettered by the broker's delivery limit): leave it.
            continue;
        };
        let queue = queue.to_owned();
        failure::strip_failure_headers(&mut headers);
        // Straight to the queue (default exchange), not to the original exchange: that
        // would deliver it again to every other queue bound there.
        let properties = d.properties.clone().with_headers(headers);
        publisher
            .publish_raw("", &queue, d.data, properties)
            .await?;
        d.acker.ack(BasicAckOptions::default()).await?;
        replayed += 1;
    }
    publisher.close().await;
    let _ = connection.close(200, "replayed".into()).await;
    Ok(replayed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_gets_a_fresh_ladder_and_keeps_its_origin() {
    init_tracing();
    let q = unique("retry-replay");
    let body = a_replayed_dead_letter_gets_a_fresh_ladder_and_keeps_its_origin_body(q.clone());
    cleaned_up(&q, &["200ms"], &[&format!("{q}.shop")], body).await;
}

async fn a_replayed_dead_letter_gets_a_fresh_ladder_and_keeps_its_origin_body(q: String) {
    let broker = Broker::connect().await;
    let (dlx, ex, dlq) = (format!("{q}.dlx"), format!("{q}.shop"), format!("{q}.dlq"));
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let origins = Arc::new(Mutex::new(Vec::new()));
    let calls = Calls::default();
    let (c, f, o) = (calls.clone(), Arc::clone(&fixed), Arc::clone(&origins));
    let handler = delivery_handler_fn(move |j: Job, d: Arc<Delivery>| {
        let attempt = c.record(&j, &d);
        o.lock()
            .expect("origins")
            .push((d.exchange().to_owned(), d.routing_key().to_owned()));
        let fixed = f.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            if fixed && attempt == 2 {
                return Ok(());
            }
            Err(HandlerError::retry("downstream down"))
        }
    });
    let consumer = ConsumerConfig::new(&q, &dlx, handler)
        .with_exchange(&ex, ExchangeKind::Topic, "order.*")
        .with_retries(1, Duration::from_millis(200), RetryBackoff::Fixed);
    let app = App::new(test_config(&q))
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    broker
        .publish_json(&ex, "order.created", &job("replay"), "replay-1")
        .await;
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.dead_lettered == 1)
        })
        .await
    );
    assert_eq!(calls.len(), 2);

    // Downstream is back: replay. The message starts over at attempt 1 and gets its
    // retry again (it succeeds on attempt 2, which a kept x-attempts would have denied).
    fixed.store(true, std::sync::atomic::Ordering::SeqCst);
    let replayed = replay_dlq(&reliable_mq_tests::amqp_url(), &dlq)
        .await
        .expect("replay");
    assert_eq!(replayed, 1);
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 1)
        })
        .await
    );
    let attempts: Vec<u32> = calls.all().iter().map(|c| c.attempt).collect();
    assert_eq!(attempts, [1, 2, 1, 2], "a fresh ladder after the replay");
    let origins = origins.lock().expect("origins").clone();
    let expected = (ex.clone(), "order.created".to_owned());
    assert!(
        origins.iter().all(|o| o == &expected),
        "origin kept: {origins:?}"
    );
    app.shutdown().await.expect("clean shutdown");
    assert_all_empty(&leftovers(&broker, &q, &["200ms"]).await);
}
