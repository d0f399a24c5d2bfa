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
//! delivery limit) until the broker's `consumer_timeout` comes near: a delivery held that
//! long is handed back (nack, requeue) rather than have the broker close the channel. If
//! the process dies meanwhile, the broker redelivers as usual.
//!
//! A session ends only when its link breaks or at shutdown: a delivery that cannot be
//! settled (its copy refused) is held in place, not turned into a reconnect. Sessions that
//! keep dying soon after attaching are spaced by a growing delay.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use futures_util::future::Either;
use lapin::options::{BasicCancelOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::connection::{self, Backoff};
use crate::consumer::claim::{ClaimAhead, ClaimDecision, claim, claim_ahead};
use crate::consumer::inspect;
use crate::consumer::invoke::invoke;
use crate::consumer::renew::Renewals;
use crate::consumer::settle::{SettleOutcome, Settler};
use crate::consumer::{ConsumerStats, InFlight, hand_back_deadline};
use crate::dedup::{DedupStore, KeyScope};
use crate::publisher::Publisher;
use crate::shutdown::ShutdownHandle;
use crate::spec::ConsumerConfig;
use crate::topology::Topology;
use crate::transport::{Acker, Link, RawDelivery, Transport};
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

/// The frame limit the in-memory broker reports (RabbitMQ's default).
#[cfg(feature = "testing")]
const MEMORY_FRAME_MAX: usize = 131_072;

/// One subscription and what it came with, on either transport (see `crate::transport`).
// One per session, made once and never moved around: boxing would only add a hop.
#[allow(clippy::large_enum_variant)]
enum Session {
    Lapin {
        conn: Arc<lapin::Connection>,
        channel: lapin::Channel,
        deliveries: lapin::Consumer,
        tag: String,
    },
    #[cfg(feature = "testing")]
    Memory(crate::transport::memory::Subscription),
}

impl Session {
    /// The next delivery; `Err` with the reason when the link broke, `None` when the
    /// broker cancelled the subscription.
    async fn next(&mut self) -> Option<Result<RawDelivery, String>> {
        match self {
            Self::Lapin { deliveries, .. } => match deliveries.next().await? {
                Ok(d) => Some(Ok(RawDelivery::from(d))),
                Err(e) => Some(Err(inspect::stream_error(&e))),
            },
            #[cfg(feature = "testing")]
            Self::Memory(sub) => Some(sub.next().await),
        }
    }

    /// Resolves with the reason once the link is no longer usable.
    async fn lost(&self) -> String {
        match self {
            Self::Lapin { conn, channel, .. } => link_lost(conn, channel).await,
            #[cfg(feature = "testing")]
            Self::Memory(sub) => sub.lost().await,
        }
    }

    /// The reason the link was `lost`, made precise by what the deliveries read ahead say
    /// (see [`inspect::lost_because`]).
    async fn lost_because(&mut self, lost: String) -> String {
        match self {
            Self::Lapin { deliveries, .. } => inspect::lost_because(deliveries, lost).await,
            #[cfg(feature = "testing")]
            Self::Memory(_) => lost,
        }
    }

    /// Stop new deliveries (shutdown); those in flight still settle.
    async fn cancel(&self) {
        match self {
            Self::Lapin { channel, tag, .. } => {
                let _ = channel
                    .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                    .await;
            }
            #[cfg(feature = "testing")]
            Self::Memory(_) => {}
        }
    }

    /// Close the channel and connection: every unacked delivery returns to the queue.
    async fn close(&self) {
        match self {
            // Only this consumer's channel: the connection carries the others.
            Self::Lapin { channel, .. } => {
                let _ = channel.close(200, "consumer stopping".into()).await;
            }
            #[cfg(feature = "testing")]
            Self::Memory(sub) => sub.close(),
        }
    }

    /// The link broke: close what is left of it before reconnecting.
    async fn drop_connection(&self) {
        match self {
            // Only this consumer's channel (closing it returns what it held to the queue);
            // if the shared connection itself broke, the next session reopens it.
            Self::Lapin { channel, .. } => {
                if channel.status().connected() {
                    let _ = channel.close(200, "consumer restarting".into()).await;
                }
            }
            #[cfg(feature = "testing")]
            Self::Memory(sub) => sub.close(),
        }
    }
}

/// How often a session with every slot busy checks that its link is still up.
const LINK_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Longest wait between claim attempts while the dedup store is down.
const DEDUP_RETRY_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// A session that stayed up this long was healthy: the reconnect delay starts over after
/// it. One that died sooner (a permanent failure that kills every session) makes the delay
/// grow, so it cannot become a reconnect loop.
const STABLE_SESSION: std::time::Duration = std::time::Duration::from_secs(10);

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
    /// Where this app's dedup keys live (prefix, namespace, vhost).
    pub(crate) key_scope: KeyScope,
    /// Paces the held settle copies of this consumer (see `Settler::retry_gate`).
    pub(crate) retry_gate: tokio::sync::Mutex<Backoff>,
    /// Renews the leases of this consumer's claims, one sweep for all of them.
    pub(crate) renewals: Renewals,
    /// RabbitMQ, or the in-memory broker of feature `testing` (only read with it).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) transport: Transport,
    /// The connections consumers share, and which one this consumer's channels are on.
    pub(crate) connections: Arc<connection::ConnectionSet>,
    pub(crate) connection_slot: usize,
    /// Makes the spans of this consumer's deliveries.
    pub(crate) spans: crate::observe::trace::ProcessSpans,
}

