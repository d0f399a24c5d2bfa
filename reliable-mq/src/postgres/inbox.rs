//! The transactional inbox: an inbox consumer's delivery runs in one PostgreSQL
//! transaction that first records `(consumer, message_id)` and then holds the handler's
//! own writes. Commit, then ack: a crash anywhere before the commit rolls everything back
//! (the redelivery runs again), a crash after it leaves the row (the redelivery is a
//! duplicate, acked without a call). So the handler's database effects happen once.
//!
//! The transaction reaches the generated adapter through a task-local slot: the runtime
//! puts it there around the handler call, the adapter takes it out as an [`InboxTx`] for
//! the call and hands it back, and the runtime commits what it gets back.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{is_conflict, is_unavailable, millis, sqlx_source};
use crate::connection::Backoff;
use crate::consumer::ConsumerStats;
use crate::consumer::invoke::invoke;
use crate::consumer::settle::{SettleOutcome, put_back};
use crate::handler::Handler;
use crate::shutdown::ShutdownHandle;
use crate::{Delivery, FailureKind, HandlerError};

type Slot = Arc<Mutex<Option<Transaction<'static, Postgres>>>>;

tokio::task_local! {
    static INBOX: Slot;
}

/// The inbox's transaction, lent to an inbox consumer's handler for one call: run the
/// handler's queries on it (`.execute(&mut **tx)`), and write outgoing messages with
/// [`Outbox::publish`](crate::postgres::Outbox::publish)`(tx, ...)`. The runtime commits it
/// after the handler returns `Ok`, then acks; on `Err` it rolls it back. Never commit it
/// yourself.
///
/// ```no_run
/// use reliable_mq::{consumer, HandlerError};
/// use reliable_mq::postgres::InboxTx;
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: i64, qty: i32 }
///
/// #[consumer(queue = "orders", dlx = "orders.dlx", inbox)]
/// async fn record(order: Order, tx: &mut InboxTx) -> Result<(), HandlerError> {
///     sqlx::query("INSERT INTO orders (id, qty) VALUES ($1, $2)")
///         .bind(order.id)
///         .bind(order.qty)
///         .execute(&mut **tx)
///         .await?;
///     Ok(())
/// }
/// ```
pub struct InboxTx {
    tx: Option<Transaction<'static, Postgres>>,
    slot: Slot,
}

impl std::fmt::Debug for InboxTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxTx").finish_non_exhaustive()
    }
}

impl InboxTx {
    /// Borrow the transaction from the runtime for one handler call (generated code).
    #[doc(hidden)]
    pub fn take() -> Result<Self, HandlerError> {
        let taken = INBOX.try_with(|slot| {
            let tx = lock(slot).take();
            tx.map(|tx| Self {
                tx: Some(tx),
                slot: Arc::clone(slot),
            })
        });
        taken.ok().flatten().ok_or_else(|| {
            HandlerError::retry(
                "no inbox transaction for this call: a handler taking `&mut InboxTx` runs \
                 only as an `inbox` consumer, through the app",
            )
        })
    }

    /// Give the transaction back for the runtime to commit (generated code).
    #[doc(hidden)]
    pub fn hand_back(mut self) {
        if let Some(tx) = self.tx.take() {
            *lock(&self.slot) = Some(tx);
        }
    }

    /// The transaction itself (for a savepoint: `tx.transaction().begin()`).
    pub fn transaction(&mut self) -> &mut Transaction<'static, Postgres> {
        // `tx` is `Some` from `take` until `hand_back` consumes `self`.
        self.tx
            .as_mut()
            .unwrap_or_else(|| unreachable!("InboxTx without its transaction"))
    }
}

impl Deref for InboxTx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match &self.tx {
            Some(tx) => tx,
            None => unreachable!("InboxTx without its transaction"),
        }
    }
}

impl DerefMut for InboxTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.transaction()
    }
}

/// A [`Handler`] for an inbox consumer built by hand ([`ConsumerConfig::inbox`]): a
/// closure that takes the payload and the transaction and gives the transaction back with
/// its result.
///
/// [`ConsumerConfig::inbox`]: crate::ConsumerConfig::inbox
pub struct InboxFnHandler<T, F> {
    f: F,
    _payload: std::marker::PhantomData<fn() -> T>,
}

/// Wrap a closure `Fn(T, InboxTx) -> impl Future<Output = (InboxTx, Result<(), E>)>` as
/// the handler of an inbox consumer built by hand.
///
/// ```no_run
/// # use std::time::Duration;
/// use reliable_mq::ConsumerConfig;
/// use reliable_mq::postgres::inbox_handler_fn;
///
/// let handler = inbox_handler_fn(|id: i64, mut tx| async move {
///     let done = sqlx::query("INSERT INTO seen (id) VALUES ($1)")
///         .bind(id)
///         .execute(&mut *tx)
///         .await;
///     (tx, done.map(|_| ()))
/// });
/// let consumer = ConsumerConfig::new("orders", "orders.dlx", handler).inbox(Duration::from_secs(86_400));
/// # let _ = consumer;
/// ```
pub fn inbox_handler_fn<T, F, Fut, R>(f: F) -> InboxFnHandler<T, F>
where
    T: crate::handler::Payload,
    F: Fn(T, InboxTx) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = (InboxTx, R)> + Send + 'static,
    R: crate::handler::IntoHandlerResult,
{
    InboxFnHandler {
        f,
        _payload: std::marker::PhantomData,
    }
}

