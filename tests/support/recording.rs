//! A consumer whose handler records what it is given, on the in-memory harness: for tests
//! that look at how many messages a handler saw, and in which order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_mq::testing::TestApp;
use reliable_mq::{ConsumerConfig, Delivery, HandlerError, RetryBackoff, delivery_handler_fn};
use serde::de::DeserializeOwned;

/// What the handler saw: each call's payload and attempt, in call order.
#[derive(Debug)]
pub struct Seen<T>(Arc<Mutex<Vec<(T, u32)>>>);

impl<T> Clone for Seen<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T> Default for Seen<T> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<T: Clone> Seen<T> {
    /// Each call's payload, in call order.
    pub fn payloads(&self) -> Vec<T> {
        self.calls().into_iter().map(|(p, _)| p).collect()
    }

    /// Each call's payload and attempt (1 = the first delivery), in call order.
    pub fn calls(&self) -> Vec<(T, u32)> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// A consumer of `queue` (DLX `{queue}.dlx`, prefetch 1) whose handler records every call
/// in its [`Seen`] state, then answers with `outcome(payload, attempt)`. Retries wait 1 s,
/// 2 s, 4 s ... (three at most): nothing on the paused clock.
pub fn recording_consumer<T, F>(queue: &str, outcome: F) -> ConsumerConfig
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
    F: Fn(&T, u32) -> Result<(), HandlerError> + Clone + Send + Sync + 'static,
{
    ConsumerConfig::new(
        queue,
        format!("{queue}.dlx"),
        delivery_handler_fn(move |payload: T, d: Arc<Delivery>| {
            let outcome = outcome.clone();
            async move {
                let seen = d
                    .state::<Seen<T>>()
                    .ok_or_else(|| HandlerError::reject("no Seen state"))?;
                seen.0
                    .lock()
                    .map_err(|_| HandlerError::retry("poisoned"))?
                    .push((payload.clone(), d.attempt()));
                outcome(&payload, d.attempt())
            }
        }),
    )
    .with_prefetch(1)
    .with_retries(
        3,
        Duration::from_secs(1),
        RetryBackoff::Exponential { factor: 2 },
    )
}

/// A started [`TestApp`] (on `app`'s broker: `TestApp::new()`, `TestApp::seeded(n)`) with
/// `consumer` (from [`recording_consumer`] for payloads `T`) and its [`Seen`] state.
pub async fn start_recording<T>(app: TestApp, consumer: ConsumerConfig) -> (TestApp, Seen<T>)
where
    T: Send + Sync + 'static,
{
    let seen = Seen::<T>::default();
    let mut app = app.consumer(consumer).with_state(seen.clone());
    app.start().await.expect("the test app starts");
    (app, seen)
}
