//! One handler call: deadline, panic caught, failure classified.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use crate::failure::FailureKind;
use crate::handler::Handler;
use crate::{Delivery, HandlerError};

/// Run `handler` on `delivery` within `timeout`. A panic or a timeout becomes a retryable
/// [`HandlerError`] of kind `panic` / `timeout`; the consumer keeps running.
pub(crate) async fn invoke(
    handler: &dyn Handler,
    delivery: Arc<Delivery>,
    timeout: Duration,
) -> Result<(), HandlerError> {
    // Building the future runs user code too (decode, the adapter), so catch panics there.
    let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(delivery))) {
        Ok(fut) => fut,
        Err(payload) => return Err(panicked(payload)),
    };
    match tokio::time::timeout(timeout, AssertUnwindSafe(fut).catch_unwind()).await {
        Ok(Ok(result)) => result,
        Ok(Err(payload)) => Err(panicked(payload)),
        Err(_) => Err(HandlerError::new(
            FailureKind::Timeout,
            format!("handler did not finish within {timeout:?}"),
        )),
    }
}

fn panicked(payload: Box<dyn std::any::Any + Send>) -> HandlerError {
    let detail = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    HandlerError::new(FailureKind::Panic, format!("handler panicked: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler_fn;

    fn delivery(body: &str) -> Arc<Delivery> {
        Arc::new(Delivery::for_test(body.as_bytes().to_vec()))
    }

    #[tokio::test]
    async fn classifies_outcomes() {
        let h = handler_fn(|n: u32| async move {
            match n {
                0 => Ok(()),
                1 => Err(HandlerError::reject("no")),
                2 => panic!("boom"),
                _ => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(())
                }
            }
        });
        let t = Duration::from_millis(50);
        assert!(invoke(&h, delivery("0"), t).await.is_ok());
        let reject = invoke(&h, delivery("1"), t).await.expect_err("must fail");
        assert_eq!(reject.kind(), FailureKind::Rejected);
        let panic = invoke(&h, delivery("2"), t).await.expect_err("must fail");
        assert_eq!(panic.kind(), FailureKind::Panic);
        assert!(panic.message().contains("boom"));
        let slow = invoke(&h, delivery("3"), t).await.expect_err("must fail");
        assert_eq!(slow.kind(), FailureKind::Timeout);
        let bad = invoke(&h, delivery("\"x\""), t)
            .await
            .expect_err("must fail");
        assert_eq!(bad.kind(), FailureKind::Decode);
    }
}
