use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn unit(_id: u64) -> () {}

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn value(id: u64) -> Result<u64, HandlerError> {
    Ok(id)
}

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn not_an_error(_id: u64) -> Result<(), u32> {
    Ok(())
}

fn main() {}
