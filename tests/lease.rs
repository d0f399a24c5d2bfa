//! Dedup claims against a Redis of the test's own (a private `redis-server` on a free
//! port, `reliable_mq_tests::redis`, so stopping it disturbs nobody): the lease is renewed beside the handler, so a
//! stopped Redis stalls neither the handler nor the claim; a delivery paused because the
//! store does not answer is handed back before the broker's `consumer_timeout`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reliable_mq::dedup::KeyScope;
use reliable_mq::{App, ConsumerConfig, HandlerError, RetryBackoff, handler_fn};
use reliable_mq_tests::redis::{RedisNodes, free_ports};
use reliable_mq_tests::{Cleanup, eventually, init_tracing, message_total, test_config, unique};

const WAIT: Duration = Duration::from_secs(15);

/// An idempotent consumer of `q` with `timeout` (one retry after 200 ms), started, and one
/// message published to it with `message_id`.
async fn start_with_one_message(
    config: reliable_mq::Config,
    q: &str,
    dlx: &str,
    handler: impl reliable_mq::Handler,
    timeout: Duration,
    message_id: &str,
) -> reliable_mq::RunningApp {
    let consumer = ConsumerConfig::new(q, dlx, handler)
        .with_retries(1, Duration::from_millis(200), RetryBackoff::Fixed)
        .with_timeout(timeout)
        .idempotent(Duration::from_secs(600));
    let app = App::new(config)
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    app.publisher()
        .publish_with(
            "",
            q,
            &1u64,
            reliable_mq::PublishOptions::with_message_id(message_id),
        )
        .await
        .expect("published");
    app
}

