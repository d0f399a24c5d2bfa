//! The transactional outbox: messages written in the caller's transaction
//! ([`Outbox::publish`]) and published after its commit by a relay ([`OutboxRelay`])
//! through the confirmed [`Publisher`], with the row's `message_id`.
//!
//! The relay takes a batch of pending rows with `FOR UPDATE SKIP LOCKED`, publishes them
//! all at once, and marks them in the same transaction: several relays never take the same
//! row while one holds it, and a relay killed mid-batch leaves its rows pending (its
//! transaction rolls back), so they are published again, with the same `message_id`: at
//! least once, which an inbox or idempotent consumer turns into once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lapin::BasicProperties;
use serde::Serialize;
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool, Row};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::{is_unavailable, millis};
use crate::Publisher;
use crate::observe::outbox_metrics;
use crate::publisher::PublishError;
use crate::shutdown::ShutdownHandle;

/// The channel the outbox trigger notifies on commit.
const CHANNEL: &str = "reliable_mq_outbox";

/// Writes messages to the outbox table, in the caller's transaction.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use reliable_mq::postgres::Outbox;
///
/// let mut tx = pool.begin().await?;
/// sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
///     .execute(&mut *tx)
///     .await?;
/// Outbox::publish(&mut tx, "bank", "account.debited", &serde_json::json!({"id": 1}))
///     .await?;
/// tx.commit().await?; // the message exists if and only if the update does
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Outbox;

/// Options of one outbox message.
#[derive(Debug, Clone, Default)]
pub struct OutboxMessage {
    /// The `message_id` to publish with (a fresh UUIDv7 when `None`). Unique in the outbox.
    pub message_id: Option<String>,
    /// A key grouping messages that belong together (an order id). A relay with
    /// [`OutboxRelay::ordered_per_aggregate`] publishes the messages of one key one at a
    /// time, in the order they were written; without it the key is only stored.
    pub aggregate_key: Option<String>,
}

/// Why a message could not be written to the outbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The value could not be serialized to JSON.
    #[error("cannot serialize the outbox message to JSON: {0}")]
    Serialize(String),
    /// A name breaks an AMQP limit (over 255 bytes): it could never be published.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// `exchange`, `routing_key` or `message_id`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The database refused the write.
    #[error("cannot write to the outbox: {0}")]
    Database(#[from] sqlx::Error),
}

/// A message the relay gave up on (unroutable, refused by the broker, or too large).
#[derive(Debug, Clone)]
pub struct FailedMessage {
    /// The outbox row.
    pub id: i64,
    /// The message's id.
    pub message_id: String,
    /// Where it was to go.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Why it failed (the broker's reply).
    pub reason: String,
}

/// How many outbox rows are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Written, not yet confirmed by the broker.
    pub pending: i64,
    /// Confirmed, kept until the retention period ends.
    pub sent: i64,
    /// Given up on; see [`Outbox::failed`].
    pub failed: i64,
}

/// The relay's backlog: what is waiting and what was given up on (see [`Outbox::backlog`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxBacklog {
    /// Rows not yet confirmed by the broker.
    pub pending: i64,
    /// Rows given up on, kept until someone looks ([`Outbox::failed`]).
    pub failed: i64,
    /// How long the oldest pending row has waited (`None`: nothing pending).
    pub oldest_pending: Option<Duration>,
}

/// The outbox as the app's health reports it ([`Health::outbox`](crate::Health::outbox)):
/// the relays this app runs and the backlog they last counted.
///
/// Failed rows and a stopped relay are reported here and in the metrics but do not make
/// the app unready: a missing binding or a refused exchange is not fixed by taking the
/// instance out of service, and the rows wait, durable, for [`Outbox::retry_failed`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxHealth {
    /// Relays started with [`RunningApp::spawn_outbox_relay`](crate::RunningApp::spawn_outbox_relay).
    pub relays: usize,
    /// How many of them are running (a relay stops at shutdown only, or on a panic: then
    /// `error` says so, and the consumers and the rest of the app keep running).
    pub relays_running: usize,
    /// The backlog as last counted (every few seconds, and after a batch marked rows
    /// failed); `None` until the first count succeeds.
    pub backlog: Option<OutboxBacklog>,
    /// Why the last batch or count failed (the database does not answer ...); `None`
    /// after a batch that worked.
    pub error: Option<String>,
}

