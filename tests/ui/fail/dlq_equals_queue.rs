use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", dlq = "orders")]
async fn reserve_stock(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
