use reliable_mq::{HandlerError, consumer};

struct Service;

impl Service {
    #[consumer(queue = "orders", dlx = "orders.dlx")]
    async fn reserve_stock(&self, _id: u64) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn main() {}
