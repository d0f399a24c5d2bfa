//! `consume`: drain a pre-filled durable queue of persistent JSON messages, through
//! (a) raw lapin: manual ack, prefetch 100, a sequential loop that decodes and acks (the
//! floor), (b) a reliable_mq consumer without dedup at concurrency 1 and 16, (c) an
//! idempotent reliable_mq consumer on Redis at concurrency 1 and 16.
//!
//! Every variant drains a queue of its own, declared with the same topology (the one
//! `ConsumerConfig` declares) and filled with the same messages before any timing starts.
//! The clock starts before connecting and stops when the last message was handled (raw
//! lapin: when its ack was written), so connection set-up is inside every variant.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use reliable_mq::{App, Config, ConsumerConfig, HandlerError, handler_fn};
use tokio::sync::Notify;

use crate::common::{Args, BenchMessage, Raw, median, print_table, rate, rows, unique};

pub const PREFETCH: u16 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    RawLapin,
    Ours { concurrency: u16, idempotent: bool },
}

const VARIANTS: [Variant; 5] = [
    Variant::RawLapin,
    Variant::Ours {
        concurrency: 1,
        idempotent: false,
    },
    Variant::Ours {
        concurrency: 16,
        idempotent: false,
    },
    Variant::Ours {
        concurrency: 1,
        idempotent: true,
    },
    Variant::Ours {
        concurrency: 16,
        idempotent: true,
    },
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::RawLapin => "raw lapin (manual ack, sequential)",
            Self::Ours {
                concurrency: 1,
                idempotent: false,
            } => "reliable_mq, concurrency 1",
            Self::Ours {
                idempotent: false, ..
            } => "reliable_mq, concurrency 16",
            Self::Ours { concurrency: 1, .. } => "reliable_mq idempotent (Redis), conc. 1",
            Self::Ours { .. } => "reliable_mq idempotent (Redis), conc. 16",
        }
    }
}

/// The consumer a variant runs (raw lapin declares the same shape).
fn consumer_config(queue: &str, variant: Variant, done: Arc<Done>) -> ConsumerConfig {
    let handler = handler_fn(move |m: BenchMessage| {
        let done = Arc::clone(&done);
        async move {
            std::hint::black_box(&m);
            done.one();
            Ok::<_, HandlerError>(())
        }
    });
    let config =
        ConsumerConfig::new(queue, format!("{queue}.dlx"), handler).with_prefetch(PREFETCH);
    match variant {
        Variant::RawLapin => config,
        Variant::Ours {
            concurrency,
            idempotent,
        } => {
            let config = config.with_concurrency(concurrency);
            if idempotent {
                // Short TTL: a run that dies before cleaning up leaves nothing for a day.
                config.idempotent(Duration::from_secs(600))
            } else {
                config
            }
        }
    }
}

/// Start `app`, time it until `done` has counted every message of `queue`, stop it, and
/// refuse a run where anything was dead-lettered, retried or taken for a duplicate (its
/// time would not be the time of `n` plain handler calls).
pub async fn timed_drain(app: App, queue: &str, done: &Done) -> Result<Duration, String> {
    let start = Instant::now();
    let running = app.start().await.map_err(|e| e.to_string())?;
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

/// Counts handled messages; wakes the timer at the last one.
pub struct Done {
    target: usize,
    count: AtomicUsize,
    notify: Notify,
}

impl Done {
    pub fn new(target: usize) -> Arc<Self> {
        Arc::new(Self {
            target,
            count: AtomicUsize::new(0),
            notify: Notify::new(),
        })
    }

    pub fn one(&self) {
        if self.count.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            // Stores a permit if nobody waits yet.
            self.notify.notify_one();
        }
    }

    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}

