//! What a consumer is: the static description the `#[consumer]` macro emits, the owned
//! form the runtime works with, and the registry that collects every annotated function.
//!
//! The macro validates everything it can at compile time; `topology::validate`
//! repeats the same rules at start-up for consumers built by hand (tests, dynamic names).

use std::sync::Arc;
use std::time::Duration;

use crate::handler::Handler;

/// Kind of exchange a consumer's queue is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    /// Exact routing-key match.
    Direct,
    /// Pattern routing keys (`order.*`, `#`). The default.
    Topic,
    /// Every bound queue gets every message; routing keys are ignored.
    Fanout,
    /// Match on message headers.
    Headers,
}

impl ExchangeKind {
    /// The AMQP name of the exchange type.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Topic => "topic",
            Self::Fanout => "fanout",
            Self::Headers => "headers",
        }
    }
}

/// Kind of queue declared for a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueKind {
    /// Classic queue (the default).
    Classic,
    /// Replicated quorum queue; gets an `x-delivery-limit` safety net.
    Quorum,
}

impl QueueKind {
    /// The value of the `x-queue-type` argument.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// How the delay grows between retry attempts.
///
/// Attribute syntax: `retry_backoff = "fixed"`, `"exponential"` (factor 2) or
/// `"exponential:3"` (any factor from 2 to 10). Every delay is capped at
/// [`RetryBackoff::MAX_DELAY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryBackoff {
    /// Every retry waits `retry_delay`.
    Fixed,
    /// Retry `n` (1-based) waits `retry_delay * factor^(n-1)`, capped.
    Exponential {
        /// Growth factor between consecutive delays.
        factor: u32,
    },
}

impl RetryBackoff {
    /// No retry ever waits longer than this (one hour), whatever the factor.
    pub const MAX_DELAY: Duration = Duration::from_secs(3600);

    /// The delay before retry number `retry` (1-based), capped at [`Self::MAX_DELAY`].
    pub fn delay(self, base: Duration, retry: u32) -> Duration {
        let delay = match self {
            Self::Fixed => base,
            Self::Exponential { factor } => {
                let power = factor.saturating_pow(retry.saturating_sub(1));
                base.saturating_mul(power)
            }
        };
        delay.min(Self::MAX_DELAY)
    }
}

/// A consumer as written in `#[consumer(...)]`: static, checked at compile time.
///
/// The macro defines, next to the function, a type with the function's name whose
/// `SPEC` constant is this value. Pass it to [`crate::App::consumer`], or rely on
/// [`crate::run`] which picks up every annotated function in the binary.
#[derive(Clone, Copy)]
pub struct ConsumerSpec {
    /// Path of the annotated function, for logs (`module::function`).
    pub name: &'static str,
    /// Durable queue consumed from.
    pub queue: &'static str,
    /// Exchange the queue is bound to; `None` means the default exchange.
    pub exchange: Option<&'static str>,
    /// Type of `exchange`.
    pub exchange_type: ExchangeKind,
    /// Binding key; `None` means the queue name.
    pub routing_key: Option<&'static str>,
    /// Dead-letter exchange.
    pub dlx: &'static str,
    /// Dead-letter queue bound to `dlx`; `None` means `{queue}.dlq`.
    pub dlq: Option<&'static str>,
    /// Classic or quorum.
    pub queue_type: QueueKind,
    /// `x-delivery-limit` for quorum queues; `None` means `max_retries + 5`.
    pub delivery_limit: Option<u32>,
    /// `basic.qos` prefetch count.
    pub prefetch: u16,
    /// Handlers in flight at once (1..=prefetch).
    pub concurrency: u16,
    /// Delayed retries before a message is dead-lettered.
    pub max_retries: u32,
    /// Delay before the first retry.
    pub retry_delay: Duration,
    /// Growth of the delay between retries.
    pub retry_backoff: RetryBackoff,
    /// Deadline of one handler call.
    pub timeout: Duration,
    /// Deduplicate by AMQP `message_id`.
    pub idempotent: bool,
    /// How long a handled `message_id` is remembered.
    pub dedup_ttl: Duration,
    /// Decodes the body and calls the user's function.
    pub handler: &'static (dyn Handler + Sync),
}

impl std::fmt::Debug for ConsumerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerSpec")
            .field("name", &self.name)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// Defaults shared by the macro and hand-built consumers (DESIGN.md section 1).
