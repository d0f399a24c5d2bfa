//! W3C trace context through message headers, and the spans of deliveries (feature `otel`).
//!
//! The publisher writes `traceparent`, `tracestate` and `baggage` from its publish span's
//! OpenTelemetry context (taken through `tracing-opentelemetry`, so the application's
//! `tracing` spans are the parents). A consumer reads them back and makes the delivery's
//! `process` span a *child* of the producer's span, not a link: one message is processed
//! per span, so the request that published it and everything its handler does (retries,
//! dead letters, messages it publishes) are one trace. Retry, requeue-tier and
//! dead-letter copies carry the original's headers unchanged (they are never injected
//! again), so a dead letter leads back to the request that produced it.
//!
//! The `process` span is made with the OpenTelemetry API, through the global tracer
//! provider, not as a `tracing` span: the sampler decides before anything else is built,
//! so a delivery that is not sampled costs an id and a context, and one that is costs one
//! SDK span. Through `tracing-opentelemetry` every delivery cost a registry slot, a span
//! builder and its attributes as strings before the sampler was asked, and a context
//! switch on each poll: about a third more instructions per message with every delivery
//! traced, and still a quarter more at 1% sampled (BENCHMARKS.md, "otel and metrics").
//! Its context is the current OpenTelemetry context while the delivery's task runs, so the
//! handler's own `tracing` spans (through `tracing-opentelemetry`, which parents a span
//! with no `tracing` parent on the current OpenTelemetry context), spans made with the
//! OpenTelemetry API and the messages it publishes are its children.
//!
//! The W3C propagators are used whatever the global OpenTelemetry propagator is: the
//! header format is part of the wire contract between services, not a local choice.
//!
//! Span names and attributes follow OpenTelemetry's messaging semantic conventions:
//! `publish {exchange}` (producer), `process {queue}` (consumer), `settle {queue}`.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Mutex;

use futures_util::future::Either;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use opentelemetry::context::{FutureExt as _, WithContext};
use opentelemetry::global::BoxedTracer;
use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::Delivery;
use crate::failure::header_str;

/// Built once: two boxed propagators per message would be two allocations for nothing.
fn propagator() -> &'static TextMapCompositePropagator {
    static PROPAGATOR: std::sync::LazyLock<TextMapCompositePropagator> =
        std::sync::LazyLock::new(|| {
            TextMapCompositePropagator::new(vec![
                Box::new(TraceContextPropagator::new()),
                Box::new(BaggagePropagator::new()),
            ])
        });
    &PROPAGATOR
}

/// RabbitMQ's name for the default exchange, which has the empty name on the wire.
fn exchange_name(exchange: &str) -> &str {
    if exchange.is_empty() {
        "amq.default"
    } else {
        exchange
    }
}

