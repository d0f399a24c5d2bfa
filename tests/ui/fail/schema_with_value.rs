use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "shipments", dlx = "shipments.dlx", schema = true)]
async fn ship(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "parcels", dlx = "parcels.dlx", schema, schema)]
async fn parcel(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