pub async fn run(args: &Args) -> Result<(), String> {
    let n = args.n_or(50_000);
    let reps = args.reps_or(3);
    let raw = Raw::connect(&args.amqp_url).await?;
    let prefix = unique("bench-dedup");
    println!(
        "consume: {reps} reps x {} variants x {n} persistent {}-byte JSON messages, prefetch {PREFETCH}, \
         fresh durable queue per variant; dedup prefix {prefix}",
        VARIANTS.len(),
        args.size
    );
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut result = Ok(());
    for rep in 0..reps {
        if let Err(e) = one_rep(args, &raw, &prefix, n, rep, &mut runs).await {
            result = Err(e);
            break;
        }
    }
    delete_dedup_keys(&args.redis_url, &prefix).await;
    let _ = raw.connection.close(200, "bench done".into()).await;
    result?;

    let rows = rows(&VARIANTS, |v| v.name(), n, &runs);
    print_table(
        &format!("consume (medians of {reps} reps; prefetch {PREFETCH})"),
        &rows,
    );
    let floor = median(&runs[0]);
    println!("\nratio to raw lapin (median / median):");
    for (v, r) in VARIANTS.iter().zip(&runs).skip(1) {
        let target = match v {
            Variant::Ours {
                idempotent: false, ..
            } => ">= 0.95x",
            _ => ">= 0.80x",
        };
        println!(
            "  {:<44} {:.2}x   (target {target})",
            v.name(),
            median(r) / floor
        );
    }
    println!("\nidempotent / plain at the same prefetch and concurrency (median / median):");
    for (i, v) in VARIANTS.iter().enumerate() {
        let Variant::Ours {
            concurrency,
            idempotent: true,
        } = *v
        else {
            continue;
        };
        let plain = VARIANTS.iter().position(|p| {
            *p == Variant::Ours {
                concurrency,
                idempotent: false,
            }
        });
        if let Some(p) = plain {
            println!(
                "  concurrency {concurrency:<3} {:.2}x   (target >= 0.85x)",
                median(&runs[i]) / median(&runs[p])
            );
        }
    }
    Ok(())
}

async fn one_rep(
    args: &Args,
    raw: &Raw,
    prefix: &str,
    n: usize,
    rep: usize,
    runs: &mut [Vec<f64>],
) -> Result<(), String> {
    // Declare and fill every variant's queue first (in parallel), then drain them one at a
    // time, in an order rotated each repetition so no variant always goes first.
    let queues: Vec<String> = VARIANTS.iter().map(|_| unique("bench-consume")).collect();
    let mut fills = tokio::task::JoinSet::new();
    let mut declared = Ok(());
    for (variant, queue) in VARIANTS.iter().zip(&queues) {
        declared = raw
            .declare_consumer_topology(&consumer_config(queue, *variant, Done::new(0)))
            .await;
        if declared.is_err() {
            break;
        }
        let (url, queue, size) = (args.amqp_url.clone(), queue.clone(), args.size);
        fills.spawn(async move {
            let filler = Raw::connect(&url).await?;
            let r = filler.fill(&queue, 0, n, size).await;
            let _ = filler.connection.close(200, "filled".into()).await;
            r
        });
    }
    let fill_start = Instant::now();
    let mut fill_result = Ok(());
    while let Some(r) = fills.join_next().await {
        if let Err(e) = r.map_err(|e| e.to_string()).and_then(|r| r) {
            fill_result = Err(e);
        }
    }
    let fill_elapsed = fill_start.elapsed();
    let mut result = declared.and(fill_result);
    let mut line = format!(
        "  rep {}: filled {} queues in {:.1}s;",
        rep + 1,
        queues.len(),
        fill_elapsed.as_secs_f64()
    );
    if result.is_ok() {
        for k in 0..VARIANTS.len() {
            let i = (k + rep) % VARIANTS.len();
            let (variant, queue) = (VARIANTS[i], &queues[i]);
            match drain(args, prefix, queue, variant, n).await {
                Ok(elapsed) => {
                    let r = rate(n, elapsed);
                    runs[i].push(r);
                    line.push_str(&format!(" [{}] {r:.0}/s", short(variant)));
                }
                Err(e) => {
                    result = Err(format!("{}: {e}", variant.name()));
                    break;
                }
            }
            let left = raw.depth(queue).await.unwrap_or(u32::MAX);
            if left != 0 {
                result = Err(format!(
                    "{}: {left} messages left in {queue}",
                    variant.name()
                ));
                break;
            }
        }
    }
    println!("{line}");
    for (variant, queue) in VARIANTS.iter().zip(&queues) {
        raw.delete_consumer_topology(&consumer_config(queue, *variant, Done::new(0)))
            .await;
    }
    result
}

fn short(v: Variant) -> String {
    match v {
        Variant::RawLapin => "raw".into(),
        Variant::Ours {
            concurrency,
            idempotent,
        } => format!(
            "{}c{concurrency}",
            if idempotent { "dedup-" } else { "ours-" }
        ),
    }
}

