//! Test your consumers without a broker (feature `testing`).
//!
//! [`TestApp`] runs the runtime's own pipeline (decode, dedup claim, handler call with its
//! deadline and panic guard, settle with retry tiers and dead letters, publisher retries
//! and error classification) over an in-memory broker ([`MemoryBroker`]) instead of
//! RabbitMQ, with the in-process dedup store. Only the transport differs; nothing of the
//! pipeline is re-implemented here.
//!
//! On tokio's paused clock (`#[tokio::test(start_paused = true)]`, or a current-thread
//! runtime, which [`TestApp`] pauses itself) a retry ladder of 1 s, 2 s, 4 s ... 1 h
//! passes in milliseconds.
//!
//! ```
//! use reliable_mq::testing::TestApp;
//! use reliable_mq::{ConsumerConfig, HandlerError, handler_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), reliable_mq::Error> {
//! let consumer = ConsumerConfig::new("orders", "orders.dlx", handler_fn(|n: u32| async move {
//!     if n == 0 { Err(HandlerError::reject("zero")) } else { Ok(()) }
//! }));
//! let mut app = TestApp::new().consumer(consumer);
//! app.publish("", "orders", &1u32).await?;
//! app.publish("", "orders", &0u32).await?;
//! app.run_until_idle().await;
//! assert_eq!(app.handled("orders"), 1);
//! assert_eq!(app.dead_letters("orders")[0].header("x-error-kind"), Some("rejected".into()));
//! # Ok(()) }
//! ```
//!
//! # What a green test here does not prove
//!
//! | not modelled | what to use instead |
//! |---|---|
//! | clustering, node failover, several AMQP URLs | the cluster tests on real nodes |
//! | quorum queues' `x-delivery-limit` and at-least-once dead-lettering | a test on RabbitMQ |
//! | memory and disk alarms (blocked publishing, `PublishError::Blocked`) | a test on RabbitMQ |
//! | frame and message size limits, the broker's `max_message_size` | a test on RabbitMQ |
//! | `consumer_timeout`, heartbeats, TLS, credentials, vhosts, permissions | a test on RabbitMQ |
//! | PRECONDITION_FAILED on a redeclaration with other arguments | a test on RabbitMQ |
//! | priorities, `x-max-length` and overflow | a test on RabbitMQ |
//! | a TTL of 0 (RabbitMQ hands it to a consumer waiting at that instant or expires it) | a test on RabbitMQ |
//! | Redis (Cluster, Sentinel) as the dedup store, the store going down | the dedup tests on Redis |
//!
//! Modelled: exchanges (direct, topic with `*` and `#`, fanout, headers) and the default
//! exchange, queues, bindings, dead-letter routing on reject and on expiry (with
//! `x-death`), `mandatory` returns, publisher confirms and nacks, a missing exchange (404),
//! an invalid `expiration` (406), prefetch, ack, nack, requeue, the redelivered flag,
//! properties and headers, a connection loss (unacked deliveries come back redelivered,
//! consumers reconnect through their usual backoff).
//!
//! Expiry is RabbitMQ's: a message lives the lower of its queue's `x-message-ttl` and its
//! own `expiration`, from when it entered the queue, and keeps that deadline when it is
//! requeued. It is dropped or dead-lettered only at the head of the queue, so with a queue
//! TTL alone messages expire in order, each on time, while a short per-message
//! `expiration` behind a longer one waits for it and leaves with it. An expired message is
//! never delivered. `tests/conformance.rs` checks both cases against RabbitMQ.

use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

use crate::consumer::StatsSnapshot;
use crate::publisher::Publisher;
use crate::spec::ConsumerConfig;
use crate::state::StateValue;
use crate::topology::Topology;
use crate::{App, Config, Error, MemoryStore, RunningApp};

pub use crate::transport::memory::{MemoryBroker, Origin, Published, StoredMessage};

/// How far [`TestApp::run_until_idle`] lets tokio's clock run before it gives up waiting.
const IDLE_LIMIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// An app of consumers on an in-memory broker, for tests. See the [module docs](self).
pub struct TestApp {
    /// What `start` builds the app from: consumers and states in the order given.
    setup: Vec<Box<dyn FnOnce(App) -> App + Send>>,
    started: bool,
    running: Option<RunningApp>,
    broker: Arc<MemoryBroker>,
    config: Config,
    topologies: Vec<Topology>,
    publisher: Publisher,
}

impl std::fmt::Debug for TestApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestApp")
            .field(
                "queues",
                &self.topologies.iter().map(|t| &t.queue).collect::<Vec<_>>(),
            )
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Default for TestApp {
    fn default() -> Self {
        Self::new()
    }
}

/// A message as a test sees it: a dead letter, a handler's publish.
#[derive(Debug, Clone)]
pub struct TestMessage {
    /// Exchange it was published to.
    pub exchange: String,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Properties, headers included.
    pub properties: BasicProperties,
    /// Body.
    pub body: Vec<u8>,
}

