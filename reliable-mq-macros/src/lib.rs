//! The `#[consumer]` attribute of [reliable-mq](https://docs.rs/reliable-mq).
//!
//! Use it through the `reliable-mq` crate (`use reliable_mq::consumer;`): the generated
//! code refers to `::reliable_mq`, not to this crate.
//!
//! The macro reads the attribute into the shared consumer model (`attr`), reports the
//! model's rules on the user's tokens (`check`), checks the function's signature (`sig`),
//! collecting every error (`ctxt`), then emits the spec and the adapter (`expand`). The
//! rules themselves live in `reliable-mq-model`, which the runtime applies too; all
//! behaviour lives in the runtime.

mod attr;
mod check;
mod ctxt;
mod expand;
mod sig;

use proc_macro::TokenStream;

/// Turns an `async fn` into a reliable RabbitMQ consumer.
///
/// (The example below is compiled and run as `tests/ui/pass/doc_example.rs`; a proc-macro
/// crate cannot doc-test its own expansion against the runtime crate.)
///
/// ```text
/// use reliable_mq::{consumer, HandlerError};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64, qty: u32 }
///
/// #[consumer(queue = "orders", exchange = "shop", routing_key = "order.created",
///            dlx = "orders.dlx", idempotent, prefetch = 64, concurrency = 16)]
/// async fn reserve_stock(order: Order) -> Result<(), HandlerError> {
///     if order.qty == 0 {
///         return Err(HandlerError::reject("empty order")); // straight to the DLQ
///     }
///     Ok(()) // acked
/// }
///
/// #[tokio::main]
/// async fn main() -> Result<(), reliable_mq::Error> {
///     reliable_mq::run().await // runs every `#[consumer]` in the binary
/// }
/// ```
///
/// (This example is compiled by the crate's UI tests, `tests/ui/pass`.)
///
/// # The function
///
/// `async fn name(payload: T, extractors...) -> Result<(), E>`, where `T` is any
/// `serde::Deserialize` type (the body is JSON) and `E` is `HandlerError`, any
/// `std::error::Error + Send + Sync + 'static` (`?` works), or `anyhow::Error` with
/// reliable-mq's `anyhow` feature. After the payload, in any order: `delivery: &Delivery`
/// (at most once) and any number of `State(s): State<S>` extractors, each a clone of the
/// state registered with `App::with_state` (a consumer whose state is not registered stops
/// start-up with an error naming it). `Ok` acks the message; `HandlerError::retry(e)` and
/// plain errors retry it after a delay; `HandlerError::reject(e)` dead-letters it at once.
///
/// The function stays callable as written. Next to it the macro defines a type of the
/// same name whose `SPEC` constant is the consumer's
/// `ConsumerSpec`: `App::consumer(name::SPEC)` registers it by hand, and `reliable_mq::run()`
/// finds every annotated function on its own.
///
/// # Keys
///
/// | key | value | default |
/// |---|---|---|
/// | `queue` | **required**: durable queue to consume | - |
/// | `dlx` | **required**: dead-letter exchange for failed messages | - |
/// | `dlq` | queue bound to `dlx` | `"{queue}.dlq"` |
/// | `exchange` | durable exchange to bind the queue to | default exchange |
/// | `exchange_type` | `"direct"`, `"topic"`, `"fanout"` or `"headers"` (needs `exchange`) | `"topic"` |
/// | `routing_key` | binding key (needs `exchange`; not with fanout or headers) | queue name |
/// | `queue_type` | `"classic"` or `"quorum"` | `"classic"` |
/// | `delivery_limit` | quorum queues only: redeliveries before the broker dead-letters | `max_retries + 5` |
/// | `prefetch` | messages delivered ahead of acks, `1..=65535` | `32` |
/// | `concurrency` | messages handled at once, `1..=prefetch` | `1` |
/// | `max_retries` | delayed retries before dead-lettering | `3` |
/// | `retry_delay` | delay before the first retry | `"1s"` |
/// | `retry_backoff` | `"fixed"`, `"exponential"` (x2) or `"exponential:N"` (N in 2..=10); every delay capped at one hour | `"exponential"` |
/// | `timeout` | deadline of one handler call; past it the call is cancelled and retried | `"30s"` |
/// | `idempotent` | flag, no value: skip messages whose `message_id` was handled | off |
/// | `dedup_ttl` | how long handled ids are remembered (needs `idempotent` or `inbox`) | `"24h"` |
/// | `single_active_consumer` | flag: declare the queue with `x-single-active-consumer`; one consumer of all instances gets its messages, in order until one fails: a retry comes back behind later messages (needs `concurrency` 1) | off |
/// | `priority` | consumer priority, the `x-priority` argument of `basic.consume` (0..=2147483647) | broker default 0 |
/// | `exclusive` | flag: exclusive subscription; not on quorum queues | off |
/// | `inbox` | flag: dedup by `message_id` in the handler's PostgreSQL transaction, lent as `tx: &mut InboxTx` (runtime feature `postgres`; not with `idempotent`) | off |
/// | `schema` | flag: put the payload type's JSON Schema in the AsyncAPI export; the type must derive `schemars::JsonSchema` and reliable-mq needs its `schemars` feature (a compile error says which is missing) | off |
/// | `crate` | the path the runtime is imported as, for a renamed dependency | `"::reliable_mq"` |
///
/// Durations are strings of one integer and a unit: `"500ms"`, `"30s"`, `"5m"`, `"2h"`,
/// `"1d"`. Names (`queue`, `exchange`, `dlx`, `dlq`) must be non-empty, at most 255 bytes
/// and not start with `amq.`; so must the names derived from them (`{queue}.dlq`,
/// `{queue}.retry.{delay}`). `timeout` must stay below RabbitMQ's `consumer_timeout`
/// (30 minutes by default), which would otherwise close the channel under a long handler.
///
/// The rules are those of the shared consumer model, which the runtime applies again at
/// start-up to consumers built by hand: the two cannot disagree.
///
/// # Compile-time checks
///
/// Every mistake is a compile error pointing at the offending token and saying the fix,
/// all of them in one build: unknown or duplicate keys, values of the wrong type, missing
/// `queue` or `dlx`, a `dlx` equal to `exchange` or a `dlq` equal to `queue` (dead letters
/// would loop), a `routing_key` that would be ignored, `concurrency` above `prefetch`,
/// `delivery_limit` on a classic queue, `dedup_ttl` without `idempotent`, `exclusive` on a
/// quorum queue, `single_active_consumer` with `concurrency` above 1, a function that
/// is not `async`, is generic, takes `self` or a parameter that is neither `&Delivery` nor
/// `State<S>`, returns something other than `Result<(), E>`, whose payload type is not
/// `Deserialize`, or whose state type is not `Clone + Send + Sync + 'static`.
#[proc_macro_attribute]
pub fn consumer(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::consumer(args.into(), item.into()).into()
}

#[cfg(test)]
mod tests;
