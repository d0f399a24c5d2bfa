//! State for handlers on the real broker: a `#[consumer]` taking `State<T>` (two types)
//! and `&Delivery` gets the registered values, and a consumer whose state is missing stops
//! start-up with an error naming the consumer and the type.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_mq::{App, Delivery, Error, HandlerError, State, consumer};
use reliable_mq_tests::{Broker, Cleanup, eventually, init_tracing, test_config};

/// The queue of the consumer below: fixed (the attribute needs a literal), so this file is
/// its only user and cleans it up.
const QUEUE: &str = "rmq-test-state-orders";

#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<Vec<(u64, String, u32)>>>);

#[derive(Clone)]
struct Region(String);

#[consumer(queue = "rmq-test-state-orders", dlx = "rmq-test-state-orders.dlx")]
async fn record_order(
    id: u64,
    State(ledger): State<Ledger>,
    delivery: &Delivery,
    region: State<Region>,
) -> Result<(), HandlerError> {
    let mut entries = ledger
        .0
        .lock()
        .map_err(|_| HandlerError::retry("ledger lock poisoned"))?;
    entries.push((id, region.0.0.clone(), delivery.attempt()));
    Ok(())
}

/// A consumer that is never started with its state: its queue must never be declared.
#[consumer(queue = "rmq-test-state-missing", dlx = "rmq-test-state-missing.dlx")]
async fn needs_region(_id: u64, State(_region): State<Region>) -> Result<(), HandlerError> {
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_gets_its_state_and_the_delivery() {
    init_tracing();
    let _cleanup = Cleanup::consumer(QUEUE, &["1s", "2s", "4s"], &[]);
    let ledger = Ledger::default();
    let app = App::new(test_config(QUEUE))
        .consumer(record_order::SPEC)
        .with_state(ledger.clone())
        .with_state(Region("eu-west".into()))
        .start()
        .await
        .expect("starts: both state types are registered");

    let broker = Broker::connect().await;
    for id in 1..=3u64 {
        broker
            .publish_json("", QUEUE, &serde_json::json!(id), &format!("state-{id}"))
            .await;
    }
    let handled = eventually(Duration::from_secs(10), || {
        let ledger = ledger.clone();
        async move { ledger.0.lock().map(|e| e.len() == 3).unwrap_or(false) }
    })
    .await;
    app.shutdown().await.expect("clean shutdown");
    assert!(handled, "three orders handled");
    let mut entries = ledger.0.lock().expect("ledger").clone();
    entries.sort();
    assert_eq!(
        entries,
        vec![
            (1, "eu-west".to_owned(), 1),
            (2, "eu-west".to_owned(), 1),
            (3, "eu-west".to_owned(), 1)
        ]
    );
}

#[tokio::test]
async fn a_missing_state_stops_start_up_naming_the_consumer_and_the_type() {
    // Only `Ledger` is registered: `Region` is missing. Nothing is declared on the broker.
    let err = App::new(test_config("state-missing"))
        .consumer(needs_region::SPEC)
        .with_state(Ledger::default())
        .start()
        .await
        .expect_err("must not start");
    match &err {
        Error::MissingState {
            consumer,
            type_name,
        } => {
            assert!(consumer.ends_with("::needs_region"), "{consumer}");
            assert!(type_name.ends_with("::Region"), "{type_name}");
        }
        other => panic!("expected MissingState, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("App::with_state") && message.contains("Region"),
        "{message}"
    );
    let broker = Broker::connect().await;
    assert!(
        !broker.queue_exists("rmq-test-state-missing").await,
        "nothing declared before the check"
    );
}
