//! The topology export: the consumers of an app as an AsyncAPI 3.0 document.
//!
//! Channels are broker objects: each exchange binding a consumer listens on (`is:
//! routingKey`), and each queue it declares (`is: queue`: the work queue, its DLQ and its
//! retry tiers) with its declaration arguments under `x-reliable-mq`. Operations are what
//! the app does: `receive` from each work queue (with prefetch, concurrency, the retry
//! ladder, dedup under `x-reliable-mq`), `send` dead letters to the DLX. The queue
//! arguments come from the same code that declares them, so the document cannot drift
//! from what the broker is told.
//!
//! YAML is written by hand from the JSON value (a block-style subset of YAML with every
//! string double-quoted): the document has only maps, lists, strings, numbers and
//! booleans, and a YAML library would be a new dependency of every build.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value, json};

use crate::ExportFormat;
use crate::failure::header;
use crate::spec::ConsumerConfig;
use crate::topology::Topology;

/// The AMQP bindings version this document uses.
const AMQP_BINDINGS: &str = "0.3.0";

/// The AsyncAPI 3.0 document describing `consumers`, on a broker whose `consumer_timeout`
/// is `consumer_timeout`.
pub(crate) fn document(consumers: &[ConsumerConfig], consumer_timeout: Duration) -> Value {
    let mut channels = BTreeMap::new();
    let mut operations = BTreeMap::new();
    let mut messages = BTreeMap::new();
    messages.insert("DeadLetter".to_owned(), dead_letter_message());
    let mut schemas = Map::new();

    for c in consumers {
        let t = Topology::of(c);
        let (msg_id, msg) = payload_message(c, &mut schemas);
        messages.insert(msg_id.clone(), msg);
        let msg_ref = json!({ "$ref": format!("#/components/messages/{msg_id}") });
        let dead_ref = json!({ "$ref": "#/components/messages/DeadLetter" });

        // Where publishers send: the consumer's exchange and binding key.
        let mut bindings = Vec::new();
        if let Some((exchange, kind, key)) = &t.exchange {
            let id = channel_id("exchange", &format!("{exchange}.{key}"));
            channels.insert(
                id,
                json!({
                    "address": key,
                    "title": format!("{exchange} ({}) with routing key {key}", kind.as_str()),
                    "description": format!("Publish here to reach queue `{}`.", t.queue),
                    "messages": { msg_id.clone(): msg_ref.clone() },
                    "bindings": { "amqp": {
                        "is": "routingKey",
                        "exchange": { "name": exchange, "type": kind.as_str(), "durable": true, "autoDelete": false },
                        "bindingVersion": AMQP_BINDINGS,
                    }},
                }),
            );
            bindings.push(json!({ "exchange": exchange, "routingKey": key }));
        } else {
            bindings.push(json!({ "exchange": "", "routingKey": t.queue }));
        }

        // The work queue.
        let queue_id = channel_id("queue", &t.queue);
        channels.insert(
            queue_id.clone(),
            queue_channel(
                &t.queue,
                "work queue",
                t.queue_arguments(),
                bindings,
                json!({ msg_id.clone(): msg_ref.clone() }),
            ),
        );

        // Dead letters: the DLX (direct, keyed by the work queue's name) and the DLQ.
        let dlx_id = channel_id("exchange", &format!("{}.{}", t.dlx, t.queue));
        channels.insert(
            dlx_id.clone(),
            json!({
                "address": t.queue,
                "title": format!("{} (direct) with routing key {}", t.dlx, t.queue),
                "description": format!("Dead-letter exchange of `{}`: failed messages go to `{}` with the reason in their headers.", t.queue, t.dlq),
                "messages": { "DeadLetter": dead_ref.clone() },
                "bindings": { "amqp": {
                    "is": "routingKey",
                    "exchange": { "name": t.dlx, "type": "direct", "durable": true, "autoDelete": false },
                    "bindingVersion": AMQP_BINDINGS,
                }},
            }),
        );
        let dlq_id = channel_id("queue", &t.dlq);
        channels.insert(
            dlq_id,
            queue_channel(
                &t.dlq,
                "dead-letter queue",
                t.dlq_arguments(),
                vec![json!({ "exchange": t.dlx, "routingKey": t.queue })],
                json!({ "DeadLetter": dead_ref.clone() }),
            ),
        );

        // Retry tiers (and the dedup requeue tier): wait, then back to the work queue.
        let mut tiers = Vec::new();
        for (tier, delay) in t.wait_queues() {
            channels.insert(
                channel_id("queue", &tier),
                queue_channel(
                    &tier,
                    "retry tier",
                    t.tier_arguments(delay),
                    Vec::new(),
                    json!({ msg_id.clone(): msg_ref.clone() }),
                ),
            );
            tiers
                .push(json!({ "queue": tier, "delay": reliable_mq_model::format_duration(delay) }));
        }

        let op = channel_id("consume", c.name());
        operations.insert(
            op.clone(),
            json!({
                "action": "receive",
                "title": format!("{} consumes {}", c.name(), t.queue),
                "channel": { "$ref": format!("#/channels/{queue_id}") },
                "messages": [{ "$ref": format!("#/channels/{queue_id}/messages/{msg_id}") }],
                "bindings": { "amqp": { "ack": true, "bindingVersion": AMQP_BINDINGS } },
                "x-reliable-mq": settings(c, &t, tiers, consumer_timeout),
            }),
        );
        operations.insert(
            channel_id("dead-letter", c.name()),
            json!({
                "action": "send",
                "title": format!("{} dead-letters to {}", c.name(), t.dlq),
                "channel": { "$ref": format!("#/channels/{dlx_id}") },
                "messages": [{ "$ref": format!("#/channels/{dlx_id}/messages/DeadLetter") }],
                "bindings": { "amqp": { "deliveryMode": 2, "mandatory": true, "bindingVersion": AMQP_BINDINGS } },
            }),
        );
    }

    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": service_name(),
            "version": "unversioned",
            "description": "Consumers of this service and every broker object they declare, exported by reliable-mq.",
            "x-generator": format!("reliable-mq {}", env!("CARGO_PKG_VERSION")),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": if schemas.is_empty() {
            json!({ "messages": messages })
        } else {
            json!({ "messages": messages, "schemas": schemas })
        },
    })
}

