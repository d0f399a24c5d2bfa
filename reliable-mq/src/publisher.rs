//! Confirmed publishing: a message leaves the caller's hands only once the broker has
//! confirmed it (persisted, for durable queues).
//!
//! One connection, one confirm-mode channel, many publishes in flight at once: each
//! `publish` sends its frames and then waits for its own confirm, so concurrent callers
//! pipeline naturally and never pay one round trip each in sequence.
//!
//! A nack, a confirm timeout or a lost connection is retried with a short, growing backoff
//! under the same `message_id` (the consumer's dedup absorbs the duplicate), at most
//! [`Config::publish_retries`] times; an unroutable message, a refused exchange, an
//! oversized body or a blocked broker is not, since trying again cannot help.
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
//! Two details of lapin 4 that this module works around:
//! - lapin numbers a publish (for its confirm) and queues its frames in two separate
//!   steps; two threads publishing on one channel at once could be numbered in one
//!   order and sent in the other, so a nack or return would land on the wrong publish.
//!   We take a lock around that first, synchronous step of every `basic_publish`.
//! - When the broker folds several confirms into one `multiple` ack, lapin hands a
//!   returned (unroutable) message to whichever of those publishes it resolves first, not
//!   necessarily the one that was returned. We match returns to publishes by
//!   `message_id` instead (see `ReturnBook`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde::Serialize;
use tracing::{Instrument, debug, error, warn};

use crate::connection;
use crate::{Config, Error};

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
        /// The broker's reply text, e.g. `NO_ROUTE`.
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
        "broker refused message {message_id} for exchange {exchange:?}: {reason}; declare the exchange (or grant access) first"
    )]
    Refused {
        /// The message's id.
        message_id: String,
        /// Exchange published to.
        exchange: String,
        /// The broker's reply, e.g. `NOT_FOUND - no exchange 'x' in vhost '/'`.
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
}

impl PublishOptions {
    /// Options with a fixed message id.
    pub fn with_message_id(id: impl Into<String>) -> Self {
        Self {
            message_id: Some(id.into()),
            headers: FieldTable::default(),
        }
    }

    /// Add a string header.
    pub fn header(mut self, key: &str, value: impl Into<String>) -> Self {
        self.headers.insert(
            ShortString::from(key),
            AMQPValue::LongString(value.into().into()),
        );
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
    returns: ReturnBook,
}

struct Link {
    connection: Connection,
    channel: Channel,
    generation: u64,
    /// Held during the first (synchronous) poll of each `basic_publish`, where lapin
    /// assigns the confirm number and queues the frames: see the module docs.
    send_lock: Mutex<()>,
}

impl Link {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

/// One attempt's failure, before retry policy is applied.
enum AttemptError {
    Nacked,
    Unroutable(String),
    Refused(String),
    Timeout,
    Lost(String),
    Blocked,
}

impl AttemptError {
    fn outcome(&self) -> &'static str {
        match self {
            Self::Nacked => "nacked",
            Self::Unroutable(_) => "unroutable",
            Self::Refused(_) => "refused",
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

/// The delay before retry number `retry` (1-based): 50ms, 100ms, 200ms, ... capped at
/// `max`. Small at first (a nack from a briefly full queue, a reconnect in progress), so
/// the default budget of 5 retries spans about 1.5s.
fn retry_delay(retry: u32, max: Duration) -> Duration {
    let first = Duration::from_millis(50);
    first
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(max)
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
            inner: Arc::new(Inner {
                config: config.clone(),
                link: RwLock::new(None),
                reconnecting: tokio::sync::Mutex::new(()),
                connect_failures: AtomicU64::new(0),
                last_connect_error: Mutex::new(String::new()),
                generation: AtomicU64::new(0),
                returns: ReturnBook::default(),
            }),
        };
        let link = publisher.open_link().await?;
        *write(&publisher.inner.link) = Some(link);
        Ok(publisher)
    }

    /// The configuration this publisher runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
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
        let body = serde_json::to_vec(value).map_err(|e| PublishError::Serialize(e.to_string()))?;
        let message_id = options
            .message_id
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let mut properties = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(message_id.as_str().into());
        if !options.headers.inner().is_empty() {
            properties = properties.with_headers(options.headers);
        }
        self.publish_raw(exchange, routing_key, body, properties)
            .await?;
        Ok(message_id)
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
    /// a `message_id` is added if missing) and wait for the confirm. Used for retry and
    /// dead-letter copies, which keep the original's properties.
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
        )
        .await
    }

    /// A retry or dead-letter copy of a message the broker already accepted: the body
    /// limit does not apply (the broker took this body once; refusing the copy would leave
    /// the original with nowhere to go).
    pub(crate) async fn publish_copy(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.publish_bytes(exchange, routing_key, body, properties, None)
            .await
    }

