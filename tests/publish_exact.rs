//! Every publish's outcome is its own: three adversarial scenarios on one `Publisher`,
//! 23,000 publishes in all, against the real broker. A publish to the bound key must be
//! `Ok`, one to the unbound key `Unroutable`; anything else is a misreport. Afterwards the
//! bound queue must hold exactly as many messages as were reported `Ok`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::{self, FuturesUnordered};
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use reliable_mq::{PublishError, PublishOptions, Publisher};
use reliable_mq_tests::{Broker, Cleanup, eventually, test_config, unique};

const BOUND: &str = "bound";
const NOWHERE: &str = "nowhere";

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    unroutable: AtomicUsize,
    misreported: AtomicUsize,
    other: AtomicUsize,
}

impl Tally {
    /// Record the outcome of a publish to `key`.
    fn record(&self, key: &str, result: &Result<String, PublishError>) {
        match (key, result) {
            (BOUND, Ok(_)) => self.ok.fetch_add(1, Ordering::Relaxed),
            (NOWHERE, Err(PublishError::Unroutable { .. })) => {
                self.unroutable.fetch_add(1, Ordering::Relaxed)
            }
            (NOWHERE, Ok(_)) | (BOUND, Err(PublishError::Unroutable { .. })) => {
                self.misreported.fetch_add(1, Ordering::Relaxed)
            }
            (_, other) => {
                eprintln!("unexpected outcome for {key}: {other:?}");
                self.other.fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    fn line(&self, name: &str) -> String {
        format!(
            "{name}: ok {} unroutable {} misreported {} other {}",
            self.ok.load(Ordering::Relaxed),
            self.unroutable.load(Ordering::Relaxed),
            self.misreported.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
        )
    }
}

async fn publish(
    publisher: &Publisher,
    ex: &str,
    key: &str,
    id: String,
) -> Result<String, PublishError> {
    publisher
        .publish_with(
            ex,
            key,
            &serde_json::json!({"id": id}),
            PublishOptions::with_message_id(id.clone()),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_the_publishs_own_under_adversarial_load() {
    let broker = Broker::connect().await;
    let queue = unique("exact");
    let ex = format!("{queue}.ex");
    let _cleanup = Cleanup::consumer(&queue, &[], &[&ex]);
    broker
        .channel
        .exchange_declare(
            ex.as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare exchange");
    broker
        .channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare queue");
    broker
        .channel
        .queue_bind(
            queue.as_str().into(),
            ex.as_str().into(),
            BOUND.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let publisher =
        Publisher::from_config(&test_config(&queue).with_confirm_timeout(Duration::from_secs(30)))
            .await
            .expect("publisher connects");
    let publisher = &publisher;
    let ex = ex.as_str();

    // 1. The same id, published at once to the bound and the unbound key: 4,000 pairs,
    //    100 pairs in flight.
    let one = Tally::default();
    stream::iter(0..4_000)
        .for_each_concurrent(100, |i| {
            let one = &one;
            async move {
                let id = format!("pair-{i}");
                let (a, b) = tokio::join!(
                    publish(publisher, ex, BOUND, id.clone()),
                    publish(publisher, ex, NOWHERE, id),
                );
                one.record(BOUND, &a);
                one.record(NOWHERE, &b);
            }
        })
        .await;
    eprintln!("{}", one.line("same id, bound and unbound (8000)"));

    // 2. Distinct ids, every third unroutable, 500 in flight: 9,000 publishes.
    let two = Tally::default();
    stream::iter(0..9_000)
        .for_each_concurrent(500, |i| {
            let two = &two;
            async move {
                let key = if i % 3 == 2 { NOWHERE } else { BOUND };
                let r = publish(publisher, ex, key, format!("distinct-{i}")).await;
                two.record(key, &r);
            }
        })
        .await;
    eprintln!(
        "{}",
        two.line("distinct ids, every third unroutable (9000)")
    );

    // 3. Unroutable publishes abandoned after about 200µs, mixed with awaited routable and
    //    unroutable ones: 3,000 abandoned, 3,000 awaited, 300 in flight.
    let three = Tally::default();
    let abandoned = AtomicUsize::new(0);
    let mut inflight = FuturesUnordered::new();
    for i in 0..6_000u32 {
        let (three, abandoned) = (&three, &abandoned);
        inflight.push(async move {
            let id = format!("mixed-{}", i / 2);
            match i % 4 {
                0 | 2 => {
                    let fut = publish(publisher, ex, NOWHERE, id);
                    match tokio::time::timeout(Duration::from_micros(200), fut).await {
                        Ok(r) => three.record(NOWHERE, &r),
                        Err(_) => {
                            abandoned.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                1 => three.record(BOUND, &publish(publisher, ex, BOUND, id).await),
                _ => three.record(NOWHERE, &publish(publisher, ex, NOWHERE, id).await),
            }
        });
        if inflight.len() >= 300 {
            inflight.next().await;
        }
    }
    while inflight.next().await.is_some() {}
    eprintln!(
        "{} abandoned {}",
        three.line("abandoned unroutable mixed with awaited (6000)"),
        abandoned.load(Ordering::Relaxed)
    );

    let ok: usize = [&one, &two, &three]
        .iter()
        .map(|t| t.ok.load(Ordering::Relaxed))
        .sum();
    let misreported: usize = [&one, &two, &three]
        .iter()
        .map(|t| t.misreported.load(Ordering::Relaxed))
        .sum();
    let other: usize = [&one, &two, &three]
        .iter()
        .map(|t| t.other.load(Ordering::Relaxed))
        .sum();
    // Every awaited publish to the bound key is there, nothing else is.
    let expected = u32::try_from(ok).expect("fits");
    let settled = eventually(Duration::from_secs(10), || async {
        broker.ready_count(&queue).await == Some(expected)
    })
    .await;
    let in_queue = broker.ready_count(&queue).await;
    eprintln!(
        "total: ok {ok} misreported {misreported} other {other}; bound queue holds {in_queue:?}; stray returns {}",
        publisher.stray_returns()
    );
    assert_eq!(misreported, 0, "outcomes swapped between publishes");
    assert_eq!(other, 0, "unexpected outcomes (see stderr)");
    assert_eq!(ok, 4_000 + 6_000 + 1_500, "every bound publish reported Ok");
    assert!(settled, "bound queue holds {in_queue:?}, {ok} reported Ok");
    assert_eq!(publisher.stray_returns(), 0);
    // Abandoned publishes leave nothing behind once the broker has answered.
    assert!(
        eventually(Duration::from_secs(10), || async {
            publisher.in_flight() == 0
        })
        .await,
        "{} publishes still in the ledger",
        publisher.in_flight()
    );
    publisher.close().await;
}

// --- one lineage per failure ------------------------------------------------------------

fn log_lines() -> &'static std::sync::Mutex<Vec<String>> {
    static LINES: std::sync::OnceLock<std::sync::Mutex<Vec<String>>> = std::sync::OnceLock::new();
    LINES.get_or_init(|| std::sync::Mutex::new(Vec::new()))
}

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf).into_owned();
        log_lines().lock().expect("log lock").push(text);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn late_copies_mentioning(needle: &str) -> usize {
    log_lines()
        .lock()
        .expect("log lock")
        .iter()
        .filter(|l| l.contains("waiting for its own confirm") && l.contains(needle))
        .count()
}

/// Copies whose confirms are late (a 1ms confirm timeout: a persistent copy to a durable
/// queue takes longer) are never published a second time: every failed attempt leaves
/// exactly one copy, so the handler runs `max_retries + 1` times per message and each
/// message is dead-lettered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_copy_confirm_never_starts_a_second_lineage() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "warn,reliable_mq::publisher=debug",
        ))
        .with_ansi(false)
        .with_writer(|| Capture)
        .try_init();
    let q = unique("lineage");
    let delay = Duration::from_millis(100);
    let tier = "100ms";
    let _cleanup = Cleanup::consumer(&q, &[tier], &[]);
    let broker = Broker::connect().await;
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, u32)>::new()));
    let seen = std::sync::Arc::clone(&calls);
    let handler = reliable_mq::delivery_handler_fn(
        move |_v: serde_json::Value, d: std::sync::Arc<reliable_mq::Delivery>| {
            seen.lock()
                .expect("calls")
                .push((d.message_id().unwrap_or_default().to_owned(), d.attempt()));
            async move { Err::<(), _>(reliable_mq::HandlerError::retry("always down")) }
        },
    );
    let max_retries = 2;
    let consumer = reliable_mq::ConsumerConfig::new(&q, format!("{q}.dlx"), handler).with_retries(
        max_retries,
        delay,
        reliable_mq::RetryBackoff::Fixed,
    );
    let config = test_config(&q).with_confirm_timeout(Duration::from_millis(1));
    let app = reliable_mq::App::new(config)
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    let messages = 20;
    for i in 0..messages {
        broker
            .publish_json("", &q, &serde_json::json!({"n": i}), &format!("{q}-{i}"))
            .await;
    }
    let dlq = format!("{q}.dlq");
    let expected = u32::try_from(messages).expect("fits");
    assert!(
        eventually(Duration::from_secs(30), || async {
            broker.ready_count(&dlq).await == Some(expected)
        })
        .await,
        "dead letters: {:?}",
        broker.ready_count(&dlq).await
    );
    // A second copy of any attempt would show within one more trip through the tier.
    tokio::time::sleep(delay * 5).await;
    app.shutdown().await.expect("clean shutdown");

    let calls = calls.lock().expect("calls").clone();
    let late = late_copies_mentioning(&q);
    eprintln!(
        "lineage: {} handler calls for {messages} messages (expected {}), {} dead letters, {late} copies whose confirm was late",
        calls.len(),
        messages * (max_retries as usize + 1),
        broker.ready_count(&dlq).await.unwrap_or(0),
    );
    assert!(late > 0, "the test must force late copy confirms");
    assert_eq!(
        calls.len(),
        messages * (max_retries as usize + 1),
        "{calls:?}"
    );
    for i in 0..messages {
        let mut attempts: Vec<u32> = calls
            .iter()
            .filter(|(id, _)| *id == format!("{q}-{i}"))
            .map(|(_, a)| *a)
            .collect();
        attempts.sort_unstable();
        assert_eq!(attempts, [1, 2, 3], "message {i}");
    }
    assert_eq!(
        broker.ready_count(&dlq).await,
        Some(expected),
        "one dead letter each"
    );
    assert_eq!(broker.ready_count(&q).await, Some(0));
}
