//! One list of scenarios, run by two drivers: the real RabbitMQ (with `RunningApp::wait_idle`)
//! and the in-memory harness (`reliable_mq::testing::TestApp`). Each scenario checks its
//! expected outcome on both, and the two observed outcomes must be identical: handled and
//! duplicate counts, dead letters with their failure headers, the attempts and the delays
//! between them, what handlers published, which publishes were unroutable, and the order
//! in which messages come out of a queue that expires them (per-queue and per-message TTL).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_mq::lapin::BasicProperties;
use reliable_mq::lapin::types::{AMQPValue, FieldTable, LongString};
use reliable_mq::testing::TestApp;
use reliable_mq::{
    App, ConsumerConfig, Delivery, Error, ExchangeKind, HandlerError, PublishError, RetryBackoff,
    StatsSnapshot, delivery_handler_fn,
};
use reliable_mq_tests::{Broker, Cleanup, eventually, init_tracing, test_config, unique};
use tokio::time::Instant;

/// One handler call: (queue, attempt, body, when).
type Call = (String, u32, String, Instant);

/// A dead letter as compared: (x-error-kind, x-attempts, x-last-error-kind, message, body).
type DeadLetter = (String, String, String, String, String);

/// What handlers saw.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<Call>>>);

impl Calls {
    fn record(&self, d: &Delivery, body: &serde_json::Value) {
        if let Ok(mut calls) = self.0.lock() {
            calls.push((
                d.queue().to_owned(),
                d.attempt(),
                body.to_string(),
                Instant::now(),
            ));
        }
    }

    fn all(&self) -> Vec<Call> {
        self.0.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// One message a scenario publishes.
struct Publish {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    message_id: Option<String>,
    /// The per-message TTL (`expiration`), in milliseconds.
    expiration: Option<u32>,
}

impl Publish {
    fn json(exchange: &str, routing_key: &str, value: serde_json::Value) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body: value.to_string().into_bytes(),
            message_id: None,
            expiration: None,
        }
    }

    fn with_id(mut self, id: &str) -> Self {
        self.message_id = Some(id.into());
        self
    }

    fn expiring_after(mut self, ms: u32) -> Self {
        self.expiration = Some(ms);
        self
    }

    fn properties(&self) -> BasicProperties {
        let mut p = BasicProperties::default().with_content_type("application/json".into());
        if let Some(id) = &self.message_id {
            p = p.with_message_id(id.as_str().into());
        }
        if let Some(ms) = self.expiration {
            p = p.with_expiration(ms.to_string().into());
        }
        p
    }
}

/// A queue no consumer reads, declared by the test: what expires there is dead-lettered
/// through the default exchange to the consumer's queue `to`.
struct Holding {
    queue: String,
    /// `x-message-ttl`, in milliseconds.
    ttl: Option<u32>,
    to: String,
}

impl Holding {
    fn args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.to.as_str().into()),
        );
        if let Some(ttl) = self.ttl {
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl.into()));
        }
        args
    }
}

/// A scenario, given the prefix that makes its names unique.
struct Scenario {
    name: &'static str,
    consumers: Vec<ConsumerConfig>,
    /// Exchanges declared by the test (not by a consumer).
    exchanges: Vec<(String, ExchangeKind)>,
    publishes: Vec<Publish>,
    /// Each publish's outcome class is part of what is compared.
    queues: Vec<String>,
    /// Published one after the other, waiting for quiet in between (order matters).
    sequential: bool,
    /// Queues without a consumer that the publishes go to and expire from.
    holding: Vec<Holding>,
    /// Compare the calls in the order they happened (else sorted).
    ordered: bool,
}

/// What a run shows, with the scenario's prefix replaced by `P`.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    publish_outcomes: Vec<String>,
    /// Per queue: handled, duplicates.
    counts: BTreeMap<String, (u64, u64)>,
    /// Per queue: each call's attempt and body, in order.
    calls: BTreeMap<String, Vec<(u32, String)>>,
    /// Per queue: (x-error-kind, x-attempts, x-last-error-kind, message, body), sorted.
    dead_letters: BTreeMap<String, Vec<DeadLetter>>,
}

