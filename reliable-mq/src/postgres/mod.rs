//! Exactly-once effects for handlers that write to PostgreSQL (feature `postgres`): the
//! transactional inbox (`#[consumer(inbox)]`, [`InboxTx`]) and outbox ([`Outbox`],
//! [`OutboxRelay`]). See `docs/architecture.md`, "The transactional inbox and outbox".
//!
//! The schema is in `reliable-mq/migrations/` (plain SQL), applied by [`migrate`] or
//! [`App::migrate`](crate::App::migrate). Both tables live in the pool's `search_path`.

pub(crate) mod inbox;
mod outbox;

use std::time::Duration;

/// Delete up to `limit` inbox rows past their `dedup_ttl` (the app does this every minute
/// for its inbox consumers); how many went.
pub use inbox::delete_expired as remove_expired_inbox_rows;
pub use inbox::{InboxFnHandler, InboxTx, inbox_handler_fn};
pub(crate) use outbox::RelayState;
pub use outbox::{
    FailedMessage, Outbox, OutboxBacklog, OutboxError, OutboxHealth, OutboxMessage, OutboxRelay,
    OutboxStats, RelayBatch,
};
pub use sqlx::PgPool;

use crate::Error;

/// Crash seams for the fault suite (feature `testing`): a function the test process sets,
/// called right after an inbox commit (before the ack) and right after a relay batch's
/// confirms (before the rows are marked sent). Not a public API.
#[doc(hidden)]
#[cfg(feature = "testing")]
pub mod seams {
    use std::sync::OnceLock;

    /// Called after an inbox transaction committed, before its delivery is acked.
    pub static AFTER_INBOX_COMMIT: OnceLock<fn()> = OnceLock::new();
    /// Called after a relay batch was confirmed, before its rows are marked sent.
    pub static RELAY_BEFORE_MARK: OnceLock<fn()> = OnceLock::new();

    pub(crate) fn fire(seam: &OnceLock<fn()>) {
        if let Some(f) = seam.get() {
            f();
        }
    }
}

/// Pool options for the inbox: give up acquiring after 3 s (while PostgreSQL is down,
/// inbox deliveries pause in place and try again at that pace), and no ping of each
/// connection on acquire (`test_before_acquire(false)`). sqlx's default ping costs a round
/// trip per delivery (without it the inbox ran 9-28% faster in `BENCHMARKS.md`) and
/// buys the inbox nothing: a connection found dead by `BEGIN` makes the delivery wait and
/// try again on another one, nothing is acked. Other code on the same pool then sees the
/// error of a dead connection once per connection after a database restart, instead of
/// never. Set `max_connections` to at least the inbox consumers' concurrency, plus what
/// the rest of the service needs.
///
/// ```no_run
/// # async fn demo() -> Result<(), sqlx::Error> {
/// let pool = reliable_mq::postgres::pool_options()
///     .max_connections(20)
///     .connect("postgres://app@127.0.0.1/shop")
///     .await?;
/// # let _ = pool; Ok(()) }
/// ```
pub fn pool_options() -> sqlx::postgres::PgPoolOptions {
    sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(false)
}

/// Apply the inbox and outbox schema to `pool`'s database (idempotent: safe on every
/// start, and from several instances at once: sqlx takes an advisory lock).
///
/// The migrator ignores migrations it does not know, so an application's own sqlx
/// migrations in the same schema do not stop it; the application's migrator needs
/// `set_ignore_missing(true)` in turn (or apply `reliable-mq/migrations/*.sql` with your
/// own tooling instead).
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
        .run(pool)
        .await
        .map_err(|e| Error::Config(format!("applying the reliable-mq inbox/outbox schema: {e}")))
}

/// Whether `e` says the database cannot be reached right now (connection refused or
/// lost, pool exhausted, server shutting down or starting): the delivery waits for it,
/// it is not the message's fault.
pub(crate) fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // Class 08: connection exception; 57P01..57P03: admin shutdown, crash
            // shutdown, cannot connect now (starting up or in recovery).
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// Whether `e` is a serialization failure or a deadlock: the transaction lost a race and
/// may well succeed if run again at once.
pub(crate) fn is_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|code| matches!(&*code, "40001" | "40P01")))
}

/// The first `sqlx::Error` in `e`'s chain of sources.
pub(crate) fn sqlx_source<'a>(
    e: &'a (dyn std::error::Error + Send + Sync + 'static),
) -> Option<&'a sqlx::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<sqlx::Error>() {
            return Some(found);
        }
        next = err.source();
    }
    None
}

/// `d` as a PostgreSQL interval in milliseconds (saturating).
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_and_conflict_are_told_apart() {
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(is_unavailable(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        assert!(!is_conflict(&sqlx::Error::PoolTimedOut));
        let wrapped = crate::HandlerError::from(sqlx::Error::PoolTimedOut);
        let source = wrapped.source().and_then(sqlx_source);
        assert!(source.is_some_and(is_unavailable));
    }
}
