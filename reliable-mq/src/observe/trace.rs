//! W3C trace context through message headers (feature `otel`).
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
//! The W3C propagators are used whatever the global OpenTelemetry propagator is: the
//! header format is part of the wire contract between services, not a local choice.
//!
//! Span names and attributes follow OpenTelemetry's messaging semantic conventions:
//! `publish {exchange}` (producer), `process {queue}` (consumer), `settle {queue}`.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
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

/// Write the trace context of `span` into the headers of `properties`. Without an
/// OpenTelemetry layer (or with the span filtered out) the context is empty and nothing
/// is written: headers already there (a replayed message's) stay as they are.
pub(crate) fn inject(span: &tracing::Span, properties: BasicProperties) -> BasicProperties {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return properties;
    }
    let mut headers = properties.headers().clone().unwrap_or_default();
    propagator().inject_context(&cx, &mut HeaderInjector(&mut headers));
    properties.with_headers(headers)
}

/// The name of the `process` spans of a consumer of `queue` (made once per consumer: a
/// name formatted per delivery went through the formatting machinery every time).
pub(crate) fn process_span_name(queue: &str) -> Box<str> {
    format!("process {queue}").into()
}

/// The span of one delivery (a consumer span) named `name` (see [`process_span_name`]), a
/// child of the span that published it when its headers carry a trace context.
pub(crate) fn delivery_span(delivery: &Delivery, name: &str) -> tracing::Span {
    let queue = delivery.queue();
    let span = tracing::info_span!(
        "delivery",
        otel.name = name,
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.destination.name = exchange_name(delivery.exchange()),
        messaging.destination.subscription.name = queue,
        messaging.rabbitmq.destination.routing_key = delivery.routing_key(),
        messaging.message.id = delivery.message_id().unwrap_or(""),
        // Not also `queue`, `message_id` and `delivery_tag` as without `otel`: every
        // field is an attribute to record and export on every delivery, and the two
        // first would repeat the ones above (BENCHMARKS.md, "otel and metrics").
        redelivered = delivery.redelivered(),
        // As i64: the OpenTelemetry layer records an unsigned integer through `Debug`
        // (a formatted string, allocated on every delivery).
        attempt = i64::from(delivery.attempt()),
        error.type = tracing::field::Empty,
    );
    if let Some(headers) = delivery.headers() {
        let parent = propagator().extract(&HeaderExtractor(headers));
        if parent.span().span_context().is_valid() {
            // Fails only without an OpenTelemetry layer or for a filtered-out span: then
            // there is no span to parent.
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// Mark the current span (the delivery's) as failed with `kind`.
pub(crate) fn record_error(kind: &str) {
    tracing::Span::current().record("error.type", kind);
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
    use tracing::Instrument;
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

    #[test]
    fn a_garbled_traceparent_gives_no_parent() {
        let mut headers = FieldTable::default();
        crate::failure::set_str(&mut headers, "traceparent", "not-a-trace");
        let back = propagator().extract(&HeaderExtractor(&headers));
        assert!(!back.span().span_context().is_valid());
    }
}
