//! The user's function behind a trait: decode the body, call, turn the result into a
//! [`HandlerError`] the settle step understands.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::{Delivery, HandlerError};

/// The future a [`Handler`] returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

/// Handles one delivery: decode, run the user's code, report the outcome.
///
/// `#[consumer]` implements it for you; [`handler_fn`] wraps a closure for consumers
/// built by hand.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a reliable-mq handler",
    note = "annotate an `async fn(T) -> Result<(), E>` with `#[consumer(...)]`, or wrap a closure with `reliable_mq::handler_fn`"
)]
pub trait Handler: Send + Sync + 'static {
    /// Decode `delivery` and run the handler on it.
    fn call(&self, delivery: Arc<Delivery>) -> HandlerFuture;

    /// The state types the handler takes (`State<T>` parameters), checked at start-up.
    #[doc(hidden)]
    fn states(&self) -> Vec<crate::state::StateType> {
        Vec::new()
    }

    /// The Rust type message bodies decode into (`std::any::type_name`), named in the
    /// AsyncAPI export ([`crate::App::asyncapi`]). `None` when not known: the export then
    /// describes the payload as any JSON value.
    fn payload_type(&self) -> Option<&'static str> {
        None
    }

    /// The payload type's JSON Schema, with its subschemas under `components.schemas`
    /// (`#[consumer(schema)]` with feature `schemars`), for the AsyncAPI export. `None`:
    /// the export describes the payload by its type name only.
    fn payload_schema(&self) -> Option<serde_json::Value> {
        None
    }
}

/// A message body type: anything serde can decode from JSON.
#[diagnostic::on_unimplemented(
    message = "the payload type `{Self}` cannot be decoded from a message",
    label = "this type must implement `serde::Deserialize` (and be `Send + 'static`)",
    note = "add `#[derive(serde::Deserialize)]` to `{Self}`"
)]
pub trait Payload: DeserializeOwned + Send + 'static {}
impl<T: DeserializeOwned + Send + 'static> Payload for T {}

/// What a handler function may return: `Result<(), E>` with `E` convertible to
/// [`HandlerError`]: `HandlerError` itself, any `std::error::Error + Send + Sync +
/// 'static`, and with the `anyhow` feature `anyhow::Error` (all retryable).
///
/// `Box<dyn Error + Send + Sync>` is not an `Error` itself (a std coherence rule stops us
/// from accepting it directly): map it with `.map_err(HandlerError::retry)`.
#[diagnostic::on_unimplemented(
    message = "a consumer must return `Result<(), E>` with `E` convertible to `HandlerError`, not `{Self}`",
    note = "`E` can be `HandlerError`, any `std::error::Error + Send + Sync + 'static`, or `anyhow::Error` with reliable-mq's `anyhow` feature",
    note = "for any other error type, convert it: `.map_err(HandlerError::retry)?` (or `HandlerError::reject` for a permanent failure)"
)]
pub trait IntoHandlerResult {
    /// Convert to the runtime's result type.
    fn into_handler_result(self) -> Result<(), HandlerError>;
}

#[diagnostic::do_not_recommend]
impl<E: IntoHandlerError> IntoHandlerResult for Result<(), E> {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        self.map_err(IntoHandlerError::into_handler_error)
    }
}

/// An error type a handler may return. Its own trait (rather than a bound on `From`), so
/// that an error type that does not qualify is reported as such, with the fix, instead of
/// as a missing `std::error::Error` impl deep inside a conversion.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a consumer's error type",
    label = "a consumer returns `Result<(), E>` with `E` = `HandlerError`, a `std::error::Error + Send + Sync + 'static`, or `anyhow::Error` (feature `anyhow`)",
    note = "convert it in the handler: `.map_err(HandlerError::retry)?` (or `HandlerError::reject` for a permanent failure)"
)]
pub trait IntoHandlerError {
    /// Convert to the runtime's error type.
    fn into_handler_error(self) -> HandlerError;
}

impl IntoHandlerError for HandlerError {
    fn into_handler_error(self) -> HandlerError {
        self
    }
}

// `do_not_recommend`: an error type that does not qualify is reported against
// `IntoHandlerError` (with its fix), not as a missing `std::error::Error` impl.
#[cfg(not(feature = "anyhow"))]
#[diagnostic::do_not_recommend]
impl<E: std::error::Error + Send + Sync + 'static> IntoHandlerError for E {
    fn into_handler_error(self) -> HandlerError {
        HandlerError::from(self)
    }
}

#[cfg(feature = "anyhow")]
#[diagnostic::do_not_recommend]
impl<E: Into<anyhow::Error>> IntoHandlerError for E {
    fn into_handler_error(self) -> HandlerError {
        HandlerError::from(self)
    }
}

