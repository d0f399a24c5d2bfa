//! The enumerated settings: exchange type, queue type, retry backoff. Each parses from the
//! attribute's string form with an error that lists the valid choices.

use std::time::Duration;

/// Kind of exchange a consumer's queue is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    /// Exact routing-key match.
    Direct,
    /// Pattern routing keys (`order.*`, `#`). The default.
    Topic,
    /// Every bound queue gets every message; routing keys are ignored.
    Fanout,
    /// Match on message headers.
    Headers,
}

impl ExchangeKind {
    /// The valid attribute values.
    pub const CHOICES: &'static [&'static str] = &["direct", "topic", "fanout", "headers"];

    /// The AMQP name of the exchange type.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Topic => "topic",
            Self::Fanout => "fanout",
            Self::Headers => "headers",
        }
    }

    /// Parse the attribute value; the error names the valid choices.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "direct" => Ok(Self::Direct),
            "topic" => Ok(Self::Topic),
            "fanout" => Ok(Self::Fanout),
            "headers" => Ok(Self::Headers),
            _ => Err(one_of("exchange_type", value, Self::CHOICES)),
        }
    }
}

/// Kind of queue declared for a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueKind {
    /// Classic queue (the default).
    Classic,
    /// Replicated quorum queue; gets an `x-delivery-limit` safety net.
    Quorum,
}

impl QueueKind {
    /// The valid attribute values.
    pub const CHOICES: &'static [&'static str] = &["classic", "quorum"];

    /// The value of the `x-queue-type` argument.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }

    /// Parse the attribute value; the error names the valid choices.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "classic" => Ok(Self::Classic),
            "quorum" => Ok(Self::Quorum),
            "stream" => Err(
                "stream queues are not supported: a stream keeps messages after they are \
                 acked, so acks cannot drive retries and dead-lettering; valid choices: \
                 \"classic\", \"quorum\""
                    .to_owned(),
            ),
            _ => Err(one_of("queue_type", value, Self::CHOICES)),
        }
    }
}

/// How the delay grows between retry attempts.
///
/// Attribute syntax: `retry_backoff = "fixed"`, `"exponential"` (factor 2) or
/// `"exponential:3"` (any factor from 2 to 10). Every delay is capped at
/// [`RetryBackoff::MAX_DELAY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryBackoff {
    /// Every retry waits `retry_delay`.
    Fixed,
    /// Retry `n` (1-based) waits `retry_delay * factor^(n-1)`, capped.
    Exponential {
        /// Growth factor between consecutive delays (2..=10).
        factor: u32,
    },
}

impl RetryBackoff {
    /// No retry ever waits longer than this (one hour), whatever the factor.
    pub const MAX_DELAY: Duration = Duration::from_secs(3600);

    /// The delay before retry number `retry` (1-based), capped at [`Self::MAX_DELAY`].
    pub fn delay(self, base: Duration, retry: u32) -> Duration {
        let delay = match self {
            Self::Fixed => base,
            Self::Exponential { factor } => {
                let power = factor.saturating_pow(retry.saturating_sub(1));
                base.saturating_mul(power)
            }
        };
        delay.min(Self::MAX_DELAY)
    }

    /// The attribute form: `"fixed"`, `"exponential"` or `"exponential:N"`.
    pub fn to_attribute(self) -> String {
        match self {
            Self::Fixed => "fixed".to_owned(),
            Self::Exponential { factor: 2 } => "exponential".to_owned(),
            Self::Exponential { factor } => format!("exponential:{factor}"),
        }
    }

