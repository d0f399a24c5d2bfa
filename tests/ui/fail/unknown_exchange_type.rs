use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", exchange = "shop", exchange_type = "fanuot", dlx = "orders.dlx")]
async fn typo(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", exchange = "shop", exchange_type = "x-delayed-message", dlx = "orders.dlx")]
async fn plugin(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", exchange = "shop", exchange_type = topic, dlx = "orders.dlx")]
async fn unquoted(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
