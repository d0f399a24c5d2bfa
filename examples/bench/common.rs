//! What every benchmark mode shares: arguments, the broker, timing and the table.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use reliable_mq::ConsumerConfig;

pub const USAGE: &str = "usage: bench <mode> [options]
modes:
  publish   persistent 256-byte messages with confirms: raw lapin sending the same
            message as Publisher, raw lapin bare, raw lapin one confirm at a time,
            reliable_mq::Publisher; all with the same window of publishes in flight
  publish-cancelled
            --n publishes (default 100000) dropped after ~200us; prints VmRSS/VmHWM
  consume   drain a pre-filled durable queue of persistent 256-byte JSON messages: raw
            lapin (manual ack, prefetch 100), reliable_mq at concurrency 1 and 16, and
            idempotent with RedisStore at concurrency 1 and 16
  inbox     (feature postgres) drain a pre-filled queue with the transactional inbox
            against Redis-idempotent and raw lapin, concurrency 16
  relay     (feature postgres) outbox relay throughput (published with confirms, marked
            sent) against Publisher straight, 256 in flight
  latency   publish at a fixed rate with Publisher, measure publish -> handler
            (p50/p90/p99/max), against raw lapin publish -> raw consumer
  rss       peak RSS of a consumer process (slow handler, prefetch 100) with a shallow
            and a deep backlog
  all       every mode above, one after the other
  many      --n consumers (default 200), a queue each: connections, start-up time, RSS,
            broker connection memory, time to resume after the broker closes them
  prefill / drain / cleanup
            for instruction counts (valgrind --tool=callgrind): prefill --queue Q
            --variant raw|plain|dedup --n N declares and fills; drain (same options,
            --handlers C, default 1) drains N messages and exits; cleanup deletes Q's
            topology and its dedup keys
options:
  --n N              messages per repetition (publish: 20000, consume: 50000)
  --reps R           repetitions; the table shows medians (publish: 5, consume: 3)
  --window W         publish: publishes in flight, for raw lapin and Publisher alike (default 1000)
  --one-by-one-n N   messages for the one-confirm-at-a-time run (default 2000)
  --concurrency C    (unused by publish since both sides share --window)
  --size B           body size in bytes (default 256)
  --rate R           latency: messages per second (default 1000)
  --seconds S        latency: seconds per variant (default 10)
  --depth-small N    rss: first backlog (default 100000)
  --depth-large N    rss: second backlog (default 1000000)
  --rss-seconds S    rss: seconds the consumer runs at each depth (default 5)
  --tracer T         none (default), otel, otel-1pct, otel-lean or otel-lean-1pct: install a tracing subscriber
                     with an OpenTelemetry layer (tracer provider, batch processor, spans
                     at INFO; every root span sampled, or 1%) as a traced service does;
                     needs the examples' feature `observe` (on by default)
environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f),
             REDIS_URL (default redis://127.0.0.1:6379)";

/// Command-line arguments shared by all modes.
#[derive(Debug, Clone)]
pub struct Args {
    pub mode: String,
    n: Option<usize>,
    reps: Option<usize>,
    pub window: usize,
    pub one_by_one_n: usize,
    pub concurrency: usize,
    pub size: usize,
    pub rate: usize,
    pub seconds: usize,
    pub depth_small: usize,
    pub depth_large: usize,
    pub rss_seconds: usize,
    pub amqp_url: String,
    pub redis_url: String,
    /// `prefill`, `drain`, `cleanup`: the queue.
    pub queue: Option<String>,
    /// `prefill`, `drain`, `cleanup`: `raw`, `plain` or `dedup`.
    pub variant: Option<String>,
    /// `drain`: handlers in flight (default 1).
    pub handlers: Option<u16>,
    /// `--tracer otel`: record spans through OpenTelemetry.
    pub tracer: String,
}

impl Args {
    pub fn parse(mut args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mode = args.next().ok_or("missing mode")?;
        let mut parsed = Self {
            mode,
            n: None,
            reps: None,
            window: 1000,
            one_by_one_n: 2000,
            concurrency: 1000,
            size: 256,
            rate: 1000,
            seconds: 10,
            depth_small: 100_000,
            depth_large: 1_000_000,
            rss_seconds: 5,
            amqp_url: std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
            redis_url: std::env::var("REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
            queue: None,
            variant: None,
            handlers: None,
            tracer: "none".to_owned(),
        };
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--queue" => {
                    parsed.queue = Some(value);
                    continue;
                }
                "--variant" => {
                    parsed.variant = Some(value);
                    continue;
                }
                "--tracer" => {
                    parsed.tracer = value;
                    continue;
                }
                _ => {}
            }
            let number: usize = value
                .parse()
                .map_err(|_| format!("{flag} {value:?} is not a number"))?;
            if number == 0 {
                return Err(format!("{flag} must be positive"));
            }
            match flag.as_str() {
                "--n" => parsed.n = Some(number),
                "--reps" => parsed.reps = Some(number),
                "--window" => parsed.window = number,
                "--one-by-one-n" => parsed.one_by_one_n = number,
                "--concurrency" => parsed.concurrency = number,
                "--size" => parsed.size = number,
                "--rate" => parsed.rate = number,
                "--seconds" => parsed.seconds = number,
                "--depth-small" => parsed.depth_small = number,
                "--depth-large" => parsed.depth_large = number,
                "--rss-seconds" => parsed.rss_seconds = number,
                "--handlers" => {
                    parsed.handlers =
                        Some(u16::try_from(number).map_err(|_| "--handlers is at most 65535")?)
                }
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        Ok(parsed)
    }

    /// `--n`, or the mode's default.
    pub fn n_or(&self, default: usize) -> usize {
        self.n.unwrap_or(default)
    }

    /// `--reps`, or the mode's default.
    pub fn reps_or(&self, default: usize) -> usize {
        self.reps.unwrap_or(default)
    }
}

/// A raw lapin connection for setup and the raw baselines.
pub struct Raw {
    pub connection: Connection,
    pub channel: Channel,
}

impl Raw {
    pub async fn connect(url: &str) -> Result<Self, String> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(|e| format!("cannot connect to {url}: {e}"))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            connection,
            channel,
        })
    }

    /// Subscribe to `queue` with manual acks and `prefetch`, as a hand-written consumer does.
    pub async fn consume(
        &self,
        queue: &str,
        tag: &str,
        prefetch: u16,
    ) -> Result<lapin::Consumer, String> {
        self.channel
            .basic_qos(prefetch, lapin::options::BasicQosOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        self.channel
            .basic_consume(
                queue.into(),
                tag.into(),
                lapin::options::BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())
    }

    /// A fresh channel of this connection in publisher-confirm mode.
    pub async fn confirm_channel(&self) -> Result<Channel, String> {
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        Ok(channel)
    }

    pub async fn declare_durable_queue(&self, name: &str) -> Result<(), String> {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|_| ())
            .map_err(|e| format!("declare {name}: {e}"))
    }

    pub async fn purge(&self, name: &str) -> Result<(), String> {
        self.channel
            .queue_purge(name.into(), QueuePurgeOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| format!("purge {name}: {e}"))
    }

    pub async fn delete_queue(&self, name: &str) {
        let _ = self
            .channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
    }
}

impl Raw {
    /// Declare what `consumer` declares (work queue with its dead-letter arguments, DLX,
    /// DLQ, wait queues), so raw lapin and reliable_mq drain queues of the same shape.
    pub async fn declare_consumer_topology(&self, consumer: &ConsumerConfig) -> Result<(), String> {
        reliable_mq::__private::declare_topology(consumer, &self.connection)
            .await
            .map_err(|e| e.to_string())
    }

