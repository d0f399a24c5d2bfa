//! Redis Cluster dedup store (cargo feature `redis-cluster`), through a `deadpool-redis`
//! cluster pool (or, with TLS files, a cluster client of our own: the pool cannot pass them
//! on).
//!
//! The same four scripts as [`super::RedisStore`]; each touches one key, so the cluster
//! client sends it to the primary owning that key's slot and it stays atomic there (no
//! hash tag needed). Like `RedisStore`, every operation runs on a clone of one shared
//! cluster connection (it multiplexes over one connection per node and follows
//! `MOVED`/`ASK` redirections itself); any error drops it and the next operation takes a
//! fresh one from the pool. A script missing on a node (`NOSCRIPT`, e.g. after a failover)
//! is loaded on every primary and retried by the client.
//!
//! Durability is the cluster's: a failover to a replica that had not received the latest
//! writes forgets those claims and `done` marks (see the module docs of [`super`]).

use std::time::Duration;

use deadpool_redis::Runtime;
use deadpool_redis::cluster::{ClusterConnection, Config as PoolConfig, Connection, Pool};
use deadpool_redis::redis::cluster::ClusterClient;

use super::DedupError;
use super::scripts::{ConnectionSource, ScriptStore, delegate_dedup_store};
use crate::config::{TlsParams, redact_url, split_tls_params};

/// A [`DedupStore`](super::DedupStore) on a Redis Cluster, shared by every instance of a
/// service.
pub struct RedisClusterStore(ScriptStore<Source>);

impl std::fmt::Debug for RedisClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterStore").finish_non_exhaustive()
    }
}

/// Where cluster connections come from: the `deadpool-redis` pool, or (with TLS files,
/// which that pool cannot pass on) a cluster client of our own. Either way one shared
/// cluster connection serves every operation.
pub(super) enum Source {
    Pool(Pool),
    /// The client, and the first seed node's port (for errors).
    Client(Box<ClusterClient>, u16),
}

/// A cluster connection from either source.
pub(super) enum Pooled {
    Pool(Connection),
    Client(ClusterConnection),
}

/// How long opening a cluster connection of our own may take (the pool's create timeout).
const CREATE_TIMEOUT: Duration = Duration::from_secs(2);

impl RedisClusterStore {
    /// A store on the cluster reachable through the seed `nodes` (`redis://host:port`
    /// URLs; one is enough, the client discovers the others), whose pool holds up to
    /// `pool_size` cluster connections (one serves all operations). Connects lazily: call
    /// [`DedupStore::ping`](super::DedupStore::ping) to check every primary answers.
    ///
    /// `rediss://` nodes connect with TLS, trusting the system's root certificates, or the
    /// CAs of a `cacertfile=<PEM file>` query parameter; `certfile` and `keyfile` add a
    /// client certificate. The first node's parameters apply to the whole cluster.
    pub fn new<S: AsRef<str>>(nodes: &[S], pool_size: usize) -> Result<Self, DedupError> {
        let Some(first) = nodes.first() else {
            return Err(DedupError("no Redis Cluster node given".into()));
        };
        let redacted = redact_url(first.as_ref());
        let mut urls = Vec::with_capacity(nodes.len());
        let mut tls = TlsParams::default();
        for node in nodes {
            let (url, params) = split_tls_params(node.as_ref(), "REDIS_URL")
                .map_err(|e| DedupError(e.to_string()))?;
            if tls.is_empty() {
                tls = params;
            }
            urls.push(url);
        }
        if !tls.is_empty() {
            let port = url::Url::parse(&urls[0])
                .ok()
                .and_then(|u| u.port())
                .unwrap_or(6379);
            let client = tls_client(urls, &tls)
                .map_err(|e| DedupError(format!("REDIS_URL (cluster) {redacted}: {e}")))?;
            return Ok(Self(ScriptStore::new(Source::Client(
                Box::new(client),
                port,
            ))));
        }
        let mut cfg = PoolConfig::from_urls(urls);
        cfg.pool = Some(super::scripts::pool_config(pool_size));
        let pool = cfg
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| DedupError(format!("REDIS_URL (cluster) is not usable: {e}")))?;
        Ok(Self(ScriptStore::new(Source::Pool(pool))))
    }
}

#[cfg(feature = "tls")]
fn tls_client(urls: Vec<String>, tls: &TlsParams) -> Result<ClusterClient, String> {
    ClusterClient::builder(urls)
        .certs(super::redis::tls_certificates(tls)?)
        .connection_timeout(CREATE_TIMEOUT)
        .build()
        .map_err(|e| format!("the TLS settings are not usable: {e}"))
}

#[cfg(not(feature = "tls"))]
fn tls_client(_urls: Vec<String>, _tls: &TlsParams) -> Result<ClusterClient, String> {
    Err("TLS parameters need reliable-mq's `tls` feature (a default feature)".into())
}

impl ConnectionSource for Source {
    // A script runs on the node of its keys' one slot; a batch's keys hash to many.
    const BATCHES: bool = false;
    type Pooled = Pooled;
    type Conn = ClusterConnection;

    async fn take(&self) -> Result<Pooled, DedupError> {
        match self {
            Self::Pool(pool) => pool
                .get()
                .await
                .map(Pooled::Pool)
                .map_err(|e| DedupError(e.to_string())),
            Self::Client(client, port) => {
                match tokio::time::timeout(CREATE_TIMEOUT, client.get_async_connection()).await {
                    Ok(Ok(conn)) => Ok(Pooled::Client(conn)),
                    Ok(Err(e)) => Err(DedupError(
                        crate::connection::tls::describe_chain(&e, *port)
                            .map(|reason| format!("cannot connect to the Redis Cluster: {reason}"))
                            .unwrap_or_else(|| e.to_string()),
                    )),
                    Err(_) => Err(DedupError(format!(
                        "connecting to the Redis Cluster took longer than {CREATE_TIMEOUT:?}"
                    ))),
                }
            }
        }
    }

    fn handle(pooled: &Pooled) -> ClusterConnection {
        match pooled {
            Pooled::Pool(conn) => ClusterConnection::clone(conn),
            Pooled::Client(conn) => conn.clone(),
        }
    }
}

delegate_dedup_store!(RedisClusterStore);

#[cfg(test)]
mod tests {
    use super::RedisClusterStore;

    #[test]
    fn tls_files_that_cannot_be_read_are_a_clear_error() {
        let e = RedisClusterStore::new(
            &["rediss://u:secret@h1:7000/?cacertfile=/no/such/ca.pem"],
            1,
        )
        .unwrap_err();
        assert!(
            e.0.contains("cacertfile /no/such/ca.pem cannot be read"),
            "{e}"
        );
        assert!(!format!("{e} {e:?}").contains("secret"), "{e}");
        assert!(RedisClusterStore::new(&["rediss://h1:7000"], 1).is_ok());
    }
}
