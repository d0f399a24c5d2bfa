use reliable_mq::{HandlerError, consumer};

// RabbitMQ closes the channel of a delivery unacked for its consumer_timeout (30m).
#[consumer(queue = "reports", dlx = "reports.dlx", timeout = "30m")]
async fn build_report(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
