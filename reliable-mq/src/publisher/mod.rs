//! Confirmed publishing: a message leaves the caller's hands only once the broker has
//! confirmed it (persisted, for durable queues).
//!
//! One connection, one confirm-mode channel, many publishes in flight at once: each
//! `publish` sends its frames and then waits for its own confirm, so concurrent callers
//! pipeline naturally and never pay one round trip each in sequence.
//!
//! A nack, a confirm timeout or a lost connection is retried with a short, growing backoff
//! under the same `message_id` (the consumer's dedup absorbs the duplicate), at most
//! [`Config::publish_retries`] times, after a nack on a fresh channel (a RabbitMQ channel
//! can keep nacking a quorum queue whose leader's node died; see `judge`); an unroutable
//! message, a refused exchange, an oversized body or a blocked broker is not, since trying
//! again cannot help.
//!
//! From inside a handler, [`Delivery::publisher`](crate::Delivery::publisher) hands out
//! the app's publisher (its own connection, shared by all consumers):
//!
//! ```no_run
//! use reliable_mq::{Delivery, HandlerError};
//!
//! # #[derive(serde::Deserialize)] struct Order { id: u64 }
//! async fn reserve(order: Order, delivery: &Delivery) -> Result<(), HandlerError> {
//!     if let Some(publisher) = delivery.publisher() {
//!         // Confirmed before the handler returns, so before the order is acked.
//!         publisher
//!             .publish("shop", "stock.reserved", &serde_json::json!({"order": order.id}))
//!             .await?;
//!     }
//!     Ok(())
//! }
//! ```
//!
//! # How each outcome is known to be this publish's own
//!
//! lapin 4 pairs a `basic.return` with whichever confirm the next ack resolves first, and
//! a return carries no delivery tag, so under load one publish's return can arrive on
//! another's confirm. Outcomes are therefore decided by the [`ledger`], from what
//! identifies the very publish: its `message_id` while it is the only publish in flight
//! with that id, otherwise a per-attempt token header
//! ([`TOKEN_HEADER`](ledger::TOKEN_HEADER)). Every return is recorded under its owner,
//! in the order lapin received it, before any ack of its batch is judged. The ledger owns
//! lapin's futures, so a cancelled or timed-out publish leaves nothing behind in lapin.
//!
//! The other way, patching lapin, was rejected: a `[patch]` applies only inside this
//! repository, so applications depending on reliable-mq would build against the
//! unpatched lapin; and a return carries no delivery tag, so even a patched lapin needs
//! something in the message to name its publish. The token costs nothing in the usual
//! case (ids unique among the publishes in flight): only a publish reusing an id still
//! in flight carries it.
//!
//! lapin numbers a publish (for its confirm) and queues its frames in one synchronous
//! step; the ledger takes that step under its lock, so the numbering order is the wire
//! order and each ack and nack reaches the publish it is for.
//!
//! # Limits
//!
//! Exchange, routing key, `message_id`, header keys and every string property are AMQP
//! short strings (255 bytes); headers nest at most
//! [`MAX_HEADER_DEPTH`](limits::MAX_HEADER_DEPTH) levels and, with the other properties,
//! must fit in one frame; the body at most [`Config::max_body_size`]. A value over a
//! limit is [`PublishError::Invalid`] (or [`PublishError::TooLarge`]) before anything is
//! sent; the publisher stays usable.

pub mod ledger;
pub mod limits;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use tracing::{Instrument, debug, warn};

use crate::connection;
use crate::observe::publish_metrics;
use crate::{Config, Error};
use ledger::{Ledger, Outcome};

