use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "amq.orders", exchange = "amq.topic", dlx = "amq.dlx", dlq = "amq.dlq")]
async fn reserve_stock(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
