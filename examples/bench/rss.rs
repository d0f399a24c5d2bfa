//! `rss`: the memory of a consumer process does not grow with the backlog. A durable queue
//! is filled to `--depth-small`, then to `--depth-large`; at each depth a *child process*
//! (this binary, mode `rss-child`, so the filler's own buffers are not counted) consumes
//! with a slow handler (20 ms, prefetch 100, concurrency 16) for `--rss-seconds` and
//! reports its peak RSS (`VmHWM`) and the largest `VmRSS` it sampled. A raw lapin child
//! (prefetch 100, sequential, same handler) at the deep backlog is the baseline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use reliable_mq::{App, Config, ConsumerConfig, HandlerError, handler_fn};

use crate::common::{Args, BenchMessage, Raw, unique};
use crate::consume::PREFETCH;

const CONCURRENCY: u16 = 16;
const HANDLER_TIME: Duration = Duration::from_millis(20);
const QUEUE_ENV: &str = "BENCH_RSS_QUEUE";
const VARIANT_ENV: &str = "BENCH_RSS_VARIANT";

fn consumer_config(queue: &str) -> ConsumerConfig {
    let handler = handler_fn(|m: BenchMessage| async move {
        std::hint::black_box(&m);
        tokio::time::sleep(HANDLER_TIME).await;
        Ok::<_, HandlerError>(())
    });
    ConsumerConfig::new(queue, format!("{queue}.dlx"), handler)
        .with_prefetch(PREFETCH)
        .with_concurrency(CONCURRENCY)
}

pub async fn run(args: &Args) -> Result<(), String> {
    let raw = Raw::connect(&args.amqp_url).await?;
    let queue = unique("bench-rss");
    let consumer = consumer_config(&queue);
    raw.declare_consumer_topology(&consumer).await?;
    let result = measure(args, &raw, &queue).await;
    raw.delete_consumer_topology(&consumer).await;
    let _ = raw.connection.close(200, "bench done".into()).await;
    result
}

async fn measure(args: &Args, raw: &Raw, queue: &str) -> Result<(), String> {
    println!(
        "rss: consumer child process, prefetch {PREFETCH}, concurrency {CONCURRENCY}, handler {HANDLER_TIME:?}, \
         {}s per run, {}-byte messages",
        args.rss_seconds, args.size
    );
    let mut rows = Vec::new();
    let mut next_seq = 0u64;
    for depth in [args.depth_small, args.depth_large] {
        let have = raw.depth(queue).await? as usize;
        if depth > have {
            let missing = depth - have;
            let start = Instant::now();
            fill_parallel(args, queue, next_seq, missing).await?;
            next_seq += missing as u64;
            let took = start.elapsed().as_secs_f64();
            println!(
                "  filled {missing} messages in {took:.1}s ({:.0}/s); depth now {}",
                missing as f64 / took,
                raw.depth(queue).await?
            );
        }
        let variants: &[&str] = if depth == args.depth_large {
            &["reliable_mq", "raw lapin"]
        } else {
            &["reliable_mq"]
        };
        for variant in variants {
            let at = raw.depth(queue).await?;
            let report = child(args, queue, variant)?;
            println!("  {variant} at depth {at}: {report}");
            rows.push((*variant, at, report));
        }
    }
    println!("\nrss of the consumer process (kB)");
    println!(
        "{:<14} {:>10} {:>10} {:>12} {:>10}",
        "variant", "depth", "VmHWM", "max VmRSS", "handled"
    );
    for (variant, depth, r) in &rows {
        println!(
            "{:<14} {:>10} {:>10} {:>12} {:>10}",
            variant, depth, r.hwm_kb, r.max_rss_kb, r.handled
        );
    }
    println!("target: flat in depth, < 50 MB (51200 kB)");
    Ok(())
}

