//! `publish`: persistent messages with confirms to a fresh durable queue. Every variant
//! keeps the same window shape: `--window` publishes in flight in one task, awaited
//! through a `FuturesUnordered` (1 = each confirm awaited before the next publish).
//!
//! - raw lapin, same message: exactly what `Publisher` sends (persistent, `mandatory`, a
//!   fresh UUIDv7 `message_id`, `content_type` JSON, a timestamp, the value serialized to
//!   JSON per message). This is the baseline the 0.9x target is measured against.
//! - raw lapin, bare: persistent only, a prebuilt body; no `mandatory`, id or content type.
//! - raw lapin, one confirm at a time: the same message as the baseline, window 1.
//! - `reliable_mq::Publisher`: `publish(...)` futures, same window.

use std::future::Future;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use reliable_mq::{Config, Publisher};

use crate::common::{Args, Raw, Row, median, print_table, timed, unique};

pub async fn run(args: &Args) -> Result<(), String> {
    let raw = Raw::connect(&args.amqp_url).await?;
    let queue = unique("bench-publish");
    raw.declare_durable_queue(&queue).await?;
    let result = measure(args, &raw, &queue).await;
    raw.delete_queue(&queue).await;
    let _ = raw.connection.close(200, "bench done".into()).await;
    result
}

async fn measure(args: &Args, raw: &Raw, queue: &str) -> Result<(), String> {
    let (n, reps) = (args.n_or(20_000), args.reps_or(5));
    let config = Config::default()
        .with_amqp_url(args.amqp_url.clone())
        .with_connection_name("bench");
    let publisher = Publisher::from_config(&config)
        .await
        .map_err(|e| e.to_string())?;
    let channel = raw.confirm_channel().await?;
    // The value both sides serialize; its JSON encoding is `size` bytes.
    let value = "x".repeat(args.size.saturating_sub(2));
    let bare_body = vec![b'x'; args.size];
    let window = args.window;

    println!(
        "publish: {reps} x {n} persistent {}-byte messages with confirms to durable queue {queue}, {window} in flight",
        args.size
    );
    let (mut same, mut bare, mut one_by_one, mut ours) = (vec![], vec![], vec![], vec![]);
    for rep in 1..=reps {
        raw.purge(queue).await?;
        let r = timed(n, || {
            windowed(n, window, |_| raw_same_message(&channel, queue, &value))
        })
        .await?;
        same.push(r);

        raw.purge(queue).await?;
        let o = timed(n, || {
            windowed(n, window, |_| async {
                publisher
                    .publish("", queue, &value)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        })
        .await?;
        ours.push(o);

        raw.purge(queue).await?;
        let b = timed(n, || {
            windowed(n, window, |_| raw_bare(&channel, queue, &bare_body))
        })
        .await?;
        bare.push(b);

        raw.purge(queue).await?;
        let s = timed(args.one_by_one_n, || {
            windowed(args.one_by_one_n, 1, |_| {
                raw_same_message(&channel, queue, &value)
            })
        })
        .await?;
        one_by_one.push(s);
        println!(
            "  rep {rep}: raw same message {r:>8.0}/s   Publisher {o:>8.0}/s   raw bare {b:>8.0}/s   raw one-by-one {s:>7.0}/s   (Publisher/raw {:.2}x)",
            o / r
        );
    }
    raw.purge(queue).await?;
    publisher.close().await;

    let rows = [
        Row {
            name: "raw lapin, same message as Publisher",
            messages: n,
            runs: same.clone(),
        },
        Row {
            name: "raw lapin, bare (no mandatory/id/type)",
            messages: n,
            runs: bare.clone(),
        },
        Row {
            name: "raw lapin, one confirm at a time",
            messages: args.one_by_one_n,
            runs: one_by_one.clone(),
        },
        Row {
            name: "reliable_mq::Publisher",
            messages: n,
            runs: ours.clone(),
        },
    ];
    print_table(
        &format!("publish (medians of {reps} reps; {window} in flight, FuturesUnordered window)"),
        &rows,
    );
    let (r, b, s, o) = (
        median(&same),
        median(&bare),
        median(&one_by_one),
        median(&ours),
    );
    let mut per_rep: Vec<f64> = ours.iter().zip(&same).map(|(o, r)| o / r).collect();
    per_rep.sort_by(f64::total_cmp);
    println!(
        "\nPublisher / raw same message = {:.2}x   (target >= 0.90x; median of per-rep ratios {:.2}x)",
        o / r,
        median(&per_rep)
    );
    println!("Publisher / raw bare         = {:.2}x", o / b);
    println!(
        "Publisher / raw one-by-one   = {:.1}x   (target >= 8x)",
        o / s
    );
    Ok(())
}

/// Run `n` operations keeping `window` of them in flight in this task.
async fn windowed<F, Fut>(n: usize, window: usize, mut op: F) -> Result<(), String>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut inflight = FuturesUnordered::new();
    for i in 0..n {
        inflight.push(op(i));
        if inflight.len() >= window.max(1)
            && let Some(done) = inflight.next().await
        {
            done?;
        }
    }
    while let Some(done) = inflight.next().await {
        done?;
    }
    Ok(())
}

/// One publish carrying exactly what `Publisher::publish` sends, and its confirm.
async fn raw_same_message(channel: &Channel, queue: &str, value: &str) -> Result<(), String> {
    let body = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    let id = uuid::Uuid::now_v7().to_string();
    let properties = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(id.as_str()))
        .with_delivery_mode(2)
        .with_timestamp(unix_seconds());
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = channel
        .basic_publish("".into(), queue.into(), options, &body, properties)
        .await
        .map_err(|e| e.to_string())?;
    expect_ack(confirm.await)
}

