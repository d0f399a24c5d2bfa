//! Deduplication as a claim, not a mark (see `docs/architecture.md`, "The dedup claim").
//!
//! A delivery of an idempotent consumer first *claims* its key
//! (`{prefix}:{vhost}:{queue}:{message_id}`, see [`KeyScope`]; prefix from
//! [`Config::dedup_prefix`], default `reliable-mq`) with a random token and a lease
//! longer than the handler timeout (capped at [`MAX_LEASE`]), renewed from the moment the
//! claim is taken until the handler is done. Then:
//!
//! | the claim finds | the delivery |
//! |---|---|
//! | nothing | runs the handler; success turns the claim into `done` for `dedup_ttl` (compare-and-set on the token), then acks; failure deletes the claim (compare-and-delete), then retries or dead-letters |
//! | `done` | is acked without a handler call (a duplicate) |
//! | another claim | is copied to the consumer's requeue tier (a delayed wait queue) and acked there; it comes back after `retry_delay` and finds `done` (acked), nothing (it runs: the other copy failed) or the claim still held (requeued again) |
//! | no answer | keeps its slot and stays unacked while the claim is retried with capped backoff (the consumer is paused in place): nothing is acked, dead-lettered or handed back because the store was down |
//!
//! A claim that never finished (a crash) expires with its lease: a message is never
//! skipped because of a claim that did not finish, it is only delayed by at most the
//! lease. If the store fails when `done` is written after a successful handler, the
//! message is acked anyway and the failure logged: re-running a side effect on purpose
//! would be worse than the small chance that a later copy runs again.
//!
//! # Messages without a `message_id`
//!
//! An idempotent consumer cannot deduplicate what it cannot name. A delivery without a
//! `message_id` (or with an empty one) is dead-lettered with
//! `x-error-kind = missing-message-id`, without a handler call and without touching the
//! store; it is never run un-deduplicated and never dropped. Publish with a
//! `message_id` ([`crate::Publisher`] always sets one, a UUIDv7) and re-publish the
//! dead letters once fixed. There is deliberately no fallback to a hash of the body: two
//! different messages may have the same body (two identical orders), and folding them
//! into one would silently lose the second.
//!
//! # What the store has to be
//!
//! The guarantee is as durable as the store. [`MemoryStore`] dies with the process and is
//! not shared: one instance only. [`RedisStore`] serves every instance; a Redis restarted
//! without persistence forgets `done` marks and claims, so a copy arriving after that runs
//! again. Give Redis AOF if that matters. Every script touches one key, so the protocol
//! runs unchanged on the other topologies:
//!
//! | `REDIS_URL` | store | cargo feature |
//! |---|---|---|
//! | `redis://host:port` | [`RedisStore`]: one node (or a proxy in front of several) | - |
//! | `redis+cluster://host1:port1,host2:port2` | `RedisClusterStore`: a Redis Cluster (seed nodes; one is enough) | `redis-cluster` |
//! | `redis+sentinel://[user:password@]host1:port1,host2:port2/master` | `RedisSentinelStore`: the primary that the sentinels name for `master`, found again after a failover | `redis-sentinel` |
//!
//! A `redis+…` URL without its feature is a start-up error, never a silent fall-back to
//! one node.
//!
//! # Replication and failover
//!
//! Redis replicates asynchronously: the primary answers a claim (or a `done` mark) before
//! any replica has it. If the primary dies in that window and a replica is promoted
//! (Sentinel or Cluster failover), the write is gone. What that means for a delivery:
//!
//! - **A lost claim**: the first copy is still running; a second copy of the same
//!   message arriving now finds the key free and runs too. A second copy arrives only by
//!   a redelivery (the first copy's connection dropped) or a duplicate publish, so this
//!   needs a failover *and* such a copy within the replication lag, typically
//!   milliseconds.
//! - **A lost `done` mark**: the message was handled and acked; a duplicate published
//!   later runs again (a redelivery cannot happen: the original was acked).
//!
//! So a failover can let a message that was *in flight at that moment* run twice; it never
//! skips one (a lost claim only makes a key free, never `done`). While no primary
//! answers, the claims fail and the consumer pauses in place with its deliveries unacked
//! (the `sentinel` tests measure the pause: about the sentinels' `down-after-milliseconds`
//! plus the election, 2.3-2.4 s with 1 s there).
//!
//! `WAIT 1 <timeout>` after each claim and each `done` mark would narrow this to almost
//! nothing for a single failure: the operation would count only once a replica has it
//! (not a guarantee: with several replicas, Sentinel may promote one that lacks the
//! write, and Redis documents `WAIT` as not making it strongly consistent). Its price is
//! a round trip from the primary to a replica on every claim and every `done`, on the
//! critical path of each message. Measured on loopback
//! (`sentinel_wait_for_a_replica_cost_figures`: one connection, sequential `SET NX PX`,
//! three runs on a shared 2-core machine): 70, 72 and 196 µs alone; 107 µs, 195 µs and
//! 1.0 ms with `WAIT 1 1000` pipelined after it (1.5x, 2.7x, 5.1x: the busier the
//! machine, the longer the replica takes to be scheduled and acknowledge). Across
//! machines add the primary-replica network round trip (typically 0.2-1 ms per
//! operation), and when no replica answers, every claim waits out the timeout. It is not
//! offered as a setting: the window it closes is the one above, and the handler window
//! below (side effect done, `done` not written) stays open either way; the inbox pattern
//! closes both for database side effects.
//!
//! # The window no broker-side design closes
//!
//! The handler's side effect is done (a row committed, a mail sent), then the process is
//! killed before `done` is written. The claim expires, the broker redelivers, and the
//! handler runs again. No ordering of ack, claim and side effect avoids it: the side
//! effect and the `done` mark live in two systems, and nothing commits both at once.
//! Handlers whose effect must never repeat use the **inbox pattern**: write the
//! `message_id` into a processed-messages table *in the same database transaction* as the
//! business change (a unique key on it), and treat a unique-violation as "already done,
//! return `Ok`". Dedup here then only saves the work of most duplicates; the inbox row
//! makes the rest harmless. Side effects outside a database (an HTTP call) need an
//! idempotency key the other side honours, e.g. the `message_id`.
//!
//! [`Config::dedup_prefix`]: crate::Config::dedup_prefix

