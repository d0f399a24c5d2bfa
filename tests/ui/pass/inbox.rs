//! An `inbox` consumer: `&mut InboxTx` after the payload, in any order with `&Delivery`
//! and `State<T>`, its queries run on `&mut **tx` and outgoing messages written with
//! `Outbox::publish(tx, ...)`; `dedup_ttl` applies to the inbox.
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

use std::sync::Arc;

use reliable_mq::postgres::{InboxTx, Outbox};
use reliable_mq::{Delivery, HandlerError, State, consumer};

#[derive(Clone)]
struct Region(&'static str);

#[consumer(queue = "orders", dlx = "orders.dlx", inbox, dedup_ttl = "7d")]
async fn record(
    id: i64,
    delivery: &Delivery,
    tx: &mut InboxTx,
    State(region): State<Region>,
) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO orders (id, region, attempt) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(region.0)
        .bind(i64::from(delivery.attempt()))
        .execute(&mut **tx)
        .await?;
    Outbox::publish(tx, "shop", "order.recorded", &id).await?;
    Ok(())
}

fn main() {
    let model = reliable_mq::__private::model(&record::SPEC);
    assert!(model.inbox);
    assert_eq!(model.dedup_ttl(), std::time::Duration::from_secs(7 * 24 * 3600));
    // Called outside the app's inbox there is no transaction to lend: a retryable error,
    // never a panic.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    let delivery = Delivery::for_test(b"1".to_vec()).with_state(Region("eu"));
    let outside = runtime.block_on(record::SPEC.handler().call(Arc::new(delivery)));
    assert!(outside.is_err_and(|e| e.is_retry() && e.message().contains("no inbox transaction")));
}
