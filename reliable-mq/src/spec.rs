//! What a consumer is: the static description the `#[consumer]` macro emits
//! ([`ConsumerSpec`]), the owned form the runtime works with ([`ConsumerConfig`]), and the
//! registry that collects every annotated function.
//!
//! Both forms hold the shared consumer model (`reliable-mq-model`): the macro's settings
//! are replayed through it, and hand-built consumers set it through builder methods, so
//! the compile-time rules and the start-up rules are the same rules.

use std::sync::Arc;
use std::time::Duration;

use reliable_mq_model::{ConsumerModel, Key, Value};
pub use reliable_mq_model::{ExchangeKind, QueueKind, RetryBackoff, defaults};

use lapin::types::FieldTable;

use crate::handler::Handler;

/// One `key = value` of a `#[consumer(...)]` attribute, as the macro read it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    key: &'static str,
    value: SettingValue,
}

#[derive(Debug, Clone, Copy)]
enum SettingValue {
    Str(&'static str),
    Int(u64),
    Flag,
}

impl Setting {
    /// `key = "value"`.
    pub const fn str(key: &'static str, value: &'static str) -> Self {
        Self {
            key,
            value: SettingValue::Str(value),
        }
    }

    /// `key = 42`.
    pub const fn int(key: &'static str, value: u64) -> Self {
        Self {
            key,
            value: SettingValue::Int(value),
        }
    }

    /// `key` alone.
    pub const fn flag(key: &'static str) -> Self {
        Self {
            key,
            value: SettingValue::Flag,
        }
    }
}

/// A consumer as written in `#[consumer(...)]`: static, checked at compile time.
///
/// The macro defines, next to the function, a type with the function's name whose `SPEC`
/// constant is this value. Pass it to [`App::consumer`](crate::App::consumer), or rely on
/// [`run`](crate::run), which picks up every annotated function in the binary.
#[derive(Clone, Copy)]
pub struct ConsumerSpec {
    name: &'static str,
    settings: &'static [Setting],
    handler: &'static (dyn Handler + Sync),
}

impl ConsumerSpec {
    /// Built by the macro's expansion.
    #[doc(hidden)]
    pub const fn new(
        name: &'static str,
        settings: &'static [Setting],
        handler: &'static (dyn Handler + Sync),
    ) -> Self {
        Self {
            name,
            settings,
            handler,
        }
    }

    /// Path of the annotated function (`module::function`), for logs.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The generated adapter: decodes a delivery and calls the function (for unit tests
    /// of a handler with `Delivery::for_test`).
    #[doc(hidden)]
    pub fn handler(&self) -> &'static (dyn Handler + Sync) {
        self.handler
    }

    /// The queue it consumes.
    pub fn queue(&self) -> &'static str {
        self.settings
            .iter()
            .find_map(|s| match (s.key, s.value) {
                ("queue", SettingValue::Str(q)) => Some(q),
                _ => None,
            })
            .unwrap_or("")
    }
}

impl std::fmt::Debug for ConsumerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerSpec")
            .field("name", &self.name)
            .field("queue", &self.queue())
            .finish_non_exhaustive()
    }
}

/// A consumer as the runtime runs it: owned names, so tests and services can derive
/// names at run time (`format!("orders-{suffix}")`). Every setting has a builder method;
/// the rules are checked when the app starts.
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
/// assert_eq!(config.prefetch(), 64);
/// ```
#[derive(Clone)]
pub struct ConsumerConfig {
    name: String,
    pub(crate) model: ConsumerModel,
    /// Settings replayed from a spec that the model could not read (only possible if the
    /// macro and the runtime disagree, which the exact version pin rules out).
    unreadable: Vec<String>,
    pub(crate) handler: Arc<dyn Handler>,
    /// The payload's JSON Schema given by hand (`with_payload_schema`).
    payload_schema: Option<serde_json::Value>,
}

impl std::fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerConfig")
            .field("name", &self.name)
            .field("queue", &self.model.queue())
            .field("exchange", &self.model.exchange())
            .field("dlx", &self.model.dlx())
            .field("prefetch", &self.prefetch())
            .field("concurrency", &self.concurrency())
            .field("max_retries", &self.max_retries())
            .field("idempotent", &self.model.idempotent)
            .finish_non_exhaustive()
    }
}

/// Adapts a `&'static` handler from a [`ConsumerSpec`] to the owned form.
struct StaticHandler(&'static (dyn Handler + Sync));

impl Handler for StaticHandler {
    fn call(&self, delivery: Arc<crate::Delivery>) -> crate::handler::HandlerFuture {
        self.0.call(delivery)
    }

    fn states(&self) -> Vec<crate::state::StateType> {
        self.0.states()
    }

    fn payload_type(&self) -> Option<&'static str> {
        self.0.payload_type()
    }

    fn payload_schema(&self) -> Option<serde_json::Value> {
        self.0.payload_schema()
    }
}

