// `dlx` is required anyway; with `max_retries` the one error says why retries need it.
use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", max_retries = 5)]
async fn reserve_stock(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
