//! Defaults of every optional key, and the broker limits the rules check against.

use std::time::Duration;

use crate::RetryBackoff;

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
/// RabbitMQ's default `consumer_timeout`: a delivery left unacked longer makes the broker
/// close the channel. A handler `timeout` must stay below it.
pub const BROKER_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Shortest wait before a message whose dedup claim is held elsewhere comes back.
pub const REQUEUE_MIN_DELAY: Duration = Duration::from_millis(100);
