//! The supervised life of one consumer: open a session (connection, topology, channel,
//! QoS, subscription), run deliveries through claim -> handler -> settle with up to
//! `concurrency` in flight, and when anything breaks drop the whole session and start
//! over with capped backoff. Each session owns its connection, so a delivery can only ever
//! be acked on the channel it came from; after a reconnect the broker redelivers what was
//! not acked and dedup absorbs it.
//!
//! When the dedup store stops answering, the consumer pauses *in place*: each delivery
//! that could not be claimed keeps its slot and stays unacked while the claim is retried
//! with capped backoff, so no new delivery starts, nothing is acked or dead-lettered, and
//! nothing is handed back to the broker (which on a quorum queue would count towards its
//! delivery limit). If the process dies meanwhile, the broker redelivers as usual.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::connection::{self, Backoff};
use crate::consumer::ConsumerStats;
use crate::consumer::claim::{ClaimDecision, claim};
use crate::consumer::inspect;
use crate::consumer::invoke::invoke;
use crate::consumer::settle::{SettleOutcome, Settler};
use crate::dedup::DedupStore;
use crate::publisher::Publisher;
use crate::shutdown::ShutdownHandle;
use crate::spec::ConsumerConfig;
use crate::topology::Topology;
use crate::{Config, Delivery, Error};

/// Resolves when the session's connection or channel is no longer usable.
async fn link_lost(conn: &lapin::Connection, channel: &lapin::Channel) -> String {
    loop {
        if !conn.status().connected() {
            return "connection lost".into();
        }
        if !channel.status().connected() {
            return "channel closed".into();
        }
        tokio::time::sleep(LINK_CHECK_EVERY).await;
    }
}

/// How often a session with every slot busy checks that its link is still up.
const LINK_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Longest wait between claim attempts while the dedup store is down.
const DEDUP_RETRY_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// What one consumer needs to run.
pub(crate) struct ConsumerRuntime {
    pub(crate) config: Arc<Config>,
    pub(crate) consumer: ConsumerConfig,
    pub(crate) topology: Topology,
    pub(crate) publisher: Publisher,
    pub(crate) dedup: Option<Arc<dyn DedupStore>>,
    pub(crate) stats: Arc<ConsumerStats>,
    pub(crate) shutdown: ShutdownHandle,
    /// State registered with the app, handed to each delivery for `State<T>`.
    pub(crate) states: Arc<crate::state::StateMap>,
}

/// Why a session ended.
enum SessionEnd {
    /// Shutdown was asked for and in-flight work settled.
    Shutdown,
    /// The broker side broke (connection, channel, cancel); reconnect.
    Broken(String),
}

