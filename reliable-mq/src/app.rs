//! The application: consumers plus shared configuration, publisher and dedup store.
//! [`run`] is the one-liner; [`App`] is the builder behind it.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::consumer::driver::ConsumerRuntime;
use crate::consumer::{ConsumerStats, StatsSnapshot};
use crate::dedup::{DedupStore, KeyScope, MemoryStore, RedisStore};
use crate::publisher::Publisher;
use crate::shutdown::{self, ShutdownHandle};
use crate::spec::{self, ConsumerConfig};
use crate::state::{StateMap, StateValue};
use crate::topology::{self, Topology};
use crate::{Config, Error};

/// Run every `#[consumer]` of the binary with configuration from the environment, until
/// SIGINT or SIGTERM; then stop taking messages, let in-flight handlers finish (up to the
/// grace period) and return `Ok(())`.
///
/// ```no_run
/// #[tokio::main]
/// async fn main() -> Result<(), reliable_mq::Error> {
///     reliable_mq::run().await
/// }
/// ```
pub async fn run() -> Result<(), Error> {
    App::from_env()?.run().await
}

/// [`run`] with `state` registered for handlers that take `State<S>`: the short path for
/// services with one state type (a struct holding the pool, the clients ...).
///
/// ```no_run
/// #[derive(Clone)]
/// struct Services { /* db pool, http client ... */ }
///
/// #[tokio::main]
/// async fn main() -> Result<(), reliable_mq::Error> {
///     reliable_mq::run_with(Services {}).await
/// }
/// ```
pub async fn run_with<S: StateValue>(state: S) -> Result<(), Error> {
    App::from_env()?.with_state(state).run().await
}

/// Builder for a set of consumers sharing one configuration.
///
/// ```no_run
/// # use reliable_mq::{App, Config, ConsumerConfig, HandlerError, handler_fn};
/// # async fn demo() -> Result<(), reliable_mq::Error> {
/// let app = App::new(Config::from_env()?)
///     .consumer(ConsumerConfig::new("emails", "emails.dlx", handler_fn(|to: String| async move {
///         println!("mail {to}");
///         Ok::<_, HandlerError>(())
///     })));
/// let running = app.start().await?; // declared, connected, consuming
/// // ...
/// running.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct App {
    config: Config,
    consumers: Vec<ConsumerConfig>,
    dedup: Option<Arc<dyn DedupStore>>,
    shutdown: ShutdownHandle,
    states: StateMap,
    transport: crate::transport::Transport,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("config", &self.config)
            .field("consumers", &self.consumers)
            .field("states", &self.states)
            .finish_non_exhaustive()
    }
}

impl App {
    /// An app with configuration from the environment and every `#[consumer]` in the binary.
    pub fn from_env() -> Result<Self, Error> {
        Ok(Self::new(Config::from_env()?).registered())
    }

