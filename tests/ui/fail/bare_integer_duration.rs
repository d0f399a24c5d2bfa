use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", retry_delay = 500)]
async fn reserve(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