/// Spaces the sessions of one consumer.
struct SessionPacing {
    backoff: Backoff,
    last_cause: Option<String>,
}

impl SessionPacing {
    fn new(max: std::time::Duration) -> Self {
        Self {
            backoff: Backoff::new(max),
            last_cause: None,
        }
    }

    /// The delay before the next session, after one that ended with `cause`, having
    /// `attached` (got as far as consuming) or not, `lived` long.
    ///
    /// A session that attached and then stayed up, or died of something new, was healthy:
    /// the delay starts over, so a week of rare disconnects never builds up to the cap.
    /// Sessions dying soon of the same cause again and again (a permanent failure) keep
    /// the delay growing, so they never become a reconnect loop.
    fn after(
        &mut self,
        attached: bool,
        lived: std::time::Duration,
        cause: &str,
    ) -> std::time::Duration {
        let new_cause = self.last_cause.as_deref() != Some(cause);
        if attached && (lived >= STABLE_SESSION || new_cause) {
            self.backoff.reset();
        }
        if new_cause {
            self.last_cause = Some(cause.to_owned());
        }
        self.backoff.next_delay()
    }
}

/// What a delivery's processing needs to hold it in place when it cannot be settled.
struct Held<'a> {
    /// Hand it back to the broker by then (its `consumer_timeout` is near).
    hand_back_at: Instant,
    /// The session's connection (to redeclare the topology on).
    connection: &'a Link,
}

/// What the task of one delivery with a slot owns (see `ConsumerRuntime::process`).
struct Task {
    delivery: Arc<Delivery>,
    acker: Acker,
    /// The claim sent when the delivery arrived (idempotent consumers).
    claim: Option<ClaimAhead>,
    /// Given back as soon as the handler returns.
    slot: tokio::sync::OwnedSemaphorePermit,
    hand_back_at: Instant,
    /// The session's connection (to redeclare the topology on).
    link: Arc<Link>,
    busy: InFlight,
}