impl<T, F, Fut, R> Handler for InboxFnHandler<T, F>
where
    T: crate::handler::Payload,
    F: Fn(T, InboxTx) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = (InboxTx, R)> + Send + 'static,
    R: crate::handler::IntoHandlerResult,
{
    fn call(&self, delivery: Arc<Delivery>) -> crate::handler::HandlerFuture {
        let payload = match crate::handler::decode::<T>(&delivery) {
            Ok(payload) => payload,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let tx = match InboxTx::take() {
            Ok(tx) => tx,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let fut = (self.f)(payload, tx);
        Box::pin(async move {
            let (tx, result) = fut.await;
            tx.hand_back();
            result.into_handler_result()
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How many times a transaction that lost a race (serialization failure, deadlock) is run
/// again at once before the failure goes to the retry ladder like any other.
pub(crate) const CONFLICT_RETRIES: u32 = 5;

/// Longest wait between tries while the database does not answer.
const UNAVAILABLE_MAX_DELAY: Duration = Duration::from_secs(5);

/// What one inbox delivery needs from its consumer.
pub(crate) struct InboxCall<'a> {
    pub(crate) handler: &'a dyn Handler,
    pub(crate) delivery: &'a Arc<Delivery>,
    pub(crate) acker: &'a crate::transport::Acker,
    pub(crate) consumer: &'a str,
    pub(crate) timeout: Duration,
    pub(crate) dedup_ttl: Duration,
    pub(crate) stats: &'a ConsumerStats,
    pub(crate) shutdown: &'a ShutdownHandle,
    pub(crate) hand_back_at: Instant,
}

/// One try of the transaction.
enum Attempt {
    /// Settle it so.
    Settle(SettleOutcome),
    /// The database did not answer or the commit failed: nothing is acked, try again.
    Unavailable(String),
    /// Serialization failure or deadlock: run it again now.
    Conflict(HandlerError),
}

impl InboxCall<'_> {
    /// Run the delivery through the inbox. `None` when it was left unacked for the broker
    /// to redeliver (shutdown, its channel gone, or handed back while the database was
    /// down).
    pub(crate) async fn run(self) -> Option<SettleOutcome> {
        let Some(message_id) = self.delivery.message_id().filter(|id| !id.is_empty()) else {
            return Some(SettleOutcome::DeadLetter {
                kind: FailureKind::MissingMessageId,
                message: "inbox consumer received a message without message_id; publish with \
                          a message_id (reliable_mq::Publisher sets one)"
                    .into(),
            });
        };
        let Some(pool) = self.delivery.state::<PgPool>() else {
            // The app checks at start-up that a pool is registered.
            return Some(SettleOutcome::from_error(HandlerError::retry(
                "no PostgreSQL pool is registered: App::with_postgres(pool)",
            )));
        };
        let mut conflicts = 0;
        let mut backoff: Option<Backoff> = None;
        let mut signal = self.shutdown.signal();
        let outcome = loop {
            let reason = match self.attempt(&pool, message_id).await {
                Attempt::Settle(outcome) => break Some(outcome),
                Attempt::Conflict(e) if conflicts < CONFLICT_RETRIES => {
                    conflicts += 1;
                    debug!(error = %e, conflicts, "transaction lost a race; running it again");
                    continue;
                }
                Attempt::Conflict(e) => break Some(SettleOutcome::from_error(e)),
                Attempt::Unavailable(reason) => reason,
            };
            let delay = match &mut backoff {
                Some(b) => b.next_delay(),
                None => {
                    warn!(%reason, "PostgreSQL unavailable: pausing this delivery (unacked, nothing dead-lettered) until it answers");
                    self.stats
                        .paused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    backoff
                        .insert(Backoff::new(UNAVAILABLE_MAX_DELAY))
                        .next_delay()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = signal.cancelled() => break None,
                // Held any longer, the broker would close the channel: give it back.
                _ = tokio::time::sleep_until(self.hand_back_at) => {
                    warn!("PostgreSQL still unavailable; handing the delivery back before the broker's consumer_timeout");
                    put_back(self.acker, Duration::ZERO).await;
                    ConsumerStats::bump(&self.stats.requeued);
                    break None;
                }
            }
            if !self.acker.usable() {
                debug!("channel gone while paused on PostgreSQL; the broker redelivers");
                break None;
            }
        };
        if backoff.is_some() {
            self.stats
                .paused
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            info!("PostgreSQL answers again; resuming");
        }
        outcome
    }

    async fn attempt(&self, pool: &PgPool, message_id: &str) -> Attempt {
        let mut tx = match pool.begin().await {
            Ok(tx) => tx,
            Err(e) => return Attempt::Unavailable(format!("cannot begin a transaction: {e}")),
        };
        let inserted = sqlx::query(
            "INSERT INTO reliable_mq_inbox (consumer, message_id, expires_at) \
             VALUES ($1, $2, now() + make_interval(secs => $3::float8 / 1000)) \
             ON CONFLICT DO NOTHING",
        )
        .bind(self.consumer)
        .bind(message_id)
        .bind(millis(self.dedup_ttl) as f64)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(done) if done.rows_affected() == 0 => {
                let _ = tx.rollback().await;
                ConsumerStats::bump(&self.stats.duplicates);
                self.stats.metrics.duplicate();
                debug!(
                    "duplicate of a message already in the inbox; acking without a handler call"
                );
                return Attempt::Settle(SettleOutcome::Ack);
            }
            Ok(_) => {}
            Err(e) if is_conflict(&e) => return Attempt::Conflict(HandlerError::from(e)),
            Err(e) => {
                let hint = if matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01"))
                {
                    " (the inbox table is missing: run App::migrate())"
                } else {
                    ""
                };
                return Attempt::Unavailable(format!("cannot write the inbox row: {e}{hint}"));
            }
        }
        let slot: Slot = Arc::new(Mutex::new(Some(tx)));
        let result = INBOX
            .scope(
                Arc::clone(&slot),
                invoke(self.handler, Arc::clone(self.delivery), self.timeout),
            )
            .await;
        let tx = lock(&slot).take();
        match (result, tx) {
            (Ok(()), Some(tx)) => match tx.commit().await {
                Ok(()) => {
                    #[cfg(feature = "testing")]
                    crate::postgres::seams::fire(&crate::postgres::seams::AFTER_INBOX_COMMIT);
                    ConsumerStats::bump(&self.stats.handled);
                    self.stats.metrics.handled();
                    debug!("handled and committed");
                    Attempt::Settle(SettleOutcome::Ack)
                }
                Err(e) if is_conflict(&e) => Attempt::Conflict(HandlerError::from(e)),
                // The server refused the commit (a deferred constraint): nothing was
                // committed, so the message fails like a handler error (the retry copy is
                // what gets acked, never this outcome).
                Err(e @ sqlx::Error::Database(_)) if !is_unavailable(&e) => {
                    warn!(error = %e, "commit refused; the message takes the retry ladder");
                    Attempt::Settle(SettleOutcome::from_error(HandlerError::from(e)))
                }
                // Committed or not, we cannot tell: never ack. The next try (or the
                // redelivery) finds the inbox row if it did commit, and acks it as a
                // duplicate.
                Err(e) => Attempt::Unavailable(format!("commit failed: {e}")),
            },
            (Ok(()), None) => Attempt::Settle(SettleOutcome::from_error(HandlerError::retry(
                "the handler did not hand the inbox transaction back",
            ))),
            (Err(e), tx) => {
                if let Some(tx) = tx {
                    // Dropped unrolled-back, sqlx rolls it back when the connection is
                    // next used; doing it now frees the row locks at once.
                    let _ = tx.rollback().await;
                }
                match e.source().and_then(sqlx_source) {
                    Some(db) if is_conflict(db) => Attempt::Conflict(e),
                    Some(db) if is_unavailable(db) => {
                        Attempt::Unavailable(format!("the handler's query failed: {db}"))
                    }
                    _ => {
                        warn!(error = %e, "handler failed; transaction rolled back");
                        Attempt::Settle(SettleOutcome::from_error(e))
                    }
                }
            }
        }
    }
}

/// Delete expired inbox rows, a bounded batch per round, every `every` until shutdown. Each
/// round costs one index range scan on `expires_at`.
pub(crate) async fn clean_up(pool: PgPool, every: Duration, shutdown: ShutdownHandle) {
    let mut signal = shutdown.signal();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = signal.cancelled() => return,
        }
        match delete_expired(&pool, CLEAN_UP_BATCH).await {
            Ok(0) => {}
            Ok(n) => debug!(rows = n, "expired inbox rows removed"),
            Err(e) => debug!(error = %e, "cannot remove expired inbox rows now; trying next round"),
        }
    }
}

/// Rows removed per clean-up round at most.
const CLEAN_UP_BATCH: i64 = 5_000;

/// Delete up to `limit` expired inbox rows; how many went.
pub async fn delete_expired(pool: &PgPool, limit: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM reliable_mq_inbox WHERE (consumer, message_id) IN ( \
             SELECT consumer, message_id FROM reliable_mq_inbox \
             WHERE expires_at < now() LIMIT $1 FOR UPDATE SKIP LOCKED)",
    )
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
