//! The options of clusters: single active consumer (quorum too), priority, exclusive.
use reliable_mq::{HandlerError, consumer};

#[consumer(
    queue = "ledger",
    dlx = "ledger.dlx",
    queue_type = "quorum",
    single_active_consumer,
    priority = 10
)]
async fn in_order(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "reports", dlx = "reports.dlx", exclusive, priority = 0, concurrency = 4)]
async fn alone(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {
    let ordered = reliable_mq::__private::model(&in_order::SPEC);
    assert!(ordered.single_active_consumer() && !ordered.exclusive());
    assert_eq!(ordered.priority(), Some(10));
    let alone = reliable_mq::__private::model(&alone::SPEC);
    assert!(alone.exclusive() && !alone.single_active_consumer());
    assert_eq!(alone.priority(), Some(0));
}