/// What one relay last saw, shared with the app's health probe.
#[derive(Debug, Default)]
pub(crate) struct RelayState {
    running: AtomicBool,
    backlog: Mutex<Option<OutboxBacklog>>,
    error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RelayState {
    pub(crate) fn set_error(&self, error: Option<String>) {
        *lock(&self.error) = error;
    }

    /// The health of these relays (one outbox table: their backlogs are the same count,
    /// the freshest is the one reported).
    pub(crate) fn health(relays: &[Arc<RelayState>]) -> Option<OutboxHealth> {
        if relays.is_empty() {
            return None;
        }
        Some(OutboxHealth {
            relays: relays.len(),
            relays_running: relays
                .iter()
                .filter(|r| r.running.load(Ordering::Relaxed))
                .count(),
            backlog: relays.iter().find_map(|r| *lock(&r.backlog)),
            error: relays.iter().find_map(|r| lock(&r.error).clone()),
        })
    }
}

/// Marks a relay stopped however its task ends (shutdown, or a panic unwinding).
struct Running(Arc<RelayState>);

impl Running {
    fn new(state: Arc<RelayState>) -> Self {
        state.running.store(true, Ordering::Relaxed);
        outbox_metrics::relay_running(true);
        Self(state)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Relaxed);
        outbox_metrics::relay_running(false);
    }
}

impl Outbox {
    /// Write `value` (as JSON) to the outbox in the transaction behind `tx`; the relay
    /// publishes it to `exchange` with `routing_key` once the transaction commits. Returns
    /// the `message_id` it will carry.
    ///
    /// `tx` is a `&mut PgConnection`: pass `&mut tx` for an `sqlx::Transaction`, and the
    /// `tx` of an inbox handler (`&mut InboxTx`) as it is.
    pub async fn publish<T: Serialize + ?Sized>(
        tx: &mut PgConnection,
        exchange: &str,
        routing_key: &str,
        value: &T,
    ) -> Result<String, OutboxError> {
        Self::publish_with(tx, exchange, routing_key, value, OutboxMessage::default()).await
    }

