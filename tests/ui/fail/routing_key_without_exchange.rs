use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", routing_key = "order.created", dlx = "orders.dlx")]
async fn reserve_stock(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