    /// Parse `"fixed"`, `"exponential"` (factor 2) or `"exponential:N"` with N in 2..=10.
    pub fn parse(value: &str) -> Result<Self, String> {
        const FORMS: &str =
            "\"fixed\", \"exponential\" (factor 2) or \"exponential:N\" with N from 2 to 10";
        match value.split_once(':') {
            None if value == "fixed" => Ok(Self::Fixed),
            None if value == "exponential" => Ok(Self::Exponential { factor: 2 }),
            Some(("exponential", factor)) => match factor.trim().parse::<u32>() {
                Ok(1) => Err(format!(
                    "retry_backoff \"{value}\" does not grow: use \"fixed\" for a constant \
                     delay, or a factor from 2 to 10"
                )),
                Ok(factor @ 2..=10) => Ok(Self::Exponential { factor }),
                Ok(_) => Err(format!(
                    "retry_backoff factor must be from 2 to 10 (delays are capped at one hour \
                     anyway), found \"{value}\"; write e.g. \"exponential:3\""
                )),
                Err(_) => Err(format!(
                    "retry_backoff \"{value}\" has no valid factor: write e.g. \
                     \"exponential:3\" (a whole number from 2 to 10)"
                )),
            },
            _ => {
                let head = value.split(':').next().unwrap_or(value);
                match closest(head, &["fixed", "exponential"]) {
                    Some(close) => Err(format!(
                        "unknown retry_backoff \"{value}\"; did you mean \"{close}\"? valid \
                         forms: {FORMS}"
                    )),
                    None => Err(format!(
                        "unknown retry_backoff \"{value}\"; valid forms: {FORMS}"
                    )),
                }
            }
        }
    }
}

fn one_of(name: &str, value: &str, valid: &[&str]) -> String {
    let list: Vec<String> = valid.iter().map(|v| format!("\"{v}\"")).collect();
    let list = list.join(", ");
    match closest(value, valid) {
        Some(close) => {
            format!("unknown {name} \"{value}\"; did you mean \"{close}\"? valid choices: {list}")
        }
        None => format!("unknown {name} \"{value}\"; valid choices: {list}"),
    }
}

/// The candidate closest to `word`, if it is close enough to be a plausible typo.
///
/// Case is ignored; the distance allowed grows with the word (a third of its length,
/// at least one edit), like rustc's own suggestions.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_lowercase();
    let allowed = word.chars().count().max(3) / 3;
    candidates
        .iter()
        .map(|candidate| (edit_distance(&word, candidate), *candidate))
        .filter(|(distance, _)| *distance <= allowed)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance between `a` and `b`, counted in chars.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoffs() {
        assert_eq!(RetryBackoff::parse("fixed"), Ok(RetryBackoff::Fixed));
        assert_eq!(
            RetryBackoff::parse("exponential"),
            Ok(RetryBackoff::Exponential { factor: 2 })
        );
        assert_eq!(
            RetryBackoff::parse("exponential:10"),
            Ok(RetryBackoff::Exponential { factor: 10 })
        );
        let err = |v| RetryBackoff::parse(v).err().unwrap_or_default();
        assert!(err("exponential:1").contains("\"fixed\""));
        assert!(err("exponential:11").contains("from 2 to 10"));
        assert!(err("exponential:x").contains("no valid factor"));
        assert!(err("exponentail").contains("did you mean \"exponential\""));
        assert!(err("fixed:2").contains("did you mean \"fixed\""));
        assert!(!err("linear").contains("did you mean"));
        for b in [
            RetryBackoff::Fixed,
            RetryBackoff::Exponential { factor: 2 },
            RetryBackoff::Exponential { factor: 7 },
        ] {
            assert_eq!(RetryBackoff::parse(&b.to_attribute()), Ok(b));
        }
    }

    #[test]
    fn choices_name_the_valid_values() {
        let e = ExchangeKind::parse("fanot").err().unwrap_or_default();
        assert!(e.contains("did you mean \"fanout\""), "{e}");
        assert!(QueueKind::parse("stream").is_err());
        assert_eq!(QueueKind::parse("quorum"), Ok(QueueKind::Quorum));
    }

    #[test]
    fn delays_cap() {
        let capped = RetryBackoff::Exponential { factor: 10 }.delay(Duration::from_secs(60), 5);
        assert_eq!(capped, RetryBackoff::MAX_DELAY);
    }
}