impl From<&ConsumerSpec> for ConsumerConfig {
    fn from(spec: &ConsumerSpec) -> Self {
        let mut model = ConsumerModel::default();
        let mut unreadable = Vec::new();
        for setting in spec.settings {
            let value = match setting.value {
                SettingValue::Str(s) => Value::Str(s),
                SettingValue::Int(n) => Value::Int(n),
                SettingValue::Flag => Value::Flag,
            };
            let read = match Key::from_name(setting.key) {
                Some(key) => model.set(key, value).map_err(|p| p.message),
                None => Err(format!("unknown key `{}`", setting.key)),
            };
            if let Err(problem) = read {
                unreadable.push(problem);
            }
        }
        Self {
            name: spec.name.to_owned(),
            model,
            unreadable,
            handler: Arc::new(StaticHandler(spec.handler)),
            payload_schema: None,
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
        let model = ConsumerModel {
            queue: Some(queue.clone()),
            dlx: Some(dlx.into()),
            ..ConsumerModel::default()
        };
        Self {
            name: queue,
            model,
            unreadable: Vec::new(),
            handler: Arc::new(handler),
            payload_schema: None,
        }
    }

    /// Name the consumer in logs and errors (default: its queue).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Bind the queue to `exchange` (of `kind`) with `routing_key`. For a `fanout` or
    /// `headers` exchange, which ignore routing keys, use [`ConsumerConfig::with_exchange_kind`].
    pub fn with_exchange(
        mut self,
        exchange: impl Into<String>,
        kind: ExchangeKind,
        routing_key: impl Into<String>,
    ) -> Self {
        self.model.exchange = Some(exchange.into());
        self.model.exchange_type = Some(kind);
        self.model.routing_key = Some(routing_key.into());
        self
    }

    /// Bind the queue to `exchange` of `kind`, with the queue name as the binding key
    /// (ignored by `fanout` and `headers` exchanges).
    pub fn with_exchange_kind(mut self, exchange: impl Into<String>, kind: ExchangeKind) -> Self {
        self.model.exchange = Some(exchange.into());
        self.model.exchange_type = Some(kind);
        self.model.routing_key = None;
        self
    }

    /// Name the dead-letter queue (default `{queue}.dlq`).
    pub fn with_dlq(mut self, dlq: impl Into<String>) -> Self {
        self.model.dlq = Some(dlq.into());
        self
    }

    /// Set `prefetch`.
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.model.prefetch = Some(u64::from(prefetch));
        self
    }

    /// Set `concurrency`.
    pub fn with_concurrency(mut self, concurrency: u16) -> Self {
        self.model.concurrency = Some(u64::from(concurrency));
        self
    }

    /// Set the retry ladder: `max_retries` retries starting at `delay`, growing by `backoff`.
    pub fn with_retries(
        mut self,
        max_retries: u32,
        delay: Duration,
        backoff: RetryBackoff,
    ) -> Self {
        self.model.max_retries = Some(u64::from(max_retries));
        self.model.retry_delay = Some(delay);
        self.model.retry_backoff = Some(backoff);
        self
    }

