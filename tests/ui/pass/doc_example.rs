//! The example of the `#[consumer]` docs, as written there.
#![deny(unused)]

use reliable_mq::{HandlerError, consumer};

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
    qty: u32,
}

#[consumer(
    queue = "orders",
    exchange = "shop",
    routing_key = "order.created",
    dlx = "orders.dlx",
    idempotent,
    prefetch = 64,
    concurrency = 16
)]
async fn reserve_stock(order: Order) -> Result<(), HandlerError> {
    if order.qty == 0 {
        return Err(HandlerError::reject("empty order")); // straight to the DLQ
    }
    let _ = order.id;
    Ok(()) // acked
}

#[tokio::main]
async fn service() -> Result<(), reliable_mq::Error> {
    reliable_mq::run().await // runs every `#[consumer]` in the binary
}

fn main() {
    // Built, not run: `run` would connect to a broker.
    let _ = service;
    assert_eq!(reliable_mq::__private::model(&reserve_stock::SPEC).prefetch(), 64);
}
