//! Topology rules: each rule is a small `check_*` function with the reason it exists,
//! reporting into the shared [`Ctxt`] so that every broken rule shows up in one build.
//!
//! The output is a [`Topology`] in the types the runtime expects (`u16` prefetch, ...),
//! built only from values that passed their checks.

use proc_macro2::Span;

use crate::attr::{Args, Backoff, ExchangeType, QueueType, Setting};
use crate::ctxt::Ctxt;

/// The runtime's `defaults::PREFETCH`, needed here to check `concurrency <= prefetch`
/// when `prefetch` is not written. The pass tests assert the two agree.
const DEFAULT_PREFETCH: u64 = 32;

/// AMQP names (queues, exchanges, routing keys) are short strings: at most 255 bytes.
const MAX_NAME_BYTES: usize = 255;

/// A consumer's settings after every rule passed. `None` means "not written": the
/// expansion then emits the runtime's default.
pub struct Topology {
    pub queue: String,
    pub exchange: Option<String>,
    pub exchange_type: ExchangeType,
    pub routing_key: Option<String>,
    pub dlx: String,
    pub dlq: Option<String>,
    pub queue_type: QueueType,
    pub delivery_limit: Option<u32>,
    pub prefetch: Option<u16>,
    pub concurrency: Option<u16>,
    pub max_retries: Option<u32>,
    /// Durations are in milliseconds.
    pub retry_delay: Option<u64>,
    pub retry_backoff: Option<Backoff>,
    pub timeout: Option<u64>,
    pub idempotent: bool,
    pub dedup_ttl: Option<u64>,
}

/// Run every rule; the topology is `None` if a required key is missing or invalid (the
/// caller only expands when the context holds no error at all).
pub fn topology(cx: &mut Ctxt, args: &Args) -> Option<Topology> {
    check_queue_present(cx, args);
    check_dlx_present(cx, args);
    for (key, name) in [
        ("queue", &args.queue),
        ("exchange", &args.exchange),
        ("dlx", &args.dlx),
        ("dlq", &args.dlq),
    ] {
        if let Some(name) = name {
            check_name_not_empty(cx, args, key, name);
            check_name_length(cx, key, name);
            check_name_not_reserved(cx, args, key, name);
        }
    }
    if let Some(routing_key) = &args.routing_key {
        check_name_length(cx, "routing_key", routing_key);
    }
    check_dlx_not_exchange(cx, args);
    check_dlq_not_queue(cx, args);
    check_routing_key_needs_exchange(cx, args);
    check_exchange_type_needs_exchange(cx, args);
    check_routing_key_not_ignored(cx, args);
    check_delivery_limit_needs_quorum(cx, args);
    check_dedup_ttl_needs_idempotent(cx, args);
    let delivery_limit = check_delivery_limit_range(cx, args);
    let prefetch = check_prefetch_range(cx, args);
    let concurrency = check_concurrency_range(cx, args);
    let max_retries = check_max_retries_range(cx, args);

    Some(Topology {
        queue: args.queue.as_ref()?.value.clone(),
        exchange: args.exchange.as_ref().map(|s| s.value.clone()),
        exchange_type: args
            .exchange_type
            .as_ref()
            .map_or(ExchangeType::Topic, |s| s.value),
        routing_key: args.routing_key.as_ref().map(|s| s.value.clone()),
        dlx: args.dlx.as_ref()?.value.clone(),
        dlq: args.dlq.as_ref().map(|s| s.value.clone()),
        queue_type: args
            .queue_type
            .as_ref()
            .map_or(QueueType::Classic, |s| s.value),
        delivery_limit,
        prefetch,
        concurrency,
        max_retries,
        retry_delay: args.retry_delay.as_ref().map(|s| s.value),
        retry_backoff: args.retry_backoff.as_ref().map(|s| s.value),
        timeout: args.timeout.as_ref().map(|s| s.value),
        idempotent: args.idempotent.is_some(),
        dedup_ttl: args.dedup_ttl.as_ref().map(|s| s.value),
    })
}

