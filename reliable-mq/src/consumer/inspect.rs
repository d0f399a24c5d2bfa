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

/// Room kept in a content-header frame for the failure record a retry or dead-letter copy
/// adds (`x-exception-message` alone may take 2 KiB).
const COPY_HEADROOM: usize = 4096;

/// What a delivery is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Largest body accepted.
    pub(crate) max_body_size: usize,
    /// The connection's negotiated frame size: a copy's properties must fit in one frame.
    pub(crate) frame_max: usize,
}

/// Why a delivery must not reach a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// Written to the dead letter's `x-exception-message`.
    pub(crate) reason: String,
    /// The original headers are too big to travel on the dead letter together with the
    /// failure record (the copy's content header would not fit in one frame): leave them
    /// out, or the copy could never be published and the delivery would come back forever.
    pub(crate) drop_headers: bool,
}

/// Why `delivery` must not reach a handler, or `None` when it may.
pub(crate) fn refuse(delivery: &Delivery, limits: Limits) -> Option<Refusal> {
    let headers_size = delivery
        .properties
        .headers()
        .as_ref()
        .map_or(0, encoded_size);
    let budget = limits.frame_max.saturating_sub(COPY_HEADROOM);
    let drop_headers = headers_size > budget;
    let problem = problem(delivery, limits.max_body_size);
    let reason = match (problem, drop_headers) {
        (None, false) => return None,
        (Some(p), false) => p,
        (p, true) => {
            let dropped = format!(
                "the original headers ({headers_size} bytes) are left out of this dead letter: with the failure record they would not fit in one {}-byte frame",
                limits.frame_max
            );
            match p {
                Some(p) => format!("{p}; {dropped}"),
                None => format!(
                    "headers are {headers_size} bytes, too big for a retry or dead-letter copy; {dropped}"
                ),
            }
        }
    };
    Some(Refusal {
        reason,
        drop_headers,
    })
}

/// The first reason to refuse `delivery`, the size of its headers aside.
fn problem(delivery: &Delivery, max_body_size: usize) -> Option<String> {
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

/// The size of `table` on the wire (walked with an explicit stack).
fn encoded_size(table: &FieldTable) -> usize {
    let mut size = 0;
    let mut tables = vec![table];
    let mut values: Vec<&AMQPValue> = Vec::new();
    loop {
        if let Some(t) = tables.pop() {
            size += 4;
            for (key, value) in t.inner() {
                size += 1 + key.as_str().len();
                values.push(value);
            }
        } else if let Some(v) = values.pop() {
            size += 1 + match v {
                AMQPValue::Boolean(_)
                | AMQPValue::ShortShortInt(_)
                | AMQPValue::ShortShortUInt(_) => 1,
                AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
                AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
                AMQPValue::DecimalValue(_) => 5,
                AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
                AMQPValue::ShortString(s) => 1 + s.as_str().len(),
                AMQPValue::LongString(s) => 4 + s.len(),
                AMQPValue::ByteArray(b) => 4 + b.len(),
                AMQPValue::Void => 0,
                AMQPValue::FieldTable(t) => {
                    tables.push(t);
                    0
                }
                AMQPValue::FieldArray(a) => {
                    values.extend(a.as_slice());
                    4
                }
            };
        } else {
            return size;
        }
    }
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
    // Nearly every property is ASCII, which is checked a word at a time; a `char` search
    // costs a searcher per string, on every delivery.
    let s = s.as_str();
    !s.is_ascii() && s.contains(char::REPLACEMENT_CHARACTER)
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

/// Start of a session's end reason when the client library could not parse a frame.
const UNREADABLE_FRAME: &str = "the client library cannot parse a frame from the broker";

/// After this many sessions in a row ended on an unreadable frame (and again after each
/// further as many), say so at error level and, on a classic queue, try the quarantine.
const UNREADABLE_ACT_AFTER: u32 = 3;

/// A session's end reason for an error of its delivery stream: marked when the client
/// library could not parse a frame (see [`UnreadableFrames`]).
pub(crate) fn stream_error(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ParsingError(_) => format!("{UNREADABLE_FRAME}: {e}"),
        _ => e.to_string(),
    }
}

/// Why a session's link went down, when its link watch (not its delivery stream) noticed:
/// the delivery stream may hold the connection's error behind the deliveries read ahead.
/// Those are dropped unread (the channel is gone; the broker redelivers them).
pub(crate) async fn lost_because(deliveries: &mut lapin::Consumer, lost: String) -> String {
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(LOST_ERROR_WAIT, deliveries.next()).await {
            Ok(Some(Ok(_read_ahead))) => {}
            Ok(Some(Err(e))) => return stream_error(&e),
            Ok(None) | Err(_) => return lost,
        }
    }
}

