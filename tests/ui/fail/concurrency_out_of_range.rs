use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", concurrency = 0)]
async fn zero(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", prefetch = 8, concurrency = 16)]
async fn above_prefetch(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", concurrency = 64)]
async fn above_default_prefetch(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