pub mod defaults {
    use super::*;
    /// Default `prefetch`.
    pub const PREFETCH: u16 = 32;
    /// Default `concurrency`.
    pub const CONCURRENCY: u16 = 1;
    /// Default `max_retries`.
    pub const MAX_RETRIES: u32 = 3;
    /// Default `retry_delay`.
    pub const RETRY_DELAY: Duration = Duration::from_secs(1);
    /// Default `retry_backoff`.
    pub const RETRY_BACKOFF: RetryBackoff = RetryBackoff::Exponential { factor: 2 };
    /// Default `timeout`.
    pub const TIMEOUT: Duration = Duration::from_secs(30);
    /// Default `dedup_ttl`.
    pub const DEDUP_TTL: Duration = Duration::from_secs(24 * 3600);
    /// Extra deliveries a quorum queue allows beyond `max_retries` before the broker
    /// dead-letters on its own (crash-loop safety net).
    pub const DELIVERY_LIMIT_MARGIN: u32 = 5;
}

/// A consumer as the runtime runs it: owned names, so tests and services can derive
/// names at run time (`format!("orders-{suffix}")`).
///
/// ```
/// # use reliable_mq::{ConsumerConfig, HandlerError, handler_fn};
/// let config = ConsumerConfig::new("orders", "orders.dlx", handler_fn(|n: u64| async move {
///     println!("got {n}");
///     Ok::<_, HandlerError>(())
/// }))
/// .with_prefetch(64)
/// .with_concurrency(8);
/// assert_eq!(config.dlq_name(), "orders.dlq");
/// ```
#[derive(Clone)]
pub struct ConsumerConfig {
    /// Name for logs.
    pub name: String,
    /// See [`ConsumerSpec::queue`].
    pub queue: String,
    /// See [`ConsumerSpec::exchange`].
    pub exchange: Option<String>,
    /// See [`ConsumerSpec::exchange_type`].
    pub exchange_type: ExchangeKind,
    /// See [`ConsumerSpec::routing_key`].
    pub routing_key: Option<String>,
    /// See [`ConsumerSpec::dlx`].
    pub dlx: String,
    /// See [`ConsumerSpec::dlq`].
    pub dlq: Option<String>,
    /// See [`ConsumerSpec::queue_type`].
    pub queue_type: QueueKind,
    /// See [`ConsumerSpec::delivery_limit`].
    pub delivery_limit: Option<u32>,
    /// See [`ConsumerSpec::prefetch`].
    pub prefetch: u16,
    /// See [`ConsumerSpec::concurrency`].
    pub concurrency: u16,
    /// See [`ConsumerSpec::max_retries`].
    pub max_retries: u32,
    /// See [`ConsumerSpec::retry_delay`].
    pub retry_delay: Duration,
    /// See [`ConsumerSpec::retry_backoff`].
    pub retry_backoff: RetryBackoff,
    /// See [`ConsumerSpec::timeout`].
    pub timeout: Duration,
    /// See [`ConsumerSpec::idempotent`].
    pub idempotent: bool,
    /// See [`ConsumerSpec::dedup_ttl`].
    pub dedup_ttl: Duration,
    /// Decodes and handles one delivery.
    pub handler: Arc<dyn Handler>,
}

impl std::fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerConfig")
            .field("name", &self.name)
            .field("queue", &self.queue)
            .field("exchange", &self.exchange)
            .field("dlx", &self.dlx)
            .field("prefetch", &self.prefetch)
            .field("concurrency", &self.concurrency)
            .field("max_retries", &self.max_retries)
            .field("idempotent", &self.idempotent)
            .finish_non_exhaustive()
    }
}

