//! Redis dedup store through a `deadpool-redis` pool. Each operation is one Lua script, so
//! check-and-change is atomic.
//!
//! Concurrent deliveries must not wait for each other's round trips. Every operation runs
//! on a clone of one shared *multiplexed* connection taken from the pool: requests from
//! all in-flight deliveries are pipelined on it, and no per-operation pool checkout (whose
//! recycle check costs a PING round trip of its own) sits in the way. Measured on this
//! machine (2 cores, release build), 16 claims in flight: ~20k claims/s this way, ~9k/s
//! with a pool checkout per operation; one claim at a time: ~7k/s. Any error drops the
//! shared connection; the next operation takes a fresh one from the pool (which
//! reconnects, with its timeouts). The protocol itself lives in `scripts.rs`, shared with
//! the cluster store.

use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use deadpool_redis::{Connection, Manager, Pool, Runtime};

use super::DedupError;
use super::scripts::{ConnectionSource, ScriptStore, delegate_dedup_store};
use crate::config::{TlsParams, redact_url, split_tls_params};

/// A [`DedupStore`](super::DedupStore) on Redis, shared by every instance of a service.
pub struct RedisStore(ScriptStore<Source>, String);

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.1)
            .finish_non_exhaustive()
    }
}

/// The pool, and what errors need to name the server: its URL (password removed) and port.
pub(super) struct Source {
    pool: Pool,
    url: String,
    port: u16,
    tls: bool,
}

impl RedisStore {
    /// A store on `url` whose pool holds up to `pool_size` connections (one serves all
    /// operations; more are only opened while a broken one is replaced under load).
    /// Connects lazily: call [`DedupStore::ping`](super::DedupStore::ping) to check it
    /// answers.
    ///
    /// `rediss://` connects with TLS (cargo feature `tls`, on by default), trusting the
    /// system's roots, or the CAs of a `cacertfile=<PEM file>` query parameter;
    /// `certfile=<PEM>&keyfile=<PEM>` add a client certificate (mutual TLS).
    pub fn new(url: &str, pool_size: usize) -> Result<Self, DedupError> {
        let redacted = redact_url(url);
        let (plain, tls) =
            split_tls_params(url, "REDIS_URL").map_err(|e| DedupError(e.to_string()))?;
        let unusable = |e: &dyn std::fmt::Display| {
            DedupError(format!("REDIS_URL {redacted} is not usable: {e}"))
        };
        let info = connection_info(&plain, &tls, &redacted)?;
        let port = match &info.addr() {
            ConnectionAddr::Tcp(_, port) | ConnectionAddr::TcpTls { port, .. } => *port,
            _ => 0,
        };
        let is_tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        let manager = Manager::new(info).map_err(|e| unusable(&e))?;
        let pool = Pool::builder(manager)
            .config(super::scripts::pool_config(pool_size))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| unusable(&e))?;
        Ok(Self(
            ScriptStore::new(Source {
                pool,
                url: redacted.clone(),
                port,
                tls: is_tls,
            }),
            redacted,
        ))
    }
}

/// The connection settings of `url` (TLS query parameters already split off into `tls`),
/// with the CA and client certificate files read in.
fn connection_info(
    url: &str,
    tls: &TlsParams,
    redacted: &str,
) -> Result<ConnectionInfo, DedupError> {
    let bad = |e: String| DedupError(format!("REDIS_URL {redacted}: {e}"));
    if tls.is_empty() {
        return url
            .into_connection_info()
            .map_err(|e| bad(format!("not a valid Redis URL ({e})")));
    }
    tls_connection_info(url, tls).map_err(bad)
}

#[cfg(feature = "tls")]
fn tls_connection_info(url: &str, tls: &TlsParams) -> Result<ConnectionInfo, String> {
    let client = deadpool_redis::redis::Client::build_with_tls(url, tls_certificates(tls)?)
        .map_err(|e| format!("the TLS settings are not usable: {e}"))?;
    Ok(client.get_connection_info().clone())
}

/// The Redis client's TLS settings from RabbitMQ-style URI parameters, files read in.
/// `server_name_indication` is refused: the Redis client always verifies the host it dials.
#[cfg(feature = "tls")]
pub(super) fn tls_certificates(
    tls: &TlsParams,
) -> Result<deadpool_redis::redis::TlsCertificates, String> {
    use deadpool_redis::redis::{ClientTlsConfig, TlsCertificates};
    if tls.server_name_indication.is_some() {
        return Err(
            "server_name_indication is not supported for rediss:// (the Redis client verifies \
             the host it connects to): connect by a name the certificate lists"
                .into(),
        );
    }
    let read = |key: &str, path: &str| {
        std::fs::read(path).map_err(|e| format!("{key} {path} cannot be read: {e}"))
    };
    let root_cert = match &tls.cacertfile {
        Some(path) => Some(read("cacertfile", path)?),
        None => None,
    };
    let client_tls = match (&tls.certfile, &tls.keyfile) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read("certfile", cert)?,
            client_key: read("keyfile", key)?,
        }),
        _ => None,
    };
    Ok(TlsCertificates {
        client_tls,
        root_cert,
    })
}

#[cfg(not(feature = "tls"))]
fn tls_connection_info(_url: &str, _tls: &TlsParams) -> Result<ConnectionInfo, String> {
    Err("TLS parameters need reliable-mq's `tls` feature (a default feature)".into())
}

impl ConnectionSource for Source {
    const BATCHES: bool = true;
    type Pooled = Connection;
    type Conn = MultiplexedConnection;

    async fn take(&self) -> Result<Connection, DedupError> {
        self.pool
            .get()
            .await
            .map_err(|e| DedupError(describe_pool_error(&e, &self.url, self.port, self.tls)))
    }

    fn handle(pooled: &Connection) -> MultiplexedConnection {
        MultiplexedConnection::clone(pooled)
    }
}

/// A pool error in words that say what to do: a TLS failure or a TLS/plain-text port
/// mismatch named as such, with the server's URL.
fn describe_pool_error(
    e: &(dyn std::error::Error + 'static),
    url: &str,
    port: u16,
    tls: bool,
) -> String {
    if let Some(reason) = crate::connection::tls::describe_chain(e, port) {
        return format!("cannot connect to {url}: {reason}");
    }
    if tls && e.to_string().contains("timed out") {
        return format!(
            "{url}: {e}; is port {port} a TLS listener? (a plain-text Redis waits for a \
             command and never answers a TLS handshake; for it use redis://)"
        );
    }
    // The Redis client hides the I/O error's type behind a shared pointer: read its words.
    let text = e.to_string();
    let closed = [
        "reset by peer",
        "Broken pipe",
        "broken pipe",
        "end of file",
        "EOF",
    ]
    .iter()
    .any(|w| text.contains(w));
    if !tls && closed {
        return format!(
            "{url}: the server closed the connection ({e}); if port {port} is a TLS \
             listener, use rediss://"
        );
    }
    format!("{url}: {e}")
}

delegate_dedup_store!(RedisStore);
