//! Metrics through the [`metrics`] facade (feature `metrics`).
//!
//! The facade, not OpenTelemetry metrics: recording is one atomic operation on a handle
//! registered once per consumer, cheap enough for every delivery; an application chooses
//! the backend by installing a recorder (Prometheus, StatsD, OpenTelemetry through
//! `metrics-exporter-opentelemetry` ...), and without one every call is a no-op.
//!
//! [`App::start`](crate::App::start) installs a Prometheus recorder ([`install_prometheus`])
//! unless the application installed a recorder of its own before; [`render`] gives its
//! text, and the `http` feature serves it on `/metrics`. A recorder of your own must be
//! installed before `start`: consumers register their handles there.
//!
//! Every metric, its labels and unit are listed in `docs/observability.md`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets of the duration histograms, in seconds: 100 µs to 30 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes, so
/// they cannot pile up in memory.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the Prometheus recorder as the global `metrics` recorder, once per process
/// ([`App::start`](crate::App::start) does). `false` when another recorder was installed
/// first (the application's own): metrics go there, and [`render`] has nothing to render.
pub fn install_prometheus() -> bool {
    PROMETHEUS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("seconds".into()), DURATION_BUCKETS)
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let upkeep = handle.clone();
                runtime.spawn(async move {
                    loop {
                        tokio::time::sleep(UPKEEP_EVERY).await;
                        upkeep.run_upkeep();
                    }
                });
            }
            Some(handle)
        })
        .is_some()
}

/// The metrics in Prometheus text format, when reliable-mq's Prometheus recorder is the
/// global one (see [`install_prometheus`]).
pub fn render() -> Option<String> {
    PROMETHEUS.get()?.as_ref().map(PrometheusHandle::render)
}