async fn drain(
    args: &Args,
    prefix: &str,
    queue: &str,
    variant: Variant,
    n: usize,
) -> Result<Duration, String> {
    match variant {
        Variant::RawLapin => drain_raw(&args.amqp_url, queue, n).await,
        Variant::Ours { .. } => {
            let done = Done::new(n);
            let consumer = consumer_config(queue, variant, Arc::clone(&done));
            let config = Config::default()
                .with_amqp_url(args.amqp_url.clone())
                .with_redis_url(Some(args.redis_url.clone()))
                .with_dedup_prefix(prefix)
                .with_connection_name("bench-consume");
            timed_drain(App::new(config).consumer(consumer), queue, &done).await
        }
    }
}

/// The floor: what a hand-written lapin consumer does per message.
pub async fn drain_raw(url: &str, queue: &str, n: usize) -> Result<Duration, String> {
    let start = Instant::now();
    let raw = Raw::connect(url).await?;
    let connection = &raw.connection;
    let mut consumer = raw.consume(queue, "bench-raw", PREFETCH).await?;
    let mut handled = 0;
    while handled < n {
        let delivery = consumer
            .next()
            .await
            .ok_or("consumer cancelled")?
            .map_err(|e| e.to_string())?;
        let m: BenchMessage = serde_json::from_slice(&delivery.data).map_err(|e| e.to_string())?;
        std::hint::black_box(&m);
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        handled += 1;
    }
    let elapsed = start.elapsed();
    let _ = connection.close(200, "drained".into()).await;
    Ok(elapsed)
}

/// Remove every dedup key this run wrote.
async fn delete_dedup_keys(url: &str, prefix: &str) {
    let pool = match deadpool_redis::Config::from_url(url)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
    {
        Ok(p) => p,
        Err(_) => return,
    };
    let Ok(mut conn) = pool.get().await else {
        eprintln!("cannot reach Redis to delete keys {prefix}:*");
        return;
    };
    let mut cursor = 0u64;
    let mut deleted = 0usize;
    loop {
        let Ok((next, keys)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut conn)
            .await
        else {
            break;
        };
        if !keys.is_empty() {
            deleted += keys.len();
            let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    println!("  deleted {deleted} dedup keys {prefix}:*");
}

// ---- single drains, for instruction counts under callgrind ----
//
// `prefill` declares a variant's queue and fills it; `drain` (the process callgrind
// watches) drains N messages and exits; `cleanup` deletes the queue and the dedup keys.
// Instructions per message = (count at N2 - count at N1) / (N2 - N1): start-up, connecting
// and shutdown cancel out.

fn single_variant(args: &Args) -> Result<(String, Variant), String> {
    let queue = args.queue.clone().ok_or("--queue is needed")?;
    let concurrency = args.handlers.unwrap_or(1);
    let variant = match args.variant.as_deref() {
        Some("raw") => Variant::RawLapin,
        Some("plain") => Variant::Ours {
            concurrency,
            idempotent: false,
        },
        Some("dedup") => Variant::Ours {
            concurrency,
            idempotent: true,
        },
        other => return Err(format!("--variant raw|plain|dedup, not {other:?}")),
    };
    Ok((queue, variant))
}

/// The dedup prefix of single drains of `queue`.
fn single_prefix(queue: &str) -> String {
    format!("bench-drain:{queue}")
}

pub async fn prefill(args: &Args) -> Result<(), String> {
    let (queue, variant) = single_variant(args)?;
    let n = args.n_or(10_000);
    let raw = Raw::connect(&args.amqp_url).await?;
    raw.declare_consumer_topology(&consumer_config(&queue, variant, Done::new(0)))
        .await?;
    let filled = raw.fill(&queue, 0, n, args.size).await;
    let _ = raw.connection.close(200, "filled".into()).await;
    filled?;
    println!("filled {queue} with {n}");
    Ok(())
}

pub async fn drain_only(args: &Args) -> Result<(), String> {
    let (queue, variant) = single_variant(args)?;
    let n = args.n_or(10_000);
    let elapsed = drain(args, &single_prefix(&queue), &queue, variant, n).await?;
    println!("drained {n} from {queue} in {:.3}s", elapsed.as_secs_f64());
    Ok(())
}

pub async fn cleanup(args: &Args) -> Result<(), String> {
    let (queue, variant) = single_variant(args)?;
    let raw = Raw::connect(&args.amqp_url).await?;
    raw.delete_consumer_topology(&consumer_config(&queue, variant, Done::new(0)))
        .await;
    let _ = raw.connection.close(200, "cleaned up".into()).await;
    delete_dedup_keys(&args.redis_url, &single_prefix(&queue)).await;
    Ok(())
}
