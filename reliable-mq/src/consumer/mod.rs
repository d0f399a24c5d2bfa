//! Driving one consumer: a supervised session loop (`driver`), the run of one handler
//! call (`invoke`), the dedup claim around it (`claim`) and the broker actions that
//! settle its outcome (`settle`). The counters in [`ConsumerStats`] are what is public.

pub(crate) mod claim;
pub(crate) mod driver;
pub(crate) mod inspect;
pub(crate) mod invoke;
pub(crate) mod quarantine;
pub(crate) mod renew;
pub(crate) mod settle;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Counters of one consumer since start. Read them with [`crate::app::RunningApp::stats`].
#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub(crate) received: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) requeued: AtomicU64,
    pub(crate) sessions: AtomicU64,
    pub(crate) paused: AtomicU64,
    pub(crate) held: AtomicU64,
    pub(crate) attached: AtomicBool,
    /// The same events for the metrics recorder (feature `metrics`; empty without it).
    pub(crate) metrics: crate::observe::ConsumerMetrics,
    /// Deliveries received and not yet settled (or given up on): see [`InFlight`].
    pub(crate) in_flight: AtomicU64,
    /// Why the consumer cannot settle some deliveries right now, and the copy target that
    /// fails (see [`ConsumerStats::degraded`]).
    degraded: Mutex<Option<Degraded>>,
}

#[derive(Debug)]
struct Degraded {
    /// `exchange/routing_key` of the copy that fails.
    target: String,
    reason: String,
}

/// A consumer's counters at one moment ([`RunningApp::stats`](crate::RunningApp::stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Deliveries received.
    pub received: u64,
    /// Handler calls that succeeded (acked).
    pub handled: u64,
    /// Deliveries acked without a handler call because their id was already done.
    pub duplicates: u64,
    /// Failed attempts sent to a retry tier (counted once the copy is confirmed).
    pub retried: u64,
    /// Messages sent to the DLQ.
    pub dead_lettered: u64,
    /// Deliveries put back: claim held elsewhere (copied to the requeue tier, counted once
    /// the copy is confirmed), or handed back to the broker (a delivery held because its
    /// settle copy or its claim could not be made, given back before the broker's
    /// `consumer_timeout`).
    pub requeued: u64,
    /// Broker sessions opened (1 + reconnects).
    pub sessions: u64,
    /// Deliveries held right now because the dedup store does not answer (the consumer
    /// is paused while this is above zero).
    pub paused: u64,
    /// Deliveries held right now, unacked, because the broker does not take their retry
    /// or dead-letter copy (the consumer is degraded while this is above zero).
    pub held: u64,
    /// Whether the consumer is subscribed right now.
    pub attached: bool,
}

impl ConsumerStats {
    /// The counters of the consumer `name` of `queue` (the labels of its metrics).
    pub(crate) fn new(name: &str, queue: &str) -> Self {
        Self {
            metrics: crate::observe::ConsumerMetrics::new(name, queue),
            ..Self::default()
        }
    }

    /// Read every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            received: r(&self.received),
            handled: r(&self.handled),
            duplicates: r(&self.duplicates),
            retried: r(&self.retried),
            dead_lettered: r(&self.dead_lettered),
            requeued: r(&self.requeued),
            sessions: r(&self.sessions),
            paused: r(&self.paused),
            held: r(&self.held),
            attached: self.attached.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Why the consumer is degraded right now (a settle copy the broker keeps refusing,
    /// e.g. `cannot publish to orders.dlx: ACCESS_REFUSED - ...`), `None` when it is not.
    pub fn degraded(&self) -> Option<String> {
        lock(&self.degraded).as_ref().map(|d| d.reason.clone())
    }

    /// Copies to `target` fail with `reason`.
    pub(crate) fn set_degraded(&self, target: &str, reason: String) {
        *lock(&self.degraded) = Some(Degraded {
            target: target.to_owned(),
            reason,
        });
    }

    /// A held delivery stopped waiting (its copy went through, or it was handed back, its
    /// channel died, shutdown). With none held any more nothing says a target still fails:
    /// the next copy to it will tell.
    pub(crate) fn release_held(&self) {
        if self.held.fetch_sub(1, Ordering::Relaxed) == 1 {
            *lock(&self.degraded) = None;
        }
    }

    /// A copy to `target` was confirmed: no longer degraded because of it.
    pub(crate) fn clear_degraded(&self, target: &str) {
        let mut degraded = lock(&self.degraded);
        if degraded.as_ref().is_some_and(|d| d.target == target) {
            *degraded = None;
        }
    }
}

/// One received delivery until its processing ends (settled, held and handed back, or
/// abandoned with its channel): counted in [`ConsumerStats::in_flight`], for
/// `RunningApp::wait_idle`.
pub(crate) struct InFlight(std::sync::Arc<ConsumerStats>);

impl InFlight {
    pub(crate) fn new(stats: &std::sync::Arc<ConsumerStats>) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(std::sync::Arc::clone(stats))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StatsSnapshot {
    /// The counters of two consumers of one queue added up (attached: both are).
    pub(crate) fn combine(mut self, other: StatsSnapshot) -> StatsSnapshot {
        self.received += other.received;
        self.handled += other.handled;
        self.duplicates += other.duplicates;
        self.retried += other.retried;
        self.dead_lettered += other.dead_lettered;
        self.requeued += other.requeued;
        self.sessions += other.sessions;
        self.paused += other.paused;
        self.held += other.held;
        self.attached &= other.attached;
        self
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The latest moment a delivery received at `received` may still be held unacked by the
/// consumer (paused on the dedup store, or its settle copy refused) before it must be
/// handed back: the broker closes the channel of a delivery left unacked for its
/// `consumer_timeout`, and with it every other delivery in flight on it. The margin (a
/// quarter, at most a minute) covers the time the broker's check and our hand-back take.
/// Never sooner than [`MIN_HOLD`] after receipt: a zero or tiny configured timeout must
/// not turn a held delivery into a hand-back loop.
pub(crate) fn hand_back_deadline(received: Instant, consumer_timeout: Duration) -> Instant {
    let margin = (consumer_timeout / 4).min(Duration::from_secs(60));
    received + consumer_timeout.saturating_sub(margin).max(MIN_HOLD)
}

/// The shortest a held delivery is kept before it is handed back.
const MIN_HOLD: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_deliveries_are_handed_back_before_the_consumer_timeout() {
        let t = Instant::now();
        let at = |d| hand_back_deadline(t, d) - t;
        assert_eq!(
            at(Duration::from_secs(30 * 60)),
            Duration::from_secs(29 * 60)
        );
        assert_eq!(at(Duration::from_secs(4)), Duration::from_secs(3));
        assert_eq!(at(Duration::ZERO), MIN_HOLD, "never a hand-back loop");
    }

    #[test]
    fn degraded_is_cleared_only_by_the_target_that_failed() {
        let stats = ConsumerStats::default();
        stats.set_degraded(
            "orders.dlx",
            "cannot publish to orders.dlx: ACCESS_REFUSED".into(),
        );
        stats.clear_degraded("/orders.retry.1s");
        assert!(
            stats
                .degraded()
                .is_some_and(|r| r.contains("ACCESS_REFUSED"))
        );
        stats.clear_degraded("orders.dlx");
        assert_eq!(stats.degraded(), None);
    }
}
