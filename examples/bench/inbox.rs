//! `inbox` mode (feature `postgres`): drain a pre-filled queue with the transactional
//! inbox (begin, inbox row, commit per message, PostgreSQL on this machine) against the
//! Redis-idempotent consumer and raw lapin, all at prefetch 100, ours at concurrency 16.
//! The inbox runs twice: on a pool with sqlx's defaults, and on one from
//! `reliable_mq::postgres::pool_options()`, which does not ping a connection on every
//! acquire.
//!
//! `relay` mode: the outbox relay's throughput (rows published with confirms and marked
//! sent per second, batches of 256) against the same messages published straight with
//! `Publisher`, 256 in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reliable_mq::postgres::{Outbox, OutboxRelay, inbox_handler_fn};
use reliable_mq::{App, Config, ConsumerConfig, HandlerError, Publisher, handler_fn};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::{Args, BenchMessage, Raw, median, print_table, rate, rows, unique};
use crate::consume::{Done, PREFETCH, drain_raw, timed_drain};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Raw,
    Redis,
    Inbox,
    InboxNoPing,
}

const VARIANTS: [Variant; 4] = [
    Variant::Raw,
    Variant::Redis,
    Variant::Inbox,
    Variant::InboxNoPing,
];
const CONCURRENCY: u16 = 16;

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw lapin (manual ack, sequential)",
            Self::Redis => "reliable_mq idempotent (Redis), conc. 16",
            Self::Inbox => "reliable_mq inbox (PostgreSQL), conc. 16",
            Self::InboxNoPing => "  same, postgres::pool_options() (no ping)",
        }
    }
}

fn consumer(queue: &str, variant: Variant, done: Arc<Done>) -> ConsumerConfig {
    let dlx = format!("{queue}.dlx");
    let ttl = Duration::from_secs(600);
    let config = match variant {
        Variant::Inbox | Variant::InboxNoPing => ConsumerConfig::new(
            queue,
            dlx,
            inbox_handler_fn(move |m: BenchMessage, tx| {
                let done = Arc::clone(&done);
                async move {
                    std::hint::black_box(&m);
                    done.one();
                    (tx, Ok::<_, HandlerError>(()))
                }
            }),
        )
        .inbox(ttl),
        _ => ConsumerConfig::new(
            queue,
            dlx,
            handler_fn(move |m: BenchMessage| {
                let done = Arc::clone(&done);
                async move {
                    std::hint::black_box(&m);
                    done.one();
                    Ok::<_, HandlerError>(())
                }
            }),
        )
        .idempotent(ttl),
    };
    config.with_prefetch(PREFETCH).with_concurrency(CONCURRENCY)
}

pub async fn run(args: &Args) -> Result<(), String> {
    let n = args.n_or(20_000);
    let reps = args.reps_or(3);
    let url = database_url();
    let (admin, schema) = fresh_schema(&url, "bench_inbox").await?;
    let pool = open_pool(&url, &schema, true).await?;
    let pool_no_ping = open_pool(&url, &schema, false).await?;
    reliable_mq::postgres::migrate(&pool)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "inbox: {reps} reps x {} variants x {n} persistent {}-byte JSON messages, prefetch {PREFETCH}, \
         schema {schema}",
        VARIANTS.len(),
        args.size
    );
    let raw = Raw::connect(&args.amqp_url).await?;
    let prefix = unique("bench-inbox-dedup");
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut result = Ok(());
    'reps: for rep in 0..reps {
        let mut line = format!("  rep {}:", rep + 1);
        for k in 0..VARIANTS.len() {
            let i = (k + rep) % VARIANTS.len();
            let variant = VARIANTS[i];
            let queue = unique("bench-inbox");
            let shape = consumer(&queue, variant, Done::new(0));
            if let Err(e) = raw.declare_consumer_topology(&shape).await {
                result = Err(e);
                break 'reps;
            }
            let filled = raw.fill(&queue, 0, n, args.size).await;
            let drained = match filled {
                Err(e) => Err(e),
                Ok(()) => {
                    let pool = if variant == Variant::InboxNoPing {
                        &pool_no_ping
                    } else {
                        &pool
                    };
                    drain(args, &prefix, pool, &queue, variant, n).await
                }
            };
            raw.delete_consumer_topology(&shape).await;
            if let Err(e) = record(drained, n, variant, variant.name(), &mut runs[i], &mut line) {
                result = Err(e);
                break 'reps;
            }
        }
        println!("{line}");
    }
    let _ = raw.connection.close(200, "bench done".into()).await;
    pool.close().await;
    pool_no_ping.close().await;
    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await;
    result?;
    let rows = rows(&VARIANTS, |v| v.name(), n, &runs);
    print_table(
        &format!("inbox consume (medians of {reps} reps; prefetch {PREFETCH})"),
        &rows,
    );
    let (raw_rate, redis, inbox, no_ping) = (
        median(&runs[0]),
        median(&runs[1]),
        median(&runs[2]),
        median(&runs[3]),
    );
    println!("\nratios (median / median):");
    println!(
        "  inbox / Redis-idempotent   {:.2}x   (target >= 0.50x)",
        inbox / redis
    );
    println!(
        "  inbox, no acquire ping / Redis-idempotent   {:.2}x",
        no_ping / redis
    );
    println!("  inbox / raw lapin          {:.2}x", inbox / raw_rate);
    println!("  Redis-idempotent / raw     {:.2}x", redis / raw_rate);
    Ok(())
}