mod ahead;
#[cfg(feature = "redis-cluster")]
mod cluster;
pub(crate) mod memory;
mod redis;
mod scripts;
#[cfg(feature = "redis-sentinel")]
mod sentinel;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use ahead::{claim_code, claim_outcome};
// Named in `DedupStore::send`, which only this crate's stores implement.
#[doc(hidden)]
pub use ahead::{Op, StoreCall};

pub use memory::MemoryStore;
pub use redis::RedisStore;

#[cfg(feature = "redis-cluster")]
pub use cluster::RedisClusterStore;
#[cfg(feature = "redis-sentinel")]
pub use sentinel::RedisSentinelStore;

/// What a claim attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key was free; this delivery now holds it and must run the handler.
    Acquired,
    /// The message was already handled: ack without running the handler.
    Done,
    /// Another delivery holds the claim right now (a copy in flight elsewhere).
    Held,
}

/// The dedup store could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("dedup store unavailable: {0}")]
pub struct DedupError(pub String);

/// Boxed future returned by [`DedupStore`] methods.
pub type DedupFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DedupError>> + Send + 'a>>;

/// A store for dedup claims. Every operation is atomic on the store's side.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a dedup store",
    note = "use reliable_mq::dedup::RedisStore (many instances) or MemoryStore (one instance)"
)]
pub trait DedupStore: Send + Sync + 'static {
    /// Claim `key` with `token` for `lease`, unless it is `done` or held.
    fn claim<'a>(&'a self, key: &'a str, token: &'a str, lease: Duration)
    -> DedupFuture<'a, Claim>;

    /// Extend the lease of a claim still held with `token`; `false` if it was lost.
    fn renew<'a>(&'a self, key: &'a str, token: &'a str, lease: Duration) -> DedupFuture<'a, bool>;

    /// Turn the claim held with `token` into `done` for `ttl`. Also marks `done` when the
    /// key is gone (the lease ran out and nobody claimed since: the work is done all the
    /// same). `false` if another claim holds the key or it is already `done`.
    fn complete<'a>(&'a self, key: &'a str, token: &'a str, ttl: Duration)
    -> DedupFuture<'a, bool>;

    /// Delete the claim held with `token`; `false` if it was not ours any more.
    fn release<'a>(&'a self, key: &'a str, token: &'a str) -> DedupFuture<'a, bool>;

    /// Check the store answers.
    fn ping(&self) -> DedupFuture<'_, ()>;

    /// Send `op` (for `duration`) for the key and token of `call` without waiting, the
    /// answer written into `call` when it comes: how a store that batches takes a
    /// delivery's claim the moment it arrives. `false` (the default) for a store that does
    /// not: the caller then uses the methods above. Implemented by this crate's Redis
    /// stores only.
    #[doc(hidden)]
    fn send(&self, call: &Arc<StoreCall>, op: Op, duration: Duration) -> bool {
        let _ = (call, op, duration);
        false
    }
}

