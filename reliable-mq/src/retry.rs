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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryLadder {
    queue: String,
    delays: Vec<Duration>,
}

impl RetryLadder {
    /// The ladder of `max_retries` retries of `queue`, starting at `base`.
    pub fn new(queue: &str, max_retries: u32, base: Duration, backoff: RetryBackoff) -> Self {
        let delays = (1..=max_retries)
            .map(|retry| backoff.delay(base, retry))
            .collect();
        Self {
            queue: queue.to_owned(),
            delays,
        }
    }

    /// How many retries the ladder allows.
    pub fn max_retries(&self) -> u32 {
        u32::try_from(self.delays.len()).unwrap_or(u32::MAX)
    }

    /// The delay before retry `retry` (1-based), or `None` once retries are exhausted.
    pub fn delay(&self, retry: u32) -> Option<Duration> {
        let index = usize::try_from(retry.checked_sub(1)?).ok()?;
        self.delays.get(index).copied()
    }

    /// The wait queue for retry `retry`, or `None` once retries are exhausted.
    pub fn tier_for(&self, retry: u32) -> Option<(String, Duration)> {
        self.delay(retry)
            .map(|d| (tier_queue_name(&self.queue, d), d))
    }

    /// Every distinct tier: `(wait queue name, delay)`, shortest first.
    pub fn tiers(&self) -> Vec<(String, Duration)> {
        let distinct: BTreeSet<Duration> = self.delays.iter().copied().collect();
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
        _ if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        _ if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        _ if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
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
    fn fixed_ladder_has_one_tier() {
        let l = RetryLadder::new("q", 5, Duration::from_millis(1500), RetryBackoff::Fixed);
        assert_eq!(l.tiers(), vec![("q.retry.1500ms".to_owned(), Duration::from_millis(1500))]);
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
