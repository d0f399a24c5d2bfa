//! `publish`: persistent messages with confirms to a fresh durable queue, through
//! (a) raw lapin with a window of outstanding confirms, (b) raw lapin awaiting each confirm
//! before the next publish, (c) `reliable_mq::Publisher` with many publishes in flight.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use lapin::options::BasicPublishOptions;
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
    let confirm_channel = raw.confirm_channel().await?;
    // Raw bodies are `size` bytes; ours is a JSON string of the same encoded size.
    let raw_body = vec![b'x'; args.size];
    let json_body = "x".repeat(args.size.saturating_sub(2));

    println!(
        "publish: {} x {} persistent {}-byte messages with confirms to durable queue {queue}",
        reps, n, args.size
    );
    let mut pipelined = Vec::new();
    let mut one_by_one = Vec::new();
    let mut ours = Vec::new();
    for rep in 1..=reps {
        raw.purge(queue).await?;
        let r = timed(n, || {
            raw_publish(&confirm_channel, queue, n, args.window, &raw_body)
        })
        .await?;
        pipelined.push(r);

        raw.purge(queue).await?;
        let o = timed(n, || {
            publisher_publish(&publisher, queue, n, args.concurrency, &json_body)
        })
        .await?;
        ours.push(o);

        raw.purge(queue).await?;
        let s = timed(args.one_by_one_n, || {
            raw_publish(&confirm_channel, queue, args.one_by_one_n, 1, &raw_body)
        })
        .await?;
        one_by_one.push(s);
        println!(
            "  rep {rep}: raw pipelined {r:>8.0}/s   Publisher {o:>8.0}/s   raw one-by-one {s:>7.0}/s"
        );
    }
    raw.purge(queue).await?;
    publisher.close().await;

    let rows = [
        Row {
            name: "raw lapin, pipelined (window of confirms)",
            messages: n,
            runs: pipelined.clone(),
        },
        Row {
            name: "raw lapin, one confirm at a time",
            messages: args.one_by_one_n,
            runs: one_by_one.clone(),
        },
        Row {
            name: "reliable_mq::Publisher, concurrent publishes",
            messages: n,
            runs: ours.clone(),
        },
    ];
    print_table(
        &format!(
            "publish (medians of {} reps; window {}, Publisher concurrency {})",
            reps, args.window, args.concurrency
        ),
        &rows,
    );
    let (p, s, o) = (median(&pipelined), median(&one_by_one), median(&ours));
    println!(
        "\nPublisher / raw pipelined   = {:.2}x   (target >= 0.90x)",
        o / p
    );
    println!(
        "Publisher / raw one-by-one  = {:.1}x   (target >= 8x)",
        o / s
    );
    Ok(())
}

/// Publish `n` messages keeping at most `window` confirms outstanding (1 = wait for each
/// confirm before the next publish).
async fn raw_publish(
    channel: &Channel,
    queue: &str,
    n: usize,
    window: usize,
    body: &[u8],
) -> Result<(), String> {
    let mut outstanding = VecDeque::with_capacity(window);
    for _ in 0..n {
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
        outstanding.push_back(confirm);
        if outstanding.len() >= window
            && let Some(oldest) = outstanding.pop_front()
        {
            expect_ack(oldest.await)?;
        }
    }
    for confirm in outstanding {
        expect_ack(confirm.await)?;
    }
    Ok(())
}

fn expect_ack(confirmation: lapin::Result<Confirmation>) -> Result<(), String> {
    match confirmation {
        Ok(c) if c.is_ack() => Ok(()),
        Ok(c) => Err(format!("broker did not ack: {c:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Publish `n` messages through `Publisher` from `concurrency` tasks.
async fn publisher_publish(
    publisher: &Publisher,
    queue: &str,
    n: usize,
    concurrency: usize,
    body: &str,
) -> Result<(), String> {
    let next = Arc::new(AtomicUsize::new(0));
    let body: Arc<str> = body.into();
    let queue: Arc<str> = queue.into();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(n) {
        let (publisher, next, body, queue) = (
            publisher.clone(),
            Arc::clone(&next),
            Arc::clone(&body),
            Arc::clone(&queue),
        );
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                publisher
                    .publish("", &queue, &*body)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    Ok(())
}
