//! A user's handler tested with the in-memory harness (`reliable_mq::testing`): success,
//! retry, dead letter, with RabbitMQ's address pointing at a port where nothing listens.
//! The runtime's own pipeline runs; only the transport is in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_mq::testing::TestApp;
use reliable_mq::{Config, Delivery, HandlerError, Publisher, State, consumer};
use reliable_mq_tests::recording::{recording_consumer, start_recording};
use serde::{Deserialize, Serialize};

#[derive(Clone, Default)]
struct Inventory(Arc<Mutex<HashMap<String, u32>>>);

impl Inventory {
    fn with(sku: &str, qty: u32) -> Self {
        let inventory = Self::default();
        if let Ok(mut stock) = inventory.0.lock() {
            stock.insert(sku.to_owned(), qty);
        }
        inventory
    }

    fn left(&self, sku: &str) -> Option<u32> {
        self.0.lock().ok()?.get(sku).copied()
    }
}

#[derive(Serialize, Deserialize)]
struct Order {
    sku: String,
    qty: u32,
}

#[consumer(
    queue = "orders",
    exchange = "shop",
    routing_key = "order.*",
    dlx = "orders.dlx",
    max_retries = 3,
    retry_delay = "1s"
)]
async fn reserve_stock(
    order: Order,
    State(stock): State<Inventory>,
    delivery: &Delivery,
) -> Result<(), HandlerError> {
    let mut stock = stock
        .0
        .lock()
        .map_err(|_| HandlerError::retry("inventory lock poisoned"))?;
    let Some(have) = stock.get(&order.sku).copied() else {
        return Err(HandlerError::reject(format!("unknown sku {}", order.sku)));
    };
    if have < order.qty {
        return Err(HandlerError::retry(format!(
            "only {have} of {} left (attempt {})",
            order.sku,
            delivery.attempt()
        )));
    }
    stock.insert(order.sku, have - order.qty);
    Ok(())
}

/// An AMQP URL on a loopback port where nothing listens.
fn closed_port_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(1);
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

fn order(sku: &str, qty: u32) -> Order {
    Order {
        sku: sku.into(),
        qty,
    }
}

/// Publish an order as the shop does.
async fn publish_order(app: &mut TestApp, sku: &str, qty: u32) {
    app.publish("shop", "order.created", &order(sku, qty))
        .await
        .expect("published");
}

fn app(inventory: &Inventory) -> TestApp {
    let config = Config::default().with_amqp_url(closed_port_url());
    TestApp::new()
        .with_config(config)
        .consumer(reserve_stock::SPEC)
        .with_state(inventory.clone())
}

#[tokio::test]
async fn the_amqp_url_points_at_a_closed_port() {
    let url = closed_port_url();
    assert!(
        Publisher::connect(&url).await.is_err(),
        "nothing listens on {url}"
    );
}