/// When things happened, beyond what must be identical.
struct Timing {
    /// The delays between consecutive attempts of one message.
    gaps: Vec<Duration>,
    /// Each call's time since the first publish, in call order.
    since_publish: Vec<Duration>,
}

impl Timing {
    fn of(calls: &[Call], published: Instant) -> Self {
        Self {
            gaps: gaps(calls).into_values().flatten().collect(),
            since_publish: calls.iter().map(|c| c.3 - published).collect(),
        }
    }
}

/// The delays between consecutive attempts of one message, per queue.
fn gaps(calls: &[(String, u32, String, Instant)]) -> BTreeMap<(String, String), Vec<Duration>> {
    let mut last: BTreeMap<(String, String), Instant> = BTreeMap::new();
    let mut out: BTreeMap<(String, String), Vec<Duration>> = BTreeMap::new();
    for (queue, _, body, at) in calls {
        let key = (queue.clone(), body.clone());
        if let Some(before) = last.insert(key.clone(), *at) {
            out.entry(key).or_default().push(*at - before);
        }
    }
    out
}

fn outcome_class(r: &Result<(), Error>) -> String {
    match r {
        Ok(()) => "confirmed".into(),
        Err(Error::Publish(PublishError::Unroutable { .. })) => "unroutable".into(),
        Err(e) => format!("failed: {e}"),
    }
}

fn str_header(h: Option<&FieldTable>, key: &str) -> String {
    match h.and_then(|h| h.inner().get(key)) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::LongLongInt(v)) => v.to_string(),
        Some(AMQPValue::LongInt(v)) => v.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// A dead letter as compared: the message text only up to the first `:` (it may carry a
/// message id).
fn dead_letter(
    h: Option<&FieldTable>,
    body: &[u8],
    prefix: &str,
) -> (String, String, String, String, String) {
    let message = str_header(h, "x-exception-message");
    let message = message.split(':').next().unwrap_or("").replace(prefix, "P");
    (
        str_header(h, "x-error-kind"),
        str_header(h, "x-attempts"),
        str_header(h, "x-last-error-kind"),
        message,
        String::from_utf8_lossy(body).into_owned(),
    )
}

fn normalise(mut observed: Observed, prefix: &str) -> Observed {
    fn rename<V>(m: BTreeMap<String, V>, prefix: &str) -> BTreeMap<String, V> {
        m.into_iter()
            .map(|(k, v)| (k.replace(prefix, "P"), v))
            .collect()
    }
    observed.counts = rename(observed.counts, prefix);
    observed.calls = rename(observed.calls, prefix);
    observed.dead_letters = rename(observed.dead_letters, prefix);
    for calls in observed.calls.values_mut() {
        for (_, body) in calls.iter_mut() {
            *body = body.replace(prefix, "P");
        }
    }
    observed
}

/// Each queue's calls: in the order they happened if `ordered`, else sorted.
fn calls_by_queue(
    calls: &[(String, u32, String, Instant)],
    ordered: bool,
) -> BTreeMap<String, Vec<(u32, String)>> {
    let mut out: BTreeMap<String, Vec<(u32, String)>> = BTreeMap::new();
    for (queue, attempt, body, _) in calls {
        out.entry(queue.clone())
            .or_default()
            .push((*attempt, body.clone()));
    }
    if !ordered {
        for v in out.values_mut() {
            v.sort();
        }
    }
    out
}

