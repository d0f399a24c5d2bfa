use reliable_mq::{HandlerError, consumer};

// 252 bytes: the queue itself fits, `{queue}.dlq` and `{queue}.retry.4s` do not.
#[consumer(
    queue = "qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq",
    dlx = "orders.dlx"
)]
async fn long_name(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