    /// An app with `config` and no consumers yet.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            consumers: Vec::new(),
            dedup: None,
            shutdown: ShutdownHandle::new(),
            states: StateMap::default(),
            transport: crate::transport::Transport::default(),
        }
    }

    /// Run on the in-memory broker of feature `testing` instead of RabbitMQ.
    #[cfg(feature = "testing")]
    pub(crate) fn on_memory_broker(
        mut self,
        broker: Arc<crate::transport::memory::MemoryBroker>,
    ) -> Self {
        self.transport = crate::transport::Transport::Memory(broker);
        self
    }

    /// Register `state` for handlers that take `State<S>` (each handler call gets a
    /// clone, so share expensive things behind an `Arc`, or use types that are cheap to
    /// clone, like connection pools). Register each type once; registering a type again
    /// replaces the earlier value.
    ///
    /// ```no_run
    /// # use reliable_mq::{App, Config};
    /// #[derive(Clone)]
    /// struct Db;
    /// # fn demo() -> Result<(), reliable_mq::Error> {
    /// let app = App::from_env()?.with_state(Db).with_state(String::from("eu-west"));
    /// # Ok(()) }
    /// ```
    pub fn with_state<S: StateValue>(mut self, state: S) -> Self {
        self.states.insert(state);
        self
    }

    /// Add every `#[consumer]` function linked into the binary.
    pub fn registered(mut self) -> Self {
        self.consumers
            .extend(spec::registered().map(ConsumerConfig::from));
        self
    }

    /// Add one consumer: `my_fn::SPEC` from `#[consumer]`, or a [`ConsumerConfig`].
    pub fn consumer(mut self, consumer: impl Into<ConsumerConfig>) -> Self {
        self.consumers.push(consumer.into());
        self
    }

    /// Use `pool` for `inbox` consumers and the handlers' `State<PgPool>` (feature
    /// `postgres`). Build it from [`postgres::pool_options`](crate::postgres::pool_options):
    /// an `acquire_timeout` of a few seconds (while PostgreSQL is down, inbox deliveries
    /// pause in place and try again at that pace) and no ping per acquire.
    #[cfg(feature = "postgres")]
    pub fn with_postgres(mut self, pool: sqlx::PgPool) -> Self {
        self.states.insert(pool);
        self
    }

    /// Apply the inbox and outbox schema to the pool given to [`App::with_postgres`]
    /// (see [`postgres::migrate`](crate::postgres::migrate)).
    #[cfg(feature = "postgres")]
    pub async fn migrate(&self) -> Result<(), Error> {
        match self.states.get::<sqlx::PgPool>() {
            Some(pool) => crate::postgres::migrate(&pool).await,
            None => Err(Error::Config(
                "App::migrate needs a PostgreSQL pool: call App::with_postgres(pool) first".into(),
            )),
        }
    }

    /// Use `store` for dedup instead of the one chosen from `REDIS_URL`.
    pub fn with_dedup_store(mut self, store: impl DedupStore) -> Self {
        self.dedup = Some(Arc::new(store));
        self
    }

    /// A handle that stops the app when triggered (as SIGTERM would).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// The consumers the app will run.
    pub fn consumers(&self) -> &[ConsumerConfig] {
        &self.consumers
    }

    /// The app's topology as an AsyncAPI 3.0 document (JSON or YAML): every consumer's
    /// exchange, queue with its arguments, binding, DLX, DLQ and retry tiers, and its
    /// reliability settings under `x-reliable-mq`. Touches no broker.
    ///
    /// `RELIABLE_MQ_EXPORT=asyncapi` (or `asyncapi-yaml`) makes [`App::run`] print this
    /// and exit 0, so any service can export its topology in CI without code changes.
    ///
    /// ```
    /// # use reliable_mq::{App, Config, ConsumerConfig, ExportFormat, HandlerError, handler_fn};
    /// let app = App::new(Config::default()).consumer(ConsumerConfig::new(
    ///     "emails", "emails.dlx",
    ///     handler_fn(|_: String| async { Ok::<_, HandlerError>(()) }),
    /// ));
    /// let doc = app.asyncapi(ExportFormat::Json);
    /// assert!(doc.contains("\"asyncapi\": \"3.0.0\""));
    /// assert!(app.asyncapi(ExportFormat::Yaml).starts_with("asyncapi: \"3.0.0\""));
    /// ```
    pub fn asyncapi(&self, format: ExportFormat) -> String {
        crate::asyncapi::render(
            &crate::asyncapi::document(&self.consumers, self.config.consumer_timeout),
            format,
        )
    }

    /// Run until SIGINT/SIGTERM or the shutdown handle, then stop gracefully.
    ///
    /// With `RELIABLE_MQ_EXPORT=asyncapi` (or `asyncapi-yaml`) set, it prints
    /// [`App::asyncapi`] to stdout and exits the process with status 0 instead, without
    /// connecting to anything.
    pub async fn run(self) -> Result<(), Error> {
        if let Some(format) = ExportFormat::from_env()? {
            let doc = self.asyncapi(format);
            write_export(&mut std::io::stdout().lock(), &doc)?;
            std::process::exit(0);
        }
        let mut stop_requested = self.shutdown.signal();
        let mut running = self.start().await?;
        #[cfg(feature = "http")]
        if let Err(e) = crate::observe::http::serve_from_env(&running).await {
            return running.shutdown().await.and(Err(e));
        }
        let outcome = tokio::select! {
            r = shutdown::os_signal() => {
                r.map_err(Error::Signal)?;
                info!("shutdown signal received; finishing in-flight messages");
                Ok(())
            }
            _ = stop_requested.cancelled() => Ok(()),
            r = running.first_failure() => r,
        };
        let stopped = running.shutdown().await;
        outcome.and(stopped)
    }

    /// Check, declare and start consuming; returns once every consumer is attached.
    pub async fn start(self) -> Result<RunningApp, Error> {
        if self.consumers.is_empty() {
            return Err(Error::NoConsumers);
        }
        for c in &self.consumers {
            topology::validate(c, self.config.consumer_timeout)?;
            for needed in c.handler.states() {
                if !self.states.contains(&needed) {
                    return Err(Error::MissingState {
                        consumer: c.name().to_owned(),
                        type_name: needed.name,
                    });
                }
            }
            check_inbox_pool(c, &self.states)?;
        }
        topology::check_conflicts(&self.consumers)?;
        let tracing_setup = crate::observe::trace::TracingSetup::probe();
        if let Some(warning) = tracing_setup.missing_tracer_provider() {
            startup_warning(warning);
        }
        let states = Arc::new(self.states);
        let config = Arc::new(self.config);
        let dedup = match self.dedup {
            Some(store) => Some(store),
            None if self.consumers.iter().any(|c| c.is_idempotent()) => {
                Some(dedup_from_config(&config, &self.consumers).await?)
            }
            None => None,
        };
        let publisher = match &self.transport {
            crate::transport::Transport::Lapin => Publisher::from_config(&config).await?,
            #[cfg(feature = "testing")]
            crate::transport::Transport::Memory(broker) => Publisher::memory(
                &config,
                Arc::clone(broker),
                crate::transport::memory::Origin::Handler,
            ),
        };

        let key_scope = KeyScope::from_config(&config)?;
        // Before any consumer registers its metrics (unless the application has a
        // recorder of its own).
        #[cfg(feature = "metrics")]
        crate::observe::metrics::install_prometheus();
        let mut tasks = JoinSet::new();
        let mut stats = Vec::new();
        let mut runtimes = Vec::new();
        let connections = Arc::new(crate::connection::ConnectionSet::new(
            Arc::clone(&config),
            self.consumers.len(),
        ));
        for (index, consumer) in self.consumers.into_iter().enumerate() {
            let topology = Topology::of(&consumer);
            // One set of counters per consumer, even when two consume one queue: each
            // has its own session, so its own `attached` and health.
            let consumer_stats = Arc::new(ConsumerStats::new(consumer.name(), consumer.queue()));
            stats.push(ConsumerEntry {
                name: consumer.name().to_owned(),
                queue: consumer.queue().to_owned(),
                stats: Arc::clone(&consumer_stats),
            });
            runtimes.push(Arc::new(ConsumerRuntime {
                config: Arc::clone(&config),
                spans: crate::observe::trace::ProcessSpans::new(consumer.queue(), &tracing_setup),
                dedup: if consumer.is_idempotent() {
                    dedup.clone()
                } else {
                    None
                },
                consumer,
                topology,
                publisher: publisher.clone(),
                stats: consumer_stats,
                shutdown: self.shutdown.clone(),
                key_scope: key_scope.clone(),
                retry_gate: tokio::sync::Mutex::new(crate::connection::Backoff::new(
                    config.max_reconnect_delay,
                )),
                renewals: Default::default(),
                states: Arc::clone(&states),
                transport: self.transport.clone(),
                connections: Arc::clone(&connections),
                connection_slot: index,
            }));
        }
        // Declare everything up front so a mismatch stops start-up before any consuming.
        declare_all(&self.transport, &connections, &runtimes).await?;
        // The queues `wait_idle` watches: each work queue and its wait tiers.
        let runtimes_queues: Vec<String> = runtimes
            .iter()
            .flat_map(|r| {
                std::iter::once(r.topology.queue.clone())
                    .chain(r.topology.wait_queues().into_iter().map(|(q, _)| q))
            })
            .collect();
        #[cfg(feature = "postgres")]
        if runtimes.iter().any(|r| r.consumer.is_inbox())
            && let Some(pool) = states.get::<sqlx::PgPool>()
        {
            let shutdown = self.shutdown.clone();
            tasks.spawn(async move {
                crate::postgres::inbox::clean_up(pool, INBOX_CLEAN_UP_EVERY, shutdown).await;
                Ok(())
            });
        }
        for r in runtimes {
            tasks.spawn(r.run());
        }
        let idle = IdleCheck {
            config: Arc::clone(&config),
            transport: self.transport.clone(),
            queues: runtimes_queues,
        };
        let running = RunningApp {
            connections,
            idle,
            tasks,
            stats,
            shutdown: self.shutdown,
            publisher,
            dedup,
            #[cfg(feature = "postgres")]
            relays: Arc::default(),
        };
        let mut running = running;
        running.wait_attached().await?;
        Ok(running)
    }
}

