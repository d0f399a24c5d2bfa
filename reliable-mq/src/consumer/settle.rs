//! Settling a delivery: the broker actions for each outcome, in the order that makes them
//! safe. The original is acked only after its outcome is durable elsewhere (handler done,
//! or the retry/dead-letter copy confirmed by the broker); a crash in between leaves it
//! unacked, so it comes back (a duplicate, absorbed by dedup), never a loss.

use std::time::Duration;

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::FieldTable;
use tracing::{debug, error, info, warn};

use crate::consumer::ConsumerStats;
use crate::failure::{self, FailureKind, header};
use crate::publisher::Publisher;
use crate::topology::Topology;
use crate::{Delivery, HandlerError};

/// How long to wait before putting a message back after a settle publish failed, so a
/// persistent failure (broker alarm, missing DLX binding) cannot become a hot loop.
const PUT_BACK_DELAY: Duration = Duration::from_secs(1);

/// What happens to a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SettleOutcome {
    /// Handled (or a duplicate of a handled message): ack.
    Ack,
    /// Failed, retryable: copy to the retry tier of the next attempt, then ack.
    Retry { kind: FailureKind, message: String },
    /// Failed for good: copy to the DLQ with the reason, then ack.
    DeadLetter { kind: FailureKind, message: String },
    /// Another instance holds its claim: copy to the requeue tier unchanged, then ack.
    RequeueHeld,
    /// Cannot decide now (dedup store down): give it back to the broker.
    PutBack,
}

impl SettleOutcome {
    /// The outcome of a failed handler call.
    pub(crate) fn from_error(e: HandlerError) -> Self {
        let kind = e.kind();
        let message = e.message().to_owned();
        if kind.is_retryable() {
            Self::Retry { kind, message }
        } else {
            Self::DeadLetter { kind, message }
        }
    }
}

/// Settles deliveries of one consumer.
pub(crate) struct Settler<'a> {
    pub(crate) topology: &'a Topology,
    pub(crate) publisher: &'a Publisher,
    pub(crate) stats: &'a ConsumerStats,
}

impl Settler<'_> {
    pub(crate) async fn settle(&self, acker: &Acker, delivery: &Delivery, outcome: SettleOutcome) {
        match outcome {
            SettleOutcome::Ack => ack(acker).await,
            SettleOutcome::Retry { kind, message } => {
                let attempt = delivery.attempt();
                match self.topology.ladder.tier_for(attempt) {
                    Some((tier, delay)) => {
                        let headers = failure_headers(delivery, kind, &message, attempt, None);
                        debug!(attempt, ?delay, %tier, "retrying later");
                        self.copy_then_ack(acker, delivery, "", &tier, headers).await;
                        ConsumerStats::bump(&self.stats.retried);
                    }
                    None => {
                        // With no retries configured the failure itself is the reason;
                        // otherwise say the ladder ran out, and what failed last.
                        let (kind, last) = if self.topology.ladder.max_retries() == 0 {
                            (kind, None)
                        } else {
                            (FailureKind::RetriesExhausted, Some(kind))
                        };
                        let headers = failure_headers(delivery, kind, &message, attempt, last);
                        self.dead_letter(acker, delivery, headers).await;
                    }
                }
            }
            SettleOutcome::DeadLetter { kind, message } => {
                let headers = failure_headers(delivery, kind, &message, delivery.attempt(), None);
                self.dead_letter(acker, delivery, headers).await;
            }
            SettleOutcome::RequeueHeld => {
                let Some((tier, _)) = &self.topology.requeue_tier else {
                    // Only idempotent consumers can see a held claim, and they have a tier.
                    error!("no requeue tier for a held claim; putting the message back");
                    put_back(acker, PUT_BACK_DELAY).await;
                    return;
                };
                let mut headers = delivery.headers().cloned().unwrap_or_default();
                failure::set_str(&mut headers, header::DEDUP_REQUEUE, "held-by-another-consumer");
                self.copy_then_ack(acker, delivery, "", tier, headers).await;
                ConsumerStats::bump(&self.stats.requeued);
            }
            SettleOutcome::PutBack => {
                put_back(acker, Duration::ZERO).await;
                ConsumerStats::bump(&self.stats.requeued);
            }
        }
    }

    async fn dead_letter(&self, acker: &Acker, delivery: &Delivery, headers: FieldTable) {
        info!(
            kind = failure::header_str(Some(&headers), header::ERROR_KIND).unwrap_or(""),
            dlq = %self.topology.dlq,
            "dead-lettering"
        );
        let (dlx, key) = (&self.topology.dlx, &self.topology.queue);
        if self.copy_then_ack(acker, delivery, dlx, key, headers).await {
            ConsumerStats::bump(&self.stats.dead_lettered);
        }
    }

    /// Publish a copy (same body and properties, new headers) and wait for its confirm;
    /// ack the original only then. On failure the original goes back to the broker.
    async fn copy_then_ack(
        &self,
        acker: &Acker,
        delivery: &Delivery,
        exchange: &str,
        routing_key: &str,
        headers: FieldTable,
    ) -> bool {
        let properties = delivery.properties.clone().with_headers(headers);
        match self
            .publisher
            .publish_raw(exchange, routing_key, delivery.body.clone(), properties)
            .await
        {
            Ok(()) => {
                ack(acker).await;
                true
            }
            Err(e) => {
                error!(error = %e, exchange, routing_key, "cannot publish the settle copy; the original goes back to the queue");
                put_back(acker, PUT_BACK_DELAY).await;
                ConsumerStats::bump(&self.stats.requeued);
                false
            }
        }
    }
}

