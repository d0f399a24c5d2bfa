//! In-process dedup store: correct for one instance, wrong for several (each has its own
//! memory). Used when `REDIS_URL` is unset, with a loud warning.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{Claim, DedupError, DedupFuture, DedupStore};

#[derive(Debug)]
enum Entry {
    Claimed { token: String, until: Instant },
    Done { until: Instant },
}

/// A [`DedupStore`] in this process's memory. Expired entries are dropped as they are met
/// and swept every 1024 claims.
///
/// Memory is bounded: past `max_entries` (default [`MemoryStore::DEFAULT_MAX_ENTRIES`]) the
/// oldest tenth of the `done` marks is forgotten early (never a live claim), with a
/// warning; a copy of one of those ids arriving later would run again.
#[derive(Debug)]
pub struct MemoryStore {
    entries: Mutex<HashMap<String, Entry>>,
    claims: std::sync::atomic::AtomicU64,
    max_entries: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_max_entries(Self::DEFAULT_MAX_ENTRIES)
    }
}

impl MemoryStore {
    /// Default bound on remembered ids (about 100 MB with short ids).
    pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;

    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store remembering at most `max_entries` ids (at least 10).
    pub fn with_max_entries(max_entries: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            claims: std::sync::atomic::AtomicU64::new(0),
            max_entries: max_entries.max(10),
        }
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut HashMap<String, Entry>, Instant) -> T,
    ) -> Result<T, DedupError> {
        let mut map = self
            .entries
            .lock()
            .map_err(|_| DedupError("in-memory dedup store lock poisoned".into()))?;
        Ok(f(&mut map, Instant::now()))
    }

    /// Number of live entries (claims and done marks).
    pub fn len(&self) -> usize {
        self.with(|m, now| m.values().filter(|e| !expired(e, now)).count())
            .unwrap_or(0)
    }

    /// Whether no live entries remain.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keep the map under `max`: drop expired entries, then, if still full, the oldest tenth of
/// the `done` marks (their TTLs are alike, so the earliest expiry is the oldest).
fn make_room(map: &mut HashMap<String, Entry>, now: Instant, max: usize) {
    if map.len() < max {
        return;
    }
    map.retain(|_, e| !expired(e, now));
    if map.len() < max {
        return;
    }
    let mut done: Vec<Instant> = map
        .values()
        .filter_map(|e| match e {
            Entry::Done { until } => Some(*until),
            Entry::Claimed { .. } => None,
        })
        .collect();
    if done.is_empty() {
        return;
    }
    let nth = (max / 10).clamp(1, done.len()) - 1;
    let cutoff = *done.select_nth_unstable(nth).1;
    map.retain(|_, e| !matches!(e, Entry::Done { until } if *until <= cutoff));
    tracing::warn!(
        max,
        "in-memory dedup store is full; forgot the oldest done marks early (set REDIS_URL for a real store)"
    );
}

fn expired(entry: &Entry, now: Instant) -> bool {
    match entry {
        Entry::Claimed { until, .. } | Entry::Done { until } => *until <= now,
    }
}

impl DedupStore for MemoryStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        lease: Duration,
    ) -> DedupFuture<'a, Claim> {
        let sweep = self
            .claims
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % 1024
            == 1023;
        Box::pin(std::future::ready(self.with(|map, now| {
            if sweep {
                map.retain(|_, e| !expired(e, now));
            }
            match map.get(key) {
                Some(e) if !expired(e, now) => match e {
                    Entry::Done { .. } => Claim::Done,
                    Entry::Claimed { .. } => Claim::Held,
                },
                _ => {
                    make_room(map, now, self.max_entries);
                    map.insert(
                        key.to_owned(),
                        Entry::Claimed {
                            token: token.to_owned(),
                            until: now + lease,
                        },
                    );
                    Claim::Acquired
                }
            }
        })))
    }

    fn renew<'a>(&'a self, key: &'a str, token: &'a str, lease: Duration) -> DedupFuture<'a, bool> {
        Box::pin(std::future::ready(self.with(
            |map, now| match map.get_mut(key) {
                Some(Entry::Claimed { token: t, until }) if t == token && *until > now => {
                    *until = now + lease;
                    true
                }
                _ => false,
            },
        )))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> DedupFuture<'a, bool> {
        Box::pin(std::future::ready(self.with(|map, now| {
            let ours_or_free = match map.get(key) {
                Some(Entry::Claimed { token: t, .. }) if t == token => true,
                Some(e) => expired(e, now),
                None => true,
            };
            if ours_or_free {
                map.insert(key.to_owned(), Entry::Done { until: now + ttl });
            }
            ours_or_free
        })))
    }

    fn release<'a>(&'a self, key: &'a str, token: &'a str) -> DedupFuture<'a, bool> {
        Box::pin(std::future::ready(self.with(
            |map, now| match map.get(key) {
                Some(Entry::Claimed { token: t, until }) if t == token && *until > now => {
                    map.remove(key);
                    true
                }
                _ => false,
            },
        )))
    }

    fn ping(&self) -> DedupFuture<'_, ()> {
        Box::pin(std::future::ready(self.with(|_, _| ())))
    }
}