#[tokio::test]
async fn success_retry_and_dead_letter_without_a_broker() {
    let started = std::time::Instant::now();
    let inventory = Inventory::with("apple", 5);
    let mut app = app(&inventory);

    publish_order(&mut app, "apple", 2).await;
    publish_order(&mut app, "apple", 10).await;
    publish_order(&mut app, "pear", 1).await;
    app.publish_raw(
        "shop",
        "order.created",
        b"{not json".to_vec(),
        reliable_mq::lapin::BasicProperties::default().with_content_type("application/json".into()),
    )
    .await
    .expect("published");
    app.run_until_idle().await;

    // Success: the stock went down once.
    assert_eq!(app.handled("orders"), 1);
    assert_eq!(inventory.left("apple"), Some(3));

    // Retry: three delayed attempts, 1 s, 2 s, 4 s, then the DLQ.
    let retries = app.retries("orders");
    let delays: Vec<Duration> = retries.iter().map(|r| r.delay).collect();
    assert_eq!(
        delays,
        [1, 2, 4].map(Duration::from_secs).to_vec(),
        "{retries:?}"
    );
    assert_eq!(
        retries.iter().map(|r| r.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );

    // Dead letters: out of stock after the retries, the unknown sku at once, the bad JSON.
    let dead = app.dead_letters("orders");
    let kinds: Vec<String> = dead
        .iter()
        .filter_map(|m| m.header("x-error-kind"))
        .collect();
    assert_eq!(dead.len(), 3, "{kinds:?}");
    for kind in ["rejected", "decode", "retries-exhausted"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    let exhausted = dead
        .iter()
        .find(|m| m.header("x-error-kind").as_deref() == Some("retries-exhausted"))
        .expect("the out-of-stock order");
    assert_eq!(exhausted.header("x-attempts").as_deref(), Some("4"));
    assert_eq!(
        exhausted.header("x-original-exchange").as_deref(),
        Some("shop")
    );
    assert!(
        exhausted
            .header("x-exception-message")
            .is_some_and(|m| m.contains("only 3 of apple left"))
    );
    let order: Order = exhausted.json().expect("the original body");
    assert_eq!(order.qty, 10);

    eprintln!(
        "no_broker: 4 messages (success, 3 retries then DLQ, reject, decode failure) in {:?} of wall time",
        started.elapsed()
    );
    app.shutdown().await.expect("stops");
}

#[tokio::test]
async fn a_restock_between_retries_lets_the_order_through() {
    let inventory = Inventory::with("apple", 1);
    let mut app = app(&inventory);
    publish_order(&mut app, "apple", 2).await;
    // The first attempt fails; restock while the message waits in the 1 s tier.
    while app.retries("orders").is_empty() {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Ok(mut stock) = inventory.0.lock() {
        stock.insert("apple".into(), 5);
    }
    app.run_until_idle().await;
    assert_eq!(app.handled("orders"), 1);
    assert_eq!(app.retries("orders").len(), 1);
    assert!(app.dead_letters("orders").is_empty());
    assert_eq!(inventory.left("apple"), Some(3));
}

#[tokio::test]
async fn a_message_delivered_twice_runs_twice_without_dedup() {
    let inventory = Inventory::with("apple", 10);
    let mut app = app(&inventory);
    app.deliver_next_twice();
    publish_order(&mut app, "apple", 1).await;
    app.run_until_idle().await;
    // Not idempotent: both copies run.
    assert_eq!(app.handled("orders"), 2);
    assert_eq!(inventory.left("apple"), Some(8));
}

/// A dropped connection mid-handler: the delivery comes back redelivered and is handled
/// on the new session; nothing is lost.
#[tokio::test]
async fn a_dropped_connection_redelivers_what_was_unacked() {
    let inventory = Inventory::with("apple", 10);
    let mut app = app(&inventory);
    app.redeliver_next();
    publish_order(&mut app, "apple", 1).await;
    app.run_until_idle().await;
    // The first ack was lost: the message ran again (not idempotent), flagged redelivered.
    assert_eq!(app.handled("orders"), 2);
    app.drop_connection();
    publish_order(&mut app, "apple", 1).await;
    app.run_until_idle().await;
    assert_eq!(app.handled("orders"), 3);
    assert!(
        app.stats("orders").sessions >= 2,
        "the consumer reconnected"
    );
    assert_eq!(inventory.left("apple"), Some(7));
}

/// The order in which one consumer (concurrency 1, prefetch 1) saw `n` messages on a
/// broker seeded with `seed`, or in publish order without one.
async fn order_seen(seed: Option<u64>, n: u32) -> Vec<u32> {
    let app = match seed {
        Some(seed) => TestApp::seeded(seed),
        None => TestApp::new(),
    };
    let consumer = recording_consumer("numbers", |_: &u32, _| Ok(()));
    let (mut app, seen) = start_recording::<u32>(app, consumer).await;
    // Publish all before the consumer takes any: with a prefetch of 1 it holds one.
    for i in 0..n {
        app.publish("", "numbers", &i).await.expect("published");
    }
    app.run_until_idle().await;
    seen.payloads()
}

#[tokio::test]
async fn a_seed_gives_a_reproducible_order_of_its_own() {
    let fifo = order_seen(None, 12).await;
    assert_eq!(fifo, (0..12).collect::<Vec<_>>());
    let a = order_seen(Some(7), 12).await;
    let b = order_seen(Some(7), 12).await;
    assert_eq!(a, b, "the same seed, the same order");
    assert_ne!(a, fifo, "seed 7 shuffles");
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, fifo, "every message once");
}

/// What a handler publishes is recorded, routed or not.
#[tokio::test]
async fn what_handlers_publish_is_recorded() {
    use reliable_mq::{ConsumerConfig, delivery_handler_fn};
    let consumer = ConsumerConfig::new(
        "relay",
        "relay.dlx",
        delivery_handler_fn(|n: u32, d: Arc<Delivery>| async move {
            let publisher = d
                .publisher()
                .ok_or_else(|| HandlerError::reject("no publisher"))?;
            publisher
                .publish("", "relayed", &(n * 10))
                .await
                .map_err(HandlerError::retry)?;
            Ok::<(), HandlerError>(())
        }),
    );
    let mut app = TestApp::new().consumer(consumer);
    app.start().await.expect("starts");
    app.broker().declare_queue("relayed", "", "");
    app.publish("", "relay", &4u32).await.expect("published");
    app.run_until_idle().await;
    let published = app.published();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].routing_key, "relayed");
    assert_eq!(published[0].json::<u32>().ok(), Some(40));
    assert_eq!(app.broker().messages("relayed").len(), 1);
}

