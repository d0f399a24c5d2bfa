use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "", dlx = "orders.dlx")]
async fn empty_queue(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", exchange = "", dlx = "", dlq = "")]
async fn empty_others(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
