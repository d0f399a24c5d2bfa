//! A consumer's settings as written (each key `None` until set), how a written value is
//! read ([`ConsumerModel::set`]), the rules ([`ConsumerModel::validate`]) and the values
//! the runtime uses, defaults applied.

use std::time::Duration;

use crate::defaults;
use crate::kinds::closest;
use crate::names::{MAX_NAME_BYTES, RetryLadder, tier_queue_name};
use crate::{ExchangeKind, QueueKind, RetryBackoff, parse_duration};

/// Every key of `#[consumer(...)]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// `queue`
    Queue,
    /// `exchange`
    Exchange,
    /// `exchange_type`
    ExchangeType,
    /// `routing_key`
    RoutingKey,
    /// `dlx`
    Dlx,
    /// `dlq`
    Dlq,
    /// `queue_type`
    QueueType,
    /// `delivery_limit`
    DeliveryLimit,
    /// `prefetch`
    Prefetch,
    /// `concurrency`
    Concurrency,
    /// `max_retries`
    MaxRetries,
    /// `retry_delay`
    RetryDelay,
    /// `retry_backoff`
    RetryBackoff,
    /// `timeout`
    Timeout,
    /// `idempotent`
    Idempotent,
    /// `dedup_ttl`
    DedupTtl,
    /// `single_active_consumer`
    SingleActiveConsumer,
    /// `priority`
    Priority,
    /// `exclusive`
    Exclusive,
    /// `inbox`
    Inbox,
}

/// What a key's value is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Name,
    Choice,
    Integer,
    Duration,
    Flag,
}

impl Key {
    /// Every key, in the order the docs list them.
    pub const ALL: [Key; 20] = [
        Key::Queue,
        Key::Exchange,
        Key::ExchangeType,
        Key::RoutingKey,
        Key::Dlx,
        Key::Dlq,
        Key::QueueType,
        Key::DeliveryLimit,
        Key::Prefetch,
        Key::Concurrency,
        Key::MaxRetries,
        Key::RetryDelay,
        Key::RetryBackoff,
        Key::Timeout,
        Key::Idempotent,
        Key::DedupTtl,
        Key::SingleActiveConsumer,
        Key::Priority,
        Key::Exclusive,
        Key::Inbox,
    ];

