//! The dedup store goes away under a running idempotent consumer: Redis is shut down
//! mid-stream and started again. Nothing may be acked or dead-lettered because Redis was
//! down (beyond handlers whose claim succeeded before), and every message is handled
//! exactly once after the restart.
//!
//! These tests stop the machine's shared Redis: they are serialized by a lock, keep the
//! outage to a few seconds, and a guard restarts Redis even when an assertion fails.
//!
//! Each scenario runs only with `RELIABLE_MQ_FAULTS=1` (`faults_enabled`): it stops and
//! restarts this machine's services, so the plain test command only prints a skip line.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_mq::dedup::RedisStore;
use reliable_mq::{App, ConsumerConfig, HandlerError, RetryBackoff, handler_fn};
use reliable_mq_tests::{
    Broker, Cleanup, eventually, init_tracing, message_total, redis_url, sh, test_config, unique,
};

const WAIT: Duration = Duration::from_secs(30);
/// How long Redis stays down: long enough to see the consumer pause, short enough not to
/// bother the other tests sharing this Redis.
const OUTAGE: Duration = Duration::from_secs(3);

/// One test at a time: they stop a shared service.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const START_REDIS: &str = "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 \
                           --save '' --appendonly no";

fn redis_up() -> bool {
    sh("redis-cli -p 6379 ping 2>/dev/null | grep -q PONG")
}

