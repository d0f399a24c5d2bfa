//! Redis Sentinel dedup store (cargo feature `redis-sentinel`).
//!
//! The same four scripts as [`super::RedisStore`], run on the primary that the sentinels
//! name for the master. Every operation runs on a clone of one shared multiplexed
//! connection to that primary. Any error drops it, and the next operation asks the
//! sentinels again (the client checks the `ROLE` of the node they name). So after a
//! failover, or when a demoted primary answers `READONLY`, the store follows the new
//! primary by itself. There is deliberately no pool here: a pooled connection to a
//! demoted primary would still answer `PING` and be handed out again.
//!
//! Durability is the replication's: Redis replicates asynchronously, so a claim or `done`
//! mark acknowledged by a primary that dies before a replica received it is gone after
//! the failover (see the module docs of [`super`], "Replication and failover").

use std::time::Duration;

use deadpool_redis::redis::RedisConnectionInfo;
use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::sentinel::{
    SentinelClient, SentinelNodeConnectionInfo, SentinelServerType,
};

use super::DedupError;
use super::scripts::{ConnectionSource, ScriptStore, delegate_dedup_store};

/// How long asking the sentinels and connecting to the primary may take before the
/// operation fails (and the consumer pauses and retries with backoff).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`DedupStore`](super::DedupStore) on the primary that Redis Sentinel names, shared by
/// every instance of a service.
pub struct RedisSentinelStore(ScriptStore<Resolver>, String);

impl std::fmt::Debug for RedisSentinelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSentinelStore")
            .field("master", &self.1)
            .finish_non_exhaustive()
    }
}

impl RedisSentinelStore {
    /// A store on the primary of `master`, as named by the sentinels at `sentinels`
    /// (`redis://host:port` URLs; one that answers is enough). `username`/`password`
    /// authenticate to the Redis nodes (not to the sentinels). Connects lazily: call
    /// [`DedupStore::ping`](super::DedupStore::ping) to check the primary answers.
    pub fn new<S: AsRef<str>>(
        sentinels: &[S],
        master: &str,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Result<Self, DedupError> {
        if sentinels.is_empty() {
            return Err(DedupError("no Redis Sentinel address given".into()));
        }
        if master.is_empty() {
            return Err(DedupError("no Redis Sentinel master name given".into()));
        }
        let mut node = RedisConnectionInfo::default();
        if let Some(user) = username.filter(|u| !u.is_empty()) {
            node = node.set_username(user);
        }
        if let Some(password) = password.filter(|p| !p.is_empty()) {
            node = node.set_password(password);
        }
        let urls: Vec<String> = sentinels.iter().map(|s| s.as_ref().to_owned()).collect();
        // An owned name fits `build` both with and without redis' TLS feature (which
        // changes its parameter type).
        let service: String = master.to_owned();
        let client = SentinelClient::build(
            urls,
            service,
            Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(node)),
            SentinelServerType::Master,
        )
        .map_err(|e| DedupError(format!("REDIS_URL (sentinel) is not usable: {e}")))?;
        let resolver = Resolver {
            client: tokio::sync::Mutex::new(client),
            master: master.to_owned(),
        };
        Ok(Self(ScriptStore::new(resolver), master.to_owned()))
    }
}

/// Asks the sentinels for the current primary at each call.
pub(super) struct Resolver {
    client: tokio::sync::Mutex<SentinelClient>,
    master: String,
}

impl ConnectionSource for Resolver {
    type Pooled = MultiplexedConnection;
    type Conn = MultiplexedConnection;

    async fn take(&self) -> Result<MultiplexedConnection, DedupError> {
        let mut client = self.client.lock().await;
        match tokio::time::timeout(RESOLVE_TIMEOUT, client.get_async_connection()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(DedupError(format!(
                "no primary for Redis Sentinel master {}: {e}",
                self.master
            ))),
            Err(_) => Err(DedupError(format!(
                "no primary for Redis Sentinel master {} within {RESOLVE_TIMEOUT:?}",
                self.master
            ))),
        }
    }

    fn handle(pooled: &MultiplexedConnection) -> MultiplexedConnection {
        pooled.clone()
    }
}

delegate_dedup_store!(RedisSentinelStore);