/// One repetition of `variant` (of `n` messages): its rate onto its `runs` and the rep's
/// `line`, or its error, named.
fn record(
    timed: Result<Duration, String>,
    n: usize,
    variant: impl std::fmt::Debug,
    name: &str,
    runs: &mut Vec<f64>,
    line: &mut String,
) -> Result<(), String> {
    let elapsed = timed.map_err(|e| format!("{name}: {e}"))?;
    let r = rate(n, elapsed);
    runs.push(r);
    line.push_str(&format!(" [{variant:?}] {r:.0}/s"));
    Ok(())
}

/// A schema of its own for one bench run (`prefix` and a unique suffix), and the pool
/// that created it (to drop it at the end).
async fn fresh_schema(url: &str, prefix: &str) -> Result<(PgPool, String), String> {
    let schema = unique(prefix).replace('-', "_");
    let admin = PgPool::connect(url).await.map_err(|e| e.to_string())?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .map_err(|e| e.to_string())?;
    Ok((admin, schema))
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A pool on `schema` with a connection per handler and two spare; `ping`: sqlx's
/// defaults (a check of each connection on acquire, one round trip), else
/// `postgres::pool_options()`.
async fn open_pool(url: &str, schema: &str, ping: bool) -> Result<PgPool, String> {
    let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| e.to_string())?;
    let pool = if ping {
        PgPoolOptions::new().acquire_timeout(Duration::from_secs(5))
    } else {
        reliable_mq::postgres::pool_options()
    };
    pool.max_connections(u32::from(CONCURRENCY) + 2)
        .connect_with(options.options([("search_path", schema)]))
        .await
        .map_err(|e| e.to_string())
}

/// Rows per outbox-writing transaction when the relay bench fills the table (untimed).
const FILL_ROWS_PER_TX: usize = 500;
/// The relay's batch, and the direct publishes in flight.
const RELAY_BATCH: u16 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelayVariant {
    Publisher,
    Relay,
}

const RELAY_VARIANTS: [RelayVariant; 2] = [RelayVariant::Publisher, RelayVariant::Relay];

impl RelayVariant {
    fn name(self) -> &'static str {
        match self {
            Self::Publisher => "Publisher, 256 in flight",
            Self::Relay => "OutboxRelay, batches of 256",
        }
    }
}

