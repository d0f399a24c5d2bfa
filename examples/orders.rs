//! The demo: a small order service showing the reliability story end to end.
//!
//! ```text
//! cargo run --example orders            # publish a batch, show what happened, clean up, exit
//! cargo run --example orders -- --serve # keep consuming until Ctrl-C (queues are kept),
//!                                       # health and metrics on http://127.0.0.1:9090
//! ```
//!
//! Two consumers: `reserve_stock` (idempotent, retried) reserves stock for each order in
//! a stock repository it gets as `State<Stock>`, and emits a `stock.reserved` event from
//! inside the handler; `notify_customer` consumes that event. The batch contains ordinary orders plus the cases that break hand-written
//! consumers: a duplicate, a transient failure, a permanently invalid order and a
//! malformed message.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_mq::lapin::{self, BasicProperties};
use reliable_mq::{App, Delivery, HandlerError, PublishOptions, Publisher, State, consumer};
use serde::{Deserialize, Serialize};

const EXCHANGE: &str = "demo.shop";

/// An order, as the shop publishes it (its JSON Schema is in the AsyncAPI export).
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Order {
    /// Order number; also the message id, so a resend is a duplicate.
    id: u64,
    /// Stock keeping unit.
    sku: String,
    /// Units ordered; 0 is invalid.
    qty: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct StockReserved {
    order_id: u64,
    sku: String,
}

/// The stock repository handlers reserve in: in a real service a database pool, here
/// memory. Handlers get a clone as `State<Stock>` (cheap: it shares one `Arc`).
#[derive(Clone, Default)]
struct Stock(Arc<Mutex<StockBook>>);

#[derive(Default)]
struct StockBook {
    /// Units reserved per SKU.
    reserved: BTreeMap<String, u32>,
    /// Orders whose first attempt failed (the "database blip" we simulate once per order).
    blipped: BTreeSet<u64>,
}

/// A plain std error: `?` on it in a handler means "retry later".
#[derive(Debug)]
struct DatabaseBlip;

impl std::fmt::Display for DatabaseBlip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stock database timed out")
    }
}
impl std::error::Error for DatabaseBlip {}

impl Stock {
    fn reserve(&self, order: &Order) -> Result<(), DatabaseBlip> {
        let mut book = self.0.lock().map_err(|_| DatabaseBlip)?;
        if order.sku == "FLAKY" && book.blipped.insert(order.id) {
            return Err(DatabaseBlip);
        }
        *book.reserved.entry(order.sku.clone()).or_default() += order.qty;
        Ok(())
    }

    fn units_reserved(&self) -> u32 {
        self.0
            .lock()
            .map(|book| book.reserved.values().sum())
            .unwrap_or(0)
    }
}

/// Reserve stock for an order, then tell the world.
#[consumer(
    queue = "demo.orders",
    exchange = "demo.shop",
    routing_key = "order.created",
    dlx = "demo.orders.dlx",
    idempotent,
    prefetch = 32,
    concurrency = 4,
    max_retries = 2,
    retry_delay = "500ms",
    timeout = "5s",
    schema
)]
async fn reserve_stock(
    order: Order,
    delivery: &Delivery,
    State(stock): State<Stock>,
) -> Result<(), HandlerError> {
    if order.qty == 0 {
        return Err(HandlerError::reject(format!(
            "order {} has no items",
            order.id
        )));
    }
    stock.reserve(&order)?; // a transient error: retried after 500ms
    println!(
        "  reserve_stock   order {:>2} ({} x {}) attempt {}",
        order.id,
        order.qty,
        order.sku,
        delivery.attempt()
    );
    if let Some(publisher) = delivery.publisher() {
        let event = StockReserved {
            order_id: order.id,
            sku: order.sku.clone(),
        };
        // Same id on every attempt of this order, so a re-run cannot double-notify.
        let id = format!("stock-reserved-{}", order.id);
        publisher
            .publish_with(
                EXCHANGE,
                "stock.reserved",
                &event,
                PublishOptions::with_message_id(id),
            )
            .await?;
    }
    Ok(())
}