/// The consumer's reliability settings, as the runtime applies them: every key of
/// `#[consumer(...)]` (the unit test `every_consumer_key_is_exported` holds the export to
/// the model's key list), plus the broker's `consumer_timeout` the handler timeout is
/// checked against.
fn settings(
    c: &ConsumerConfig,
    t: &Topology,
    tiers: Vec<Value>,
    consumer_timeout: Duration,
) -> Value {
    let m = &c.model;
    let fmt = reliable_mq_model::format_duration;
    let (consume_options, consume_arguments) = c.consume_options();
    let mut s = Map::new();
    let mut put = |k: &str, v: Value| {
        s.insert(k.to_owned(), v);
    };
    put("consumer", json!(c.name()));
    put("queue", json!(t.queue));
    put("queueType", json!(t.queue_type.as_str()));
    if let Some((exchange, kind, key)) = &t.exchange {
        put("exchange", json!(exchange));
        put("exchangeType", json!(kind.as_str()));
        put("routingKey", json!(key));
    }
    put("deadLetterExchange", json!(t.dlx));
    put("deadLetterQueue", json!(t.dlq));
    if let Some(limit) = t.delivery_limit {
        put("deliveryLimit", json!(limit));
    }
    put("prefetch", json!(c.prefetch()));
    put("concurrency", json!(c.concurrency()));
    put("timeout", json!(fmt(c.timeout())));
    put("brokerConsumerTimeout", json!(fmt(consumer_timeout)));
    put("maxRetries", json!(c.max_retries()));
    put("retryDelay", json!(fmt(m.retry_delay())));
    put("retryBackoff", json!(m.retry_backoff().to_attribute()));
    put("retryTiers", Value::Array(tiers));
    put("idempotent", json!(c.is_idempotent()));
    put("inbox", json!(c.is_inbox()));
    if c.is_idempotent() || c.is_inbox() {
        put("dedupTtl", json!(fmt(c.dedup_ttl())));
    }
    put("singleActiveConsumer", json!(t.single_active_consumer));
    // The broker's default consumer priority is 0.
    put("priority", json!(m.priority().unwrap_or(0)));
    put("exclusive", json!(consume_options.exclusive));
    put("consumeArguments", field_table(&consume_arguments));
    if let Some(ty) = c.handler.payload_type() {
        put("payloadType", json!(ty));
    }
    Value::Object(s)
}

