//! The dedup claim around a handler call (`docs/architecture.md`, "The dedup claim"):
//! claim, then `done` on success or release on failure, with the lease renewed from the
//! moment the claim is taken until it is settled.
//!
//! The claim is sent when the delivery arrives ([`claim_ahead`]), while it still waits for
//! a slot, and its answer is read when the slot comes ([`ClaimAhead::decision`]): to a
//! store that batches (Redis on one node) it is a request in the batcher's queue, with no
//! task of its own; other stores get a task that writes the answer back.
//!
//! The renewal runs on the consumer's renewal sweep (`renew`), beside the handler: a slow
//! or stopped store delays only the renewal (each call has its own deadline), never the
//! handler or its timeout. A claim taken ahead of a free slot is renewed while it waits,
//! too: it joins the sweep when it is sent, and is renewed once the store said it is
//! ours.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use crate::Delivery;
use crate::consumer::renew::{Renewal, Renewals};
use crate::dedup::{self, Claim, DedupError, DedupStore, KeyScope, Op, StoreCall};

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

/// A claim sent to the store, its answer still to be read.
pub(crate) enum ClaimAhead {
    /// Decided without the store (not idempotent, or no `message_id`).
    Decided(ClaimDecision),
    /// On its way to the store.
    Sent(SentClaim),
}

/// A claim on its way: the call its answer is written into, and its place in the renewal
/// sweep (renewed once the answer says it is ours).
pub(crate) struct SentClaim {
    store: Arc<dyn DedupStore>,
    call: Arc<StoreCall>,
    renewal: Option<Renewal>,
    /// When a claim still unanswered counts as the store being down.
    deadline: Instant,
    /// Its answer was read (see `Drop`).
    decided: bool,
}

/// A claim this delivery holds, its lease renewed in the background until it is settled.
/// Dropped without [`ClaimGuard::complete`] or [`ClaimGuard::release`] (its task aborted:
/// the shutdown grace ran out), it releases the claim in the background, so the
/// redelivery runs now rather than after the lease.
pub(crate) struct ClaimGuard {
    store: Arc<dyn DedupStore>,
    call: Arc<StoreCall>,
    /// The claim's place in the renewal sweep, left when the claim is settled or dropped.
    renewal: Option<Renewal>,
    settled: bool,
}

/// Send the claim of `delivery` for an idempotent consumer (`store` is `None` for the
/// others): its answer is read with [`ClaimAhead::decision`].
pub(crate) fn claim_ahead(
    store: Option<&Arc<dyn DedupStore>>,
    renewals: &Renewals,
    scope: &KeyScope,
    timeout: Duration,
    delivery: &Delivery,
) -> ClaimAhead {
    let Some(store) = store else {
        return ClaimAhead::Decided(ClaimDecision::Run(None));
    };
    let Some(message_id) = delivery.message_id().filter(|id| !id.is_empty()) else {
        return ClaimAhead::Decided(ClaimDecision::MissingMessageId);
    };
    // Key and token in one allocation; the token encoded without the formatting machinery.
    let call = {
        let mut buf = uuid::Uuid::encode_buffer();
        let token: &str = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
        let mut key_token = scope.key_with_room(delivery.queue(), message_id, token.len());
        let key_len = key_token.len();
        key_token.push_str(token);
        Arc::new(StoreCall::new(key_token, key_len))
    };
    let lease = dedup::lease_for(timeout);
    let deadline = Instant::now() + STORE_CALL_TIMEOUT;
    if !store.send(&call, Op::Claim, lease) {
        answer_on_a_task(store, &call, lease);
    }
    let renewal = renewals.start(store, &call, lease);
    ClaimAhead::Sent(SentClaim {
        store: Arc::clone(store),
        call,
        renewal,
        deadline,
        decided: false,
    })
}

/// Claim through [`DedupStore::claim`] on a task of its own, for a store that does not
/// take requests ahead; the answer goes into `call`.
fn answer_on_a_task(store: &Arc<dyn DedupStore>, call: &Arc<StoreCall>, lease: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        call.answer(
            Op::Claim,
            Err(DedupError("no Tokio runtime to claim on".into())),
        );
        return;
    };
    let (store, call) = (Arc::clone(store), Arc::clone(call));
    runtime.spawn(async move {
        let answer = store.claim(call.key(), call.token(), lease).await;
        call.answer(Op::Claim, answer.map(dedup::claim_code));
    });
}