/// What a run shows once it is quiet: `queues` holds the stats and dead letters (in any
/// order) of each of the scenario's queues, `all` the handlers' calls.
fn observed(
    s: &Scenario,
    prefix: &str,
    publish_outcomes: Vec<String>,
    queues: Vec<(StatsSnapshot, Vec<DeadLetter>)>,
    all: &[Call],
    published: Instant,
) -> (Observed, Timing) {
    let mut counts = BTreeMap::new();
    let mut dead_letters = BTreeMap::new();
    for (q, (stats, mut dead)) in s.queues.iter().zip(queues) {
        counts.insert(q.clone(), (stats.handled, stats.duplicates));
        dead.sort();
        dead_letters.insert(q.clone(), dead);
    }
    let observed = Observed {
        publish_outcomes,
        counts,
        calls: calls_by_queue(all, s.ordered),
        dead_letters,
    };
    (normalise(observed, prefix), Timing::of(all, published))
}

/// Run on the in-memory transport.
async fn on_memory(s: &Scenario, calls: &Calls, prefix: &str) -> (Observed, Timing) {
    let mut app = TestApp::new().with_config(test_config(prefix));
    for c in &s.consumers {
        app = app.consumer(c.clone());
    }
    app = app.with_state(calls.clone());
    app.start().await.expect("the test app starts");
    for (name, kind) in &s.exchanges {
        app.broker().declare_exchange(name, *kind);
    }
    for h in &s.holding {
        app.broker().declare_queue_with_args(&h.queue, &h.args());
    }
    let published = Instant::now();
    let mut outcomes = Vec::new();
    for p in &s.publishes {
        let r = app
            .publish_raw(&p.exchange, &p.routing_key, p.body.clone(), p.properties())
            .await;
        outcomes.push(outcome_class(&r));
        if s.sequential {
            app.run_until_idle().await;
        }
    }
    app.run_until_idle().await;
    let queues = s
        .queues
        .iter()
        .map(|q| {
            let stats = app.stats(q);
            let dead = app
                .dead_letters(q)
                .iter()
                .map(|m| dead_letter(m.properties.headers().as_ref(), &m.body, prefix))
                .collect();
            (stats, dead)
        })
        .collect();
    let all = calls.all();
    app.shutdown().await.expect("stops");
    observed(s, prefix, outcomes, queues, &all, published)
}

