//! Failure kinds and the headers a dead-lettered or retried message carries
//! (see `docs/error-handling.md`). Header values are kept short so a copy always fits in a frame.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Why a message failed, as written in `x-error-kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// The handler returned a retryable error (`?` or [`crate::HandlerError::retry`]);
    /// written `error`.
    Error,
    /// The handler ran past its `timeout`.
    Timeout,
    /// The handler panicked.
    Panic,
    /// The body did not decode into the handler's type.
    Decode,
    /// The handler called [`crate::HandlerError::reject`].
    Rejected,
    /// Every allowed retry failed.
    RetriesExhausted,
    /// An `idempotent` consumer got a message without `message_id`.
    MissingMessageId,
}

impl FailureKind {
    /// The `x-error-kind` value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Timeout => "timeout",
            Self::Panic => "panic",
            Self::Decode => "decode",
            Self::Rejected => "rejected",
            Self::RetriesExhausted => "retries-exhausted",
            Self::MissingMessageId => "missing-message-id",
        }
    }

    /// Whether a later attempt might succeed.
    pub const fn is_retryable(self) -> bool {
        matches!(self, Self::Error | Self::Timeout | Self::Panic)
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Header names. `x-attempts` on a retry copy counts the failed attempts so far; on a
/// dead letter, all attempts made.
pub mod header {
    /// Failure kind ([`super::FailureKind::as_str`]).
    pub const ERROR_KIND: &str = "x-error-kind";
    /// On `retries-exhausted`: the kind of the last failure.
    pub const LAST_ERROR_KIND: &str = "x-last-error-kind";
    /// The error message, trimmed to [`super::MAX_MESSAGE_BYTES`].
    pub const EXCEPTION_MESSAGE: &str = "x-exception-message";
    /// Number of failed attempts.
    pub const ATTEMPTS: &str = "x-attempts";
    /// Exchange the message was first published to.
    pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
    /// Routing key it was first published with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
    /// Queue it was consumed from.
    pub const ORIGINAL_QUEUE: &str = "x-original-queue";
    /// Unix milliseconds of the first failure.
    pub const FIRST_FAILURE: &str = "x-first-failure";
    /// Unix milliseconds of the last failure.
    pub const LAST_FAILURE: &str = "x-last-failure";
    /// Marks a copy that was put back only because another instance held its claim.
    pub const DEDUP_REQUEUE: &str = "x-dedup-requeue";
}

/// Whether `key` is one of the broker's dead-letter history headers (`x-death`,
/// `x-first-death-*`, `x-last-death-*`), which retry and dead-letter copies leave out.
pub fn is_broker_death_header(key: &str) -> bool {
    key == "x-death" || key.starts_with("x-first-death-") || key.starts_with("x-last-death-")
}

/// The headers of a failure record that [`strip_failure_headers`] removes: everything
/// reliable-mq writes on a retry or dead-letter copy except where the message came from.
pub const FAILURE_RECORD_HEADERS: [&str; 7] = [
    header::ERROR_KIND,
    header::LAST_ERROR_KIND,
    header::EXCEPTION_MESSAGE,
    header::ATTEMPTS,
    header::FIRST_FAILURE,
    header::LAST_FAILURE,
    header::DEDUP_REQUEUE,
];

/// Remove the failure record (our failure headers and the broker's `x-death` history)
/// from a dead letter's headers, so that replaying it gives it a fresh retry ladder: a
/// replayed message that kept `x-attempts` would be dead-lettered again on its first
/// failure. `x-original-exchange`, `x-original-routing-key` and `x-original-queue` stay:
/// they are facts about the message, and they keep [`crate::Delivery::exchange`] and
/// [`crate::Delivery::routing_key`] truthful when the replay goes straight to the queue.
///
/// ```
/// # use reliable_mq::headers::{self, ATTEMPTS, ORIGINAL_EXCHANGE};
/// # use reliable_mq::lapin::types::FieldTable;
/// let mut h = FieldTable::default();
/// headers::set_int(&mut h, ATTEMPTS, 4);
/// headers::set_str(&mut h, ORIGINAL_EXCHANGE, "shop");
/// headers::set_str(&mut h, "tenant", "acme");
/// headers::strip_failure_headers(&mut h);
/// assert_eq!(headers::header_int(Some(&h), ATTEMPTS), None);
/// assert_eq!(headers::header_str(Some(&h), ORIGINAL_EXCHANGE), Some("shop"));
/// assert_eq!(headers::header_str(Some(&h), "tenant"), Some("acme"));
/// ```
pub fn strip_failure_headers(headers: &mut FieldTable) {
    let mut m = headers.inner().clone();
    m.retain(|k, _| {
        let k = k.as_str();
        !FAILURE_RECORD_HEADERS.contains(&k) && !is_broker_death_header(k)
    });
    *headers = m.into();
}

/// Error messages in headers are cut to this many bytes (a frame is 128 KiB by default,
/// and headers share it with every other property).
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// Cut `s` to at most `max` bytes on a character boundary, marking the cut.
pub fn trim_message(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Unix time in milliseconds.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Read a string header.
pub fn header_str<'a>(headers: Option<&'a FieldTable>, key: &str) -> Option<&'a str> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// Read an integer header of any AMQP integer width.
pub fn header_int(headers: Option<&FieldTable>, key: &str) -> Option<i64> {
    match headers?.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

/// Insert a string header.
pub fn set_str(headers: &mut FieldTable, key: &str, value: &str) {
    headers.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value)),
    );
}

/// Insert an integer header.
pub fn set_int(headers: &mut FieldTable, key: &str, value: i64) {
    headers.insert(ShortString::from(key), AMQPValue::LongLongInt(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_on_char_boundary() {
        let s = "é".repeat(100);
        let t = trim_message(&s, 11);
        assert!(t.len() <= 11, "{t}");
        assert!(t.ends_with("..."));
        assert_eq!(trim_message("short", 10), "short");
    }

    #[test]
    fn strips_the_failure_record_only() {
        let mut h = FieldTable::default();
        for k in FAILURE_RECORD_HEADERS {
            set_str(&mut h, k, "v");
        }
        set_str(&mut h, header::ORIGINAL_QUEUE, "kept");
        set_str(&mut h, "x-death", "v");
        set_str(&mut h, "x-first-death-queue", "v");
        set_str(&mut h, "x-last-death-reason", "v");
        set_str(&mut h, "x-deathly", "kept");
        strip_failure_headers(&mut h);
        let keys: Vec<_> = h.inner().keys().map(|k| k.as_str().to_owned()).collect();
        assert_eq!(keys, ["x-deathly", header::ORIGINAL_QUEUE]);
    }

    #[test]
    fn reads_back_what_it_writes() {
        let mut h = FieldTable::default();
        set_str(&mut h, "a", "b");
        set_int(&mut h, "n", 7);
        assert_eq!(header_str(Some(&h), "a"), Some("b"));
        assert_eq!(header_int(Some(&h), "n"), Some(7));
        assert_eq!(header_int(Some(&h), "a"), None);
    }
}