/// Claim `delivery` and wait for the answer: [`claim_ahead`], then
/// [`ClaimAhead::decision`].
pub(crate) async fn claim(
    store: Option<&Arc<dyn DedupStore>>,
    renewals: &Renewals,
    scope: &KeyScope,
    timeout: Duration,
    delivery: &Delivery,
) -> ClaimDecision {
    claim_ahead(store, renewals, scope, timeout, delivery)
        .decision()
        .await
}

impl ClaimAhead {
    /// What the claim decided. Free when the answer is already in (the claim was sent
    /// while the delivery waited for its slot); otherwise waits for it until the claim's
    /// deadline, then the store counts as down.
    pub(crate) async fn decision(self) -> ClaimDecision {
        let sent = match self {
            ClaimAhead::Decided(decision) => return decision,
            ClaimAhead::Sent(sent) => sent,
        };
        let answer = match sent.call.take_answer() {
            Some(answer) => answer,
            // Boxed: the timer is the rare path, and would size every delivery's future.
            None => Box::pin(sent.wait()).await,
        };
        sent.decide(answer)
    }
}

impl SentClaim {
    async fn wait(&self) -> Result<i64, DedupError> {
        match tokio::time::timeout_at(self.deadline, self.call.answered()).await {
            Ok(answer) => answer,
            Err(_) => {
                self.call.give_up();
                Err(DedupError(format!(
                    "no answer within {STORE_CALL_TIMEOUT:?}"
                )))
            }
        }
    }

    fn decide(mut self, answer: Result<i64, DedupError>) -> ClaimDecision {
        self.decided = true;
        let (store, call) = (Arc::clone(&self.store), Arc::clone(&self.call));
        let renewal = self.renewal.take();
        match answer.map(dedup::claim_outcome) {
            Ok(Claim::Acquired) => ClaimDecision::Run(Some(ClaimGuard {
                store,
                call,
                renewal,
                settled: false,
            })),
            Ok(Claim::Done) => ClaimDecision::Duplicate,
            Ok(Claim::Held) => ClaimDecision::HeldElsewhere,
            Err(e) => {
                drop(renewal);
                // The claim may have been written even though its answer was lost (a
                // response timeout on a slow Redis). Nobody would hold that claim: the
                // redelivery would find it held until the lease ran out. Delete it if it
                // is ours, in the background; when the store is really down this fails,
                // harmlessly.
                release_in_background(store, call, false);
                ClaimDecision::StoreDown(e)
            }
        }
    }
}

impl Drop for SentClaim {
    /// The delivery never got its slot (the session ended, or shutdown): a claim taken for
    /// it is released now, so its redelivery runs at once rather than after the lease.
    fn drop(&mut self) {
        if self.decided {
            return;
        }
        self.renewal = None;
        let unanswered = match self.call.acquired() {
            Some(false) => return,
            Some(true) => false,
            None => {
                self.call.give_up();
                true
            }
        };
        release_in_background(Arc::clone(&self.store), Arc::clone(&self.call), unanswered);
    }
}

/// Compare-and-delete the key of `call` with its token on a task of its own (best
/// effort). `unanswered`: the claim may still be on its way; wait for its answer first (a
/// release that overtook it would leave it held), and release only a claim taken.
fn release_in_background(store: Arc<dyn DedupStore>, call: Arc<StoreCall>, unanswered: bool) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        if unanswered {
            let answer = tokio::time::timeout(STORE_CALL_TIMEOUT, call.answered()).await;
            if let Ok(Ok(code)) = answer
                && dedup::claim_outcome(code) != Claim::Acquired
            {
                return;
            }
        }
        let key = call.key();
        let released =
            tokio::time::timeout(STORE_CALL_TIMEOUT, store.release(key, call.token())).await;
        match released {
            Ok(Ok(true)) => debug!(%key, "released an unsettled claim"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => debug!(%key, error = %e, "cannot release an unsettled claim; it expires with its lease"),
            Err(_) => debug!(%key, "no answer releasing an unsettled claim; it expires with its lease"),
        }
    });
}

