use reliable_mq::{Delivery, HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn owned(_id: u64, _delivery: Delivery) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn mutable(_id: u64, _delivery: &mut Delivery) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn other(_id: u64, _count: u32) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