/// The span of one publish (a producer span).
pub(crate) fn publish_span(exchange: &str, routing_key: &str, message_id: &str) -> tracing::Span {
    let destination = exchange_name(exchange);
    // The publisher's target, so that filters on `reliable_mq::publisher` keep the span
    // (and its message_id) around the publisher's own log lines, as without `otel`.
    tracing::info_span!(
        target: "reliable_mq::publisher",
        "publish",
        otel.name = %format_args!("publish {destination}"),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = destination,
        messaging.rabbitmq.destination.routing_key = routing_key,
        messaging.message.id = message_id,
        exchange,
        routing_key,
        message_id = %message_id,
        outcome = tracing::field::Empty,
        retries = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// Write the trace context of `span` into the headers of `properties`: the publish span's
/// through `tracing-opentelemetry`, or, without its layer, the current OpenTelemetry
/// context (inside a delivery, its `process` span). With neither nothing is written:
/// headers already there (a replayed message's) stay as they are.
pub(crate) fn inject(span: &tracing::Span, properties: BasicProperties) -> BasicProperties {
    let mut cx = span.context();
    if !cx.span().span_context().is_valid() {
        cx = Context::current();
        if !cx.span().span_context().is_valid() {
            return properties;
        }
    }
    let mut headers = properties.headers().clone().unwrap_or_default();
    propagator().inject_context(&cx, &mut HeaderInjector(&mut headers));
    properties.with_headers(headers)
}

/// What one consumer keeps to make the spans of its deliveries; made when the app starts.
pub(crate) struct ProcessSpans {
    /// From the global tracer provider as it is when the app starts; `None` when that is
    /// the no-op provider: then no span is made, and a delivery only passes the context in
    /// its headers on to its handler.
    tracer: Option<BoxedTracer>,
    /// `process {queue}`.
    name: &'static str,
    /// The queue's name, the routing key of every message published to it directly.
    queue: &'static str,
    /// The attributes every delivery of this consumer has, made once.
    fixed: [KeyValue; 3],
    /// The level of the `delivery` span that carries the delivery's fields on log lines:
    /// INFO as without `otel`, DEBUG when `tracing-opentelemetry`'s layer would see it (it
    /// would make a second exported span of it, and the `process` span has its fields).
    log_level: tracing::Level,
}

/// How the application set tracing up, asked once when the app starts (each answer is a
/// probe span) and shared by its consumers.
pub(crate) struct TracingSetup {
    /// `tracing-opentelemetry`'s layer is installed.
    otel_layer: bool,
    /// The global tracer provider is the no-op one.
    noop_provider: bool,
    /// The level of the deliveries' `delivery` log spans (see [`ProcessSpans`]).
    log_level: tracing::Level,
}

impl TracingSetup {
    pub(crate) fn probe() -> Self {
        Self {
            otel_layer: otel_layer_installed(),
            noop_provider: global_tracer_is_noop(),
            log_level: if otel_layer_sees_delivery_spans() {
                tracing::Level::DEBUG
            } else {
                tracing::Level::INFO
            },
        }
    }

    /// A start-up warning when `tracing-opentelemetry`'s layer is installed but the
    /// global tracer provider is not: the layer records the application's spans and the
    /// publish spans, but the process spans come from the global provider, so they would
    /// be missing (handlers' spans still join the producer's trace: the delivery's context
    /// then carries the producer's span).
    pub(crate) fn missing_tracer_provider(&self) -> Option<&'static str> {
        (self.otel_layer && self.noop_provider).then_some(
            "feature `otel`: tracing-opentelemetry's layer is installed but no global tracer \
             provider is set, so the `process` spans of deliveries are not recorded: call \
             opentelemetry::global::set_tracer_provider with your provider before starting the app",
        )
    }
}

impl ProcessSpans {
    pub(crate) fn new(queue: &str, setup: &TracingSetup) -> Self {
        let scope = InstrumentationScope::builder("reliable-mq")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        // A `&'static str`: its attribute values are cloned without touching a counter.
        let queue = interned(queue.to_owned());
        Self {
            tracer: (!setup.noop_provider)
                .then(|| opentelemetry::global::tracer_provider().tracer_with_scope(scope)),
            name: interned(format!("process {queue}")),
            queue,
            fixed: [
                KeyValue::new("messaging.system", "rabbitmq"),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.destination.subscription.name", queue),
            ],
            log_level: setup.log_level,
        }
    }

    /// The spans of one delivery: its `process {queue}` span, a child of the span that
    /// published it when its headers carry a trace context, and its `delivery` log span.
    pub(crate) fn delivery_span(&self, delivery: &Delivery) -> DeliverySpan {
        // Only the headers make the parent, not whatever context the consumer's own task
        // runs in.
        let parent = match delivery.headers() {
            Some(headers) => {
                propagator().extract_with_context(&Context::new(), &HeaderExtractor(headers))
            }
            None => Context::new(),
        };
        let cx = match &self.tracer {
            Some(tracer) => Some(parent.with_span(self.process_span(tracer, &parent, delivery))),
            // No span to make: the producer's context, if any, is the handler's.
            None => parent.span().span_context().is_valid().then_some(parent),
        };
        let log = if self.log_level == tracing::Level::DEBUG {
            // Made inside the process span's context, so that, when it is on, the layer
            // makes it a child of the process span.
            let _inside = cx.as_ref().map(|cx| cx.clone().attach());
            super::delivery_log_span!(tracing::Level::DEBUG, delivery)
        } else {
            super::delivery_log_span!(tracing::Level::INFO, delivery)
        };
        DeliverySpan { cx, log }
    }

    /// The `process {queue}` span of `delivery`, a child of `parent`.
    fn process_span(
        &self,
        tracer: &BoxedTracer,
        parent: &Context,
        delivery: &Delivery,
    ) -> opentelemetry::global::BoxedSpan {
        // The sampler sees the name and the kind, not the attributes: a span it drops
        // then costs no attribute vector to fill and free (OpenTelemetry's samplers and
        // the common ratio and parent-based ones decide on the trace id and the parent).
        let builder = tracer.span_builder(self.name).with_kind(SpanKind::Consumer);
        let mut span = tracer.build_with_context(builder, parent);
        if span.is_recording() {
            span.set_attributes(self.fixed.iter().cloned());
            // Without an allocation where the value is known: the default exchange, and
            // the queue's own name as the routing key (a message sent to it directly).
            let exchange = match delivery.exchange() {
                "" => opentelemetry::Value::from("amq.default"),
                other => opentelemetry::Value::from(other.to_owned()),
            };
            span.set_attribute(KeyValue::new("messaging.destination.name", exchange));
            let routing_key = match delivery.routing_key() {
                key if key == self.queue => opentelemetry::Value::from(self.queue),
                other => opentelemetry::Value::from(other.to_owned()),
            };
            span.set_attribute(KeyValue::new(
                "messaging.rabbitmq.destination.routing_key",
                routing_key,
            ));
            if let Some(id) = delivery.message_id() {
                span.set_attribute(KeyValue::new("messaging.message.id", id.to_owned()));
            }
            span.set_attribute(KeyValue::new("redelivered", delivery.redelivered()));
            span.set_attribute(KeyValue::new("attempt", i64::from(delivery.attempt())));
        }
        span
    }
}

/// The spans one delivery's task runs in.
pub(crate) struct DeliverySpan {
    /// The context of the `process {queue}` span (or, with no tracer provider, the
    /// producer's); `None`: nothing to carry.
    cx: Option<Context>,
    /// The `delivery` span with the delivery's fields for log lines.
    log: tracing::Span,
}

impl DeliverySpan {
    /// Run `work` (the delivery's task) in these spans. The process span ends when the
    /// task is dropped, right after it completes (the context holds the span's last
    /// reference, unless the handler kept the context for work that outlives it).
    pub(crate) fn instrument<F: Future>(
        self,
        work: F,
    ) -> tracing::instrument::Instrumented<Either<WithContext<F>, F>> {
        // The process span's context innermost, so that it is the current context
        // wherever the task is (`record_error` finds it there).
        match self.cx {
            Some(cx) => Either::Left(work.with_context(cx)),
            None => Either::Right(work),
        }
        .instrument(self.log)
    }
}

/// Whether `tracing-opentelemetry`'s layer sees an INFO `delivery` span: one is made and
/// given a parent whose telemetry is suppressed, so that the layer records nothing of it.
fn otel_layer_sees_delivery_spans() -> bool {
    let probe = tracing::info_span!("delivery");
    !probe.is_disabled()
        && probe
            .set_parent(Context::new().with_telemetry_suppressed())
            .is_ok()
}

/// A `&'static str` for `name`, made once per distinct name: the OpenTelemetry span
/// builder takes a `Cow<'static, str>`, and an owned name would be one allocation per
/// delivery. Names are the queues of the consumers started and their `process {queue}`,
/// a bounded set.
fn interned(name: String) -> &'static str {
    static NAMES: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let mut names = NAMES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let names = names.get_or_insert_with(HashSet::new);
    if let Some(known) = names.get(name.as_str()) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.insert(leaked);
    leaked
}

