//! The dedup claim around a handler call (DESIGN.md section 2): claim, then `done` on
//! success or release on failure, with the lease renewed while the handler runs.

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
    /// The store did not answer: leave the message to the broker and pause.
    StoreDown(DedupError),
}

/// A claim this delivery holds.
pub(crate) struct ClaimGuard {
    store: Arc<dyn DedupStore>,
    key: String,
    token: String,
    lease: Duration,
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
    match store.claim(&key, &token, lease).await {
        Ok(Claim::Acquired) => ClaimDecision::Run(Some(ClaimGuard {
            store: Arc::clone(store),
            key,
            token,
            lease,
        })),
        Ok(Claim::Done) => ClaimDecision::Duplicate,
        Ok(Claim::Held) => ClaimDecision::HeldElsewhere,
        Err(e) => ClaimDecision::StoreDown(e),
    }
}

impl ClaimGuard {
    /// Run `fut`, renewing the lease every third of it until `fut` finishes.
    pub(crate) async fn renew_while<F: Future>(&self, fut: F) -> F::Output {
        let every = self.lease / 3;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
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
    pub(crate) async fn complete(self, ttl: Duration) {
        match self.store.complete(&self.key, &self.token, ttl).await {
            Ok(true) => {}
            Ok(false) => warn!(key = %self.key, "claim expired before the handler finished; done mark not written"),
            Err(e) => warn!(key = %self.key, error = %e, "handled, but cannot write the done mark; acking anyway (a redelivery would run again)"),
        }
    }

    /// The handler failed: delete the claim so the retry runs. On a store error the claim
    /// expires with its lease; until then a retry is requeued as held, never skipped.
    pub(crate) async fn release(self) {
        if let Err(e) = self.store.release(&self.key, &self.token).await {
            warn!(key = %self.key, error = %e, "cannot release claim; it expires with its lease");
        }
    }
}
