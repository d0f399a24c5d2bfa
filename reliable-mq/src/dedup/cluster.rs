//! Redis Cluster dedup store (cargo feature `redis-cluster`), through a `deadpool-redis`
//! cluster pool.
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

use deadpool_redis::Runtime;
use deadpool_redis::cluster::{ClusterConnection, Config as PoolConfig, Connection, Pool};

use super::DedupError;
use super::scripts::{ConnectionSource, ScriptStore, delegate_dedup_store};

/// A [`DedupStore`](super::DedupStore) on a Redis Cluster, shared by every instance of a
/// service.
pub struct RedisClusterStore(ScriptStore<Pool>);

impl std::fmt::Debug for RedisClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterStore").finish_non_exhaustive()
    }
}

impl RedisClusterStore {
    /// A store on the cluster reachable through the seed `nodes` (`redis://host:port`
    /// URLs; one is enough, the client discovers the others), whose pool holds up to
    /// `pool_size` cluster connections (one serves all operations). Connects lazily: call
    /// [`DedupStore::ping`](super::DedupStore::ping) to check every primary answers.
    ///
    /// `rediss://` nodes connect with TLS, trusting the system's root certificates. The
    /// TLS query parameters of a single node (`cacertfile`, `certfile`, `keyfile`) are not
    /// supported here yet and are refused rather than ignored.
    pub fn new<S: AsRef<str>>(nodes: &[S], pool_size: usize) -> Result<Self, DedupError> {
        if nodes.is_empty() {
            return Err(DedupError("no Redis Cluster node given".into()));
        }
        let mut urls = Vec::with_capacity(nodes.len());
        for node in nodes {
            let (url, tls) = crate::config::split_tls_params(node.as_ref(), "REDIS_URL")
                .map_err(|e| DedupError(e.to_string()))?;
            if !tls.is_empty() {
                return Err(DedupError(format!(
                    "REDIS_URL {}: cacertfile, certfile, keyfile and server_name_indication are \
                     not supported for a Redis Cluster yet (the cluster client takes no \
                     per-node TLS files); put the CA in the system trust store and drop them",
                    crate::config::redact_url(node.as_ref())
                )));
            }
            urls.push(url);
        }
        let mut cfg = PoolConfig::from_urls(urls);
        cfg.pool = Some(super::scripts::pool_config(pool_size));
        let pool = cfg
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| DedupError(format!("REDIS_URL (cluster) is not usable: {e}")))?;
        Ok(Self(ScriptStore::new(pool)))
    }
}

impl ConnectionSource for Pool {
    type Pooled = Connection;
    type Conn = ClusterConnection;

    async fn take(&self) -> Result<Connection, DedupError> {
        self.get().await.map_err(|e| DedupError(e.to_string()))
    }

    fn handle(pooled: &Connection) -> ClusterConnection {
        ClusterConnection::clone(pooled)
    }
}

delegate_dedup_store!(RedisClusterStore);

#[cfg(test)]
mod tests {
    use super::RedisClusterStore;

    #[test]
    fn tls_files_are_refused_not_ignored() {
        let e = RedisClusterStore::new(&["rediss://u:secret@h1:7000/?cacertfile=/ca.pem"], 1)
            .unwrap_err();
        assert!(e.0.contains("not supported for a Redis Cluster"), "{e}");
        assert!(!format!("{e} {e:?}").contains("secret"), "{e}");
        assert!(RedisClusterStore::new(&["rediss://h1:7000"], 1).is_ok());
    }
}
