//! Receive-side limits: what a delivery must look like before anything of ours (the dedup
//! claim, the decoder, the handler) trusts it. RabbitMQ forwards whatever a publisher
//! sent, so a delivery can carry bytes no well-behaved client would: a refused delivery
//! goes straight to the DLQ (kind `decode`, with the reason), never to a handler, never
//! back to the queue.
//!
//! Invalid UTF-8 in a short string (a property, a header key) reaches us already replaced
//! with U+FFFD: the client's parser is patched to read such strings leniently instead of
//! failing the whole frame (see `docs/error-handling.md`, "Hostile input"). A replacement
//! character in one of these fields is therefore taken as a sign of damage. The original
//! bytes are gone, so a `message_id` cannot be used as a dedup key, and two damaged keys
//! may have collapsed into one header.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::Delivery;

/// Deepest nesting of tables and arrays accepted in `headers` (the headers table itself is
/// level 1). Real headers are flat or two levels deep (`x-death`: a list of tables); every
/// level costs a recursion in each parse, copy and re-encode of the message.
pub(crate) const MAX_HEADER_DEPTH: usize = 16;

/// Why `delivery` must not reach a handler, or `None` when it may. `max_body_size` is the
/// largest body accepted.
pub(crate) fn refuse(delivery: &Delivery, max_body_size: usize) -> Option<String> {
    let size = delivery.body.len();
    if size > max_body_size {
        return Some(format!(
            "body is {size} bytes, over this consumer's {max_body_size}-byte limit (Config::max_body_size); the handler was not called"
        ));
    }
    if let Some(name) = damaged_property(&delivery.properties) {
        return Some(format!(
            "property `{name}` is not valid UTF-8 (its invalid bytes arrive replaced with U+FFFD); publish it as UTF-8"
        ));
    }
    let headers = delivery.properties.headers().as_ref()?;
    header_problem(headers)
}

/// The first short-string property holding a replacement character.
fn damaged_property(p: &BasicProperties) -> Option<&'static str> {
    let fields: [(&'static str, &Option<ShortString>); 10] = [
        ("message_id", p.message_id()),
        ("content_type", p.content_type()),
        ("content_encoding", p.content_encoding()),
        ("type", p.kind()),
        ("correlation_id", p.correlation_id()),
        ("reply_to", p.reply_to()),
        ("expiration", p.expiration()),
        ("user_id", p.user_id()),
        ("app_id", p.app_id()),
        ("cluster_id", p.cluster_id()),
    ];
    fields
        .into_iter()
        .find(|(_, v)| v.as_ref().is_some_and(is_damaged))
        .map(|(name, _)| name)
}

fn is_damaged(s: &ShortString) -> bool {
    s.as_str().contains(char::REPLACEMENT_CHARACTER)
}

/// A damaged key or nesting past [`MAX_HEADER_DEPTH`] anywhere in `headers`. Walked with
/// an explicit stack, so the check itself never recurses.
fn header_problem(headers: &FieldTable) -> Option<String> {
    let mut stack: Vec<(&AMQPValue, usize)> = Vec::new();
    // `headers` is level 1; a table or array inside it is level 2.
    if let Some(problem) = check_table(headers, 1, &mut stack) {
        return Some(problem);
    }
    while let Some((value, depth)) = stack.pop() {
        let problem = match value {
            AMQPValue::FieldTable(t) => check_table(t, depth, &mut stack),
            AMQPValue::FieldArray(a) => too_deep(depth).or_else(|| {
                stack.extend(a.as_slice().iter().map(|v| (v, depth + 1)));
                None
            }),
            _ => None,
        };
        if problem.is_some() {
            return problem;
        }
    }
    None
}

/// Check one table's keys and queue its values.
fn check_table<'a>(
    table: &'a FieldTable,
    depth: usize,
    stack: &mut Vec<(&'a AMQPValue, usize)>,
) -> Option<String> {
    if let Some(problem) = too_deep(depth) {
        return Some(problem);
    }
    for (key, value) in table.inner() {
        if is_damaged(key) {
            return Some(format!(
                "header key `{}` is not valid UTF-8 (its invalid bytes arrive replaced with U+FFFD); use UTF-8 header keys",
                key.as_str().escape_debug()
            ));
        }
        stack.push((value, depth + 1));
    }
    None
}

fn too_deep(depth: usize) -> Option<String> {
    (depth > MAX_HEADER_DEPTH)
        .then(|| format!("headers are nested more than {MAX_HEADER_DEPTH} levels deep"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    fn nested(depth: usize) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("leaf".into(), AMQPValue::Boolean(true));
        for _ in 1..depth {
            let mut outer = FieldTable::default();
            outer.insert("n".into(), AMQPValue::FieldTable(t));
            t = outer;
        }
        t
    }

    #[test]
    fn a_plain_delivery_passes() {
        let d = Delivery::for_test(b"{}".to_vec()).with_message_id("m-1");
        assert_eq!(refuse(&d, 1024), None);
    }

    #[test]
    fn a_body_over_the_limit_is_refused() {
        let d = Delivery::for_test(vec![b' '; 11]);
        assert!(refuse(&d, 10).is_some_and(|r| r.contains("11 bytes")));
        assert_eq!(refuse(&d, 11), None);
    }

    #[test]
    fn replacement_characters_mark_a_damaged_property() {
        let d = Delivery::for_test(b"{}".to_vec()).with_message_id("\u{FFFD}\u{FFFD}");
        assert!(refuse(&d, 1024).is_some_and(|r| r.contains("`message_id`")));
        let mut d = Delivery::for_test(b"{}".to_vec());
        d.properties = d.properties.with_type("order.\u{FFFD}".into());
        assert!(refuse(&d, 1024).is_some_and(|r| r.contains("`type`")));
    }

    #[test]
    fn a_damaged_header_key_is_refused_at_any_level() {
        let mut inner = FieldTable::default();
        inner.insert("k\u{FFFD}".into(), AMQPValue::Void);
        let mut h = FieldTable::default();
        h.insert(
            "list".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(inner)])),
        );
        let d = Delivery::for_test(b"{}".to_vec()).with_headers(h);
        assert!(refuse(&d, 1024).is_some_and(|r| r.contains("header key")));
    }

    #[test]
    fn nesting_is_limited() {
        let ok = Delivery::for_test(b"{}".to_vec()).with_headers(nested(MAX_HEADER_DEPTH));
        assert_eq!(refuse(&ok, 1024), None);
        let deep = Delivery::for_test(b"{}".to_vec()).with_headers(nested(MAX_HEADER_DEPTH + 1));
        assert!(refuse(&deep, 1024).is_some_and(|r| r.contains("nested")));
        // x-death: a list of tables.
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let d = Delivery::for_test(b"{}".to_vec()).with_headers(h);
        assert_eq!(refuse(&d, 1024), None);
    }
}