    /// Set the handler deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.model.timeout = Some(timeout);
        self
    }

    /// Deduplicate by `message_id`, remembering handled ids for `ttl`.
    pub fn idempotent(mut self, ttl: Duration) -> Self {
        self.model.idempotent = true;
        self.model.dedup_ttl = Some(ttl);
        self
    }

    /// Run each delivery through the transactional inbox (feature `postgres`), remembering
    /// handled ids for `ttl`; the handler takes the transaction
    /// ([`postgres::inbox_handler_fn`](crate::postgres::inbox_handler_fn)).
    pub fn inbox(mut self, ttl: Duration) -> Self {
        self.model.inbox = true;
        self.model.dedup_ttl = Some(ttl);
        self
    }

    /// Use a quorum queue, with `delivery_limit` (default `max_retries + 5`).
    pub fn quorum(mut self, delivery_limit: Option<u32>) -> Self {
        self.model.queue_type = Some(QueueKind::Quorum);
        self.model.delivery_limit = delivery_limit.map(u64::from);
        self
    }

    /// Declare the queue with `x-single-active-consumer`: of all the consumers of the
    /// queue (every instance of the service), one gets its messages, in order, and the
    /// others stand by to take over. Needs `concurrency` 1.
    ///
    /// Order holds only until a message fails: a retryable failure (or a held claim) sends
    /// it through a retry (or requeue) tier, and it comes back behind the messages
    /// published meanwhile while the consumer goes on with those. The runtime does not
    /// retry in place, which would stop the queue behind one message for the whole ladder,
    /// past the broker's `consumer_timeout`. To keep a strict order, retry inside the
    /// handler (within its `timeout`) and reject when it gives up, or set `max_retries` 0.
    pub fn with_single_active_consumer(mut self) -> Self {
        self.model.single_active_consumer = true;
        self
    }

    /// Subscribe with the `x-priority` consumer argument: the broker delivers to the
    /// consumers of the highest priority that have room in their prefetch window first
    /// (default 0).
    pub fn with_priority(mut self, priority: u32) -> Self {
        self.model.priority = Some(u64::from(priority));
        self
    }

    /// Subscribe as the queue's only consumer (`basic.consume` with `exclusive`): other
    /// subscriptions are refused while this one lasts, and keep retrying. Classic queues
    /// only; on a quorum queue use [`ConsumerConfig::with_single_active_consumer`].
    pub fn exclusive(mut self) -> Self {
        self.model.exclusive = true;
        self
    }

    /// Export the JSON Schema of `T`, the payload type, in the AsyncAPI document
    /// ([`App::asyncapi`](crate::App::asyncapi)); what `#[consumer(schema)]` does for an
    /// annotated function.
    #[cfg(feature = "schemars")]
    pub fn with_payload_schema<T: schemars::JsonSchema>(mut self) -> Self {
        self.payload_schema = Some(crate::asyncapi::schema_of::<T>());
        self
    }

    /// The payload's JSON Schema for the export: set on the config, or by the handler.
    pub(crate) fn payload_schema(&self) -> Option<serde_json::Value> {
        self.payload_schema
            .clone()
            .or_else(|| self.handler.payload_schema())
    }

    /// The consumer's name, for logs and errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        self.model.queue()
    }

    /// The dead-letter exchange.
    pub fn dlx(&self) -> &str {
        self.model.dlx()
    }

    /// The dead-letter queue: `dlq` if set, else `{queue}.dlq`.
    pub fn dlq_name(&self) -> String {
        self.model.dlq_name()
    }

    /// The binding key: `routing_key` if set, else the queue name.
    pub fn binding_key(&self) -> &str {
        self.model.binding_key()
    }

    /// The `x-delivery-limit` declared on the queue: quorum queues only, `max_retries + 5`
    /// unless set.
    pub fn effective_delivery_limit(&self) -> Option<u32> {
        self.model.effective_delivery_limit()
    }

    /// `basic.qos` prefetch.
    pub fn prefetch(&self) -> u16 {
        self.model.prefetch()
    }

    /// Handlers in flight at once.
    pub fn concurrency(&self) -> u16 {
        self.model.concurrency()
    }

    /// Retries before dead-lettering.
    pub fn max_retries(&self) -> u32 {
        self.model.max_retries()
    }

    /// The handler deadline.
    pub fn timeout(&self) -> Duration {
        self.model.timeout()
    }

    /// Whether messages are deduplicated by `message_id`.
    pub fn is_idempotent(&self) -> bool {
        self.model.idempotent
    }

    /// Whether messages go through the transactional inbox (`#[consumer(inbox)]`, feature
    /// `postgres`): deduplicated in the handler's PostgreSQL transaction.
    pub fn is_inbox(&self) -> bool {
        self.model.inbox
    }

    /// How long handled ids are remembered.
    pub fn dedup_ttl(&self) -> Duration {
        self.model.dedup_ttl()
    }

    /// `basic.consume`'s options and arguments: `exclusive`, and `x-priority`. The
    /// subscription and the AsyncAPI export both take them from here.
    pub(crate) fn consume_options(&self) -> (lapin::options::BasicConsumeOptions, FieldTable) {
        let options = lapin::options::BasicConsumeOptions {
            exclusive: self.model.exclusive(),
            ..lapin::options::BasicConsumeOptions::default()
        };
        let mut args = FieldTable::default();
        if let Some(priority) = self.model.priority() {
            args.insert(
                "x-priority".into(),
                lapin::types::AMQPValue::LongInt(priority),
            );
        }
        (options, args)
    }

    /// Every problem with this consumer's settings against a broker whose
    /// `consumer_timeout` is `consumer_timeout`: the macro's rules, the same ones.
    pub(crate) fn problems(&self, consumer_timeout: Duration) -> Vec<String> {
        let mut problems = self.unreadable.clone();
        problems.extend(
            self.model
                .validate_against(consumer_timeout)
                .into_iter()
                .map(|p| p.message),
        );
        problems
    }
}

/// Every `#[consumer]` function linked into the binary, collected at link time.
#[linkme::distributed_slice]
pub static CONSUMERS: [ConsumerSpec];

/// The consumers registered by `#[consumer]` in this binary, in no particular order.
pub(crate) fn registered() -> impl Iterator<Item = &'static ConsumerSpec> {
    CONSUMERS.iter()
}