/// A failed publish and a nacked confirm are retried by the publisher with the same
/// `message_id`, the test's and the settle copy's alike: nothing lost, nothing doubled.
#[tokio::test]
async fn failed_publishes_and_nacked_confirms_are_retried() {
    let inventory = Inventory::with("apple", 1);
    let mut app = app(&inventory);
    app.fail_next_publish();
    app.fail_next_confirm();
    let id = app
        .publish(
            "shop",
            "order.created",
            &Order {
                sku: "pear".into(),
                qty: 1,
            },
        )
        .await
        .expect("confirmed after two failed attempts");
    // The dead-letter copy of the rejected order meets the next two faults.
    app.fail_next_publish();
    app.fail_next_confirm();
    app.run_until_idle().await;
    let dead = app.dead_letters("orders");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id(), Some(id.clone()));
    assert_eq!(dead[0].header("x-error-kind").as_deref(), Some("rejected"));
    let sent = app
        .broker()
        .published()
        .iter()
        .filter(|p| p.properties.message_id().as_ref().map(|m| m.as_str()) == Some(id.as_str()))
        .count();
    assert_eq!(sent, 2, "the order once, its dead letter once");
}

/// `single_active_consumer` keeps the queue's order only until a message fails: its retry
/// waits in a retry tier and comes back behind the messages published after it (see the
/// README, "Limits you should know"). A handler that needs order must not return a
/// retryable error for a message it cannot yet handle.
#[tokio::test]
async fn a_single_active_consumer_keeps_order_until_a_message_fails() {
    let consumer = recording_consumer("ledger", |n: &u32, attempt| {
        if *n == 1 && attempt == 1 {
            Err(HandlerError::retry("the first attempt fails"))
        } else {
            Ok(())
        }
    })
    .with_single_active_consumer();
    let (mut app, seen) = start_recording::<u32>(TestApp::new(), consumer).await;
    for n in 0..4u32 {
        app.publish("", "ledger", &n).await.expect("published");
    }
    app.run_until_idle().await;
    assert_eq!(
        seen.calls(),
        [(0, 1), (1, 1), (2, 1), (3, 1), (1, 2)],
        "in order until 1 failed; its retry came back after 2 and 3"
    );
    assert_eq!(app.handled("ledger"), 4);
}