    async fn publish_bytes(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        mut properties: BasicProperties,
        max_body_size: Option<usize>,
    ) -> Result<(), PublishError> {
        let message_id = match properties.message_id() {
            Some(id) => id.to_string(),
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                properties = properties.with_message_id(id.as_str().into());
                id
            }
        };
        let span = tracing::debug_span!(
            "publish",
            exchange,
            routing_key,
            message_id = %message_id,
            outcome = tracing::field::Empty,
            retries = tracing::field::Empty,
        );
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
        self.publish_with_retries(exchange, routing_key, &body, &properties, message_id)
            .instrument(span)
            .await
    }

    async fn publish_with_retries(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        message_id: String,
    ) -> Result<(), PublishError> {
        let config = &self.inner.config;
        let max_delay = config.max_reconnect_delay.min(Duration::from_secs(2));
        // Returns are matched by message id for as long as this publish runs.
        let watch = self.inner.returns.watch(&message_id);
        let mut retries = 0;
        let err = loop {
            let err = match self
                .attempt(exchange, routing_key, body, properties, &watch)
                .await
            {
                Ok(()) => {
                    let span = tracing::Span::current();
                    span.record("outcome", "confirmed");
                    span.record("retries", retries);
                    return Ok(());
                }
                Err(e) => e,
            };
            if !err.retryable() || retries >= config.publish_retries {
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
        drop(watch);
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
            AttemptError::Unroutable(reply) => PublishError::Unroutable {
                message_id,
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                reply,
            },
            AttemptError::Refused(reason) => PublishError::Refused {
                message_id,
                exchange: exchange.to_owned(),
                reason,
            },
        })
    }

    /// One publish and its confirm, bounded by the confirm timeout from the moment it is
    /// handed to the connection.
    async fn attempt(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        watch: &Watch<'_>,
    ) -> Result<(), AttemptError> {
        let link = self.link().await.map_err(AttemptError::Lost)?;
        if link.connection.status().blocked() {
            self.wait_unblocked(&link).await?;
        }
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let send = pin!(link.channel.basic_publish(
            exchange.into(),
            routing_key.into(),
            options,
            body,
            properties.clone(),
        ));
        let send = LockedStart {
            lock: &link.send_lock,
            future: send,
            started: false,
        };
        let confirmed = tokio::time::timeout(self.inner.config.confirm_timeout, async {
            send.await?.await
        })
        .await;
        let confirmation = match confirmed {
            // Unknown outcome: the broker may have it. Republished with the same id.
            Err(_elapsed) => return Err(AttemptError::Timeout),
            Ok(Err(e)) => {
                let reason = e.to_string();
                self.invalidate(link.generation);
                return Err(if refuses_exchange(&reason, exchange) {
                    AttemptError::Refused(reason)
                } else {
                    AttemptError::Lost(reason)
                });
            }
            Ok(Ok(confirmation)) => confirmation,
        };
        match confirmation {
            Confirmation::Ack(returned) => {
                if let Some(returned) = returned {
                    if let Some(reply) = watch.claims(&returned) {
                        return Err(AttemptError::Unroutable(reply));
                    }
                    self.inner.returns.record(&returned);
                }
                // lapin may have resolved the ack that covers our message a moment before
                // the one that carries our return (same `multiple` ack): let it finish.
                tokio::task::yield_now().await;
                match watch.take_return() {
                    Some(reply) => Err(AttemptError::Unroutable(reply)),
                    None => Ok(()),
                }
            }
            Confirmation::Nack(returned) => {
                if let Some(returned) = returned {
                    self.inner.returns.record(&returned);
                }
                Err(AttemptError::Nacked)
            }
            Confirmation::NotRequested => {
                // Cannot happen on a confirm-mode channel; treat as unknown, never as success.
                self.invalidate(link.generation);
                Err(AttemptError::Lost("channel was not in confirm mode".into()))
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
                Ok(link)
            }
            Err(e) => {
                let reason = e.to_string();
                warn!(error = %reason, "publisher cannot reconnect");
                *lock(&self.inner.last_connect_error) = reason.clone();
                self.inner.connect_failures.fetch_add(1, Ordering::Release);
                Err(reason)
            }
        }
    }

    async fn open_link(&self) -> Result<Arc<Link>, Error> {
        let connection = connection::open(&self.inner.config, "publisher").await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::amqp("opening the publisher channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| Error::amqp("enabling publisher confirms", e))?;
        let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Arc::new(Link {
            connection,
            channel,
            generation,
            send_lock: Mutex::new(()),
        }))
    }

    /// Forget the link of `generation` (if still current) so the next publish reconnects.
    fn invalidate(&self, generation: u64) {
        let old = {
            let mut slot = write(&self.inner.link);
            if slot.as_ref().is_some_and(|l| l.generation == generation) {
                slot.take()
            } else {
                None
            }
        };
        if let Some(old) = old {
            close_in_background(old, "reconnecting after a failure");
        }
    }

    /// Whether the publisher currently has a live connection.
    pub async fn is_connected(&self) -> bool {
        self.current().is_some()
    }

    /// Close the connection (pending confirms fail as `ConnectionLost`; later publishes
    /// reconnect).
    pub async fn close(&self) {
        let old = write(&self.inner.link).take();
        if let Some(link) = old {
            let _ = link.connection.close(200, "publisher closed".into()).await;
        }
    }
}

