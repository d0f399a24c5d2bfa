use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", prefetch = 0)]
async fn zero(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", prefetch = 70000)]
async fn too_many(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