/// How often expired inbox rows are removed.
#[cfg(feature = "postgres")]
const INBOX_CLEAN_UP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// An `inbox` consumer needs the PostgreSQL pool its transactions run on.
fn check_inbox_pool(consumer: &ConsumerConfig, states: &StateMap) -> Result<(), Error> {
    if !consumer.is_inbox() {
        return Ok(());
    }
    #[cfg(feature = "postgres")]
    if states.contains(&crate::state::StateType::of::<sqlx::PgPool>()) {
        return Ok(());
    }
    let _ = states;
    let fix = if cfg!(feature = "postgres") {
        "register a pool with App::with_postgres(pool)"
    } else {
        "enable reliable-mq's `postgres` feature and register a pool with App::with_postgres(pool)"
    };
    Err(Error::Config(format!(
        "consumer `{}` is an `inbox` consumer, which runs in a PostgreSQL transaction: {fix}",
        consumer.name()
    )))
}

/// Declare every consumer's topology on `transport` before any of them consumes.
// Without feature `testing` the transport can only be lapin.
#[cfg_attr(not(feature = "testing"), allow(unused_variables))]
async fn declare_all(
    transport: &crate::transport::Transport,
    connections: &crate::connection::ConnectionSet,
    runtimes: &[Arc<ConsumerRuntime>],
) -> Result<(), Error> {
    #[cfg(feature = "testing")]
    if let crate::transport::Transport::Memory(broker) = transport {
        for r in runtimes {
            broker.declare(&r.topology)?;
        }
        return Ok(());
    }
    // On the consumers' own connection: no extra one just for this.
    let conn = connections.get(0).await?;
    for r in runtimes {
        if let Err(e) = r.topology.declare(&conn).await {
            drop(conn);
            connections.close().await;
            return Err(e);
        }
    }
    Ok(())
}