/// Tell the customer their order is on its way.
#[consumer(
    queue = "demo.notifications",
    exchange = "demo.shop",
    routing_key = "stock.reserved",
    dlx = "demo.notifications.dlx",
    idempotent
)]
async fn notify_customer(event: StockReserved) -> Result<(), HandlerError> {
    println!(
        "  notify_customer order {:>2} ({} reserved)",
        event.order_id, event.sku
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let serve = std::env::args().any(|a| a == "--serve");
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // Expected handler failures are part of the story printed below.
        .unwrap_or_else(|_| "warn,reliable_mq::consumer=error".into());
    // lapin logs returned messages with their body: keep bodies out of the logs.
    for directive in reliable_mq::Config::QUIET_LAPIN_DIRECTIVES {
        filter = filter.add_directive(directive.parse()?);
    }
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let mut config = reliable_mq::Config::from_env()?;
    if !serve {
        // Each batch run dedups under its own prefix: with REDIS_URL set, the ids of the
        // last run are still remembered (24h), and this run's orders reuse them on purpose.
        let run = uuid::Uuid::now_v7().simple();
        config = config.with_dedup_prefix(format!("reliable-mq-demo:{run}"));
    }
    let stock = Stock::default();
    let app = App::new(config.clone())
        .registered()
        .with_state(stock.clone());
    if std::env::var_os("RELIABLE_MQ_EXPORT").is_some() {
        // The topology export is `run()`'s: it prints the document and exits, touching
        // no broker.
        return Ok(app.run().await?);
    }
    if serve {
        println!("consuming demo.orders and demo.notifications until Ctrl-C");
        return serve_until_ctrl_c(app).await;
    }

    println!("reliable-mq demo: an order service\n");
    let running = app.start().await?;
    let publisher = Publisher::from_config(&config).await?;

    println!(
        "publishing 10 orders (each publish returns after the broker's confirm);\n\
         the consumers handle them as they arrive:"
    );
    let order = |id: u64, sku: &str, qty: u32| Order {
        id,
        sku: sku.to_owned(),
        qty,
    };
    let mut batch: Vec<Order> = (1..=6)
        .map(|id| order(id, &format!("SKU-{}", 100 + id), 1 + (id as u32 % 3)))
        .collect();
    batch.extend([
        // The same order sent twice (a producer retry): handled once.
        order(1, "SKU-101", 2),
        // A transient failure: retried after 500ms, then handled.
        order(7, "FLAKY", 1),
        // A permanently invalid order: straight to the dead-letter queue.
        order(8, "SKU-108", 0),
    ]);
    let mut published = 0;
    for o in &batch {
        // The order id is the message id: a resend of the same order is a duplicate.
        let id = PublishOptions::with_message_id(format!("order-{}", o.id));
        publisher
            .publish_with(EXCHANGE, "order.created", o, id)
            .await?;
        published += 1;
    }
    // A malformed message from a misbehaving producer.
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("order-9".into());
    publisher
        .publish_raw(
            EXCHANGE,
            "order.created",
            b"{\"id\": 9, \"sku\":".to_vec(),
            props,
        )
        .await?;
    published += 1;
    println!("  -- all {published} publishes confirmed --");

    // Wait until every order is settled: 6 + flaky handled, 1 duplicate, 2 dead-lettered.
    let settled = |app: &reliable_mq::RunningApp| {
        let o = app.stats("demo.orders").unwrap_or_default();
        let n = app.stats("demo.notifications").unwrap_or_default();
        o.handled + o.duplicates + o.dead_lettered >= 10 && n.handled >= 7
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !settled(&running) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let o = running.stats("demo.orders").unwrap_or_default();
    let n = running.stats("demo.notifications").unwrap_or_default();
    println!("\nsummary:");
    println!(
        "  reserve_stock   handled {} | duplicates skipped {} | retried {} | dead-lettered {}",
        o.handled, o.duplicates, o.retried, o.dead_lettered
    );
    println!(
        "  notify_customer handled {} | duplicates skipped {}",
        n.handled, n.duplicates
    );
    // Orders 1-6 reserve 1 + id % 3 units each (2+3+1+2+3+1), the flaky order 1 unit:
    // the duplicate of order 1 and the dead letters reserve nothing.
    let units = stock.units_reserved();
    println!("  stock repository: {units} units reserved");
    print_metrics();

    running.shutdown().await?;
    let dead = show_dead_letters(&config.amqp_url, "demo.orders.dlq").await?;
    publisher.close().await;
    cleanup(&config.amqp_url).await?;

    let ok = o.handled == 7
        && o.duplicates == 1
        && o.dead_lettered == 2
        && dead == 2
        && n.handled == 7
        && units == 13;
    println!(
        "\n{}",
        if ok {
            "every message was handled once or dead-lettered with its reason; nothing lost."
        } else {
            "UNEXPECTED: the counts above do not add up (is another demo instance running?)"
        }
    );
    if ok {
        Ok(())
    } else {
        Err("demo counts did not add up".into())
    }
}

/// Print and count what sits in the DLQ, with its reason headers.
async fn show_dead_letters(url: &str, dlq: &str) -> Result<usize, lapin::Error> {
    use lapin::options::BasicGetOptions;
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    println!("\ndead-letter queue {dlq}:");
    let mut count = 0;
    while let Some(msg) = ch
        .basic_get(dlq.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        count += 1;
        let headers = msg.delivery.properties.headers().as_ref();
        let header = |key| reliable_mq::headers::header_str(headers, key);
        println!(
            "  - {} [{}] {}\n      body: {}",
            msg.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str())
                .unwrap_or("?"),
            header(reliable_mq::headers::ERROR_KIND).unwrap_or("?"),
            header(reliable_mq::headers::EXCEPTION_MESSAGE).unwrap_or(""),
            String::from_utf8_lossy(&msg.delivery.data),
        );
    }
    let _ = conn.close(200, "demo done".into()).await;
    Ok(count)
}

/// The counters of the run as `/metrics` serves them (`--serve`), histograms left out.
#[cfg(feature = "observe")]
fn print_metrics() {
    let Some(scrape) = reliable_mq::observe::metrics::render() else {
        return;
    };
    println!("\nmetrics (GET /metrics, counters and gauges):");
    let mut lines: Vec<&str> = scrape
        .lines()
        .filter(|line| {
            let histogram = ["_bucket{", "_sum", "_count"]
                .iter()
                .any(|part| line.contains(part));
            line.starts_with("reliable_mq_") && !histogram
        })
        .collect();
    lines.sort_unstable();
    for line in lines {
        println!("  {line}");
    }
}

#[cfg(not(feature = "observe"))]
fn print_metrics() {}

/// The demo deletes what it declared so it can run again from scratch.
async fn cleanup(url: &str) -> Result<(), lapin::Error> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    for q in [
        "demo.orders",
        "demo.orders.dlq",
        "demo.orders.retry.500ms",
        "demo.orders.retry.1s",
        "demo.notifications",
        "demo.notifications.dlq",
        "demo.notifications.retry.1s",
        "demo.notifications.retry.2s",
        "demo.notifications.retry.4s",
    ] {
        ch.queue_delete(q.into(), QueueDeleteOptions::default())
            .await?;
    }
    for e in [EXCHANGE, "demo.orders.dlx", "demo.notifications.dlx"] {
        ch.exchange_delete(e.into(), ExchangeDeleteOptions::default())
            .await?;
    }
    let _ = conn.close(200, "demo cleaned up".into()).await;
    Ok(())
}

/// `--serve`: consume until Ctrl-C, with the health and metrics endpoint on
/// `RELIABLE_MQ_HTTP_ADDR` (default `127.0.0.1:9090`).
#[cfg(feature = "observe")]
async fn serve_until_ctrl_c(app: App) -> Result<(), Box<dyn std::error::Error>> {
    let running = app.start().await?;
    let addr = std::env::var("RELIABLE_MQ_HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:9090".into());
    let addr = running.serve_http(&addr).await?;
    println!("  curl http://{addr}/health/ready");
    println!("  curl http://{addr}/metrics");
    tokio::signal::ctrl_c().await?;
    Ok(running.shutdown().await?)
}

/// `--serve` without the endpoint (built with `--no-default-features`).
#[cfg(not(feature = "observe"))]
async fn serve_until_ctrl_c(app: App) -> Result<(), Box<dyn std::error::Error>> {
    Ok(app.run().await?)
}
