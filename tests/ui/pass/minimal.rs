//! The smallest consumer: every setting at the runtime's default, and the generated
//! adapter decodes, calls and converts the result.
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

use std::sync::Arc;

use reliable_mq::__private::defaults;
use reliable_mq::{
    ConsumerSpec, Delivery, ExchangeKind, FailureKind, HandlerError, QueueKind, RetryBackoff,
    consumer,
};
use std::time::Duration;

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
    qty: u32,
}

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn reserve_stock(order: Order) -> Result<(), HandlerError> {
    if order.qty == 0 {
        return Err(HandlerError::reject(format!("order {} is empty", order.id)));
    }
    Ok(())
}

fn call(spec: &ConsumerSpec, body: &str) -> Result<(), HandlerError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    let delivery = Arc::new(Delivery::for_test(body.as_bytes().to_vec()));
    runtime.block_on(spec.handler().call(delivery))
}

fn main() {
    let spec = reserve_stock::SPEC;
    assert!(spec.name().ends_with("::reserve_stock"), "{}", spec.name());
    assert_eq!(reliable_mq::__private::model(&spec).queue(), "orders");
    assert_eq!(reliable_mq::__private::model(&spec).exchange(), None);
    assert_eq!(reliable_mq::__private::model(&spec).exchange_kind(), ExchangeKind::Topic);
    assert_eq!(reliable_mq::__private::model(&spec).routing_key.as_deref(), None);
    assert_eq!(reliable_mq::__private::model(&spec).dlx(), "orders.dlx");
    assert_eq!(reliable_mq::__private::model(&spec).dlq.as_deref(), None);
    assert_eq!(reliable_mq::__private::model(&spec).queue_kind(), QueueKind::Classic);
    assert_eq!(reliable_mq::__private::model(&spec).delivery_limit, None);
    assert_eq!(reliable_mq::__private::model(&spec).prefetch(), defaults::PREFETCH);
    assert_eq!(reliable_mq::__private::model(&spec).concurrency(), defaults::CONCURRENCY);
    assert_eq!(reliable_mq::__private::model(&spec).max_retries(), defaults::MAX_RETRIES);
    assert_eq!(reliable_mq::__private::model(&spec).retry_delay(), defaults::RETRY_DELAY);
    assert_eq!(reliable_mq::__private::model(&spec).retry_backoff(), defaults::RETRY_BACKOFF);
    assert_eq!(reliable_mq::__private::model(&spec).timeout(), defaults::TIMEOUT);
    assert!(!reliable_mq::__private::model(&spec).idempotent);
    assert_eq!(reliable_mq::__private::model(&spec).dedup_ttl(), defaults::DEDUP_TTL);

    // The defaults documented in the README and in the macro's docs. The macro checks
    // `concurrency <= prefetch` against its own copy of the default prefetch: 32.
    assert_eq!(defaults::PREFETCH, 32);
    assert_eq!(defaults::CONCURRENCY, 1);
    assert_eq!(defaults::MAX_RETRIES, 3);
    assert_eq!(defaults::RETRY_DELAY, Duration::from_secs(1));
    assert_eq!(
        defaults::RETRY_BACKOFF,
        RetryBackoff::Exponential { factor: 2 }
    );
    assert_eq!(defaults::TIMEOUT, Duration::from_secs(30));
    assert_eq!(defaults::DEDUP_TTL, Duration::from_secs(24 * 3600));

    // The adapter: decode, call, convert.
    assert!(call(&spec, r#"{"id": 1, "qty": 2}"#).is_ok());
    let rejected = call(&spec, r#"{"id": 1, "qty": 0}"#).expect_err("an empty order");
    assert_eq!(rejected.kind(), FailureKind::Rejected);
    let undecodable = call(&spec, "not json").expect_err("a bad body");
    assert_eq!(undecodable.kind(), FailureKind::Decode);

    // Registered for `reliable_mq::run()`.
    assert!(reliable_mq::__private::registered().any(|s| s.name() == spec.name()));

    // The function is still there, callable as written.
    let _future = reserve_stock(Order { id: 1, qty: 1 });
}
