use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "emails", exchange = "events", exchange_type = "fanout",
           routing_key = "order.created", dlx = "emails.dlx")]
async fn fanout(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "ledger", exchange = "events.by-header", exchange_type = "headers",
           routing_key = "order.created", dlx = "ledger.dlx")]
async fn headers(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
