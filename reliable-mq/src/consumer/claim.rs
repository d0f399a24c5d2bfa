//! The dedup claim around a handler call (`docs/architecture.md`, "The dedup claim"):
//! claim, then `done` on success or release on failure, with the lease renewed while the
//! handler runs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::Delivery;
use crate::dedup::{self, Claim, DedupError, DedupStore};

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

/// A claim this delivery holds. Dropped without [`ClaimGuard::complete`] or
/// [`ClaimGuard::release`] (its task aborted: the shutdown grace ran out), it releases the
/// claim in the background, so the redelivery runs now rather than after the lease.
pub(crate) struct ClaimGuard {
    store: Arc<dyn DedupStore>,
    key: String,
    token: String,
    lease: Duration,
    /// When the claim was taken: renewals count from here, not from the handler's start
    /// (a claimed delivery may wait for a slot first).
    claimed_at: tokio::time::Instant,
    settled: bool,
}

/// Claim `delivery` for an idempotent consumer (`store` is `None` for the others).
pub(crate) async fn claim(
    store: Option<&Arc<dyn DedupStore>>,
    prefix: &str,
    timeout: Duration,
    delivery: &Delivery,
) -> ClaimDecision {
    let Some(store) = store else {
        return ClaimDecision::Run(None);
    };
    let Some(message_id) = delivery.message_id().filter(|id| !id.is_empty()) else {
        return ClaimDecision::MissingMessageId;
    };
    let key = dedup::key(prefix, delivery.queue(), message_id);
    let token = uuid::Uuid::new_v4().to_string();
    let lease = dedup::lease_for(timeout);
    let claimed_at = tokio::time::Instant::now();
    match store.claim(&key, &token, lease).await {
        Ok(Claim::Acquired) => ClaimDecision::Run(Some(ClaimGuard {
            store: Arc::clone(store),
            key,
            token,
            lease,
            claimed_at,
            settled: false,
        })),
        Ok(Claim::Done) => ClaimDecision::Duplicate,
        Ok(Claim::Held) => ClaimDecision::HeldElsewhere,
        Err(e) => {
            // The claim may have been written even though its answer was lost (a response
            // timeout on a slow Redis). Nobody would hold that claim: the redelivery would
            // find it held until the lease ran out. Delete it if it is ours, in the
            // background; when the store is really down this fails, harmlessly.
            release_in_background(Arc::clone(store), key, token);
            ClaimDecision::StoreDown(e)
        }
    }
}

/// Compare-and-delete `key` with `token` on a task of its own (best effort).
fn release_in_background(store: Arc<dyn DedupStore>, key: String, token: String) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        match store.release(&key, &token).await {
            Ok(true) => debug!(%key, "released an unsettled claim"),
            Ok(false) => {}
            Err(e) => debug!(%key, error = %e, "cannot release an unsettled claim; it expires with its lease"),
        }
    });
}

