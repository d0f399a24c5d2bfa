//! Lease renewal for the claims one consumer holds: one sweep task per consumer renews
//! every claim that is due, instead of a task (and its timer) per claim.
//!
//! The guarantees are those of a task per claim: a claim is renewed every third of its
//! lease from the moment it is taken until it is settled; each call gets a third of the
//! lease at most, and a hanging call holds up only its own claim (the sweep keeps the
//! others going); after a failed call the next comes within [`RENEW_RETRY`], so a store
//! back from an outage renews well before the lease runs out; a claim found lost is not
//! renewed again. A claim joins the sweep when it is sent, and is renewed only once the
//! store said it is ours (one found done or held elsewhere never is). Settling a claim
//! takes it out of the sweep; a renewal already on the
//! wire for it then finds the key no longer holding its token (done, or released) and
//! changes nothing.
//!
//! What a claim costs the sweep is an entry in a map: the sweep task wakes when the
//! oldest claim falls due (about once per third of a lease while claims keep coming and
//! going), never per claim.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::dedup::{DedupStore, StoreCall};

/// How soon a failed lease renewal is tried again.
pub(crate) const RENEW_RETRY: Duration = Duration::from_secs(1);

/// The claims of one consumer whose leases are renewed, and the sweep that renews them
/// (started on first use, stopped when this is dropped).
#[derive(Default)]
pub(crate) struct Renewals {
    inner: Arc<Inner>,
    sweep: OnceLock<Option<tokio::task::AbortHandle>>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    /// Wakes an idle sweep (one with nothing to renew) when a claim comes in.
    wake: Notify,
}

#[derive(Default)]
struct State {
    next_id: u64,
    claims: HashMap<u64, Entry>,
    /// The sweep waits for a claim to come in (it has none due later, none on the wire).
    idle: bool,
}

/// One claim under renewal.
struct Entry {
    store: Arc<dyn DedupStore>,
    /// Its key and token, and whether the store said it is ours.
    call: Arc<StoreCall>,
    lease: Duration,
    /// When to renew next.
    due: Instant,
    /// A renewal is on the wire.
    renewing: bool,
    /// The store said the key no longer holds our token: not renewed again.
    lost: bool,
}