/// Mark the current delivery's process span as failed with `kind`.
pub(crate) fn record_error(kind: &'static str) {
    Context::map_current(|cx| {
        let span = cx.span();
        if span.is_recording() {
            span.set_attribute(KeyValue::new("error.type", kind));
            span.set_status(Status::error(kind));
        }
    });
}

/// Whether the application's `tracing` subscriber has `tracing-opentelemetry`'s layer.
fn otel_layer_installed() -> bool {
    let probe = tracing::error_span!("reliable_mq_probe");
    !matches!(
        probe.set_parent(Context::new().with_telemetry_suppressed()),
        Err(tracing_opentelemetry::SetParentError::LayerNotFound)
            | Err(tracing_opentelemetry::SetParentError::SpanDisabled)
    )
}

/// Whether the global tracer provider is the no-op one. Asked with a parent whose
/// telemetry is suppressed, so that a real provider records and exports nothing: the
/// SDK then answers an empty span, the no-op provider the parent's span.
fn global_tracer_is_noop() -> bool {
    let probe = SpanContext::new(
        TraceId::from(1u128),
        SpanId::from(1u64),
        TraceFlags::default(),
        true,
        TraceState::default(),
    );
    let parent = Context::new()
        .with_remote_span_context(probe)
        .with_telemetry_suppressed();
    let tracer = opentelemetry::global::tracer("reliable-mq");
    let span = tracer.build_with_context(tracer.span_builder("reliable-mq probe"), &parent);
    span.span_context().span_id() == SpanId::from(1u64)
}

