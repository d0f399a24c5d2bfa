//! The four Lua scripts of the claim protocol, shared by [`super::RedisStore`] and (with
//! the `redis-cluster` feature) `RedisClusterStore`. Each script touches exactly one key
//! (`KEYS[1]`), so it is atomic on one node and routes by that key's slot on a cluster.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::redis::aio::ConnectionLike;
use deadpool_redis::redis::{Script, ScriptInvocation};

use super::{Claim, DedupError, DedupFuture, DedupStore, millis};

/// `0` acquired, `1` done, `2` held by another token.
const CLAIM: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 0
end
if v == 'done' then return 1 end
return 2
"#;

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Ours, or gone (our lease ran out and nobody claimed since): the work is done, say so.
/// Held by another token, or already done: leave it.
const COMPLETE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or not v then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
  return 1
end
return 0
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The prepared scripts; each method builds the invocation of one operation, which the
/// store runs on its connection (it answers an integer, decoded by the `*_outcome`
/// functions).
pub(super) struct Scripts {
    claim: Script,
    renew: Script,
    complete: Script,
    release: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            claim: Script::new(CLAIM),
            renew: Script::new(RENEW),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
        }
    }

    pub(super) fn claim(&self, key: &str, token: &str, lease: Duration) -> ScriptInvocation<'_> {
        let mut inv = self.claim.key(key);
        inv.arg(token).arg(millis(lease));
        inv
    }

    pub(super) fn renew(&self, key: &str, token: &str, lease: Duration) -> ScriptInvocation<'_> {
        let mut inv = self.renew.key(key);
        inv.arg(token).arg(millis(lease));
        inv
    }

    pub(super) fn complete(&self, key: &str, token: &str, ttl: Duration) -> ScriptInvocation<'_> {
        let mut inv = self.complete.key(key);
        inv.arg(token).arg(millis(ttl));
        inv
    }

    pub(super) fn release(&self, key: &str, token: &str) -> ScriptInvocation<'_> {
        let mut inv = self.release.key(key);
        inv.arg(token);
        inv
    }
}

/// What the claim script's answer means.
pub(super) fn claim_outcome(code: i64) -> Claim {
    match code {
        0 => Claim::Acquired,
        1 => Claim::Done,
        _ => Claim::Held,
    }
}

/// The pool settings both Redis stores use: up to `pool_size` connections (one serves all
/// operations; more are only opened while a broken one is replaced under load).
pub(super) fn pool_config(pool_size: usize) -> deadpool_redis::PoolConfig {
    deadpool_redis::PoolConfig {
        max_size: pool_size.max(1),
        timeouts: deadpool_redis::Timeouts {
            wait: Some(Duration::from_secs(5)),
            create: Some(Duration::from_secs(2)),
            recycle: Some(Duration::from_secs(2)),
        },
        ..Default::default()
    }
}

/// Where a script store gets its connection: a pool handing out multiplexed connections
/// (one Redis node, or a cluster) of which cheap clones run commands.
pub(super) trait ConnectionSource: Send + Sync + 'static {
    /// What the pool hands out; kept in the shared slot, back to the pool when replaced.
    type Pooled: Send;
    /// A clone of it that runs commands (requests of all clones are pipelined).
    type Conn: ConnectionLike + Send;
    /// Take a connection from the pool.
    fn take(&self) -> impl Future<Output = Result<Self::Pooled, DedupError>> + Send;
    /// A command handle on a pooled connection.
    fn handle(pooled: &Self::Pooled) -> Self::Conn;
}

/// The claim protocol over any [`ConnectionSource`]. Every operation runs on a clone of one
/// shared multiplexed connection (no per-operation pool checkout, whose recycle check costs
/// a round trip of its own); any error drops it, and the next operation takes a fresh one.
pub(super) struct ScriptStore<S: ConnectionSource> {
    source: S,
    /// The connection every operation clones; `None` until first use and after an error.
    shared: Mutex<Option<S::Pooled>>,
    scripts: Scripts,
}

impl<S: ConnectionSource> ScriptStore<S> {
    pub(super) fn new(source: S) -> Self {
        Self {
            source,
            shared: Mutex::new(None),
            scripts: Scripts::new(),
        }
    }

    /// A handle on the shared connection, taking one from the pool if there is none.
    async fn connection(&self) -> Result<S::Conn, DedupError> {
        if let Some(pooled) = self.lock_shared()?.as_ref() {
            return Ok(S::handle(pooled));
        }
        let fresh = self.source.take().await?;
        let handle = S::handle(&fresh);
        // Several operations may race to fill the slot: the last one wins; a connection it
        // replaces goes back to the pool.
        *self.lock_shared()? = Some(fresh);
        Ok(handle)
    }

    fn lock_shared(&self) -> Result<std::sync::MutexGuard<'_, Option<S::Pooled>>, DedupError> {
        self.shared
            .lock()
            .map_err(|_| DedupError("dedup store connection slot poisoned".into()))
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

impl<S: ConnectionSource> DedupStore for ScriptStore<S> {
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

    /// On a cluster the client sends `PING` to every node: all must answer.
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

/// Implement [`DedupStore`] for a newtype over a [`ScriptStore`] by delegation.
macro_rules! delegate_dedup_store {
    ($store:ty) => {
        impl $crate::dedup::DedupStore for $store {
            fn claim<'a>(
                &'a self,
                key: &'a str,
                token: &'a str,
                lease: std::time::Duration,
            ) -> $crate::dedup::DedupFuture<'a, $crate::dedup::Claim> {
                self.0.claim(key, token, lease)
            }

            fn renew<'a>(
                &'a self,
                key: &'a str,
                token: &'a str,
                lease: std::time::Duration,
            ) -> $crate::dedup::DedupFuture<'a, bool> {
                self.0.renew(key, token, lease)
            }

            fn complete<'a>(
                &'a self,
                key: &'a str,
                token: &'a str,
                ttl: std::time::Duration,
            ) -> $crate::dedup::DedupFuture<'a, bool> {
                self.0.complete(key, token, ttl)
            }

            fn release<'a>(
                &'a self,
                key: &'a str,
                token: &'a str,
            ) -> $crate::dedup::DedupFuture<'a, bool> {
                self.0.release(key, token)
            }

            fn ping(&self) -> $crate::dedup::DedupFuture<'_, ()> {
                self.0.ping()
            }
        }
    };
}
pub(super) use delegate_dedup_store;
