use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", retry_backoff = "linear")]
async fn unknown(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", retry_backoff = "exponentail")]
async fn typo(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", retry_backoff = "exponential:1")]
async fn no_growth(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", retry_backoff = "exponential:50")]
async fn too_fast(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
