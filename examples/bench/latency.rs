//! `latency`: publish at a fixed rate and measure publish -> handler, per message, from a
//! Unix-nanosecond timestamp taken just before the publish call and carried in the body
//! (publisher and consumer share this process's clock).
//!
//! Two variants on queues of the same shape: raw lapin (a confirm-mode channel whose
//! confirms are awaited off the send path; a sequential consumer, prefetch 100, manual
//! ack) and reliable_mq (`Publisher::publish`, one task per message so confirms do not
//! hold back the rate; an `App` consumer with prefetch 100, concurrency 1).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reliable_mq::{App, Config, ConsumerConfig, HandlerError, handler_fn};
use tokio::time::MissedTickBehavior;

use crate::common::{Args, BenchMessage, Raw, json_body, unique, unix_nanos};
use crate::consume::PREFETCH;

type Samples = Arc<Mutex<Vec<u64>>>;

pub async fn run(args: &Args) -> Result<(), String> {
    let total = args.rate * args.seconds;
    println!(
        "latency: {} msg/s for {}s ({total} messages of {} bytes) per variant, publish -> handler",
        args.rate, args.seconds, args.size
    );
    let raw = Raw::connect(&args.amqp_url).await?;
    let mut rows = Vec::new();
    for variant in ["raw lapin", "reliable_mq"] {
        let queue = unique("bench-latency");
        let samples: Samples = Arc::new(Mutex::new(Vec::with_capacity(total)));
        let consumer = consumer_config(&queue, Arc::clone(&samples));
        raw.declare_consumer_topology(&consumer).await?;
        let r = match variant {
            "raw lapin" => run_raw(args, &queue, total, &samples).await,
            _ => run_ours(args, consumer.clone(), total, &samples).await,
        };
        raw.delete_consumer_topology(&consumer).await;
        r?;
        let mut v = samples.lock().map_err(|_| "poisoned")?.clone();
        v.sort_unstable();
        println!("  {variant}: {} of {total} messages handled", v.len());
        rows.push((variant, v));
    }
    let _ = raw.connection.close(200, "bench done".into()).await;

    println!("\nlatency publish -> handler at {} msg/s (ms)", args.rate);
    println!(
        "{:<14} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "variant", "msgs", "p50", "p90", "p99", "p99.9", "max"
    );
    for (name, v) in &rows {
        println!(
            "{:<14} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            name,
            v.len(),
            ms(percentile(v, 0.50)),
            ms(percentile(v, 0.90)),
            ms(percentile(v, 0.99)),
            ms(percentile(v, 0.999)),
            ms(v.last().copied().unwrap_or(0)),
        );
    }
    println!("target: reliable_mq p99 < 10 ms");
    Ok(())
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn record(samples: &Samples, m: &BenchMessage) {
    let latency = unix_nanos().saturating_sub(m.sent_ns);
    if let Ok(mut v) = samples.lock() {
        v.push(latency);
    }
}

fn consumer_config(queue: &str, samples: Samples) -> ConsumerConfig {
    let handler = handler_fn(move |m: BenchMessage| {
        record(&samples, &m);
        async { Ok::<_, HandlerError>(()) }
    });
    ConsumerConfig::new(queue, format!("{queue}.dlx"), handler).with_prefetch(PREFETCH)
}

/// Wait until `total` samples arrived (or 10 s passed).
async fn wait_for(samples: &Samples, total: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if samples.lock().map(|v| v.len()).unwrap_or(0) >= total {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ticker(rate: usize) -> tokio::time::Interval {
    let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    // Catch up after a late tick, so the average rate holds.
    t.set_missed_tick_behavior(MissedTickBehavior::Burst);
    t
}

async fn run_ours(
    args: &Args,
    consumer: ConsumerConfig,
    total: usize,
    samples: &Samples,
) -> Result<(), String> {
    let config = Config::default()
        .with_amqp_url(args.amqp_url.clone())
        .with_connection_name("bench-latency");
    let queue = consumer.queue().to_owned();
    let running = App::new(config)
        .consumer(consumer)
        .start()
        .await
        .map_err(|e| e.to_string())?;
    let publisher = running.publisher().clone();
    let pad = "x".repeat(args.size.saturating_sub(60));
    let mut tick = ticker(args.rate);
    let mut publishes = tokio::task::JoinSet::new();
    for seq in 0..total as u64 {
        tick.tick().await;
        let (publisher, queue, pad) = (publisher.clone(), queue.clone(), pad.clone());
        publishes.spawn(async move {
            let m = BenchMessage {
                seq,
                sent_ns: unix_nanos(),
                pad,
            };
            publisher.publish("", &queue, &m).await.map(|_| ())
        });
        while let Some(done) = publishes.try_join_next() {
            done.map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
    }
    while let Some(done) = publishes.join_next().await {
        done.map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    wait_for(samples, total).await;
    running.shutdown().await.map_err(|e| e.to_string())
}

async fn run_raw(args: &Args, queue: &str, total: usize, samples: &Samples) -> Result<(), String> {
    let connect = || Connection::connect(&args.amqp_url, ConnectionProperties::default());
    let raw = Raw::connect(&args.amqp_url).await?;
    let consumer_conn = &raw.connection;
    let mut deliveries = raw.consume(queue, "bench-latency-raw", PREFETCH).await?;
    let sink = Arc::clone(samples);
    let consumer = tokio::spawn(async move {
        while let Some(Ok(d)) = deliveries.next().await {
            if let Ok(m) = serde_json::from_slice::<BenchMessage>(&d.data) {
                record(&sink, &m);
            }
            let _ = d.ack(BasicAckOptions::default()).await;
        }
    });

    let publisher_conn = connect().await.map_err(|e| e.to_string())?;
    let pub_channel = publisher_conn
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    pub_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut tick = ticker(args.rate);
    let mut confirms = tokio::task::JoinSet::new();
    for seq in 0..total as u64 {
        tick.tick().await;
        let confirm = pub_channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &json_body(seq, unix_nanos(), args.size),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await
            .map_err(|e| e.to_string())?;
        confirms.spawn(confirm);
        while confirms.try_join_next().is_some() {}
    }
    while confirms.join_next().await.is_some() {}
    wait_for(samples, total).await;
    consumer.abort();
    let _ = publisher_conn.close(200, "done".into()).await;
    let _ = consumer_conn.close(200, "done".into()).await;
    Ok(())
}
