//! An in-memory AMQP 0-9-1 broker, just large enough for what reliable-mq relies on, for
//! tests without RabbitMQ (feature `testing`). The runtime's own pipeline runs on it: only
//! the transport is swapped (see the parent module).
//!
//! Modelled: durable exchanges (direct, topic with `*` and `#`, fanout, headers) and the
//! default exchange; queues and bindings; dead-letter routing (`x-dead-letter-exchange`,
//! `x-dead-letter-routing-key`) on reject without requeue and on expiry, with an `x-death`
//! record; `mandatory` returns; publisher confirms; prefetch, ack, nack, requeue and the
//! redelivered flag; a connection loss that requeues what was unacked.
//!
//! Expiry follows RabbitMQ's rules for both TTLs: a message lives the lower of the queue's
//! `x-message-ttl` and its own `expiration` (counted from when it entered the queue, and
//! kept when it is requeued), and it is only dropped or dead-lettered once it reaches the
//! head of the queue. With a queue TTL alone every message lives as long, so they expire
//! in order, each on time; a per-message `expiration` shorter than the one of a message
//! ahead of it waits behind it and goes with it. An expired message is never delivered.
//! Time is tokio's: on a paused clock, a retry tier of an hour expires as soon as nothing
//! else is runnable.
//!
//! Not modelled (a green test here proves nothing about these): clustering and failover,
//! quorum queues' delivery limit and their at-least-once dead-lettering, memory and disk
//! alarms (blocked connections), frame and message size limits, the TTL 0 rule (RabbitMQ
//! hands such a message to a consumer waiting at that instant, else expires it; here it
//! races the consumer), priorities, `x-max-length` and overflow, exclusive and auto-delete queues,
//! `consumer_timeout`, channel-level errors other than a missing exchange, and
//! PRECONDITION_FAILED on redeclaring with other arguments (the last declaration wins).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::Error;
use crate::publisher::ledger::Outcome;
use crate::spec::ExchangeKind;
use crate::topology::{Declaration, Topology};
use crate::transport::{Acker, RawDelivery};

/// Who published a message, as recorded in [`MemoryBroker::published`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The test itself (`TestApp::publish`).
    Test,
    /// A handler, through the app's publisher.
    Handler,
    /// The runtime: a retry, requeue or dead-letter copy made by settle.
    Settle,
    /// The broker: dead-lettering on reject or expiry.
    Broker,
}

/// One publish the broker received, routed or not.
#[derive(Debug, Clone)]
pub struct Published {
    /// Who published it.
    pub origin: Origin,
    /// Exchange published to (`""`: the default exchange).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Properties, headers included.
    pub properties: BasicProperties,
    /// Body.
    pub body: Vec<u8>,
    /// Queues it was routed to (empty: unroutable).
    pub routed_to: Vec<String>,
    /// When it was published, on tokio's clock.
    pub at: Instant,
}

/// A message sitting in a queue.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// Exchange it was published to.
    pub exchange: String,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Properties, headers included.
    pub properties: BasicProperties,
    /// Body.
    pub body: Vec<u8>,
    /// Whether it was delivered before.
    pub redelivered: bool,
    /// When it expires: the lower of the queue's `x-message-ttl` and its `expiration`,
    /// from when it entered the queue.
    expires_at: Option<Instant>,
}