/// Decode the body of `delivery` as JSON into `T`.
///
/// A content type other than JSON (when one is set), a `content_encoding` other than
/// none, `identity` or a charset name (`utf-8`, which some publishers put there), or a body
/// that does not decode is a [`HandlerError`] of kind `decode`: the message goes to the
/// DLQ, never back to the queue.
pub fn decode<T: Payload>(delivery: &Delivery) -> Result<T, HandlerError> {
    if let Some(encoding) = delivery.properties.content_encoding()
        && !is_plain_encoding(encoding.as_str())
    {
        return Err(HandlerError::decode(format!(
            "content_encoding `{}` is not supported: the body is read as plain JSON; publish it without a content_encoding",
            encoding.as_str().escape_debug()
        )));
    }
    if let Some(content_type) = delivery.content_type()
        && !is_json(content_type)
    {
        return Err(HandlerError::decode(format!(
            "content type `{content_type}` is not JSON; publish with `application/json`"
        )));
    }
    serde_json::from_slice(delivery.body()).map_err(|e| {
        HandlerError::decode(format!(
            "body is not a valid `{}`: {e}",
            std::any::type_name::<T>()
        ))
    })
}

/// Whether a `content_encoding` leaves the body as it is. `utf-8` is a charset, not an
/// encoding, but publishers (Spring AMQP among them) set it on plain text bodies.
fn is_plain_encoding(encoding: &str) -> bool {
    let e = encoding.trim();
    e.is_empty()
        || ["identity", "utf-8", "utf8"]
            .iter()
            .any(|plain| e.eq_ignore_ascii_case(plain))
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

/// Decode the body, then start `f` on the payload; a decode failure never reaches `f`.
fn decode_then<T, Fut, R>(
    delivery: Arc<Delivery>,
    f: impl FnOnce(T, Arc<Delivery>) -> Fut,
) -> HandlerFuture
where
    T: Payload,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoHandlerResult,
{
    match decode::<T>(&delivery) {
        Ok(payload) => {
            let fut = f(payload, delivery);
            Box::pin(async move { fut.await.into_handler_result() })
        }
        Err(e) => Box::pin(std::future::ready(Err(e))),
    }
}

/// A [`Handler`] made from a closure `Fn(T) -> impl Future<Output = Result<(), E>>`.
pub struct FnHandler<T, F> {
    f: F,
    _payload: PhantomData<fn() -> T>,
}

/// Wrap a closure as a [`Handler`], for consumers registered by hand.
///
/// ```
/// # use reliable_mq::{handler_fn, HandlerError};
/// let handler = handler_fn(|order: serde_json::Value| async move {
///     if order["qty"] == 0 { return Err(HandlerError::reject("empty order")); }
///     Ok(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<T, F, Fut, R>(f: F) -> FnHandler<T, F>
where
    T: Payload,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoHandlerResult,
{
    FnHandler {
        f,
        _payload: PhantomData,
    }
}

impl<T, F, Fut, R> Handler for FnHandler<T, F>
where
    T: Payload,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoHandlerResult,
{
    fn call(&self, delivery: Arc<Delivery>) -> HandlerFuture {
        decode_then(delivery, |payload, _| (self.f)(payload))
    }

    fn payload_type(&self) -> Option<&'static str> {
        Some(std::any::type_name::<T>())
    }
}

/// A [`Handler`] made from a closure that also sees the [`Delivery`].
pub struct FnDeliveryHandler<T, F> {
    f: F,
    _payload: PhantomData<fn() -> T>,
}

/// Like [`handler_fn`], for closures `Fn(T, Arc<Delivery>) -> impl Future`.
pub fn delivery_handler_fn<T, F, Fut, R>(f: F) -> FnDeliveryHandler<T, F>
where
    T: Payload,
    F: Fn(T, Arc<Delivery>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoHandlerResult,
{
    FnDeliveryHandler {
        f,
        _payload: PhantomData,
    }
}

impl<T, F, Fut, R> Handler for FnDeliveryHandler<T, F>
where
    T: Payload,
    F: Fn(T, Arc<Delivery>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoHandlerResult,
{
    fn call(&self, delivery: Arc<Delivery>) -> HandlerFuture {
        decode_then(delivery, |payload, delivery| (self.f)(payload, delivery))
    }

    fn payload_type(&self) -> Option<&'static str> {
        Some(std::any::type_name::<T>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/vnd.shop.order+json"));
        assert!(!is_json("text/plain"));
    }

    #[test]
    fn only_plain_encodings_are_read() {
        for plain in ["", "identity", "UTF-8", "utf8"] {
            assert!(is_plain_encoding(plain), "{plain}");
        }
        for packed in ["gzip", "deflate", "br", "x-custom"] {
            assert!(!is_plain_encoding(packed), "{packed}");
        }
        let d = Delivery::for_test(b"{}".to_vec());
        let mut gz = Delivery::for_test(b"{}".to_vec());
        gz.properties = gz.properties.with_content_encoding("gzip".into());
        assert!(decode::<serde_json::Value>(&d).is_ok());
        let e = decode::<serde_json::Value>(&gz).expect_err("gzip is refused");
        assert_eq!(e.kind(), crate::FailureKind::Decode);
        assert!(e.message().contains("content_encoding `gzip`"));
    }
}