/// Handler ticks, 100 ms apart: the handler runs 12 s.
const TICKS: usize = 120;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_redis_stalls_neither_the_handler_nor_its_claim() {
    init_tracing();
    let redis = RedisNodes::one("rmq-lease-redis");
    let q = unique("lease-stop");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms"], &[]);
    let config = test_config(&q).with_redis_url(Some(redis.url()));
    let key = KeyScope::from_config(&config)
        .expect("scope")
        .key(&q, "lease-1");
    // A 15 s timeout gives a 22.5 s lease, renewed every 7.5 s from the claim.
    let ticks: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let t = Arc::clone(&ticks);
    let handler = handler_fn(move |_n: u64| {
        let t = Arc::clone(&t);
        async move {
            for _ in 0..TICKS {
                t.lock().expect("ticks").push(Instant::now());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, HandlerError>(())
        }
    });
    let app = start_with_one_message(
        config,
        &q,
        &dlx,
        handler,
        Duration::from_secs(15),
        "lease-1",
    )
    .await;
    assert!(
        eventually(WAIT, || async { !ticks.lock().expect("ticks").is_empty() }).await,
        "the handler started"
    );
    let started = ticks.lock().expect("ticks")[0];

    // Stopped from just before the first renewal (7.5 s after the claim) for 3 s.
    tokio::time::sleep(Duration::from_millis(7000).saturating_sub(started.elapsed())).await;
    assert!(
        redis.signal(redis.port(), "-STOP"),
        "stop the private Redis"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        redis.signal(redis.port(), "-CONT"),
        "resume the private Redis"
    );
    let stopped_until = started.elapsed();

    // The renewal that failed while Redis was stopped is tried again once it answers,
    // while the handler still runs: the claim is held, with more lease left than the first
    // one would have (22.5 s from the claim).
    let mut seen = (String::new(), 0i64, 0i64);
    let renewed = eventually(Duration::from_millis(1800), || {
        let (holder, pttl) = (
            redis.cli(&["GET", &key]).unwrap_or_default(),
            redis
                .cli(&["PTTL", &key])
                .and_then(|v| v.parse().ok())
                .unwrap_or(-2),
        );
        let left_of_first = 22_500 - i64::try_from(started.elapsed().as_millis()).unwrap_or(0);
        let held = !holder.is_empty() && holder != "done";
        seen = (holder, pttl, left_of_first);
        async move { held && pttl > left_of_first + 2_000 }
    })
    .await;
    assert!(
        renewed,
        "the claim is still held and its lease renewed: (holder, PTTL ms, left of the first lease ms) = {seen:?}"
    );

    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 1)
        })
        .await,
        "{:?}",
        app.stats(&q)
    );
    let ticks = ticks.lock().expect("ticks").clone();
    let gap = ticks
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} ticks over {:?} (Redis stopped from 7 s to {stopped_until:?}); largest gap {gap:?}",
        ticks.len(),
        ticks.last().map(|l| *l - ticks[0]).unwrap_or_default()
    );
    assert_eq!(ticks.len(), TICKS, "the handler ran to its end, once");
    assert!(
        gap < Duration::from_millis(1500),
        "the ticks kept coming while Redis was stopped: largest gap {gap:?}"
    );
    assert_eq!(redis.cli(&["GET", &key]).as_deref(), Some("done"));
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_paused_on_a_dead_store_is_handed_back_before_the_consumer_timeout() {
    init_tracing();
    // Nothing listens on the store's port until the end of the test.
    let [port] = free_ports(false);
    let redis = RedisNodes::new("rmq-lease-redis", &[port]);
    let q = unique("lease-handback");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms"], &[]);
    let config = test_config(&q)
        .with_redis_url(Some(format!("redis://127.0.0.1:{port}")))
        .with_consumer_timeout(Duration::from_secs(4));
    let calls = Arc::new(Mutex::new(0usize));
    let c = Arc::clone(&calls);
    let handler = handler_fn(move |_n: u64| {
        let c = Arc::clone(&c);
        async move {
            *c.lock().expect("calls") += 1;
            Ok::<_, HandlerError>(())
        }
    });
    let app = start_with_one_message(
        config,
        &q,
        &dlx,
        handler,
        Duration::from_secs(1),
        "paused-1",
    )
    .await;

    // Held in place while the store is down, then handed back (3 s into a 4 s
    // consumer_timeout) and received again, twice over: the channel never closed.
    assert!(
        eventually(WAIT, || async {
            app.stats(&q)
                .is_some_and(|s| s.requeued >= 2 && s.received >= 3)
        })
        .await,
        "{:?}",
        app.stats(&q)
    );
    let stats = app.stats(&q).expect("stats");
    assert_eq!(stats.sessions, 1, "{stats:?}");
    assert_eq!(*calls.lock().expect("calls"), 0, "never run unclaimed");
    assert_eq!(message_total(&q), Some(1), "still in its queue");

    // The store comes up: the message is handled, once.
    redis.start(port, &[]);
    redis.wait_ours(port);
    assert!(
        eventually(WAIT, || async {
            app.stats(&q)
                .is_some_and(|s| s.handled == 1 && s.paused == 0)
        })
        .await,
        "{:?}",
        app.stats(&q)
    );
    assert_eq!(*calls.lock().expect("calls"), 1);
    assert!(
        eventually(WAIT, || async { message_total(&q) == Some(0) }).await,
        "acked"
    );
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_handler_timeout_does_not_make_a_long_lease() {
    // A crash under a `timeout = "2h"` handler must not hold the message off for hours:
    // the lease is capped and renewal keeps the long handler's claim alive instead.
    init_tracing();
    let redis = RedisNodes::one("rmq-lease-redis");
    let q = unique("lease-cap");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms"], &[]);
    let config = test_config(&q)
        .with_redis_url(Some(redis.url()))
        .with_consumer_timeout(Duration::from_secs(3 * 3600));
    let key = KeyScope::from_config(&config)
        .expect("scope")
        .key(&q, "long-1");
    let release = Arc::new(tokio::sync::Notify::new());
    let r = Arc::clone(&release);
    let handler = handler_fn(move |_n: u64| {
        let r = Arc::clone(&r);
        async move {
            r.notified().await;
            Ok::<_, HandlerError>(())
        }
    });
    let app = start_with_one_message(
        config,
        &q,
        &dlx,
        handler,
        Duration::from_secs(2 * 3600),
        "long-1",
    )
    .await;
    let mut pttl = -2;
    assert!(
        eventually(WAIT, || {
            pttl = redis
                .cli(&["PTTL", &key])
                .and_then(|v| v.parse().ok())
                .unwrap_or(-2);
            async move { pttl > 0 }
        })
        .await,
        "the claim is taken"
    );
    let cap = i64::try_from(reliable_mq::dedup::MAX_LEASE.as_millis()).unwrap_or(i64::MAX);
    assert!(
        pttl <= cap,
        "a 2 h handler's claim lease is capped at {cap} ms: PTTL {pttl} ms"
    );
    release.notify_one();
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 1)
        })
        .await
    );
    assert_eq!(redis.cli(&["GET", &key]).as_deref(), Some("done"));
    app.shutdown().await.expect("clean shutdown");
}
