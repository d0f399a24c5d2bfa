use reliable_mq::{HandlerError, consumer};

const QUEUE: &str = "orders";

#[consumer(queue = 5, dlx = "orders.dlx", prefetch = "10", concurrency = true, timeout = 30)]
async fn literals(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = QUEUE, dlx = "orders.dlx", max_retries = -1, prefetch)]
async fn not_literals(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
