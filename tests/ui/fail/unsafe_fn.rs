use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx")]
async unsafe fn reserve_stock(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
