//! Settling a delivery: the broker actions for each outcome, in the order that makes them
//! safe. The original is acked only after its outcome is durable elsewhere (handler done,
//! or the retry/dead-letter copy confirmed by the broker); a crash in between leaves it
//! unacked, so it comes back (a duplicate, absorbed by dedup), never a loss.
//!
//! A copy the broker does not take (the DLX refused to the app's user, a tier or binding
//! deleted, a queue rejecting publishes) holds its original where it is: unacked, its
//! handler not run again, the session and every other delivery on it untouched. One held
//! copy at a time tries again, after a delay that grows while the copies keep failing, the
//! topology redeclared first; the consumer reports itself degraded with the reason
//! meanwhile. A held original is handed back to the broker before its `consumer_timeout`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::FieldTable;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::connection::Backoff;
use crate::consumer::ConsumerStats;
use crate::failure::{self, FailureKind, header};
use crate::publisher::{PublishError, Publisher};
use crate::shutdown::ShutdownHandle;
use crate::topology::Topology;
use crate::transport::{Acker, Link};
use crate::{Delivery, HandlerError};

/// How long to wait before putting a message back that cannot be settled at all, so it
/// cannot become a hot loop.
const PUT_BACK_DELAY: Duration = Duration::from_secs(1);

/// How often a held delivery checks that its channel is still up.
const CHANNEL_CHECK_EVERY: Duration = Duration::from_millis(250);

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
    /// The outcome's name, for its settle span.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Retry { .. } => "retry",
            Self::DeadLetter { .. } => "dead_letter",
            Self::RequeueHeld => "requeue",
            Self::PutBack => "put_back",
        }
    }

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
    /// The session's connection, to redeclare the topology on before a held copy tries
    /// again (a deleted tier, DLX or binding comes back).
    pub(crate) connection: &'a Link,
    /// Taken by a held copy for its next try: one at a time per consumer, with a delay
    /// that grows across tries until one succeeds (then it starts over).
    pub(crate) retry_gate: &'a tokio::sync::Mutex<Backoff>,
    /// When the delivery must be handed back if it is still held (before the broker's
    /// `consumer_timeout` closes the channel).
    pub(crate) hand_back_at: Instant,
    pub(crate) shutdown: &'a ShutdownHandle,
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
                        if self
                            .copy_then_ack(acker, delivery, "", &tier, headers)
                            .await
                        {
                            ConsumerStats::bump(&self.stats.retried);
                            self.stats.metrics.retried(kind.as_str());
                        }
                    }
                    None => {
                        // With no retries configured a timeout or panic is the reason in
                        // itself; otherwise the ladder ran out (`x-last-error-kind` says
                        // what failed last).
                        let (kind, last) = match kind {
                            FailureKind::Timeout | FailureKind::Panic
                                if self.topology.ladder.max_retries() == 0 =>
                            {
                                (kind, None)
                            }
                            _ => (FailureKind::RetriesExhausted, Some(kind)),
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
                    ConsumerStats::bump(&self.stats.requeued);
                    self.stats.metrics.requeued();
                    return;
                };
                // Not a failure: the retry state (`x-attempts`, ...) travels unchanged. The
                // copy comes back through the default exchange, so record where it was
                // first published, or a later failure would report `""` as its origin.
                let mut headers = copied_headers(delivery, &[]);
                keep_origin(&mut headers, delivery);
                failure::set_str(
                    &mut headers,
                    header::DEDUP_REQUEUE,
                    "held-by-another-consumer",
                );
                if self.copy_then_ack(acker, delivery, "", tier, headers).await {
                    ConsumerStats::bump(&self.stats.requeued);
                    self.stats.metrics.requeued();
                }
            }
            SettleOutcome::PutBack => {
                put_back(acker, Duration::ZERO).await;
                ConsumerStats::bump(&self.stats.requeued);
                self.stats.metrics.requeued();
            }
        }
    }

    async fn dead_letter(&self, acker: &Acker, delivery: &Delivery, headers: FieldTable) {
        let kind = failure::header_str(Some(&headers), header::ERROR_KIND)
            .unwrap_or("")
            .to_owned();
        info!(kind, dlq = %self.topology.dlq, "dead-lettering");
        let (dlx, key) = (&self.topology.dlx, &self.topology.queue);
        if self.copy_then_ack(acker, delivery, dlx, key, headers).await {
            ConsumerStats::bump(&self.stats.dead_lettered);
            self.stats.metrics.dead_lettered(&kind);
        }
    }

    /// Publish a copy (same body and properties, new headers) and wait for its confirm;
    /// ack the original only then. `true` once the copy is confirmed.
    ///
    /// While the broker does not take the copy, the original is held (see the module
    /// docs); it is handed back (nack, requeue: counted as `requeued`) before its
    /// `consumer_timeout`, and left unacked for the broker to redeliver when its channel
    /// dies or the app shuts down.
    ///
    /// Two properties are not copied, because keeping them would break the copy:
    /// `expiration` (a per-message TTL would make a dead letter expire out of the DLQ,
    /// silently, and cut a retry wait short) and `user_id` (the broker rejects a publish
    /// whose `user_id` is not the publishing connection's user, so the copy could never be
    /// published and the original would loop). RabbitMQ's own dead-lettering drops
    /// `expiration` for the same reason.
    async fn copy_then_ack(
        &self,
        acker: &Acker,
        delivery: &Delivery,
        exchange: &str,
        routing_key: &str,
        headers: FieldTable,
    ) -> bool {
        if !acker.usable() {
            // The channel died (the session is reconnecting): the broker is redelivering
            // the original, so a copy now would start a second lineage of it.
            debug!("channel gone before settling; no copy, the broker redelivers");
            return false;
        }
        let target = format!("{exchange}/{routing_key}");
        let properties = copy_properties(&delivery.properties, headers);
        let publish = || {
            self.publisher.publish_copy(
                exchange,
                routing_key,
                delivery.body.clone(),
                properties.clone(),
            )
        };
        let mut result = publish().await;
        let mut held = false;
        let mut signal = self.shutdown.signal();
        while let Err(e) = result {
            if !held {
                error!(error = %e, exchange, routing_key, "the broker does not take the settle copy; holding the original (unacked, not run again) and trying again with a growing delay");
                held = true;
                self.stats.held.fetch_add(1, Ordering::Relaxed);
            }
            self.stats
                .set_degraded(&target, copy_failure(exchange, routing_key, &e));
            // One held copy of this consumer tries at a time, each after the gate's delay.
            let turn = async {
                let mut gate = self.retry_gate.lock().await;
                let delay = gate.next_delay();
                tokio::time::sleep(delay).await;
                gate
            };
            let mut gate = tokio::select! {
                gate = turn => gate,
                _ = tokio::time::sleep_until(self.hand_back_at) => {
                    warn!(exchange, routing_key, "the settle copy is still not taken; handing the original back before the broker's consumer_timeout would close the channel");
                    put_back(acker, Duration::ZERO).await;
                    ConsumerStats::bump(&self.stats.requeued);
                    self.stats.metrics.requeued();
                    self.stats.release_held();
                    return false;
                }
                _ = signal.cancelled() => {
                    debug!("shutting down with a settle copy held; the original stays unacked and the broker redelivers it");
                    self.stats.release_held();
                    return false;
                }
                _ = channel_gone(acker) => {
                    debug!("channel gone while a settle copy was held; the broker redelivers the original");
                    self.stats.release_held();
                    return false;
                }
            };
            // A deleted tier, DLX or binding comes back with the topology.
            if let Err(e) = self.connection.declare(self.topology).await {
                debug!(error = %e, "cannot redeclare the topology before trying the copy again");
            }
            result = publish().await;
            if result.is_ok() {
                gate.reset();
            }
        }
        if held {
            info!(
                exchange,
                routing_key, "the broker takes the settle copy again"
            );
            self.stats.release_held();
        }
        self.stats.clear_degraded(&target);
        #[cfg(feature = "testing")]
        if crate::retry::crash_seam::fire(delivery.queue()) {
            warn!("test crash seam: leaving the original unacked after the copy was confirmed");
            return true;
        }
        ack(acker).await;
        true
    }
}

