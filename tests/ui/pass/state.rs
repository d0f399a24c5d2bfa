//! `State<T>` extractors after the payload, in any order with `&Delivery`, destructured or
//! not; several state types at once.
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use reliable_mq::{Delivery, HandlerError, State, consumer};

#[derive(Clone, Default)]
struct Stock(Arc<AtomicU32>);

#[derive(Clone)]
struct Region(&'static str);

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn reserve(
    qty: u32,
    State(stock): State<Stock>,
    delivery: &Delivery,
    region: State<Region>,
) -> Result<(), HandlerError> {
    assert_eq!(region.0.0, "eu");
    assert_eq!(delivery.attempt(), 1);
    stock.0.fetch_add(qty, Ordering::SeqCst);
    Ok(())
}

#[consumer(queue = "renamed", dlx = "renamed.dlx")]
async fn fully_qualified(_n: u32, reliable_mq::State(_s): reliable_mq::State<Stock>) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {
    let stock = Stock::default();
    let delivery = Delivery::for_test(b"3".to_vec())
        .with_state(stock.clone())
        .with_state(Region("eu"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    runtime
        .block_on(reserve::SPEC.handler().call(Arc::new(delivery)))
        .expect("handled");
    assert_eq!(stock.0.load(Ordering::SeqCst), 3);
    // Without the state, the call fails (the app refuses to start before that).
    let missing = runtime.block_on(
        reserve::SPEC
            .handler()
            .call(Arc::new(Delivery::for_test(b"3".to_vec()))),
    );
    assert!(missing.is_err_and(|e| e.message().contains("no state of type")));
    let _ = fully_qualified::SPEC;
}
