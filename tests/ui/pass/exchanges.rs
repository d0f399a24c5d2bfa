//! Every exchange type; routing keys only where the exchange uses them.
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

use reliable_mq::{ConsumerConfig, ExchangeKind, HandlerError, consumer};

#[consumer(
    queue = "emails",
    exchange = "events",
    exchange_type = "fanout",
    dlx = "emails.dlx"
)]
async fn send_email(_event: serde_json::Value) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(
    queue = "ledger",
    exchange = "events.by-header",
    exchange_type = "headers",
    dlx = "ledger.dlx"
)]
async fn ledger(_event: serde_json::Value) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(
    queue = "invoices",
    exchange = "billing",
    exchange_type = "direct",
    routing_key = "invoice",
    dlx = "invoices.dlx"
)]
async fn invoice(_event: serde_json::Value) -> Result<(), HandlerError> {
    Ok(())
}

// `topic` is the default type; an empty routing key is a valid binding.
#[consumer(
    queue = "everything",
    exchange = "shop",
    routing_key = "",
    dlx = "everything.dlx"
)]
async fn everything(_event: serde_json::Value) -> Result<(), HandlerError> {
    Ok(())
}

// An exchange without a routing key binds with the queue name.
#[consumer(queue = "orders", exchange = "shop", dlx = "orders.dlx")]
async fn orders(_event: serde_json::Value) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {
    assert_eq!(reliable_mq::__private::model(&send_email::SPEC).exchange_kind(), ExchangeKind::Fanout);
    assert_eq!(reliable_mq::__private::model(&send_email::SPEC).exchange(), Some("events"));
    assert_eq!(reliable_mq::__private::model(&send_email::SPEC).routing_key.as_deref(), None);
    assert_eq!(reliable_mq::__private::model(&ledger::SPEC).exchange_kind(), ExchangeKind::Headers);
    assert_eq!(reliable_mq::__private::model(&invoice::SPEC).exchange_kind(), ExchangeKind::Direct);
    assert_eq!(reliable_mq::__private::model(&invoice::SPEC).routing_key.as_deref(), Some("invoice"));
    assert_eq!(reliable_mq::__private::model(&everything::SPEC).exchange_kind(), ExchangeKind::Topic);
    assert_eq!(reliable_mq::__private::model(&everything::SPEC).routing_key.as_deref(), Some(""));
    assert_eq!(ConsumerConfig::from(orders::SPEC).binding_key(), "orders");
}
