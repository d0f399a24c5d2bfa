//! # reliable-mq
//!
//! Reliable RabbitMQ consumption and publishing. Put `#[consumer(...)]` on a plain async
//! function and call [`run`] in `main`: durable topology, QoS, manual acks after success,
//! delayed retries, dead letters with the reason, deduplication, publisher confirms,
//! reconnection and graceful shutdown are done for you.
//!
//! ```no_run
//! use reliable_mq::{consumer, HandlerError};
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: u64, qty: u32 }
//!
//! #[consumer(queue = "orders", dlx = "orders.dlx", idempotent)]
//! async fn reserve_stock(order: Order) -> Result<(), HandlerError> {
//!     if order.qty == 0 {
//!         return Err(HandlerError::reject("empty order"));
//!     }
//!     Ok(())
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), reliable_mq::Error> {
//!     reliable_mq::run().await
//! }
//! ```
//!
//! The promise: every message that reaches a queue is either handled once and acked, or
//! sits in a dead-letter queue with the reason; nothing is silently dropped.

//! # The API on one page
//!
//! | what you write | items |
//! |---|---|
//! | a consumer | [`consumer`] (the attribute), [`HandlerError`], [`Delivery`], [`State`] |
//! | running it | [`run`], [`run_with`], [`App`], [`RunningApp`], [`Config`], [`Error`], [`ShutdownHandle`], [`ExportFormat`] (the AsyncAPI export) |
//! | watching it | [`Health`], [`ConsumerHealth`], [`StatsSnapshot`] |
//! | publishing | [`Publisher`], [`PublishOptions`], [`PublishError`] |
//! | consumers built by hand | [`ConsumerConfig`], [`ConsumerSpec`], [`handler_fn`], [`delivery_handler_fn`], [`Handler`], [`ExchangeKind`], [`QueueKind`], [`RetryBackoff`] |
//! | dead letters | [`FailureKind`], the [`headers`] module (names, replay helper), the `dlq` module (feature `cli`: list, show, replay, purge) |
//! | your own dedup store | the [`dedup`] module ([`DedupStore`], [`RedisStore`], [`MemoryStore`]) |
//! | lapin's types in this API | [`lapin`] (re-exported, so you never match its version by hand) |
//!
//! Cargo features: `anyhow` (handlers may return `anyhow::Result<()>`), `redis-cluster`
//! (a Redis Cluster dedup store), `testing` (`testing::TestApp`: your consumers on an
//! in-memory broker running the same pipeline; `Delivery::for_test`, for unit tests of
//! handlers), `cli` (the `reliable-mq` binary, `dlq list|show|replay|purge`, and its
//! library module `dlq`), `otel` (W3C trace context through message headers, and a
//! `process {queue}` span per delivery from OpenTelemetry's global tracer provider: set
//! yours there before the app starts), `metrics` (counters, gauges and histograms through
//! the `metrics` facade), `http`
//! (`/health/live`, `/health/ready` and `/metrics`; see `observe`), `schemars` (payload
//! types' JSON Schemas in the AsyncAPI export, below).
//!
//! # Payload schemas in the AsyncAPI export
//!
//! [`App::asyncapi`] (and `RELIABLE_MQ_EXPORT=asyncapi` with [`run`]) names each
//! consumer's payload type. With the `schema` key, `#[consumer(..., schema)]`, it also
//! exports the type's JSON Schema (draft 7, the base of AsyncAPI's Schema Object; nested
//! types go under `components.schemas`). The type derives `schemars::JsonSchema`
//! (schemars 1.x) and reliable-mq needs its `schemars` feature; consumers built by hand
//! use [`ConsumerConfig::with_payload_schema`].
//!
//! Why a key and not "a schema whenever the type has one": a macro cannot see whether a
//! type implements a trait, and the ways around it (autoref specialization in the
//! generated code) fall back silently. A forgotten derive, or one from another schemars
//! major version (a different trait), would then leave the schema out of the export with
//! nobody told, in the CI job that publishes the document. With the key, each of those is a
//! compile error saying which of the two is missing:
//!
#![cfg_attr(not(feature = "schemars"), doc = "```compile_fail,E0277")]
#![cfg_attr(feature = "schemars", doc = "```ignore")]
//! // error[E0277]: `#[consumer(schema)]` needs reliable-mq's `schemars` feature
//! use reliable_mq::{consumer, HandlerError};
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: u64 }
//!
//! #[consumer(queue = "orders", dlx = "orders.dlx", schema)]
//! async fn reserve(order: Order) -> Result<(), HandlerError> {
//!     let _ = order.id;
//!     Ok(())
//! }
//! # fn main() {}
//! ```
//!
//! (With the feature on and no derive: "`#[consumer(schema)]` exports the JSON Schema of
//! `Order`, which does not implement `schemars::JsonSchema`".)
//!
//! # State
//!
//! Handlers take what they need (a database pool, an HTTP client) as `State<T>`
//! parameters after the payload, in any order with `&Delivery`:
//!
//! ```no_run
//! use reliable_mq::{consumer, Delivery, HandlerError, State};
//!
//! #[derive(Clone)]
//! struct Stock { /* a pool */ }
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: u64 }
//!
//! #[consumer(queue = "orders", dlx = "orders.dlx")]
//! async fn reserve(order: Order, d: &Delivery, State(stock): State<Stock>) -> Result<(), HandlerError> {
//!     let _ = (order.id, d.attempt(), stock);
//!     Ok(())
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), reliable_mq::Error> {
//!     reliable_mq::run_with(Stock {}).await
//! }
//! ```
//!
//! Several state types are registered once each with [`App::with_state`]. A consumer whose
//! state type is not registered stops start-up with [`Error::MissingState`], naming the
//! consumer and the type.

mod app;
mod asyncapi;
mod config;
mod connection;
mod consumer;
pub mod dedup;
mod delivery;
#[cfg(feature = "cli")]
pub mod dlq;
mod error;
mod failure;
mod handler;
#[cfg(any(feature = "otel", feature = "metrics"))]
pub mod observe;
#[cfg(not(any(feature = "otel", feature = "metrics")))]
mod observe;
#[cfg(feature = "postgres")]
pub mod postgres;
mod publisher;
mod retry;
mod shutdown;
mod spec;
mod state;
#[cfg(feature = "testing")]
pub mod testing;
mod topology;
mod transport;

pub use app::{App, ConsumerHealth, ExportFormat, Health, RunningApp, run, run_with};
pub use config::Config;
pub use consumer::StatsSnapshot;
pub use dedup::{DedupStore, MemoryStore, RedisStore};
pub use delivery::Delivery;
pub use error::{Error, HandlerError};
pub use failure::FailureKind;
pub use handler::{Handler, delivery_handler_fn, handler_fn};
pub use lapin;
pub use publisher::{PublishError, PublishOptions, Publisher};
pub use reliable_mq_macros::consumer;
pub use shutdown::ShutdownHandle;
pub use spec::{ConsumerConfig, ConsumerSpec, ExchangeKind, QueueKind, RetryBackoff};
pub use state::State;

/// The headers a retry or dead-letter copy carries, and helpers to read and edit them
/// (for DLQ tools and replays). See `docs/error-handling.md` for what each one means.
pub mod headers {
    pub use crate::failure::header::*;
    pub use crate::failure::{
        FAILURE_RECORD_HEADERS, MAX_MESSAGE_BYTES, header_int, header_str, is_broker_death_header,
        set_int, set_str, strip_failure_headers,
    };
}

/// Support for code generated by `#[consumer]`, and seams for this crate's own tests and
/// benchmarks. Not a public API: may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::HandlerError;
    pub use crate::asyncapi::{PayloadSchema, payload_schema};
    pub use crate::delivery::Delivery;
    pub use crate::handler::{
        Handler, HandlerFuture, IntoHandlerError, IntoHandlerResult, Payload, decode,
    };
    #[cfg(feature = "postgres")]
    pub use crate::postgres::{InboxTx, PgPool};
    pub use crate::spec::{CONSUMERS, ConsumerSpec, Setting, defaults};
    pub use crate::state::{StateType, extract_state};
    pub use linkme;
    pub use serde_json::Value as JsonValue;
    pub use std::boxed::Box;
    pub use std::sync::Arc;
    pub use std::vec;
    pub use std::vec::Vec;

    /// The settings of a `#[consumer]` as the runtime reads them (UI tests check what
    /// the macro emitted).
    pub fn model(spec: &ConsumerSpec) -> reliable_mq_model::ConsumerModel {
        crate::ConsumerConfig::from(spec).model
    }

    /// What the runtime's start-up check says of a spec (against RabbitMQ's default
    /// `consumer_timeout`): the rule-agreement test compares it with the macro's verdict.
    pub fn problems(spec: &ConsumerSpec) -> Vec<String> {
        crate::ConsumerConfig::from(spec).problems(defaults::BROKER_CONSUMER_TIMEOUT)
    }

    /// Every `#[consumer]` linked into the binary.
    pub fn registered() -> impl Iterator<Item = &'static ConsumerSpec> {
        crate::spec::registered()
    }

    /// The claim lease of a handler timeout (the dedup key is `dedup::KeyScope::key`).
    pub use crate::dedup::lease_for;
    #[cfg(all(feature = "testing", feature = "postgres"))]
    pub use crate::postgres::seams as inbox_seams;
    #[cfg(feature = "testing")]
    pub use crate::retry::crash_seam;

    /// Declare what `consumer` declares on `connection` (benchmarks compare raw lapin on
    /// queues of the same shape).
    pub async fn declare_topology(
        consumer: &crate::ConsumerConfig,
        connection: &lapin::Connection,
    ) -> Result<(), crate::Error> {
        crate::topology::Topology::of(consumer)
            .declare(connection)
            .await
    }

    /// Every queue `consumer` declares (work queue, DLQ, tiers) and its DLX, for clean-up.
    pub fn declared_names(consumer: &crate::ConsumerConfig) -> (Vec<String>, String) {
        let t = crate::topology::Topology::of(consumer);
        let mut queues = vec![t.queue.clone(), t.dlq.clone()];
        queues.extend(t.wait_queues().into_iter().map(|(n, _)| n));
        (queues, t.dlx)
    }
}
