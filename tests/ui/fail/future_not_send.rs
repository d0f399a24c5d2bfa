use std::rc::Rc;

use reliable_mq::{HandlerError, consumer};

async fn save(_n: u64) {}

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn reserve_stock(id: u64) -> Result<(), HandlerError> {
    let shared = Rc::new(id);
    save(*shared).await;
    Ok(())
}

fn main() {}
