//! Confirmed publishing: a message leaves the caller's hands only once the broker has
//! confirmed it (persisted, for durable queues).
//!
//! One connection, one confirm-mode channel, many publishes in flight at once: each
//! `publish` sends its frames and then waits for its own confirm, so concurrent callers
//! pipeline naturally and never pay one round trip each in sequence.
//!
//! A nack, a confirm timeout or a lost connection is retried with backoff under the same
//! `message_id` (the consumer's dedup absorbs the duplicate); an unroutable message or an
//! oversized body is not, since trying again cannot help.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde::Serialize;
use tokio::sync::{Mutex, RwLock};
use tracing::{Instrument, debug, warn};

use crate::connection::{self, Backoff};
use crate::{Config, Error};

/// Why a publish did not get the broker's confirmation.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The broker refused the message (nack), even after retries.
    #[error("broker nacked message {message_id} (retried {retries} times); the queue may be full (x-max-length with reject-publish) or the broker out of resources")]
    Nacked {
        /// The message's id.
        message_id: String,
        /// Retries made.
        retries: u32,
    },
    /// No queue is bound for this exchange and routing key (a `mandatory` return).
    #[error("message {message_id} is unroutable: no queue is bound to exchange {exchange:?} with routing key {routing_key:?} ({reply}); declare the consumer's binding first")]
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
    /// No confirm arrived within the timeout, even after retries; the outcome is unknown.
    #[error("no confirm for message {message_id} within {timeout:?} (retried {retries} times); the broker may or may not have it")]
    ConfirmTimeout {
        /// The message's id.
        message_id: String,
        /// The configured confirm timeout.
        timeout: Duration,
        /// Retries made.
        retries: u32,
    },
    /// The connection dropped before the confirm, even after retries; outcome unknown.
    #[error("connection lost before message {message_id} was confirmed (retried {retries} times): {reason}")]
    ConnectionLost {
        /// The message's id.
        message_id: String,
        /// Retries made.
        retries: u32,
        /// The last error.
        reason: String,
    },
    /// The body exceeds the configured maximum; nothing was sent.
    #[error("message body is {size} bytes, over the {max}-byte limit; nothing was sent (raise Config::max_body_size or send a reference to the data instead)")]
    TooLarge {
        /// Body size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The value could not be serialized to JSON; nothing was sent.
    #[error("cannot serialize message to JSON: {0}")]
    Serialize(String),
    /// The broker kept the connection blocked (memory or disk alarm) past the limit.
    #[error("broker blocked publishing for more than {0:?} (memory or disk alarm); check the broker's resources")]
    Blocked(Duration),
}

impl PublishError {
    /// The message id the failed publish carried, when one was assigned.
    pub fn message_id(&self) -> Option<&str> {
        match self {
            Self::Nacked { message_id, .. }
            | Self::Unroutable { message_id, .. }
            | Self::ConfirmTimeout { message_id, .. }
            | Self::ConnectionLost { message_id, .. } => Some(message_id),
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
    link: RwLock<Option<Link>>,
    /// Serializes reconnects so a burst of failures opens one connection, not many.
    reconnecting: Mutex<()>,
    generation: AtomicU64,
}

#[derive(Clone)]
struct Link {
    connection: Arc<Connection>,
    channel: Channel,
    generation: u64,
}

/// One attempt's failure, before retry policy is applied.
enum AttemptError {
    Nacked,
    Unroutable(String),
    Timeout,
    Lost(String),
    Blocked,
}

impl Publisher {
    /// Connect to `url` with default settings.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::from_config(&Config::default().with_amqp_url(url)).await
    }

    /// Connect with the settings of `config` (timeouts, retries, size limit).
    pub async fn from_config(config: &Config) -> Result<Self, Error> {
        let publisher = Self {
            inner: Arc::new(Inner {
                config: config.clone(),
                link: RwLock::new(None),
                reconnecting: Mutex::new(()),
                generation: AtomicU64::new(0),
            }),
        };
        publisher.link().await?;
        Ok(publisher)
    }

    /// The configuration this publisher runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Publish `value` as JSON and wait for the broker's confirm; returns the message id.
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
            .with_content_type("application/json".into())
            .with_message_id(message_id.as_str().into());
        if !options.headers.inner().is_empty() {
            properties = properties.with_headers(options.headers);
        }
        self.publish_raw(exchange, routing_key, body, properties)
            .await?;
        Ok(message_id)
    }

    /// Publish each value of `values` with all confirms in flight at once; one outcome per
    /// value, in order.
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