/// Without a queue there is nothing to consume.
fn check_queue_present(cx: &mut Ctxt, args: &Args) {
    if !args.has("queue") && !args.suggested.contains(&"queue") {
        cx.error_at(
            Span::call_site(),
            "missing `queue`: name the queue to consume from, e.g. \
             `#[consumer(queue = \"orders\", dlx = \"orders.dlx\")]`",
        );
    }
}

/// A failed or undecodable message must have somewhere to go, or it is lost. This is
/// also the rule for `max_retries` without a dead-letter exchange: one error, not two.
fn check_dlx_present(cx: &mut Ctxt, args: &Args) {
    if args.has("dlx") || args.suggested.contains(&"dlx") {
        return;
    }
    let dlx = format!("dlx = \"{}.dlx\"", queue_stem(args, "<queue>"));
    let message = match &args.max_retries {
        Some(retries) if retries.value > 0 => format!(
            "missing `dlx`: a message that still fails after `max_retries = {}` must be \
             dead-lettered, and needs a dead-letter exchange to go to; add `{dlx}`",
            retries.value
        ),
        Some(_) => format!(
            "missing `dlx`: even with `max_retries = 0`, rejected and undecodable messages \
             must be dead-lettered somewhere; add `{dlx}`"
        ),
        None => format!(
            "missing `dlx`: failed and undecodable messages must be dead-lettered somewhere, \
             not dropped; add `{dlx}` (its queue is declared for you)"
        ),
    };
    cx.error_at(Span::call_site(), message);
}

/// An empty name means something else to the broker (a generated queue, the default
/// exchange), never what the user meant by writing the key.
fn check_name_not_empty(cx: &mut Ctxt, args: &Args, key: &str, name: &Setting<String>) {
    if !name.value.is_empty() {
        return;
    }
    let queue = queue_stem(args, "orders");
    let message = match key {
        "queue" => "`queue` cannot be empty: an empty name makes the broker generate a new \
                    one on every start; name it, e.g. `queue = \"orders\"`"
            .to_owned(),
        "exchange" => "`exchange` cannot be empty: to consume from the default exchange, \
                       remove `exchange`"
            .to_owned(),
        "dlx" => format!(
            "`dlx` cannot be empty: name the dead-letter exchange, e.g. `dlx = \"{queue}.dlx\"`"
        ),
        _ => format!("`dlq` cannot be empty: remove `dlq` to use `{queue}.dlq`, or name it"),
    };
    cx.error_spanned_by(name, message);
}

/// The broker refuses names over 255 bytes (AMQP short strings).
fn check_name_length(cx: &mut Ctxt, key: &str, name: &Setting<String>) {
    let len = name.value.len();
    if len > MAX_NAME_BYTES {
        cx.error_spanned_by(
            name,
            format!(
                "`{key}` is {len} bytes long; AMQP allows at most {MAX_NAME_BYTES}: shorten it"
            ),
        );
    }
}

/// `amq.` names are reserved: declaring one fails with ACCESS_REFUSED at start-up.
fn check_name_not_reserved(cx: &mut Ctxt, args: &Args, key: &str, name: &Setting<String>) {
    if !name.value.starts_with("amq.") {
        return;
    }
    let queue = queue_stem(args, "orders");
    let message = match key {
        "exchange" => "exchange names starting with `amq.` are reserved by RabbitMQ: the \
                       built-in `amq.*` exchanges cannot be declared by clients; use an \
                       exchange of your own, e.g. `exchange = \"events\"`"
            .to_owned(),
        "queue" => format!(
            "queue names starting with `amq.` are reserved by RabbitMQ (declaring one is \
             refused); choose another name, e.g. `queue = \"{queue}\"`"
        ),
        _ => format!(
            "{key} names starting with `amq.` are reserved by RabbitMQ (declaring one is \
             refused); choose another name, e.g. `{key} = \"{queue}.{key}\"`"
        ),
    };
    cx.error_spanned_by(name, message);
}

