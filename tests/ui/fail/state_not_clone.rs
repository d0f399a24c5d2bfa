use reliable_mq::{HandlerError, State, consumer};

struct Pool;

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn reserve(_id: u64, State(_pool): State<Pool>) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