/// A channel for one declared queue.
fn queue_channel(
    name: &str,
    role: &str,
    arguments: FieldTable,
    bindings: Vec<Value>,
    messages: Value,
) -> Value {
    json!({
        "address": name,
        "title": format!("{name} ({role})"),
        "messages": messages,
        "bindings": { "amqp": {
            "is": "queue",
            "queue": { "name": name, "durable": true, "exclusive": false, "autoDelete": false },
            "bindingVersion": AMQP_BINDINGS,
        }},
        "x-reliable-mq": {
            "role": role,
            "arguments": field_table(&arguments),
            "bindings": bindings,
        },
    })
}

/// The message a consumer decodes: named after its Rust type when the handler knows it,
/// described by the type's JSON Schema when there is one (its subschemas go to `schemas`).
fn payload_message(c: &ConsumerConfig, schemas: &mut Map<String, Value>) -> (String, Value) {
    let schema = c.payload_schema().map(|s| adopt_schema(s, schemas));
    match c.handler.payload_type() {
        Some(ty) => {
            let short = ty.rsplit("::").next().unwrap_or(ty);
            let id = component_id(&format!("{short}.{}", c.queue()));
            let payload = schema.unwrap_or_else(|| {
                json!({ "title": ty, "description": format!("JSON decoded into the Rust type `{ty}`.") })
            });
            let msg = json!({
                "name": short,
                "title": ty,
                "contentType": "application/json",
                "payload": payload,
            });
            (id, msg)
        }
        None => {
            let id = component_id(&format!("Payload.{}", c.queue()));
            let payload = schema.unwrap_or_else(|| {
                json!({ "description": format!("JSON consumed by `{}` (its Rust type is not recorded).", c.name()) })
            });
            let msg = json!({
                "name": format!("{} payload", c.queue()),
                "contentType": "application/json",
                "payload": payload,
            });
            (id, msg)
        }
    }
}

/// The JSON pointer under which [`schema_of`] puts a payload's subschemas: where they
/// end up in the document, so the `$ref`s schemars writes resolve there unchanged.
const SCHEMAS_POINTER: &str = "/components/schemas";

/// A payload's root schema, its subschemas moved into the document's `schemas`. A name
/// another payload already took for a different schema gets a number, and this payload's
/// references follow; names are made valid component keys the same way.
fn adopt_schema(mut schema: Value, schemas: &mut Map<String, Value>) -> Value {
    let defs = schema
        .as_object_mut()
        .and_then(|root| root.remove("components"))
        .and_then(|mut components| components.as_object_mut()?.remove("schemas"));
    let Some(Value::Object(defs)) = defs else {
        return schema;
    };
    let mut renamed = BTreeMap::new();
    for (name, def) in &defs {
        let base = component_id(name);
        let mut key = base.clone();
        let mut n = 2;
        while schemas.get(&key).is_some_and(|taken| taken != def)
            || renamed.values().any(|k| k == &key)
        {
            key = format!("{base}{n}");
            n += 1;
        }
        renamed.insert(name.clone(), key);
    }
    rename_refs(&mut schema, &renamed);
    for (name, mut def) in defs {
        rename_refs(&mut def, &renamed);
        if let Some(key) = renamed.get(&name) {
            schemas.insert(key.clone(), def);
        }
    }
    schema
}

/// Point every `$ref` to a subschema at its key in `renamed`.
fn rename_refs(value: &mut Value, renamed: &BTreeMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if k == "$ref"
                    && let Value::String(target) = v
                    && let Some(name) = target
                        .strip_prefix('#')
                        .and_then(|t| t.strip_prefix(SCHEMAS_POINTER))
                        .and_then(|t| t.strip_prefix('/'))
                    && let Some(key) = renamed.get(&pointer_segment(name))
                {
                    *target = format!("#{SCHEMAS_POINTER}/{key}");
                } else {
                    rename_refs(v, renamed);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rename_refs(v, renamed)),
        _ => {}
    }
}