/// The queue name to build example names from (`{queue}.dlx`), without a reserved
/// `amq.` prefix, or `fallback` when there is no usable queue name.
fn queue_stem<'a>(args: &'a Args, fallback: &'a str) -> &'a str {
    let queue = args.queue.as_ref().map_or("", |q| q.value.as_str());
    let queue = queue.strip_prefix("amq.").unwrap_or(queue);
    if queue.is_empty() { fallback } else { queue }
}

/// Dead letters published to the exchange the queue is bound to can route straight back
/// into the queue: a failing message would loop forever instead of resting in the DLQ.
fn check_dlx_not_exchange(cx: &mut Ctxt, args: &Args) {
    if let (Some(dlx), Some(exchange)) = (&args.dlx, &args.exchange)
        && dlx.value == exchange.value
        && !dlx.value.is_empty()
    {
        let queue = queue_stem(args, "orders");
        cx.error_spanned_by(
            dlx,
            format!(
                "`dlx` is the same exchange as `exchange`: dead letters could be routed back \
                 into this queue and loop forever; use a separate exchange, e.g. \
                 `dlx = \"{queue}.dlx\"`"
            ),
        );
    }
}

/// A DLQ that is the consumed queue would hand every dead letter back to the handler.
fn check_dlq_not_queue(cx: &mut Ctxt, args: &Args) {
    if let (Some(dlq), Some(queue)) = (&args.dlq, &args.queue)
        && dlq.value == queue.value
        && !dlq.value.is_empty()
    {
        cx.error_spanned_by(
            dlq,
            format!(
                "`dlq` is the consumed queue itself: dead letters would be handled again, \
                 forever; use a separate queue, e.g. `dlq = \"{}.dlq\"`, or remove `dlq`",
                queue.value
            ),
        );
    }
}

/// The default exchange routes by queue name only; it cannot have other bindings.
fn check_routing_key_needs_exchange(cx: &mut Ctxt, args: &Args) {
    if let Some(key) = args.key("routing_key")
        && !args.has("exchange")
    {
        cx.error_spanned_by(
            key,
            "`routing_key` needs `exchange`: without one the queue gets messages published \
             to the default exchange with its name as the routing key; add \
             `exchange = \"...\"`, or remove `routing_key`",
        );
    }
}

/// An exchange type with no exchange to declare would be silently ignored.
fn check_exchange_type_needs_exchange(cx: &mut Ctxt, args: &Args) {
    if let Some(key) = args.key("exchange_type")
        && !args.has("exchange")
    {
        cx.error_spanned_by(
            key,
            "`exchange_type` needs `exchange`: it is the type of the exchange to bind to; \
             add `exchange = \"...\"`, or remove `exchange_type`",
        );
    }
}

/// Fanout and headers exchanges ignore routing keys: the key would filter nothing.
fn check_routing_key_not_ignored(cx: &mut Ctxt, args: &Args) {
    let (Some(key), Some(kind)) = (args.key("routing_key"), &args.exchange_type) else {
        return;
    };
    let message = match kind.value {
        ExchangeType::Fanout => {
            "a `fanout` exchange ignores routing keys and sends every message to every bound \
             queue: remove `routing_key`, or use a `direct` or `topic` exchange to filter"
        }
        ExchangeType::Headers => {
            "a `headers` exchange routes on message headers and ignores routing keys: remove \
             `routing_key`, or use a `direct` or `topic` exchange to filter"
        }
        ExchangeType::Direct | ExchangeType::Topic => return,
    };
    cx.error_spanned_by(key, message);
}

/// `x-delivery-limit` only exists on quorum queues; on a classic queue it does nothing.
fn check_delivery_limit_needs_quorum(cx: &mut Ctxt, args: &Args) {
    let Some(key) = args.key("delivery_limit") else {
        return;
    };
    match &args.queue_type {
        Some(kind) if kind.value == QueueType::Quorum => {}
        Some(_) => cx.error_spanned_by(
            key,
            "`delivery_limit` only applies to quorum queues, and this one is classic: use \
             `queue_type = \"quorum\"`, or remove `delivery_limit`",
        ),
        // An invalid `queue_type` has its own error.
        None if args.has("queue_type") => {}
        None => cx.error_spanned_by(
            key,
            "`delivery_limit` only applies to quorum queues (classic is the default): add \
             `queue_type = \"quorum\"`, or remove `delivery_limit`",
        ),
    }
}

