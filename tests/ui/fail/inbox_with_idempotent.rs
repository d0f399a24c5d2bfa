use reliable_mq::postgres::InboxTx;
use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", inbox, idempotent)]
async fn twice(_id: u64, _tx: &mut InboxTx) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", inbox = true)]
async fn valued(_id: u64, _tx: &mut InboxTx) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
