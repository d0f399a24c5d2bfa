use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", delivery_limit = 10)]
async fn default_type(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", queue_type = "classic", delivery_limit = 10)]
async fn classic(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