/// Where the dedup keys of an app live: the configured prefix, the optional namespace and
/// the broker's virtual host. Two apps share dedup marks only when all three match, so two
/// environments on one Redis (a vhost each, or a namespace each) never take each other's
/// messages for duplicates.
///
/// Key layout: `{prefix}:{vhost}:{queue}:{message_id}`, or
/// `{prefix}:{namespace}:{vhost}:{queue}:{message_id}` with a namespace. Every part after
/// the prefix has `%` and `:` percent-encoded, so no two different parts run into each
/// other (`a:b` + `c` and `a` + `b:c` are different keys) and the default vhost `/` stays
/// readable. The prefix is taken as it is, so `{prefix}:*` matches every key of the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyScope {
    /// `{prefix}` or `{prefix}:{namespace}`, then `:{vhost}`, all encoded: everything
    /// before the queue.
    head: String,
}

impl KeyScope {
    /// Keys under `prefix` for the virtual host `vhost`.
    pub fn new(prefix: &str, vhost: &str) -> Self {
        Self {
            head: format!("{prefix}:{}", encode(vhost)),
        }
    }

    /// Keys under `prefix`, then `namespace` (when there is one), for `vhost`.
    pub fn with_namespace(prefix: &str, namespace: Option<&str>, vhost: &str) -> Self {
        match namespace.filter(|n| !n.is_empty()) {
            Some(ns) => Self {
                head: format!("{prefix}:{}:{}", encode(ns), encode(vhost)),
            },
            None => Self::new(prefix, vhost),
        }
    }

    /// The scope of `config`: its prefix and namespace, and the vhost of its (first)
    /// broker URL.
    pub fn from_config(config: &crate::Config) -> Result<Self, crate::Error> {
        let url = config.amqp_urls().first().copied().unwrap_or_default();
        let vhost = vhost_of(url).ok_or_else(|| {
            crate::Error::Config(format!(
                "AMQP_URL {} is not a valid AMQP URL; expected amqp://user:password@host:5672/vhost",
                crate::config::redact_url(url)
            ))
        })?;
        Ok(Self::with_namespace(
            &config.dedup_prefix,
            config.dedup_namespace.as_deref(),
            &vhost,
        ))
    }

    /// The dedup key of `message_id` on `queue`.
    pub fn key(&self, queue: &str, message_id: &str) -> String {
        self.key_with_room(queue, message_id, 0)
    }

    /// [`Self::key`], with capacity for `room` more bytes (a claim appends its token).
    pub(crate) fn key_with_room(&self, queue: &str, message_id: &str, room: usize) -> String {
        // Built by hand, not with `format!`: this runs for every delivery.
        let (queue, message_id) = (encode(queue), encode(message_id));
        let mut key =
            String::with_capacity(self.head.len() + queue.len() + message_id.len() + 2 + room);
        for part in [self.head.as_str(), ":", &queue, ":", &message_id] {
            key.push_str(part);
        }
        key
    }
}

