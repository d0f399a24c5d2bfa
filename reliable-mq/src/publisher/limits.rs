//! The AMQP limits a publish must meet, checked before anything is sent.
//!
//! Without these checks a caller's value reaches code that panics (amq-protocol's
//! `ShortString::from` on more than 255 bytes) or frames the broker rejects by closing
//! the whole connection (a content header larger than the frame size), taking every other
//! publish in flight down with it. Each failure names the field and the limit.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};

use super::PublishError;

/// Longest AMQP short string: exchange, routing key, header keys and every string
/// property (`message_id`, `content_type`, `type`, `app_id`, ...).
pub const MAX_SHORT_STRING: usize = 255;

/// Deepest nesting of tables and arrays in the headers (the encoder recurses; a deeper
/// structure is almost certainly a mistake).
pub const MAX_HEADER_DEPTH: usize = 16;

/// Largest encoded size of all properties together, headers included: they travel in one
/// content-header frame, which must fit in the broker's default frame size (128 KiB)
/// with room for the frame's own fields.
pub const MAX_PROPERTIES_SIZE: usize = 128 * 1024 - 1024;

/// A short string from a caller's value, or the error naming `field`.
pub(crate) fn short(field: &str, value: &str) -> Result<ShortString, PublishError> {
    if value.len() > MAX_SHORT_STRING {
        return Err(invalid(
            field,
            format!(
                "is {} bytes; AMQP allows at most {MAX_SHORT_STRING}",
                value.len()
            ),
        ));
    }
    ShortString::try_new(value).map_err(|e| invalid(field, e.to_string()))
}

pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> PublishError {
    PublishError::Invalid {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Check the headers (depth, key lengths) and the total size of `properties`.
pub(crate) fn check_properties(properties: &BasicProperties) -> Result<(), PublishError> {
    let mut size = 0usize;
    for (field, value) in [
        ("content_type", properties.content_type()),
        ("content_encoding", properties.content_encoding()),
        ("correlation_id", properties.correlation_id()),
        ("reply_to", properties.reply_to()),
        ("expiration", properties.expiration()),
        ("message_id", properties.message_id()),
        ("type", properties.kind()),
        ("user_id", properties.user_id()),
        ("app_id", properties.app_id()),
        ("cluster_id", properties.cluster_id()),
    ] {
        if let Some(v) = value {
            // A ShortString cannot be built over the limit; checked anyway, cheaply.
            let _ = short(field, v.as_str())?;
            size += 1 + v.as_str().len();
        }
    }
    if let Some(headers) = properties.headers() {
        size += table_size(headers, 1)?;
    }
    if size > MAX_PROPERTIES_SIZE {
        return Err(invalid(
            "headers",
            format!(
                "properties take about {size} bytes encoded; at most {MAX_PROPERTIES_SIZE} fit in one frame (send large data in the body)"
            ),
        ));
    }
    Ok(())
}

fn table_size(table: &FieldTable, depth: usize) -> Result<usize, PublishError> {
    if depth > MAX_HEADER_DEPTH {
        return Err(depth_error());
    }
    let mut size = 4;
    for (key, value) in table.inner() {
        let key = key.as_str();
        if key.len() > MAX_SHORT_STRING {
            return Err(invalid(
                &format!("header key {:?}", prefix(key)),
                format!(
                    "is {} bytes; AMQP allows at most {MAX_SHORT_STRING}",
                    key.len()
                ),
            ));
        }
        size += 1 + key.len() + value_size(value, depth)?;
    }
    Ok(size)
}

fn array_size(array: &FieldArray, depth: usize) -> Result<usize, PublishError> {
    if depth > MAX_HEADER_DEPTH {
        return Err(depth_error());
    }
    let mut size = 4;
    for value in array.as_slice() {
        size += value_size(value, depth)?;
    }
    Ok(size)
}

fn value_size(value: &AMQPValue, depth: usize) -> Result<usize, PublishError> {
    Ok(1 + match value {
        AMQPValue::FieldTable(t) => table_size(t, depth + 1)?,
        AMQPValue::FieldArray(a) => array_size(a, depth + 1)?,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        _ => 9,
    })
}

fn depth_error() -> PublishError {
    invalid(
        "headers",
        format!("nest tables or arrays more than {MAX_HEADER_DEPTH} levels deep"),
    )
}

/// The start of a long key, for the error message.
fn prefix(key: &str) -> String {
    let mut end = key.len().min(32);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &key[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_strings_over_255_bytes_are_named_errors() {
        assert!(short("routing_key", &"k".repeat(255)).is_ok());
        let err = short("routing_key", &"k".repeat(256)).unwrap_err();
        assert!(
            matches!(&err, PublishError::Invalid { field, .. } if field == "routing_key"),
            "{err:?}"
        );
        assert!(err.to_string().contains("256"), "{err}");
    }

    #[test]
    fn deep_headers_are_refused() {
        let mut value = AMQPValue::LongString("leaf".into());
        for _ in 0..=MAX_HEADER_DEPTH {
            let mut t = FieldTable::default();
            t.insert("n".into(), value);
            value = AMQPValue::FieldTable(t);
        }
        let mut headers = FieldTable::default();
        headers.insert("deep".into(), value);
        let props = BasicProperties::default().with_headers(headers);
        let err = check_properties(&props).unwrap_err();
        assert!(err.to_string().contains("levels deep"), "{err}");
    }

    #[test]
    fn oversized_headers_are_refused() {
        let mut headers = FieldTable::default();
        headers.insert(
            "big".into(),
            AMQPValue::LongString("x".repeat(MAX_PROPERTIES_SIZE).into()),
        );
        let props = BasicProperties::default().with_headers(headers);
        assert!(check_properties(&props).is_err());
        assert!(check_properties(&BasicProperties::default()).is_ok());
    }
}
