//! Observability on the real broker: trace context across publish, retry and dead letter
//! (an in-memory OpenTelemetry exporter), the Prometheus metrics scraped over HTTP, and
//! the health endpoint answering 200 and 503 to real HTTP requests.
//!
//! One process-wide tracing subscriber and metrics recorder serve every test here, so
//! each test finds its own spans and series by its unique queue name and message ids.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lapin::BasicProperties;
use opentelemetry::trace::{SpanKind, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use reliable_mq::{
    App, Config, ConsumerConfig, Delivery, HandlerError, RedisStore, RunningApp,
    delivery_handler_fn,
};
use reliable_mq_tests::{Broker, Cleanup, eventually, http_get, test_config, unique};
use serde::Deserialize;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

const WAIT: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize)]
struct Job {
    name: String,
}

/// The exporter every span of this process ends up in.
fn spans() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    &EXPORTER
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            // The process spans come from the global provider, the others through the
            // layer: a traced service sets both.
            opentelemetry::global::set_tracer_provider(provider.clone());
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("observe"));
            let filter = tracing_subscriber::filter::Targets::new()
                .with_target("reliable_mq", tracing::Level::INFO)
                .with_target("observe", tracing::Level::INFO);
            let subscriber = tracing_subscriber::registry().with(layer).with(filter);
            tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
            (exporter, provider)
        })
        .0
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

fn finished() -> Vec<SpanData> {
    spans().get_finished_spans().unwrap_or_default()
}

/// The consumer span of a message is a child of its publish span; its retry copy and its
/// dead letter stay in that trace, and the dead letter's headers carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_is_a_child_of_its_publish_and_the_trace_survives_retry_and_dead_letter() {
    spans();
    let q = unique("otel");
    let _cleanup = Cleanup::consumer(&q, &["200ms"], &[]);
    let broker = Broker::connect().await;
    let app = start_failing_on(
        &q,
        ("fails", || HandlerError::retry("the database is down")),
        1,
        Duration::from_millis(200),
    )
    .await;

    let request = tracing::info_span!("request");
    let trace_id = request.context().span().span_context().trace_id();
    assert!(
        request.context().span().span_context().is_valid(),
        "OpenTelemetry layer on"
    );
    let publisher = app.publisher().clone();
    let (ok_id, failing_id) = async {
        let ok = publisher
            .publish("", &q, &serde_json::json!({"name": "ok"}))
            .await;
        let failing = publisher
            .publish("", &q, &serde_json::json!({"name": "fails"}))
            .await;
        (ok.expect("confirmed"), failing.expect("confirmed"))
    }
    .instrument(request)
    .await;

    // The dead letter leads back to the request: its traceparent is the original's.
    let dead = broker
        .get_within(&format!("{q}.dlq"), WAIT)
        .await
        .expect("dead letter");
    assert_eq!(dead.message_id().as_deref(), Some(failing_id.as_str()));
    let traceparent = dead
        .header("traceparent")
        .expect("traceparent on the dead letter");
    assert!(
        traceparent.contains(&trace_id.to_string()),
        "{traceparent} carries trace {trace_id}"
    );
    assert_eq!(
        dead.header("x-error-kind").as_deref(),
        Some("retries-exhausted")
    );

    let processed = |id: &str| {
        finished()
            .into_iter()
            .filter(|s| {
                s.span_kind == SpanKind::Consumer
                    && attr(s, "messaging.message.id").as_deref() == Some(id)
            })
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(WAIT, || async {
            processed(&failing_id).len() == 2 && processed(&ok_id).len() == 1
        })
        .await,
        "one process span per attempt: {:?}",
        finished()
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>()
    );
    let all = finished();
    let publish_of = |id: &str| {
        all.iter()
            .find(|s| {
                s.span_kind == SpanKind::Producer
                    && attr(s, "messaging.message.id").as_deref() == Some(id)
            })
            .cloned()
            .expect("publish span")
    };
    for id in [&ok_id, &failing_id] {
        let publish = publish_of(id);
        assert_eq!(publish.span_context.trace_id(), trace_id);
        assert_eq!(publish.name, "publish amq.default");
        assert_eq!(
            attr(&publish, "messaging.system").as_deref(),
            Some("rabbitmq")
        );
        assert_eq!(
            attr(&publish, "messaging.operation.type").as_deref(),
            Some("send")
        );
        assert_eq!(
            attr(&publish, "messaging.rabbitmq.destination.routing_key").as_deref(),
            Some(q.as_str())
        );
        for process in processed(id) {
            assert_eq!(process.span_context.trace_id(), trace_id, "same trace");
            assert_eq!(
                process.parent_span_id,
                publish.span_context.span_id(),
                "the publish span is the parent (also of the retry copy's delivery)"
            );
            assert_eq!(process.name, format!("process {q}"));
            assert_eq!(
                attr(&process, "messaging.operation.type").as_deref(),
                Some("process")
            );
            assert_eq!(
                attr(&process, "messaging.destination.subscription.name").as_deref(),
                Some(q.as_str())
            );
        }
    }
    // The handler's own `tracing` spans are children of the process span.
    for id in [&ok_id, &failing_id] {
        for process in processed(id) {
            assert!(
                all.iter().any(|s| s.name == "handler work"
                    && attr(s, "handled_id").as_deref() == Some(id.as_str())
                    && s.parent_span_id == process.span_context.span_id()
                    && s.span_context.trace_id() == trace_id),
                "a handler span under process span {:?}",
                process.span_context.span_id()
            );
        }
    }
    let failed = processed(&failing_id);
    assert!(
        failed
            .iter()
            .all(|s| attr(s, "error.type").as_deref() == Some("error")),
        "error.type on each failed attempt"
    );
    // The copies are published inside a settle span of the delivery, in the same trace.
    let settles: Vec<_> = all
        .iter()
        .filter(|s| {
            attr(s, "messaging.operation.type").as_deref() == Some("settle")
                && failed
                    .iter()
                    .any(|p| p.span_context.span_id() == s.parent_span_id)
        })
        .collect();
    assert_eq!(settles.len(), 2, "retry, then dead letter");
    assert!(
        settles
            .iter()
            .all(|s| s.span_context.trace_id() == trace_id)
    );

    app.shutdown().await.expect("clean shutdown");
}

