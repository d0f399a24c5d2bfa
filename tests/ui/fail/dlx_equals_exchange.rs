use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", exchange = "shop", dlx = "shop")]
async fn reserve_stock(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