impl TestMessage {
    /// A header as text (string headers; numbers are formatted).
    pub fn header(&self, key: &str) -> Option<String> {
        match self.properties.headers().as_ref()?.inner().get(key)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            AMQPValue::LongLongInt(v) => Some(v.to_string()),
            AMQPValue::LongInt(v) => Some(v.to_string()),
            AMQPValue::LongUInt(v) => Some(v.to_string()),
            AMQPValue::ShortInt(v) => Some(v.to_string()),
            AMQPValue::Boolean(v) => Some(v.to_string()),
            _ => None,
        }
    }

    /// The headers.
    pub fn headers(&self) -> FieldTable {
        self.properties.headers().clone().unwrap_or_default()
    }

    /// The `message_id`.
    pub fn message_id(&self) -> Option<String> {
        self.properties.message_id().as_ref().map(|s| s.to_string())
    }

    /// The body decoded as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// One failed attempt sent to a retry tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// The wait queue it went to.
    pub tier: String,
    /// That tier's delay.
    pub delay: Duration,
    /// `x-attempts`: the attempt that failed (1 = the first delivery).
    pub attempt: u32,
    /// `x-error-kind`: why it failed.
    pub error_kind: String,
    /// `x-exception-message`.
    pub message: String,
}

impl TestApp {
    /// An app without consumers on a fresh in-memory broker (publish order).
    pub fn new() -> Self {
        Self::on(MemoryBroker::new())
    }

    /// An app whose broker hands out the ready messages of each queue in an order drawn
    /// from `seed`: reproducible, and different per seed.
    pub fn seeded(seed: u64) -> Self {
        Self::on(MemoryBroker::seeded(seed))
    }

    fn on(broker: Arc<MemoryBroker>) -> Self {
        // Never the environment: a test must not reach for AMQP_URL or REDIS_URL.
        Self::on_with(broker, Config::default())
    }

    /// Run with `config` (timeouts, retries, size limit, consumer timeout). Its URLs are
    /// never used: nothing connects to a broker or a Redis.
    pub fn with_config(mut self, config: Config) -> Self {
        self.publisher = Publisher::memory(&config, Arc::clone(&self.broker), Origin::Test);
        self.config = config;
        self
    }

    fn on_with(broker: Arc<MemoryBroker>, config: Config) -> Self {
        let publisher = Publisher::memory(&config, Arc::clone(&broker), Origin::Test);
        Self {
            setup: Vec::new(),
            started: false,
            running: None,
            broker,
            config,
            topologies: Vec::new(),
            publisher,
        }
    }

    /// Add a consumer: `my_handler::SPEC` of a `#[consumer]`, or a [`ConsumerConfig`].
    /// Register every consumer before the first publish (the app starts then).
    pub fn consumer(mut self, consumer: impl Into<ConsumerConfig>) -> Self {
        let consumer = consumer.into();
        self.topologies.push(Topology::of(&consumer));
        self.setup.push(Box::new(move |app| app.consumer(consumer)));
        self
    }

    /// State for handlers' `State<T>` extractors, as [`App::with_state`].
    pub fn with_state<S: StateValue>(mut self, state: S) -> Self {
        self.setup.push(Box::new(move |app| app.with_state(state)));
        self
    }

    /// The in-memory broker: declare extra queues, inspect any queue, inject faults.
    pub fn broker(&self) -> &Arc<MemoryBroker> {
        &self.broker
    }

    /// The configuration the app runs with (`Config::default()`, never the environment).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Start the consumers (done by the first publish or run if not called): checks every
    /// consumer as [`App::start`] does, e.g. a missing state is an error here.
    pub async fn start(&mut self) -> Result<(), Error> {
        if self.started {
            return Ok(());
        }
        self.started = true;
        let builder = std::mem::take(&mut self.setup).into_iter().fold(
            App::new(self.config.clone())
                .on_memory_broker(Arc::clone(&self.broker))
                .with_dedup_store(MemoryStore::new()),
            |app, step| step(app),
        );
        // A paused clock makes the retry tiers' hours pass at once; tokio can pause only a
        // current-thread runtime, and only once.
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::CurrentThread
            && !clock_paused()
        {
            tokio::time::pause();
        }
        self.running = Some(builder.start().await?);
        Ok(())
    }

    /// Publish `value` as JSON, as [`Publisher::publish`] does; returns its `message_id`.
    pub async fn publish<T: Serialize + ?Sized>(
        &mut self,
        exchange: &str,
        routing_key: &str,
        value: &T,
    ) -> Result<String, Error> {
        self.start().await?;
        Ok(self.publisher.publish(exchange, routing_key, value).await?)
    }

    /// Publish raw bytes with the given properties (e.g. an explicit `message_id`, a
    /// content type, headers), as [`Publisher::publish_raw`] does.
    pub async fn publish_raw(
        &mut self,
        exchange: &str,
        routing_key: &str,
        body: impl Into<Vec<u8>>,
        properties: BasicProperties,
    ) -> Result<(), Error> {
        self.start().await?;
        self.publisher
            .publish_raw(exchange, routing_key, body.into(), properties)
            .await
            .map_err(Error::from)
    }