/// One segment of a JSON pointer in a URI fragment, decoded: percent-escapes, then `~1`
/// and `~0`.
fn pointer_segment(encoded: &str) -> String {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out)
        .replace("~1", "/")
        .replace("~0", "~")
}

/// The JSON Schema of `T` for the export: draft 7 (the base of AsyncAPI's Schema
/// Object), no `$schema`, subschemas under [`SCHEMAS_POINTER`].
#[cfg(feature = "schemars")]
pub(crate) fn schema_of<T: schemars::JsonSchema>() -> Value {
    let mut settings = schemars::generate::SchemaSettings::draft07();
    settings.definitions_path = SCHEMAS_POINTER.into();
    settings.meta_schema = None;
    settings
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

/// What `#[consumer(schema)]` asks of the payload type: a JSON Schema, which needs
/// feature `schemars` and a `schemars::JsonSchema` derive. The attribute, not a silent
/// "schema if the type has one": a schema missing from the export because the derive was
/// forgotten, or comes from another schemars major version (a different trait), would go
/// unnoticed; with the attribute it is a compile error saying which of the two is missing.
#[cfg(feature = "schemars")]
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`#[consumer(schema)]` exports the JSON Schema of `{Self}`, which does not implement `schemars::JsonSchema`",
    label = "this payload type has no JSON Schema",
    note = "add `#[derive(schemars::JsonSchema)]` to `{Self}` (schemars 1.x, the version reliable-mq's `schemars` feature uses), or remove `schema` from the attribute"
)]
pub trait PayloadSchema: schemars::JsonSchema {}

#[cfg(feature = "schemars")]
impl<T: schemars::JsonSchema + ?Sized> PayloadSchema for T {}

/// What `#[consumer(schema)]` asks of the payload type; without feature `schemars`
/// nothing has it.
#[cfg(not(feature = "schemars"))]
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`#[consumer(schema)]` needs reliable-mq's `schemars` feature",
    label = "the JSON Schema of this payload type cannot be exported without it",
    note = "enable it: `reliable-mq = {{ version = \"0.1\", features = [\"schemars\"] }}`, and add `#[derive(schemars::JsonSchema)]` to `{Self}`; or remove `schema` from the attribute"
)]
pub trait PayloadSchema {}

/// The payload schema `#[consumer(schema)]` exports (its bound is the compile-time check).
#[doc(hidden)]
pub fn payload_schema<T: PayloadSchema>() -> Value {
    #[cfg(feature = "schemars")]
    {
        schema_of::<T>()
    }
    #[cfg(not(feature = "schemars"))]
    {
        Value::Null
    }
}

/// A dead letter: the original message plus the failure record in its headers.
fn dead_letter_message() -> Value {
    let s = |d: &str| json!({ "type": "string", "description": d });
    let i = |d: &str| json!({ "type": "integer", "description": d });
    json!({
        "name": "DeadLetter",
        "title": "A dead letter",
        "description": "The original body and properties, plus why and where it failed. Replay with `reliable-mq dlq replay`.",
        "headers": {
            "type": "object",
            "properties": {
                header::ERROR_KIND: { "type": "string", "enum": ["decode", "rejected", "retries-exhausted", "timeout", "panic", "error", "missing-message-id"] },
                header::LAST_ERROR_KIND: s("On retries-exhausted: the kind of the last failure."),
                header::EXCEPTION_MESSAGE: s("The error message, trimmed."),
                header::ATTEMPTS: i("Attempts made."),
                header::ORIGINAL_EXCHANGE: s("Exchange the message was first published to."),
                header::ORIGINAL_ROUTING_KEY: s("Routing key it was first published with."),
                header::ORIGINAL_QUEUE: s("Queue it was consumed from."),
                header::FIRST_FAILURE: i("Unix milliseconds of the first failure."),
                header::LAST_FAILURE: i("Unix milliseconds of the last failure."),
                "x-replays": i("How many times a DLQ tool replayed it."),
            },
        },
        "payload": { "description": "The original message body, unchanged." },
    })
}