    /// The key as written in the attribute.
    pub const fn as_str(self) -> &'static str {
        match self {
            Key::Queue => "queue",
            Key::Exchange => "exchange",
            Key::ExchangeType => "exchange_type",
            Key::RoutingKey => "routing_key",
            Key::Dlx => "dlx",
            Key::Dlq => "dlq",
            Key::QueueType => "queue_type",
            Key::DeliveryLimit => "delivery_limit",
            Key::Prefetch => "prefetch",
            Key::Concurrency => "concurrency",
            Key::MaxRetries => "max_retries",
            Key::RetryDelay => "retry_delay",
            Key::RetryBackoff => "retry_backoff",
            Key::Timeout => "timeout",
            Key::Idempotent => "idempotent",
            Key::DedupTtl => "dedup_ttl",
            Key::SingleActiveConsumer => "single_active_consumer",
            Key::Priority => "priority",
            Key::Exclusive => "exclusive",
            Key::Inbox => "inbox",
        }
    }

    /// How the key is written, for error messages.
    pub const fn example(self) -> &'static str {
        match self {
            Key::Queue => r#"queue = "orders""#,
            Key::Exchange => r#"exchange = "shop""#,
            Key::ExchangeType => r#"exchange_type = "topic""#,
            Key::RoutingKey => r#"routing_key = "order.created""#,
            Key::Dlx => r#"dlx = "orders.dlx""#,
            Key::Dlq => r#"dlq = "orders.dlq""#,
            Key::QueueType => r#"queue_type = "quorum""#,
            Key::DeliveryLimit => "delivery_limit = 10",
            Key::Prefetch => "prefetch = 32",
            Key::Concurrency => "concurrency = 4",
            Key::MaxRetries => "max_retries = 3",
            Key::RetryDelay => r#"retry_delay = "1s""#,
            Key::RetryBackoff => r#"retry_backoff = "exponential""#,
            Key::Timeout => r#"timeout = "30s""#,
            Key::Idempotent => "idempotent",
            Key::DedupTtl => r#"dedup_ttl = "24h""#,
            Key::SingleActiveConsumer => "single_active_consumer",
            Key::Priority => "priority = 10",
            Key::Exclusive => "exclusive",
            Key::Inbox => "inbox",
        }
    }

    /// The key named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Key> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Every key's name, comma-separated, for "valid keys: ..." messages.
    pub fn list() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
        names.join(", ")
    }

    /// The key the user probably meant by `name`: a name people bring from other
    /// libraries or the RabbitMQ docs, else the closest by edit distance.
    pub fn suggest(name: &str) -> Option<Key> {
        const ALIASES: &[(&str, Key)] = &[
            ("name", Key::Queue),
            ("queue_name", Key::Queue),
            ("exchange_name", Key::Exchange),
            ("kind", Key::ExchangeType),
            ("binding_key", Key::RoutingKey),
            ("dead_letter_exchange", Key::Dlx),
            ("x_dead_letter_exchange", Key::Dlx),
            ("dead_letter_queue", Key::Dlq),
            ("x_queue_type", Key::QueueType),
            ("x_delivery_limit", Key::DeliveryLimit),
            ("prefetch_count", Key::Prefetch),
            ("qos", Key::Prefetch),
            ("workers", Key::Concurrency),
            ("parallelism", Key::Concurrency),
            ("retries", Key::MaxRetries),
            ("max_attempts", Key::MaxRetries),
            ("backoff", Key::RetryBackoff),
            ("dedup", Key::Idempotent),
            ("deduplicate", Key::Idempotent),
            ("x_single_active_consumer", Key::SingleActiveConsumer),
            ("sac", Key::SingleActiveConsumer),
            ("x_priority", Key::Priority),
            ("consumer_priority", Key::Priority),
            ("exclusive_consumer", Key::Exclusive),
            ("transactional", Key::Inbox),
            ("exactly_once", Key::Inbox),
        ];
        let lower = name.to_lowercase();
        if let Some((_, key)) = ALIASES.iter().find(|(alias, _)| *alias == lower) {
            return Some(*key);
        }
        let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
        closest(name, &names).and_then(Self::from_name)
    }

    const fn shape(self) -> Shape {
        match self {
            Key::Queue | Key::Exchange | Key::RoutingKey | Key::Dlx | Key::Dlq => Shape::Name,
            Key::ExchangeType | Key::QueueType | Key::RetryBackoff => Shape::Choice,
            Key::DeliveryLimit
            | Key::Prefetch
            | Key::Concurrency
            | Key::MaxRetries
            | Key::Priority => Shape::Integer,
            Key::RetryDelay | Key::Timeout | Key::DedupTtl => Shape::Duration,
            Key::Idempotent | Key::SingleActiveConsumer | Key::Exclusive | Key::Inbox => {
                Shape::Flag
            }
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value as written after `key =` (or its absence), in the terms [`ConsumerModel::set`]
/// needs to read it or to say what is wrong with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// The key alone: `idempotent`.
    Flag,
    /// `key(...)` instead of `key = ...`.
    List,
    /// A string literal's contents.
    Str(&'a str),
    /// A non-negative integer literal.
    Int(u64),
    /// A negative number.
    Negative,
    /// An integer literal beyond `u64`.
    TooLarge,
    /// Anything else: `found` says what it is ("a float", "a path", ...), `text` is how it
    /// was written, `literal` whether it is a literal at all (a constant or a macro call
    /// cannot be checked at compile time).
    Other {
        /// What it is, with its article.
        found: &'static str,
        /// The tokens as written.
        text: &'a str,
        /// Whether it is a literal.
        literal: bool,
    },
}

/// Where a problem should be shown: on the value, on the key, on the whole `key = value`
/// entry, or on the attribute (a missing key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// The key's value.
    Value,
    /// The key itself.
    Key,
    /// `key = value` as a whole.
    Entry,
    /// The attribute (nothing to point at).
    Attribute,
}

/// One broken rule: the key it belongs to, where to show it, and a message that says the
/// fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key the problem belongs to.
    pub key: Key,
    /// Where to show it.
    pub site: Site,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A consumer's settings as written: `None` means "not written" (its default applies).
///
/// Integers are kept as written (`u64`) so that every range rule lives in
/// [`ConsumerModel::validate`]; the accessors return the runtime's types once valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerModel {
    /// Durable queue consumed from (required).
    pub queue: Option<String>,
    /// Exchange the queue is bound to; `None` means the default exchange.
    pub exchange: Option<String>,
    /// Type of `exchange`.
    pub exchange_type: Option<ExchangeKind>,
    /// Binding key; `None` means the queue name.
    pub routing_key: Option<String>,
    /// Dead-letter exchange (required).
    pub dlx: Option<String>,
    /// Dead-letter queue bound to `dlx`; `None` means `{queue}.dlq`.
    pub dlq: Option<String>,
    /// Classic or quorum.
    pub queue_type: Option<QueueKind>,
    /// `x-delivery-limit` for quorum queues.
    pub delivery_limit: Option<u64>,
    /// `basic.qos` prefetch count.
    pub prefetch: Option<u64>,
    /// Handlers in flight at once.
    pub concurrency: Option<u64>,
    /// Delayed retries before a message is dead-lettered.
    pub max_retries: Option<u64>,
    /// Delay before the first retry.
    pub retry_delay: Option<Duration>,
    /// Growth of the delay between retries.
    pub retry_backoff: Option<RetryBackoff>,
    /// Deadline of one handler call.
    pub timeout: Option<Duration>,
    /// Deduplicate by AMQP `message_id`.
    pub idempotent: bool,
    /// How long a handled `message_id` is remembered.
    pub dedup_ttl: Option<Duration>,
    /// Declare the queue with `x-single-active-consumer`: one consumer at a time gets its
    /// messages, the others stand by.
    pub single_active_consumer: bool,
    /// The `x-priority` consumer argument: the broker delivers to the highest-priority
    /// consumers with room first.
    pub priority: Option<u64>,
    /// Subscribe as the queue's only consumer (`basic.consume` with `exclusive`).
    pub exclusive: bool,
    /// Deduplicate by AMQP `message_id` in the handler's PostgreSQL transaction (the
    /// transactional inbox, runtime feature `postgres`).
    pub inbox: bool,
    /// Keys that were written with a value that could not be read (already reported):
    /// rules about them stay quiet rather than add noise.
    pub unreadable: Vec<Key>,
    /// Keys a misspelled key was taken for (`dead_letter_exchange` for `dlx`): the "did
    /// you mean" error covers them, so they are not also reported missing.
    pub suggested: Vec<Key>,
}

impl ConsumerModel {
    /// Read `value` as written for `key` into the model. On error nothing is stored, the
    /// key is remembered as unreadable, and the problem says how to write it.
    pub fn set(&mut self, key: Key, value: Value<'_>) -> Result<(), Problem> {
        let result = self.read(key, value);
        if result.is_err() {
            self.unreadable.push(key);
        }
        result
    }

