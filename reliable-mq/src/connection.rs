//! Opening connections: heartbeat and connection name applied, errors that name the URL
//! without its password, and the capped backoff every reconnect loop shares.
//!
//! We do not use lapin's auto-recovery: each consumer and the publisher own their
//! connection lifecycle (connect, declare, consume; on any error drop everything and start
//! over), so a delivery tag can never outlive the channel it belongs to.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use crate::config::redact_url;
use crate::{Config, Error};

/// Rotates the starting address across calls, so reconnects spread over a cluster's
/// nodes instead of always hammering the first one.
static NEXT_ADDRESS: AtomicUsize = AtomicUsize::new(0);

/// Open a connection for `role` (`consumer orders`, `publisher`), with the configured
/// heartbeat and a connection name the broker's tools show.
///
/// `AMQP_URL` may list several comma-separated addresses (the nodes of a cluster); they are
/// tried in turn, starting from a different one at each call, and the first that accepts
/// wins.
pub(crate) async fn open(config: &Config, role: &str) -> Result<Connection, Error> {
    let urls = config.amqp_urls();
    let start = NEXT_ADDRESS.fetch_add(1, Ordering::Relaxed);
    let mut last_error = None;
    for i in 0..urls.len() {
        let url = urls[(start + i) % urls.len()];
        match open_one(config, url, role).await {
            Ok(conn) => return Ok(conn),
            Err(e @ Error::Config(_)) => return Err(e),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        Error::Config("AMQP_URL is empty; set it to amqp://user:password@host:5672/vhost".into())
    }))
}

async fn open_one(config: &Config, raw_url: &str, role: &str) -> Result<Connection, Error> {
    let url = redact_url(raw_url);
    let mut uri: AMQPUri = raw_url.parse().map_err(|e: String| {
        Error::Config(format!(
            "AMQP_URL {url} is not a valid AMQP URL ({e}); expected amqp://user:password@host:5672/vhost"
        ))
    })?;
    // Round up: a sub-second heartbeat must not become 0, which disables heartbeats.
    let secs = config.heartbeat.as_millis().div_ceil(1000);
    let heartbeat = u16::try_from(secs).unwrap_or(u16::MAX);
    uri.query.heartbeat = Some(heartbeat);
    let props = ConnectionProperties::default()
        .with_connection_name(format!("{} ({role})", config.connection_name).into());
    match tokio::time::timeout(config.connect_timeout, Connection::connect_uri(uri, props)).await {
        Ok(connected) => connected.map_err(|source| Error::Connect { url, source }),
        Err(_) => Err(Error::ConnectTimeout {
            url,
            timeout: config.connect_timeout,
        }),
    }
}

/// Capped exponential backoff: 100ms, 200ms, 400ms, ... up to `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) const FIRST: Duration = Duration::from_millis(100);

    pub(crate) fn new(max: Duration) -> Self {
        Self {
            next: Self::FIRST,
            max,
        }
    }

    /// The delay to wait now; the next one doubles, up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let seen: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seen, vec![100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }
}