/// Declaration arguments as JSON.
pub(crate) fn field_table(table: &FieldTable) -> Value {
    let mut out = Map::new();
    for (k, v) in table.inner() {
        out.insert(k.as_str().to_owned(), amqp_value(v));
    }
    Value::Object(out)
}

fn amqp_value(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldTable(t) => field_table(t),
        other => json!(format!("{other:?}")),
    }
}

/// `{kind}.{name}` with characters outside `[A-Za-z0-9._-]` replaced, so it can be a
/// component key and a JSON pointer segment.
fn channel_id(kind: &str, name: &str) -> String {
    component_id(&format!("{kind}.{name}"))
}

fn component_id(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The running executable's name: the service being described.
fn service_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "reliable-mq service".to_owned())
}

/// The document as text.
pub(crate) fn render(doc: &Value, format: ExportFormat) -> String {
    match format {
        ExportFormat::Json => serde_json::to_string_pretty(doc).unwrap_or_default(),
        ExportFormat::Yaml => {
            let mut out = String::new();
            yaml(doc, 0, &mut out);
            out
        }
    }
}

/// Block-style YAML for `value` at `indent` spaces; every line ends with a newline.
fn yaml(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                out.push_str(&pad);
                out.push_str(&yaml_key(k));
                out.push(':');
                if is_block(v) {
                    out.push('\n');
                    let child = if v.is_array() { indent } else { indent + 2 };
                    yaml(v, child, out);
                } else {
                    out.push(' ');
                    out.push_str(&yaml_scalar(v));
                    out.push('\n');
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                if is_block(item) {
                    // The item's first line goes after the dash, the rest stay indented.
                    let mut child = String::new();
                    yaml(item, indent + 2, &mut child);
                    out.push_str(&pad);
                    out.push_str("- ");
                    out.push_str(&child[indent + 2..]);
                } else {
                    out.push_str(&pad);
                    out.push_str("- ");
                    out.push_str(&yaml_scalar(item));
                    out.push('\n');
                }
            }
        }
        other => {
            out.push_str(&pad);
            out.push_str(&yaml_scalar(other));
            out.push('\n');
        }
    }
}