async fn dedup_from_config(
    config: &Config,
    consumers: &[ConsumerConfig],
) -> Result<Arc<dyn DedupStore>, Error> {
    match &config.redis_url {
        Some(url) => {
            let pool_size = consumers
                .iter()
                .filter(|c| c.is_idempotent())
                .map(|c| usize::from(c.concurrency()))
                .sum::<usize>()
                .clamp(4, 256);
            let store: Arc<dyn DedupStore> = if let Some(s) = crate::dedup::sentinel_url(url) {
                sentinel_store(&s)?
            } else {
                match crate::dedup::cluster_nodes(url) {
                    None => Arc::new(RedisStore::new(url, pool_size)?),
                    Some(nodes) => cluster_store(&nodes, pool_size)?,
                }
            };
            if let Err(e) = store.ping().await {
                startup_warning(&format!(
                    "dedup store (Redis) does not answer yet ({e}); idempotent consumers stay paused until it does"
                ));
            }
            Ok(store)
        }
        None => {
            startup_warning(
                "REDIS_URL is not set: idempotent consumers dedup IN THIS PROCESS ONLY. \
                 That is fine for a single instance and wrong for several: set REDIS_URL",
            );
            Ok(Arc::new(MemoryStore::new()))
        }
    }
}

/// The Redis Cluster store for the seed `nodes` of a `redis+cluster://` URL.
#[cfg(feature = "redis-cluster")]
fn cluster_store(nodes: &[String], pool_size: usize) -> Result<Arc<dyn DedupStore>, Error> {
    if nodes.is_empty() {
        return Err(Error::Config(
            "REDIS_URL is redis+cluster:// without any node: list them as redis+cluster://host1:port1,host2:port2".into(),
        ));
    }
    Ok(Arc::new(crate::dedup::RedisClusterStore::new(
        nodes, pool_size,
    )?))
}

/// Without the `redis-cluster` feature a cluster URL is a configuration error, not a
/// silent fall-back to one node.
#[cfg(not(feature = "redis-cluster"))]
fn cluster_store(_nodes: &[String], _pool_size: usize) -> Result<Arc<dyn DedupStore>, Error> {
    Err(Error::Config(
        "REDIS_URL asks for a Redis Cluster (redis+cluster://), but reliable-mq was built \
         without its `redis-cluster` feature: enable it (reliable-mq = { features = [\"redis-cluster\"] })"
            .into(),
    ))
}

