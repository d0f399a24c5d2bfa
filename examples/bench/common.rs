//! What every benchmark mode shares: arguments, the broker, timing and the table.

use std::time::{Duration, Instant};

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

pub const USAGE: &str = "usage: bench <mode> [options]
modes:
  publish   persistent 256-byte messages with confirms: raw lapin pipelined, raw lapin
            one confirm at a time, reliable_mq::Publisher
options:
  --n N              messages per repetition (default 20000)
  --reps R           repetitions; the table shows medians (default 5)
  --window W         outstanding confirms of the pipelined raw publisher (default 1000)
  --one-by-one-n N   messages for the one-confirm-at-a-time run (default 2000)
  --concurrency C    publishes in flight through Publisher (default 1000)
  --size B           body size in bytes (default 256)
environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f)";

/// Command-line arguments shared by all modes.
#[derive(Debug, Clone)]
pub struct Args {
    pub mode: String,
    pub n: usize,
    pub reps: usize,
    pub window: usize,
    pub one_by_one_n: usize,
    pub concurrency: usize,
    pub size: usize,
    pub amqp_url: String,
}

impl Args {
    pub fn parse(mut args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mode = args.next().ok_or("missing mode")?;
        let mut parsed = Self {
            mode,
            n: 20_000,
            reps: 5,
            window: 1000,
            one_by_one_n: 2000,
            concurrency: 1000,
            size: 256,
            amqp_url: std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
        };
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let number: usize = value
                .parse()
                .map_err(|_| format!("{flag} {value:?} is not a number"))?;
            if number == 0 {
                return Err(format!("{flag} must be positive"));
            }
            match flag.as_str() {
                "--n" => parsed.n = number,
                "--reps" => parsed.reps = number,
                "--window" => parsed.window = number,
                "--one-by-one-n" => parsed.one_by_one_n = number,
                "--concurrency" => parsed.concurrency = number,
                "--size" => parsed.size = number,
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        Ok(parsed)
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