/// Fill with four publishing connections at once (the broker takes them in parallel).
async fn fill_parallel(args: &Args, queue: &str, first: u64, n: usize) -> Result<(), String> {
    const FILLERS: usize = 4;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..FILLERS {
        let share = n / FILLERS + usize::from(i < n % FILLERS);
        let start = first + (i * (n / FILLERS)) as u64 + i.min(n % FILLERS) as u64;
        let (url, queue, size) = (args.amqp_url.clone(), queue.to_owned(), args.size);
        tasks.spawn(async move {
            let raw = Raw::connect(&url).await?;
            let r = raw.fill(&queue, start, share, size).await;
            let _ = raw.connection.close(200, "filled".into()).await;
            r
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    Ok(())
}

#[derive(Debug)]
struct Report {
    hwm_kb: u64,
    max_rss_kb: u64,
    start_rss_kb: u64,
    handled: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmHWM {} kB, max sampled VmRSS {} kB (at start {} kB), {} handled",
            self.hwm_kb, self.max_rss_kb, self.start_rss_kb, self.handled
        )
    }
}

fn child(args: &Args, queue: &str, variant: &str) -> Result<Report, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .arg("rss-child")
        .arg("--rss-seconds")
        .arg(args.rss_seconds.to_string())
        .env(QUEUE_ENV, queue)
        .env(VARIANT_ENV, variant)
        .env("AMQP_URL", &args.amqp_url)
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("RSS "))
        .ok_or_else(|| {
            format!(
                "child printed no result: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Report {
        hwm_kb: field("hwm_kb"),
        max_rss_kb: field("max_rss_kb"),
        start_rss_kb: field("start_rss_kb"),
        handled: field("handled"),
    })
}

/// `kB` value of a `/proc/self/status` field.
fn status_kb(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(':')?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// The child: consume for `--rss-seconds`, sampling RSS, then print one `RSS ...` line.
pub async fn run_child(args: &Args) -> Result<(), String> {
    let queue = std::env::var(QUEUE_ENV).map_err(|_| format!("{QUEUE_ENV} not set"))?;
    let variant = std::env::var(VARIANT_ENV).unwrap_or_default();
    let start_rss_kb = status_kb("VmRSS");
    let max_rss = Arc::new(AtomicU64::new(start_rss_kb));
    let sampled = Arc::clone(&max_rss);
    let sampler = tokio::spawn(async move {
        loop {
            sampled.fetch_max(status_kb("VmRSS"), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let run_for = Duration::from_secs(args.rss_seconds as u64);
    let handled = if variant == "raw lapin" {
        raw_child(&args.amqp_url, &queue, run_for).await?
    } else {
        let config = Config::default()
            .with_amqp_url(args.amqp_url.clone())
            .with_connection_name("bench-rss");
        let running = App::new(config)
            .consumer(consumer_config(&queue))
            .start()
            .await
            .map_err(|e| e.to_string())?;
        tokio::time::sleep(run_for).await;
        let handled = running.stats(&queue).map(|s| s.handled).unwrap_or(0);
        running.shutdown().await.map_err(|e| e.to_string())?;
        handled
    };
    sampler.abort();
    let max_rss_kb = max_rss.fetch_max(status_kb("VmRSS"), Ordering::Relaxed);
    println!(
        "RSS hwm_kb={} max_rss_kb={max_rss_kb} start_rss_kb={start_rss_kb} handled={handled}",
        status_kb("VmHWM")
    );
    Ok(())
}

async fn raw_child(url: &str, queue: &str, run_for: Duration) -> Result<u64, String> {
    let raw = Raw::connect(url).await?;
    let connection = &raw.connection;
    let mut deliveries = raw.consume(queue, "bench-rss-raw", PREFETCH).await?;
    let deadline = tokio::time::Instant::now() + run_for;
    let mut handled = 0;
    while let Ok(Some(Ok(d))) = tokio::time::timeout_at(deadline, deliveries.next()).await {
        let m: BenchMessage = serde_json::from_slice(&d.data).map_err(|e| e.to_string())?;
        std::hint::black_box(&m);
        tokio::time::sleep(HANDLER_TIME).await;
        d.ack(BasicAckOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        handled += 1;
    }
    // Bounded: seen once to wait minutes for close-ok with a 1M backlog on this broker.
    let _ =
        tokio::time::timeout(Duration::from_secs(5), connection.close(200, "done".into())).await;
    Ok(handled)
}