/// Run on RabbitMQ.
async fn on_rabbitmq(s: &Scenario, calls: &Calls, prefix: &str) -> (Observed, Timing) {
    let broker = Broker::connect().await;
    for (name, kind) in &s.exchanges {
        let kind = match kind {
            ExchangeKind::Topic => reliable_mq::lapin::ExchangeKind::Topic,
            ExchangeKind::Fanout => reliable_mq::lapin::ExchangeKind::Fanout,
            ExchangeKind::Headers => reliable_mq::lapin::ExchangeKind::Headers,
            ExchangeKind::Direct => reliable_mq::lapin::ExchangeKind::Direct,
        };
        broker
            .channel
            .exchange_declare(
                name.as_str().into(),
                kind,
                reliable_mq::lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exchange declared");
    }
    let mut app = App::new(test_config(prefix)).with_state(calls.clone());
    for c in &s.consumers {
        app = app.consumer(c.clone());
    }
    let running = app.start().await.expect("the app starts on RabbitMQ");
    for h in &s.holding {
        broker
            .channel
            .queue_declare(
                h.queue.as_str().into(),
                reliable_mq::lapin::options::QueueDeclareOptions::default(),
                h.args(),
            )
            .await
            .expect("holding queue declared");
    }
    let published = Instant::now();
    let mut outcomes = Vec::new();
    for p in &s.publishes {
        let r = running
            .publisher()
            .publish_raw(&p.exchange, &p.routing_key, p.body.clone(), p.properties())
            .await
            .map_err(Error::from);
        outcomes.push(outcome_class(&r));
        if s.sequential {
            running.wait_idle(Duration::from_secs(30)).await;
        }
    }
    // `wait_idle` watches the consumers' queues only: first let the holding ones drain.
    for h in &s.holding {
        assert!(
            eventually(Duration::from_secs(30), || async {
                broker.ready_count(&h.queue).await == Some(0)
            })
            .await,
            "{}: {} drained",
            s.name,
            h.queue
        );
    }
    assert!(
        running.wait_idle(Duration::from_secs(30)).await,
        "{}: RabbitMQ run got quiet",
        s.name
    );
    let mut queues = Vec::new();
    for q in &s.queues {
        let stats = running.stats(q).unwrap_or_default();
        let mut dead = Vec::new();
        while let Some(m) = broker.get(&format!("{q}.dlq")).await {
            dead.push(dead_letter(
                m.properties.headers().as_ref(),
                &m.body,
                prefix,
            ));
        }
        queues.push((stats, dead));
    }
    let all = calls.all();
    running.shutdown().await.expect("stops");
    observed(s, prefix, outcomes, queues, &all, published)
}

/// Every handler records its call; the body decides what it does: `{"do": "ok"}`,
/// `"reject"`, `"retry"`, `"retry-once"`, `"panic"`, `"sleep"` (2 s), `"hold"` (300 ms,
/// then ok), `"publish"` (to `{"to": queue}` on the default exchange), `"publish-nowhere"`
/// (to the DLX with a key nothing binds).
fn handler() -> impl reliable_mq::Handler {
    delivery_handler_fn(|v: serde_json::Value, d: Arc<Delivery>| async move {
        let calls = d
            .state::<Calls>()
            .ok_or_else(|| HandlerError::reject("no Calls state"))?;
        calls.record(&d, &v);
        match v["do"].as_str().unwrap_or("ok") {
            "reject" => Err(HandlerError::reject("rejected by the test")),
            "retry" => Err(HandlerError::retry("always failing")),
            "retry-once" if d.attempt() == 1 => Err(HandlerError::retry("first attempt fails")),
            "panic" => panic!("the test handler panics"),
            "sleep" => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok(())
            }
            "hold" => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(())
            }
            "publish" | "publish-nowhere" => {
                let publisher = d
                    .publisher()
                    .ok_or_else(|| HandlerError::reject("no publisher"))?;
                let (exchange, key) = if v["do"] == "publish" {
                    (String::new(), v["to"].as_str().unwrap_or("").to_owned())
                } else {
                    (format!("{}.dlx", d.queue()), "nowhere".to_owned())
                };
                publisher
                    .publish(&exchange, &key, &serde_json::json!({"from": d.queue()}))
                    .await
                    .map(|_| ())
                    .map_err(|e| match e {
                        PublishError::Unroutable { .. } => {
                            HandlerError::reject(format!("unroutable: {e}"))
                        }
                        e => HandlerError::retry(e),
                    })
            }
            _ => Ok(()),
        }
    })
}

fn consumer(queue: &str) -> ConsumerConfig {
    ConsumerConfig::new(queue, format!("{queue}.dlx"), handler())
        .with_retries(
            0,
            Duration::from_millis(200),
            RetryBackoff::Exponential { factor: 2 },
        )
        .with_timeout(Duration::from_millis(500))
}

fn does(what: &str) -> serde_json::Value {
    serde_json::json!({ "do": what })
}

