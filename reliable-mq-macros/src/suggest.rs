//! "Did you mean" suggestions for misspelled keys and values.

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

    const KEYS: &[&str] = &[
        "queue",
        "prefetch",
        "dlx",
        "dlq",
        "exchange",
        "exchange_type",
    ];

    #[test]
    fn distance() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("prefech", "prefetch"), 1);
        assert_eq!(edit_distance("dlx", "dlq"), 1);
        assert_eq!(edit_distance("fanuot", "fanout"), 2);
    }

    #[test]
    fn suggests_close_keys() {
        assert_eq!(closest("prefech", KEYS), Some("prefetch"));
        assert_eq!(closest("qeue", KEYS), Some("queue"));
        assert_eq!(closest("Queue", KEYS), Some("queue"));
        assert_eq!(closest("exchange_typ", KEYS), Some("exchange_type"));
        assert_eq!(
            closest("fanuot", &["direct", "topic", "fanout", "headers"]),
            Some("fanout")
        );
    }

    #[test]
    fn prefers_the_nearest_candidate() {
        // `dlxx` is one edit from `dlx` and two from `dlq`.
        assert_eq!(closest("dlxx", KEYS), Some("dlx"));
    }

    #[test]
    fn no_suggestion_for_unrelated_words() {
        assert_eq!(closest("colour", KEYS), None);
        assert_eq!(closest("ttl", KEYS), None);
        assert_eq!(closest("x", KEYS), None);
    }
}
