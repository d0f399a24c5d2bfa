//! Every key at a non-default value, each emitted into the spec as written.
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

use std::time::Duration;

use reliable_mq::{ExchangeKind, HandlerError, QueueKind, RetryBackoff, consumer};

#[derive(serde::Deserialize)]
struct Order {}

#[consumer(
    queue = "orders",
    exchange = "shop",
    exchange_type = "direct",
    routing_key = "order.created",
    dlx = "orders.dlx",
    dlq = "orders.dead",
    queue_type = "quorum",
    delivery_limit = 12,
    prefetch = 64,
    concurrency = 64,
    max_retries = 7,
    retry_delay = "500ms",
    retry_backoff = "exponential:3",
    timeout = "2m",
    idempotent,
    dedup_ttl = "7d"
)]
async fn reserve_stock(_order: Order) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(
    queue = "slow",
    dlx = "slow.dlx",
    prefetch = 65535,
    concurrency = 1,
    max_retries = 0,
    retry_delay = "1d",
    retry_backoff = "fixed",
    timeout = "1h",
    idempotent
)]
async fn slow(_order: Order) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(
    queue = "doubling",
    dlx = "doubling.dlx",
    retry_backoff = "exponential",
    timeout = "30s"
)]
async fn doubling(_order: Order) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {
    let spec = reserve_stock::SPEC;
    assert_eq!(spec.queue, "orders");
    assert_eq!(spec.exchange, Some("shop"));
    assert_eq!(spec.exchange_type, ExchangeKind::Direct);
    assert_eq!(spec.routing_key, Some("order.created"));
    assert_eq!(spec.dlx, "orders.dlx");
    assert_eq!(spec.dlq, Some("orders.dead"));
    assert_eq!(spec.queue_type, QueueKind::Quorum);
    assert_eq!(spec.delivery_limit, Some(12));
    assert_eq!(spec.prefetch, 64);
    assert_eq!(spec.concurrency, 64);
    assert_eq!(spec.max_retries, 7);
    assert_eq!(spec.retry_delay, Duration::from_millis(500));
    assert_eq!(spec.retry_backoff, RetryBackoff::Exponential { factor: 3 });
    assert_eq!(spec.timeout, Duration::from_secs(120));
    assert!(spec.idempotent);
    assert_eq!(spec.dedup_ttl, Duration::from_secs(7 * 24 * 3600));

    let slow = slow::SPEC;
    assert_eq!(slow.prefetch, 65535);
    assert_eq!(slow.concurrency, 1);
    assert_eq!(slow.max_retries, 0);
    assert_eq!(slow.retry_delay, Duration::from_secs(24 * 3600));
    assert_eq!(slow.retry_backoff, RetryBackoff::Fixed);
    assert_eq!(slow.timeout, Duration::from_secs(3600));
    assert!(slow.idempotent);
    assert_eq!(slow.dedup_ttl, reliable_mq::spec::defaults::DEDUP_TTL);

    let doubling = doubling::SPEC;
    assert_eq!(
        doubling.retry_backoff,
        RetryBackoff::Exponential { factor: 2 }
    );
    assert_eq!(doubling.timeout, Duration::from_secs(30));
}
