//! The delayed retry ladder: which wait queue a failed message goes to, and when.
//!
//! Each distinct delay is a durable *tier* queue `{queue}.retry.{delay}` with that delay as
//! its message TTL and the work queue as its dead-letter target (default exchange, routing
//! key = work queue). A failed message is copied there (confirmed) and the original acked;
//! the broker moves it back when the TTL expires. No consumer slot is held while waiting,
//! and since all messages of a tier share one TTL they expire in queue order.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::spec::RetryBackoff;

/// The delays of one consumer's retries.
///
/// Computed on demand, not stored per retry: `max_retries` comes from the user, and a
/// large one (with delays capped at [`RetryBackoff::MAX_DELAY`]) must not allocate one
/// entry per retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryLadder {
    queue: String,
    max_retries: u32,
    base: Duration,
    backoff: RetryBackoff,
}

impl RetryLadder {
    /// The ladder of `max_retries` retries of `queue`, starting at `base`.
    pub fn new(queue: &str, max_retries: u32, base: Duration, backoff: RetryBackoff) -> Self {
        Self {
            queue: queue.to_owned(),
            max_retries,
            base,
            backoff,
        }
    }

    /// How many retries the ladder allows.
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// The delay before retry `retry` (1-based), or `None` once retries are exhausted.
    pub fn delay(&self, retry: u32) -> Option<Duration> {
        (1..=self.max_retries)
            .contains(&retry)
            .then(|| self.backoff.delay(self.base, retry))
    }

    /// The wait queue for retry `retry`, or `None` once retries are exhausted.
    pub fn tier_for(&self, retry: u32) -> Option<(String, Duration)> {
        self.delay(retry)
            .map(|d| (tier_queue_name(&self.queue, d), d))
    }

    /// Every distinct tier: `(wait queue name, delay)`, shortest first.
    pub fn tiers(&self) -> Vec<(String, Duration)> {
        let mut distinct = BTreeSet::new();
        let mut previous = None;
        for retry in 1..=self.max_retries {
            let d = self.backoff.delay(self.base, retry);
            // `base * factor^(n-1)`, capped, is constant once two neighbours are equal
            // (the cap, a saturated power, factor 1, or factor 0 after the first retry).
            if previous == Some(d) {
                break;
            }
            distinct.insert(d);
            previous = Some(d);
        }
        distinct
            .into_iter()
            .map(|d| (tier_queue_name(&self.queue, d), d))
            .collect()
    }
}

/// `{queue}.retry.{delay}`, e.g. `orders.retry.1s`, `orders.retry.2m`, `orders.retry.1500ms`.
pub fn tier_queue_name(queue: &str, delay: Duration) -> String {
    format!("{queue}.retry.{}", format_delay(delay))
}