    /// Publish a body with the given properties (persistent and timestamped for you; a
    /// `message_id` is added if missing) and wait for the confirm. Used for retry and
    /// dead-letter copies, which keep the original's properties.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        mut properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let max = self.inner.config.max_body_size;
        if body.len() > max {
            return Err(PublishError::TooLarge {
                size: body.len(),
                max,
            });
        }
        let message_id = match properties.message_id() {
            Some(id) => id.to_string(),
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                properties = properties.with_message_id(id.as_str().into());
                id
            }
        };
        properties = properties.with_delivery_mode(2);
        if properties.timestamp().is_none() {
            properties = properties.with_timestamp(unix_seconds());
        }
        let span = tracing::debug_span!("publish", exchange, routing_key, message_id = %message_id, outcome = tracing::field::Empty);
        self.publish_with_retries(exchange, routing_key, &body, properties, &message_id)
            .instrument(span)
            .await
    }

    async fn publish_with_retries(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        message_id: &str,
    ) -> Result<(), PublishError> {
        let config = &self.inner.config;
        let mut backoff = Backoff::new(config.max_reconnect_delay.min(Duration::from_secs(5)));
        let mut retries = 0;
        loop {
            let outcome = self
                .publish_once(exchange, routing_key, body, properties.clone())
                .await;
            let err = match outcome {
                Ok(()) => {
                    tracing::Span::current().record("outcome", "confirmed");
                    return Ok(());
                }
                Err(AttemptError::Unroutable(reply)) => {
                    tracing::Span::current().record("outcome", "unroutable");
                    return Err(PublishError::Unroutable {
                        message_id: message_id.to_owned(),
                        exchange: exchange.to_owned(),
                        routing_key: routing_key.to_owned(),
                        reply,
                    });
                }
                Err(e) => e,
            };
            if retries >= config.publish_retries {
                tracing::Span::current().record("outcome", "failed");
                let message_id = message_id.to_owned();
                return Err(match err {
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
                    AttemptError::Lost(reason) | AttemptError::Unroutable(reason) => {
                        PublishError::ConnectionLost {
                            message_id,
                            retries,
                            reason,
                        }
                    }
                });
            }
            retries += 1;
            let delay = backoff.next_delay();
            debug!(retries, ?delay, "publish not confirmed; republishing with the same message_id");
            tokio::time::sleep(delay).await;
        }
    }

    async fn publish_once(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AttemptError> {
        let link = self
            .link()
            .await
            .map_err(|e| AttemptError::Lost(e.to_string()))?;
        if link.connection.status().blocked() {
            self.wait_unblocked(&link).await?;
        }
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = match link
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                options,
                body,
                properties,
            )
            .await
        {
            Ok(confirm) => confirm,
            Err(e) => {
                self.invalidate(link.generation).await;
                return Err(AttemptError::Lost(e.to_string()));
            }
        };
        match tokio::time::timeout(self.inner.config.confirm_timeout, confirm).await {
            Err(_) => Err(AttemptError::Timeout),
            Ok(Err(e)) => {
                self.invalidate(link.generation).await;
                Err(AttemptError::Lost(e.to_string()))
            }
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                Err(AttemptError::Unroutable(returned.reply_text.to_string()))
            }
            Ok(Ok(Confirmation::Nack(_))) => Err(AttemptError::Nacked),
            Ok(Ok(Confirmation::NotRequested)) => {
                // Cannot happen on a confirm-mode channel; treat as unknown, never as success.
                self.invalidate(link.generation).await;
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

    /// The current link, reconnecting if there is none or it has failed.
    async fn link(&self) -> Result<Link, Error> {
        if let Some(link) = self.inner.link.read().await.as_ref()
            && link.channel.status().connected()
        {
            return Ok(link.clone());
        }
        let _guard = self.inner.reconnecting.lock().await;
        // Someone else may have reconnected while we waited.
        if let Some(link) = self.inner.link.read().await.as_ref()
            && link.channel.status().connected()
        {
            return Ok(link.clone());
        }
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
        let link = Link {
            connection: Arc::new(connection),
            channel,
            generation,
        };
        *self.inner.link.write().await = Some(link.clone());
        Ok(link)
    }

    /// Forget the link of `generation` (if still current) so the next publish reconnects.
    async fn invalidate(&self, generation: u64) {
        let mut slot = self.inner.link.write().await;
        if slot.as_ref().is_some_and(|l| l.generation == generation) {
            if let Some(old) = slot.take() {
                let _ = old.connection.close(320, "reconnecting".into()).await;
            }
        }
    }

    /// Whether the publisher currently has a live connection.
    pub async fn is_connected(&self) -> bool {
        self.inner
            .link
            .read()
            .await
            .as_ref()
            .is_some_and(|l| l.connection.status().connected() && l.channel.status().connected())
    }

    /// Close the connection (pending confirms fail as `ConnectionLost`).
    pub async fn close(&self) {
        if let Some(link) = self.inner.link.write().await.take() {
            let _ = link.connection.close(200, "publisher closed".into()).await;
        }
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
