use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", exclusive = true, priority = "high")]
async fn wrong_values(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", single_active_consumer = false, priority = 3000000000)]
async fn out_of_range(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