/// How long [`lost_because`] waits for the stream's next item.
const LOST_ERROR_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Sessions in a row that ended because the client library could not parse a frame.
///
/// Such a frame kills the connection, and the broker gives the message back to the queue
/// (and its position): the next session receives it again and dies the same way. Reading
/// it is impossible on the client, so the loop is slowed and handed to the broker:
/// - while sessions keep dying of it the reconnect backoff is never reset (it grows to
///   `Config::max_reconnect_delay`), and an error log says what is going on;
/// - the next session subscribes with a prefetch of one, so only that message is
///   delivered (and counted) again, not the whole window behind it, and a message handled
///   before it is settled before it arrives; the second delivery read fine restores the
///   full window;
/// - a quorum queue's delivery limit then dead-letters the message after that many
///   attempts. A classic queue has no such limit: after every third such session in a row
///   the quarantine (`consumer::quarantine`) looks at the queue's first message over a
///   separate raw connection and rejects it into the DLQ if lapin cannot parse it.
#[derive(Debug, Default)]
pub(crate) struct UnreadableFrames {
    in_a_row: u32,
}

impl UnreadableFrames {
    /// Whether the next session should start with a window of one delivery.
    pub(crate) fn narrow(&self) -> bool {
        self.in_a_row > 0
    }

    /// Record how a session ended; `true` when it ended on an unreadable frame, in which
    /// case the backoff must keep growing even though the session had attached.
    fn session_ended(&mut self, reason: &str) -> bool {
        if reason.starts_with(UNREADABLE_FRAME) {
            self.in_a_row += 1;
            true
        } else {
            self.in_a_row = 0;
            false
        }
    }

    /// Whether it is time to act (log, quarantine) on a run of unreadable sessions.
    fn act_now(&self) -> bool {
        self.in_a_row > 0 && self.in_a_row.is_multiple_of(UNREADABLE_ACT_AFTER)
    }

