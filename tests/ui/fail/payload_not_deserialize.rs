use reliable_mq::{HandlerError, consumer};

struct Order {
    id: u64,
}

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn reserve_stock(order: Order) -> Result<(), HandlerError> {
    let _ = order.id;
    Ok(())
}

fn main() {}