/// Write the exported document to `out`. A reader that stopped reading (`| head`) is
/// not an error: the shell convention is that the writer then ends quietly, as with
/// SIGPIPE (which Rust programs ignore, so the write reports `BrokenPipe` instead).
fn write_export(out: &mut impl std::io::Write, doc: &str) -> Result<(), Error> {
    match writeln!(out, "{doc}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::Config(format!(
            "RELIABLE_MQ_EXPORT: cannot write to stdout: {e}"
        ))),
    }
}

/// Which document [`App::asyncapi`] renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExportFormat {
    /// AsyncAPI 3.0 as pretty-printed JSON (`RELIABLE_MQ_EXPORT=asyncapi`).
    Json,
    /// AsyncAPI 3.0 as YAML (`RELIABLE_MQ_EXPORT=asyncapi-yaml`).
    Yaml,
}

impl ExportFormat {
    /// The format `RELIABLE_MQ_EXPORT` asks for; `None` when unset or empty.
    fn from_env() -> Result<Option<Self>, Error> {
        match std::env::var("RELIABLE_MQ_EXPORT") {
            Err(_) => Ok(None),
            Ok(v) => match v.trim() {
                "" => Ok(None),
                "asyncapi" | "asyncapi-json" => Ok(Some(Self::Json)),
                "asyncapi-yaml" => Ok(Some(Self::Yaml)),
                other => Err(Error::Config(format!(
                    "RELIABLE_MQ_EXPORT={other:?} is not an export format; use `asyncapi` (JSON) or `asyncapi-yaml`"
                ))),
            },
        }
    }
}

/// A start-up warning the user must see (a setting that silently weakens a guarantee).
/// It goes through `tracing`; when the application installed no subscriber, tracing would
/// drop it, so it is also written to stderr. `RELIABLE_MQ_LOG=off` silences that fallback.
pub(crate) fn startup_warning(message: &str) {
    warn!("{message}");
    if !has_subscriber() && !fallback_silenced() {
        static HINT: std::sync::Once = std::sync::Once::new();
        eprintln!("WARN reliable_mq: {message}");
        HINT.call_once(|| {
            eprintln!(
                "     (printed here because no tracing subscriber is installed: call \
                 tracing_subscriber::fmt::init() in main to see all logs; \
                 RELIABLE_MQ_LOG=off silences this fallback)"
            );
        });
    }
}

/// Whether a `tracing` subscriber (global or scoped) would receive our events.
fn has_subscriber() -> bool {
    !tracing::dispatcher::get_default(|d| d.is::<tracing::subscriber::NoSubscriber>())
}

fn fallback_silenced() -> bool {
    std::env::var("RELIABLE_MQ_LOG").is_ok_and(|v| v.trim().eq_ignore_ascii_case("off"))
}

/// The Redis Sentinel store for a `redis+sentinel://` URL.
#[cfg(feature = "redis-sentinel")]
fn sentinel_store(url: &crate::dedup::SentinelUrl) -> Result<Arc<dyn DedupStore>, Error> {
    if url.sentinels.is_empty() || url.master.is_empty() {
        return Err(Error::Config(
            "REDIS_URL is redis+sentinel:// without sentinels or master name: write it as redis+sentinel://host1:port1,host2:port2/master-name".into(),
        ));
    }
    Ok(Arc::new(crate::dedup::RedisSentinelStore::new(
        &url.sentinels,
        &url.master,
        url.username.as_deref(),
        url.password.as_deref(),
    )?))
}

/// Without the `redis-sentinel` feature a Sentinel URL is a configuration error.
#[cfg(not(feature = "redis-sentinel"))]
fn sentinel_store(_url: &crate::dedup::SentinelUrl) -> Result<Arc<dyn DedupStore>, Error> {
    Err(Error::Config(
        "REDIS_URL asks for Redis Sentinel (redis+sentinel://), but reliable-mq was built \
         without its `redis-sentinel` feature: enable it (reliable-mq = { features = [\"redis-sentinel\"] })"
            .into(),
    ))
}

/// What `RunningApp::wait_idle` looks at besides the consumers' counters.
struct IdleCheck {
    config: Arc<Config>,
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    transport: crate::transport::Transport,
    queues: Vec<String>,
}