    fn read(&mut self, key: Key, value: Value<'_>) -> Result<(), Problem> {
        let name = key.as_str();
        let example = key.example();
        let problem = |site, message: String| Problem { key, site, message };
        let shape = key.shape();
        match value {
            Value::Flag if shape == Shape::Flag => {
                match key {
                    Key::SingleActiveConsumer => self.single_active_consumer = true,
                    Key::Exclusive => self.exclusive = true,
                    Key::Inbox => self.inbox = true,
                    _ => self.idempotent = true,
                }
                return Ok(());
            }
            _ if shape == Shape::Flag => {
                let what = match key {
                    Key::SingleActiveConsumer => "single active consumer",
                    Key::Exclusive => "the exclusive subscription",
                    Key::Inbox => "the inbox",
                    _ => "deduplication",
                };
                let message = match value {
                    Value::Other { text: "false", .. } => format!(
                        "`{name}` is a flag and takes no value: remove it to turn {what} off"
                    ),
                    _ => format!("`{name}` is a flag and takes no value: write just `{name}`"),
                };
                return Err(problem(Site::Entry, message));
            }
            Value::Flag => {
                return Err(problem(
                    Site::Entry,
                    format!("`{name}` needs a value: write `{example}`"),
                ));
            }
            Value::List => {
                return Err(problem(Site::Entry, format!("write `{example}`, with `=`")));
            }
            Value::Other {
                found,
                literal: false,
                text,
            } => {
                if shape == Shape::Choice && found == "a path" && is_word(text) {
                    return Err(problem(
                        Site::Value,
                        format!("`{name}` expects a string: write `{name} = \"{text}\"`"),
                    ));
                }
                if shape == Shape::Integer && text.starts_with('-') {
                    return Err(negative(key));
                }
                let expected = match shape {
                    Shape::Integer => "an integer",
                    Shape::Duration => "a duration string",
                    _ => "a string",
                };
                return Err(problem(
                    Site::Value,
                    format!(
                        "`{name}` expects {expected} literal, found {found}: the macro checks \
                         values at compile time, so it needs the literal itself (`{example}`); \
                         for settings decided at run time, build a \
                         `reliable_mq::ConsumerConfig` instead"
                    ),
                ));
            }
            _ => {}
        }
        match shape {
            Shape::Name => {
                let text = match value {
                    Value::Str(s) => s,
                    Value::Int(_) | Value::Negative | Value::TooLarge => {
                        return Err(wrong_literal_for_string(key, "an integer", value));
                    }
                    Value::Other { found, text, .. }
                        if matches!(found, "a float" | "a boolean") =>
                    {
                        return Err(problem(
                            Site::Value,
                            format!(
                                "`{name}` expects a string, found {found}: write \
                                 `{name} = \"{text}\"`"
                            ),
                        ));
                    }
                    Value::Other { found, .. } => {
                        return Err(problem(
                            Site::Value,
                            format!("`{name}` expects a string, found {found}: write `{example}`"),
                        ));
                    }
                    Value::Flag | Value::List => return Ok(()),
                };
                let text = text.to_owned();
                match key {
                    Key::Queue => self.queue = Some(text),
                    Key::Exchange => self.exchange = Some(text),
                    Key::RoutingKey => self.routing_key = Some(text),
                    Key::Dlx => self.dlx = Some(text),
                    _ => self.dlq = Some(text),
                }
            }
            Shape::Choice => {
                let Value::Str(text) = value else {
                    return Err(problem(
                        Site::Value,
                        format!(
                            "`{name}` expects a string, found {}: write `{example}`",
                            found(value)
                        ),
                    ));
                };
                let at_value = |message| problem(Site::Value, message);
                match key {
                    Key::ExchangeType => {
                        self.exchange_type = Some(ExchangeKind::parse(text).map_err(at_value)?);
                    }
                    Key::QueueType => {
                        self.queue_type = Some(QueueKind::parse(text).map_err(at_value)?);
                    }
                    _ => self.retry_backoff = Some(RetryBackoff::parse(text).map_err(at_value)?),
                }
            }
            Shape::Integer => {
                let n = match value {
                    Value::Int(n) => n,
                    Value::Negative => return Err(negative(key)),
                    Value::TooLarge => {
                        return Err(problem(
                            Site::Value,
                            format!("`{name}` is far too large: write e.g. `{example}`"),
                        ));
                    }
                    Value::Str(s) if s.trim().parse::<u64>().is_ok() => {
                        return Err(problem(
                            Site::Value,
                            format!(
                                "`{name}` expects an integer, not a string: remove the quotes, \
                                 `{name} = {}`",
                                s.trim()
                            ),
                        ));
                    }
                    other => {
                        return Err(problem(
                            Site::Value,
                            format!(
                                "`{name}` expects an integer, found {}: write `{example}`",
                                found(other)
                            ),
                        ));
                    }
                };
                match key {
                    Key::DeliveryLimit => self.delivery_limit = Some(n),
                    Key::Prefetch => self.prefetch = Some(n),
                    Key::Concurrency => self.concurrency = Some(n),
                    Key::Priority => self.priority = Some(n),
                    _ => self.max_retries = Some(n),
                }
            }
            Shape::Duration => {
                let d = match value {
                    Value::Str(s) => parse_duration(s)
                        .map_err(|why| problem(Site::Value, format!("invalid `{name}`: {why}")))?,
                    Value::Int(n) => {
                        // A bare number: milliseconds and seconds are both plausible.
                        return Err(problem(
                            Site::Value,
                            format!(
                                "`{name}` expects a duration string with a unit: write \
                                 `{name} = \"{n}ms\"` for milliseconds or `{name} = \"{n}s\"` \
                                 for seconds (units: ms, s, m, h, d)"
                            ),
                        ));
                    }
                    other => {
                        return Err(problem(
                            Site::Value,
                            format!(
                                "`{name}` expects a duration string, found {}: write \
                                 `{example}` (units: ms, s, m, h, d)",
                                found(other)
                            ),
                        ));
                    }
                };
                match key {
                    Key::RetryDelay => self.retry_delay = Some(d),
                    Key::Timeout => self.timeout = Some(d),
                    _ => self.dedup_ttl = Some(d),
                }
            }
            Shape::Flag => {}
        }
        Ok(())
    }

    /// Every broken rule, in a stable order, against RabbitMQ's default
    /// `consumer_timeout`. Empty means valid.
    pub fn validate(&self) -> Vec<Problem> {
        self.validate_against(defaults::BROKER_CONSUMER_TIMEOUT)
    }

    /// [`ConsumerModel::validate`] against a broker whose `consumer_timeout` is
    /// `consumer_timeout`.
    pub fn validate_against(&self, consumer_timeout: Duration) -> Vec<Problem> {
        let mut rules = Rules {
            m: self,
            problems: Vec::new(),
        };
        rules.run(consumer_timeout);
        rules.problems
    }