/// A TTL for deduplication that is off would be silently ignored.
fn check_dedup_ttl_needs_idempotent(cx: &mut Ctxt, args: &Args) {
    if let Some(key) = args.key("dedup_ttl")
        && !args.has("idempotent")
    {
        cx.error_spanned_by(
            key,
            "`dedup_ttl` has no effect without `idempotent`: add `idempotent` to deduplicate \
             by message_id, or remove `dedup_ttl`",
        );
    }
}

/// Zero would dead-letter on the first redelivery after a crash: not a safety net.
fn check_delivery_limit_range(cx: &mut Ctxt, args: &Args) -> Option<u32> {
    let limit = args.delivery_limit.as_ref()?;
    match u32::try_from(limit.value) {
        Ok(0) => cx.error_spanned_by(
            limit,
            "`delivery_limit` must be at least 1: it is how many times the broker redelivers \
             a message (after a crash or a lost connection) before dead-lettering it",
        ),
        Ok(value) => return Some(value),
        Err(_) => cx.error_spanned_by(
            limit,
            format!("`delivery_limit` must be at most {}", u32::MAX),
        ),
    }
    None
}

/// `basic.qos` prefetch is 16 bits, and 0 means unlimited: the broker would push the whole
/// queue into this process.
fn check_prefetch_range(cx: &mut Ctxt, args: &Args) -> Option<u16> {
    let prefetch = args.prefetch.as_ref()?;
    match u16::try_from(prefetch.value) {
        Ok(0) => cx.error_spanned_by(
            prefetch,
            "`prefetch` must be from 1 to 65535: 0 means unlimited, and the broker would \
             push the whole queue into memory",
        ),
        Ok(value) => return Some(value),
        Err(_) => cx.error_spanned_by(
            prefetch,
            "`prefetch` must be from 1 to 65535 (the AMQP prefetch count is 16 bits)",
        ),
    }
    None
}

/// Handlers beyond the prefetch would never get a message; zero handlers would never ack.
fn check_concurrency_range(cx: &mut Ctxt, args: &Args) -> Option<u16> {
    let concurrency = args.concurrency.as_ref()?;
    if concurrency.value == 0 {
        cx.error_spanned_by(
            concurrency,
            "`concurrency` must be at least 1: it is how many messages are handled at once",
        );
        return None;
    }
    let (max, prefetch) = match &args.prefetch {
        Some(prefetch) if (1..=u64::from(u16::MAX)).contains(&prefetch.value) => {
            (prefetch.value, format!("`prefetch = {}`", prefetch.value))
        }
        // An invalid prefetch has its own error; comparing with it would only add noise.
        Some(_) => return None,
        None if args.has("prefetch") => return None,
        None => (
            DEFAULT_PREFETCH,
            format!("the default `prefetch = {DEFAULT_PREFETCH}`"),
        ),
    };
    if concurrency.value > max {
        cx.error_spanned_by(
            concurrency,
            format!(
                "`concurrency = {}` exceeds {prefetch}: at most {max} messages are delivered \
                 at once, so the extra handlers would sit idle; raise `prefetch` to at least \
                 {}, or lower `concurrency`",
                concurrency.value, concurrency.value
            ),
        );
        return None;
    }
    u16::try_from(concurrency.value).ok()
}

/// The runtime counts attempts in a `u32`.
fn check_max_retries_range(cx: &mut Ctxt, args: &Args) -> Option<u32> {
    let retries = args.max_retries.as_ref()?;
    match u32::try_from(retries.value) {
        Ok(value) => Some(value),
        Err(_) => {
            cx.error_spanned_by(
                retries,
                format!("`max_retries` must be at most {}", u32::MAX),
            );
            None
        }
    }
}