/// Why a publish did not get the broker's confirmation.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The broker refused the message (nack), even after retries.
    #[error(
        "broker nacked message {message_id} (retried {retries} times); the queue may be full (x-max-length with reject-publish) or the broker out of resources"
    )]
    Nacked {
        /// The message's id.
        message_id: String,
        /// Retries made.
        retries: u32,
    },
    /// No queue is bound for this exchange and routing key (a `mandatory` return).
    #[error(
        "message {message_id} is unroutable: no queue is bound to exchange {exchange:?} with routing key {routing_key:?} ({reply}); declare the consumer's binding first"
    )]
    Unroutable {
        /// The message's id.
        message_id: String,
        /// Exchange published to.
        exchange: String,
        /// Routing key used.
        routing_key: String,
        /// The broker's reply code and text, e.g. `312 NO_ROUTE`.
        reply: String,
    },
    /// No confirm arrived within the timeout on the last attempt, even after retries; the
    /// outcome is unknown: the broker may or may not have the message.
    #[error(
        "no confirm for message {message_id} within {timeout:?} (retried {retries} times); the broker may or may not have it: publish again with the same message_id"
    )]
    ConfirmTimeout {
        /// The message's id.
        message_id: String,
        /// The configured confirm timeout.
        timeout: Duration,
        /// Retries made.
        retries: u32,
    },
    /// The connection dropped before the confirm, even after retries; outcome unknown.
    #[error(
        "connection lost before message {message_id} was confirmed (retried {retries} times): {reason}"
    )]
    ConnectionLost {
        /// The message's id.
        message_id: String,
        /// Retries made.
        retries: u32,
        /// The last error.
        reason: String,
    },
    /// The body exceeds the configured maximum; nothing was sent.
    #[error(
        "message body is {size} bytes, over the {max}-byte limit; nothing was sent (raise Config::max_body_size or send a reference to the data instead)"
    )]
    TooLarge {
        /// Body size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The value could not be serialized to JSON; nothing was sent.
    #[error("cannot serialize message to JSON: {0}")]
    Serialize(String),
    /// The broker refused the publish itself (e.g. the exchange does not exist or the user
    /// may not write to it); not retried.
    #[error(
        "broker refused message {message_id} for exchange {exchange:?} (reply code {code}): {reason}; declare the exchange (or grant access) first"
    )]
    Refused {
        /// The message's id.
        message_id: String,
        /// Exchange published to.
        exchange: String,
        /// The broker's reply code: 404 NOT_FOUND, 403 ACCESS_REFUSED, 406
        /// PRECONDITION_FAILED, ...
        code: u16,
        /// The broker's reply, e.g. `NOT_FOUND - no exchange 'x' in vhost '/'`.
        reason: String,
    },
    /// A value breaks an AMQP or configured limit (a short string over 255 bytes, headers
    /// nested too deep or too large for a frame); nothing was sent.
    #[error("invalid {field}: {reason}; nothing was sent")]
    Invalid {
        /// The field: `exchange`, `routing_key`, `message_id`, `header key "..."`,
        /// `headers`, `content_type`, ...
        field: String,
        /// Which limit it breaks.
        reason: String,
    },
    /// The broker kept the connection blocked (memory or disk alarm) past the limit.
    #[error(
        "broker blocked publishing for more than {0:?} (memory or disk alarm); check the broker's resources"
    )]
    Blocked(Duration),
}

impl PublishError {
    /// Whether the broker may have the message after all (confirm timeout or lost
    /// connection): publishing again with the same `message_id` is the safe reaction.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            Self::ConfirmTimeout { .. } | Self::ConnectionLost { .. }
        )
    }

    /// The message id the failed publish carried, when one was assigned.
    pub fn message_id(&self) -> Option<&str> {
        match self {
            Self::Nacked { message_id, .. }
            | Self::Unroutable { message_id, .. }
            | Self::ConfirmTimeout { message_id, .. }
            | Self::ConnectionLost { message_id, .. }
            | Self::Refused { message_id, .. } => Some(message_id),
            _ => None,
        }
    }
}

/// Per-publish options: a caller-chosen message id (business key, or the id of an earlier
/// attempt of the same logical message) and extra headers.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// Use this `message_id` instead of a fresh UUIDv7.
    pub message_id: Option<String>,
    /// Headers to add.
    pub headers: FieldTable,
    /// `content_type`, instead of `application/json`.
    pub content_type: Option<String>,
    /// The AMQP `type` property.
    pub kind: Option<String>,
    /// `app_id`.
    pub app_id: Option<String>,
    /// `correlation_id`.
    pub correlation_id: Option<String>,
    /// `reply_to`.
    pub reply_to: Option<String>,
    /// `expiration` (a per-message TTL in milliseconds, as a string).
    pub expiration: Option<String>,
    /// `user_id` (the broker checks it against the connection's user).
    pub user_id: Option<String>,
    /// A header key given to [`PublishOptions::header`] over the short-string limit:
    /// reported by the publish as [`PublishError::Invalid`], never a panic here.
    bad_header_key: Option<String>,
}

impl PublishOptions {
    /// Options with a fixed message id.
    pub fn with_message_id(id: impl Into<String>) -> Self {
        Self {
            message_id: Some(id.into()),
            ..Self::default()
        }
    }