/// The virtual host a broker URL names (`/` when the path is empty), decoded.
fn vhost_of(url: &str) -> Option<String> {
    let uri: lapin::uri::AMQPUri = url.parse().ok()?;
    Some(uri.vhost)
}

/// `part` with `%` and `:` percent-encoded.
fn encode(part: &str) -> std::borrow::Cow<'_, str> {
    // Bytes, not a `char` pattern (which decodes every character): both are ASCII.
    if part.bytes().any(|b| b == b':' || b == b'%') {
        std::borrow::Cow::Owned(part.replace('%', "%25").replace(':', "%3A"))
    } else {
        std::borrow::Cow::Borrowed(part)
    }
}

/// The seed node URLs of a `redis+cluster://` (or `rediss+cluster://`) URL, `None` for any
/// other URL (one Redis node).
///
/// `redis+cluster://[user:password@]host1:port1,host2:port2[/...]` gives
/// `redis://[user:password@]host1:port1[/...]`, `redis://[user:password@]host2:port2[/...]`:
/// the credentials and the rest of the URL apply to every node.
pub fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return None;
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => authority.split_at(at + 1),
        None => ("", authority),
    };
    Some(
        hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}://{userinfo}{h}{tail}"))
            .collect(),
    )
}

/// What a `redis+sentinel://[user:password@]host1:port1,host2:port2/master-name` URL
/// names: the sentinels (as `redis://host:port`), the master name, and the credentials
/// for the Redis nodes (the sentinels are asked without them).
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// The sentinels, `redis://host:port` each.
    pub sentinels: Vec<String>,
    /// The master name the sentinels monitor.
    pub master: String,
    /// ACL user for the Redis nodes.
    pub username: Option<String>,
    /// Password for the Redis nodes.
    pub password: Option<String>,
}

impl std::fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// The parts of a `redis+sentinel://` URL, or `None` for any other URL. The master name
/// is the path's first segment; it may be empty here (the store refuses it).
pub fn sentinel_url(url: &str) -> Option<SentinelUrl> {
    let rest = url.strip_prefix("redis+sentinel://")?;
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(info) => match info.split_once(':') {
            Some((user, pass)) => (
                Some(user.to_owned()).filter(|u| !u.is_empty()),
                Some(pass.to_owned()).filter(|p| !p.is_empty()),
            ),
            None => (Some(info.to_owned()).filter(|u| !u.is_empty()), None),
        },
    };
    let master = tail
        .strip_prefix('/')
        .unwrap_or("")
        .split(['/', '?'])
        .next()
        .unwrap_or("")
        .to_owned();
    Some(SentinelUrl {
        sentinels: hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{h}"))
            .collect(),
        master,
        username,
        password,
    })
}

/// The longest claim lease. A claim is renewed every third of its lease for as long as
/// its handler runs, so a long `timeout` does not need a long lease; a short one bounds how
/// long a crashed instance's claim holds a redelivery off (at most this, whatever the
/// handler timeout).
pub const MAX_LEASE: Duration = Duration::from_secs(120);

