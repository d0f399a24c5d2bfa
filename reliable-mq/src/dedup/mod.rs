//! Deduplication as a claim, not a mark (DESIGN.md section 2).
//!
//! A delivery of an idempotent consumer first *claims* its key
//! (`{prefix}:{queue}:{message_id}`) with a random token and a lease. Success turns the
//! claim into `done` (compare-and-set on the token) with the dedup TTL; failure deletes
//! it (compare-and-delete), so the retry runs. A claim that never finished (crash) simply
//! expires with its lease: a message is never skipped because of a claim that did not
//! finish.

mod memory;
mod redis;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use memory::MemoryStore;
pub use redis::RedisStore;

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
    fn claim<'a>(&'a self, key: &'a str, token: &'a str, lease: Duration) -> DedupFuture<'a, Claim>;

    /// Extend the lease of a claim still held with `token`; `false` if it was lost.
    fn renew<'a>(&'a self, key: &'a str, token: &'a str, lease: Duration) -> DedupFuture<'a, bool>;

    /// Turn the claim held with `token` into `done` for `ttl`; `false` if it was lost.
    fn complete<'a>(&'a self, key: &'a str, token: &'a str, ttl: Duration) -> DedupFuture<'a, bool>;

    /// Delete the claim held with `token`; `false` if it was not ours any more.
    fn release<'a>(&'a self, key: &'a str, token: &'a str) -> DedupFuture<'a, bool>;

    /// Check the store answers.
    fn ping(&self) -> DedupFuture<'_, ()>;
}

/// The dedup key of a message on a queue.
pub fn key(prefix: &str, queue: &str, message_id: &str) -> String {
    format!("{prefix}:{queue}:{message_id}")
}

/// A claim lease for a handler `timeout`: the timeout plus a margin, so a claim never
/// expires while its handler may still be running (it is renewed besides).
pub fn lease_for(timeout: Duration) -> Duration {
    timeout + (timeout / 2).max(Duration::from_secs(5))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