    /// [`Outbox::publish`] with a chosen `message_id` or an aggregate key.
    pub async fn publish_with<T: Serialize + ?Sized>(
        tx: &mut PgConnection,
        exchange: &str,
        routing_key: &str,
        value: &T,
        options: OutboxMessage,
    ) -> Result<String, OutboxError> {
        let message_id = options
            .message_id
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        for (field, text) in [
            ("exchange", exchange),
            ("routing_key", routing_key),
            ("message_id", message_id.as_str()),
        ] {
            if text.len() > 255 {
                return Err(OutboxError::Invalid {
                    field,
                    reason: format!("is {} bytes; AMQP allows at most 255", text.len()),
                });
            }
        }
        let body = serde_json::to_vec(value).map_err(|e| OutboxError::Serialize(e.to_string()))?;
        sqlx::query(
            "INSERT INTO reliable_mq_outbox (message_id, exchange, routing_key, body, aggregate_key) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&message_id)
        .bind(exchange)
        .bind(routing_key)
        .bind(body)
        .bind(options.aggregate_key)
        .execute(tx)
        .await?;
        Ok(message_id)
    }

    /// The messages the relay gave up on, oldest first (at most `limit`).
    pub async fn failed(pool: &PgPool, limit: i64) -> Result<Vec<FailedMessage>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, message_id, exchange, routing_key, coalesce(failed_reason, '') AS reason \
             FROM reliable_mq_outbox WHERE status = 'failed' ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(FailedMessage {
                    id: r.try_get("id")?,
                    message_id: r.try_get("message_id")?,
                    exchange: r.try_get("exchange")?,
                    routing_key: r.try_get("routing_key")?,
                    reason: r.try_get("reason")?,
                })
            })
            .collect()
    }

    /// Put a failed message back to pending (after fixing what made it fail: a missing
    /// binding, a permission). `true` if it was failed.
    pub async fn retry_failed(pool: &PgPool, id: i64) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE reliable_mq_outbox SET status = 'pending', failed_reason = NULL, \
             next_attempt_at = now() WHERE id = $1 AND status = 'failed'",
        )
        .bind(id)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// How many rows are pending, sent and failed (a health or metrics probe).
    pub async fn stats(pool: &PgPool) -> Result<OutboxStats, sqlx::Error> {
        let row = sqlx::query(
            "SELECT count(*) FILTER (WHERE status = 'pending') AS pending, \
                    count(*) FILTER (WHERE status = 'sent') AS sent, \
                    count(*) FILTER (WHERE status = 'failed') AS failed \
             FROM reliable_mq_outbox",
        )
        .fetch_one(pool)
        .await?;
        Ok(OutboxStats {
            pending: row.try_get("pending")?,
            sent: row.try_get("sent")?,
            failed: row.try_get("failed")?,
        })
    }

    /// Pending and failed rows and the age of the oldest pending one. Reads only the
    /// partial indexes of pending and failed rows (unlike [`Outbox::stats`], which counts
    /// the sent rows too): cheap enough for a health probe while the backlog is small.
    pub async fn backlog(pool: &PgPool) -> Result<OutboxBacklog, sqlx::Error> {
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM reliable_mq_outbox WHERE status = 'pending') AS pending, \
                    (SELECT count(*) FROM reliable_mq_outbox WHERE status = 'failed') AS failed, \
                    (SELECT (extract(epoch FROM clock_timestamp() - min(created_at)) * 1000)::int8 \
                       FROM reliable_mq_outbox WHERE status = 'pending') AS oldest_ms",
        )
        .fetch_one(pool)
        .await?;
        let oldest_ms: Option<i64> = row.try_get("oldest_ms")?;
        Ok(OutboxBacklog {
            pending: row.try_get("pending")?,
            failed: row.try_get("failed")?,
            oldest_pending: oldest_ms.map(|ms| Duration::from_millis(ms.max(0).unsigned_abs())),
        })
    }
}

