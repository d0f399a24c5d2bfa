//! `schema`: the payload type's JSON Schema (schemars) goes into the AsyncAPI export.
use reliable_mq::{HandlerError, consumer};

/// A shipment.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Shipment {
    /// Tracking number.
    tracking: String,
    weight_grams: u32,
}

#[consumer(queue = "shipments", dlx = "shipments.dlx", schema)]
async fn ship(shipment: Shipment) -> Result<(), HandlerError> {
    let _ = (shipment.tracking, shipment.weight_grams);
    Ok(())
}

#[consumer(queue = "plain", dlx = "plain.dlx")]
async fn plain(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {
    let schema = ship::SPEC.handler().payload_schema().expect("a schema");
    assert_eq!(schema["title"], "Shipment");
    assert_eq!(schema["properties"]["tracking"]["description"], "Tracking number.");
    assert!(plain::SPEC.handler().payload_schema().is_none());
}