    /// Whether `key` was written (with a readable value or not).
    fn written(&self, key: Key) -> bool {
        self.unreadable.contains(&key)
            || match key {
                Key::Queue => self.queue.is_some(),
                Key::Exchange => self.exchange.is_some(),
                Key::ExchangeType => self.exchange_type.is_some(),
                Key::RoutingKey => self.routing_key.is_some(),
                Key::Dlx => self.dlx.is_some(),
                Key::Dlq => self.dlq.is_some(),
                Key::QueueType => self.queue_type.is_some(),
                Key::DeliveryLimit => self.delivery_limit.is_some(),
                Key::Prefetch => self.prefetch.is_some(),
                Key::Concurrency => self.concurrency.is_some(),
                Key::MaxRetries => self.max_retries.is_some(),
                Key::RetryDelay => self.retry_delay.is_some(),
                Key::RetryBackoff => self.retry_backoff.is_some(),
                Key::Timeout => self.timeout.is_some(),
                Key::Idempotent => self.idempotent,
                Key::DedupTtl => self.dedup_ttl.is_some(),
                Key::SingleActiveConsumer => self.single_active_consumer,
                Key::Priority => self.priority.is_some(),
                Key::Exclusive => self.exclusive,
                Key::Inbox => self.inbox,
            }
    }

    // ---- the values the runtime uses, defaults applied ----

    /// The work queue.
    pub fn queue(&self) -> &str {
        self.queue.as_deref().unwrap_or("")
    }

    /// The dead-letter exchange.
    pub fn dlx(&self) -> &str {
        self.dlx.as_deref().unwrap_or("")
    }

    /// The exchange bound to, if any.
    pub fn exchange(&self) -> Option<&str> {
        self.exchange.as_deref()
    }

    /// The exchange's type.
    pub fn exchange_kind(&self) -> ExchangeKind {
        self.exchange_type.unwrap_or(ExchangeKind::Topic)
    }

    /// The binding key: `routing_key` if set, else the queue name.
    pub fn binding_key(&self) -> &str {
        self.routing_key.as_deref().unwrap_or(self.queue())
    }

    /// The dead-letter queue: `dlq` if set, else `{queue}.dlq`.
    pub fn dlq_name(&self) -> String {
        self.dlq
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.queue()))
    }

    /// Classic or quorum.
    pub fn queue_kind(&self) -> QueueKind {
        self.queue_type.unwrap_or(QueueKind::Classic)
    }

    /// The `x-delivery-limit` to declare, for quorum queues only.
    pub fn effective_delivery_limit(&self) -> Option<u32> {
        match self.queue_kind() {
            QueueKind::Classic => None,
            QueueKind::Quorum => Some(match self.delivery_limit {
                Some(limit) => u32::try_from(limit).unwrap_or(u32::MAX),
                None => self
                    .max_retries()
                    .saturating_add(defaults::DELIVERY_LIMIT_MARGIN),
            }),
        }
    }

    /// `basic.qos` prefetch.
    pub fn prefetch(&self) -> u16 {
        self.prefetch
            .map_or(defaults::PREFETCH, |p| u16::try_from(p).unwrap_or(u16::MAX))
    }

    /// Handlers in flight at once.
    pub fn concurrency(&self) -> u16 {
        self.concurrency.map_or(defaults::CONCURRENCY, |c| {
            u16::try_from(c).unwrap_or(u16::MAX)
        })
    }

    /// Retries before dead-lettering.
    pub fn max_retries(&self) -> u32 {
        self.max_retries.map_or(defaults::MAX_RETRIES, |r| {
            u32::try_from(r).unwrap_or(u32::MAX)
        })
    }

    /// Delay before the first retry.
    pub fn retry_delay(&self) -> Duration {
        self.retry_delay.unwrap_or(defaults::RETRY_DELAY)
    }

    /// Growth of the retry delay.
    pub fn retry_backoff(&self) -> RetryBackoff {
        self.retry_backoff.unwrap_or(defaults::RETRY_BACKOFF)
    }

    /// Handler deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(defaults::TIMEOUT)
    }

    /// How long handled ids are remembered.
    pub fn dedup_ttl(&self) -> Duration {
        self.dedup_ttl.unwrap_or(defaults::DEDUP_TTL)
    }

    /// Whether the queue is declared with `x-single-active-consumer`.
    pub fn single_active_consumer(&self) -> bool {
        self.single_active_consumer
    }

    /// The `x-priority` consumer argument, if one was set.
    pub fn priority(&self) -> Option<i32> {
        self.priority.map(|p| i32::try_from(p).unwrap_or(i32::MAX))
    }

    /// Whether the subscription is exclusive.
    pub fn exclusive(&self) -> bool {
        self.exclusive
    }

    /// The retry ladder.
    pub fn ladder(&self) -> RetryLadder {
        RetryLadder::new(
            self.queue(),
            self.max_retries(),
            self.retry_delay(),
            self.retry_backoff(),
        )
    }

    /// The wait queue a message goes to when another instance holds its dedup claim
    /// (idempotent consumers only): as long as a first retry would wait, capped like every
    /// tier and never less than [`defaults::REQUEUE_MIN_DELAY`] (no hot requeue loop).
    pub fn requeue_tier(&self) -> Option<(String, Duration)> {
        self.idempotent.then(|| {
            let delay = self
                .retry_delay()
                .clamp(defaults::REQUEUE_MIN_DELAY, RetryBackoff::MAX_DELAY);
            (tier_queue_name(self.queue(), delay), delay)
        })
    }

    /// Every wait queue to declare: the ladder's tiers plus the dedup requeue tier.
    pub fn wait_queues(&self) -> Vec<(String, Duration)> {
        let mut tiers = self.ladder().tiers();
        if let Some(t) = self.requeue_tier()
            && !tiers.iter().any(|(name, _)| name == &t.0)
        {
            tiers.push(t);
        }
        tiers
    }
}

/// The rules, each a small `check_*` with the reason it exists.
struct Rules<'a> {
    m: &'a ConsumerModel,
    problems: Vec<Problem>,
}

