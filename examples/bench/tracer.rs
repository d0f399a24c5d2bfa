//! `--tracer otel`: the tracing set-up of a service that exports traces, so that the
//! `otel` feature's cost is measured with its spans really recorded, not filtered out.
//!
//! A `tracing` registry with `tracing-opentelemetry`'s layer over an SDK tracer provider
//! with a batch span processor, spans of `reliable_mq` at INFO, the default sampler
//! (parent-based, always on: the bench's messages carry no trace context, so every
//! delivery is a sampled root). The exporter drops each batch: a real one would serialize
//! and send it from the processor's own thread, which is the exporter's cost, not
//! reliable-mq's.

/// Install the subscriber `tracer` names: `none` (nothing), `otel` (every root span
/// sampled), `otel-1pct` (1% of root spans sampled, parent-based: a common production
/// set-up); with `-lean`, the layer records no code location, thread or busy/idle
/// timings (`docs/observability.md`, "Cost").
pub fn install(tracer: &str) -> Result<(), String> {
    match tracer {
        "none" => Ok(()),
        #[cfg(feature = "observe")]
        "otel" => otel::install(1.0, false),
        #[cfg(feature = "observe")]
        "otel-1pct" => otel::install(0.01, false),
        #[cfg(feature = "observe")]
        "otel-lean" => otel::install(1.0, true),
        #[cfg(feature = "observe")]
        "otel-lean-1pct" => otel::install(0.01, true),
        #[cfg(not(feature = "observe"))]
        "otel" | "otel-1pct" | "otel-lean" | "otel-lean-1pct" => {
            Err("--tracer otel needs the examples' feature `observe`".to_owned())
        }
        other => Err(format!(
            "--tracer {other:?}: use none, otel, otel-1pct, otel-lean or otel-lean-1pct"
        )),
    }
}

#[cfg(feature = "observe")]
mod otel {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
    use tracing_subscriber::layer::SubscriberExt;

    /// Drops every batch (see the module's docs).
    #[derive(Debug)]
    struct Discard;

    impl SpanExporter for Discard {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            drop(batch);
            Ok(())
        }
    }

    /// `ratio`: the share of root spans sampled (children follow their parent). `lean`:
    /// no code location, thread or busy/idle timings on each span.
    pub fn install(ratio: f64, lean: bool) -> Result<(), String> {
        let sampler = if ratio >= 1.0 {
            Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
        } else {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
        };
        let provider = SdkTracerProvider::builder()
            .with_sampler(sampler)
            .with_batch_exporter(Discard)
            .build();
        // The process spans come from the global provider, the others through the
        // layer: a traced service sets both.
        opentelemetry::global::set_tracer_provider(provider.clone());
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("bench"))
            .with_location(!lean)
            .with_threads(!lean)
            .with_tracked_inactivity(!lean);
        let filter = tracing_subscriber::filter::Targets::new()
            .with_target("reliable_mq", tracing::Level::INFO);
        let subscriber = tracing_subscriber::registry().with(layer).with(filter);
        tracing::subscriber::set_global_default(subscriber).map_err(|e| e.to_string())
    }
}
