//! Driving one consumer: a supervised session loop (`driver`), the run of one handler
//! call (`invoke`), the dedup claim around it (`claim`) and the broker actions that
//! settle its outcome (`settle`). The counters in [`ConsumerStats`] are what is public.

pub(crate) mod claim;
pub(crate) mod driver;
pub(crate) mod inspect;
pub(crate) mod invoke;
pub(crate) mod quarantine;
pub(crate) mod settle;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    pub(crate) attached: AtomicBool,
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
    /// Failed attempts sent to a retry tier.
    pub retried: u64,
    /// Messages sent to the DLQ.
    pub dead_lettered: u64,
    /// Deliveries put back: claim held elsewhere (sent to the requeue tier) or a settle
    /// copy that could not be published.
    pub requeued: u64,
    /// Broker sessions opened (1 + reconnects).
    pub sessions: u64,
    /// Deliveries held right now because the dedup store does not answer (the consumer
    /// is paused while this is above zero).
    pub paused: u64,
    /// Whether the consumer is subscribed right now.
    pub attached: bool,
}

impl ConsumerStats {
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
            attached: self.attached.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
