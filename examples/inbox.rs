//! Exactly once with PostgreSQL: an order service that keeps an `orders` table and emits
//! an `order.recorded` event through the transactional outbox.
//!
//! ```text
//! cargo run --example inbox --features postgres   # publish a batch, show the tables, clean up
//! DATABASE_URL=postgres://user@host/db cargo run --example inbox --features postgres
//! ```
//!
//! `record_order` is an `inbox` consumer: its insert into `orders`, its inbox row and its
//! outbox event commit together, then the message is acked. `audit` is an `inbox` consumer
//! of the events the outbox relay publishes. The batch sends one order twice (a producer
//! retry) and one order whose insert breaks a constraint on the first try: each order is
//! in the table once, and each event is audited once.

use std::time::Duration;

use reliable_mq::postgres::{InboxTx, Outbox, OutboxRelay};
use reliable_mq::{App, Delivery, HandlerError, PublishOptions, Publisher, consumer};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;

const EXCHANGE: &str = "demo.inbox";
/// The demo's tables live in a schema of their own, dropped at the end.
const SCHEMA: &str = "reliable_mq_inbox_demo";

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: i64,
    sku: String,
    qty: i32,
}

#[derive(Debug, Serialize, Deserialize)]
struct OrderRecorded {
    order_id: i64,
    qty: i32,
}

/// Record the order and emit its event, in the inbox's transaction.
#[consumer(
    queue = "demo.inbox.orders",
    exchange = "demo.inbox",
    routing_key = "order.place",
    dlx = "demo.inbox.orders.dlx",
    inbox,
    retry_delay = "500ms"
)]
async fn record_order(
    order: Order,
    tx: &mut InboxTx,
    delivery: &Delivery,
) -> Result<(), HandlerError> {
    // Order 7 is written with a quantity the table refuses on its first attempt only (as
    // a transient failure would): the transaction rolls back, the retry records it.
    let qty = if order.sku == "FLAKY" && delivery.attempt() == 1 {
        -1
    } else {
        order.qty
    };
    sqlx::query("INSERT INTO orders (id, sku, qty) VALUES ($1, $2, $3)")
        .bind(order.id)
        .bind(&order.sku)
        .bind(qty)
        .execute(&mut **tx)
        .await?;
    let event = OrderRecorded {
        order_id: order.id,
        qty: order.qty,
    };
    Outbox::publish(tx, EXCHANGE, "order.recorded", &event).await?;
    println!(
        "  record_order order {:>2} attempt {} -> row + event written, committing",
        order.id,
        delivery.attempt()
    );
    Ok(())
}

