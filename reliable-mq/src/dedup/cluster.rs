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

use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::cluster::{ClusterConnection, Config as PoolConfig, Connection, Pool};
use deadpool_redis::redis::ScriptInvocation;
use deadpool_redis::{Runtime, Timeouts};

use super::scripts::{Scripts, claim_outcome};
use super::{Claim, DedupError, DedupFuture, DedupStore};

/// A [`DedupStore`] on a Redis Cluster, shared by every instance of a service.
pub struct RedisClusterStore {
    pool: Pool,
    /// The connection every operation clones; `None` until first use and after an error.
    shared: Mutex<Option<Connection>>,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterStore").finish_non_exhaustive()
    }
}

impl RedisClusterStore {
    /// A store on the cluster reachable through the seed `nodes` (`redis://host:port`
    /// URLs; one is enough, the client discovers the others), whose pool holds up to
    /// `pool_size` cluster connections (one serves all operations). Connects lazily: call
    /// [`DedupStore::ping`] to check every primary answers.
    pub fn new<S: AsRef<str>>(nodes: &[S], pool_size: usize) -> Result<Self, DedupError> {
        if nodes.is_empty() {
            return Err(DedupError("no Redis Cluster node given".into()));
        }
        let urls: Vec<String> = nodes.iter().map(|n| n.as_ref().to_owned()).collect();
        let mut cfg = PoolConfig::from_urls(urls);
        cfg.pool = Some(deadpool_redis::PoolConfig {
            max_size: pool_size.max(1),
            timeouts: Timeouts {
                wait: Some(Duration::from_secs(5)),
                create: Some(Duration::from_secs(2)),
                recycle: Some(Duration::from_secs(2)),
            },
            ..Default::default()
        });
        let pool = cfg
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| DedupError(format!("REDIS_URL (cluster) is not usable: {e}")))?;
        Ok(Self {
            pool,
            shared: Mutex::new(None),
            scripts: Scripts::new(),
        })
    }

    /// A handle on the shared connection, taking one from the pool if there is none.
    async fn connection(&self) -> Result<ClusterConnection, DedupError> {
        if let Some(conn) = self.lock_shared()?.as_ref() {
            return Ok(ClusterConnection::clone(conn));
        }
        let fresh = self
            .pool
            .get()
            .await
            .map_err(|e| DedupError(e.to_string()))?;
        let handle = ClusterConnection::clone(&fresh);
        *self.lock_shared()? = Some(fresh);
        Ok(handle)
    }

    fn lock_shared(&self) -> Result<std::sync::MutexGuard<'_, Option<Connection>>, DedupError> {
        self.shared
            .lock()
            .map_err(|_| DedupError("redis cluster connection slot poisoned".into()))
    }

    fn forget_connection(&self) {
        if let Ok(mut slot) = self.shared.lock() {
            *slot = None;
        }
    }

    async fn run(&self, invocation: ScriptInvocation<'_>) -> Result<i64, DedupError> {
        let mut conn = self.connection().await?;
        invocation.invoke_async(&mut conn).await.map_err(|e| {
            self.forget_connection();
            DedupError(e.to_string())
        })
    }
}

impl DedupStore for RedisClusterStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        lease: Duration,
    ) -> DedupFuture<'a, Claim> {
        Box::pin(async move {
            let code = self.run(self.scripts.claim(key, token, lease)).await?;
            Ok(claim_outcome(code))
        })
    }

    fn renew<'a>(&'a self, key: &'a str, token: &'a str, lease: Duration) -> DedupFuture<'a, bool> {
        Box::pin(async move { Ok(self.run(self.scripts.renew(key, token, lease)).await? == 1) })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> DedupFuture<'a, bool> {
        Box::pin(async move { Ok(self.run(self.scripts.complete(key, token, ttl)).await? == 1) })
    }

    fn release<'a>(&'a self, key: &'a str, token: &'a str) -> DedupFuture<'a, bool> {
        Box::pin(async move { Ok(self.run(self.scripts.release(key, token)).await? == 1) })
    }

    /// `PING` goes to every node of the cluster; all must answer.
    fn ping(&self) -> DedupFuture<'_, ()> {
        Box::pin(async move {
            let mut conn = self.connection().await?;
            deadpool_redis::redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(|_| ())
                .map_err(|e| {
                    self.forget_connection();
                    DedupError(e.to_string())
                })
        })
    }
}
