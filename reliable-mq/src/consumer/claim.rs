//! The dedup claim around a handler call (`docs/architecture.md`, "The dedup claim"):
//! claim, then `done` on success or release on failure, with the lease renewed from the
//! moment the claim is taken until it is settled.
//!
//! The renewal runs on the consumer's renewal sweep (`renew`), beside the handler: a slow
//! or stopped store delays only the renewal (each call has its own deadline), never the
//! handler or its timeout. A claim taken ahead of a free slot is renewed while it waits,
//! too.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::Delivery;
use crate::consumer::renew::{Renewal, Renewals};
use crate::dedup::{self, Claim, DedupError, DedupStore, KeyScope};

/// How long one store call may take before it counts as failed. A stopped Redis (SIGSTOP,
/// a network partition without a reset) keeps its connection open and never answers; a
/// claim must then become "store down" (the delivery is held), not hang for ever.
pub(crate) const STORE_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the claim step decided for a delivery.
pub(crate) enum ClaimDecision {
    /// Run the handler (holding `Some(claim)` for idempotent consumers).
    Run(Option<ClaimGuard>),
    /// Already handled: ack without running.
    Duplicate,
    /// Another copy is in flight elsewhere: put it back with a delay.
    HeldElsewhere,
    /// Idempotent consumer, no `message_id`: dead-letter.
    MissingMessageId,
    /// The store did not answer: the driver holds the delivery and claims again later.
    StoreDown(DedupError),
}

/// A claim this delivery holds, its lease renewed in the background until it is settled.
/// Dropped without [`ClaimGuard::complete`] or [`ClaimGuard::release`] (its task aborted:
/// the shutdown grace ran out), it releases the claim in the background, so the
/// redelivery runs now rather than after the lease.
pub(crate) struct ClaimGuard {
    store: Arc<dyn DedupStore>,
    /// The key, then the token, in one allocation.
    key_token: String,
    /// Where the key ends in `key_token`.
    key_len: usize,
    /// The claim's place in the renewal sweep, left when the claim is settled or dropped.
    renewal: Option<Renewal>,
    settled: bool,
}

/// Claim `delivery` for an idempotent consumer (`store` is `None` for the others).
pub(crate) async fn claim(
    store: Option<&Arc<dyn DedupStore>>,
    renewals: &Renewals,
    scope: &KeyScope,
    timeout: Duration,
    delivery: &Delivery,
) -> ClaimDecision {
    let Some(store) = store else {
        return ClaimDecision::Run(None);
    };
    let Some(message_id) = delivery.message_id().filter(|id| !id.is_empty()) else {
        return ClaimDecision::MissingMessageId;
    };
    // Key and token in one allocation; the token encoded without the formatting machinery.
    let (key_token, key_len) = {
        let mut buf = uuid::Uuid::encode_buffer();
        let token: &str = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
        let mut key_token = scope.key_with_room(delivery.queue(), message_id, token.len());
        let key_len = key_token.len();
        key_token.push_str(token);
        (key_token, key_len)
    };
    let (key, token) = key_token.split_at(key_len);
    let lease = dedup::lease_for(timeout);
    let answer = tokio::time::timeout(STORE_CALL_TIMEOUT, store.claim(key, token, lease))
        .await
        .unwrap_or_else(|_| {
            Err(DedupError(format!(
                "no answer within {STORE_CALL_TIMEOUT:?}"
            )))
        });
    match answer {
        Ok(Claim::Acquired) => {
            let renewal = renewals.start(store, key, token, lease);
            ClaimDecision::Run(Some(ClaimGuard {
                store: Arc::clone(store),
                key_token,
                key_len,
                renewal,
                settled: false,
            }))
        }
        Ok(Claim::Done) => ClaimDecision::Duplicate,
        Ok(Claim::Held) => ClaimDecision::HeldElsewhere,
        Err(e) => {
            // The claim may have been written even though its answer was lost (a response
            // timeout on a slow Redis). Nobody would hold that claim: the redelivery would
            // find it held until the lease ran out. Delete it if it is ours, in the
            // background; when the store is really down this fails, harmlessly.
            release_in_background(Arc::clone(store), key_token, key_len);
            ClaimDecision::StoreDown(e)
        }
    }
}

/// Compare-and-delete the key with the token (`key_token` split at `key_len`) on a task of
/// its own (best effort).
fn release_in_background(store: Arc<dyn DedupStore>, key_token: String, key_len: usize) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let (key, token) = key_token.split_at(key_len);
        let released = tokio::time::timeout(STORE_CALL_TIMEOUT, store.release(key, token)).await;
        match released {
            Ok(Ok(true)) => debug!(%key, "released an unsettled claim"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => debug!(%key, error = %e, "cannot release an unsettled claim; it expires with its lease"),
            Err(_) => debug!(%key, "no answer releasing an unsettled claim; it expires with its lease"),
        }
    });
}