impl StoredMessage {
    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Fault injection, each a count of the next operations it applies to.
#[derive(Debug, Default)]
struct Faults {
    fail_publish: u32,
    nack_confirm: u32,
    duplicate: u32,
    lose_ack: u32,
}

#[derive(Debug, Default)]
struct QueueState {
    ttl: Option<Duration>,
    dlx: Option<String>,
    dlrk: Option<String>,
    ready: VecDeque<StoredMessage>,
    /// Delivered, not settled: by delivery tag, with the session generation and the
    /// subscription it went to.
    unacked: HashMap<u64, (StoredMessage, u64)>,
}

impl QueueState {
    /// Take the arguments this broker models: `x-message-ttl`, `x-dead-letter-exchange`
    /// and `x-dead-letter-routing-key` (the last declaration wins).
    fn configure(&mut self, args: &FieldTable) {
        self.ttl = int_arg(args, "x-message-ttl")
            .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
        self.dlx = str_arg(args, "x-dead-letter-exchange");
        self.dlrk = str_arg(args, "x-dead-letter-routing-key");
    }
}

#[derive(Debug)]
struct Binding {
    exchange: String,
    queue: String,
    key: String,
    args: FieldTable,
}

#[derive(Debug, Default)]
struct State {
    exchanges: HashMap<String, ExchangeKind>,
    queues: HashMap<String, QueueState>,
    bindings: Vec<Binding>,
    next_tag: u64,
    next_subscription: u64,
    /// Bumped by a connection loss: ackers and subscriptions of an older one are dead.
    generation: u64,
    log: Vec<Published>,
    faults: Faults,
    /// Seeded choice of the next ready message (`None`: first in, first out).
    rng: Option<u64>,
}

/// The in-memory broker. Cheap to share (`Arc`); every app and publisher of one test
/// talks to the same one.
#[derive(Debug, Default)]
pub struct MemoryBroker {
    state: Mutex<State>,
    changed: Notify,
}

impl MemoryBroker {
    /// An empty broker delivering in publish order.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// An empty broker that picks each delivery among the ready messages of a queue by a
    /// generator seeded with `seed`: a different, reproducible order per seed.
    pub fn seeded(seed: u64) -> Arc<Self> {
        let broker = Self::default();
        lock(&broker.state).rng = Some(seed.max(1));
        Arc::new(broker)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn touch(&self) {
        self.changed.notify_waiters();
    }

    /// Declare everything `topology` needs.
    pub(crate) fn declare(&self, topology: &Topology) -> Result<(), Error> {
        let mut s = self.state();
        for step in topology.plan() {
            match step {
                Declaration::Exchange { name, kind } => {
                    s.exchanges.insert(name, kind);
                }
                Declaration::Queue { name, args } => {
                    s.queues.entry(name).or_default().configure(&args);
                }
                Declaration::Bind {
                    queue,
                    exchange,
                    key,
                } => {
                    let exists = s
                        .bindings
                        .iter()
                        .any(|b| b.queue == queue && b.exchange == exchange && b.key == key);
                    if !exists {
                        s.bindings.push(Binding {
                            exchange,
                            queue,
                            key,
                            args: FieldTable::default(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Declare an exchange (tests that publish to one no consumer declares).
    pub fn declare_exchange(&self, name: &str, kind: ExchangeKind) {
        self.state().exchanges.insert(name.to_owned(), kind);
    }

    /// Declare a plain queue (no TTL, no dead-lettering) and bind it to `exchange` with
    /// `key` (`exchange` empty: no binding), for tests that watch what handlers publish.
    pub fn declare_queue(&self, queue: &str, exchange: &str, key: &str) {
        let mut s = self.state();
        s.queues.entry(queue.to_owned()).or_default();
        if !exchange.is_empty() {
            s.bindings.push(Binding {
                exchange: exchange.to_owned(),
                queue: queue.to_owned(),
                key: key.to_owned(),
                args: FieldTable::default(),
            });
        }
    }

    /// Declare a queue with arguments, as `queue.declare` would, without a binding: of
    /// its arguments `x-message-ttl`, `x-dead-letter-exchange` and
    /// `x-dead-letter-routing-key` are modelled, the others ignored.
    pub fn declare_queue_with_args(&self, queue: &str, args: &FieldTable) {
        self.state()
            .queues
            .entry(queue.to_owned())
            .or_default()
            .configure(args);
    }

    /// Publish with `mandatory`, as a confirm-mode channel would: the outcome the
    /// publisher's ledger would have reported for it.
    pub(crate) fn publish(
        self: &Arc<Self>,
        origin: Origin,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: Vec<u8>,
    ) -> Outcome {
        let mut s = self.state();
        if s.faults.fail_publish > 0 {
            s.faults.fail_publish -= 1;
            return Outcome::Failed(None, "connection lost (injected fault)".into());
        }
        if let Some(e) = properties.expiration()
            && per_message_ttl(e.as_str()).is_none()
        {
            // RabbitMQ closes the channel with 406; the publisher reopens one.
            return Outcome::Failed(
                Some(406),
                format!("PRECONDITION_FAILED - invalid expiration '{e}'"),
            );
        }
        if !exchange.is_empty() && !s.exchanges.contains_key(exchange) {
            // RabbitMQ closes the channel with 404; the publisher reopens one.
            return Outcome::Failed(
                Some(404),
                format!("NOT_FOUND - no exchange '{exchange}' in vhost '/'"),
            );
        }
        if s.faults.nack_confirm > 0 {
            s.faults.nack_confirm -= 1;
            return Outcome::Nacked;
        }
        let queues = route(&s, exchange, routing_key, properties.headers().as_ref());
        let copies = if s.faults.duplicate > 0 {
            s.faults.duplicate -= 1;
            2
        } else {
            1
        };
        s.log.push(Published {
            origin,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            properties: properties.clone(),
            body: body.clone(),
            routed_to: queues.clone(),
            at: Instant::now(),
        });
        if queues.is_empty() {
            return Outcome::Returned(312, "NO_ROUTE".into());
        }
        for queue in &queues {
            for _ in 0..copies {
                self.enqueue(&mut s, queue, exchange, routing_key, &properties, &body);
            }
        }
        drop(s);
        self.touch();
        Outcome::Confirmed
    }

    fn enqueue(
        self: &Arc<Self>,
        s: &mut State,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        properties: &BasicProperties,
        body: &[u8],
    ) {
        let Some(q) = s.queues.get_mut(queue) else {
            return;
        };
        // The publish checked that an `expiration` parses; a dead-letter copy has none.
        let own = properties
            .expiration()
            .as_ref()
            .and_then(|e| per_message_ttl(e.as_str()));
        let ttl = match (q.ttl, own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // A TTL past what the clock can hold (RabbitMQ refuses one over ten years) never
        // runs out, rather than panic.
        let expires_at = ttl.and_then(|ttl| Instant::now().checked_add(ttl));
        q.ready.push_back(StoredMessage {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            properties: properties.clone(),
            body: body.to_vec(),
            redelivered: false,
            expires_at,
        });
        if let Some(at) = expires_at {
            // Wakes the queue then; it drops only what has reached the head by that time.
            let (broker, queue) = (Arc::downgrade(self), queue.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                if let Some(broker) = broker.upgrade() {
                    let mut s = broker.state();
                    let expired = broker.expire_head(&mut s, &queue);
                    drop(s);
                    if expired {
                        broker.touch();
                    }
                }
            });
        }
    }

    /// Dead-letter (or drop) the expired messages at the head of `queue`, up to the first
    /// one still alive: RabbitMQ looks at the head only, so an expired message behind a
    /// live one waits for it. Whether anything expired.
    fn expire_head(self: &Arc<Self>, s: &mut State, queue: &str) -> bool {
        let now = Instant::now();
        let mut any = false;
        loop {
            let Some(q) = s.queues.get_mut(queue) else {
                return any;
            };
            if !q.ready.front().is_some_and(|m| m.expired(now)) {
                return any;
            }
            let Some(message) = q.ready.pop_front() else {
                return any;
            };
            any = true;
            self.dead_letter(s, queue, message, "expired");
        }
    }

    /// Route `message` to `queue`'s dead-letter exchange (dropped if it has none, as
    /// RabbitMQ does), with an `x-death` record and without `expiration`.
    fn dead_letter(
        self: &Arc<Self>,
        s: &mut State,
        queue: &str,
        message: StoredMessage,
        reason: &str,
    ) {
        let Some(q) = s.queues.get(queue) else {
            return;
        };
        let Some(dlx) = q.dlx.clone() else {
            return;
        };
        let routing_key = q
            .dlrk
            .clone()
            .unwrap_or_else(|| message.routing_key.clone());
        if !dlx.is_empty() && !s.exchanges.contains_key(&dlx) {
            return;
        }
        let mut headers = message.properties.headers().clone().unwrap_or_default();
        let mut death = FieldTable::default();
        put(&mut death, "reason", reason);
        if let Some(e) = message.properties.expiration() {
            put(&mut death, "original-expiration", e.as_str());
        }
        put(&mut death, "queue", queue);
        put(&mut death, "exchange", &message.exchange);
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
                LongString::from(message.routing_key.as_str()),
            )])),
        );
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        if !headers.inner().contains_key("x-first-death-reason") {
            put(&mut headers, "x-first-death-reason", reason);
            put(&mut headers, "x-first-death-queue", queue);
            put(&mut headers, "x-first-death-exchange", &message.exchange);
        }
        put(&mut headers, "x-last-death-reason", reason);
        put(&mut headers, "x-last-death-queue", queue);
        put(&mut headers, "x-last-death-exchange", &message.exchange);
        let mut properties = message.properties.clone().with_headers(headers);
        properties = strip_expiration(properties);
        let targets = route(s, &dlx, &routing_key, properties.headers().as_ref());
        s.log.push(Published {
            origin: Origin::Broker,
            exchange: dlx.clone(),
            routing_key: routing_key.clone(),
            properties: properties.clone(),
            body: message.body.clone(),
            routed_to: targets.clone(),
            at: Instant::now(),
        });
        for target in targets {
            self.enqueue(s, &target, &dlx, &routing_key, &properties, &message.body);
        }
    }

    /// Subscribe to `queue` with a prefetch window of `prefetch` unacked deliveries.
    pub(crate) fn subscribe(self: &Arc<Self>, queue: &str, prefetch: u16) -> Subscription {
        let mut s = self.state();
        s.next_subscription += 1;
        s.queues.entry(queue.to_owned()).or_default();
        Subscription {
            broker: Arc::clone(self),
            queue: queue.to_owned(),
            id: s.next_subscription,
            generation: s.generation,
            prefetch: usize::from(prefetch.max(1)),
        }
    }

    /// Drop every connection: subscriptions end, ackers stop working and every unacked
    /// delivery goes back to its queue, marked redelivered (the consumers reconnect).
    pub fn drop_connections(self: &Arc<Self>) {
        let mut s = self.state();
        s.generation += 1;
        for q in s.queues.values_mut() {
            let mut back: Vec<(u64, StoredMessage)> =
                q.unacked.drain().map(|(tag, (m, _))| (tag, m)).collect();
            back.sort_by_key(|(tag, _)| std::cmp::Reverse(*tag));
            for (_, mut m) in back {
                m.redelivered = true;
                q.ready.push_front(m);
            }
        }
        // A requeued message keeps its expiry: one that ran out meanwhile goes now.
        let names: Vec<String> = s.queues.keys().cloned().collect();
        for name in names {
            self.expire_head(&mut s, &name);
        }
        drop(s);
        self.touch();
    }

    /// The next publish fails as a lost connection would (the publisher retries it).
    pub fn fail_next_publish(&self) {
        self.state().faults.fail_publish += 1;
    }

    /// The next routable publish is nacked by the broker (the publisher retries it).
    pub fn nack_next_confirm(&self) {
        self.state().faults.nack_confirm += 1;
    }

    /// The next publish is enqueued twice (a duplicate: same body, same `message_id`).
    pub fn duplicate_next_publish(&self) {
        self.state().faults.duplicate += 1;
    }

    /// The next ack is lost on its way: the message goes back to its queue, redelivered,
    /// as after a connection loss between a handler's success and its ack.
    pub fn lose_next_ack(&self) {
        self.state().faults.lose_ack += 1;
    }

    /// Everything published so far, in order.
    pub fn published(&self) -> Vec<Published> {
        self.state().log.clone()
    }

    /// The messages waiting in `queue` (not delivered), in order.
    pub fn messages(&self, queue: &str) -> Vec<StoredMessage> {
        self.state()
            .queues
            .get(queue)
            .map(|q| q.ready.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether every queue in `consumed` has nothing ready or unacked, and no queue holds a
    /// message that will expire (the wait tiers, a per-message `expiration`).
    pub(crate) fn is_idle(&self, consumed: &[String]) -> bool {
        let s = self.state();
        s.queues.iter().all(|(name, q)| {
            let busy_consumed =
                consumed.contains(name) && (!q.ready.is_empty() || !q.unacked.is_empty());
            let waiting = q.ready.iter().any(|m| m.expires_at.is_some());
            !busy_consumed && !waiting
        })
    }

    /// Notified at every change (a publish, an ack, an expiry, a connection loss).
    pub(crate) fn notify(&self) -> &Notify {
        &self.changed
    }

    fn settle(
        self: &Arc<Self>,
        queue: &str,
        tag: u64,
        generation: u64,
        requeue: Option<bool>,
    ) -> bool {
        let mut s = self.state();
        if s.generation != generation {
            return false;
        }
        let lose = requeue.is_none() && s.faults.lose_ack > 0;
        if lose {
            s.faults.lose_ack -= 1;
        }
        let Some(q) = s.queues.get_mut(queue) else {
            return false;
        };
        let Some((mut message, _)) = q.unacked.remove(&tag) else {
            return false;
        };
        match requeue {
            None if !lose => {}
            None | Some(true) => {
                message.redelivered = true;
                q.ready.push_front(message);
                // It kept its expiry; one that ran out while unacked goes now.
                self.expire_head(&mut s, queue);
            }
            Some(false) => self.dead_letter(&mut s, queue, message, "rejected"),
        }
        drop(s);
        self.touch();
        true
    }

    /// The next ready message of `queue` for subscription `id`, if its window has room.
    fn take(
        self: &Arc<Self>,
        queue: &str,
        id: u64,
        prefetch: usize,
    ) -> Option<(u64, StoredMessage)> {
        let mut s = self.state();
        // Never deliver an expired message, even if its timer has not fired yet.
        self.expire_head(&mut s, queue);
        let pick = s.rng.map(|mut x| {
            // xorshift64: reproducible, good enough to shuffle deliveries.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        });
        if let Some(x) = pick {
            s.rng = Some(x);
        }
        s.next_tag += 1;
        let tag = s.next_tag;
        let q = s.queues.get_mut(queue)?;
        let mine = q.unacked.values().filter(|(_, sub)| *sub == id).count();
        if mine >= prefetch || q.ready.is_empty() {
            return None;
        }
        let index = match pick {
            None => 0,
            // A seeded pick may reach behind the head: never an expired message.
            Some(x) => {
                let now = Instant::now();
                let alive: Vec<usize> = (0..q.ready.len())
                    .filter(|&i| !q.ready[i].expired(now))
                    .collect();
                *alive.get((x % alive.len().max(1) as u64) as usize)?
            }
        };
        let message = q.ready.remove(index)?;
        q.unacked.insert(tag, (message.clone(), id));
        Some((tag, message))
    }
}

/// A consumer's subscription to one queue, on one connection generation.
pub(crate) struct Subscription {
    broker: Arc<MemoryBroker>,
    queue: String,
    id: u64,
    generation: u64,
    prefetch: usize,
}

impl Subscription {
    fn alive(&self) -> bool {
        self.broker.state().generation == self.generation
    }

    /// The next delivery; `Err` once the connection is lost.
    pub(crate) async fn next(&self) -> Result<RawDelivery, String> {
        loop {
            let notified = self.broker.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.alive() {
                return Err("connection lost".into());
            }
            if let Some((tag, m)) = self.broker.take(&self.queue, self.id, self.prefetch) {
                return Ok(RawDelivery {
                    delivery_tag: tag,
                    exchange: m.exchange,
                    routing_key: m.routing_key,
                    redelivered: m.redelivered,
                    properties: m.properties,
                    data: m.body,
                    acker: Acker::Memory(MemoryAcker {
                        broker: Arc::clone(&self.broker),
                        queue: self.queue.clone(),
                        tag,
                        generation: self.generation,
                    }),
                });
            }
            notified.await;
        }
    }

    /// Resolves with the reason once the connection is lost.
    pub(crate) async fn lost(&self) -> String {
        loop {
            let notified = self.broker.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.alive() {
                return "connection lost".into();
            }
            notified.await;
        }
    }

    /// Cancel and close: what this subscription holds unacked goes back to the queue.
    pub(crate) fn close(&self) {
        let mut s = self.broker.state();
        if s.generation != self.generation {
            return;
        }
        if let Some(q) = s.queues.get_mut(&self.queue) {
            let mut back: Vec<u64> = q
                .unacked
                .iter()
                .filter(|(_, (_, sub))| *sub == self.id)
                .map(|(tag, _)| *tag)
                .collect();
            back.sort_unstable_by(|a, b| b.cmp(a));
            for tag in back {
                if let Some((mut m, _)) = q.unacked.remove(&tag) {
                    m.redelivered = true;
                    q.ready.push_front(m);
                }
            }
        }
        self.broker.expire_head(&mut s, &self.queue);
        drop(s);
        self.broker.touch();
    }
}

/// The acker of one in-memory delivery.
#[derive(Clone)]
pub(crate) struct MemoryAcker {
    broker: Arc<MemoryBroker>,
    queue: String,
    tag: u64,
    generation: u64,
}

impl MemoryAcker {
    pub(crate) fn ack(&self) -> bool {
        self.broker
            .settle(&self.queue, self.tag, self.generation, None)
    }

    pub(crate) fn nack(&self, requeue: bool) -> bool {
        self.broker
            .settle(&self.queue, self.tag, self.generation, Some(requeue))
    }

    pub(crate) fn usable(&self) -> bool {
        self.broker.state().generation == self.generation
    }
}

/// The queues a publish to `exchange` with `routing_key` reaches.
fn route(
    s: &State,
    exchange: &str,
    routing_key: &str,
    headers: Option<&FieldTable>,
) -> Vec<String> {
    if exchange.is_empty() {
        return if s.queues.contains_key(routing_key) {
            vec![routing_key.to_owned()]
        } else {
            Vec::new()
        };
    }
    let Some(kind) = s.exchanges.get(exchange) else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for b in s.bindings.iter().filter(|b| b.exchange == exchange) {
        let matches = match kind {
            ExchangeKind::Direct => b.key == routing_key,
            ExchangeKind::Topic => topic_matches(&b.key, routing_key),
            ExchangeKind::Fanout => true,
            ExchangeKind::Headers => headers_match(&b.args, headers),
        };
        if matches && !out.contains(&b.queue) && s.queues.contains_key(&b.queue) {
            out.push(b.queue.clone());
        }
    }
    out
}

/// AMQP topic matching: words separated by `.`, `*` is exactly one word, `#` zero or more.
pub(crate) fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match (p.first(), k.first()) {
            (None, None) => true,
            (Some(&"#"), _) => go(&p[1..], k) || (!k.is_empty() && go(p, &k[1..])),
            (Some(&"*"), Some(_)) => go(&p[1..], &k[1..]),
            (Some(w), Some(x)) if w == x => go(&p[1..], &k[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    };
    go(&p, &k)
}

/// Headers-exchange matching: `x-match` `all` (the default) or `any` over the binding's
/// other arguments; a binding without any matches everything.
fn headers_match(args: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let any = str_arg(args, "x-match").is_some_and(|m| m.starts_with("any"));
    let wanted: Vec<_> = args
        .inner()
        .iter()
        .filter(|(k, _)| !k.as_str().starts_with("x-"))
        .collect();
    if wanted.is_empty() {
        return true;
    }
    let has = |k: &ShortString, v: &AMQPValue| {
        headers
            .and_then(|h| h.inner().get(k))
            .is_some_and(|got| got == v)
    };
    if any {
        wanted.iter().any(|(k, v)| has(k, v))
    } else {
        wanted.iter().all(|(k, v)| has(k, v))
    }
}

fn strip_expiration(p: BasicProperties) -> BasicProperties {
    if p.expiration().is_none() {
        return p;
    }
    let mut out = BasicProperties::default();
    if let Some(h) = p.headers() {
        out = out.with_headers(h.clone());
    }
    macro_rules! keep {
        ($get:ident, $with:ident) => {
            if let Some(v) = p.$get() {
                out = out.$with(v.clone());
            }
        };
    }
    keep!(content_type, with_content_type);
    keep!(content_encoding, with_content_encoding);
    keep!(delivery_mode, with_delivery_mode);
    keep!(priority, with_priority);
    keep!(correlation_id, with_correlation_id);
    keep!(reply_to, with_reply_to);
    keep!(message_id, with_message_id);
    keep!(timestamp, with_timestamp);
    keep!(kind, with_type);
    keep!(user_id, with_user_id);
    keep!(app_id, with_app_id);
    keep!(cluster_id, with_cluster_id);
    out
}

/// The longest `expiration` RabbitMQ accepts: ten years, in milliseconds (it refuses a
/// longer one with 406 `value_too_large`).
const MAX_EXPIRATION_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// A per-message `expiration` as RabbitMQ reads it: whole milliseconds, as decimal digits
/// (a leading `+` allowed), at most [`MAX_EXPIRATION_MS`].
fn per_message_ttl(expiration: &str) -> Option<Duration> {
    let digits = expiration.strip_prefix('+').unwrap_or(expiration);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits
        .parse()
        .ok()
        .filter(|ms| *ms <= MAX_EXPIRATION_MS)
        .map(Duration::from_millis)
}

fn put(t: &mut FieldTable, key: &str, value: &str) {
    t.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value)),
    );
}

fn str_arg(args: &FieldTable, key: &str) -> Option<String> {
    match args.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn int_arg(args: &FieldTable, key: &str) -> Option<i64> {
    match args.inner().get(key)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        _ => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(broker: &MemoryBroker, ttl_ms: Option<i64>) {
        let mut args = FieldTable::default();
        put(&mut args, "x-dead-letter-exchange", "");
        put(&mut args, "x-dead-letter-routing-key", "expired");
        if let Some(ms) = ttl_ms {
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms));
        }
        broker.declare_queue_with_args("hold", &args);
        broker.declare_queue("expired", "", "");
    }

    fn publish(broker: &Arc<MemoryBroker>, body: &str, expiration: Option<&str>) -> Outcome {
        let mut p = BasicProperties::default();
        if let Some(e) = expiration {
            p = p.with_expiration(e.into());
        }
        broker.publish(Origin::Test, "", "hold", p, body.as_bytes().to_vec())
    }

    fn bodies(broker: &MemoryBroker, queue: &str) -> Vec<String> {
        broker
            .messages(queue)
            .iter()
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect()
    }

    /// A message requeued after its deadline keeps that deadline: it expires at once,
    /// it is not delivered again.
    #[tokio::test(start_paused = true)]
    async fn a_requeued_message_keeps_its_deadline() {
        let broker = MemoryBroker::new();
        holding(&broker, Some(1000));
        assert!(matches!(publish(&broker, "a", None), Outcome::Confirmed));
        let sub = broker.subscribe("hold", 1);
        let d = sub.next().await.expect("delivered before its TTL");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Acker::Memory(acker) = d.acker else {
            panic!("a memory delivery");
        };
        assert!(acker.nack(true));
        assert!(broker.messages("hold").is_empty());
        assert_eq!(bodies(&broker, "expired"), ["a"]);
    }

    /// Per-message TTLs expire at the head only; the lower of the queue's and the
    /// message's own wins.
    #[tokio::test(start_paused = true)]
    async fn per_message_ttl_waits_for_the_head() {
        let broker = MemoryBroker::new();
        holding(&broker, Some(600));
        publish(&broker, "long", Some("5000"));
        publish(&broker, "short", Some("100"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(bodies(&broker, "hold"), ["long", "short"], "short waits");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            bodies(&broker, "expired"),
            ["long", "short"],
            "both at 600 ms"
        );
        let death = broker.messages("expired")[0].properties.headers().clone();
        let death = format!("{death:?}");
        assert!(death.contains("original-expiration"), "{death}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalid_expiration_is_refused_as_rabbitmq_does() {
        let broker = MemoryBroker::new();
        holding(&broker, None);
        for bad in ["", "-1", "1.5", "soon"] {
            assert!(
                matches!(
                    publish(&broker, "x", Some(bad)),
                    Outcome::Failed(Some(406), _)
                ),
                "{bad:?}"
            );
        }
        assert!(broker.messages("hold").is_empty());
    }

    /// RabbitMQ takes an `expiration` of up to ten years in milliseconds (a leading `+`
    /// too) and refuses a longer one with 406; a queue TTL too long for the clock (the
    /// broker would refuse it at the declaration) must not panic the test's broker.
    #[tokio::test(start_paused = true)]
    async fn expiration_limits_are_rabbitmqs_and_a_huge_ttl_does_not_panic() {
        let broker = MemoryBroker::new();
        holding(&broker, None);
        for good in ["315360000000", "+5", "0"] {
            assert!(
                matches!(publish(&broker, "ok", Some(good)), Outcome::Confirmed),
                "{good:?}"
            );
        }
        for bad in ["315360000001", "18446744073709551615", "+", "5 "] {
            assert!(
                matches!(
                    publish(&broker, "x", Some(bad)),
                    Outcome::Failed(Some(406), _)
                ),
                "{bad:?}"
            );
        }
        holding(&broker, Some(i64::MAX));
        assert!(matches!(publish(&broker, "kept", None), Outcome::Confirmed));
        assert!(bodies(&broker, "hold").contains(&"kept".to_owned()));
    }

    #[test]
    fn topic_wildcards() {
        assert!(topic_matches("order.*", "order.created"));
        assert!(!topic_matches("order.*", "order.created.eu"));
        assert!(!topic_matches("order.*", "order"));
        assert!(topic_matches("order.#", "order"));
        assert!(topic_matches("order.#", "order.created.eu"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#.eu", "order.created.eu"));
        assert!(topic_matches("*.created.#", "order.created"));
        assert!(!topic_matches("*.created", "created"));
        assert!(topic_matches("a.#.z", "a.z"));
        assert!(topic_matches("a.#.z", "a.b.c.z"));
        assert!(!topic_matches("a.#.z", "a.b.c"));
    }
}