impl ClaimGuard {
    #[cfg(test)]
    fn key(&self) -> &str {
        self.call.key()
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
        let call = &self.call;
        let key = call.key();
        let done = if self.store.send(call, Op::Complete, ttl) {
            let answer = tokio::time::timeout(STORE_CALL_TIMEOUT, call.answered()).await;
            if answer.is_err() {
                call.give_up();
            }
            answer.map(|code| code.map(|code| code == 1))
        } else {
            tokio::time::timeout(
                STORE_CALL_TIMEOUT,
                self.store.complete(key, call.token(), ttl),
            )
            .await
        };
        match done {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                warn!(%key, "claim lost before the handler finished and another delivery holds or finished it; done mark not written")
            }
            Ok(Err(e)) => {
                warn!(%key, error = %e, "handled, but cannot write the done mark; acking anyway (a redelivery would run again)")
            }
            Err(_) => {
                warn!(%key, "handled, but the dedup store did not answer the done mark in time; acking anyway (a redelivery would run again)")
            }
        }
    }

    /// The handler failed: delete the claim so the retry runs. On a store error the claim
    /// expires with its lease; until then a retry is requeued as held, never skipped.
    pub(crate) async fn release(mut self) {
        self.settle();
        let key = self.call.key();
        let released = tokio::time::timeout(
            STORE_CALL_TIMEOUT,
            self.store.release(key, self.call.token()),
        )
        .await;
        match released {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(%key, error = %e, "cannot release claim; it expires with its lease")
            }
            Err(_) => {
                warn!(%key, "no answer releasing the claim; it expires with its lease")
            }
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.renewal = None;
        if !self.settled {
            release_in_background(Arc::clone(&self.store), Arc::clone(&self.call), false);
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

    #[tokio::test(start_paused = true)]
    async fn a_hanging_renewal_is_given_up_and_the_next_one_keeps_the_claim() {
        let renewals = Renewals::default();
        let stalling = Arc::new(crate::dedup::memory::HangingRenewals::default());
        let store: Arc<dyn DedupStore> = stalling.clone();
        let lease = dedup::lease_for(TIMEOUT);
        let ClaimDecision::Run(Some(guard)) = decide(&renewals, &store, "m").await else {
            panic!("first copy runs");
        };
        // The first renewal (a third into the lease) hangs; the store answers again after.
        stalling.stall(true);
        tokio::time::sleep(lease / 2).await;
        stalling.stall(false);
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

    /// Wait until `key` can be claimed again, for up to a second.
    async fn freed(store: &Arc<dyn DedupStore>, key: &str) -> bool {
        for _ in 0..100 {
            match store.claim(key, "probe", Duration::from_secs(60)).await {
                Ok(Claim::Acquired) => {
                    let _ = store.release(key, "probe").await;
                    return true;
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        false
    }

    #[tokio::test]
    async fn a_claim_sent_for_a_delivery_that_never_got_its_slot_is_released() {
        // The session ended while the delivery waited: its redelivery must not wait out
        // the lease. Both ways a claim is sent: a task (memory) and the batcher (Redis).
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let redis: Arc<dyn DedupStore> = Arc::new(RedisStore::new(&url, 2).expect("valid URL"));
        let scope = KeyScope::new(&format!("t-{}", uuid::Uuid::new_v4()), "/");
        for store in [memory().1, redis] {
            let renewals = Renewals::default();
            // Dropped unanswered, and dropped once the answer came.
            for id in ["unanswered", "answered"] {
                let d = delivery(Some(id));
                let ahead = claim_ahead(Some(&store), &renewals, &scope, TIMEOUT, &d);
                let ClaimAhead::Sent(sent) = &ahead else {
                    panic!("an idempotent delivery with an id is sent to the store");
                };
                if id == "answered" {
                    tokio::time::timeout(Duration::from_secs(5), async {
                        while sent.call.acquired().is_none() {
                            tokio::task::yield_now().await;
                        }
                    })
                    .await
                    .expect("the store answers");
                }
                drop(ahead);
                let key = scope.key("orders", id);
                assert!(freed(&store, &key).await, "{key} released");
            }
        }
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
