use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", prefetch = 10)]
async fn reserve_stock(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
