//! Quorum queues, with and without an explicit `delivery_limit`.
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

use reliable_mq::{ConsumerConfig, HandlerError, QueueKind, consumer};

#[consumer(
    queue = "payments",
    dlx = "payments.dlx",
    queue_type = "quorum",
    delivery_limit = 20
)]
async fn settle_payment(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(
    queue = "refunds",
    dlx = "refunds.dlx",
    queue_type = "quorum",
    max_retries = 4
)]
async fn refund(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "audit", dlx = "audit.dlx", queue_type = "classic")]
async fn audit(_id: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {
    assert_eq!(reliable_mq::__private::model(&settle_payment::SPEC).queue_kind(), QueueKind::Quorum);
    assert_eq!(reliable_mq::__private::model(&settle_payment::SPEC).delivery_limit, Some(20));
    assert_eq!(
        ConsumerConfig::from(settle_payment::SPEC).effective_delivery_limit(),
        Some(20)
    );

    assert_eq!(reliable_mq::__private::model(&refund::SPEC).delivery_limit, None);
    // Unset: the runtime derives it, max_retries + 5.
    assert_eq!(
        ConsumerConfig::from(refund::SPEC).effective_delivery_limit(),
        Some(9)
    );

    assert_eq!(reliable_mq::__private::model(&audit::SPEC).queue_kind(), QueueKind::Classic);
    assert_eq!(
        ConsumerConfig::from(audit::SPEC).effective_delivery_limit(),
        None
    );
}
