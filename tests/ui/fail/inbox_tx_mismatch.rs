use reliable_mq::postgres::InboxTx;
use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "orders", dlx = "orders.dlx", inbox)]
async fn inbox_without_tx(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn tx_without_inbox(_id: u64, _tx: &mut InboxTx) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", inbox)]
async fn shared_tx(_id: u64, _tx: &InboxTx) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", inbox)]
async fn owned_tx(_id: u64, _tx: InboxTx) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "orders", dlx = "orders.dlx", inbox)]
async fn two_tx(_id: u64, _a: &mut InboxTx, _b: &mut InboxTx) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
