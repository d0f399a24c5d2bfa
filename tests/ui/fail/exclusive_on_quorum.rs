use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", queue_type = "quorum", exclusive)]
async fn exclusive_quorum(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