fn close_in_background(link: Arc<Link>, why: &'static str) {
    tokio::spawn(async move {
        let _ = link.connection.close(320, why.into()).await;
    });
}

/// Whether a channel error is the broker refusing this very exchange (missing, or no
/// permission): retrying cannot help. Other channel errors leave the outcome unknown.
fn refuses_exchange(reason: &str, exchange: &str) -> bool {
    (reason.contains("NOT_FOUND") || reason.contains("ACCESS_REFUSED"))
        && reason.contains(&format!("exchange '{exchange}'"))
}

/// Polls a future's first step under a lock, then lets it run freely.
struct LockedStart<'a, F> {
    lock: &'a Mutex<()>,
    future: Pin<&'a mut F>,
    started: bool,
}

impl<F: Future> Future for LockedStart<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if this.started {
            return this.future.as_mut().poll(cx);
        }
        this.started = true;
        let _guard = lock(this.lock);
        this.future.as_mut().poll(cx)
    }
}

/// Unroutable messages by `message_id`, for the publishes currently running.
///
/// lapin attaches a returned message to one of the confirms resolved by the ack that
/// follows it; with a `multiple` ack that can be another publish's confirm. Whoever
/// receives a return records it here, and each publish checks here for its own id after
/// its ack, so the return reaches its owner either way.
#[derive(Default)]
struct ReturnBook(Mutex<HashMap<String, Watched>>);

struct Watched {
    /// Publishes running with this id (a caller may reuse an id concurrently).
    publishes: usize,
    returned: Option<String>,
}

impl ReturnBook {
    fn watch<'a>(&'a self, message_id: &'a str) -> Watch<'a> {
        lock(&self.0)
            .entry(message_id.to_owned())
            .and_modify(|w| w.publishes += 1)
            .or_insert(Watched {
                publishes: 1,
                returned: None,
            });
        Watch {
            book: self,
            message_id,
        }
    }

    /// Record a returned message for its owner.
    fn record(&self, returned: &BasicReturnMessage) {
        let Some(id) = returned.delivery.properties.message_id() else {
            return;
        };
        let mut book = lock(&self.0);
        match book.get_mut(id.as_str()) {
            Some(w) => w.returned = Some(returned.reply_text.to_string()),
            None => error!(
                message_id = %id,
                reply = %returned.reply_text,
                "a message was returned as unroutable after its publish had finished; \
                 it may have been reported as confirmed"
            ),
        }
    }
}

/// A running publish's registration in the [`ReturnBook`].
struct Watch<'a> {
    book: &'a ReturnBook,
    message_id: &'a str,
}

impl Watch<'_> {
    /// The reply text if `returned` is our own message.
    fn claims(&self, returned: &BasicReturnMessage) -> Option<String> {
        let id = returned.delivery.properties.message_id().as_ref()?;
        (id.as_str() == self.message_id).then(|| returned.reply_text.to_string())
    }

    /// A return recorded for our id by another publish.
    fn take_return(&self) -> Option<String> {
        lock(&self.book.0)
            .get_mut(self.message_id)
            .and_then(|w| w.returned.take())
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut book = lock(&self.book.0);
        if let Some(w) = book.get_mut(self.message_id) {
            w.publishes -= 1;
            if w.publishes == 0 {
                book.remove(self.message_id);
            }
        }
    }
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
        assert!(!AttemptError::Unroutable("NO_ROUTE".into()).retryable());
        assert!(!AttemptError::Refused("x".into()).retryable());
        assert!(!AttemptError::Blocked.retryable());
    }

    #[test]
    fn recognises_a_refused_exchange() {
        let text = "protocol error: NOT_FOUND - no exchange 'shop' in vhost '/'";
        assert!(refuses_exchange(text, "shop"));
        assert!(!refuses_exchange(text, "other"));
        assert!(!refuses_exchange("connection reset", "shop"));
    }
}
