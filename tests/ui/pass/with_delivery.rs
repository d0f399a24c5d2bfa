//! The two-parameter form: the handler also sees the delivery (message id, headers,
//! attempt), written as `&Delivery` or with a path.
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

use std::sync::{Arc, Mutex};

use reliable_mq::{Delivery, HandlerError, consumer};

static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[consumer(queue = "orders", dlx = "orders.dlx", idempotent)]
async fn with_delivery(id: u64, delivery: &Delivery) -> Result<(), HandlerError> {
    let message_id = delivery.message_id().unwrap_or("none");
    let attempt = delivery.attempt();
    SEEN.lock()
        .map_err(|_| HandlerError::retry("poisoned"))?
        .push(format!("{id} {message_id} {attempt}"));
    Ok(())
}

#[consumer(queue = "by-path", dlx = "by-path.dlx")]
async fn with_path(
    _payload: serde_json::Value,
    _: &'_ reliable_mq::Delivery,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    let delivery = Delivery::for_test(b"42".to_vec()).with_message_id("order-42");
    runtime
        .block_on(with_delivery::SPEC.handler().call(Arc::new(delivery)))
        .expect("handled");
    let seen = SEEN.lock().expect("not poisoned").clone();
    assert_eq!(seen, ["42 order-42 1"]);

    let delivery = Delivery::for_test(br#"{"any": "json"}"#.to_vec());
    runtime
        .block_on(with_path::SPEC.handler().call(Arc::new(delivery)))
        .expect("handled");
}