/// For tests: a [`MemoryStore`] whose renewals hang, as on a stopped Redis, for the key
/// `stuck` always and for every key while `stalled` is set. It counts the renewals asked
/// of it.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct HangingRenewals {
    inner: MemoryStore,
    stalled: std::sync::atomic::AtomicBool,
    renewals: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl HangingRenewals {
    /// The renewals asked so far, hung ones included.
    pub(crate) fn renewals(&self) -> usize {
        self.renewals.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Hang every renewal from now (`true`) or answer them again (`false`).
    pub(crate) fn stall(&self, stalled: bool) {
        self.stalled
            .store(stalled, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
impl DedupStore for HangingRenewals {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        lease: Duration,
    ) -> DedupFuture<'a, Claim> {
        self.inner.claim(key, token, lease)
    }

    fn renew<'a>(&'a self, key: &'a str, token: &'a str, lease: Duration) -> DedupFuture<'a, bool> {
        self.renewals
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if key == "stuck" || self.stalled.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        self.inner.renew(key, token, lease)
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> DedupFuture<'a, bool> {
        self.inner.complete(key, token, ttl)
    }

    fn release<'a>(&'a self, key: &'a str, token: &'a str) -> DedupFuture<'a, bool> {
        self.inner.release(key, token)
    }

    fn ping(&self) -> DedupFuture<'_, ()> {
        self.inner.ping()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);
    const TTL: Duration = Duration::from_secs(100);

    #[tokio::test]
    async fn claim_complete_then_duplicate_is_done() {
        let s = MemoryStore::new();
        assert_eq!(s.claim("k", "t1", LEASE).await.ok(), Some(Claim::Acquired));
        assert_eq!(s.claim("k", "t2", LEASE).await.ok(), Some(Claim::Held));
        assert_eq!(s.complete("k", "t1", TTL).await.ok(), Some(true));
        assert_eq!(s.claim("k", "t3", LEASE).await.ok(), Some(Claim::Done));
    }

    #[tokio::test]
    async fn failed_handler_releases_so_the_retry_runs() {
        // The seed's bug: a key written before the handler made the retry look like a duplicate.
        let s = MemoryStore::new();
        assert_eq!(s.claim("k", "t1", LEASE).await.ok(), Some(Claim::Acquired));
        assert_eq!(s.release("k", "t1").await.ok(), Some(true));
        assert_eq!(s.claim("k", "t2", LEASE).await.ok(), Some(Claim::Acquired));
    }

    #[tokio::test]
    async fn only_the_token_holder_may_complete_or_release() {
        let s = MemoryStore::new();
        assert_eq!(s.claim("k", "t1", LEASE).await.ok(), Some(Claim::Acquired));
        assert_eq!(s.complete("k", "other", TTL).await.ok(), Some(false));
        assert_eq!(s.release("k", "other").await.ok(), Some(false));
        assert_eq!(s.claim("k", "t2", LEASE).await.ok(), Some(Claim::Held));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unfinished_claim_expires_with_its_lease() {
        let s = MemoryStore::new();
        assert_eq!(
            s.claim("k", "crashed", LEASE).await.ok(),
            Some(Claim::Acquired)
        );
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        // The crashed holder can no longer complete; a redelivery claims afresh.
        assert_eq!(s.claim("k", "t2", LEASE).await.ok(), Some(Claim::Acquired));
        assert_eq!(s.complete("k", "crashed", TTL).await.ok(), Some(false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_success_is_still_recorded_when_nobody_claimed_since() {
        let s = MemoryStore::new();
        assert_eq!(
            s.claim("k", "slow", LEASE).await.ok(),
            Some(Claim::Acquired)
        );
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        // The handler succeeded after its lease ran out; the work is done all the same.
        assert_eq!(s.complete("k", "slow", TTL).await.ok(), Some(true));
        assert_eq!(s.claim("k", "t2", LEASE).await.ok(), Some(Claim::Done));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_success_does_not_overwrite_a_newer_claim() {
        let s = MemoryStore::new();
        assert_eq!(
            s.claim("k", "slow", LEASE).await.ok(),
            Some(Claim::Acquired)
        );
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        assert_eq!(s.claim("k", "t2", LEASE).await.ok(), Some(Claim::Acquired));
        assert_eq!(s.complete("k", "slow", TTL).await.ok(), Some(false));
        // t2's claim stands: it completes or releases it itself.
        assert_eq!(s.release("k", "t2").await.ok(), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn renew_extends_the_lease() {
        let s = MemoryStore::new();
        assert_eq!(s.claim("k", "t1", LEASE).await.ok(), Some(Claim::Acquired));
        tokio::time::advance(LEASE / 2).await;
        assert_eq!(s.renew("k", "t1", LEASE).await.ok(), Some(true));
        tokio::time::advance(LEASE * 3 / 4).await;
        assert_eq!(s.claim("k", "t2", LEASE).await.ok(), Some(Claim::Held));
        assert_eq!(s.renew("k", "t2", LEASE).await.ok(), Some(false));
    }

    #[tokio::test(start_paused = true)]
    async fn done_marks_expire_after_ttl() {
        let s = MemoryStore::new();
        assert_eq!(s.claim("k", "t1", LEASE).await.ok(), Some(Claim::Acquired));
        assert_eq!(s.complete("k", "t1", TTL).await.ok(), Some(true));
        tokio::time::advance(TTL + Duration::from_millis(1)).await;
        assert_eq!(s.claim("k", "t2", LEASE).await.ok(), Some(Claim::Acquired));
    }

    #[tokio::test]
    async fn memory_is_bounded_and_live_claims_survive_eviction() {
        let s = MemoryStore::with_max_entries(100);
        assert_eq!(
            s.claim("live", "t", LEASE).await.ok(),
            Some(Claim::Acquired)
        );
        for i in 0..1000 {
            let k = format!("k{i}");
            assert_eq!(s.claim(&k, "t", LEASE).await.ok(), Some(Claim::Acquired));
            assert_eq!(s.complete(&k, "t", TTL).await.ok(), Some(true));
        }
        assert!(s.len() <= 100, "bounded: {}", s.len());
        assert_eq!(s.claim("live", "t2", LEASE).await.ok(), Some(Claim::Held));
        // The newest done marks are still remembered.
        assert_eq!(s.claim("k999", "t", LEASE).await.ok(), Some(Claim::Done));
    }
}
