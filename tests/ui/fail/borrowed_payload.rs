use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn reserve_stock(_order: &str) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