/// The headers of a retry or dead-letter copy: the original's, plus the failure record.
pub(crate) fn failure_headers(
    delivery: &Delivery,
    kind: FailureKind,
    message: &str,
    attempts: u32,
    last_kind: Option<FailureKind>,
) -> FieldTable {
    // A failure copy is a fresh failure record: drop the held-claim marker.
    let mut h: FieldTable = delivery
        .headers()
        .map(|t| {
            let mut m = t.inner().clone();
            m.remove(header::DEDUP_REQUEUE);
            m.into()
        })
        .unwrap_or_default();
    let now = failure::now_millis();
    failure::set_str(&mut h, header::ERROR_KIND, kind.as_str());
    if let Some(last) = last_kind {
        failure::set_str(&mut h, header::LAST_ERROR_KIND, last.as_str());
    }
    failure::set_str(
        &mut h,
        header::EXCEPTION_MESSAGE,
        &failure::trim_message(message, failure::MAX_MESSAGE_BYTES),
    );
    failure::set_int(&mut h, header::ATTEMPTS, i64::from(attempts));
    let exchange = delivery.exchange().to_owned();
    let routing_key = delivery.routing_key().to_owned();
    failure::set_str(&mut h, header::ORIGINAL_EXCHANGE, &exchange);
    failure::set_str(&mut h, header::ORIGINAL_ROUTING_KEY, &routing_key);
    failure::set_str(&mut h, header::ORIGINAL_QUEUE, delivery.queue());
    let first = failure::header_int(Some(&h), header::FIRST_FAILURE).unwrap_or(now);
    failure::set_int(&mut h, header::FIRST_FAILURE, first);
    failure::set_int(&mut h, header::LAST_FAILURE, now);
    h
}

pub(crate) async fn ack(acker: &Acker) {
    if let Err(e) = acker.ack(BasicAckOptions::default()).await {
        // The channel is gone: the broker redelivers the message (dedup absorbs it).
        warn!(error = %e, "ack failed; the broker will redeliver");
    }
}

pub(crate) async fn put_back(acker: &Acker, delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(e) = acker.nack(options).await {
        warn!(error = %e, "nack failed; the broker will redeliver when the channel closes");
    }
}
