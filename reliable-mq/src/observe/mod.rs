//! Observability: trace context through message headers (feature `otel`), metrics
//! (feature `metrics`) and an HTTP endpoint for health and metrics (feature `http`).
//!
//! The pipeline calls the hooks here once per event. With a feature off its hooks are
//! empty inline functions on zero-sized types, so a build without the features carries
//! none of this.

/// The `delivery` span that carries a delivery's fields on log lines, at `$level`.
macro_rules! delivery_log_span {
    ($level:expr, $delivery:expr) => {
        tracing::span!(
            $level,
            "delivery",
            queue = %$delivery.queue(),
            message_id = $delivery.message_id().unwrap_or(""),
            delivery_tag = $delivery.delivery_tag,
            redelivered = $delivery.redelivered(),
            attempt = $delivery.attempt(),
        )
    };
}
use delivery_log_span;

#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "otel")]
pub(crate) mod trace;

#[cfg(all(feature = "metrics", feature = "postgres"))]
pub(crate) use metrics::outbox as outbox_metrics;
#[cfg(feature = "metrics")]
pub(crate) use metrics::{ConsumerMetrics, publisher as publish_metrics};

#[cfg(not(feature = "metrics"))]
pub(crate) use off::{ConsumerMetrics, publish_metrics};

#[cfg(all(not(feature = "metrics"), feature = "postgres"))]
pub(crate) use off::outbox_metrics;
#[cfg(not(feature = "otel"))]
pub(crate) use off::trace;

/// The hooks with their features off: nothing recorded, nothing compiled in.
#[cfg(not(all(feature = "metrics", feature = "otel")))]
mod off {
    /// No metrics: every hook is empty.
    #[cfg(not(feature = "metrics"))]
    #[derive(Debug, Default)]
    pub(crate) struct ConsumerMetrics;

    /// Nothing to time or to drop.
    #[cfg(not(feature = "metrics"))]
    pub(crate) struct Nothing;

    #[cfg(not(feature = "metrics"))]
    impl ConsumerMetrics {
        #[inline(always)]
        pub(crate) fn new(_name: &str, _queue: &str) -> Self {
            Self
        }
        #[inline(always)]
        pub(crate) fn received(&self) {}
        #[inline(always)]
        pub(crate) fn handled(&self) {}
        #[inline(always)]
        pub(crate) fn duplicate(&self) {}
        #[inline(always)]
        pub(crate) fn requeued(&self) {}
        #[inline(always)]
        pub(crate) fn retried(&self, _kind: &str) {}
        #[inline(always)]
        pub(crate) fn dead_lettered(&self, _kind: &str) {}
        #[inline(always)]
        pub(crate) fn attached(&self, _attached: bool) {}
        #[inline(always)]
        pub(crate) fn dedup_error(&self) {}
        #[inline(always)]
        pub(crate) fn timer(&self) -> Nothing {
            Nothing
        }
        #[inline(always)]
        pub(crate) fn handler_took(&self, _t: Nothing) {}
        #[inline(always)]
        pub(crate) fn settled(&self, _t: Nothing) {}
        #[inline(always)]
        pub(crate) fn in_flight(&self) -> Nothing {
            Nothing
        }
        #[inline(always)]
        pub(crate) fn paused(&self) -> Nothing {
            Nothing
        }
    }

    #[cfg(not(feature = "metrics"))]
    pub(crate) mod publish_metrics {
        use super::Nothing;

        #[inline(always)]
        pub(crate) fn published() -> Nothing {
            Nothing
        }
        #[inline(always)]
        pub(crate) fn confirmed(_t: Nothing) {}
        #[inline(always)]
        pub(crate) fn nacked() {}
        #[inline(always)]
        pub(crate) fn returned() {}
    }

    #[cfg(all(not(feature = "metrics"), feature = "postgres"))]
    pub(crate) mod outbox_metrics {
        use super::Nothing;

        #[inline(always)]
        pub(crate) fn batch_started() -> Nothing {
            Nothing
        }
        #[inline(always)]
        pub(crate) fn batch_done(_database: &str, _t: Nothing, _sent: usize, _deferred: usize) {}
        #[inline(always)]
        pub(crate) fn failed(_database: &str, _kind: &'static str) {}
        #[inline(always)]
        pub(crate) fn rows(
            _database: &str,
            _pending: i64,
            _failed: i64,
            _oldest_pending_seconds: f64,
        ) {
        }
        #[inline(always)]
        pub(crate) fn relay_running(_running: bool) {}
    }

    #[cfg(not(feature = "otel"))]
    pub(crate) mod trace {
        use lapin::BasicProperties;

        use crate::Delivery;

        /// The publish span, as without trace propagation.
        #[inline(always)]
        pub(crate) fn publish_span(
            exchange: &str,
            routing_key: &str,
            message_id: &str,
        ) -> tracing::Span {
            tracing::debug_span!(
                "publish",
                exchange,
                routing_key,
                message_id = %message_id,
                outcome = tracing::field::Empty,
                retries = tracing::field::Empty,
            )
        }

        /// What a consumer keeps for the spans of its deliveries: nothing to keep without
        /// trace propagation.
        pub(crate) struct ProcessSpans;

        impl ProcessSpans {
            pub(crate) fn new(_queue: &str, _setup: &TracingSetup) -> Self {
                Self
            }

            /// The per-delivery span, as without trace propagation.
            #[inline(always)]
            pub(crate) fn delivery_span(&self, delivery: &Delivery) -> DeliverySpan {
                DeliverySpan(super::super::delivery_log_span!(
                    tracing::Level::INFO,
                    delivery
                ))
            }
        }

        /// The span one delivery's task runs in.
        pub(crate) struct DeliverySpan(tracing::Span);

        impl DeliverySpan {
            /// Run `work` (the delivery's task) in this span.
            #[inline(always)]
            pub(crate) fn instrument<F: std::future::Future>(
                self,
                work: F,
            ) -> tracing::instrument::Instrumented<F> {
                tracing::Instrument::instrument(work, self.0)
            }
        }

        #[inline(always)]
        pub(crate) fn inject(_span: &tracing::Span, p: BasicProperties) -> BasicProperties {
            p
        }

        #[inline(always)]
        pub(crate) fn record_error(_kind: &'static str) {}

        /// Nothing to ask of the tracing set-up without trace propagation.
        pub(crate) struct TracingSetup;

        impl TracingSetup {
            pub(crate) fn probe() -> Self {
                Self
            }

            /// Nothing to warn about without trace propagation.
            pub(crate) fn missing_tracer_provider(&self) -> Option<&'static str> {
                None
            }
        }

        #[inline(always)]
        pub(crate) fn settling<F>(settle: F, _queue: &str, _outcome: &str) -> F {
            settle
        }
    }
}
