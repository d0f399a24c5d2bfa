use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn type_parameter<T: serde::de::DeserializeOwned>(_payload: T) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn impl_trait(_payload: impl serde::de::DeserializeOwned) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