impl ConsumerRuntime {
    /// Run sessions until shutdown. Returns an error only for what reconnecting cannot fix
    /// (a topology mismatch appearing after a reconnect).
    pub(crate) async fn run(self: Arc<Self>) -> Result<(), Error> {
        let mut backoff = Backoff::new(self.config.max_reconnect_delay);
        let mut signal = self.shutdown.signal();
        let mut unreadable_frames = inspect::UnreadableFrames::default();
        loop {
            if signal.is_triggered() {
                return Ok(());
            }
            let attached_before = self.stats.sessions.load(Ordering::Relaxed);
            let end = match self.session(unreadable_frames.narrow()).await {
                Ok(end) => end,
                Err(e @ Error::TopologyMismatch { .. }) => return Err(e),
                Err(e) => SessionEnd::Broken(e.to_string()),
            };
            self.stats.attached.store(false, Ordering::Relaxed);
            match end {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Broken(reason) => {
                    // A session that got as far as consuming was healthy: start the backoff
                    // over, so a week of rare disconnects never builds up to the cap.
                    // Unless it died of a frame the client cannot read, which the next
                    // session receives again first.
                    let unreadable = unreadable_frames
                        .after_session(&self.config, &self.consumer, &reason)
                        .await;
                    if self.stats.sessions.load(Ordering::Relaxed) > attached_before && !unreadable
                    {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    warn!(queue = %self.consumer.queue(), %reason, ?delay, "consumer session ended; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = signal.cancelled() => return Ok(()),
                    }
                }
            }
        }
    }

    /// One session. `narrow`: the last one died of a frame the client cannot read, so
    /// this one starts with a window of one delivery (see [`inspect::UnreadableFrames`]).
    async fn session(self: &Arc<Self>, mut narrow: bool) -> Result<SessionEnd, Error> {
        let queue = self.consumer.queue();
        let conn = connection::open(&self.config, &format!("consumer {queue}")).await?;
        self.topology.declare(&conn).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| Error::amqp("opening the consumer channel", e))?;
        let prefetch = if narrow { 1 } else { self.consumer.prefetch() };
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| Error::amqp("setting prefetch", e))?;
        let mut tag = self.consumer_tag();
        let mut narrow_reads = 0u8;
        let mut deliveries = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| Error::amqp(format!("subscribing to queue '{queue}'"), e))?;
        ConsumerStats::bump(&self.stats.sessions);
        self.stats.attached.store(true, Ordering::Relaxed);
        info!(%queue, prefetch, concurrency = self.consumer.concurrency(), "consumer attached");

        let limits = inspect::Limits {
            max_body_size: self.config.max_body_size,
            frame_max: usize::try_from(conn.configuration().frame_max()).unwrap_or(usize::MAX),
        };
        let slots = Arc::new(Semaphore::new(usize::from(self.consumer.concurrency())));
        let mut in_flight = JoinSet::new();
        let (topology_broken, mut broken) = mpsc::channel::<String>(1);
        let mut signal = self.shutdown.signal();

        let end = loop {
            let next = tokio::select! {
                biased;
                _ = signal.cancelled() => break SessionEnd::Shutdown,
                Some(reason) = broken.recv() => break SessionEnd::Broken(reason),
                next = deliveries.next() => next,
            };
            let raw = match next {
                Some(Ok(d)) if narrow => {
                    // With a prefetch of one, a second delivery means the first was settled
                    // and both were readable: the unreadable one is gone (or behind, and
                    // nothing unsettled is lost with the connection): full window again.
                    narrow_reads += 1;
                    if narrow_reads == 2 {
                        narrow = false;
                        match self.widen(&channel, &mut tag).await {
                            Ok(stream) => deliveries = stream,
                            Err(e) => break SessionEnd::Broken(e.to_string()),
                        }
                    }
                    d
                }
                Some(Ok(d)) => d,
                Some(Err(e)) => break SessionEnd::Broken(inspect::stream_error(&e)),
                None => {
                    break SessionEnd::Broken(
                        "the broker cancelled the subscription (queue deleted?)".into(),
                    );
                }
            };
            let (delivery, acker, span) = self.receive(raw);
            if let Some(refusal) = inspect::refuse(&delivery, limits) {
                // Hostile input: to the DLQ without a slot, a claim or a handler call.
                let (this, topology_broken) = (Arc::clone(self), topology_broken.clone());
                in_flight.spawn(
                    async move {
                        this.refuse(delivery, &acker, refusal, &topology_broken)
                            .await
                    }
                    .instrument(span),
                );
                continue;
            }
            // Claim ahead: an idempotent delivery starts its claim now, while it waits for a
            // slot, so the store's round trip overlaps the handlers still running (at
            // concurrency 1: the previous one). It waits at most one handler call for a
            // slot, and its lease is renewed counting from the claim
            // (`ClaimGuard::renew_while`).
            let claim = self.dedup.is_some().then(|| {
                let (this, delivery, acker) =
                    (Arc::clone(self), Arc::clone(&delivery), acker.clone());
                tokio::spawn(
                    async move { this.claim(&delivery, &acker).await }.instrument(span.clone()),
                )
            });
            // At most `concurrency` handlers run; the rest of the prefetch window waits in
            // the client buffer, unacked. Slots go out in delivery order.
            let permit = tokio::select! {
                biased;
                _ = signal.cancelled() => break SessionEnd::Shutdown,
                Some(reason) = broken.recv() => break SessionEnd::Broken(reason),
                // A free slot first: the link watch (a timer) is only armed when none is.
                permit = Arc::clone(&slots).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break SessionEnd::Broken("slot semaphore closed".into()),
                },
                // With every slot busy the delivery stream is not polled, so watch the
                // link directly: a broker restart must not go unnoticed behind slow handlers.
                reason = link_lost(&conn, &channel) => {
                    break SessionEnd::Broken(inspect::lost_because(&mut deliveries, reason).await);
                }
            };
            // Reap finished tasks so the set does not grow with the session.
            while in_flight.try_join_next().is_some() {}
            let this = Arc::clone(self);
            let topology_broken = topology_broken.clone();
            in_flight.spawn(
                async move {
                    this.process(delivery, acker, claim, permit, topology_broken)
                        .await
                }
                .instrument(span),
            );
        };

        self.stats.attached.store(false, Ordering::Relaxed);
        if let SessionEnd::Broken(_) = &end {
            // The channel is gone: in-flight handlers cannot ack on it any more, and the
            // broker is already redelivering their messages. Let them finish detached (their
            // acks fail harmlessly; dedup absorbs the redeliveries) and reconnect now rather
            // than after the slowest handler.
            in_flight.detach_all();
            let _ = conn.close(200, "consumer reconnecting".into()).await;
            return Ok(end);
        }
        // Stop new deliveries, let in-flight handlers settle on this (still open) channel.
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let grace = self.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(%queue, ?grace, left = in_flight.len(), "handlers still running after the grace period; abandoning them unacked (the broker redelivers)");
            in_flight.abort_all();
        }
        // Closing returns every unacked delivery (prefetched, abandoned) to the queue.
        let _ = channel.close(200, "consumer stopping".into()).await;
        let _ = conn.close(200, "consumer stopping".into()).await;
        Ok(end)
    }

    /// Claim `delivery`; while the store does not answer, hold it (unacked, slot kept) and
    /// retry with capped backoff. `None` if shutdown came first or the delivery's channel
    /// died meanwhile (the broker is redelivering it: running it here would be a duplicate).
    async fn claim(&self, delivery: &Delivery, acker: &lapin::Acker) -> Option<ClaimDecision> {
        let mut backoff: Option<Backoff> = None;
        let mut signal = self.shutdown.signal();
        loop {
            let decision = claim(
                self.dedup.as_ref(),
                &self.config.dedup_prefix,
                self.consumer.timeout(),
                delivery,
            )
            .await;
            let ClaimDecision::StoreDown(e) = &decision else {
                if backoff.is_some() {
                    self.stats.paused.fetch_sub(1, Ordering::Relaxed);
                    info!("dedup store answers again; resuming");
                }
                return Some(decision);
            };
            let delay = match &mut backoff {
                Some(b) => b.next_delay(),
                None => {
                    warn!(error = %e, "dedup store unreachable: pausing this delivery (unacked, nothing dead-lettered) until it answers");
                    self.stats.paused.fetch_add(1, Ordering::Relaxed);
                    backoff
                        .insert(Backoff::new(DEDUP_RETRY_MAX_DELAY))
                        .next_delay()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = signal.cancelled() => {
                    self.stats.paused.fetch_sub(1, Ordering::Relaxed);
                    return None;
                }
            }
            if !acker.usable() {
                self.stats.paused.fetch_sub(1, Ordering::Relaxed);
                debug!("channel gone while paused on the dedup store; the broker redelivers");
                return None;
            }
        }
    }

    /// Take a delivery apart into what the handler sees, its acker and its span.
    fn receive(
        &self,
        raw: lapin::message::Delivery,
    ) -> (Arc<Delivery>, lapin::Acker, tracing::Span) {
        ConsumerStats::bump(&self.stats.received);
        let lapin::message::Delivery {
            delivery_tag,
            exchange,
            routing_key,
            redelivered,
            properties,
            data,
            acker,
        } = raw;
        let delivery = Arc::new(Delivery {
            body: data,
            properties,
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            queue: self.consumer.queue().to_owned(),
            redelivered,
            delivery_tag,
            publisher: Some(self.publisher.clone()),
            states: Arc::clone(&self.states),
        });
        let span = info_span!(
            "delivery",
            queue = %self.consumer.queue(),
            message_id = delivery.message_id().unwrap_or(""),
            delivery_tag,
            redelivered,
            attempt = delivery.attempt(),
        );
        (delivery, acker, span)
    }

    /// Re-subscribe with the full prefetch window (a consumer's prefetch is fixed when it
    /// subscribes). Deliveries already received stay unacked on the channel and settle as
    /// usual.
    async fn widen(
        &self,
        channel: &lapin::Channel,
        tag: &mut String,
    ) -> Result<lapin::Consumer, Error> {
        let queue = self.consumer.queue();
        channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
            .map_err(|e| Error::amqp("widening the prefetch window", e))?;
        // A fresh tag: RabbitMQ 3.10 crashes the channel when a quorum queue consumer
        // subscribes again under the tag it just cancelled.
        *tag = self.consumer_tag();
        channel
            .basic_qos(self.consumer.prefetch(), BasicQosOptions::default())
            .await
            .map_err(|e| Error::amqp("setting prefetch", e))?;
        channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| Error::amqp(format!("subscribing to queue '{queue}'"), e))
    }

    /// A fresh consumer tag, cut to fit an AMQP short string whatever the consumer's name.
    fn consumer_tag(&self) -> String {
        reliable_mq_model::consumer_tag(
            self.consumer.name(),
            &uuid::Uuid::new_v4().simple().to_string(),
        )
    }

    /// Dead-letter a delivery that failed the receive-side checks ([`inspect::refuse`]).
    async fn refuse(
        &self,
        mut delivery: Arc<Delivery>,
        acker: &lapin::Acker,
        refusal: inspect::Refusal,
        topology_broken: &mpsc::Sender<String>,
    ) {
        let inspect::Refusal {
            reason,
            drop_headers,
        } = refusal;
        warn!(%reason, "refusing a delivery before decoding it");
        if drop_headers {
            // Nothing else holds a refused delivery yet (no claim, no handler).
            match Arc::get_mut(&mut delivery) {
                Some(d) => d.properties = d.properties.clone().with_headers(FieldTable::default()),
                None => error!("a refused delivery is shared; its headers stay on the dead letter"),
            }
        }
        let settler = Settler {
            topology: &self.topology,
            publisher: &self.publisher,
            stats: &self.stats,
            topology_broken,
        };
        let outcome = SettleOutcome::DeadLetter {
            kind: crate::FailureKind::Decode,
            message: reason,
        };
        settler.settle(acker, &delivery, outcome).await;
    }

    /// One delivery through claim (started by the driver for idempotent consumers) ->
    /// handler -> settle. `slot` is given back as soon as
    /// the handler returns: settling (the `done` mark, the ack, a retry or dead-letter
    /// copy) does not hold up the next handler. Unsettled deliveries stay bounded by the
    /// prefetch window.
    async fn process(
        &self,
        delivery: Arc<Delivery>,
        acker: lapin::Acker,
        claim: Option<tokio::task::JoinHandle<Option<ClaimDecision>>>,
        slot: tokio::sync::OwnedSemaphorePermit,
        topology_broken: mpsc::Sender<String>,
    ) {
        let mut slot = Some(slot);
        let settler = Settler {
            topology: &self.topology,
            publisher: &self.publisher,
            stats: &self.stats,
            topology_broken: &topology_broken,
        };
        let decision = match claim {
            Some(task) => task.await.ok().flatten(),
            None => self.claim(&delivery, &acker).await,
        };
        let Some(decision) = decision else {
            // Shutdown, or the channel died, while paused on the dedup store: leave it
            // unacked; the broker gets it back when the channel closes.
            return;
        };
        let outcome = match decision {
            ClaimDecision::Run(guard) => {
                let handler = self.consumer.handler.as_ref();
                let call = invoke(handler, Arc::clone(&delivery), self.consumer.timeout());
                let result = match &guard {
                    Some(g) => g.renew_while(call).await,
                    None => call.await,
                };
                // The handler is done: its slot goes to the next delivery while this settles.
                slot = None;
                match result {
                    Ok(()) => {
                        if let Some(g) = guard {
                            g.complete(self.consumer.dedup_ttl()).await;
                        }
                        ConsumerStats::bump(&self.stats.handled);
                        debug!("handled");
                        SettleOutcome::Ack
                    }
                    Err(e) => {
                        if let Some(g) = guard {
                            g.release().await;
                        }
                        warn!(error = %e, "handler failed");
                        SettleOutcome::from_error(e)
                    }
                }
            }
            ClaimDecision::Duplicate => {
                ConsumerStats::bump(&self.stats.duplicates);
                debug!("duplicate of a handled message; acking without a handler call");
                SettleOutcome::Ack
            }
            ClaimDecision::HeldElsewhere => {
                debug!("another delivery holds the claim; requeueing with a delay");
                SettleOutcome::RequeueHeld
            }
            ClaimDecision::MissingMessageId => SettleOutcome::DeadLetter {
                kind: crate::FailureKind::MissingMessageId,
                message: "idempotent consumer received a message without message_id; publish with a message_id (reliable_mq::Publisher sets one)".into(),
            },
            ClaimDecision::StoreDown(e) => {
                // Unreachable: `Self::claim` only returns once the store answered.
                error!(error = %e, "dedup store down at claim time; putting the message back");
                SettleOutcome::PutBack
            }
        };
        drop(slot);
        settler.settle(&acker, &delivery, outcome).await;
    }
}