/// A connection for counting messages, opened on first use.
#[derive(Default)]
struct QueueCounter(Option<Box<lapin::Connection>>);

impl QueueCounter {
    async fn close(self) {
        if let Some(conn) = self.0 {
            let _ = conn.close(200, "idle check done".into()).await;
        }
    }
}

impl IdleCheck {
    /// Whether every watched queue is empty (a queue that cannot be counted is not).
    async fn queues_empty(&self, counter: &mut QueueCounter) -> bool {
        #[cfg(feature = "testing")]
        if let crate::transport::Transport::Memory(broker) = &self.transport {
            return self.queues.iter().all(|q| broker.messages(q).is_empty());
        }
        if counter.0.is_none() {
            match crate::connection::open(&self.config, "idle check").await {
                Ok(conn) => counter.0 = Some(Box::new(conn)),
                Err(e) => {
                    warn!(error = %e, "wait_idle cannot count the queues");
                    return false;
                }
            }
        }
        let Some(conn) = &counter.0 else {
            return false;
        };
        let Ok(channel) = conn.create_channel().await else {
            counter.0 = None;
            return false;
        };
        let mut empty = true;
        for queue in &self.queues {
            let options = lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            };
            match channel
                .queue_declare(
                    queue.as_str().into(),
                    options,
                    lapin::types::FieldTable::default(),
                )
                .await
            {
                Ok(q) if q.message_count() == 0 => {}
                _ => {
                    empty = false;
                    break;
                }
            }
        }
        let _ = channel.close(200, "counted".into()).await;
        empty
    }
}

/// One running consumer's counters.
#[derive(Clone)]
struct ConsumerEntry {
    name: String,
    queue: String,
    stats: Arc<ConsumerStats>,
}

/// A started app: consumers attached and running in the background.
pub struct RunningApp {
    /// The connections the consumers' channels are on, closed once they have stopped.
    connections: Arc<crate::connection::ConnectionSet>,
    idle: IdleCheck,
    tasks: JoinSet<Result<(), Error>>,
    stats: Vec<ConsumerEntry>,
    shutdown: ShutdownHandle,
    publisher: Publisher,
    dedup: Option<Arc<dyn DedupStore>>,
    /// The outbox relays started by [`RunningApp::spawn_outbox_relay`], for the health.
    #[cfg(feature = "postgres")]
    relays: Relays,
}

/// The states of an app's outbox relays, shared with its health probes.
#[cfg(feature = "postgres")]
type Relays = Arc<std::sync::Mutex<Vec<Arc<crate::postgres::RelayState>>>>;

impl std::fmt::Debug for RunningApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningApp")
            .field(
                "consumers",
                &self.stats.iter().map(|c| &c.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Readiness of a running app, for health endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Every consumer subscribed right now.
    pub consumers_attached: bool,
    /// The publisher's connection is up: a publisher without one is asked to open it
    /// first (within 2 s), since it otherwise reconnects only on its next publish.
    pub publisher_connected: bool,
    /// The dedup store answers (`true` when no consumer needs one).
    pub dedup_up: bool,
    /// Each consumer on its own, in the order they were added.
    pub consumers: Vec<ConsumerHealth>,
    /// The outbox relays started with [`RunningApp::spawn_outbox_relay`] and their
    /// backlog, failed rows included (`None` without a relay). Reported, never a reason
    /// to be unready (see [`OutboxHealth`](crate::postgres::OutboxHealth)).
    #[cfg(feature = "postgres")]
    pub outbox: Option<crate::postgres::OutboxHealth>,
}

/// The state of one consumer, in [`Health`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerHealth {
    /// The consumer's name (the function's name for a `#[consumer]`).
    pub name: String,
    /// The queue it consumes.
    pub queue: String,
    /// Subscribed right now.
    pub attached: bool,
    /// Why it cannot settle some deliveries right now (they are held, unacked), e.g.
    /// `cannot publish to orders.dlx: ACCESS_REFUSED - ...`; `None` when it can.
    pub degraded: Option<String>,
}

impl Health {
    /// Ready to take traffic: everything up.
    pub fn is_ready(&self) -> bool {
        self.consumers_attached && self.publisher_connected && self.dedup_up
    }

