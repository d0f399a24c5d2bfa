use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", single_active_consumer, concurrency = 4)]
async fn in_order(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