/// Consume the relayed events, also exactly once.
#[consumer(
    queue = "demo.inbox.audit",
    exchange = "demo.inbox",
    routing_key = "order.recorded",
    dlx = "demo.inbox.audit.dlx",
    inbox
)]
async fn audit(event: OrderRecorded, tx: &mut InboxTx) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO audit (order_id, qty) VALUES ($1, $2)")
        .bind(event.order_id)
        .bind(event.qty)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,reliable_mq::consumer=error,reliable_mq::postgres=error".into());
    for directive in reliable_mq::Config::QUIET_LAPIN_DIRECTIVES {
        filter = filter.add_directive(directive.parse()?);
    }
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let admin = sqlx::PgPool::connect(&url).await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        .execute(&admin)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA {SCHEMA}"))
        .execute(&admin)
        .await?;
    let options: PgConnectOptions = url.parse()?;
    let pool = reliable_mq::postgres::pool_options()
        .max_connections(8)
        .connect_with(options.options([("search_path", SCHEMA)]))
        .await?;
    sqlx::query(
        "CREATE TABLE orders (id bigint PRIMARY KEY, sku text NOT NULL, \
         qty int NOT NULL CHECK (qty > 0))",
    )
    .execute(&pool)
    .await?;
    sqlx::query("CREATE TABLE audit (order_id bigint PRIMARY KEY, qty int NOT NULL)")
        .execute(&pool)
        .await?;

    let config = reliable_mq::Config::from_env()?;
    let app = App::new(config.clone())
        .registered()
        .with_postgres(pool.clone());
    app.migrate().await?;
    println!("reliable-mq demo: exactly once with PostgreSQL\n");
    let mut running = app.start().await?;
    // The relay runs until shutdown, reported in running.health().outbox.
    running.spawn_outbox_relay(OutboxRelay::new(pool.clone(), running.publisher().clone()));

    let publisher = Publisher::from_config(&config).await?;
    let mut batch: Vec<Order> = (1..=6)
        .map(|id| Order {
            id,
            sku: format!("SKU-{}", 100 + id),
            qty: 1 + (id as i32 % 3),
        })
        .collect();
    batch.push(Order {
        id: 7,
        sku: "FLAKY".into(),
        qty: 1,
    });
    // A producer retry: the same order, the same message id.
    batch.push(Order {
        id: 1,
        sku: "SKU-101".into(),
        qty: 2,
    });
    println!("publishing {} orders (order 1 twice):", batch.len());
    for order in &batch {
        let id = PublishOptions::with_message_id(format!("order-{}", order.id));
        publisher
            .publish_with(EXCHANGE, "order.place", order, id)
            .await?;
    }

    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        if count("SELECT count(*) FROM audit").await? >= 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Settle: a duplicate arriving late would show here.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let orders = count("SELECT count(*) FROM orders").await?;
    let units = count("SELECT coalesce(sum(qty), 0) FROM orders").await?;
    let audited = count("SELECT count(*) FROM audit").await?;
    let inbox = count("SELECT count(*) FROM reliable_mq_inbox").await?;
    let outbox = Outbox::stats(&pool).await?;
    let o = running.stats("demo.inbox.orders").unwrap_or_default();
    println!("\nsummary:");
    println!(
        "  record_order handled {} | duplicates acked without a call {} | retried {}",
        o.handled, o.duplicates, o.retried
    );
    println!("  orders table: {orders} rows, {units} units");
    println!(
        "  outbox: {} sent, {} pending, {} failed",
        outbox.sent, outbox.pending, outbox.failed
    );
    println!("  audit table: {audited} rows (events consumed exactly once)");
    println!("  inbox table: {inbox} rows (orders and events handled)");

    let health = running.health().await;
    if let Some(outbox) = &health.outbox {
        println!(
            "  health: ready {}, outbox relays running {}/{}",
            health.is_ready(),
            outbox.relays_running,
            outbox.relays
        );
    }

    running.shutdown().await?; // waits for the relay's batch in hand
    publisher.close().await;
    cleanup(&config.amqp_url).await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        .execute(&admin)
        .await?;

    // Orders 1-6 carry 2+3+1+2+3+1 units, order 7 one.
    let ok = orders == 7
        && units == 13
        && audited == 7
        && inbox == 14
        && o.duplicates == 1
        && o.retried == 1
        && outbox.sent == 7;
    println!(
        "\n{}",
        if ok {
            "every order recorded once, every event audited once"
        } else {
            "UNEXPECTED: see the summary above"
        }
    );
    if ok {
        Ok(())
    } else {
        Err("demo outcome differs".into())
    }
}

/// Delete the demo's broker objects.
async fn cleanup(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    use reliable_mq::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let conn = reliable_mq::lapin::Connection::connect(
        url,
        reliable_mq::lapin::ConnectionProperties::default(),
    )
    .await?;
    let ch = conn.create_channel().await?;
    for queue in ["demo.inbox.orders", "demo.inbox.audit"] {
        for name in [
            queue.to_owned(),
            format!("{queue}.dlq"),
            format!("{queue}.retry.500ms"),
            format!("{queue}.retry.1s"),
            format!("{queue}.retry.2s"),
            format!("{queue}.retry.4s"),
        ] {
            ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        ch.exchange_delete(
            format!("{queue}.dlx").as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await?;
    }
    ch.exchange_delete(EXCHANGE.into(), ExchangeDeleteOptions::default())
        .await?;
    conn.close(200, "demo done".into()).await?;
    Ok(())
}