    /// A publisher on the test's broker (for code under test that takes a [`Publisher`]).
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Run until nothing is left to do: every consumer's queue empty with nothing unacked
    /// (so no handler running and nothing being settled), and every retry tier empty. On a
    /// paused clock the tiers' delays pass at once. Gives up after a week of tokio time.
    pub async fn run_until_idle(&mut self) {
        if let Err(e) = self.start().await {
            tracing::error!(error = %e, "the test app did not start");
            return;
        }
        let consumed: Vec<String> = self.topologies.iter().map(|t| t.queue.clone()).collect();
        let deadline = tokio::time::Instant::now() + IDLE_LIMIT;
        loop {
            let notified = self.broker.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.broker.is_idle(&consumed) {
                // Let tasks that just settled finish their bookkeeping, then look again.
                for _ in 0..8 {
                    tokio::task::yield_now().await;
                }
                if self.broker.is_idle(&consumed) {
                    return;
                }
                continue;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("run_until_idle: still busy after {IDLE_LIMIT:?} of tokio time");
                    return;
                }
            }
        }
    }

    /// The counters of `queue`'s consumers (zero before start).
    pub fn stats(&self, queue: &str) -> StatsSnapshot {
        self.running
            .as_ref()
            .and_then(|r| r.stats(queue))
            .unwrap_or_default()
    }

    /// Handler calls on `queue` that succeeded.
    pub fn handled(&self, queue: &str) -> u64 {
        self.stats(queue).handled
    }

    /// What sits in `queue`'s dead-letter queue, with the failure headers
    /// (`x-error-kind`, `x-exception-message`, `x-attempts`, ...).
    pub fn dead_letters(&self, queue: &str) -> Vec<TestMessage> {
        let Some(t) = self.topologies.iter().find(|t| t.queue == queue) else {
            return Vec::new();
        };
        self.broker
            .messages(&t.dlq)
            .into_iter()
            .map(|m| TestMessage {
                exchange: m.exchange,
                routing_key: m.routing_key,
                properties: m.properties,
                body: m.body,
            })
            .collect()
    }

    /// Every failed attempt of `queue`'s messages sent to a retry tier, in order.
    pub fn retries(&self, queue: &str) -> Vec<Retry> {
        let Some(t) = self.topologies.iter().find(|t| t.queue == queue) else {
            return Vec::new();
        };
        let tiers = t.ladder.tiers();
        self.broker
            .published()
            .into_iter()
            .filter(|p| p.origin == Origin::Settle && p.exchange.is_empty())
            .filter_map(|p| {
                let (tier, delay) = tiers.iter().find(|(name, _)| *name == p.routing_key)?;
                let m = message(&p);
                Some(Retry {
                    tier: tier.clone(),
                    delay: *delay,
                    attempt: m
                        .header(crate::failure::header::ATTEMPTS)
                        .and_then(|a| a.parse().ok())
                        .unwrap_or(0),
                    error_kind: m
                        .header(crate::failure::header::ERROR_KIND)
                        .unwrap_or_default(),
                    message: m
                        .header(crate::failure::header::EXCEPTION_MESSAGE)
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// What handlers published (through [`Delivery::publisher`](crate::Delivery::publisher)),
    /// routed or not, in order.
    pub fn published(&self) -> Vec<TestMessage> {
        self.broker
            .published()
            .iter()
            .filter(|p| p.origin == Origin::Handler)
            .map(message)
            .collect()
    }

    /// The next publish (the test's, a handler's or a settle copy) fails as a lost
    /// connection would; the publisher retries it.
    pub fn fail_next_publish(&self) {
        self.broker.fail_next_publish();
    }

    /// The broker nacks the next confirm; the publisher retries it.
    pub fn fail_next_confirm(&self) {
        self.broker.nack_next_confirm();
    }

    /// Drop every connection: unacked deliveries come back redelivered, the consumers
    /// reconnect with their usual backoff.
    pub fn drop_connection(&self) {
        self.broker.drop_connections();
    }

    /// Deliver the next published message twice (same `message_id`).
    pub fn deliver_next_twice(&self) {
        self.broker.duplicate_next_publish();
    }

    /// Lose the next ack: that message is delivered again, with the redelivered flag.
    pub fn redeliver_next(&self) {
        self.broker.lose_next_ack();
    }

    /// Stop the consumers (in-flight handlers finish first).
    pub async fn shutdown(mut self) -> Result<(), Error> {
        match self.running.take() {
            Some(running) => running.shutdown().await,
            None => Ok(()),
        }
    }
}

fn message(p: &Published) -> TestMessage {
    TestMessage {
        exchange: p.exchange.clone(),
        routing_key: p.routing_key.clone(),
        properties: p.properties.clone(),
        body: p.body.clone(),
    }
}

/// Whether tokio's clock is paused already (pausing twice panics).
fn clock_paused() -> bool {
    let before = tokio::time::Instant::now();
    std::thread::sleep(Duration::from_millis(1));
    tokio::time::Instant::now() == before
}
