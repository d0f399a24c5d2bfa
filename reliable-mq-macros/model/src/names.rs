//! Names derived from a consumer: retry tiers, the consumer tag. The DLQ name and the
//! binding key are methods of [`crate::ConsumerModel`].

use std::collections::BTreeSet;
use std::time::Duration;

use crate::{RetryBackoff, format_duration};

/// AMQP names (queues, exchanges, routing keys, consumer tags) are short strings: at most
/// 255 bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// `{queue}.retry.{delay}`, e.g. `orders.retry.1s`, `orders.retry.2m`, `orders.retry.1500ms`.
pub fn tier_queue_name(queue: &str, delay: Duration) -> String {
    format!("{queue}.retry.{}", format_duration(delay))
}

/// The consumer tag of one subscription: `{name}-{unique}`, cut to fit in an AMQP short
/// string whatever the name's length (the name is only there to be read in the broker's
/// tools; the unique part keeps tags distinct).
pub fn consumer_tag(name: &str, unique: &str) -> String {
    let room = MAX_NAME_BYTES.saturating_sub(unique.len() + 1);
    let mut end = name.len().min(room);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let tag = format!("{}-{unique}", &name[..end]);
    // `unique` is ours (a UUID), so this only trims in a misuse; never over the limit.
    let mut end = tag.len().min(MAX_NAME_BYTES);
    while !tag.is_char_boundary(end) {
        end -= 1;
    }
    tag[..end].to_owned()
}

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
            // (the cap, a saturated power, or factor 0 after the first retry).
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
        assert_eq!(
            l.tier_for(u32::MAX).map(|t| t.0),
            Some("q.retry.1h".to_owned())
        );
        assert!(
            RetryLadder::new("q", 0, Duration::from_secs(1), RetryBackoff::Fixed)
                .tiers()
                .is_empty()
        );
    }

    #[test]
    fn fixed_ladder_has_one_tier() {
        let l = RetryLadder::new("q", 5, Duration::from_millis(1500), RetryBackoff::Fixed);
        assert_eq!(
            l.tiers(),
            vec![("q.retry.1500ms".to_owned(), Duration::from_millis(1500))]
        );
    }

    #[test]
    fn consumer_tags_always_fit() {
        let unique = "0123456789abcdef0123456789abcdef";
        assert_eq!(consumer_tag("orders", unique), format!("orders-{unique}"));
        let long = "é".repeat(200);
        let tag = consumer_tag(&long, unique);
        assert!(tag.len() <= MAX_NAME_BYTES, "{}", tag.len());
        assert!(tag.ends_with(unique));
    }
}