/// Metric names.
pub mod names {
    /// Deliveries received (counter; `consumer`, `queue`).
    pub const RECEIVED: &str = "reliable_mq_consumer_received_total";
    /// Handler calls that succeeded (counter; `consumer`, `queue`).
    pub const HANDLED: &str = "reliable_mq_consumer_handled_total";
    /// Deliveries acked as duplicates of a handled message (counter; `consumer`, `queue`).
    pub const DUPLICATES: &str = "reliable_mq_consumer_duplicates_total";
    /// Failed attempts sent to a retry tier (counter; `consumer`, `queue`, `kind`).
    pub const RETRIED: &str = "reliable_mq_consumer_retried_total";
    /// Messages sent to the DLQ (counter; `consumer`, `queue`, `kind`).
    pub const DEAD_LETTERED: &str = "reliable_mq_consumer_dead_lettered_total";
    /// Deliveries put back: claim held elsewhere, or handed back (counter).
    pub const REQUEUED: &str = "reliable_mq_consumer_requeued_total";
    /// Deliveries that could not be decoded, dead-lettered as `decode` (counter).
    pub const DECODE_FAILURES: &str = "reliable_mq_consumer_decode_failures_total";
    /// Handler call duration (histogram, seconds).
    pub const HANDLER_DURATION: &str = "reliable_mq_consumer_handler_duration_seconds";
    /// From the handler's return to the ack (histogram, seconds).
    pub const SETTLE_DURATION: &str = "reliable_mq_consumer_settle_duration_seconds";
    /// Deliveries between receipt and settlement right now (gauge).
    pub const IN_FLIGHT: &str = "reliable_mq_consumer_in_flight";
    /// 1 while the consumer is subscribed, else 0 (gauge).
    pub const ATTACHED: &str = "reliable_mq_consumer_attached";
    /// Dedup store calls that failed at claim time (counter; `consumer`, `queue`).
    pub const DEDUP_ERRORS: &str = "reliable_mq_dedup_errors_total";
    /// Time deliveries spent paused on an unreachable dedup store (counter, milliseconds:
    /// the facade's counters are integers).
    pub const DEDUP_PAUSED: &str = "reliable_mq_dedup_paused_milliseconds_total";
    /// Publishes handed to the broker, each attempt (counter; settle copies included).
    pub const PUBLISHED: &str = "reliable_mq_publisher_published_total";
    /// Publishes the broker confirmed (counter).
    pub const CONFIRMED: &str = "reliable_mq_publisher_confirmed_total";
    /// Publishes the broker nacked (counter).
    pub const NACKED: &str = "reliable_mq_publisher_nacked_total";
    /// Publishes returned unroutable (counter).
    pub const RETURNED: &str = "reliable_mq_publisher_returned_total";
    /// From handing a publish to the broker to its confirm (histogram, seconds).
    pub const CONFIRM_DURATION: &str = "reliable_mq_publisher_confirm_duration_seconds";
    /// Outbox rows the relay published, confirmed and marked sent (counter).
    pub const OUTBOX_PUBLISHED: &str = "reliable_mq_outbox_published_total";
    /// Outbox rows the relay marked failed (counter; `kind`: `unroutable`, `refused`,
    /// `nacked`, `too_large`, `invalid`).
    pub const OUTBOX_FAILED: &str = "reliable_mq_outbox_failed_total";
    /// Outbox rows left pending for a later try: no confirm, connection trouble (counter).
    pub const OUTBOX_DEFERRED: &str = "reliable_mq_outbox_deferred_total";
    /// One relay batch: take, publish, confirms, mark, commit (histogram, seconds).
    pub const OUTBOX_BATCH_DURATION: &str = "reliable_mq_outbox_batch_duration_seconds";
    /// Pending outbox rows, as the relay last counted them (gauge).
    pub const OUTBOX_PENDING: &str = "reliable_mq_outbox_pending";
    /// Failed outbox rows in the table, as the relay last counted them (gauge).
    pub const OUTBOX_FAILED_ROWS: &str = "reliable_mq_outbox_failed_rows";
    /// Age of the oldest pending outbox row, as the relay last looked (gauge, seconds).
    pub const OUTBOX_OLDEST_PENDING: &str = "reliable_mq_outbox_oldest_pending_seconds";
    /// Outbox relays running in this process (gauge).
    pub const OUTBOX_RELAYS: &str = "reliable_mq_outbox_relays_running";
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_counter!(RECEIVED, Unit::Count, "Deliveries received");
    describe_counter!(HANDLED, Unit::Count, "Handler calls that succeeded");
    describe_counter!(DUPLICATES, Unit::Count, "Duplicates acked without a call");
    describe_counter!(RETRIED, Unit::Count, "Failed attempts sent to a retry tier");
    describe_counter!(DEAD_LETTERED, Unit::Count, "Messages sent to the DLQ");
    describe_counter!(REQUEUED, Unit::Count, "Deliveries put back (claim held)");
    describe_counter!(DECODE_FAILURES, Unit::Count, "Undecodable deliveries");
    describe_histogram!(HANDLER_DURATION, Unit::Seconds, "Handler call duration");
    describe_histogram!(SETTLE_DURATION, Unit::Seconds, "Handler return to ack");
    describe_gauge!(IN_FLIGHT, Unit::Count, "Deliveries being processed");
    describe_gauge!(ATTACHED, Unit::Count, "1 while subscribed");
    describe_counter!(DEDUP_ERRORS, Unit::Count, "Dedup store errors at claim");
    describe_counter!(
        DEDUP_PAUSED,
        Unit::Milliseconds,
        "Time paused on the dedup store"
    );
    describe_counter!(PUBLISHED, Unit::Count, "Publishes sent (attempts)");
    describe_counter!(CONFIRMED, Unit::Count, "Publishes confirmed");
    describe_counter!(NACKED, Unit::Count, "Publishes nacked");
    describe_counter!(RETURNED, Unit::Count, "Publishes returned unroutable");
    describe_histogram!(CONFIRM_DURATION, Unit::Seconds, "Publish to confirm");
    #[cfg(feature = "postgres")]
    {
        describe_counter!(OUTBOX_PUBLISHED, Unit::Count, "Outbox rows published");
        describe_counter!(OUTBOX_FAILED, Unit::Count, "Outbox rows marked failed");
        describe_counter!(OUTBOX_DEFERRED, Unit::Count, "Outbox rows left for later");
        describe_histogram!(OUTBOX_BATCH_DURATION, Unit::Seconds, "One relay batch");
        describe_gauge!(OUTBOX_PENDING, Unit::Count, "Pending outbox rows");
        describe_gauge!(OUTBOX_FAILED_ROWS, Unit::Count, "Failed outbox rows");
        describe_gauge!(
            OUTBOX_OLDEST_PENDING,
            Unit::Seconds,
            "Age of the oldest pending outbox row"
        );
        describe_gauge!(OUTBOX_RELAYS, Unit::Count, "Outbox relays running");
    }
}

