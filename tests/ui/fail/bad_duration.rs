use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", timeout = "0s", retry_delay = "1.5s")]
async fn zero_and_fraction(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", idempotent,
           retry_delay = "30", timeout = "5min", dedup_ttl = "forever")]
async fn unparseable(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
