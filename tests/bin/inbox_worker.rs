//! A process for the PostgreSQL fault suite: an inbox consumer of `rmq-fault-inbox` that
//! appends one row per handler call to `orders` (no unique key, so a second application
//! would show), and, with `FAULT_ROLE=relay`, an outbox relay too; it SIGKILLs itself at
//! the chosen point after the chosen number of events.
//!
//! Environment: `FAULT_SCHEMA` (the schema of its tables), `FAULT_KILL` (`none`,
//! `handler`: at the start of a call, `write`: after the business write, before the commit,
//! `commit`: after the commit, before the ack, `relay`: after a relay batch's confirms,
//! before its rows are marked sent), `FAULT_KILL_AFTER` (how many such points pass first),
//! `FAULT_ROLE` (`consumer` or `relay`), `DATABASE_URL`, `AMQP_URL`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reliable_mq::postgres::{InboxTx, OutboxRelay};
use reliable_mq::{App, Config, Delivery, HandlerError, consumer};
use sqlx::postgres::PgConnectOptions;

static PASSED: AtomicU64 = AtomicU64::new(0);
static KILL_AFTER: AtomicU64 = AtomicU64::new(u64::MAX);

/// Count one pass of the kill point; the `KILL_AFTER`th kills this process (SIGKILL:
/// nothing is flushed, closed or acked).
fn kill_point() {
    if PASSED.fetch_add(1, Ordering::SeqCst) + 1 >= KILL_AFTER.load(Ordering::SeqCst) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &std::process::id().to_string()])
            .status();
        // The signal is asynchronous: never get past this point.
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn kill_at(point: &str) -> bool {
    std::env::var("FAULT_KILL").is_ok_and(|k| k == point)
}

#[consumer(
    queue = "rmq-fault-inbox",
    dlx = "rmq-fault-inbox.dlx",
    inbox,
    concurrency = 8,
    prefetch = 32,
    timeout = "10s"
)]
async fn apply(n: i64, tx: &mut InboxTx, delivery: &Delivery) -> Result<(), HandlerError> {
    if kill_at("handler") {
        kill_point();
    }
    sqlx::query("INSERT INTO orders (n, message_id) VALUES ($1, $2)")
        .bind(n)
        .bind(delivery.message_id().unwrap_or(""))
        .execute(&mut **tx)
        .await?;
    if kill_at("write") {
        kill_point();
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let schema = std::env::var("FAULT_SCHEMA").map_err(|_| "FAULT_SCHEMA must be set")?;
    if let Ok(n) = std::env::var("FAULT_KILL_AFTER") {
        KILL_AFTER.store(n.parse()?, Ordering::SeqCst);
    }
    if kill_at("commit") {
        let _ = reliable_mq::__private::inbox_seams::AFTER_INBOX_COMMIT.set(kill_point);
    }
    if kill_at("relay") {
        let _ = reliable_mq::__private::inbox_seams::RELAY_BEFORE_MARK.set(kill_point);
    }
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let options: PgConnectOptions = url.parse()?;
    // The recommended pool (no ping per acquire), so the PostgreSQL restart scenario
    // covers connections found dead by the inbox's own BEGIN.
    let pool = reliable_mq::postgres::pool_options()
        .max_connections(12)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(options.options([("search_path", schema.as_str())]))
        .await?;
    let config = Config::from_env()?
        .with_connection_name("rmq-fault-inbox-worker")
        .with_shutdown_grace(Duration::from_secs(10));
    let app = App::new(config)
        .consumer(apply::SPEC)
        .with_postgres(pool.clone());
    let mut running = app.start().await?;
    if std::env::var("FAULT_ROLE").is_ok_and(|r| r == "relay") {
        running.spawn_outbox_relay(
            OutboxRelay::new(pool, running.publisher().clone())
                .batch_size(200)
                .poll_every(Duration::from_millis(200)),
        );
    }
    tokio::signal::ctrl_c().await?;
    if let Some(stats) = running.stats("rmq-fault-inbox") {
        eprintln!(
            "inbox_worker stats: handled={} duplicates={} retried={} dead_lettered={}",
            stats.handled, stats.duplicates, stats.retried, stats.dead_lettered
        );
    }
    running.shutdown().await?;
    eprintln!("inbox_worker: clean exit");
    Ok(())
}
