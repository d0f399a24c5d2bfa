use reliable_mq::{HandlerError, consumer};

#[derive(serde::Deserialize)]
struct Shipment {
    tracking: String,
}

#[consumer(queue = "shipments", dlx = "shipments.dlx", schema)]
async fn ship(shipment: Shipment) -> Result<(), HandlerError> {
    let _ = shipment.tracking;
    Ok(())
}

fn main() {}
