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

/// Capped exponential backoff with jitter: about 100ms, 200ms, 400ms, ... up to `max`.
///
/// The jitter (each delay drawn between the nominal one and twice it, capped) keeps a fleet
/// of instances from reconnecting in lockstep after a broker restart. Built on `backon`.
#[derive(Debug)]
pub(crate) struct Backoff {
    builder: backon::ExponentialBuilder,
    delays: backon::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub(crate) const FIRST: Duration = Duration::from_millis(100);

    pub(crate) fn new(max: Duration) -> Self {
        use backon::BackoffBuilder as _;
        let max = max.max(Self::FIRST);
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(Self::FIRST)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            max,
        }
    }

    /// The delay to wait now; the next one doubles, up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max).min(self.max)
    }

    pub(crate) fn reset(&mut self) {
        use backon::BackoffBuilder as _;
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let seen: Vec<_> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        // Each delay lies between the nominal one (100, 200, 400, then the cap) and twice
        // it, never above the cap.
        for (delay, nominal) in seen.iter().zip([100, 200, 400, 500, 500, 500]) {
            assert!(
                (nominal..=(2 * nominal).min(500)).contains(delay),
                "{seen:?}"
            );
        }
        b.reset();
        assert!((100..200).contains(&b.next_delay().as_millis()));
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        let firsts: std::collections::BTreeSet<_> = (0..20)
            .map(|_| Backoff::new(Duration::from_secs(30)).next_delay())
            .collect();
        assert!(firsts.len() > 1, "twenty instances all waited {firsts:?}");
    }
}