    /// Add a string header. A key over 255 bytes makes the publish fail with
    /// [`PublishError::Invalid`] (nothing is sent).
    pub fn header(mut self, key: &str, value: impl Into<String>) -> Self {
        match ShortString::try_new(key) {
            Ok(k) => {
                self.headers
                    .insert(k, AMQPValue::LongString(value.into().into()));
            }
            Err(_) => self.bad_header_key = Some(key.to_owned()),
        }
        self
    }
}

/// A confirmed, pipelined publisher. Cheap to clone; use it from many tasks at once.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use reliable_mq::Publisher;
///
/// let publisher = Publisher::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
/// let id = publisher
///     .publish("shop", "order.created", &serde_json::json!({"id": 1, "qty": 2}))
///     .await?; // returns only after the broker's confirm
/// println!("confirmed {id}");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("url", &self.inner.config.redacted_amqp_url())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: Config,
    /// The live connection and channel. A std lock: it is held only to clone an `Arc`,
    /// never across an await.
    link: RwLock<Option<Arc<Link>>>,
    /// Serializes reconnects so a burst of failures opens one connection, not many.
    reconnecting: tokio::sync::Mutex<()>,
    /// Counts failed reconnects, so publishes queued behind a failing reconnect fail fast
    /// (and back off) instead of each trying the dead broker in turn.
    connect_failures: AtomicU64,
    last_connect_error: Mutex<String>,
    generation: AtomicU64,
    /// The connection of a link whose channel the broker closed over one publish (a
    /// refused exchange: 403, 404, 406): still good, so the next link opens a channel on
    /// it instead of a new connection.
    reusable: Mutex<Option<Arc<Connection>>>,
    /// Publish to the in-memory broker instead (feature `testing`), as `origin`.
    #[cfg(feature = "testing")]
    memory: Option<(
        Arc<crate::transport::memory::MemoryBroker>,
        crate::transport::memory::Origin,
    )>,
}

pub(crate) struct Link {
    connection: Arc<Connection>,
    channel: Channel,
    generation: u64,
    ledger: Arc<Ledger>,
}

impl Link {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

/// Reply codes with which the broker refuses a publish itself (closing the channel):
/// 403 ACCESS_REFUSED, 404 NOT_FOUND, 406 PRECONDITION_FAILED, 530 NOT_ALLOWED.
fn is_refusal(code: u16) -> bool {
    matches!(code, 403 | 404 | 406 | 530)
}

/// One attempt's failure, before retry policy is applied.
#[derive(Debug)]
enum AttemptError {
    Nacked,
    Unroutable(u16, String),
    /// A refusal reply code closed the channel. The close does not say which publish
    /// caused it, and every publish in flight on the channel sees it, so one sighting is
    /// not proof: see [`Publisher::publish_with_retries`].
    Refused(u16, String),
    Timeout,
    /// Outcome unknown: the channel or connection failed (320 CONNECTION_FORCED, 541
    /// INTERNAL_ERROR, I/O, heartbeat), before its confirm.
    Lost(String),
    Blocked,
}

impl AttemptError {
    fn outcome(&self) -> &'static str {
        match self {
            Self::Nacked => "nacked",
            Self::Unroutable(..) => "unroutable",
            Self::Refused(..) => "refused",
            Self::Timeout => "confirm_timeout",
            Self::Lost(_) => "connection_lost",
            Self::Blocked => "blocked",
        }
    }

    /// Whether another attempt with the same `message_id` can succeed.
    fn retryable(&self) -> bool {
        matches!(self, Self::Nacked | Self::Timeout | Self::Lost(_))
    }
}

/// How a publish path treats a confirm that is late.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Patience {
    /// After the confirm timeout, republish with the same `message_id` (the consumer's
    /// dedup absorbs a duplicate).
    Republish,
    /// Never republish a copy whose outcome is only late: keep waiting for its own
    /// confirm (see [`Publisher::publish_copy`]).
    AwaitOwnConfirm,
}

/// The delay before retry number `retry` (1-based): 50ms, 100ms, 200ms, ... capped at
/// `max`. Small at first (a nack from a briefly full queue, a reconnect in progress), so
/// the default budget of 5 retries spans about 1.5s.
fn retry_delay(retry: u32, max: Duration) -> Duration {
    let first = Duration::from_millis(50);
    first
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(max)
}

impl Inner {
    /// A publisher's state before its first connection.
    fn unconnected(config: &Config) -> Self {
        Self {
            config: config.clone(),
            link: RwLock::new(None),
            reconnecting: tokio::sync::Mutex::new(()),
            connect_failures: AtomicU64::new(0),
            last_connect_error: Mutex::new(String::new()),
            generation: AtomicU64::new(0),
            reusable: Mutex::new(None),
            #[cfg(feature = "testing")]
            memory: None,
        }
    }
}