impl ClaimGuard {
    fn key(&self) -> &str {
        &self.key_token[..self.key_len]
    }

    fn token(&self) -> &str {
        &self.key_token[self.key_len..]
    }

    fn settle(&mut self) {
        self.settled = true;
        self.renewal = None;
    }

    /// The handler succeeded: mark `done` for `ttl`. A store error is logged, not
    /// returned: the work is done and the message will be acked; re-running the side
    /// effect on purpose would be worse than a possible duplicate later.
    pub(crate) async fn complete(mut self, ttl: Duration) {
        self.settle();
        let done = tokio::time::timeout(
            STORE_CALL_TIMEOUT,
            self.store.complete(self.key(), self.token(), ttl),
        )
        .await;
        match done {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                warn!(key = %self.key(), "claim lost before the handler finished and another delivery holds or finished it; done mark not written")
            }
            Ok(Err(e)) => {
                warn!(key = %self.key(), error = %e, "handled, but cannot write the done mark; acking anyway (a redelivery would run again)")
            }
            Err(_) => {
                warn!(key = %self.key(), "handled, but the dedup store did not answer the done mark in time; acking anyway (a redelivery would run again)")
            }
        }
    }

    /// The handler failed: delete the claim so the retry runs. On a store error the claim
    /// expires with its lease; until then a retry is requeued as held, never skipped.
    pub(crate) async fn release(mut self) {
        self.settle();
        let released = tokio::time::timeout(
            STORE_CALL_TIMEOUT,
            self.store.release(self.key(), self.token()),
        )
        .await;
        match released {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(key = %self.key(), error = %e, "cannot release claim; it expires with its lease")
            }
            Err(_) => {
                warn!(key = %self.key(), "no answer releasing the claim; it expires with its lease")
            }
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.renewal = None;
        if !self.settled {
            release_in_background(
                Arc::clone(&self.store),
                std::mem::take(&mut self.key_token),
                self.key_len,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::{MemoryStore, RedisStore};

    const TIMEOUT: Duration = Duration::from_secs(10);
    const TTL: Duration = Duration::from_secs(3600);

    fn delivery(id: Option<&str>) -> Delivery {
        let mut d = Delivery::for_test(b"1".to_vec());
        if let Some(id) = id {
            d = d.with_message_id(id);
        }
        d.queue = "orders".into();
        d
    }

    fn memory() -> (Arc<MemoryStore>, Arc<dyn DedupStore>) {
        let store = Arc::new(MemoryStore::new());
        let dyn_store: Arc<dyn DedupStore> = store.clone();
        (store, dyn_store)
    }

    fn scope() -> KeyScope {
        KeyScope::new("p", "/")
    }

    async fn decide(renewals: &Renewals, store: &Arc<dyn DedupStore>, id: &str) -> ClaimDecision {
        claim(
            Some(store),
            renewals,
            &scope(),
            TIMEOUT,
            &delivery(Some(id)),
        )
        .await
    }

    #[tokio::test]
    async fn consumers_that_are_not_idempotent_always_run() {
        assert!(matches!(
            claim(
                None,
                &Renewals::default(),
                &scope(),
                TIMEOUT,
                &delivery(None)
            )
            .await,
            ClaimDecision::Run(None)
        ));
    }

    #[tokio::test]
    async fn a_missing_or_empty_message_id_is_dead_lettered_without_touching_the_store() {
        let renewals = Renewals::default();
        let (mem, store) = memory();
        for d in [delivery(None), delivery(Some(""))] {
            let decision = claim(Some(&store), &renewals, &scope(), TIMEOUT, &d).await;
            assert!(matches!(decision, ClaimDecision::MissingMessageId));
        }
        assert!(mem.is_empty());
    }

    #[tokio::test]
    async fn claim_then_complete_makes_the_next_copy_a_duplicate() {
        let renewals = Renewals::default();
        let (_, store) = memory();
        let ClaimDecision::Run(Some(guard)) = decide(&renewals, &store, "m").await else {
            panic!("first copy runs");
        };
        assert_eq!(
            guard.key(),
            "p:/:orders:m",
            "{{prefix}}:{{vhost}}:{{queue}}:{{message_id}}"
        );
        assert!(matches!(
            decide(&renewals, &store, "m").await,
            ClaimDecision::HeldElsewhere
        ));
        guard.complete(TTL).await;
        assert!(matches!(
            decide(&renewals, &store, "m").await,
            ClaimDecision::Duplicate
        ));
        // Another queue is another key.
        let mut other = delivery(Some("m"));
        other.queue = "invoices".into();
        assert!(matches!(
            claim(Some(&store), &renewals, &scope(), TIMEOUT, &other).await,
            ClaimDecision::Run(Some(_))
        ));
    }

    #[tokio::test]
    async fn a_failed_attempt_releases_so_the_retry_runs() {
        let renewals = Renewals::default();
        let (_, store) = memory();
        let ClaimDecision::Run(Some(guard)) = decide(&renewals, &store, "m").await else {
            panic!("first copy runs");
        };
        guard.release().await;
        assert!(matches!(
            decide(&renewals, &store, "m").await,
            ClaimDecision::Run(Some(_))
        ));
    }

    #[tokio::test]
    async fn a_guard_dropped_unsettled_releases_its_claim() {
        let renewals = Renewals::default();
        // Its task was aborted (shutdown grace over): the redelivery must not wait a lease.
        let (mem, store) = memory();
        let ClaimDecision::Run(Some(guard)) = decide(&renewals, &store, "m").await else {
            panic!("first copy runs");
        };
        drop(guard);
        for _ in 0..100 {
            if mem.is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(mem.is_empty(), "released in the background");
        assert!(matches!(
            decide(&renewals, &store, "m").await,
            ClaimDecision::Run(Some(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_is_renewed_from_the_claim_until_it_is_settled() {
        let renewals = Renewals::default();
        // Nothing drives the renewal: a claim taken ahead of a free slot, then a long
        // handler, are both covered from the moment the claim is taken.
        let (_, store) = memory();
        let lease = dedup::lease_for(TIMEOUT);
        let ClaimDecision::Run(Some(guard)) = decide(&renewals, &store, "m").await else {
            panic!("first copy runs");
        };
        tokio::time::sleep(lease * 3).await;
        assert_eq!(
            store.claim("p:/:orders:m", "other", lease).await.ok(),
            Some(Claim::Held),
            "three leases later the claim still stands"
        );
        guard.complete(TTL).await;
        assert!(matches!(
            decide(&renewals, &store, "m").await,
            ClaimDecision::Duplicate
        ));
    }

    /// A store whose renewals hang while `stalled` is set (a stopped Redis).
    struct Stalling {
        inner: MemoryStore,
        stalled: std::sync::atomic::AtomicBool,
    }

    impl DedupStore for Stalling {
        fn claim<'a>(
            &'a self,
            key: &'a str,
            token: &'a str,
            lease: Duration,
        ) -> dedup::DedupFuture<'a, Claim> {
            self.inner.claim(key, token, lease)
        }
        fn renew<'a>(
            &'a self,
            key: &'a str,
            token: &'a str,
            lease: Duration,
        ) -> dedup::DedupFuture<'a, bool> {
            if self.stalled.load(std::sync::atomic::Ordering::SeqCst) {
                return Box::pin(std::future::pending());
            }
            self.inner.renew(key, token, lease)
        }
        fn complete<'a>(
            &'a self,
            key: &'a str,
            token: &'a str,
            ttl: Duration,
        ) -> dedup::DedupFuture<'a, bool> {
            self.inner.complete(key, token, ttl)
        }
        fn release<'a>(&'a self, key: &'a str, token: &'a str) -> dedup::DedupFuture<'a, bool> {
            self.inner.release(key, token)
        }
        fn ping(&self) -> dedup::DedupFuture<'_, ()> {
            self.inner.ping()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_renewal_is_given_up_and_the_next_one_keeps_the_claim() {
        let renewals = Renewals::default();
        let stalling = Arc::new(Stalling {
            inner: MemoryStore::new(),
            stalled: std::sync::atomic::AtomicBool::new(false),
        });
        let store: Arc<dyn DedupStore> = stalling.clone();
        let lease = dedup::lease_for(TIMEOUT);
        let ClaimDecision::Run(Some(guard)) = decide(&renewals, &store, "m").await else {
            panic!("first copy runs");
        };
        // The first renewal (a third into the lease) hangs; the store answers again after.
        stalling
            .stalled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(lease / 2).await;
        stalling
            .stalled
            .store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(lease * 2).await;
        assert_eq!(
            store.claim("p:/:orders:m", "other", lease).await.ok(),
            Some(Claim::Held),
            "renewals resumed after the hung one"
        );
        guard.release().await;
        assert!(matches!(
            decide(&renewals, &store, "m").await,
            ClaimDecision::Run(Some(_))
        ));
    }

    #[tokio::test]
    async fn an_unreachable_store_is_store_down_never_a_run() {
        let renewals = Renewals::default();
        let store: Arc<dyn DedupStore> =
            Arc::new(RedisStore::new("redis://127.0.0.1:1", 1).expect("lazy pool"));
        assert!(matches!(
            decide(&renewals, &store, "m").await,
            ClaimDecision::StoreDown(_)
        ));
    }
}