fn is_block(v: &Value) -> bool {
    match v {
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

/// Scalars: strings double-quoted with JSON escapes (valid YAML double-quoted scalars), so
/// no value is ever read back as a number, boolean or null by accident.
fn yaml_scalar(v: &Value) -> String {
    match v {
        Value::Object(_) => "{}".to_owned(),
        Value::Array(_) => "[]".to_owned(),
        other => other.to_string(),
    }
}

/// Keys plain when they are safe identifiers, quoted otherwise.
fn yaml_key(k: &str) -> String {
    let plain = !k.is_empty()
        && k.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '$' || c == '_')
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '$' | '_' | '-' | '.' | '/'))
        && !matches!(
            k.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n"
        );
    if plain {
        k.to_owned()
    } else {
        Value::String(k.to_owned()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HandlerError, handler_fn};
    use reliable_mq_model::{Key, Value as ModelValue};

    fn app() -> Vec<ConsumerConfig> {
        vec![
            ConsumerConfig::new(
                "orders",
                "orders.dlx",
                handler_fn(|_: u64| async { Ok::<_, HandlerError>(()) }),
            )
            .with_exchange("shop", crate::ExchangeKind::Topic, "order.*")
            .idempotent(std::time::Duration::from_secs(3600)),
        ]
    }

    #[test]
    fn describes_every_declared_object() {
        let doc = document(&app(), Duration::from_secs(1800));
        let channels = doc["channels"]
            .as_object()
            .map(|m| m.keys().cloned().collect::<Vec<_>>());
        assert_eq!(
            channels.unwrap_or_default(),
            [
                "exchange.orders.dlx.orders",
                "exchange.shop.order._",
                "queue.orders",
                "queue.orders.dlq",
                "queue.orders.retry.1s",
                "queue.orders.retry.2s",
                "queue.orders.retry.4s",
            ]
        );
        let q = &doc["channels"]["queue.orders"]["x-reliable-mq"]["arguments"];
        assert_eq!(q["x-dead-letter-exchange"], "orders.dlx");
        let op = &doc["operations"]["consume.orders"]["x-reliable-mq"];
        assert_eq!(op["dedupTtl"], "1h");
        assert_eq!(op["payloadType"], "u64");
        assert_eq!(op["retryTiers"][2]["delay"], "4s");
    }

    /// Each key of `#[consumer(...)]`: the export field that shows it, a setting that
    /// differs from the base consumer's, and what that setting needs set first. The match
    /// has no catch-all, so a key added to the model does not compile here until the
    /// export shows it.
    fn exported_as(
        key: Key,
    ) -> (
        &'static str,
        ModelValue<'static>,
        Option<(Key, ModelValue<'static>)>,
    ) {
        use ModelValue::{Flag, Int, Str};
        match key {
            Key::Queue => ("queue", Str("invoices"), None),
            Key::Exchange => ("exchange", Str("billing"), None),
            Key::ExchangeType => ("exchangeType", Str("direct"), None),
            Key::RoutingKey => ("routingKey", Str("order.paid"), None),
            Key::Dlx => ("deadLetterExchange", Str("other.dlx"), None),
            Key::Dlq => ("deadLetterQueue", Str("other.dlq"), None),
            Key::QueueType => ("queueType", Str("quorum"), None),
            Key::DeliveryLimit => (
                "deliveryLimit",
                Int(20),
                Some((Key::QueueType, Str("quorum"))),
            ),
            Key::Prefetch => ("prefetch", Int(7), None),
            Key::Concurrency => ("concurrency", Int(2), None),
            Key::MaxRetries => ("maxRetries", Int(9), None),
            Key::RetryDelay => ("retryDelay", Str("3s"), None),
            Key::RetryBackoff => ("retryBackoff", Str("fixed"), None),
            Key::Timeout => ("timeout", Str("5s"), None),
            Key::Idempotent => ("idempotent", Flag, None),
            Key::DedupTtl => ("dedupTtl", Str("2h"), Some((Key::Idempotent, Flag))),
            Key::SingleActiveConsumer => ("singleActiveConsumer", Flag, None),
            Key::Priority => ("priority", Int(5), None),
            Key::Exclusive => ("exclusive", Flag, None),
            Key::Inbox => ("inbox", Flag, None),
        }
    }

    #[test]
    fn every_consumer_key_is_exported() {
        let base = ConsumerConfig::new(
            "orders",
            "orders.dlx",
            handler_fn(|_: u64| async { Ok::<_, HandlerError>(()) }),
        )
        .with_exchange("shop", crate::ExchangeKind::Topic, "order.*");
        let exported = |c: &ConsumerConfig| {
            document(std::slice::from_ref(c), Duration::from_secs(1800))["operations"]
                [format!("consume.{}", c.name())]["x-reliable-mq"]
                .clone()
        };
        for key in Key::ALL {
            let (field, value, needs) = exported_as(key);
            let mut before = base.clone();
            if let Some((k, v)) = needs {
                assert!(before.model.set(k, v).is_ok(), "{k}");
            }
            let mut after = before.clone();
            assert!(after.model.set(key, value).is_ok(), "{key} = {value:?}");
            let (was, is) = (&exported(&before)[field], &exported(&after)[field]);
            assert!(
                !is.is_null() && was != is,
                "`{key}` is not shown by the export's `{field}`: {was} before, {is} after"
            );
        }
        // The consume arguments come from the code that subscribes.
        let mut prioritised = base.clone();
        prioritised.model.priority = Some(5);
        assert_eq!(exported(&prioritised)["consumeArguments"]["x-priority"], 5);
        assert_eq!(exported(&base)["brokerConsumerTimeout"], "30m");
    }

    #[test]
    fn yaml_layout() {
        let v = json!({"a": {"b": [1, {"c": "x", "d": []}], "e": {}}, "on": "1"});
        let mut out = String::new();
        yaml(&v, 0, &mut out);
        assert_eq!(
            out,
            "a:\n  b:\n  - 1\n  - c: \"x\"\n    d: []\n  e: {}\n\"on\": \"1\"\n"
        );
    }
}
