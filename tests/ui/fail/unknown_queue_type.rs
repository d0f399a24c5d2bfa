use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", queue_type = "qourum")]
async fn typo(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", queue_type = "stream")]
async fn stream(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