/// `relay` mode: see the module.
pub async fn run_relay(args: &Args) -> Result<(), String> {
    let n = args.n_or(20_000);
    let reps = args.reps_or(5);
    let url = database_url();
    let (admin, schema) = fresh_schema(&url, "bench_relay").await?;
    let pool = open_pool(&url, &schema, true).await?;
    reliable_mq::postgres::migrate(&pool)
        .await
        .map_err(|e| e.to_string())?;
    let raw = Raw::connect(&args.amqp_url).await?;
    let queue = unique("bench-relay");
    raw.declare_durable_queue(&queue).await?;
    let publisher = Publisher::connect(&args.amqp_url)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "relay: {reps} reps x {} variants x {n} persistent {}-byte JSON messages, schema {schema}",
        RELAY_VARIANTS.len(),
        args.size
    );
    let body = serde_json::json!({ "pad": "x".repeat(args.size.saturating_sub(12)) });
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); RELAY_VARIANTS.len()];
    let mut result = Ok(());
    'reps: for rep in 0..reps {
        let mut line = format!("  rep {}:", rep + 1);
        for k in 0..RELAY_VARIANTS.len() {
            let i = (k + rep) % RELAY_VARIANTS.len();
            let variant = RELAY_VARIANTS[i];
            let timed = match variant {
                RelayVariant::Publisher => publish_direct(&publisher, &queue, &body, n).await,
                RelayVariant::Relay => relay_all(&pool, &publisher, &queue, &body, n).await,
            };
            let purged = raw.purge(&queue).await;
            let timed = timed.and_then(|t| purged.map(|()| t));
            if let Err(e) = record(timed, n, variant, variant.name(), &mut runs[i], &mut line) {
                result = Err(e);
                break 'reps;
            }
        }
        println!("{line}");
    }
    publisher.close().await;
    raw.delete_queue(&queue).await;
    let _ = raw.connection.close(200, "bench done".into()).await;
    pool.close().await;
    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await;
    result?;
    let rows = rows(&RELAY_VARIANTS, |v| v.name(), n, &runs);
    print_table(&format!("outbox relay (medians of {reps} reps)"), &rows);
    println!(
        "\nratio (median / median): relay / Publisher {:.2}x",
        median(&runs[1]) / median(&runs[0])
    );
    Ok(())
}

/// Publish `n` copies of `body` through `publisher`, `RELAY_BATCH` at a time.
async fn publish_direct(
    publisher: &Publisher,
    queue: &str,
    body: &serde_json::Value,
    n: usize,
) -> Result<Duration, String> {
    let start = Instant::now();
    let mut left = n;
    while left > 0 {
        let chunk = left.min(usize::from(RELAY_BATCH));
        let publishes = (0..chunk).map(|_| publisher.publish("", queue, body));
        for outcome in futures_util::future::join_all(publishes).await {
            outcome.map_err(|e| e.to_string())?;
        }
        left -= chunk;
    }
    Ok(start.elapsed())
}

/// Write `n` outbox rows (untimed), then time the relay's batches until none is left.
async fn relay_all(
    pool: &PgPool,
    publisher: &Publisher,
    queue: &str,
    body: &serde_json::Value,
    n: usize,
) -> Result<Duration, String> {
    let mut left = n;
    while left > 0 {
        let chunk = left.min(FILL_ROWS_PER_TX);
        let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
        for _ in 0..chunk {
            Outbox::publish(&mut tx, "", queue, body)
                .await
                .map_err(|e| e.to_string())?;
        }
        tx.commit().await.map_err(|e| e.to_string())?;
        left -= chunk;
    }
    let relay = OutboxRelay::new(pool.clone(), publisher.clone()).batch_size(RELAY_BATCH);
    let start = Instant::now();
    let mut sent = 0;
    loop {
        let batch = relay.relay_batch().await.map_err(|e| e.to_string())?;
        if batch.taken == 0 {
            break;
        }
        if batch.sent != batch.taken {
            return Err(format!("batch not all sent: {batch:?}"));
        }
        sent += batch.sent;
    }
    let elapsed = start.elapsed();
    if sent != n {
        return Err(format!("relayed {sent} of {n}"));
    }
    // Sent rows would slow the next repetition's scans a little: start each one empty.
    sqlx::query("TRUNCATE reliable_mq_outbox")
        .execute(pool)
        .await
        .map_err(|e| e.to_string())?;
    Ok(elapsed)
}

async fn drain(
    args: &Args,
    prefix: &str,
    pool: &sqlx::PgPool,
    queue: &str,
    variant: Variant,
    n: usize,
) -> Result<Duration, String> {
    if variant == Variant::Raw {
        return drain_raw(&args.amqp_url, queue, n).await;
    }
    let done = Done::new(n);
    let config = Config::default()
        .with_amqp_url(args.amqp_url.clone())
        .with_redis_url(Some(args.redis_url.clone()))
        .with_dedup_prefix(prefix)
        .with_connection_name("bench-inbox");
    let app = App::new(config)
        .consumer(consumer(queue, variant, Arc::clone(&done)))
        .with_postgres(pool.clone());
    timed_drain(app, queue, &done).await
}