    /// The consumers that are degraded (see [`ConsumerHealth::degraded`]).
    pub fn degraded(&self) -> impl Iterator<Item = &ConsumerHealth> {
        self.consumers.iter().filter(|c| c.degraded.is_some())
    }
}

impl RunningApp {
    /// Counters of the consumer(s) of `queue`, added up (`attached`: all of them are).
    pub fn stats(&self, queue: &str) -> Option<StatsSnapshot> {
        self.stats
            .iter()
            .filter(|c| c.queue == queue)
            .map(|c| c.stats.snapshot())
            .reduce(StatsSnapshot::combine)
    }

    /// Counters of the consumer named `name` (the first, if several share the name).
    pub fn consumer_stats(&self, name: &str) -> Option<StatsSnapshot> {
        self.stats
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.stats.snapshot())
    }

    /// Counters of every queue (its consumers added up).
    pub fn all_stats(&self) -> BTreeMap<String, StatsSnapshot> {
        let mut all: BTreeMap<String, StatsSnapshot> = BTreeMap::new();
        for c in &self.stats {
            let snapshot = c.stats.snapshot();
            all.entry(c.queue.clone())
                .and_modify(|s| *s = s.combine(snapshot))
                .or_insert(snapshot);
        }
        all
    }

    /// Wait until the app is quiet: every consumer's queue and retry tier empty and no
    /// delivery being handled or settled, seen twice in a row (50 ms apart); or until
    /// `timeout`. Returns whether it got quiet. For batch jobs and integration tests;
    /// messages published meanwhile keep it busy. A delivery the broker has sent but the
    /// consumer has not yet taken from its buffer can slip between two looks only if
    /// both miss it.
    pub async fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut quiet_before = false;
        let mut counter = QueueCounter::default();
        loop {
            let handlers_idle = self
                .stats
                .iter()
                .all(|c| c.stats.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0);
            let quiet = handlers_idle && self.idle.queues_empty(&mut counter).await;
            if quiet && quiet_before {
                counter.close().await;
                return true;
            }
            quiet_before = quiet;
            if tokio::time::Instant::now() >= deadline {
                counter.close().await;
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The app's confirmed publisher (its own connection, separate from consumers').
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// A handle that stops the app when triggered.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Readiness: consumers attached, publisher connected, dedup store answering.
    pub async fn health(&self) -> Health {
        self.health_probe().health().await
    }

    /// Run `relay` until the app shuts down, with the app's health reporting it
    /// ([`Health::outbox`]) and [`RunningApp::shutdown`] waiting for its batch in hand.
    /// Build it on the app's publisher: `OutboxRelay::new(pool, running.publisher().clone())`.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool, mut running: reliable_mq::RunningApp) {
    /// use reliable_mq::postgres::OutboxRelay;
    ///
    /// running.spawn_outbox_relay(OutboxRelay::new(pool, running.publisher().clone()));
    /// # }
    /// ```
    #[cfg(feature = "postgres")]
    pub fn spawn_outbox_relay(&mut self, relay: crate::postgres::OutboxRelay) {
        self.relays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(relay.state());
        let state = relay.state();
        let shutdown = self.shutdown.clone();
        // The relay runs in a task of its own: a panic in it stops the relay (reported by
        // health and the `relays_running` gauge) but neither the consumers nor the app,
        // which would otherwise report it as a consumer's panic.
        let relay_task = tokio::spawn(relay.run(shutdown));
        self.tasks.spawn(async move {
            if let Err(e) = relay_task.await
                && e.is_panic()
            {
                tracing::error!(
                    "the outbox relay panicked; outbox rows wait until the app restarts"
                );
                state.set_error(Some("the relay panicked".to_owned()));
            }
            Ok(())
        });
    }

    /// What [`RunningApp::health`] looks at, detached from the app (for the HTTP
    /// endpoint's tasks).
    pub(crate) fn health_probe(&self) -> HealthProbe {
        HealthProbe {
            stats: self.stats.clone(),
            publisher: self.publisher.clone(),
            dedup: self.dedup.clone(),
            #[cfg(feature = "postgres")]
            relays: Arc::clone(&self.relays),
        }
    }
}

/// The parts of a running app its health is read from.
#[derive(Clone)]
pub(crate) struct HealthProbe {
    stats: Vec<ConsumerEntry>,
    publisher: Publisher,
    dedup: Option<Arc<dyn DedupStore>>,
    #[cfg(feature = "postgres")]
    relays: Relays,
}