/// Adapts a `&'static` handler from a [`ConsumerSpec`] to the owned form.
struct StaticHandler(&'static (dyn Handler + Sync));

impl Handler for StaticHandler {
    fn call(&self, delivery: Arc<crate::Delivery>) -> crate::handler::HandlerFuture {
        self.0.call(delivery)
    }
}

impl From<&ConsumerSpec> for ConsumerConfig {
    fn from(spec: &ConsumerSpec) -> Self {
        Self {
            name: spec.name.to_owned(),
            queue: spec.queue.to_owned(),
            exchange: spec.exchange.map(str::to_owned),
            exchange_type: spec.exchange_type,
            routing_key: spec.routing_key.map(str::to_owned),
            dlx: spec.dlx.to_owned(),
            dlq: spec.dlq.map(str::to_owned),
            queue_type: spec.queue_type,
            delivery_limit: spec.delivery_limit,
            prefetch: spec.prefetch,
            concurrency: spec.concurrency,
            max_retries: spec.max_retries,
            retry_delay: spec.retry_delay,
            retry_backoff: spec.retry_backoff,
            timeout: spec.timeout,
            idempotent: spec.idempotent,
            dedup_ttl: spec.dedup_ttl,
            handler: Arc::new(StaticHandler(spec.handler)),
        }
    }
}

impl From<ConsumerSpec> for ConsumerConfig {
    fn from(spec: ConsumerSpec) -> Self {
        Self::from(&spec)
    }
}

impl ConsumerConfig {
    /// A consumer of `queue` dead-lettering to `dlx`, every other setting at its default.
    pub fn new(queue: impl Into<String>, dlx: impl Into<String>, handler: impl Handler) -> Self {
        let queue = queue.into();
        Self {
            name: queue.clone(),
            queue,
            exchange: None,
            exchange_type: ExchangeKind::Topic,
            routing_key: None,
            dlx: dlx.into(),
            dlq: None,
            queue_type: QueueKind::Classic,
            delivery_limit: None,
            prefetch: defaults::PREFETCH,
            concurrency: defaults::CONCURRENCY,
            max_retries: defaults::MAX_RETRIES,
            retry_delay: defaults::RETRY_DELAY,
            retry_backoff: defaults::RETRY_BACKOFF,
            timeout: defaults::TIMEOUT,
            idempotent: false,
            dedup_ttl: defaults::DEDUP_TTL,
            handler: Arc::new(handler),
        }
    }

    /// Bind the queue to `exchange` (of `kind`) with `routing_key`.
    pub fn with_exchange(
        mut self,
        exchange: impl Into<String>,
        kind: ExchangeKind,
        routing_key: impl Into<String>,
    ) -> Self {
        self.exchange = Some(exchange.into());
        self.exchange_type = kind;
        self.routing_key = Some(routing_key.into());
        self
    }

    /// Set `prefetch`.
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Set `concurrency`.
    pub fn with_concurrency(mut self, concurrency: u16) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Set the retry ladder: `max_retries` retries starting at `delay`, growing by `backoff`.
    pub fn with_retries(
        mut self,
        max_retries: u32,
        delay: Duration,
        backoff: RetryBackoff,
    ) -> Self {
        self.max_retries = max_retries;
        self.retry_delay = delay;
        self.retry_backoff = backoff;
        self
    }

    /// Set the handler deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Deduplicate by `message_id`, remembering handled ids for `ttl`.
    pub fn idempotent(mut self, ttl: Duration) -> Self {
        self.idempotent = true;
        self.dedup_ttl = ttl;
        self
    }

    /// Use a quorum queue.
    pub fn quorum(mut self, delivery_limit: Option<u32>) -> Self {
        self.queue_type = QueueKind::Quorum;
        self.delivery_limit = delivery_limit;
        self
    }

    /// The dead-letter queue: `dlq` if set, else `{queue}.dlq`.
    pub fn dlq_name(&self) -> String {
        self.dlq
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.queue))
    }

    /// The binding key: `routing_key` if set, else the queue name.
    pub fn binding_key(&self) -> &str {
        self.routing_key.as_deref().unwrap_or(&self.queue)
    }

    /// The `x-delivery-limit` to declare, for quorum queues only.
    pub fn effective_delivery_limit(&self) -> Option<u32> {
        match self.queue_type {
            QueueKind::Classic => None,
            QueueKind::Quorum => Some(
                self.delivery_limit.unwrap_or(
                    self.max_retries
                        .saturating_add(defaults::DELIVERY_LIMIT_MARGIN),
                ),
            ),
        }
    }
}

/// Every `#[consumer]` function linked into the binary, collected at link time.
#[linkme::distributed_slice]
pub static CONSUMERS: [ConsumerSpec];

/// The consumers registered by `#[consumer]` in this binary, in no particular order.
pub fn registered() -> impl Iterator<Item = &'static ConsumerSpec> {
    CONSUMERS.iter()
}