impl Publisher {
    /// Connect to `url` with default settings.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::from_config(&Config::default().with_amqp_url(url)).await
    }

    /// Connect with the settings of `config` (timeouts, retries, size limit, connection
    /// name): the same [`Config`] an [`App`](crate::App) runs with.
    pub async fn from_config(config: &Config) -> Result<Self, Error> {
        let publisher = Self {
            inner: Arc::new(Inner::unconnected(config)),
        };
        let link = publisher.open_link().await?;
        *write(&publisher.inner.link) = Some(link);
        Ok(publisher)
    }

    /// A publisher on the in-memory broker of feature `testing`: the same validation,
    /// retries and error classification, one confirmed publish answered by `broker`.
    #[cfg(feature = "testing")]
    pub(crate) fn memory(
        config: &Config,
        broker: Arc<crate::transport::memory::MemoryBroker>,
        origin: crate::transport::memory::Origin,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                memory: Some((broker, origin)),
                ..Inner::unconnected(config)
            }),
        }
    }

    /// The configuration this publisher runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Publishes on the current channel whose broker answer has not been processed yet,
    /// including cancelled and timed-out ones (bounded; for monitoring and tests).
    pub fn in_flight(&self) -> usize {
        read(&self.inner.link)
            .as_ref()
            .map_or(0, |l| l.ledger.in_flight())
    }

    /// Returned messages on the current channel that matched no publish in flight. Always
    /// 0 unless the broker breaks the rule that a return precedes its publish's ack.
    pub fn stray_returns(&self) -> u64 {
        read(&self.inner.link)
            .as_ref()
            .map_or(0, |l| l.ledger.stray_returns())
    }

    /// Publish `value` as JSON and wait for the broker's confirm; returns the message id
    /// (a fresh UUIDv7).
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        exchange: &str,
        routing_key: &str,
        value: &T,
    ) -> Result<String, PublishError> {
        self.publish_with(exchange, routing_key, value, PublishOptions::default())
            .await
    }

    /// [`Publisher::publish`] with a caller-given message id and headers.
    pub async fn publish_with<T: Serialize + ?Sized>(
        &self,
        exchange: &str,
        routing_key: &str,
        value: &T,
        options: PublishOptions,
    ) -> Result<String, PublishError> {
        if let Some(key) = options.bad_header_key {
            return Err(limits::invalid(
                "header key",
                format!(
                    "is {} bytes; AMQP allows at most {}",
                    key.len(),
                    limits::MAX_SHORT_STRING
                ),
            ));
        }
        let (message_id, id) = match options.message_id {
            Some(id) => (limits::short("message_id", &id)?, id),
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                (ShortString::from(id.as_str()), id)
            }
        };
        let body = serde_json::to_vec(value).map_err(|e| PublishError::Serialize(e.to_string()))?;
        let content_type = match &options.content_type {
            Some(v) => limits::short("content_type", v)?,
            None => ShortString::from("application/json"),
        };
        let mut properties = BasicProperties::default()
            .with_content_type(content_type)
            .with_message_id(message_id);
        if let Some(v) = &options.kind {
            properties = properties.with_type(limits::short("type", v)?);
        }
        if let Some(v) = &options.app_id {
            properties = properties.with_app_id(limits::short("app_id", v)?);
        }
        if let Some(v) = &options.correlation_id {
            properties = properties.with_correlation_id(limits::short("correlation_id", v)?);
        }
        if let Some(v) = &options.reply_to {
            properties = properties.with_reply_to(limits::short("reply_to", v)?);
        }
        if let Some(v) = &options.expiration {
            properties = properties.with_expiration(limits::short("expiration", v)?);
        }
        if let Some(v) = &options.user_id {
            properties = properties.with_user_id(limits::short("user_id", v)?);
        }
        if !options.headers.inner().is_empty() {
            properties = properties.with_headers(options.headers);
        }
        self.publish_raw(exchange, routing_key, body, properties)
            .await?;
        Ok(id)
    }

    /// Publish each value of `values` with all confirms in flight at once; one outcome per
    /// value, in order. Each message is retried on its own, like [`Publisher::publish`].
    pub async fn publish_all<T: Serialize>(
        &self,
        exchange: &str,
        routing_key: &str,
        values: &[T],
    ) -> Vec<Result<String, PublishError>> {
        let publishes = values
            .iter()
            .map(|v| self.publish(exchange, routing_key, v));
        futures_util::future::join_all(publishes).await
    }

    /// Publish a body with the given properties (made persistent and timestamped for you;
    /// a `message_id` is added if missing) and wait for the confirm.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.publish_bytes(
            exchange,
            routing_key,
            body,
            properties,
            Some(self.inner.config.max_body_size),
            Patience::Republish,
        )
        .await
    }

    /// A retry or dead-letter copy of a message the broker already accepted, judged by the
    /// same ledger as every other publish. Two differences:
    /// - the body limit does not apply (the broker took this body once; refusing the copy
    ///   would leave the original with nowhere to go);
    /// - a late confirm is never answered by republishing: a copy whose confirm is only
    ///   late may already be stored, and a second copy would run the handler again and
    ///   start a second retry ladder or dead letter. The copy waits for its own confirm
    ///   (ack, nack, or the connection failing), so each failure has one lineage. Only a
    ///   nack (the broker did not take it) or a lost connection leads to a second attempt.
    pub(crate) async fn publish_copy(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.publish_bytes(
            exchange,
            routing_key,
            body,
            properties,
            None,
            Patience::AwaitOwnConfirm,
        )
        .await
    }

    async fn publish_bytes(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        mut properties: BasicProperties,
        max_body_size: Option<usize>,
        patience: Patience,
    ) -> Result<(), PublishError> {
        let exchange_name = limits::short("exchange", exchange)?;
        let routing_key_name = limits::short("routing_key", routing_key)?;
        let message_id = match properties.message_id() {
            Some(id) => id.to_string(),
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                properties = properties.with_message_id(id.as_str().into());
                id
            }
        };
        if properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key(ledger::TOKEN_HEADER))
            && let Some(mut headers) = properties.headers().clone()
        {
            ledger::strip_token(&mut headers);
            properties = properties.with_headers(headers);
        }
        // A copy carries properties the broker already accepted (and lapin decoded with
        // the same nesting); refusing it would send the original back to the queue again
        // and again, never to the DLQ.
        if patience == Patience::Republish {
            limits::check_properties(&properties)?;
        }
        let span = crate::observe::trace::publish_span(exchange, routing_key, &message_id);
        // A copy keeps the trace context of the message it copies.
        if patience == Patience::Republish {
            properties = crate::observe::trace::inject(&span, properties);
        }
        if let Some(max) = max_body_size
            && body.len() > max
        {
            // Never sent: a body over the broker's limit would close the shared channel.
            span.record("outcome", "too_large");
            return Err(PublishError::TooLarge {
                size: body.len(),
                max,
            });
        }
        properties = properties.with_delivery_mode(2);
        if properties.timestamp().is_none() {
            properties = properties.with_timestamp(unix_seconds());
        }
        let send = Send {
            exchange,
            routing_key,
            exchange_name,
            routing_key_name,
            body: Arc::new(body),
            properties,
            message_id,
            patience,
        };
        self.publish_with_retries(send).instrument(span).await
    }

    /// Attempt, and retry while the outcome allows it.
    ///
    /// A refusal code (403, 404, 406) closes the channel for every publish in flight on
    /// it, and the close does not name the publish that caused it; so a publish is
    /// reported [`PublishError::Refused`] only when its own retry is refused again with
    /// the same code. A publish that was merely on the same channel goes through on the
    /// retry.
    async fn publish_with_retries(&self, send: Send<'_>) -> Result<(), PublishError> {
        let config = &self.inner.config;
        let max_delay = config.max_reconnect_delay.min(Duration::from_secs(2));
        let mut retries = 0;
        let mut refused_before: Option<u16> = None;
        let err = loop {
            let err = match self.attempt(&send).await {
                Ok(()) => {
                    let span = tracing::Span::current();
                    span.record("outcome", "confirmed");
                    span.record("retries", retries);
                    return Ok(());
                }
                Err(e) => e,
            };
            let again = match &err {
                AttemptError::Refused(code, _) => {
                    let seen = refused_before == Some(*code);
                    refused_before = Some(*code);
                    !seen
                }
                e => e.retryable(),
            };
            if !again || retries >= config.publish_retries {
                break err;
            }
            retries += 1;
            let delay = retry_delay(retries, max_delay);
            debug!(
                retries,
                ?delay,
                failed = err.outcome(),
                "publish not confirmed; republishing with the same message_id"
            );
            tokio::time::sleep(delay).await;
        };
        let span = tracing::Span::current();
        span.record("outcome", err.outcome());
        span.record("retries", retries);
        let message_id = send.message_id;
        Err(match err {
            AttemptError::Nacked => PublishError::Nacked {
                message_id,
                retries,
            },
            AttemptError::Timeout => PublishError::ConfirmTimeout {
                message_id,
                timeout: config.confirm_timeout,
                retries,
            },
            AttemptError::Blocked => PublishError::Blocked(config.blocked_timeout),
            AttemptError::Lost(reason) => PublishError::ConnectionLost {
                message_id,
                retries,
                reason,
            },
            AttemptError::Unroutable(code, text) => PublishError::Unroutable {
                message_id,
                exchange: send.exchange.to_owned(),
                routing_key: send.routing_key.to_owned(),
                reply: format!("{code} {text}"),
            },
            AttemptError::Refused(code, reason) => PublishError::Refused {
                message_id,
                exchange: send.exchange.to_owned(),
                code,
                reason,
            },
        })
    }

    /// One publish and its confirm, on whichever transport: handed over, counted, judged.
    /// The metrics are recorded here, once for both transports, so the in-memory broker
    /// of feature `testing` counts exactly what RabbitMQ would.
    async fn attempt(&self, send: &Send<'_>) -> Result<(), AttemptError> {
        let handed = self.hand_over(send).await?;
        let sent = publish_metrics::published();
        let (outcome, generation) = match handed {
            Handed::Lapin {
                ticket,
                link,
                deadline,
            } => (
                self.await_confirm(ticket, send.patience, deadline).await,
                Some(link.generation),
            ),
            #[cfg(feature = "testing")]
            Handed::Memory(outcome) => (outcome, None),
        };
        match &outcome {
            Outcome::Confirmed => publish_metrics::confirmed(sent),
            Outcome::Returned(..) => publish_metrics::returned(),
            Outcome::Nacked => publish_metrics::nacked(),
            _ => {}
        }
        judge(outcome).map_err(|(e, failed)| {
            if let (Some(keep_connection), Some(generation)) = (failed, generation) {
                self.invalidate(generation, keep_connection);
            }
            e
        })
    }

    /// Give the publish to the broker; the confirm timeout runs from the moment it is
    /// handed to the ledger (unless the path awaits its own confirm). `Err` when it never
    /// left: no link, blocked too long, or no room in the ledger in time.
    async fn hand_over(&self, send: &Send<'_>) -> Result<Handed, AttemptError> {
        #[cfg(feature = "testing")]
        if let Some((broker, origin)) = &self.inner.memory {
            let origin = match send.patience {
                Patience::AwaitOwnConfirm => crate::transport::memory::Origin::Settle,
                Patience::Republish => *origin,
            };
            return Ok(Handed::Memory(broker.publish(
                origin,
                send.exchange,
                send.routing_key,
                send.properties.clone(),
                send.body.as_ref().clone(),
            )));
        }
        let link = self.link().await.map_err(AttemptError::Lost)?;
        if link.connection.status().blocked() {
            self.wait_unblocked(&link).await?;
        }
        let timeout = self.inner.config.confirm_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let ticket = link
            .ledger
            .send(
                &link,
                send.exchange_name.clone(),
                send.routing_key_name.clone(),
                Arc::clone(&send.body),
                send.properties.clone(),
                &send.message_id,
                deadline,
                (send.patience == Patience::Republish).then_some(deadline),
            )
            .await
            // No room within the timeout: nothing was sent.
            .ok_or(AttemptError::Timeout)?;
        Ok(Handed::Lapin {
            ticket,
            link,
            deadline,
        })
    }

    /// The broker's answer to a publish handed to the ledger.
    async fn await_confirm(
        &self,
        ticket: ledger::Ticket,
        patience: Patience,
        deadline: tokio::time::Instant,
    ) -> Outcome {
        match patience {
            Patience::Republish => ticket.await,
            Patience::AwaitOwnConfirm => {
                let mut ticket = std::pin::pin!(ticket);
                match tokio::time::timeout_at(deadline, ticket.as_mut()).await {
                    Ok(outcome) => outcome,
                    Err(_late) => {
                        warn!(
                            timeout = ?self.inner.config.confirm_timeout,
                            "settle copy not confirmed in time; waiting for its own confirm rather than publishing a second copy"
                        );
                        ticket.await
                    }
                }
            }
        }
    }

    /// Wait (bounded) while the broker blocks publishing.
    async fn wait_unblocked(&self, link: &Link) -> Result<(), AttemptError> {
        let limit = self.inner.config.blocked_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        warn!("broker has blocked publishing (resource alarm); waiting up to {limit:?}");
        while link.connection.status().blocked() {
            if tokio::time::Instant::now() >= deadline {
                return Err(AttemptError::Blocked);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The current link if it is usable.
    fn current(&self) -> Option<Arc<Link>> {
        read(&self.inner.link)
            .as_ref()
            .filter(|l| l.usable())
            .cloned()
    }

    /// The current link, reconnecting if there is none or it has failed.
    async fn link(&self) -> Result<Arc<Link>, String> {
        if let Some(link) = self.current() {
            return Ok(link);
        }
        let failures = self.inner.connect_failures.load(Ordering::Acquire);
        let _guard = self.inner.reconnecting.lock().await;
        // Someone else may have reconnected, or failed to, while we waited.
        if let Some(link) = self.current() {
            return Ok(link);
        }
        if self.inner.connect_failures.load(Ordering::Acquire) != failures {
            return Err(lock(&self.inner.last_connect_error).clone());
        }
        match self.open_link().await {
            Ok(link) => {
                let old = write(&self.inner.link).replace(Arc::clone(&link));
                if let Some(old) = old {
                    close_in_background(old, "replaced after a failure");
                }
                lock(&self.inner.last_connect_error).clear();
                Ok(link)
            }
            Err(e) => {
                let reason = e.to_string();
                // Readiness probes ask for a connection every few seconds while the broker
                // is away: warn when the reason is new, not on every attempt.
                let mut last = lock(&self.inner.last_connect_error);
                if *last == reason {
                    tracing::debug!(error = %reason, "publisher still cannot reconnect");
                } else {
                    warn!(error = %reason, "publisher cannot reconnect");
                }
                *last = reason.clone();
                drop(last);
                self.inner.connect_failures.fetch_add(1, Ordering::Release);
                Err(reason)
            }
        }
    }

    async fn open_link(&self) -> Result<Arc<Link>, Error> {
        let reusable = lock(&self.inner.reusable)
            .take()
            .filter(|c| c.status().connected());
        if let Some(connection) = reusable {
            match self.open_link_on(Arc::clone(&connection)).await {
                Ok(link) => return Ok(link),
                Err(e) => {
                    debug!(error = %e, "cannot open a channel on the kept connection; reconnecting");
                    close_connection_in_background(connection, "channel could not be reopened");
                }
            }
        }
        let connection = Arc::new(connection::open(&self.inner.config, "publisher").await?);
        self.open_link_on(connection).await
    }

    /// A confirm-mode channel, with its ledger, on `connection`.
    async fn open_link_on(&self, connection: Arc<Connection>) -> Result<Arc<Link>, Error> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::amqp("opening the publisher channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| Error::amqp("enabling publisher confirms", e))?;
        let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let ledger = Ledger::new();
        let link = Arc::new(Link {
            connection,
            channel,
            generation,
            ledger: Arc::clone(&ledger),
        });
        ledger.spawn_background(Arc::downgrade(&link));
        Ok(link)
    }

    /// Forget the link of `generation` (if still current) so the next publish reconnects;
    /// `keep_connection`: only its channel failed, so the next link reuses its connection.
    fn invalidate(&self, generation: u64, keep_connection: bool) {
        let old = {
            let mut slot = write(&self.inner.link);
            if slot.as_ref().is_some_and(|l| l.generation == generation) {
                slot.take()
            } else {
                None
            }
        };
        match old {
            Some(old) if keep_connection && old.connection.status().connected() => {
                *lock(&self.inner.reusable) = Some(Arc::clone(&old.connection));
            }
            Some(old) => close_in_background(old, "reconnecting after a failure"),
            None => {}
        }
    }

    /// Whether the publisher currently has a live connection.
    pub async fn is_connected(&self) -> bool {
        #[cfg(feature = "testing")]
        if self.inner.memory.is_some() {
            return true;
        }
        self.current().is_some()
    }

    /// Whether the publisher has a live connection, opening one first when it has none.
    ///
    /// The publisher reconnects lazily, on the next publish: after the broker comes back, a
    /// service that publishes nothing would otherwise stay "not connected" for ever, and a
    /// readiness probe built on [`Publisher::is_connected`] would keep it out of rotation.
    /// Callers bound this with a timeout: connecting to an unreachable broker can take as
    /// long as the TCP connect does.
    pub(crate) async fn connect_if_needed(&self) -> bool {
        #[cfg(feature = "testing")]
        if self.inner.memory.is_some() {
            return true;
        }
        self.current().is_some() || self.link().await.is_ok()
    }

    /// Close the connection (pending confirms fail as `ConnectionLost`; later publishes
    /// reconnect).
    pub async fn close(&self) {
        let old = write(&self.inner.link).take();
        if let Some(link) = old {
            let _ = link.connection.close(200, "publisher closed".into()).await;
        }
        let kept = lock(&self.inner.reusable).take();
        if let Some(connection) = kept {
            let _ = connection.close(200, "publisher closed".into()).await;
        }
    }
}

/// What one attempt's outcome means, on either transport. With the error: whether the
/// next attempt needs a new channel, and if so whether the connection can be kept (only
/// the channel was refused, or it nacked) or must be replaced.
///
/// A nack moves the next attempt to a fresh channel on the same connection. RabbitMQ
/// keeps per-channel state for each quorum queue a channel publishes to, set up at the
/// channel's first publish to it from the queue's record; when the record still names a
/// leader whose node just died (the new leader has not updated it yet, for about half a
/// second), 3.10 nacks that publish and keeps the state, so the channel nacks every later
/// publish to that queue until the dead node is back, however long it stays down (a
/// rolling restart's stopped node, a crash). A new channel starts from the current record.
/// For other nacks (a full queue with `reject-publish`) the new channel costs two round
/// trips, at most once per nacked channel; publishes in flight on the old one settle there
/// and it closes when they are done.
fn judge(outcome: Outcome) -> Result<(), (AttemptError, Option<bool>)> {
    match outcome {
        Outcome::Confirmed => Ok(()),
        Outcome::Returned(code, reply) => Err((AttemptError::Unroutable(code, reply), None)),
        Outcome::Nacked => Err((AttemptError::Nacked, Some(true))),
        Outcome::TimedOut => Err((AttemptError::Timeout, None)),
        Outcome::Failed(code, reason) => {
            // A refusal closes only the channel: keep the connection for the next one.
            let keep_connection = code.is_some_and(is_refusal);
            let e = match code {
                Some(code) if is_refusal(code) => AttemptError::Refused(code, reason),
                _ => AttemptError::Lost(reason),
            };
            Err((e, Some(keep_connection)))
        }
    }
}

/// A publish the broker has, its answer still to come (the in-memory broker answers at
/// once).
enum Handed {
    Lapin {
        ticket: ledger::Ticket,
        /// The link it went out on, kept until the answer (which may say to drop it).
        link: Arc<Link>,
        deadline: tokio::time::Instant,
    },
    #[cfg(feature = "testing")]
    Memory(Outcome),
}

/// One publish, validated and ready to (re)send.
struct Send<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    exchange_name: ShortString,
    routing_key_name: ShortString,
    body: Arc<Vec<u8>>,
    properties: BasicProperties,
    message_id: String,
    patience: Patience,
}

fn close_in_background(link: Arc<Link>, why: &'static str) {
    close_connection_in_background(Arc::clone(&link.connection), why);
}

fn close_connection_in_background(connection: Arc<Connection>, why: &'static str) {
    tokio::spawn(async move {
        let _ = connection.close(320, why.into()).await;
    });
}

// A panic while holding one of these locks leaves consistent data (plain inserts and
// clones), so poisoning is ignored rather than spread.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_start_small_and_cap() {
        let max = Duration::from_millis(300);
        let seen: Vec<_> = (1..=5).map(|n| retry_delay(n, max).as_millis()).collect();
        assert_eq!(seen, vec![50, 100, 200, 300, 300]);
        assert_eq!(retry_delay(u32::MAX, max), max);
    }

    #[test]
    fn only_outcome_unknown_and_nacks_are_retried() {
        assert!(AttemptError::Nacked.retryable());
        assert!(AttemptError::Timeout.retryable());
        assert!(AttemptError::Lost("x".into()).retryable());
        assert!(!AttemptError::Unroutable(312, "NO_ROUTE".into()).retryable());
        assert!(!AttemptError::Blocked.retryable());
    }

    #[test]
    fn refusals_are_recognised_by_reply_code() {
        for code in [403, 404, 406] {
            assert!(is_refusal(code), "{code}");
        }
        for code in [312, 313, 320, 541] {
            assert!(!is_refusal(code), "{code}");
        }
    }
}