impl Rules<'_> {
    fn report(&mut self, key: Key, site: Site, message: impl Into<String>) {
        self.problems.push(Problem {
            key,
            site,
            message: message.into(),
        });
    }

    fn run(&mut self, consumer_timeout: Duration) {
        self.check_queue_present();
        self.check_dlx_present();
        let m = self.m;
        for (key, name) in [
            (Key::Queue, &m.queue),
            (Key::Exchange, &m.exchange),
            (Key::Dlx, &m.dlx),
            (Key::Dlq, &m.dlq),
        ] {
            if let Some(name) = name {
                self.check_name_not_empty(key, name);
                self.check_name_length(key, name);
                self.check_name_not_reserved(key, name);
            }
        }
        if let Some(routing_key) = &m.routing_key {
            self.check_name_length(Key::RoutingKey, routing_key);
        }
        self.check_dlx_not_exchange();
        self.check_dlq_not_queue();
        self.check_routing_key_needs_exchange();
        self.check_exchange_type_needs_exchange();
        self.check_routing_key_not_ignored();
        self.check_delivery_limit_needs_quorum();
        self.check_dedup_ttl_needs_idempotent();
        self.check_inbox_not_idempotent();
        self.check_delivery_limit_range();
        self.check_prefetch_range();
        self.check_concurrency_range();
        self.check_max_retries_range();
        self.check_priority_range();
        self.check_exclusive_not_quorum();
        self.check_single_active_consumer_one_at_a_time();
        self.check_durations_positive();
        self.check_timeout_below_consumer_timeout(consumer_timeout);
        self.check_derived_names();
    }

    /// The queue name to build example names from (`{queue}.dlx`), without a reserved
    /// `amq.` prefix, or `fallback` when there is no usable queue name.
    fn queue_stem<'a>(&'a self, fallback: &'a str) -> &'a str {
        let queue = self.m.queue.as_deref().unwrap_or("");
        let queue = queue.strip_prefix("amq.").unwrap_or(queue);
        if queue.is_empty() { fallback } else { queue }
    }

    /// Without a queue there is nothing to consume.
    fn check_queue_present(&mut self) {
        if !self.m.written(Key::Queue) && !self.m.suggested.contains(&Key::Queue) {
            self.report(
                Key::Queue,
                Site::Attribute,
                "missing `queue`: name the queue to consume from, e.g. \
                 `#[consumer(queue = \"orders\", dlx = \"orders.dlx\")]`",
            );
        }
    }

    /// A failed or undecodable message must have somewhere to go, or it is lost. This is
    /// also the rule for `max_retries` without a dead-letter exchange: one error, not two.
    fn check_dlx_present(&mut self) {
        if self.m.written(Key::Dlx) || self.m.suggested.contains(&Key::Dlx) {
            return;
        }
        let dlx = format!("dlx = \"{}.dlx\"", self.queue_stem("<queue>"));
        let message = match self.m.max_retries {
            Some(retries) if retries > 0 => format!(
                "missing `dlx`: a message that still fails after `max_retries = {retries}` \
                 must be dead-lettered, and needs a dead-letter exchange to go to; add `{dlx}`"
            ),
            Some(_) => format!(
                "missing `dlx`: even with `max_retries = 0`, rejected and undecodable messages \
                 must be dead-lettered somewhere; add `{dlx}`"
            ),
            None => format!(
                "missing `dlx`: failed and undecodable messages must be dead-lettered \
                 somewhere, not dropped; add `{dlx}` (its queue is declared for you)"
            ),
        };
        self.report(Key::Dlx, Site::Attribute, message);
    }

    /// An empty name means something else to the broker (a generated queue, the default
    /// exchange), never what the user meant by writing the key.
    fn check_name_not_empty(&mut self, key: Key, name: &str) {
        if !name.is_empty() {
            return;
        }
        let queue = self.queue_stem("orders");
        let message = match key {
            Key::Queue => "`queue` cannot be empty: an empty name makes the broker generate \
                           a new one on every start; name it, e.g. `queue = \"orders\"`"
                .to_owned(),
            Key::Exchange => "`exchange` cannot be empty: to consume from the default \
                              exchange, remove `exchange`"
                .to_owned(),
            Key::Dlx => format!(
                "`dlx` cannot be empty: name the dead-letter exchange, e.g. \
                 `dlx = \"{queue}.dlx\"`"
            ),
            _ => format!("`dlq` cannot be empty: remove `dlq` to use `{queue}.dlq`, or name it"),
        };
        self.report(key, Site::Value, message);
    }

    /// The broker refuses names over 255 bytes (AMQP short strings).
    fn check_name_length(&mut self, key: Key, name: &str) {
        let len = name.len();
        if len > MAX_NAME_BYTES {
            self.report(
                key,
                Site::Value,
                format!(
                    "`{key}` is {len} bytes long; AMQP allows at most {MAX_NAME_BYTES}: shorten it"
                ),
            );
        }
    }

    /// `amq.` names are reserved: declaring one fails with ACCESS_REFUSED at start-up.
    fn check_name_not_reserved(&mut self, key: Key, name: &str) {
        if !name.starts_with("amq.") {
            return;
        }
        let queue = self.queue_stem("orders");
        let message = match key {
            Key::Exchange => "exchange names starting with `amq.` are reserved by RabbitMQ: \
                              the built-in `amq.*` exchanges cannot be declared by clients; \
                              use an exchange of your own, e.g. `exchange = \"events\"`"
                .to_owned(),
            Key::Queue => format!(
                "queue names starting with `amq.` are reserved by RabbitMQ (declaring one is \
                 refused); choose another name, e.g. `queue = \"{queue}\"`"
            ),
            _ => format!(
                "{key} names starting with `amq.` are reserved by RabbitMQ (declaring one is \
                 refused); choose another name, e.g. `{key} = \"{queue}.{key}\"`"
            ),
        };
        self.report(key, Site::Value, message);
    }

    /// Dead letters published to the exchange the queue is bound to can route straight
    /// back into the queue: a failing message would loop forever instead of resting in the
    /// DLQ.
    fn check_dlx_not_exchange(&mut self) {
        if let (Some(dlx), Some(exchange)) = (&self.m.dlx, &self.m.exchange)
            && dlx == exchange
            && !dlx.is_empty()
        {
            let queue = self.queue_stem("orders");
            let message = format!(
                "`dlx` is the same exchange as `exchange`: dead letters could be routed back \
                 into this queue and loop forever; use a separate exchange, e.g. \
                 `dlx = \"{queue}.dlx\"`"
            );
            self.report(Key::Dlx, Site::Value, message);
        }
    }

    /// A DLQ that is the consumed queue would hand every dead letter back to the handler.
    fn check_dlq_not_queue(&mut self) {
        if let (Some(dlq), Some(queue)) = (&self.m.dlq, &self.m.queue)
            && dlq == queue
            && !dlq.is_empty()
        {
            let message = format!(
                "`dlq` is the consumed queue itself: dead letters would be handled again, \
                 forever; use a separate queue, e.g. `dlq = \"{queue}.dlq\"`, or remove `dlq`"
            );
            self.report(Key::Dlq, Site::Value, message);
        }
    }

    /// The default exchange routes by queue name only; it cannot have other bindings.
    fn check_routing_key_needs_exchange(&mut self) {
        if self.m.written(Key::RoutingKey) && !self.m.written(Key::Exchange) {
            self.report(
                Key::RoutingKey,
                Site::Key,
                "`routing_key` needs `exchange`: without one the queue gets messages \
                 published to the default exchange with its name as the routing key; add \
                 `exchange = \"...\"`, or remove `routing_key`",
            );
        }
    }

    /// An exchange type with no exchange to declare would be silently ignored.
    fn check_exchange_type_needs_exchange(&mut self) {
        if self.m.written(Key::ExchangeType) && !self.m.written(Key::Exchange) {
            self.report(
                Key::ExchangeType,
                Site::Key,
                "`exchange_type` needs `exchange`: it is the type of the exchange to bind to; \
                 add `exchange = \"...\"`, or remove `exchange_type`",
            );
        }
    }

    /// Fanout and headers exchanges ignore routing keys: the key would filter nothing.
    fn check_routing_key_not_ignored(&mut self) {
        if !self.m.written(Key::RoutingKey) {
            return;
        }
        let message = match self.m.exchange_type {
            Some(ExchangeKind::Fanout) => {
                "a `fanout` exchange ignores routing keys and sends every message to every \
                 bound queue: remove `routing_key`, or use a `direct` or `topic` exchange to \
                 filter"
            }
            Some(ExchangeKind::Headers) => {
                "a `headers` exchange routes on message headers and ignores routing keys: \
                 remove `routing_key`, or use a `direct` or `topic` exchange to filter"
            }
            _ => return,
        };
        self.report(Key::RoutingKey, Site::Key, message);
    }

    /// `x-delivery-limit` only exists on quorum queues; on a classic queue it does nothing.
    fn check_delivery_limit_needs_quorum(&mut self) {
        if !self.m.written(Key::DeliveryLimit) {
            return;
        }
        match self.m.queue_type {
            Some(QueueKind::Quorum) => {}
            Some(QueueKind::Classic) => self.report(
                Key::DeliveryLimit,
                Site::Key,
                "`delivery_limit` only applies to quorum queues, and this one is classic: use \
                 `queue_type = \"quorum\"`, or remove `delivery_limit`",
            ),
            // An unreadable `queue_type` has its own error.
            None if self.m.written(Key::QueueType) => {}
            None => self.report(
                Key::DeliveryLimit,
                Site::Key,
                "`delivery_limit` only applies to quorum queues (classic is the default): add \
                 `queue_type = \"quorum\"`, or remove `delivery_limit`",
            ),
        }
    }

    /// A TTL for deduplication that is off would be silently ignored.
    fn check_dedup_ttl_needs_idempotent(&mut self) {
        if self.m.written(Key::DedupTtl)
            && !self.m.written(Key::Idempotent)
            && !self.m.written(Key::Inbox)
        {
            self.report(
                Key::DedupTtl,
                Site::Key,
                "`dedup_ttl` has no effect without `idempotent` (or `inbox`): add `idempotent` to \
                 deduplicate by message_id, or remove `dedup_ttl`",
            );
        }
    }

    /// Both deduplicate by message_id, in two places that cannot agree: a message marked
    /// done in Redis whose database transaction rolled back would be skipped for ever.
    fn check_inbox_not_idempotent(&mut self) {
        if self.m.written(Key::Inbox) && self.m.written(Key::Idempotent) {
            self.report(
                Key::Idempotent,
                Site::Key,
                "`inbox` already deduplicates by message_id, in the handler's database \
                 transaction; `idempotent` would do it a second time in Redis: remove \
                 `idempotent`",
            );
        }
    }

    /// Zero would dead-letter on the first redelivery after a crash: not a safety net.
    fn check_delivery_limit_range(&mut self) {
        match self.m.delivery_limit {
            Some(0) => self.report(
                Key::DeliveryLimit,
                Site::Value,
                "`delivery_limit` must be at least 1: it is how many times the broker \
                 redelivers a message (after a crash or a lost connection) before \
                 dead-lettering it",
            ),
            Some(limit) if u32::try_from(limit).is_err() => self.report(
                Key::DeliveryLimit,
                Site::Value,
                format!("`delivery_limit` must be at most {}", u32::MAX),
            ),
            _ => {}
        }
    }

    /// `basic.qos` prefetch is 16 bits, and 0 means unlimited: the broker would push the
    /// whole queue into this process.
    fn check_prefetch_range(&mut self) {
        match self.m.prefetch {
            Some(0) => self.report(
                Key::Prefetch,
                Site::Value,
                "`prefetch` must be from 1 to 65535: 0 means unlimited, and the broker would \
                 push the whole queue into memory",
            ),
            Some(p) if u16::try_from(p).is_err() => self.report(
                Key::Prefetch,
                Site::Value,
                "`prefetch` must be from 1 to 65535 (the AMQP prefetch count is 16 bits)",
            ),
            _ => {}
        }
    }

    /// Handlers beyond the prefetch would never get a message; zero handlers would never
    /// ack.
    fn check_concurrency_range(&mut self) {
        let Some(concurrency) = self.m.concurrency else {
            return;
        };
        if concurrency == 0 {
            self.report(
                Key::Concurrency,
                Site::Value,
                "`concurrency` must be at least 1: it is how many messages are handled at once",
            );
            return;
        }
        let (max, prefetch) = match self.m.prefetch {
            Some(p) if (1..=u64::from(u16::MAX)).contains(&p) => (p, format!("`prefetch = {p}`")),
            // An invalid prefetch has its own error; comparing with it would only add noise.
            Some(_) => return,
            None if self.m.written(Key::Prefetch) => return,
            None => (
                u64::from(defaults::PREFETCH),
                format!("the default `prefetch = {}`", defaults::PREFETCH),
            ),
        };
        if concurrency > max {
            self.report(
                Key::Concurrency,
                Site::Value,
                format!(
                    "`concurrency = {concurrency}` exceeds {prefetch}: at most {max} messages \
                     are delivered at once, so the extra handlers would sit idle; raise \
                     `prefetch` to at least {concurrency}, or lower `concurrency`"
                ),
            );
        }
    }

    /// The runtime counts attempts in a `u32`.
    fn check_max_retries_range(&mut self) {
        if let Some(retries) = self.m.max_retries
            && u32::try_from(retries).is_err()
        {
            self.report(
                Key::MaxRetries,
                Site::Value,
                format!("`max_retries` must be at most {}", u32::MAX),
            );
        }
    }

    /// The broker reads `x-priority` as a signed 32-bit integer.
    fn check_priority_range(&mut self) {
        if let Some(priority) = self.m.priority
            && i32::try_from(priority).is_err()
        {
            self.report(
                Key::Priority,
                Site::Value,
                format!("`priority` must be at most {}", i32::MAX),
            );
        }
    }

    /// Quorum queues fail over between nodes and hand a subscription to another node's
    /// replica; their answer to "one consumer at a time" is single active consumer, which
    /// keeps a standby subscribed and moves it up, where an exclusive subscription locks
    /// every other instance out and leaves the queue without a consumer until one of them
    /// happens to retry.
    fn check_exclusive_not_quorum(&mut self) {
        if self.m.exclusive && self.m.queue_type == Some(QueueKind::Quorum) {
            self.report(
                Key::Exclusive,
                Site::Key,
                "`exclusive` is refused on a quorum queue: for one consumer at a time with \
                 standbys that take over, use `single_active_consumer` instead of \
                 `exclusive`",
            );
        }
    }

    /// Single active consumer exists to have one consumer handle the queue in order;
    /// several handlers at once would reorder its messages again, leaving only the cost
    /// (every other instance idle) without the benefit. An error, not a warning in the
    /// docs: a warning nobody reads is how ordering bugs ship.
    fn check_single_active_consumer_one_at_a_time(&mut self) {
        if !self.m.single_active_consumer {
            return;
        }
        match self.m.concurrency {
            Some(c) if c > 1 => self.report(
                Key::Concurrency,
                Site::Value,
                format!(
                    "`concurrency = {c}` with `single_active_consumer` would handle up to {c} \
                     messages at once, out of order, which is what a single active consumer is \
                     there to prevent: remove `concurrency` (1 at a time), or remove \
                     `single_active_consumer` and let several consumers compete"
                ),
            ),
            _ => {}
        }
    }

    /// A zero timeout fails every call, a zero retry delay is a hot loop through the broker,
    /// and a zero dedup TTL forgets a message as soon as it is handled.
    fn check_durations_positive(&mut self) {
        for (key, value) in [
            (Key::RetryDelay, self.m.retry_delay),
            (Key::Timeout, self.m.timeout),
            (Key::DedupTtl, self.m.dedup_ttl),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                self.report(
                    key,
                    Site::Value,
                    format!(
                        "`{key}` is zero; a duration must be greater than zero: write e.g. `{}`",
                        key.example()
                    ),
                );
            }
        }
    }

    /// RabbitMQ closes the channel of a delivery left unacked past its `consumer_timeout`
    /// (30 minutes by default): a handler allowed to run that long would take every other
    /// delivery of the channel down with it, and come back forever.
    fn check_timeout_below_consumer_timeout(&mut self, consumer_timeout: Duration) {
        if let Some(timeout) = self.m.timeout
            && timeout >= consumer_timeout
        {
            let limit = crate::format_duration(consumer_timeout);
            self.report(
                Key::Timeout,
                Site::Value,
                format!(
                    "`timeout = \"{}\"` is not below the broker's consumer_timeout ({limit}): \
                     RabbitMQ closes the channel of a delivery left unacked that long; keep the \
                     handler timeout below it (split the work, or publish a follow-up \
                     message), or raise consumer_timeout on the broker and set \
                     RELIABLE_MQ_CONSUMER_TIMEOUT to match",
                    crate::format_duration(timeout)
                ),
            );
        }
    }

    /// The DLQ and the retry tiers get names derived from the queue; the broker refuses
    /// any over 255 bytes, and it must fail here, not at start-up.
    fn check_derived_names(&mut self) {
        let m = self.m;
        if !m.written(Key::Queue) || m.queue().is_empty() || m.queue().len() > MAX_NAME_BYTES {
            return; // no queue, or its own error already says it
        }
        if m.dlq.is_none() {
            let dlq = m.dlq_name();
            if dlq.len() > MAX_NAME_BYTES {
                self.report(
                    Key::Queue,
                    Site::Value,
                    format!(
                        "the dead-letter queue name `{{queue}}.dlq` would be {} bytes; AMQP \
                         allows at most {MAX_NAME_BYTES}: shorten `queue`, or name the DLQ \
                         with `dlq = \"...\"`",
                        dlq.len()
                    ),
                );
            }
        }
        if let Some((tier, _)) = m
            .wait_queues()
            .into_iter()
            .max_by_key(|(name, _)| name.len())
            && tier.len() > MAX_NAME_BYTES
        {
            self.report(
                Key::Queue,
                Site::Value,
                format!(
                    "the retry queue name `{}` would be {} bytes; AMQP allows at most \
                     {MAX_NAME_BYTES}: shorten `queue`",
                    abbreviate(&tier),
                    tier.len()
                ),
            );
        }
    }
}