/// One persistent publish with nothing else, and its confirm.
async fn raw_bare(channel: &Channel, queue: &str, body: &[u8]) -> Result<(), String> {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .map_err(|e| e.to_string())?;
    expect_ack(confirm.await)
}

fn expect_ack(confirmation: lapin::Result<Confirmation>) -> Result<(), String> {
    match confirmation {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(c) => Err(format!("broker did not ack (or returned): {c:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `publish-cancelled`: `--n` publishes (default 100,000) whose futures are dropped after
/// about 200µs, `--window` at a time, then the process's memory from /proc/self/status.
/// Shows that nothing grows with cancelled publishes: the ledger empties once the broker
/// has answered, and RSS stays where the first tenth of the run left it.
pub async fn run_cancelled(args: &Args) -> Result<(), String> {
    let raw = Raw::connect(&args.amqp_url).await?;
    let queue = unique("bench-cancelled");
    raw.declare_durable_queue(&queue).await?;
    let result = cancelled(args, &queue).await;
    raw.delete_queue(&queue).await;
    let _ = raw.connection.close(200, "bench done".into()).await;
    result
}

async fn cancelled(args: &Args, queue: &str) -> Result<(), String> {
    let n = args.n_or(100_000);
    let config = Config::default()
        .with_amqp_url(args.amqp_url.clone())
        .with_connection_name("bench-cancelled");
    let publisher = Publisher::from_config(&config)
        .await
        .map_err(|e| e.to_string())?;
    let value = "x".repeat(args.size.saturating_sub(2));
    println!("{}", memory("start"));
    let (mut cancelled, mut finished) = (0usize, 0usize);
    let mut inflight = FuturesUnordered::new();
    for i in 0..n {
        inflight.push(tokio::time::timeout(
            std::time::Duration::from_micros(200),
            publisher.publish("", queue, &value),
        ));
        if inflight.len() >= args.window.max(1)
            && let Some(done) = inflight.next().await
        {
            match done {
                Err(_) => cancelled += 1,
                Ok(_) => finished += 1,
            }
        }
        if i + 1 == n / 10 {
            println!("{}", memory("after the first tenth"));
        }
    }
    while let Some(done) = inflight.next().await {
        match done {
            Err(_) => cancelled += 1,
            Ok(_) => finished += 1,
        }
    }
    println!(
        "{}   cancelled {cancelled}, finished in time {finished}, still in the ledger {}",
        memory("after all"),
        publisher.in_flight()
    );
    let start = std::time::Instant::now();
    while publisher.in_flight() > 0 && start.elapsed() < std::time::Duration::from_secs(30) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    println!(
        "{}   still in the ledger {} (after {:?})",
        memory("broker answered"),
        publisher.in_flight(),
        start.elapsed()
    );
    publisher.close().await;
    Ok(())
}

fn memory(when: &str) -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l[name.len()..].trim().to_owned())
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "{when:<24} VmRSS {:>10}   VmHWM {:>10}",
        field("VmRSS:"),
        field("VmHWM:")
    )
}