/// Start Redis if it is down and wait until it answers.
fn ensure_redis_up() {
    if redis_up() {
        return;
    }
    sh(&format!("{START_REDIS} >/dev/null"));
    for _ in 0..200 {
        if redis_up() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("Redis did not come back on 127.0.0.1:6379; start it with: {START_REDIS}");
}

/// Restarts Redis when dropped, so a failing assertion cannot leave it down.
struct RedisGuard;

impl RedisGuard {
    /// Shut Redis down (no save) and wait until it no longer answers.
    fn stop() -> Self {
        let guard = Self;
        sh("redis-cli -p 6379 shutdown nosave >/dev/null 2>&1");
        for _ in 0..200 {
            if !redis_up() {
                return guard;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("Redis did not stop");
    }

    /// Start Redis again now (dropping the guard does the same).
    fn restart(self) {
        drop(self);
    }
}

impl Drop for RedisGuard {
    fn drop(&mut self) {
        ensure_redis_up();
    }
}

type Calls = Arc<Mutex<HashMap<u64, usize>>>;

fn recording(
    calls: &Calls,
    started: &Arc<AtomicUsize>,
    delay: Duration,
) -> impl reliable_mq::Handler {
    let (calls, started) = (Arc::clone(calls), Arc::clone(started));
    handler_fn(move |n: u64| {
        let (calls, started) = (Arc::clone(&calls), Arc::clone(&started));
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            *calls.lock().expect("calls").entry(n).or_insert(0) += 1;
            Ok::<_, HandlerError>(())
        }
    })
}

fn handled(calls: &Calls) -> usize {
    calls.lock().expect("calls").values().sum()
}

async fn delete_keys(prefix: &str) {
    sh(&format!(
        "redis-cli -p 6379 --scan --pattern '{prefix}:*' | xargs -r redis-cli -p 6379 del >/dev/null"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_mid_stream_pauses_the_consumer_and_loses_nothing() {
    if !reliable_mq_tests::faults_enabled(
        "redis_down_mid_stream_pauses_the_consumer_and_loses_nothing",
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    init_tracing();
    ensure_redis_up();
    let broker = Broker::connect().await;
    let q = unique("faults-redis");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms"], &[]);
    let config = test_config(&q);
    let prefix = config.dedup_prefix.clone();
    let calls: Calls = Arc::new(Mutex::new(HashMap::new()));
    let started = Arc::new(AtomicUsize::new(0));
    let consumer = ConsumerConfig::new(
        &q,
        &dlx,
        recording(&calls, &started, Duration::from_millis(40)),
    )
    .with_prefetch(8)
    .with_concurrency(4)
    .with_retries(2, Duration::from_millis(200), RetryBackoff::Fixed)
    .idempotent(Duration::from_secs(600));
    let app = App::new(config)
        .with_dedup_store(RedisStore::new(&redis_url(), 8).expect("store"))
        .consumer(consumer)
        .start()
        .await
        .expect("start");

    const N: usize = 80;
    for i in 0..N as u64 {
        broker
            .publish_json("", &q, &serde_json::json!(i), &format!("{q}-{i}"))
            .await;
    }
    assert!(eventually(WAIT, || async { handled(&calls) >= 10 }).await);
    let guard = RedisGuard::stop();

    // Handlers whose claim succeeded before the outage may finish (and are acked); after
    // that nothing runs: every later delivery needs a claim.
    // Paused in place: the deliveries that could not be claimed hold their slots, unacked.
    let settled = eventually(WAIT, || async {
        started.load(Ordering::SeqCst) == handled(&calls)
            && app.stats(&q).is_some_and(|s| s.paused > 0)
    })
    .await;
    assert!(settled, "consumer paused: {:?}", app.stats(&q));
    let ran_before = started.load(Ordering::SeqCst);
    assert!(
        ran_before < N,
        "the outage began mid-stream ({ran_before} of {N} already ran)"
    );
    // The queue keeps every message not handled: nothing else was acked.
    // Everything not handled is still the broker's: ready, or delivered and unacked.
    let waiting = eventually(WAIT, || async {
        message_total(&q) == Some((N - ran_before) as u64)
    })
    .await;
    assert!(
        waiting,
        "queue keeps the rest: {:?} in the queue, {ran_before} handled of {N}",
        message_total(&q)
    );
    tokio::time::sleep(OUTAGE).await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        ran_before,
        "no handler ran while Redis was down"
    );
    assert_eq!(
        message_total(&q),
        Some((N - ran_before) as u64),
        "nothing acked while Redis was down"
    );
    let stats = app.stats(&q).expect("stats");
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(
        stats.retried, 0,
        "an outage is not a handler failure: {stats:?}"
    );
    guard.restart();

    assert!(
        eventually(WAIT, || async {
            handled(&calls) == N && app.stats(&q).is_some_and(|s| s.handled as usize == N)
        })
        .await,
        "all handled after the restart: {} of {N}, {:?}",
        handled(&calls),
        app.stats(&q)
    );
    {
        let calls = calls.lock().expect("calls");
        let twice: Vec<_> = calls.iter().filter(|(_, c)| **c != 1).collect();
        assert!(twice.is_empty(), "each message exactly once: {twice:?}");
        assert_eq!(calls.len(), N);
    }
    let stats = app.stats(&q).expect("stats");
    assert_eq!(stats.handled as usize, N, "{stats:?}");
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(
        (stats.sessions, stats.paused, stats.requeued),
        (1, 0, 0),
        "paused in place and resumed: no reconnect, nothing handed back: {stats:?}"
    );
    assert!(app.health().await.is_ready());
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(broker.ready_count(&q).await, Some(0));
    assert_eq!(
        broker.ready_count(&format!("{q}.dlq")).await,
        Some(0),
        "nothing dead-lettered"
    );
    assert_eq!(
        broker.ready_count(&format!("{q}.retry.200ms")).await,
        Some(0)
    );
    broker
        .delete_consumer_topology(&q, &dlx, &["200ms"], &[])
        .await;
    delete_keys(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_when_writing_done_acks_anyway_and_does_not_rerun() {
    if !reliable_mq_tests::faults_enabled(
        "redis_down_when_writing_done_acks_anyway_and_does_not_rerun",
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    init_tracing();
    ensure_redis_up();
    let broker = Broker::connect().await;
    let q = unique("faults-redis-done");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms"], &[]);
    let config = test_config(&q);
    let prefix = config.dedup_prefix.clone();
    let calls: Calls = Arc::new(Mutex::new(HashMap::new()));
    let started = Arc::new(AtomicUsize::new(0));
    let consumer = ConsumerConfig::new(
        &q,
        &dlx,
        recording(&calls, &started, Duration::from_millis(1500)),
    )
    .with_retries(2, Duration::from_millis(200), RetryBackoff::Fixed)
    .idempotent(Duration::from_secs(600));
    let app = App::new(config)
        .with_dedup_store(RedisStore::new(&redis_url(), 4).expect("store"))
        .consumer(consumer)
        .start()
        .await
        .expect("start");

    broker
        .publish_json("", &q, &serde_json::json!(1), &format!("{q}-1"))
        .await;
    assert!(eventually(WAIT, || async { started.load(Ordering::SeqCst) == 1 }).await);
    // The claim is taken and the handler runs; Redis goes away before `done` is written.
    let guard = RedisGuard::stop();
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 1)
        })
        .await,
        "the handler's success is acked without the done mark: {:?}",
        app.stats(&q)
    );
    assert!(eventually(WAIT, || async { broker.ready_count(&q).await == Some(0) }).await);
    guard.restart();

    // Still consuming after Redis is back, and the first message was not run again.
    broker
        .publish_json("", &q, &serde_json::json!(2), &format!("{q}-2"))
        .await;
    // The handler's own record comes first; the runtime counts it once `done` is written.
    assert!(
        eventually(WAIT, || async {
            handled(&calls) == 2 && app.stats(&q).is_some_and(|s| s.handled == 2)
        })
        .await,
        "{:?}",
        app.stats(&q)
    );
    assert_eq!(started.load(Ordering::SeqCst), 2, "message 1 ran once");
    let stats = app.stats(&q).expect("stats");
    assert_eq!(
        (stats.handled, stats.dead_lettered, stats.retried),
        (2, 0, 0),
        "{stats:?}"
    );
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(broker.ready_count(&q).await, Some(0));
    assert_eq!(broker.ready_count(&format!("{q}.dlq")).await, Some(0));
    broker
        .delete_consumer_topology(&q, &dlx, &["200ms"], &[])
        .await;
    delete_keys(&prefix).await;
}
