use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", prefech = 10)]
async fn typo(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dead_letter_exchange = "orders.dlx")]
async fn other_library(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", colour = "blue")]
async fn unrelated(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