/// Publishes pending outbox rows through a confirmed [`Publisher`] and marks them sent
/// after the broker's confirm. Run one per instance (several are safe: see the module).
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, app: reliable_mq::RunningApp) {
/// use reliable_mq::postgres::OutboxRelay;
///
/// let relay = OutboxRelay::new(pool, app.publisher().clone()).spawn(app.shutdown_handle());
/// # let _ = relay; }
/// ```
#[derive(Debug, Clone)]
pub struct OutboxRelay {
    pool: PgPool,
    publisher: Publisher,
    batch_size: i64,
    poll_every: Duration,
    retention: Duration,
    retry_delay: Duration,
    count_every: Duration,
    ordered_per_aggregate: bool,
    state: Arc<RelayState>,
    /// The `database` label of this relay's metrics, asked of the database once (see
    /// [`OutboxRelay::database_label`]); shared by the relay's clones.
    database: Arc<tokio::sync::OnceCell<Arc<str>>>,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayBatch {
    /// Rows taken.
    pub taken: usize,
    /// Confirmed and marked sent.
    pub sent: usize,
    /// Marked failed (unroutable, refused, too large).
    pub failed: usize,
    /// Left pending for a later try (connection trouble, no confirm).
    pub deferred: usize,
}

impl OutboxRelay {
    /// A relay over `pool`'s outbox, publishing with `publisher`: batches of 256, a poll
    /// every second besides the notifications, sent rows kept for a day.
    pub fn new(pool: PgPool, publisher: Publisher) -> Self {
        Self {
            database: Arc::default(),
            pool,
            publisher,
            batch_size: 256,
            poll_every: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
            retry_delay: Duration::from_secs(1),
            count_every: Duration::from_secs(5),
            ordered_per_aggregate: false,
            state: Arc::default(),
        }
    }

    /// Publish the rows of one [`aggregate_key`](OutboxMessage::aggregate_key) one at a
    /// time, in `id` order (the order they were written): a row waits while an earlier
    /// pending row of its key is being published by any relay, or waits for a retry.
    /// Rows without a key are not held back. A row marked failed no longer holds the
    /// later ones back (it waits for [`Outbox::retry_failed`], out of order).
    ///
    /// Set it on every relay of the table (one relay without it publishes out of order).
    /// The order is the order of `id`s, which is the commit order for the writes of one
    /// aggregate when the writing transactions lock the aggregate (an `UPDATE` of its
    /// row) before writing to the outbox. Cost: an aggregate publishes one message per
    /// batch round trip (a few milliseconds) instead of a batch at a time.
    pub fn ordered_per_aggregate(mut self, ordered: bool) -> Self {
        self.ordered_per_aggregate = ordered;
        self
    }

    /// How often the backlog is counted for the health and the gauges (every 5 s by
    /// default, and after a batch that marked rows failed).
    pub fn count_every(mut self, every: Duration) -> Self {
        self.count_every = every;
        self
    }

    /// The state the app's health reads.
    pub(crate) fn state(&self) -> Arc<RelayState> {
        Arc::clone(&self.state)
    }

    /// Rows taken (and locked) per batch; all of a batch's publishes are in flight at once.
    pub fn batch_size(mut self, rows: u16) -> Self {
        self.batch_size = i64::from(rows.max(1));
        self
    }

    /// How often to look for rows without a notification (one missed, or written by a
    /// transaction before the relay listened).
    pub fn poll_every(mut self, every: Duration) -> Self {
        self.poll_every = every.max(Duration::from_millis(10));
        self
    }

    /// How long sent rows are kept before they are removed.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Run on a task of its own until `shutdown` is triggered.
    pub fn spawn(self, shutdown: ShutdownHandle) -> JoinHandle<()> {
        tokio::spawn(self.run(shutdown))
    }

    /// Relay until `shutdown` is triggered: batches while there is work, then wait for a
    /// notification or the poll interval. Database or broker trouble is logged and tried
    /// again; nothing is lost (the rows stay pending).
    pub async fn run(self, shutdown: ShutdownHandle) {
        let _running = Running::new(Arc::clone(&self.state));
        let mut signal = shutdown.signal();
        let mut listener: Option<PgListener> = None;
        let mut last_clean_up = tokio::time::Instant::now();
        let mut last_count: Option<tokio::time::Instant> = None;
        let mut trouble = crate::connection::Backoff::new(Duration::from_secs(5));
        loop {
            if signal.is_triggered() {
                return;
            }
            if listener.is_none() {
                listener = self.listen().await;
            }
            let more = match self.relay_batch().await {
                Ok(batch) => {
                    trouble.reset();
                    self.state.set_error(None);
                    if batch.taken > 0 {
                        debug!(?batch, "outbox batch relayed");
                    }
                    let count_due = last_count.is_none_or(|at| at.elapsed() >= self.count_every);
                    if batch.failed > 0 || count_due {
                        last_count = Some(tokio::time::Instant::now());
                        self.count().await;
                    }
                    // Ordered, a row's successor becomes eligible only once its batch
                    // committed: any progress may have left more to take at once.
                    if self.ordered_per_aggregate {
                        batch.taken > 0
                    } else {
                        batch.taken as i64 == self.batch_size
                    }
                }
                Err(e) => {
                    self.state
                        .set_error(Some(format!("cannot relay the outbox: {e}")));
                    let delay = trouble.next_delay();
                    warn!(error = %e, ?delay, "outbox relay cannot read the outbox; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = signal.cancelled() => return,
                    }
                    continue;
                }
            };
            if last_clean_up.elapsed() >= CLEAN_UP_EVERY {
                last_clean_up = tokio::time::Instant::now();
                if let Err(e) = self.remove_sent().await {
                    debug!(error = %e, "cannot remove old sent outbox rows now");
                }
            }
            if more {
                continue;
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = notified => if r.is_err() {
                    // Reconnected on the next round; the poll covers the gap.
                    listener = None;
                },
                _ = tokio::time::sleep(self.poll_every) => {}
                _ = signal.cancelled() => return,
            }
        }
    }

    /// Count the backlog for the health and the gauges.
    async fn count(&self) {
        match Outbox::backlog(&self.pool).await {
            Ok(backlog) => {
                outbox_metrics::rows(
                    &self.database_label().await,
                    backlog.pending,
                    backlog.failed,
                    backlog.oldest_pending.map_or(0.0, |d| d.as_secs_f64()),
                );
                *lock(&self.state.backlog) = Some(backlog);
            }
            Err(e) => {
                debug!(error = %e, "cannot count the outbox backlog now");
                self.state
                    .set_error(Some(format!("cannot count the outbox backlog: {e}")));
            }
        }
    }

    /// Where this relay's outbox table is, as `host:port/database/schema`: the `database`
    /// label of its metrics, so that relays of two outbox tables in one process (two
    /// databases, or two schemas) keep their series apart. Asked of the database the
    /// first time (its schema is the pool's `search_path`); while it cannot answer, the
    /// label is `host:port/database` from the pool's options, not remembered. No user
    /// name or password.
    async fn database_label(&self) -> Arc<str> {
        let asked = self
            .database
            .get_or_try_init(|| async {
                let (database, schema): (String, Option<String>) =
                    sqlx::query_as("SELECT current_database(), current_schema()")
                        .fetch_one(&self.pool)
                        .await?;
                Ok::<_, sqlx::Error>(self.place(&database, schema.as_deref()))
            })
            .await;
        match asked {
            Ok(label) => Arc::clone(label),
            Err(_) => {
                let options = self.pool.connect_options();
                self.place(
                    options
                        .get_database()
                        .unwrap_or_else(|| options.get_username()),
                    None,
                )
            }
        }
    }

    /// `host:port/database[/schema]` of this relay's server.
    fn place(&self, database: &str, schema: Option<&str>) -> Arc<str> {
        let options = self.pool.connect_options();
        let (host, port) = (options.get_host(), options.get_port());
        match schema {
            Some(schema) => format!("{host}:{port}/{database}/{schema}"),
            None => format!("{host}:{port}/{database}"),
        }
        .into()
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await.ok()?;
        listener.listen(CHANNEL).await.ok()?;
        Some(listener)
    }

    /// Take one batch of pending rows, publish them all, mark each by its outcome.
    pub async fn relay_batch(&self) -> Result<RelayBatch, sqlx::Error> {
        let timer = outbox_metrics::batch_started();
        let mut tx = self.pool.begin().await?;
        let select = if self.ordered_per_aggregate {
            // The oldest pending row of each key only: a row whose key has an earlier
            // pending row waits, whether that row is locked by another relay's batch
            // (skipped below, but still pending in this snapshot) or waits for a retry.
            "SELECT id, message_id, exchange, routing_key, body FROM reliable_mq_outbox o \
             WHERE status = 'pending' AND next_attempt_at <= now() \
             AND (aggregate_key IS NULL OR NOT EXISTS ( \
                 SELECT 1 FROM reliable_mq_outbox e WHERE e.aggregate_key = o.aggregate_key \
                 AND e.status = 'pending' AND e.id < o.id)) \
             ORDER BY id LIMIT $1 FOR UPDATE OF o SKIP LOCKED"
        } else {
            "SELECT id, message_id, exchange, routing_key, body FROM reliable_mq_outbox \
             WHERE status = 'pending' AND next_attempt_at <= now() \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
        };
        let rows = sqlx::query(select)
            .bind(self.batch_size)
            .fetch_all(&mut *tx)
            .await?;
        let mut batch = RelayBatch {
            taken: rows.len(),
            ..RelayBatch::default()
        };
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(batch);
        }
        let mut publishes = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.try_get("id")?;
            let message_id: String = row.try_get("message_id")?;
            let exchange: String = row.try_get("exchange")?;
            let routing_key: String = row.try_get("routing_key")?;
            let body: Vec<u8> = row.try_get("body")?;
            let publisher = self.publisher.clone();
            publishes.push(async move {
                let properties = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_message_id(message_id.as_str().into());
                let outcome = publisher
                    .publish_raw(&exchange, &routing_key, body, properties)
                    .await;
                (id, outcome)
            });
        }
        let outcomes = futures_util::future::join_all(publishes).await;
        #[cfg(feature = "testing")]
        crate::postgres::seams::fire(&crate::postgres::seams::RELAY_BEFORE_MARK);
        let mut sent = Vec::new();
        let mut failed_kinds = Vec::new();
        for (id, outcome) in outcomes {
            let e = match outcome {
                Ok(()) => {
                    sent.push(id);
                    continue;
                }
                Err(e) => e,
            };
            if let Some(kind) = gives_up(&e) {
                warn!(id, error = %e, "outbox message failed for good; marked failed");
                sqlx::query(
                    "UPDATE reliable_mq_outbox SET status = 'failed', failed_reason = $2, \
                     attempts = attempts + 1 WHERE id = $1",
                )
                .bind(id)
                .bind(e.to_string())
                .execute(&mut *tx)
                .await?;
                failed_kinds.push(kind);
                batch.failed += 1;
            } else {
                debug!(id, error = %e, "outbox message not confirmed; left pending");
                sqlx::query(
                    "UPDATE reliable_mq_outbox SET attempts = attempts + 1, \
                     next_attempt_at = now() + make_interval(secs => $2::float8 / 1000) \
                     WHERE id = $1",
                )
                .bind(id)
                .bind(millis(self.retry_delay) as f64)
                .execute(&mut *tx)
                .await?;
                batch.deferred += 1;
            }
        }
        if !sent.is_empty() {
            sqlx::query(
                "UPDATE reliable_mq_outbox SET status = 'sent', sent_at = now(), \
                 attempts = attempts + 1 WHERE id = ANY($1)",
            )
            .bind(&sent)
            .execute(&mut *tx)
            .await?;
        }
        batch.sent = sent.len();
        // A failed commit leaves the rows pending: they are published again (same
        // message_id), which consumers deduplicate.
        tx.commit().await?;
        // Counted once committed: a batch rolled back is published again, and counted then.
        let database = self.database_label().await;
        outbox_metrics::batch_done(&database, timer, batch.sent, batch.deferred);
        for kind in failed_kinds {
            outbox_metrics::failed(&database, kind);
        }
        Ok(batch)
    }

    /// Remove sent rows older than the retention, a bounded batch.
    async fn remove_sent(&self) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "DELETE FROM reliable_mq_outbox WHERE id IN ( \
                 SELECT id FROM reliable_mq_outbox WHERE status = 'sent' \
                 AND sent_at < now() - make_interval(secs => $1::float8 / 1000) \
                 LIMIT 10000 FOR UPDATE SKIP LOCKED)",
        )
        .bind(millis(self.retention) as f64)
        .execute(&self.pool)
        .await;
        match done {
            Ok(done) => Ok(done.rows_affected()),
            Err(e) if is_unavailable(&e) => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// How often the relay removes sent rows past their retention.
const CLEAN_UP_EVERY: Duration = Duration::from_secs(60);

/// Whether publishing again cannot help (the broker answered, and the answer is no), and
/// if so the failure's kind for the metrics.
fn gives_up(e: &PublishError) -> Option<&'static str> {
    match e {
        PublishError::Unroutable { .. } => Some("unroutable"),
        PublishError::Refused { .. } => Some("refused"),
        PublishError::Nacked { .. } => Some("nacked"),
        PublishError::TooLarge { .. } => Some("too_large"),
        PublishError::Invalid { .. } | PublishError::Serialize(_) => Some("invalid"),
        _ => None,
    }
}
