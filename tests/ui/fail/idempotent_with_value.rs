use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", idempotent = true)]
async fn on(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", idempotent = false)]
async fn off(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
