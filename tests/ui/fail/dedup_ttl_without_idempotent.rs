use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", dedup_ttl = "1h")]
async fn reserve_stock(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