impl HealthProbe {
    /// See [`RunningApp::health`]. A dedup store that does not answer within
    /// [`PING_TIMEOUT`] is down: a health check must not hang on it. A publisher that has
    /// lost its connection is asked to reconnect, within the same bound and at the same
    /// time: it otherwise reconnects only on its next publish, and would stay unready
    /// after the broker is back.
    pub(crate) async fn health(&self) -> Health {
        // Side by side: a check waits one bound at most, not one per dependency.
        let dedup = async {
            match &self.dedup {
                Some(store) => tokio::time::timeout(PING_TIMEOUT, store.ping())
                    .await
                    .is_ok_and(|r| r.is_ok()),
                None => true,
            }
        };
        let publisher = tokio::time::timeout(PING_TIMEOUT, self.publisher.connect_if_needed());
        let (dedup_up, publisher_connected) = tokio::join!(dedup, publisher);
        let consumers: Vec<ConsumerHealth> = self
            .stats
            .iter()
            .map(|c| ConsumerHealth {
                name: c.name.clone(),
                queue: c.queue.clone(),
                attached: c.stats.attached.load(std::sync::atomic::Ordering::Relaxed),
                degraded: c.stats.degraded(),
            })
            .collect();
        Health {
            consumers_attached: consumers.iter().all(|c| c.attached),
            publisher_connected: publisher_connected.unwrap_or(false),
            dedup_up,
            consumers,
            #[cfg(feature = "postgres")]
            outbox: crate::postgres::RelayState::health(
                &self
                    .relays
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            ),
        }
    }
}

impl RunningApp {
    /// Wait until every consumer has attached once (its first session subscribed), or
    /// return the error of a consumer that stopped before it could. A consumer that cannot
    /// reach the broker keeps retrying with backoff, and this keeps waiting: `start`
    /// promises consumers that are attached.
    async fn wait_attached(&mut self) -> Result<(), Error> {
        let mut waited = std::time::Duration::ZERO;
        loop {
            let attached = self
                .stats
                .iter()
                .all(|c| c.stats.sessions.load(std::sync::atomic::Ordering::Relaxed) > 0);
            if attached {
                return Ok(());
            }
            if let Some(joined) = self.tasks.try_join_next() {
                match joined {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(join) => return Err(panicked(join)),
                }
            }
            let step = std::time::Duration::from_millis(10);
            tokio::time::sleep(step).await;
            waited += step;
            if waited.as_secs() >= 10 && waited.as_millis() % 10_000 < 10 {
                startup_warning(&format!(
                    "still waiting for every consumer to attach after {waited:?} (is the broker reachable?)"
                ));
            }
        }
    }

    /// Resolves with the first consumer that stops with an error.
    async fn first_failure(&mut self) -> Result<(), Error> {
        loop {
            match self.tasks.join_next().await {
                Some(Ok(Ok(()))) => continue,
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(join)) => return Err(panicked(join)),
                None => return std::future::pending().await,
            }
        }
    }

    /// Stop: no new deliveries, in-flight handlers finish within the grace period and are
    /// acked, unfinished ones stay unacked (the broker redelivers them). Returns the first
    /// consumer error, if any.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.shutdown.trigger();
        let mut first_error = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            if let Ok(Err(e)) = joined
                && first_error.is_ok()
            {
                first_error = Err(e);
            }
        }
        self.connections.close().await;
        self.publisher.close().await;
        info!("all consumers stopped");
        first_error
    }
}

/// How long a health check waits for the dedup store.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A consumer task that panicked (or was cancelled): a bug, reported as such.
fn panicked(join: tokio::task::JoinError) -> Error {
    Error::ConsumerPanicked {
        consumer: "a consumer".into(),
        detail: join.to_string(),
    }
}

#[cfg(all(test, not(feature = "redis-cluster")))]
mod cluster_feature_tests {
    #[test]
    fn a_cluster_url_without_the_feature_is_a_config_error() {
        let err = super::cluster_store(&["redis://127.0.0.1:7000".to_owned()], 4).err();
        assert!(
            matches!(&err, Some(crate::Error::Config(m)) if m.contains("`redis-cluster` feature")),
            "{:?}",
            err.map(|e| e.to_string())
        );
    }
}
