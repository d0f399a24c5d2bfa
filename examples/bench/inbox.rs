//! `inbox` mode (feature `postgres`): drain a pre-filled queue with the transactional
//! inbox (begin, inbox row, commit per message, PostgreSQL on this machine) against the
//! Redis-idempotent consumer and raw lapin, all at prefetch 100, ours at concurrency 16.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reliable_mq::postgres::inbox_handler_fn;
use reliable_mq::{App, Config, ConsumerConfig, HandlerError, handler_fn};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::{Args, BenchMessage, Raw, Row, median, print_table, rate, unique};
use crate::consume::{Done, PREFETCH, drain_raw};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Raw,
    Redis,
    Inbox,
}

const VARIANTS: [Variant; 3] = [Variant::Raw, Variant::Redis, Variant::Inbox];
const CONCURRENCY: u16 = 16;

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw lapin (manual ack, sequential)",
            Self::Redis => "reliable_mq idempotent (Redis), conc. 16",
            Self::Inbox => "reliable_mq inbox (PostgreSQL), conc. 16",
        }
    }
}

fn consumer(queue: &str, variant: Variant, done: Arc<Done>) -> ConsumerConfig {
    let dlx = format!("{queue}.dlx");
    let ttl = Duration::from_secs(600);
    let config = match variant {
        Variant::Inbox => ConsumerConfig::new(
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
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = unique("bench_inbox").replace('-', "_");
    let admin = sqlx::PgPool::connect(&url)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .map_err(|e| e.to_string())?;
    let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| e.to_string())?;
    let pool = PgPoolOptions::new()
        .max_connections(u32::from(CONCURRENCY) + 2)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.options([("search_path", schema.as_str())]))
        .await
        .map_err(|e| e.to_string())?;
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
                Ok(()) => drain(args, &prefix, &pool, &queue, variant, n).await,
            };
            raw.delete_consumer_topology(&shape).await;
            match drained {
                Ok(elapsed) => {
                    let r = rate(n, elapsed);
                    runs[i].push(r);
                    line.push_str(&format!(" [{variant:?}] {r:.0}/s"));
                }
                Err(e) => {
                    result = Err(format!("{}: {e}", variant.name()));
                    break 'reps;
                }
            }
        }
        println!("{line}");
    }
    let _ = raw.connection.close(200, "bench done".into()).await;
    pool.close().await;
    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await;
    result?;
    let rows: Vec<Row> = VARIANTS
        .iter()
        .zip(&runs)
        .map(|(v, r)| Row {
            name: v.name(),
            messages: n,
            runs: r.clone(),
        })
        .collect();
    print_table(
        &format!("inbox consume (medians of {reps} reps; prefetch {PREFETCH})"),
        &rows,
    );
    let (raw_rate, redis, inbox) = (median(&runs[0]), median(&runs[1]), median(&runs[2]));
    println!("\nratios (median / median):");
    println!(
        "  inbox / Redis-idempotent   {:.2}x   (target >= 0.50x)",
        inbox / redis
    );
    println!("  inbox / raw lapin          {:.2}x", inbox / raw_rate);
    println!("  Redis-idempotent / raw     {:.2}x", redis / raw_rate);
    Ok(())
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
    let start = Instant::now();
    let running = App::new(config)
        .consumer(consumer(queue, variant, Arc::clone(&done)))
        .with_postgres(pool.clone())
        .start()
        .await
        .map_err(|e| e.to_string())?;
    done.wait().await;
    let elapsed = start.elapsed();
    let stats = running.stats(queue);
    running.shutdown().await.map_err(|e| e.to_string())?;
    if let Some(s) = stats
        && (s.dead_lettered, s.retried, s.duplicates) != (0, 0, 0)
    {
        return Err(format!("unexpected outcomes: {s:?}"));
    }
    Ok(elapsed)
}