/// The value of each series of `metric` whose labels include `label`, by label set.
fn series(scrape: &str, metric: &str, label: &str) -> BTreeMap<String, f64> {
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(label))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn one(scrape: &str, metric: &str, label: &str) -> f64 {
    series(scrape, metric, label).values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_over_http_with_every_outcome_counted() {
    spans();
    let q = unique("metrics");
    let _cleanup = Cleanup::consumer(&q, &[], &[]);
    let broker = Broker::connect().await;
    let app = start_failing_on(
        &q,
        ("bad", || HandlerError::reject("not a valid job")),
        0,
        Duration::from_millis(100),
    )
    .await;
    let addr = app.serve_http("127.0.0.1:0").await.expect("listen");

    for name in ["a", "b", "bad"] {
        app.publisher()
            .publish("", &q, &serde_json::json!({ "name": name }))
            .await
            .expect("confirmed");
    }
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("not-json-1".into());
    broker.publish_raw("", &q, b"{not json", props).await;
    assert!(
        eventually(WAIT, || async {
            app.stats(&q)
                .is_some_and(|s| s.handled == 2 && s.dead_lettered == 2)
        })
        .await
    );

    let (status, scrape) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let mine = format!("queue=\"{q}\"");
    let count = |metric: &str| one(&scrape, metric, &mine);
    assert_eq!(
        count("reliable_mq_consumer_received_total"),
        4.0,
        "{scrape}"
    );
    assert_eq!(count("reliable_mq_consumer_handled_total"), 2.0);
    assert_eq!(count("reliable_mq_consumer_decode_failures_total"), 1.0);
    let dead = series(&scrape, "reliable_mq_consumer_dead_lettered_total", &mine);
    assert_eq!(
        dead.iter()
            .filter(|(k, _)| k.contains("kind=\"rejected\""))
            .map(|(_, v)| *v)
            .sum::<f64>(),
        1.0,
        "{dead:?}"
    );
    assert_eq!(
        dead.iter()
            .filter(|(k, _)| k.contains("kind=\"decode\""))
            .map(|(_, v)| *v)
            .sum::<f64>(),
        1.0,
        "{dead:?}"
    );
    assert_eq!(count("reliable_mq_consumer_attached"), 1.0);
    assert_eq!(count("reliable_mq_consumer_in_flight"), 0.0);
    // Four calls: decoding is part of the call (the undecodable one fails there).
    assert_eq!(
        count("reliable_mq_consumer_handler_duration_seconds_count"),
        4.0
    );
    assert_eq!(
        count("reliable_mq_consumer_settle_duration_seconds_count"),
        4.0
    );
    assert!(scrape.contains("reliable_mq_consumer_handler_duration_seconds_bucket{"));
    // The publisher's own: 3 publishes and 2 dead-letter copies, all confirmed (other
    // tests of this process publish too: at least).
    let total = |metric: &str| {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{metric} ")))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        total("reliable_mq_publisher_published_total") >= 5.0,
        "{scrape}"
    );
    assert!(total("reliable_mq_publisher_confirmed_total") >= 5.0);
    assert!(scrape.contains("reliable_mq_publisher_confirm_duration_seconds_count"));

    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_503_with_the_reason_while_the_dedup_store_does_not_answer() {
    spans();
    let q = unique("ready-dedup");
    let _cleanup = Cleanup::consumer(&q, &[], &[]);
    // Nothing listens on port 1: the store never answers.
    let store = RedisStore::new("redis://127.0.0.1:1", 1).expect("lazy pool");
    let app = start_noop(&q, test_config(&q), Some(store)).await;
    let addr = app.serve_http("127.0.0.1:0").await.expect("listen");

    let (status, body) = http_get(addr, "/health/live").await;
    assert_eq!((status, body.as_str()), (200, r#"{"live":true}"#));
    let (status, body) = http_get(addr, "/health/ready").await;
    assert_eq!(status, 503, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(doc["ready"], false);
    assert_eq!(doc["dedup_up"], false);
    assert_eq!(doc["consumers_attached"], true);
    assert_eq!(
        doc["reasons"],
        serde_json::json!(["the dedup store does not answer"])
    );
    app.shutdown().await.expect("clean shutdown");
    // The endpoint stops with the app.
    assert!(
        eventually(WAIT, || async {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_200_while_the_broker_is_there_and_503_when_it_is_gone() {
    spans();
    let q = unique("ready-broker");
    let _cleanup = Cleanup::consumer(&q, &[], &[]);
    let proxy = Proxy::start().await;
    let app = start_noop(&q, proxy.config(&q), None).await;
    let addr = app.serve_http("127.0.0.1:0").await.expect("listen");
    let (status, body) = http_get(addr, "/health/ready").await;
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(doc["ready"], true);
    assert_eq!(doc["consumers"][0]["queue"], q.as_str());

    proxy.cut();
    let last = std::sync::Mutex::new(String::new());
    assert!(
        eventually(WAIT, || async {
            let (status, body) = http_get(addr, "/health/ready").await;
            let gone = status == 503
                && body.contains("is not attached")
                && body.contains("the publisher is not connected");
            *last.lock().expect("last") = body;
            gone
        })
        .await,
        "{}",
        last.lock().expect("last")
    );
    // Live all the same: the process is fine, its broker is not.
    assert_eq!(http_get(addr, "/health/live").await.0, 200);
    let _ = tokio::time::timeout(WAIT, app.shutdown()).await;
}

/// The in-memory transport (`TestApp`) runs the publisher's own metrics code: every
/// attempt is counted, and each outcome (confirmed with its latency, nacked, returned)
/// as on RabbitMQ. A recorder local to this test's thread sees only this test's series.
#[test]
fn the_in_memory_publisher_counts_the_same_metrics() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use reliable_mq::observe::metrics::names;
    use reliable_mq::testing::TestApp;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let consumer = ConsumerConfig::new(
                "metered",
                "metered.dlx",
                reliable_mq::handler_fn(|n: u32| async move {
                    if n == 0 {
                        return Err(HandlerError::reject("zero"));
                    }
                    Ok(())
                }),
            );
            let mut app = TestApp::new().consumer(consumer);
            app.start().await.expect("start");
            app.broker().nack_next_confirm();
            app.publish("", "metered", &1u32)
                .await
                .expect("confirmed on the second attempt");
            app.publish("", "metered", &0u32).await.expect("confirmed");
            let unroutable = app.publish("", "nowhere", &2u32).await;
            assert!(unroutable.is_err(), "{unroutable:?}");
            app.run_until_idle().await;
            assert_eq!(app.handled("metered"), 1);
            assert_eq!(app.dead_letters("metered").len(), 1);
        });
    });

    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str| {
        snapshot
            .iter()
            .find(|(key, ..)| key.key().name() == name)
            .map(|(.., value)| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is {other:?}"),
            })
            .unwrap_or(0)
    };
    let confirm_samples = snapshot
        .iter()
        .find(|(key, ..)| key.key().name() == names::CONFIRM_DURATION)
        .map(|(.., value)| match value {
            DebugValue::Histogram(samples) => samples.len(),
            other => panic!("{other:?}"),
        })
        .unwrap_or(0);
    // Attempts: 1 nacked + 1 confirmed, 1 confirmed, its dead-letter copy (confirmed),
    // 1 returned.
    assert_eq!(
        (
            counter(names::PUBLISHED),
            counter(names::CONFIRMED),
            counter(names::NACKED),
            counter(names::RETURNED),
            confirm_samples,
        ),
        (5, 3, 1, 1, 3)
    );
    // The consumer side records on the same transport too.
    assert_eq!(counter(names::HANDLED), 1);
    assert_eq!(counter(names::DEAD_LETTERED), 1);
}

/// An app with one consumer on `q` that fails each job named `failing.0` with `failing.1()`
/// and accepts every other, with `retries` retries `delay` apart.
async fn start_failing_on(
    q: &str,
    failing: (&'static str, fn() -> HandlerError),
    retries: u32,
    delay: Duration,
) -> RunningApp {
    let (name, error) = failing;
    let handler = delivery_handler_fn(move |job: Job, d: Arc<Delivery>| async move {
        // The handler's own span: a child of the delivery's process span.
        let work = tracing::info_span!(
            target: "observe",
            "handler work",
            handled_id = d.message_id().unwrap_or("")
        );
        async {}.instrument(work).await;
        if job.name == name {
            return Err(error());
        }
        Ok(())
    });
    let consumer = ConsumerConfig::new(q, format!("{q}.dlx"), handler).with_retries(
        retries,
        delay,
        reliable_mq::RetryBackoff::Fixed,
    );
    App::new(test_config(q))
        .consumer(consumer)
        .start()
        .await
        .expect("start")
}

/// An app with one consumer on `q` whose handler does nothing; with a store, the consumer
/// is idempotent on it.
async fn start_noop(q: &str, config: Config, store: Option<RedisStore>) -> RunningApp {
    let handler =
        delivery_handler_fn(|_job: Job, _d: Arc<Delivery>| async { Ok::<_, HandlerError>(()) });
    let consumer = ConsumerConfig::new(q, format!("{q}.dlx"), handler);
    let app = match store {
        Some(store) => App::new(config)
            .consumer(consumer.idempotent(Duration::from_secs(60)))
            .with_dedup_store(store),
        None => App::new(config).consumer(consumer),
    };
    app.start().await.expect("start")
}

/// A TCP proxy to the broker that the test can cut or silence: the app's "broker" goes
/// away, or hangs, without touching the shared RabbitMQ.
struct Proxy {
    addr: SocketAddr,
    silent: Arc<std::sync::atomic::AtomicBool>,
    links: Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links = Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let (s, l) = (Arc::clone(&silent), Arc::clone(&links));
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut client, _)) = listener.accept().await {
                if s.load(std::sync::atomic::Ordering::SeqCst) {
                    held.push(client);
                    continue;
                }
                l.lock().expect("links").spawn(async move {
                    if let Ok(mut broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                    }
                });
            }
        });
        Self {
            addr,
            silent,
            links,
            task,
        }
    }

    /// The test config of `q` with the proxy as its broker.
    fn config(&self, q: &str) -> Config {
        test_config(q).with_amqp_url(format!("amqp://guest:guest@{}/%2f", self.addr))
    }

    /// Drop every connection through the proxy and refuse new ones.
    fn cut(&self) {
        self.task.abort();
        self.links.lock().expect("links").abort_all();
    }

    /// Drop every connection through the proxy, then accept new ones and never answer.
    fn silence(&self) {
        self.silent.store(true, std::sync::atomic::Ordering::SeqCst);
        self.links.lock().expect("links").abort_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// One readiness check waits at most one 2 s bound, not one per dependency: with the
/// dedup store and the broker both hanging (a publisher without a connection is asked to
/// open one), it still answers in about 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_answers_within_one_bound_while_the_store_and_the_broker_both_hang() {
    spans();
    let q = unique("ready-hang");
    let _cleanup = Cleanup::consumer(&q, &[], &[]);
    let store_proxy = Proxy::start().await;
    let broker_proxy = Proxy::start().await;
    store_proxy.silence();
    let store = RedisStore::new(&format!("redis://{}", store_proxy.addr), 1).expect("lazy pool");
    let app = start_noop(&q, broker_proxy.config(&q), Some(store)).await;
    broker_proxy.silence();
    assert!(
        eventually(WAIT, || async { !app.publisher().is_connected().await }).await,
        "the publisher saw its connection drop"
    );
    let started = std::time::Instant::now();
    let health = app.health().await;
    let took = started.elapsed();
    assert!(
        !health.dedup_up && !health.publisher_connected,
        "{health:?}"
    );
    // Checked one after the other they took 3 s here (the store fails in about 1 s, the
    // publisher's connect is cut at 2 s); side by side, 2 s.
    assert!(
        took < Duration::from_millis(2600),
        "one 2 s bound, not one per dependency: {took:?}"
    );
    let _ = tokio::time::timeout(WAIT, app.shutdown()).await;
}

/// Shutdown does not wait for a reconnect that hangs: with the broker accepting
/// connections and never answering, a consumer opening its next session is stopped at
/// once instead of after the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_reconnect_to_a_silent_broker() {
    spans();
    let q = unique("shutdown-silent");
    let _cleanup = Cleanup::consumer(&q, &[], &[]);
    let broker_proxy = Proxy::start().await;
    let mut config = broker_proxy.config(&q);
    config.connect_timeout = Duration::from_secs(20);
    let app = start_noop(&q, config, None).await;
    broker_proxy.silence();
    assert!(
        eventually(WAIT, || async { !app.health().await.consumers_attached }).await,
        "the consumer saw its session end"
    );
    // Past the first reconnect delay (100 ms, jittered): the consumer is now opening a
    // session through the silent proxy.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(30), app.shutdown()).await;
    let took = started.elapsed();
    assert!(stopped.is_ok(), "shutdown finished");
    assert!(
        took < Duration::from_secs(10),
        "shutdown waited for the 20 s connect timeout: {took:?}"
    );
}