/// A delay in the largest whole unit: `1500ms`, `30s`, `5m`, `2h`.
pub fn format_delay(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0ms".to_owned(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

/// A test-only seam: make a consumer behave as if its process died right after a settle
/// copy (retry or dead letter) was confirmed and before the original was acked.
///
/// That window cannot be hit from outside on purpose: the confirm and the ack are a few
/// microseconds apart. An armed queue's next settle copy is published and confirmed as
/// usual, then the original is neither acked nor nacked: it stays unacked on the channel,
/// exactly as after a kill, until the connection goes away (the test stops the app) and
/// the broker redelivers it. Nothing else changes. Not a public API.
#[doc(hidden)]
pub mod crash_seam {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};

    static ARMED: Mutex<Vec<(String, Arc<AtomicBool>)>> = Mutex::new(Vec::new());

    /// Arm the seam for the next settle copy of `queue`; disarmed when dropped.
    pub fn arm(queue: &str) -> Armed {
        let fired = Arc::new(AtomicBool::new(false));
        ARMED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((queue.to_owned(), Arc::clone(&fired)));
        Armed {
            queue: queue.to_owned(),
            fired,
        }
    }

    /// An armed seam.
    #[derive(Debug)]
    pub struct Armed {
        queue: String,
        fired: Arc<AtomicBool>,
    }

    impl Armed {
        /// Whether a settle copy of the queue was confirmed and its original left unacked.
        pub fn fired(&self) -> bool {
            self.fired.load(Ordering::SeqCst)
        }
    }

    impl Drop for Armed {
        fn drop(&mut self) {
            ARMED
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|(q, f)| !(q == &self.queue && Arc::ptr_eq(f, &self.fired)));
        }
    }

    /// Called between a settle copy's confirm and the ack: `true` means "die here" (once).
    pub(crate) fn fire(queue: &str) -> bool {
        let mut armed = ARMED.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(i) = armed.iter().position(|(q, _)| q == queue) else {
            return false;
        };
        let (_, fired) = armed.swap_remove(i);
        fired.store(true, Ordering::SeqCst);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_ladder_with_cap() {
        let l = RetryLadder::new(
            "q",
            4,
            Duration::from_secs(1),
            RetryBackoff::Exponential { factor: 2 },
        );
        assert_eq!(l.delay(1), Some(Duration::from_secs(1)));
        assert_eq!(l.delay(4), Some(Duration::from_secs(8)));
        assert_eq!(l.delay(5), None);
        assert_eq!(l.delay(0), None);
        assert_eq!(l.tiers().len(), 4);
        assert_eq!(l.tier_for(2).map(|t| t.0), Some("q.retry.2s".to_owned()));
        let capped = RetryBackoff::Exponential { factor: 10 }.delay(Duration::from_secs(60), 5);
        assert_eq!(capped, RetryBackoff::MAX_DELAY);
    }

    #[test]
    fn huge_max_retries_allocates_nothing_and_stops_at_the_cap() {
        let l = RetryLadder::new(
            "q",
            u32::MAX,
            Duration::from_secs(1),
            RetryBackoff::Exponential { factor: 2 },
        );
        let tiers = l.tiers();
        // 1s, 2s, ..., 2048s, then the 1h cap.
        assert_eq!(tiers.len(), 13);
        assert_eq!(tiers.last().map(|t| t.1), Some(RetryBackoff::MAX_DELAY));
        assert_eq!(l.delay(u32::MAX), Some(RetryBackoff::MAX_DELAY));
        assert_eq!(
            l.tier_for(u32::MAX).map(|t| t.0),
            Some("q.retry.1h".to_owned())
        );
        let zero = RetryLadder::new(
            "q",
            5,
            Duration::from_secs(1),
            RetryBackoff::Exponential { factor: 0 },
        );
        assert_eq!(
            zero.tiers().len(),
            2,
            "factor 0: base, then 0 for every later retry"
        );
        assert!(
            RetryLadder::new("q", 0, Duration::from_secs(1), RetryBackoff::Fixed)
                .tiers()
                .is_empty()
        );
    }

    #[test]
    fn crash_seam_fires_once_for_its_queue() {
        let armed = crash_seam::arm("seam-q");
        assert!(!crash_seam::fire("other-q"));
        assert!(!armed.fired());
        assert!(crash_seam::fire("seam-q"));
        assert!(armed.fired());
        assert!(!crash_seam::fire("seam-q"), "one shot");
        let dropped = crash_seam::arm("seam-q2");
        drop(dropped);
        assert!(!crash_seam::fire("seam-q2"), "disarmed on drop");
    }

    #[test]
    fn fixed_ladder_has_one_tier() {
        let l = RetryLadder::new("q", 5, Duration::from_millis(1500), RetryBackoff::Fixed);
        assert_eq!(
            l.tiers(),
            vec![("q.retry.1500ms".to_owned(), Duration::from_millis(1500))]
        );
        assert_eq!(l.max_retries(), 5);
    }

    #[test]
    fn formats_delays() {
        assert_eq!(format_delay(Duration::from_secs(120)), "2m");
        assert_eq!(format_delay(Duration::from_secs(7200)), "2h");
        assert_eq!(format_delay(Duration::from_secs(90)), "90s");
        assert_eq!(format_delay(Duration::from_millis(250)), "250ms");
    }
}