/// A claim in the sweep; dropping it takes the claim out.
pub(crate) struct Renewal {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Renewal {
    fn drop(&mut self) {
        lock(&self.inner.state).claims.remove(&self.id);
    }
}

impl Renewals {
    /// Renew the claim of `call` every third of `lease` from now until the returned
    /// handle is dropped, once the store said it is ours. `None` outside a Tokio runtime
    /// (nothing could renew it).
    pub(crate) fn start(
        &self,
        store: &Arc<dyn DedupStore>,
        call: &Arc<StoreCall>,
        lease: Duration,
    ) -> Option<Renewal> {
        self.sweep
            .get_or_init(|| {
                let runtime = tokio::runtime::Handle::try_current().ok()?;
                Some(runtime.spawn(sweep(Arc::clone(&self.inner))).abort_handle())
            })
            .as_ref()?;
        let entry = Entry {
            store: Arc::clone(store),
            call: Arc::clone(call),
            lease,
            due: Instant::now() + lease / 3,
            renewing: false,
            lost: false,
        };
        let mut state = lock(&self.inner.state);
        let id = state.next_id;
        state.next_id += 1;
        state.claims.insert(id, entry);
        // A sweep that is not idle wakes no later than this claim falls due: every claim
        // it knows of fell due sooner (each was renewed, or taken, no later than now), or
        // is on the wire and wakes it when answered.
        if std::mem::take(&mut state.idle) {
            self.inner.wake.notify_one();
        }
        Some(Renewal {
            inner: Arc::clone(&self.inner),
            id,
        })
    }
}

impl Drop for Renewals {
    fn drop(&mut self) {
        if let Some(Some(sweep)) = self.sweep.get() {
            sweep.abort();
        }
    }
}

/// What one renewal call found.
enum Renewed {
    Yes,
    Lost,
    Failed,
}

/// Renew the claims as they fall due, each call on its own (several may be on the wire).
async fn sweep(inner: Arc<Inner>) {
    let mut on_the_wire = FuturesUnordered::new();
    loop {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        {
            let mut state = lock(&inner.state);
            for (id, e) in &mut state.claims {
                if e.renewing || e.lost {
                    continue;
                }
                if e.due <= now {
                    match e.call.acquired() {
                        Some(true) => {
                            e.renewing = true;
                            on_the_wire.push(renew(
                                *id,
                                Arc::clone(&e.store),
                                Arc::clone(&e.call),
                                e.lease,
                            ));
                            continue;
                        }
                        // Done or held elsewhere: not ours to renew.
                        Some(false) => {
                            e.lost = true;
                            continue;
                        }
                        // Not answered yet: look again soon.
                        None => e.due = now + RENEW_RETRY.min(e.lease / 3),
                    }
                    next = Some(next.map_or(e.due, |n| n.min(e.due)));
                } else {
                    next = Some(next.map_or(e.due, |n| n.min(e.due)));
                }
            }
            state.idle = next.is_none() && on_the_wire.is_empty();
        }
        tokio::select! {
            Some((id, renewed)) = on_the_wire.next(), if !on_the_wire.is_empty() => {
                let mut state = lock(&inner.state);
                // Settled meanwhile: nothing to record (the answer is about a key that
                // no longer holds our token, or was renewed just before it was settled).
                if let Some(e) = state.claims.get_mut(&id) {
                    e.renewing = false;
                    let every = e.lease / 3;
                    match renewed {
                        Renewed::Yes => e.due = Instant::now() + every,
                        Renewed::Failed => e.due = Instant::now() + RENEW_RETRY.min(every),
                        Renewed::Lost => {
                            warn!(key = %e.call.key(), "claim lease lost while its delivery runs; a redelivery may run concurrently");
                            e.lost = true;
                        }
                    }
                }
            }
            () = sleep_until(next), if next.is_some() => {}
            () = inner.wake.notified() => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// One renewal call, given a third of the lease at most.
async fn renew(
    id: u64,
    store: Arc<dyn DedupStore>,
    call: Arc<StoreCall>,
    lease: Duration,
) -> (u64, Renewed) {
    let (key, token) = (call.key(), call.token());
    let every = lease / 3;
    let renewed = match tokio::time::timeout(every, store.renew(key, token, lease)).await {
        Ok(Ok(true)) => {
            debug!(%key, "claim lease renewed");
            Renewed::Yes
        }
        Ok(Ok(false)) => Renewed::Lost,
        Ok(Err(e)) => {
            warn!(%key, error = %e, "cannot renew the claim lease; trying again");
            Renewed::Failed
        }
        Err(_) => {
            warn!(%key, "the dedup store did not answer a lease renewal in time; trying again");
            Renewed::Failed
        }
    };
    (id, renewed)
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::memory::HangingRenewals;
    use crate::dedup::{Claim, MemoryStore};

    const LEASE: Duration = Duration::from_secs(15);

    async fn claimed(store: &Arc<dyn DedupStore>, key: &str) {
        assert_eq!(
            store.claim(key, "t", LEASE).await.ok(),
            Some(Claim::Acquired)
        );
    }

    /// The call of a claim the store said is ours, held with token "t".
    fn ours(key: &str) -> Arc<StoreCall> {
        let call = StoreCall::for_key(key, "t");
        call.answer(crate::dedup::Op::Claim, Ok(0));
        Arc::new(call)
    }

    async fn held(store: &Arc<dyn DedupStore>, key: &str) -> bool {
        store.claim(key, "other", LEASE).await.ok() == Some(Claim::Held)
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_renewal_holds_up_no_other_claim() {
        let store: Arc<dyn DedupStore> = Arc::new(HangingRenewals::default());
        let renewals = Renewals::default();
        claimed(&store, "stuck").await;
        claimed(&store, "ok").await;
        let _stuck = renewals
            .start(&store, &ours("stuck"), LEASE)
            .expect("in a runtime");
        let _ok = renewals
            .start(&store, &ours("ok"), LEASE)
            .expect("in a runtime");
        tokio::time::sleep(LEASE * 4).await;
        assert!(held(&store, "ok").await, "renewed all along");
        assert!(
            !held(&store, "stuck").await,
            "never renewed: its lease ran out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_settled_claim_is_renewed_no_more_and_a_new_one_wakes_the_sweep() {
        let store: Arc<dyn DedupStore> = Arc::new(MemoryStore::new());
        let renewals = Renewals::default();
        claimed(&store, "a").await;
        let a = renewals
            .start(&store, &ours("a"), LEASE)
            .expect("in a runtime");
        tokio::time::sleep(LEASE * 2).await;
        assert!(held(&store, "a").await);
        drop(a);
        tokio::time::sleep(LEASE * 2).await;
        assert!(!held(&store, "a").await, "expired once out of the sweep");
        // The sweep had nothing left to renew (idle): a new claim must wake it.
        claimed(&store, "b").await;
        let _b = renewals
            .start(&store, &ours("b"), LEASE)
            .expect("in a runtime");
        tokio::time::sleep(LEASE * 3).await;
        assert!(held(&store, "b").await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_is_renewed_once_the_store_says_it_is_ours_and_never_if_not() {
        let counting = Arc::new(HangingRenewals::default());
        let store: Arc<dyn DedupStore> = counting.clone();
        let renewals = Renewals::default();
        // Sent, and not answered yet: in the sweep, not renewed.
        claimed(&store, "late").await;
        let late = Arc::new(StoreCall::for_key("late", "t"));
        let _late = renewals.start(&store, &late, LEASE).expect("in a runtime");
        tokio::time::sleep(LEASE / 2).await;
        assert_eq!(counting.renewals(), 0, "unanswered: nothing to renew yet");
        late.answer(crate::dedup::Op::Claim, Ok(0));
        tokio::time::sleep(LEASE * 3).await;
        assert!(held(&store, "late").await, "renewed since it was answered");
        let renewed = counting.renewals();
        assert!(renewed >= 6, "every third of a lease: {renewed}");
        // Found done, or held by another delivery: never renewed.
        for code in [1, 2] {
            let other = Arc::new(StoreCall::for_key("theirs", "t"));
            other.answer(crate::dedup::Op::Claim, Ok(code));
            let _other = renewals.start(&store, &other, LEASE).expect("in a runtime");
            let before = counting.renewals();
            tokio::time::sleep(LEASE * 2).await;
            let late_only = counting.renewals() - before;
            assert!(
                (5..=7).contains(&late_only),
                "only `late` renewed meanwhile: {late_only}"
            );
        }
    }
}