fn scenarios(p: &str) -> Vec<Scenario> {
    let q = format!("{p}-q");
    let one = |name, consumers: Vec<ConsumerConfig>, publishes| Scenario {
        name,
        consumers,
        exchanges: Vec::new(),
        publishes,
        queues: vec![q.clone()],
        sequential: false,
        holding: Vec::new(),
        ordered: false,
    };
    let bad_json = Publish {
        exchange: String::new(),
        routing_key: q.clone(),
        body: b"{not json".to_vec(),
        message_id: None,
        expiration: None,
    };
    let hold = format!("{p}-hold");
    let holding = |ttl| Holding {
        queue: hold.clone(),
        ttl,
        to: q.clone(),
    };
    let numbered = |n: u32| serde_json::json!({ "n": n });
    let retrying = consumer(&q).with_retries(
        2,
        Duration::from_millis(200),
        RetryBackoff::Exponential { factor: 2 },
    );
    let idempotent = consumer(&q)
        .idempotent(Duration::from_secs(60))
        .with_concurrency(2)
        .with_prefetch(4);
    let out = format!("{p}-out");
    let topic = format!("{p}-topic");
    let fan = format!("{p}-fan");
    let (fa, fb) = (format!("{p}-fa"), format!("{p}-fb"));
    vec![
        one(
            "success",
            vec![consumer(&q)],
            vec![Publish::json("", &q, does("ok"))],
        ),
        one("decode failure", vec![consumer(&q)], vec![bad_json]),
        one(
            "reject",
            vec![consumer(&q)],
            vec![Publish::json("", &q, does("reject"))],
        ),
        one(
            "retry then success",
            vec![retrying.clone()],
            vec![Publish::json("", &q, does("retry-once"))],
        ),
        one(
            "retries exhausted",
            vec![retrying],
            vec![Publish::json("", &q, does("retry"))],
        ),
        Scenario {
            sequential: true,
            ..one(
                "duplicate",
                vec![idempotent.clone()],
                vec![
                    Publish::json("", &q, does("ok")).with_id(&format!("{p}-dup")),
                    Publish::json("", &q, does("ok")).with_id(&format!("{p}-dup")),
                ],
            )
        },
        one(
            "held claim",
            vec![idempotent],
            vec![
                Publish::json("", &q, does("hold")).with_id(&format!("{p}-held")),
                Publish::json("", &q, does("hold")).with_id(&format!("{p}-held")),
            ],
        ),
        one(
            "panic",
            vec![consumer(&q)],
            vec![Publish::json("", &q, does("panic"))],
        ),
        one(
            "timeout",
            vec![consumer(&q)],
            vec![Publish::json("", &q, does("sleep"))],
        ),
        Scenario {
            queues: vec![q.clone(), out.clone()],
            ..one(
                "publish from a handler",
                vec![consumer(&q), consumer(&out)],
                vec![Publish::json(
                    "",
                    &q,
                    serde_json::json!({"do": "publish", "to": out}),
                )],
            )
        },
        one(
            "unroutable publish",
            vec![consumer(&q)],
            vec![
                Publish::json("", &q, does("publish-nowhere")),
                Publish::json(&format!("{q}.dlx"), "nowhere", does("ok")),
            ],
        ),
        Scenario {
            exchanges: vec![(topic.clone(), ExchangeKind::Topic)],
            ..one(
                "topic wildcard binding",
                vec![consumer(&q).with_exchange(&topic, ExchangeKind::Topic, "order.#.eu")],
                vec![
                    Publish::json(&topic, "order.eu", serde_json::json!({"n": 1})),
                    Publish::json(&topic, "order.created.big.eu", serde_json::json!({"n": 2})),
                    Publish::json(&topic, "order.created", serde_json::json!({"n": 3})),
                    Publish::json(&topic, "invoice.eu", serde_json::json!({"n": 4})),
                ],
            )
        },
        Scenario {
            queues: vec![fa.clone(), fb.clone()],
            ..one(
                "fanout to two consumers",
                vec![
                    consumer(&fa).with_exchange_kind(&fan, ExchangeKind::Fanout),
                    consumer(&fb).with_exchange_kind(&fan, ExchangeKind::Fanout),
                ],
                vec![Publish::json(&fan, "any", serde_json::json!({"n": 1}))],
            )
        },
        // Per-message TTLs expire at the head only: the 100 ms message waits behind the
        // 1 s one and both come out then, in order.
        Scenario {
            holding: vec![holding(None)],
            ordered: true,
            ..one(
                "per-message expiration waits for the head",
                vec![consumer(&q)],
                vec![
                    Publish::json("", &hold, numbered(1)).expiring_after(1000),
                    Publish::json("", &hold, numbered(2)).expiring_after(100),
                ],
            )
        },
        // The lower of the queue's TTL and the message's own wins: the head goes after
        // 600 ms, not 5 s, and the message behind it (the queue's 600 ms) with it.
        Scenario {
            holding: vec![holding(Some(600))],
            ordered: true,
            ..one(
                "queue TTL caps a longer expiration",
                vec![consumer(&q)],
                vec![
                    Publish::json("", &hold, numbered(1)).expiring_after(5000),
                    Publish::json("", &hold, numbered(2)),
                ],
            )
        },
    ]
}