    /// Record how a session of `consumer` ended, and act on a run of unreadable frames;
    /// `true` when it ended on an unreadable frame (the backoff must keep growing even
    /// though the session had attached).
    pub(crate) async fn after_session(
        &mut self,
        config: &crate::Config,
        consumer: &crate::ConsumerConfig,
        reason: &str,
    ) -> bool {
        if !self.session_ended(reason) {
            return false;
        }
        if !self.act_now() {
            return true;
        }
        let (queue, sessions) = (consumer.queue(), self.in_a_row);
        if consumer.model.queue_kind() == crate::QueueKind::Quorum {
            tracing::error!(
                %queue,
                sessions,
                delivery_limit = consumer.effective_delivery_limit(),
                "the broker keeps delivering a message the client library cannot parse; reconnecting with growing delays until the queue's delivery limit dead-letters it"
            );
            return true;
        }
        match crate::consumer::quarantine::reject_unreadable_head(config, queue).await {
            Ok(crate::consumer::quarantine::Quarantine::Rejected) => tracing::error!(
                %queue,
                sessions,
                "the broker kept delivering a message the client library cannot parse: rejected it into the DLQ (x-death reason `rejected`, original bytes)"
            ),
            Ok(crate::consumer::quarantine::Quarantine::NothingToDo) => tracing::error!(
                %queue,
                sessions,
                "sessions keep dying of a frame the client library cannot parse, but the queue's first message is readable; reconnecting with growing delays (docs/error-handling.md, \"Hostile input\")"
            ),
            Err(e) => tracing::error!(
                %queue,
                sessions,
                error = %e,
                "the broker keeps delivering a message the client library cannot parse, and the quarantine failed; move it to the DLQ by hand (docs/error-handling.md, \"Hostile input\")"
            ),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    const LIMITS: Limits = Limits {
        max_body_size: 1024,
        frame_max: 131_072,
    };

    fn reason(d: &Delivery) -> Option<String> {
        refuse(d, LIMITS).map(|r| r.reason)
    }

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
        assert_eq!(refuse(&d, LIMITS), None);
    }

    #[test]
    fn a_body_over_the_limit_is_refused() {
        let d = Delivery::for_test(vec![b' '; 11]);
        let limits = Limits {
            max_body_size: 10,
            ..LIMITS
        };
        assert!(refuse(&d, limits).is_some_and(|r| r.reason.contains("11 bytes")));
        let limits = Limits {
            max_body_size: 11,
            ..LIMITS
        };
        assert_eq!(refuse(&d, limits), None);
    }

    #[test]
    fn replacement_characters_mark_a_damaged_property() {
        let d = Delivery::for_test(b"{}".to_vec()).with_message_id("\u{FFFD}\u{FFFD}");
        assert!(reason(&d).is_some_and(|r| r.contains("`message_id`")));
        let mut d = Delivery::for_test(b"{}".to_vec());
        d.properties = d.properties.with_type("order.\u{FFFD}".into());
        assert!(reason(&d).is_some_and(|r| r.contains("`type`")));
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
        assert!(reason(&d).is_some_and(|r| r.contains("header key")));
    }

    #[test]
    fn nesting_is_limited() {
        let ok = Delivery::for_test(b"{}".to_vec()).with_headers(nested(MAX_HEADER_DEPTH));
        assert_eq!(refuse(&ok, LIMITS), None);
        let deep = Delivery::for_test(b"{}".to_vec()).with_headers(nested(MAX_HEADER_DEPTH + 1));
        assert!(reason(&deep).is_some_and(|r| r.contains("nested")));
        // x-death: a list of tables.
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let d = Delivery::for_test(b"{}".to_vec()).with_headers(h);
        assert_eq!(refuse(&d, LIMITS), None);
    }

    #[test]
    fn headers_too_big_for_a_copy_are_dropped_from_the_dead_letter() {
        let mut h = FieldTable::default();
        h.insert(
            "blob".into(),
            AMQPValue::LongString(vec![b'x'; 130_000].into()),
        );
        let d = Delivery::for_test(b"{}".to_vec()).with_headers(h);
        let r = refuse(&d, LIMITS).expect("refused");
        assert!(r.drop_headers);
        assert!(
            r.reason.contains("left out of this dead letter"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn encoded_size_matches_the_wire() {
        // {"s": S"xy", "a": A[I 7, F{"t": t1}], "d": D(2, 5), "v": V, "x": x"ab"}
        let wire: Vec<u8> = [
            &[0, 0, 0, 50][..],
            &[1, b's', b'S', 0, 0, 0, 2, b'x', b'y'],
            &[1, b'a', b'A', 0, 0, 0, 14, b'I', 0, 0, 0, 7],
            &[b'F', 0, 0, 0, 4, 1, b't', b't', 1],
            &[1, b'd', b'D', 2, 0, 0, 0, 5],
            &[1, b'v', b'V'],
            &[1, b'x', b'x', 0, 0, 0, 2, b'a', b'b'],
        ]
        .concat();
        let (rest, table) =
            lapin::types::parsing::parse_field_table(&wire[..]).expect("valid table");
        assert!(rest.is_empty());
        assert_eq!(table.inner().len(), 5);
        assert_eq!(encoded_size(&table), wire.len());
    }

    #[test]
    fn only_unreadable_frames_keep_the_backoff_growing() {
        let mut frames = UnreadableFrames::default();
        let unreadable = format!("{UNREADABLE_FRAME}: failed to parse");
        assert!(frames.session_ended(&unreadable));
        assert!(frames.session_ended(&unreadable));
        assert!(frames.narrow());
        assert!(!frames.act_now());
        assert!(frames.session_ended(&unreadable));
        assert!(frames.act_now(), "the third in a row acts");
        assert!(!frames.session_ended("connection lost"));
        assert!(!frames.narrow());
        assert!(!frames.act_now());
    }
}