/// A delivery received and waiting for a slot, its claim under way.
struct Waiting {
    delivery: Arc<Delivery>,
    acker: Acker,
    claim: Option<ClaimAhead>,
    hand_back_at: Instant,
    span: crate::observe::trace::DeliverySpan,
    busy: InFlight,
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
        let mut pacing = SessionPacing::new(self.config.max_reconnect_delay);
        let mut signal = self.shutdown.signal();
        let mut unreadable_frames = inspect::UnreadableFrames::default();
        loop {
            if signal.is_triggered() {
                return Ok(());
            }
            let attached_before = self.stats.sessions.load(Ordering::Relaxed);
            let started = Instant::now();
            let end = match self.session(unreadable_frames.narrow()).await {
                Ok(end) => end,
                Err(e @ Error::TopologyMismatch { .. }) => return Err(e),
                Err(e) => SessionEnd::Broken(e.to_string()),
            };
            self.stats.attached.store(false, Ordering::Relaxed);
            self.stats.metrics.attached(false);
            match end {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Broken(reason) => {
                    // A session that died of a frame the client cannot read gets it
                    // again first: it never counts as healthy, so the delay keeps growing.
                    let unreadable = unreadable_frames
                        .after_session(&self.config, &self.consumer, &reason)
                        .await;
                    let attached = self.stats.sessions.load(Ordering::Relaxed) > attached_before
                        && !unreadable;
                    let delay = pacing.after(attached, started.elapsed(), &reason);
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
        // Opening can wait on a broker that accepts connections and never answers (up to
        // the connect timeout, then the next address): shutdown must not wait for it.
        let mut opening_signal = self.shutdown.signal();
        let (mut session, link, frame_max) = tokio::select! {
            opened = self.open_session(narrow) => opened?,
            _ = opening_signal.cancelled() => return Ok(SessionEnd::Shutdown),
        };
        let mut narrow_reads = 0u8;
        ConsumerStats::bump(&self.stats.sessions);
        self.stats.attached.store(true, Ordering::Relaxed);
        self.stats.metrics.attached(true);
        let prefetch = if narrow { 1 } else { self.consumer.prefetch() };
        info!(%queue, prefetch, concurrency = self.consumer.concurrency(), "consumer attached");

        let limits = inspect::Limits {
            max_body_size: self.config.max_body_size,
            frame_max,
        };
        let slots = Arc::new(Semaphore::new(usize::from(self.consumer.concurrency())));
        let mut in_flight = JoinSet::new();
        // One wait for shutdown for the whole session, not one per delivery: each is a
        // waiter registered with the token and removed again.
        let mut signal = self.shutdown.signal();
        let shutdown = signal.cancelled();
        tokio::pin!(shutdown);

        // Deliveries received and waiting for a slot, in delivery order, each with its claim
        // already under way (claim ahead): the store's round trips for the whole window
        // overlap the handlers, and claims that queue up together go to the store in one
        // batch. At most a prefetch window of them (the broker sends no more unacked).
        let mut waiting: VecDeque<Waiting> = VecDeque::new();
        let read_ahead = usize::from(self.consumer.prefetch());
        let end = loop {
            let next = if waiting.is_empty() {
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break SessionEnd::Shutdown,
                    next = session.next() => next,
                }
            } else {
                let full = waiting.len() >= read_ahead;
                let got = if full {
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => break SessionEnd::Shutdown,
                        // Slots go out in delivery order: always to the oldest waiting.
                        permit = Arc::clone(&slots).acquire_owned() => Either::Left(permit),
                        // With the window full the delivery stream is not polled, so watch
                        // the link directly: a broker restart must not go unnoticed behind
                        // slow handlers.
                        reason = session.lost() => {
                            break SessionEnd::Broken(session.lost_because(reason).await);
                        }
                    }
                } else {
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => break SessionEnd::Shutdown,
                        permit = Arc::clone(&slots).acquire_owned() => Either::Left(permit),
                        next = session.next() => Either::Right(next),
                    }
                };
                match got {
                    Either::Right(next) => next,
                    Either::Left(permit) => {
                        let Ok(permit) = permit else {
                            break SessionEnd::Broken("slot semaphore closed".into());
                        };
                        let Some(w) = waiting.pop_front() else {
                            continue;
                        };
                        // Reap finished tasks so the set does not grow with the session.
                        while in_flight.try_join_next().is_some() {}
                        let this = Arc::clone(self);
                        let link = Arc::clone(&link);
                        let Waiting {
                            delivery,
                            acker,
                            claim,
                            hand_back_at,
                            span,
                            busy,
                        } = w;
                        // Boxed: the task then holds a pointer, not the whole state
                        // machine, which tokio would copy on spawn and on completion.
                        let task = Task {
                            delivery,
                            acker,
                            claim,
                            slot: permit,
                            hand_back_at,
                            link,
                            busy,
                        };
                        in_flight.spawn(Box::pin(span.instrument(this.process(task))));
                        continue;
                    }
                }
            };
            // The broker's `consumer_timeout` runs from here.
            let hand_back_at = hand_back_deadline(Instant::now(), self.config.consumer_timeout);
            let raw = match next {
                Some(Ok(d)) if narrow => {
                    // With a prefetch of one, a second delivery means the first was settled
                    // and both were readable: the unreadable one is gone (or behind, and
                    // nothing unsettled is lost with the connection): full window again.
                    narrow_reads += 1;
                    if narrow_reads == 2 {
                        narrow = false;
                        if let Err(e) = self.widen(&mut session).await {
                            break SessionEnd::Broken(e.to_string());
                        }
                    }
                    d
                }
                Some(Ok(d)) => d,
                Some(Err(e)) => break SessionEnd::Broken(e),
                None => {
                    break SessionEnd::Broken(
                        "the broker cancelled the subscription (queue deleted?)".into(),
                    );
                }
            };
            let (delivery, acker, span) = self.receive(raw);
            let busy = InFlight::new(&self.stats);
            if let Some(refusal) = inspect::refuse(&delivery, limits) {
                // Hostile input: to the DLQ without a slot, a claim or a handler call.
                let (this, link) = (Arc::clone(self), Arc::clone(&link));
                in_flight.spawn(span.instrument(async move {
                    let _busy = busy;
                    let held = Held {
                        hand_back_at,
                        connection: &link,
                    };
                    this.refuse(delivery, &acker, refusal, held).await
                }));
                continue;
            }
            // The claim is sent now, while the delivery waits for a slot; its lease is
            // renewed from the moment it is taken.
            let claim = self.dedup.is_some().then(|| {
                claim_ahead(
                    self.dedup.as_ref(),
                    &self.renewals,
                    &self.key_scope,
                    self.consumer.timeout(),
                    &delivery,
                )
            });
            waiting.push_back(Waiting {
                delivery,
                acker,
                claim,
                hand_back_at,
                span,
                busy,
            });
        };
        // Deliveries that never got a slot stay unacked (the broker gets them back with the
        // channel); a claim taken for one is released when its task's guard is dropped.
        drop(waiting);