    /// Delete everything [`Raw::declare_consumer_topology`] declared.
    pub async fn delete_consumer_topology(&self, consumer: &ConsumerConfig) {
        let (queues, dlx) = reliable_mq::__private::declared_names(consumer);
        for queue in &queues {
            self.delete_queue(queue).await;
        }
        let _ = self
            .channel
            .exchange_delete(dlx.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }

    /// Messages ready in `queue` (not counting unacked ones).
    pub async fn depth(&self, queue: &str) -> Result<u32, String> {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count())
            .map_err(|e| format!("inspect {queue}: {e}"))
    }

    /// Publish `n` persistent JSON messages of `size` bytes (each with a `message_id` and
    /// `content_type = application/json`, so idempotent consumers accept them) to
    /// `queue`, pipelined with up to 5000 confirms outstanding, on a channel of its own.
    /// Sequence numbers start at `first`.
    pub async fn fill(&self, queue: &str, first: u64, n: usize, size: usize) -> Result<(), String> {
        let channel = self.confirm_channel().await?;
        let run = uuid::Uuid::new_v4().simple().to_string();
        let mut outstanding = VecDeque::with_capacity(FILL_WINDOW);
        for seq in first..first + n as u64 {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(format!("{run}-{seq}").into());
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &json_body(seq, 0, size),
                    properties,
                )
                .await
                .map_err(|e| e.to_string())?;
            outstanding.push_back(confirm);
            if outstanding.len() >= FILL_WINDOW
                && let Some(oldest) = outstanding.pop_front()
            {
                oldest.await.map_err(|e| e.to_string())?;
            }
        }
        for confirm in outstanding {
            confirm.await.map_err(|e| e.to_string())?;
        }
        let _ = channel.close(200, "filled".into()).await;
        Ok(())
    }
}

const FILL_WINDOW: usize = 5000;

/// The message every consume/latency/rss variant decodes.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct BenchMessage {
    pub seq: u64,
    /// Unix time in nanoseconds when it was sent (latency mode), else 0.
    pub sent_ns: u64,
    pub pad: String,
}

/// A JSON `BenchMessage` padded to exactly `size` bytes (when `size` leaves room).
pub fn json_body(seq: u64, sent_ns: u64, size: usize) -> Vec<u8> {
    let bare = format!(r#"{{"seq":{seq},"sent_ns":{sent_ns},"pad":""}}"#);
    let pad = "x".repeat(size.saturating_sub(bare.len()));
    format!(r#"{{"seq":{seq},"sent_ns":{sent_ns},"pad":"{pad}"}}"#).into_bytes()
}

/// Nanoseconds since the Unix epoch.
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A queue name unique to this run.
pub fn unique(base: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{base}-{}", &id[..8])
}

/// Messages per second of `count` messages done in `elapsed`.
pub fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Time an async block that processes `count` messages; returns msgs/s.
pub async fn timed<F, Fut>(count: usize, f: F) -> Result<f64, String>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    f().await?;
    Ok(rate(count, start.elapsed()))
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One row of the results table.
pub struct Row {
    pub name: &'static str,
    pub messages: usize,
    pub runs: Vec<f64>,
}

/// One [`Row`] a variant (named by `name`), of `messages` messages, with its runs.
pub fn rows<V: Copy>(
    variants: &[V],
    name: impl Fn(V) -> &'static str,
    messages: usize,
    runs: &[Vec<f64>],
) -> Vec<Row> {
    variants
        .iter()
        .zip(runs)
        .map(|(v, r)| Row {
            name: name(*v),
            messages,
            runs: r.clone(),
        })
        .collect()
}

pub fn print_table(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!(
        "{:<44} {:>8} {:>12} {:>12} {:>12}",
        "variant", "msgs", "median/s", "min/s", "max/s"
    );
    for row in rows {
        let min = row.runs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = row.runs.iter().copied().fold(0.0, f64::max);
        println!(
            "{:<44} {:>8} {:>12.0} {:>12.0} {:>12.0}",
            row.name,
            row.messages,
            median(&row.runs),
            min,
            max
        );
    }
}