/// A claim lease for a handler `timeout`: the timeout plus a margin, capped at
/// [`MAX_LEASE`]. The lease is renewed while the handler runs, so a claim does not expire
/// under a running handler while the store answers.
pub fn lease_for(timeout: Duration) -> Duration {
    (timeout + (timeout / 2).max(Duration::from_secs(5))).min(MAX_LEASE)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod sentinel_url_tests {
    use super::sentinel_url;

    #[test]
    fn sentinels_master_and_credentials() {
        let u = sentinel_url("redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380/dedup")
            .expect("a sentinel URL");
        assert_eq!(
            u.sentinels,
            ["redis://10.0.0.1:26379", "redis://10.0.0.2:26380"]
        );
        assert_eq!(u.master, "dedup");
        assert_eq!(u.username, None);
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert!(!format!("{u:?}").contains("s3cret"));
    }

    #[test]
    fn missing_master_is_empty_and_other_schemes_are_not_sentinel() {
        let u = sentinel_url("redis+sentinel://h:1").expect("a sentinel URL");
        assert_eq!(u.master, "");
        assert_eq!(sentinel_url("redis://h:1/0"), None);
        assert_eq!(sentinel_url("redis+cluster://h:1"), None);
    }
}

#[cfg(test)]
mod key_tests {
    use std::time::Duration;

    use super::{KeyScope, MAX_LEASE, lease_for};

    #[test]
    fn parts_cannot_run_into_each_other() {
        let root = KeyScope::new("p", "/");
        assert_eq!(root.key("orders", "m-1"), "p:/:orders:m-1");
        assert_ne!(root.key("a:b", "c"), root.key("a", "b:c"));
        assert_eq!(root.key("a:b%", "c:d"), "p:/:a%3Ab%25:c%3Ad");
        assert_ne!(
            KeyScope::new("p", "a:b").key("q", "m"),
            KeyScope::new("p", "a").key("b:q", "m")
        );
    }

    #[test]
    fn the_vhost_and_the_namespace_scope_the_keys() {
        let key =
            |ns: Option<&str>, vhost: &str| KeyScope::with_namespace("p", ns, vhost).key("q", "m");
        assert_ne!(key(None, "/"), key(None, "staging"));
        assert_ne!(key(Some("blue"), "/"), key(Some("green"), "/"));
        assert_ne!(key(Some("blue"), "/"), key(None, "/"));
        assert_eq!(
            key(Some(""), "/"),
            key(None, "/"),
            "an empty namespace is none"
        );
        assert_eq!(key(Some("a:b"), "v"), "p:a%3Ab:v:q:m");
    }

    #[test]
    fn the_scope_of_a_config_names_the_urls_vhost() {
        let scope = |url: &str| {
            KeyScope::from_config(&crate::Config::default().with_amqp_url(url))
                .map(|s| s.key("q", "m"))
                .ok()
        };
        let p = crate::Config::default().dedup_prefix;
        assert_eq!(scope("amqp://u:p@h:5672/%2f"), Some(format!("{p}:/:q:m")));
        assert_eq!(scope("amqp://u:p@h:5672"), Some(format!("{p}:/:q:m")));
        assert_eq!(
            scope("amqp://u:p@h:5672/prod,amqp://u:p@h2:5672/prod"),
            Some(format!("{p}:prod:q:m"))
        );
        assert_eq!(scope("not a url"), None);
    }

    #[test]
    fn leases_are_capped() {
        assert_eq!(lease_for(Duration::from_secs(30)), Duration::from_secs(45));
        assert_eq!(lease_for(Duration::from_secs(1)), Duration::from_secs(6));
        assert_eq!(lease_for(Duration::from_secs(7200)), MAX_LEASE);
    }

    #[test]
    fn cluster_urls_list_their_seed_nodes() {
        use super::cluster_nodes;
        assert_eq!(cluster_nodes("redis://127.0.0.1:6379"), None);
        assert_eq!(
            cluster_nodes("redis+cluster://10.0.0.1:7000, 10.0.0.2:7001"),
            Some(vec![
                "redis://10.0.0.1:7000".to_owned(),
                "redis://10.0.0.2:7001".to_owned()
            ])
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://u:p@a:7000,b:7000/0?protocol=resp3"),
            Some(vec![
                "rediss://u:p@a:7000/0?protocol=resp3".to_owned(),
                "rediss://u:p@b:7000/0?protocol=resp3".to_owned()
            ])
        );
        assert_eq!(
            cluster_nodes("redis+cluster://cfg.example:6379"),
            Some(vec!["redis://cfg.example:6379".to_owned()])
        );
        assert_eq!(cluster_nodes("redis+cluster://"), Some(vec![]));
    }
}