/// Resolves when `acker`'s channel is no longer usable.
async fn channel_gone(acker: &Acker) {
    while acker.usable() {
        tokio::time::sleep(CHANNEL_CHECK_EVERY).await;
    }
}

/// Why a copy to `exchange`/`routing_key` failed, for health: names the target first, e.g.
/// `cannot publish to orders.dlx: ACCESS_REFUSED - access to exchange 'orders.dlx' ...`.
fn copy_failure(exchange: &str, routing_key: &str, error: &PublishError) -> String {
    let target = if exchange.is_empty() {
        format!("queue {routing_key} (default exchange)")
    } else {
        exchange.to_owned()
    };
    match error {
        PublishError::Refused { reason, .. } => format!("cannot publish to {target}: {reason}"),
        PublishError::Unroutable { reply, .. } => format!(
            "cannot publish to {target}: {reply} (nothing bound for routing key {routing_key:?})"
        ),
        other => format!("cannot publish to {target}: {other}"),
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
    // A failure copy is a fresh failure record: drop the held-claim marker, and a last
    // kind left over from an earlier dead letter (a replayed message).
    let mut h = copied_headers(delivery, &[header::DEDUP_REQUEUE, header::LAST_ERROR_KIND]);
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

/// The original's headers without the broker's dead-letter history (`x-death`,
/// `x-first-death-*`, `x-last-death-*`).
///
/// Every trip through a retry tier makes the broker add to `x-death`; a copy that carried
/// it on would make it grow with each cycle (one entry per tier, more on a replay) and
/// eat into the frame the headers share. Its counting also changed between RabbitMQ
/// versions, which is why attempts live in `x-attempts`. Our own headers are the record;
/// a delivery still shows the `x-death` of its last tier expiry, for debugging.
/// `drop` names further headers to leave out.
fn copied_headers(delivery: &Delivery, drop: &[&str]) -> FieldTable {
    let Some(headers) = delivery.headers() else {
        return FieldTable::default();
    };
    let mut m = headers.inner().clone();
    m.retain(|k, _| {
        let k = k.as_str();
        !failure::is_broker_death_header(k) && !drop.contains(&k)
    });
    m.into()
}

/// `original`'s properties with `headers`, minus `expiration` and `user_id` (see
/// [`Settler::copy_then_ack`]).
pub(crate) fn copy_properties(original: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut p = BasicProperties::default().with_headers(headers);
    if let Some(v) = original.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = original.delivery_mode() {
        p = p.with_delivery_mode(*v);
    }
    if let Some(v) = original.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = original.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = original.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = original.cluster_id() {
        p = p.with_cluster_id(v.clone());
    }
    p
}

/// Record where a message was first published, unless it already says.
fn keep_origin(headers: &mut FieldTable, delivery: &Delivery) {
    for (key, value) in [
        (header::ORIGINAL_EXCHANGE, delivery.exchange()),
        (header::ORIGINAL_ROUTING_KEY, delivery.routing_key()),
        (header::ORIGINAL_QUEUE, delivery.queue()),
    ] {
        if failure::header_str(Some(headers), key).is_none() {
            let value = value.to_owned();
            failure::set_str(headers, key, &value);
        }
    }
}

pub(crate) async fn ack(acker: &Acker) {
    match acker.ack().await {
        Ok(true) => {}
        // The channel is gone: the broker redelivers the message (dedup absorbs it).
        Ok(false) => debug!("ack not sent: the channel is gone; the broker will redeliver"),
        Err(e) => warn!(error = %e, "ack failed; the broker will redeliver"),
    }
}

pub(crate) async fn put_back(acker: &Acker, delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Err(e) = acker.nack(true).await {
        warn!(error = %e, "nack failed; the broker will redeliver when the channel closes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldArray};

    fn delivery_with(headers: FieldTable) -> Delivery {
        let mut d = Delivery::for_test(b"{}".to_vec()).with_headers(headers);
        d.exchange = "shop".into();
        d.routing_key = "order.created".into();
        d.queue = "orders".into();
        d
    }

    #[test]
    fn failure_headers_record_the_failure_and_drop_the_death_history() {
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        failure::set_str(&mut h, "x-first-death-queue", "orders.retry.1s");
        failure::set_str(&mut h, "tenant", "acme");
        failure::set_int(&mut h, header::ATTEMPTS, 1);
        failure::set_int(&mut h, header::FIRST_FAILURE, 42);
        failure::set_str(&mut h, header::LAST_ERROR_KIND, "panic");
        failure::set_str(&mut h, header::DEDUP_REQUEUE, "held-by-another-consumer");
        let d = delivery_with(h);
        assert_eq!(d.attempt(), 2);

        let out = failure_headers(&d, FailureKind::Timeout, &"x".repeat(10_000), 2, None);
        let get = |k| failure::header_str(Some(&out), k);
        assert_eq!(get(header::ERROR_KIND), Some("timeout"));
        assert_eq!(
            get(header::LAST_ERROR_KIND),
            None,
            "stale last kind removed"
        );
        assert_eq!(get(header::DEDUP_REQUEUE), None);
        assert_eq!(get("tenant"), Some("acme"), "user headers kept");
        assert_eq!(get(header::ORIGINAL_EXCHANGE), Some("shop"));
        assert_eq!(get(header::ORIGINAL_ROUTING_KEY), Some("order.created"));
        assert_eq!(get(header::ORIGINAL_QUEUE), Some("orders"));
        assert!(
            get(header::EXCEPTION_MESSAGE).is_some_and(|m| m.len() <= failure::MAX_MESSAGE_BYTES)
        );
        assert_eq!(failure::header_int(Some(&out), header::ATTEMPTS), Some(2));
        assert_eq!(
            failure::header_int(Some(&out), header::FIRST_FAILURE),
            Some(42)
        );
        assert!(failure::header_int(Some(&out), header::LAST_FAILURE).is_some_and(|t| t > 42));
        assert!(
            !out.inner()
                .keys()
                .any(|k| failure::is_broker_death_header(k.as_str()))
        );
    }

    #[test]
    fn a_failed_copy_is_reported_by_its_target_and_the_brokers_reason() {
        let refused = PublishError::Refused {
            message_id: "m".into(),
            exchange: "orders.dlx".into(),
            code: 403,
            reason: "ACCESS_REFUSED - access to exchange 'orders.dlx' in vhost '/' refused for user 'app'".into(),
        };
        assert_eq!(
            copy_failure("orders.dlx", "orders", &refused),
            "cannot publish to orders.dlx: ACCESS_REFUSED - access to exchange 'orders.dlx' in vhost '/' refused for user 'app'"
        );
        let unroutable = PublishError::Unroutable {
            message_id: "m".into(),
            exchange: String::new(),
            routing_key: "orders.retry.1s".into(),
            reply: "NO_ROUTE".into(),
        };
        assert_eq!(
            copy_failure("", "orders.retry.1s", &unroutable),
            "cannot publish to queue orders.retry.1s (default exchange): NO_ROUTE (nothing bound for routing key \"orders.retry.1s\")"
        );
    }

    #[test]
    fn copies_drop_expiration_and_user_id_and_keep_the_rest() {
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_content_type("application/json".into())
            .with_correlation_id("c-1".into())
            .with_expiration("60000".into())
            .with_user_id("alice".into())
            .with_priority(3);
        let copy = copy_properties(&original, FieldTable::default());
        assert_eq!(copy.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        assert_eq!(
            copy.correlation_id().as_ref().map(|s| s.as_str()),
            Some("c-1")
        );
        assert_eq!(copy.content_type(), original.content_type());
        assert_eq!(copy.priority(), &Some(3));
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.user_id(), &None);
    }
}