/// What each scenario must show (on either transport), beyond the two agreeing.
fn check(name: &str, o: &Observed, timing: &Timing, memory: bool) {
    let delays = &timing.gaps;
    let q = "P-q";
    let counts = |queue: &str| o.counts.get(queue).copied().unwrap_or_default();
    let dead = |queue: &str| o.dead_letters.get(queue).cloned().unwrap_or_default();
    let kinds = |queue: &str| dead(queue).into_iter().map(|d| d.0).collect::<Vec<_>>();
    match name {
        "success" => assert_eq!(counts(q), (1, 0)),
        "decode failure" => assert_eq!(kinds(q), ["decode"]),
        "reject" => assert_eq!(kinds(q), ["rejected"]),
        "retry then success" => {
            assert_eq!(counts(q), (1, 0));
            assert_eq!(o.calls[q].iter().map(|c| c.0).collect::<Vec<_>>(), [1, 2]);
            assert!(
                delays.iter().all(|d| *d >= Duration::from_millis(200)),
                "{delays:?}"
            );
        }
        "retries exhausted" => {
            assert_eq!(
                o.calls[q].iter().map(|c| c.0).collect::<Vec<_>>(),
                [1, 2, 3]
            );
            let d = &dead(q)[0];
            assert_eq!(
                (d.0.as_str(), d.1.as_str(), d.2.as_str()),
                ("retries-exhausted", "3", "error")
            );
            // 200 ms, then 400 ms: exact on the paused clock, at least that on RabbitMQ.
            assert_eq!(delays.len(), 2);
            assert!(
                delays[0] >= Duration::from_millis(200) && delays[1] >= Duration::from_millis(400),
                "{delays:?}"
            );
            if memory {
                assert_eq!(
                    delays[..],
                    [Duration::from_millis(200), Duration::from_millis(400)]
                );
            }
        }
        "duplicate" => assert_eq!(counts(q), (1, 1)),
        "held claim" => {
            assert_eq!(
                counts(q),
                (1, 1),
                "one run, the held copy requeued and found done"
            );
            assert_eq!(o.calls[q].len(), 1);
        }
        "panic" => assert_eq!(kinds(q), ["panic"]),
        "timeout" => assert_eq!(kinds(q), ["timeout"]),
        "publish from a handler" => {
            assert_eq!(counts(q), (1, 0));
            assert_eq!(counts("P-out"), (1, 0));
            assert_eq!(o.calls["P-out"][0].1, r#"{"from":"P-q"}"#);
        }
        "unroutable publish" => {
            assert_eq!(kinds(q), ["rejected"]);
            assert_eq!(dead(q)[0].3, "unroutable");
            assert_eq!(o.publish_outcomes, ["confirmed", "unroutable"]);
        }
        "topic wildcard binding" => {
            assert_eq!(counts(q), (2, 0));
            assert_eq!(
                o.publish_outcomes,
                ["confirmed", "confirmed", "unroutable", "unroutable"]
            );
        }
        "fanout to two consumers" => {
            assert_eq!(counts("P-fa"), (1, 0));
            assert_eq!(counts("P-fb"), (1, 0));
        }
        "per-message expiration waits for the head" => {
            assert_eq!(o.calls[q], [(1, n(1)), (1, n(2))], "in publish order");
            expired_together(timing, Duration::from_millis(1000), memory);
        }
        "queue TTL caps a longer expiration" => {
            assert_eq!(o.calls[q], [(1, n(1)), (1, n(2))], "in publish order");
            expired_together(timing, Duration::from_millis(600), memory);
            // Long before the head's own 5 s: the queue's TTL was the lower.
            assert!(
                timing
                    .since_publish
                    .iter()
                    .all(|t| *t < Duration::from_secs(4)),
                "{:?}",
                timing.since_publish
            );
        }
        other => panic!("no check for scenario {other}"),
    }
}

fn n(n: u32) -> String {
    format!(r#"{{"n":{n}}}"#)
}

/// Both messages reached the handler only once the head's TTL `at` had run out (the
/// second one's own shorter TTL did not let it out earlier); on the paused clock, exactly
/// then.
fn expired_together(timing: &Timing, at: Duration, memory: bool) {
    let t = &timing.since_publish;
    assert_eq!(t.len(), 2, "{t:?}");
    assert!(t.iter().all(|t| *t >= at), "{t:?}");
    if memory {
        assert_eq!(t[..], [at, at]);
    }
}

fn cleanup(p: &str) -> Vec<Cleanup> {
    let tiers = ["200ms", "400ms", "100ms", "1s"];
    ["q", "out", "fa", "fb", "hold"]
        .iter()
        .map(|s| {
            Cleanup::consumer(
                &format!("{p}-{s}"),
                &tiers,
                &[&format!("{p}-topic"), &format!("{p}-fan")],
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_scenarios_give_the_same_outcomes_on_rabbitmq_and_in_memory() {
    init_tracing();
    let count = scenarios("x").len();
    let mut wall = Duration::ZERO;
    for i in 0..count {
        let prefix = unique("rmq-conf");
        let _cleanup = cleanup(&prefix);
        let rabbit_scenario = scenarios(&prefix).remove(i);
        let name = rabbit_scenario.name;
        let rabbit_calls = Calls::default();
        let (rabbit, rabbit_timing) = on_rabbitmq(&rabbit_scenario, &rabbit_calls, &prefix).await;
        check(name, &rabbit, &rabbit_timing, false);

        // The memory run on its own current-thread runtime, with the clock paused.
        let memory_prefix = prefix.clone();
        let started = std::time::Instant::now();
        let (memory, memory_timing) = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let s = scenarios(&memory_prefix).remove(i);
                on_memory(&s, &Calls::default(), &memory_prefix).await
            })
        })
        .join()
        .expect("the memory run does not panic");
        wall += started.elapsed();
        check(name, &memory, &memory_timing, true);
        assert_eq!(memory, rabbit, "{name}: in-memory and RabbitMQ agree");
        eprintln!("conformance: {name}: identical on both transports");
    }
    eprintln!("conformance: {count} scenarios on the in-memory transport in {wall:?} of wall time");
}

/// Header values compared as text must be text on both transports.
#[test]
fn long_strings_compare_as_text() {
    let mut h = FieldTable::default();
    h.insert("k".into(), AMQPValue::LongString(LongString::from("v")));
    assert_eq!(str_header(Some(&h), "k"), "v");
}

/// `wait_idle` on RabbitMQ: false while a handler still runs, true once everything
/// published was handled, with the counts complete at that moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_idle_returns_once_the_queues_are_empty_and_no_handler_runs() {
    init_tracing();
    let prefix = unique("rmq-idle");
    let _cleanup = cleanup(&prefix);
    let q = format!("{prefix}-q");
    let calls = Calls::default();
    let running = App::new(test_config(&prefix))
        .consumer(consumer(&q).with_timeout(Duration::from_secs(5)))
        .with_state(calls.clone())
        .start()
        .await
        .expect("starts");
    let publisher = running.publisher();
    for _ in 0..5 {
        publisher
            .publish("", &q, &does("hold"))
            .await
            .expect("published");
    }
    // Five handlers of 300 ms one after the other: not quiet after 200 ms.
    assert!(!running.wait_idle(Duration::from_millis(200)).await);
    assert!(running.wait_idle(Duration::from_secs(30)).await);
    assert_eq!(running.stats(&q).map(|s| s.handled), Some(5));
    assert_eq!(calls.all().len(), 5);
    running.shutdown().await.expect("stops");
}