        self.stats.attached.store(false, Ordering::Relaxed);
        self.stats.metrics.attached(false);
        if let SessionEnd::Broken(_) = &end {
            // The channel is gone: in-flight handlers cannot ack on it any more, and the
            // broker is already redelivering their messages. Let them finish detached (their
            // acks fail harmlessly; dedup absorbs the redeliveries) and reconnect now rather
            // than after the slowest handler.
            in_flight.detach_all();
            session.drop_connection().await;
            return Ok(end);
        }
        // Stop new deliveries, let in-flight handlers settle on this (still open) channel.
        session.cancel().await;
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
        session.close().await;
        Ok(end)
    }

    /// Connect, declare the topology, set the prefetch window and subscribe, on this
    /// consumer's transport. Also returns the link to redeclare on and the frame limit.
    async fn open_session(&self, narrow: bool) -> Result<(Session, Arc<Link>, usize), Error> {
        let prefetch = if narrow { 1 } else { self.consumer.prefetch() };
        #[cfg(feature = "testing")]
        if let Transport::Memory(broker) = &self.transport {
            broker.declare(&self.topology)?;
            let subscription = broker.subscribe(self.consumer.queue(), prefetch);
            let link = Arc::new(Link::Memory(Arc::clone(broker)));
            return Ok((Session::Memory(subscription), link, MEMORY_FRAME_MAX));
        }
        let queue = self.consumer.queue();
        let conn = self.connections.get(self.connection_slot).await?;
        self.topology.declare(&conn).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| Error::amqp("opening the consumer channel", e))?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| Error::amqp("setting prefetch", e))?;
        let tag = self.consumer_tag();
        let (options, args) = self.consumer.consume_options();
        let deliveries = channel
            .basic_consume(queue.into(), tag.as_str().into(), options, args)
            .await
            .map_err(|e| Error::amqp(format!("subscribing to queue '{queue}'"), e))?;
        let frame_max = usize::try_from(conn.configuration().frame_max()).unwrap_or(usize::MAX);
        let link = Arc::new(Link::Lapin(Arc::clone(&conn)));
        Ok((
            Session::Lapin {
                conn,
                channel,
                deliveries,
                tag,
            },
            link,
            frame_max,
        ))
    }

    /// Claim `delivery`; while the store does not answer, hold it (unacked, slot kept) and
    /// retry with capped backoff. `None` if shutdown came first, the delivery's channel
    /// died meanwhile (the broker is redelivering it: running it here would be a duplicate)
    /// or it was held until `hand_back_at` and handed back to the broker.
    async fn claim(
        &self,
        delivery: &Delivery,
        acker: &Acker,
        hand_back_at: Instant,
    ) -> Option<ClaimDecision> {
        let decision = self.claim_once(delivery).await;
        if !matches!(decision, ClaimDecision::StoreDown(_)) {
            return Some(decision);
        }
        // Boxed: the pause's state machine (timers, the hand-back) would otherwise be
        // part of every claim task's future, copied whole when it is spawned.
        Box::pin(self.claim_paused(decision, delivery, acker, hand_back_at)).await
    }

    /// One claim attempt.
    async fn claim_once(&self, delivery: &Delivery) -> ClaimDecision {
        claim(
            self.dedup.as_ref(),
            &self.renewals,
            &self.key_scope,
            self.consumer.timeout(),
            delivery,
        )
        .await
    }

    /// [`Self::claim`] once the store did not answer (`first` is that answer): paused,
    /// claiming again with capped backoff.
    async fn claim_paused(
        &self,
        first: ClaimDecision,
        delivery: &Delivery,
        acker: &Acker,
        hand_back_at: Instant,
    ) -> Option<ClaimDecision> {
        let mut backoff: Option<Backoff> = None;
        // Counts the time paused when dropped, whichever way the pause ends.
        let mut _paused = None;
        let mut signal = self.shutdown.signal();
        let mut next = Some(first);
        loop {
            let decision = match next.take() {
                Some(first) => first,
                None => self.claim_once(delivery).await,
            };
            let ClaimDecision::StoreDown(e) = &decision else {
                if backoff.is_some() {
                    self.stats.paused.fetch_sub(1, Ordering::Relaxed);
                    info!("dedup store answers again; resuming");
                }
                return Some(decision);
            };
            self.stats.metrics.dedup_error();
            let delay = match &mut backoff {
                Some(b) => b.next_delay(),
                None => {
                    warn!(error = %e, "dedup store unreachable: pausing this delivery (unacked, nothing dead-lettered) until it answers");
                    self.stats.paused.fetch_add(1, Ordering::Relaxed);
                    _paused = Some(self.stats.metrics.paused());
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
                // Held any longer, the broker would close the channel (and with it every
                // delivery on it): give this one back; it comes round again.
                _ = tokio::time::sleep_until(hand_back_at) => {
                    self.stats.paused.fetch_sub(1, Ordering::Relaxed);
                    warn!("dedup store still unreachable; handing the delivery back before the broker's consumer_timeout");
                    crate::consumer::settle::put_back(acker, std::time::Duration::ZERO).await;
                    ConsumerStats::bump(&self.stats.requeued);
                    self.stats.metrics.requeued();
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
        raw: RawDelivery,
    ) -> (Arc<Delivery>, Acker, crate::observe::trace::DeliverySpan) {
        ConsumerStats::bump(&self.stats.received);
        self.stats.metrics.received();
        let RawDelivery {
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
            exchange,
            routing_key,
            queue: self.consumer.queue().to_owned(),
            redelivered,
            delivery_tag,
            publisher: Some(self.publisher.clone()),
            states: Arc::clone(&self.states),
        });
        let span = self.spans.delivery_span(&delivery);
        (delivery, acker, span)
    }

    /// Re-subscribe with the full prefetch window (a consumer's prefetch is fixed when it
    /// subscribes). Deliveries already received stay unacked on the channel and settle as
    /// usual.
    // Without feature `testing` a session can only be a lapin one.
    #[cfg_attr(not(feature = "testing"), allow(irrefutable_let_patterns))]
    async fn widen(&self, session: &mut Session) -> Result<(), Error> {
        let queue = self.consumer.queue();
        let Session::Lapin {
            channel,
            deliveries,
            tag,
            ..
        } = session
        else {
            // The in-memory broker never sends an unreadable frame, so never narrows.
            return Ok(());
        };
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
        let (options, args) = self.consumer.consume_options();
        *deliveries = channel
            .basic_consume(queue.into(), tag.as_str().into(), options, args)
            .await
            .map_err(|e| Error::amqp(format!("subscribing to queue '{queue}'"), e))?;
        Ok(())
    }

    /// A fresh consumer tag, cut to fit an AMQP short string whatever the consumer's name.
    fn consumer_tag(&self) -> String {
        reliable_mq_model::consumer_tag(
            self.consumer.name(),
            &uuid::Uuid::new_v4().simple().to_string(),
        )
    }

    /// What settles this consumer's deliveries on the session of `held`.
    fn settler<'a>(&'a self, held: &Held<'a>) -> Settler<'a> {
        Settler {
            topology: &self.topology,
            publisher: &self.publisher,
            stats: &self.stats,
            connection: held.connection,
            retry_gate: &self.retry_gate,
            hand_back_at: held.hand_back_at,
            shutdown: &self.shutdown,
        }
    }

    /// Dead-letter a delivery that failed the receive-side checks ([`inspect::refuse`]).
    async fn refuse(
        &self,
        mut delivery: Arc<Delivery>,
        acker: &Acker,
        refusal: inspect::Refusal,
        held: Held<'_>,
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
        let settler = self.settler(&held);
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
    ///
    /// It is the delivery's task itself (owning what it needs, not wrapped in another
    /// future), and keeps what it holds across its awaits small: its future is allocated
    /// and copied once per delivery.
    async fn process(self: Arc<Self>, task: Task) {
        let Task {
            delivery,
            acker,
            claim,
            slot,
            hand_back_at,
            link,
            busy: _busy,
        } = task;
        let mut slot = Some(slot);
        let _in_flight = self.stats.metrics.in_flight();
        // The rarely taken paths (a claim made here, the inbox, a settle copy) are boxed:
        // inline, their state machines would make this task's future several kB, which
        // is copied whole when the task is spawned.
        let decision = match claim {
            Some(ahead) => match ahead.decision().await {
                down @ ClaimDecision::StoreDown(_) => {
                    Box::pin(self.claim_paused(down, &delivery, &acker, hand_back_at)).await
                }
                decision => Some(decision),
            },
            None if self.dedup.is_none() => Some(ClaimDecision::Run(None)),
            None => Box::pin(self.claim(&delivery, &acker, hand_back_at)).await,
        };
        let Some(decision) = decision else {
            // Shutdown, or the channel died, while paused on the dedup store: leave it
            // unacked; the broker gets it back when the channel closes.
            return;
        };
        let outcome = match decision {
            #[cfg(feature = "postgres")]
            ClaimDecision::Run(None) if self.consumer.is_inbox() => {
                let call = crate::postgres::inbox::InboxCall {
                    handler: self.consumer.handler.as_ref(),
                    delivery: &delivery,
                    acker: &acker,
                    consumer: self.consumer.queue(),
                    timeout: self.consumer.timeout(),
                    dedup_ttl: self.consumer.dedup_ttl(),
                    stats: &self.stats,
                    shutdown: &self.shutdown,
                    hand_back_at,
                };
                match Box::pin(call.run()).await {
                    Some(outcome) => outcome,
                    // Left unacked: the broker redelivers it.
                    None => return,
                }
            }
            ClaimDecision::Run(guard) => {
                let handler = self.consumer.handler.as_ref();
                // The claim's lease is renewed by the consumer's sweep, beside the call.
                let timer = self.stats.metrics.timer();
                let result = invoke(handler, Arc::clone(&delivery), self.consumer.timeout()).await;
                self.stats.metrics.handler_took(timer);
                // The handler is done: its slot goes to the next delivery while this settles.
                slot = None;
                match result {
                    Ok(()) => {
                        if let Some(g) = guard {
                            g.complete(self.consumer.dedup_ttl()).await;
                        }
                        ConsumerStats::bump(&self.stats.handled);
                        self.stats.metrics.handled();
                        debug!("handled");
                        SettleOutcome::Ack
                    }
                    Err(e) => {
                        if let Some(g) = guard {
                            g.release().await;
                        }
                        crate::observe::trace::record_error(e.kind().as_str());
                        warn!(error = %e, "handler failed");
                        SettleOutcome::from_error(e)
                    }
                }
            }
            ClaimDecision::Duplicate => {
                ConsumerStats::bump(&self.stats.duplicates);
                self.stats.metrics.duplicate();
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
        let timer = self.stats.metrics.timer();
        let name = outcome.name();
        if outcome == SettleOutcome::Ack {
            crate::observe::trace::settling(
                crate::consumer::settle::ack(&acker),
                delivery.queue(),
                name,
            )
            .await;
        } else {
            let held = Held {
                hand_back_at,
                connection: &link,
            };
            let settler = self.settler(&held);
            crate::observe::trace::settling(
                Box::pin(settler.settle(&acker, &delivery, outcome)),
                delivery.queue(),
                name,
            )
            .await;
        }
        self.stats.metrics.settled(timer);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether `delay` is the `n`th (0-based) of a doubling series from 100 ms, with
    /// the backoff's jitter (up to twice the nominal delay).
    fn nth(delay: Duration, n: u32) -> bool {
        let nominal = 100u128 << n;
        (nominal..=2 * nominal).contains(&delay.as_millis())
    }

    #[test]
    fn sessions_dying_soon_of_the_same_cause_are_spaced_ever_wider() {
        let mut pacing = SessionPacing::new(Duration::from_secs(30));
        let soon = Duration::from_millis(50);
        let refused = "channel closed: ACCESS_REFUSED";
        for n in 0..6 {
            let delay = pacing.after(true, soon, refused);
            assert!(nth(delay, n), "delay {n} grows: {delay:?}");
        }
        // A session that stayed up was healthy: the delay starts over.
        assert!(nth(pacing.after(true, STABLE_SESSION, refused), 0));
        assert!(nth(pacing.after(true, soon, refused), 1));
        // So does one that died of something new; failed connects never reset it.
        assert!(nth(pacing.after(true, soon, "connection lost"), 0));
        assert!(nth(pacing.after(false, soon, "connect refused"), 1));
        assert!(nth(pacing.after(false, soon, "connect refused"), 2));
    }
}