/// Run `settle` in a `settle {queue}` span when it publishes a copy (retry, dead letter,
/// requeue tier) or hands the delivery back: the span is the copy's parent and shows
/// where the time went. A plain ack gets no span of its own: it is one frame without a
/// reply, already inside the `process` span, and a span of its own nearly doubled what
/// tracing costs per message (BENCHMARKS.md, "otel and metrics"); the settle duration
/// histogram still times it.
pub(crate) fn settling<F: std::future::Future>(
    settle: F,
    queue: &str,
    outcome: &str,
) -> tracing::instrument::Instrumented<F> {
    if outcome == "ack" {
        return settle.instrument(tracing::Span::none());
    }
    let span = tracing::info_span!(
        "settle",
        otel.name = %format_args!("settle {queue}"),
        messaging.system = "rabbitmq",
        messaging.operation.type = "settle",
        messaging.operation.name = %outcome,
    );
    settle.instrument(span)
}

/// Writes propagated fields as AMQP long-string headers.
struct HeaderInjector<'a>(&'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let Ok(key) = ShortString::try_new(key) {
            self.0
                .insert(key, AMQPValue::LongString(LongString::from(value)));
        }
    }
}

/// Reads propagated fields from AMQP string headers.
struct HeaderExtractor<'a>(&'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        header_str(Some(self.0), key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_written_by_the_injector_is_read_back_by_the_extractor() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex"),
            SpanId::from_hex("00f067aa0ba902b7").expect("hex"),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
        let mut headers = FieldTable::default();
        propagator().inject_context(&cx, &mut HeaderInjector(&mut headers));
        assert_eq!(
            header_str(Some(&headers), "traceparent"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let back = propagator().extract(&HeaderExtractor(&headers));
        assert_eq!(back.span().span_context().trace_id(), sc.trace_id());
        assert_eq!(back.span().span_context().span_id(), sc.span_id());
    }

    /// Spans handed to it, counted.
    #[derive(Debug, Clone, Default)]
    struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl opentelemetry_sdk::trace::SpanExporter for Count {
        async fn export(
            &self,
            batch: Vec<opentelemetry_sdk::trace::SpanData>,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0
                .fetch_add(batch.len(), std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    /// One test for the process-wide state it changes (the global tracer provider).
    #[test]
    fn the_start_up_check_finds_a_layer_without_a_global_provider_and_records_nothing() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let exported = Count::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(exported.clone())
            .build();
        let with_layer = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("check")));
        let without = tracing_subscriber::registry();

        assert!(global_tracer_is_noop(), "nothing set yet");
        tracing::subscriber::with_default(without, || {
            assert!(!otel_layer_installed());
            assert!(!otel_layer_sees_delivery_spans());
            assert_eq!(
                TracingSetup::probe().missing_tracer_provider(),
                None,
                "no layer: nothing to say"
            );
        });
        tracing::subscriber::with_default(with_layer, || {
            assert!(otel_layer_installed());
            assert!(otel_layer_sees_delivery_spans());
            let warning = TracingSetup::probe()
                .missing_tracer_provider()
                .expect("layer without a provider");
            assert!(warning.contains("set_tracer_provider"), "{warning}");
            opentelemetry::global::set_tracer_provider(provider.clone());
            assert!(!global_tracer_is_noop());
            assert_eq!(TracingSetup::probe().missing_tracer_provider(), None);
        });
        provider.force_flush().expect("flush");
        assert_eq!(
            exported.0.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "the probes export nothing"
        );
    }

    #[test]
    fn a_name_is_interned_once() {
        let a = interned("process interned-q".to_owned());
        let b = interned("process interned-q".to_owned());
        assert!(std::ptr::eq(a, b));
        assert_eq!(a, "process interned-q");
    }

    #[test]
    fn a_garbled_traceparent_gives_no_parent() {
        let mut headers = FieldTable::default();
        crate::failure::set_str(&mut headers, "traceparent", "not-a-trace");
        let back = propagator().extract(&HeaderExtractor(&headers));
        assert!(!back.span().span_context().is_valid());
    }
}
