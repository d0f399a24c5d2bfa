//! The consumer model of reliable-mq: every attribute key, its default, the duration
//! syntax, the names derived from a consumer (DLQ, retry tiers, consumer tag) and the
//! rules a consumer must satisfy, in one place.
//!
//! Both sides use this crate: the `#[consumer]` macro at compile time (it maps each
//! [`Problem`]'s key to the tokens the user wrote) and the runtime at start-up (for
//! consumers built by hand, and to replay the macro's settings). A rule therefore cannot
//! say one thing in the macro and another at run time; the crate's agreement test puts
//! every `tests/ui` case through both.
//!
//! Not a public API of its own: use it through `reliable-mq`, which re-exports the kinds.

#![forbid(unsafe_code)]

mod consumer;
pub mod defaults;
mod duration;
mod kinds;
mod names;

pub use consumer::{ConsumerModel, Key, Problem, Site, Value};
pub use duration::{format_duration, parse_duration};
pub use kinds::{ExchangeKind, QueueKind, RetryBackoff};
pub use names::{MAX_NAME_BYTES, RetryLadder, consumer_tag, tier_queue_name};