impl ClaimGuard {
    /// Run `fut`, renewing the lease every third of it, counted from the claim (so a
    /// claim that waited for a slot is renewed at once if it is that old), until `fut`
    /// finishes.
    pub(crate) async fn renew_while<F: Future>(&self, fut: F) -> F::Output {
        let every = self.lease / 3;
        let mut ticker = tokio::time::interval_at(self.claimed_at + every, every);
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return out,
                _ = ticker.tick() => {
                    match self.store.renew(&self.key, &self.token, self.lease).await {
                        Ok(true) => debug!(key = %self.key, "claim lease renewed"),
                        Ok(false) => warn!(key = %self.key, "claim lease lost while the handler runs; a redelivery may run concurrently"),
                        Err(e) => warn!(key = %self.key, error = %e, "cannot renew claim lease"),
                    }
                }
            }
        }
    }

    /// The handler succeeded: mark `done` for `ttl`. A store error is logged, not
    /// returned: the work is done and the message will be acked; re-running the side
    /// effect on purpose would be worse than a possible duplicate later.
    pub(crate) async fn complete(mut self, ttl: Duration) {
        self.settled = true;
        match self.store.complete(&self.key, &self.token, ttl).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(key = %self.key, "claim lost before the handler finished and another delivery holds or finished it; done mark not written")
            }
            Err(e) => {
                warn!(key = %self.key, error = %e, "handled, but cannot write the done mark; acking anyway (a redelivery would run again)")
            }
        }
    }

    /// The handler failed: delete the claim so the retry runs. On a store error the claim
    /// expires with its lease; until then a retry is requeued as held, never skipped.
    pub(crate) async fn release(mut self) {
        self.settled = true;
        if let Err(e) = self.store.release(&self.key, &self.token).await {
            warn!(key = %self.key, error = %e, "cannot release claim; it expires with its lease");
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.settled {
            release_in_background(
                Arc::clone(&self.store),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.token),
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

    async fn decide(store: &Arc<dyn DedupStore>, id: &str) -> ClaimDecision {
        claim(Some(store), "p", TIMEOUT, &delivery(Some(id))).await
    }

    #[tokio::test]
    async fn consumers_that_are_not_idempotent_always_run() {
        assert!(matches!(
            claim(None, "p", TIMEOUT, &delivery(None)).await,
            ClaimDecision::Run(None)
        ));
    }

    #[tokio::test]
    async fn a_missing_or_empty_message_id_is_dead_lettered_without_touching_the_store() {
        let (mem, store) = memory();
        for d in [delivery(None), delivery(Some(""))] {
            let decision = claim(Some(&store), "p", TIMEOUT, &d).await;
            assert!(matches!(decision, ClaimDecision::MissingMessageId));
        }
        assert!(mem.is_empty());
    }

    #[tokio::test]
    async fn claim_then_complete_makes_the_next_copy_a_duplicate() {
        let (_, store) = memory();
        let ClaimDecision::Run(Some(guard)) = decide(&store, "m").await else {
            panic!("first copy runs");
        };
        assert_eq!(
            guard.key, "p:orders:m",
            "{{prefix}}:{{queue}}:{{message_id}}"
        );
        assert!(matches!(
            decide(&store, "m").await,
            ClaimDecision::HeldElsewhere
        ));
        guard.complete(TTL).await;
        assert!(matches!(
            decide(&store, "m").await,
            ClaimDecision::Duplicate
        ));
        // Another queue is another key.
        let mut other = delivery(Some("m"));
        other.queue = "invoices".into();
        assert!(matches!(
            claim(Some(&store), "p", TIMEOUT, &other).await,
            ClaimDecision::Run(Some(_))
        ));
    }

    #[tokio::test]
    async fn a_failed_attempt_releases_so_the_retry_runs() {
        let (_, store) = memory();
        let ClaimDecision::Run(Some(guard)) = decide(&store, "m").await else {
            panic!("first copy runs");
        };
        guard.release().await;
        assert!(matches!(
            decide(&store, "m").await,
            ClaimDecision::Run(Some(_))
        ));
    }

    #[tokio::test]
    async fn a_guard_dropped_unsettled_releases_its_claim() {
        // Its task was aborted (shutdown grace over): the redelivery must not wait a lease.
        let (mem, store) = memory();
        let ClaimDecision::Run(Some(guard)) = decide(&store, "m").await else {
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
            decide(&store, "m").await,
            ClaimDecision::Run(Some(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_is_renewed_while_a_long_handler_runs() {
        let (_, store) = memory();
        let lease = dedup::lease_for(TIMEOUT);
        let ClaimDecision::Run(Some(guard)) = decide(&store, "m").await else {
            panic!("first copy runs");
        };
        let probe = Arc::clone(&store);
        let handler = async move {
            tokio::time::sleep(lease * 3).await;
            // Three leases later the claim still stands: another copy is held off.
            probe.claim("p:orders:m", "other", lease).await.ok()
        };
        assert_eq!(guard.renew_while(handler).await, Some(Claim::Held));
        guard.complete(TTL).await;
        assert!(matches!(
            decide(&store, "m").await,
            ClaimDecision::Duplicate
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_that_waited_for_a_slot_is_renewed_counting_from_the_claim() {
        // The driver claims ahead, while the delivery waits for a slot.
        let (_, store) = memory();
        let lease = dedup::lease_for(TIMEOUT);
        let ClaimDecision::Run(Some(guard)) = decide(&store, "m").await else {
            panic!("first copy runs");
        };
        tokio::time::sleep(lease * 9 / 10).await;
        let probe = Arc::clone(&store);
        let handler = async move {
            tokio::time::sleep(lease / 5).await;
            // Past the first lease since the claim: still held, renewed when the handler began.
            probe.claim("p:orders:m", "other", lease).await.ok()
        };
        assert_eq!(guard.renew_while(handler).await, Some(Claim::Held));
    }

    #[tokio::test]
    async fn an_unreachable_store_is_store_down_never_a_run() {
        let store: Arc<dyn DedupStore> =
            Arc::new(RedisStore::new("redis://127.0.0.1:1", 1).expect("lazy pool"));
        assert!(matches!(
            decide(&store, "m").await,
            ClaimDecision::StoreDown(_)
        ));
    }
}
