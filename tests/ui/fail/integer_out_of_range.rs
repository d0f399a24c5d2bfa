use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", max_retries = 5000000000)]
async fn retries(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", queue_type = "quorum", delivery_limit = 0)]
async fn no_redelivery(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
