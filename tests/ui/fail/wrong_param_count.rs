use reliable_mq::{Delivery, HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn no_payload() -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn three(_id: u64, _delivery: &Delivery, _extra: u32) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