/// The metrics of one consumer: handles registered once, so recording is an atomic
/// operation.
pub(crate) struct ConsumerMetrics {
    consumer: String,
    queue: String,
    received: Counter,
    handled: Counter,
    duplicates: Counter,
    requeued: Counter,
    decode_failures: Counter,
    dedup_errors: Counter,
    dedup_paused: Counter,
    handler_duration: Histogram,
    settle_duration: Histogram,
    in_flight: Gauge,
    attached: Gauge,
}

impl std::fmt::Debug for ConsumerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerMetrics")
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

/// Records nothing (counters built without a consumer, in unit tests).
impl Default for ConsumerMetrics {
    fn default() -> Self {
        Self {
            consumer: String::new(),
            queue: String::new(),
            received: Counter::noop(),
            handled: Counter::noop(),
            duplicates: Counter::noop(),
            requeued: Counter::noop(),
            decode_failures: Counter::noop(),
            dedup_errors: Counter::noop(),
            dedup_paused: Counter::noop(),
            handler_duration: Histogram::noop(),
            settle_duration: Histogram::noop(),
            in_flight: Gauge::noop(),
            attached: Gauge::noop(),
        }
    }
}

/// A moment to measure a duration from.
pub(crate) struct Timer(Instant);

/// Decrements the in-flight gauge when dropped (settled, or its task aborted).
pub(crate) struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Adds the time paused to the dedup-paused counter when dropped (whichever way the
/// pause ends).
pub(crate) struct Paused(Counter, Instant);

impl Drop for Paused {
    fn drop(&mut self) {
        // Whole milliseconds, as seconds would lose every pause under one.
        let ms = u64::try_from(self.1.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.increment(ms);
    }
}

impl ConsumerMetrics {
    pub(crate) fn new(consumer: &str, queue: &str) -> Self {
        let labels = [
            ("consumer", consumer.to_owned()),
            ("queue", queue.to_owned()),
        ];
        use names::*;
        Self {
            consumer: consumer.to_owned(),
            queue: queue.to_owned(),
            received: metrics::counter!(RECEIVED, &labels),
            handled: metrics::counter!(HANDLED, &labels),
            duplicates: metrics::counter!(DUPLICATES, &labels),
            requeued: metrics::counter!(REQUEUED, &labels),
            decode_failures: metrics::counter!(DECODE_FAILURES, &labels),
            dedup_errors: metrics::counter!(DEDUP_ERRORS, &labels),
            dedup_paused: metrics::counter!(DEDUP_PAUSED, &labels),
            handler_duration: metrics::histogram!(HANDLER_DURATION, &labels),
            settle_duration: metrics::histogram!(SETTLE_DURATION, &labels),
            in_flight: metrics::gauge!(IN_FLIGHT, &labels),
            attached: metrics::gauge!(ATTACHED, &labels),
        }
    }

    pub(crate) fn received(&self) {
        self.received.increment(1);
    }
    pub(crate) fn handled(&self) {
        self.handled.increment(1);
    }
    pub(crate) fn duplicate(&self) {
        self.duplicates.increment(1);
    }
    pub(crate) fn requeued(&self) {
        self.requeued.increment(1);
    }
    pub(crate) fn dedup_error(&self) {
        self.dedup_errors.increment(1);
    }

    /// Failures are rare next to deliveries: the kind's handle is looked up each time.
    pub(crate) fn retried(&self, kind: &str) {
        self.by_kind(names::RETRIED, kind).increment(1);
    }

    pub(crate) fn dead_lettered(&self, kind: &str) {
        self.by_kind(names::DEAD_LETTERED, kind).increment(1);
        if kind == crate::FailureKind::Decode.as_str() {
            self.decode_failures.increment(1);
        }
    }

    fn by_kind(&self, name: &'static str, kind: &str) -> Counter {
        let labels = [
            ("consumer", self.consumer.clone()),
            ("queue", self.queue.clone()),
            ("kind", kind.to_owned()),
        ];
        metrics::counter!(name, &labels)
    }

    pub(crate) fn attached(&self, attached: bool) {
        self.attached.set(if attached { 1.0 } else { 0.0 });
    }

    pub(crate) fn timer(&self) -> Timer {
        Timer(Instant::now())
    }
    pub(crate) fn handler_took(&self, t: Timer) {
        self.handler_duration.record(t.0.elapsed());
    }
    pub(crate) fn settled(&self, t: Timer) {
        self.settle_duration.record(t.0.elapsed());
    }

    pub(crate) fn in_flight(&self) -> InFlight {
        self.in_flight.increment(1.0);
        InFlight(self.in_flight.clone())
    }

    pub(crate) fn paused(&self) -> Paused {
        Paused(self.dedup_paused.clone(), Instant::now())
    }
}

/// The publisher's metrics (one publisher per app, and few of them: no labels).
pub(crate) mod publisher {
    use super::{Timer, names};
    use std::time::Instant;

    /// One publish handed to the broker; the timer runs to its confirm.
    pub(crate) fn published() -> Timer {
        metrics::counter!(names::PUBLISHED).increment(1);
        Timer(Instant::now())
    }
    pub(crate) fn confirmed(t: Timer) {
        metrics::counter!(names::CONFIRMED).increment(1);
        metrics::histogram!(names::CONFIRM_DURATION).record(t.0.elapsed());
    }
    pub(crate) fn nacked() {
        metrics::counter!(names::NACKED).increment(1);
    }
    pub(crate) fn returned() {
        metrics::counter!(names::RETURNED).increment(1);
    }
}

/// The outbox relay's metrics (no labels but the failure kind: the outbox is one table).
#[cfg(feature = "postgres")]
pub(crate) mod outbox {
    use super::{Timer, names};
    use std::time::Instant;

    pub(crate) fn batch_started() -> Timer {
        Timer(Instant::now())
    }
    // Each series is labelled with the relay's `database` (`host:port/database/schema`):
    // relays of two outbox tables in one process would otherwise overwrite each other's
    // gauges. A
    // label per batch costs an allocation per batch, not per message.

    /// A batch committed: its rows are marked as counted here.
    pub(crate) fn batch_done(database: &str, t: Timer, sent: usize, deferred: usize) {
        let database = database.to_owned();
        metrics::histogram!(names::OUTBOX_BATCH_DURATION, "database" => database.clone())
            .record(t.0.elapsed());
        metrics::counter!(names::OUTBOX_PUBLISHED, "database" => database.clone())
            .increment(sent as u64);
        metrics::counter!(names::OUTBOX_DEFERRED, "database" => database)
            .increment(deferred as u64);
    }
    pub(crate) fn failed(database: &str, kind: &'static str) {
        metrics::counter!(
            names::OUTBOX_FAILED,
            "database" => database.to_owned(),
            "kind" => kind
        )
        .increment(1);
    }
    pub(crate) fn rows(database: &str, pending: i64, failed: i64, oldest_pending_seconds: f64) {
        let database = database.to_owned();
        metrics::gauge!(names::OUTBOX_PENDING, "database" => database.clone()).set(pending as f64);
        metrics::gauge!(names::OUTBOX_FAILED_ROWS, "database" => database.clone())
            .set(failed as f64);
        metrics::gauge!(names::OUTBOX_OLDEST_PENDING, "database" => database)
            .set(oldest_pending_seconds);
    }
    /// Set from a process-wide count rather than incremented: a relay started before the
    /// recorder was installed must not leave the gauge at -1 when it stops.
    pub(crate) fn relay_running(running: bool) {
        use std::sync::atomic::{AtomicI64, Ordering};
        static RUNNING: AtomicI64 = AtomicI64::new(0);
        let now = if running {
            RUNNING.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            RUNNING.fetch_sub(1, Ordering::Relaxed) - 1
        };
        metrics::gauge!(names::OUTBOX_RELAYS).set(now as f64);
    }
}
