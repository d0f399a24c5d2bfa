//! A service as a user writes it, for the tests of what `run()` does before it consumes:
//! the start-up warnings a user must see without a tracing subscriber
//! (`tests/startup_warnings.rs`) and `RELIABLE_MQ_EXPORT` (`tests/asyncapi.rs`).
//!
//! `OPERATE_TRACING=1` installs a `fmt` subscriber first, as an application that logs would.

use reliable_mq::{HandlerError, consumer};

/// An order, as published by the shop.
#[derive(serde::Deserialize)]
pub struct Order {
    /// Order number.
    pub id: u64,
}

#[consumer(
    queue = "operate-demo.orders",
    exchange = "operate-demo.shop",
    routing_key = "order.created",
    dlx = "operate-demo.orders.dlx",
    idempotent,
    dedup_ttl = "12h",
    prefetch = 16,
    concurrency = 4,
    max_retries = 2,
    retry_delay = "5s"
)]
async fn reserve_stock(order: Order) -> Result<(), HandlerError> {
    let _ = order.id;
    Ok(())
}

#[consumer(
    queue = "operate-demo.emails",
    dlx = "operate-demo.emails.dlx",
    queue_type = "quorum"
)]
async fn send_email(to: String) -> Result<(), HandlerError> {
    let _ = to;
    Ok(())
}

/// An audit event, whose JSON Schema the export carries (`schema`).
#[derive(serde::Deserialize, schemars::JsonSchema)]
pub struct AuditEvent {
    /// Who did it.
    pub actor: String,
    /// What was touched.
    pub target: Target,
    /// Free-form note.
    pub note: Option<String>,
}

/// What an audit event is about.
#[derive(serde::Deserialize, schemars::JsonSchema)]
pub struct Target {
    /// Kind of object, e.g. `order`.
    pub kind: String,
    /// Its id.
    pub id: u64,
}

#[consumer(
    queue = "operate-demo.audit",
    dlx = "operate-demo.audit.dlx",
    single_active_consumer,
    priority = 7,
    timeout = "2m",
    schema
)]
async fn record_audit(event: AuditEvent) -> Result<(), HandlerError> {
    let _ = (event.actor, event.target.kind, event.target.id, event.note);
    Ok(())
}

#[consumer(
    queue = "operate-demo.reports",
    dlx = "operate-demo.reports.dlx",
    exclusive
)]
async fn build_report(id: u64) -> Result<(), HandlerError> {
    let _ = id;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), reliable_mq::Error> {
    if std::env::var("OPERATE_TRACING").is_ok_and(|v| v == "1") {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .init();
    }
    reliable_mq::run().await
}