fn negative(key: Key) -> Problem {
    Problem {
        key,
        site: Site::Value,
        message: format!("`{key}` cannot be negative: write `{}`", key.example()),
    }
}

fn wrong_literal_for_string(key: Key, found_what: &str, value: Value<'_>) -> Problem {
    let text = match value {
        Value::Int(n) => n.to_string(),
        _ => String::new(),
    };
    let message = if text.is_empty() {
        format!(
            "`{key}` expects a string, found {found_what}: write `{}`",
            key.example()
        )
    } else {
        format!("`{key}` expects a string, found {found_what}: write `{key} = \"{text}\"`")
    };
    Problem {
        key,
        site: Site::Value,
        message,
    }
}

fn found(value: Value<'_>) -> &'static str {
    match value {
        Value::Str(_) => "a string",
        Value::Int(_) | Value::Negative | Value::TooLarge => "an integer",
        Value::Other { found, .. } => found,
        Value::Flag | Value::List => "nothing",
    }
}

fn is_word(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// A long name shortened for a message: its start and its end.
fn abbreviate(name: &str) -> String {
    if name.len() <= 60 {
        return name.to_owned();
    }
    let mut head = 24;
    while !name.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = name.len() - 24;
    while !name.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}...{}", &name[..head], &name[tail..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(pairs: &[(Key, Value<'_>)]) -> ConsumerModel {
        let mut m = ConsumerModel::default();
        for (k, v) in pairs {
            let _ = m.set(*k, *v);
        }
        m
    }

    fn minimal() -> ConsumerModel {
        model(&[
            (Key::Queue, Value::Str("orders")),
            (Key::Dlx, Value::Str("orders.dlx")),
        ])
    }

    fn keys(problems: &[Problem]) -> Vec<Key> {
        problems.iter().map(|p| p.key).collect()
    }

    #[test]
    fn minimal_is_valid_and_defaults_apply() {
        let m = minimal();
        assert_eq!(m.validate(), vec![]);
        assert_eq!(m.prefetch(), defaults::PREFETCH);
        assert_eq!(m.dlq_name(), "orders.dlq");
        assert_eq!(m.binding_key(), "orders");
        assert_eq!(m.effective_delivery_limit(), None);
    }

    #[test]
    fn missing_required_keys() {
        let problems = ConsumerModel::default().validate();
        assert_eq!(keys(&problems), vec![Key::Queue, Key::Dlx]);
        assert!(problems.iter().all(|p| p.site == Site::Attribute));
    }

    #[test]
    fn headers_exchange_refuses_a_routing_key_on_both_sides() {
        let mut m = minimal();
        m.exchange = Some("shop".into());
        m.exchange_type = Some(ExchangeKind::Headers);
        m.routing_key = Some("x".into());
        assert_eq!(keys(&m.validate()), vec![Key::RoutingKey]);
    }

    #[test]
    fn derived_names_are_checked() {
        let mut m = minimal();
        m.queue = Some("q".repeat(252));
        let problems = m.validate();
        assert!(
            problems.iter().any(|p| p.message.contains("`{queue}.dlq`")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains("retry queue name")),
            "{problems:?}"
        );
        m.dlq = Some("short.dlq".into());
        m.max_retries = Some(0);
        assert_eq!(m.validate(), vec![]);
    }

    #[test]
    fn timeout_must_stay_below_the_consumer_timeout() {
        let mut m = minimal();
        m.timeout = Some(Duration::from_secs(30 * 60));
        assert_eq!(keys(&m.validate()), vec![Key::Timeout]);
        m.timeout = Some(Duration::from_secs(29 * 60));
        assert_eq!(m.validate(), vec![]);
        assert_eq!(
            keys(&m.validate_against(Duration::from_secs(60))),
            vec![Key::Timeout]
        );
    }

    #[test]
    fn zero_durations_are_refused() {
        let m = model(&[
            (Key::Queue, Value::Str("q")),
            (Key::Dlx, Value::Str("q.dlx")),
            (Key::Timeout, Value::Str("0s")),
        ]);
        assert_eq!(keys(&m.validate()), vec![Key::Timeout]);
    }

    #[test]
    fn values_are_read_with_helpful_errors() {
        let mut m = ConsumerModel::default();
        let e = m.set(Key::Prefetch, Value::Str("64")).err();
        assert!(e.is_some_and(|p| p.message.contains("remove the quotes")));
        let e = m.set(Key::Timeout, Value::Int(500)).err();
        assert!(
            e.is_some_and(|p| p.message.contains("\"500ms\"") && p.message.contains("\"500s\""))
        );
        let e = m.set(Key::Idempotent, Value::Int(1)).err();
        assert!(e.is_some_and(|p| p.site == Site::Entry));
        assert!(m.unreadable.contains(&Key::Prefetch));
        assert!(m.set(Key::Idempotent, Value::Flag).is_ok());
        assert!(m.idempotent);
    }

    #[test]
    fn an_unreadable_key_silences_the_rules_about_it() {
        let mut m = minimal();
        let _ = m.set(Key::QueueType, Value::Str("qorum"));
        let _ = m.set(Key::DeliveryLimit, Value::Int(5));
        assert_eq!(m.validate(), vec![], "the bad queue_type has its own error");
    }

    #[test]
    fn cluster_options_are_read_and_checked() {
        let m = model(&[
            (Key::Queue, Value::Str("q")),
            (Key::Dlx, Value::Str("q.dlx")),
            (Key::SingleActiveConsumer, Value::Flag),
            (Key::Priority, Value::Int(7)),
            (Key::Exclusive, Value::Flag),
        ]);
        assert_eq!(m.validate(), vec![]);
        assert!(m.single_active_consumer() && m.exclusive());
        assert_eq!(m.priority(), Some(7));

        let mut quorum = m.clone();
        quorum.queue_type = Some(QueueKind::Quorum);
        assert_eq!(keys(&quorum.validate()), vec![Key::Exclusive]);
        quorum.exclusive = false;
        assert_eq!(
            quorum.validate(),
            vec![],
            "single active consumer suits quorum"
        );

        let mut parallel = m.clone();
        parallel.concurrency = Some(2);
        assert_eq!(keys(&parallel.validate()), vec![Key::Concurrency]);
        parallel.single_active_consumer = false;
        assert_eq!(parallel.validate(), vec![]);

        let mut high = m;
        high.priority = Some(u64::from(u32::MAX));
        assert_eq!(keys(&high.validate()), vec![Key::Priority]);

        let mut flags = ConsumerModel::default();
        let e = flags.set(Key::Exclusive, Value::Int(1)).err();
        assert!(e.is_some_and(|p| p.message.contains("write just `exclusive`")));
        assert!(flags.set(Key::Priority, Value::Negative).is_err());
    }

    #[test]
    fn keys_round_trip_and_suggest() {
        for k in Key::ALL {
            assert_eq!(Key::from_name(k.as_str()), Some(k));
        }
        assert_eq!(Key::suggest("prefech"), Some(Key::Prefetch));
        assert_eq!(Key::suggest("Dead_Letter_Exchange"), Some(Key::Dlx));
        assert_eq!(Key::suggest("colour"), None);
    }
}
