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
    timeout = "29m",
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
    assert_eq!(reliable_mq::__private::model(&spec).queue(), "orders");
    assert_eq!(reliable_mq::__private::model(&spec).exchange(), Some("shop"));
    assert_eq!(reliable_mq::__private::model(&spec).exchange_kind(), ExchangeKind::Direct);
    assert_eq!(reliable_mq::__private::model(&spec).routing_key.as_deref(), Some("order.created"));
    assert_eq!(reliable_mq::__private::model(&spec).dlx(), "orders.dlx");
    assert_eq!(reliable_mq::__private::model(&spec).dlq.as_deref(), Some("orders.dead"));
    assert_eq!(reliable_mq::__private::model(&spec).queue_kind(), QueueKind::Quorum);
    assert_eq!(reliable_mq::__private::model(&spec).delivery_limit, Some(12));
    assert_eq!(reliable_mq::__private::model(&spec).prefetch(), 64);
    assert_eq!(reliable_mq::__private::model(&spec).concurrency(), 64);
    assert_eq!(reliable_mq::__private::model(&spec).max_retries(), 7);
    assert_eq!(reliable_mq::__private::model(&spec).retry_delay(), Duration::from_millis(500));
    assert_eq!(reliable_mq::__private::model(&spec).retry_backoff(), RetryBackoff::Exponential { factor: 3 });
    assert_eq!(reliable_mq::__private::model(&spec).timeout(), Duration::from_secs(120));
    assert!(reliable_mq::__private::model(&spec).idempotent);
    assert_eq!(reliable_mq::__private::model(&spec).dedup_ttl(), Duration::from_secs(7 * 24 * 3600));

    let slow = slow::SPEC;
    assert_eq!(reliable_mq::__private::model(&slow).prefetch(), 65535);
    assert_eq!(reliable_mq::__private::model(&slow).concurrency(), 1);
    assert_eq!(reliable_mq::__private::model(&slow).max_retries(), 0);
    assert_eq!(reliable_mq::__private::model(&slow).retry_delay(), Duration::from_secs(24 * 3600));
    assert_eq!(reliable_mq::__private::model(&slow).retry_backoff(), RetryBackoff::Fixed);
    assert_eq!(reliable_mq::__private::model(&slow).timeout(), Duration::from_secs(29 * 60));
    assert!(reliable_mq::__private::model(&slow).idempotent);
    assert_eq!(reliable_mq::__private::model(&slow).dedup_ttl(), reliable_mq::__private::defaults::DEDUP_TTL);

    let doubling = doubling::SPEC;
    assert_eq!(
        reliable_mq::__private::model(&doubling).retry_backoff(),
        RetryBackoff::Exponential { factor: 2 }
    );
    assert_eq!(reliable_mq::__private::model(&doubling).timeout(), Duration::from_secs(30));
}
