//! Idempotent consumers on the real RabbitMQ and Redis: the claim protocol of
//! `RedisStore` (its Lua scripts, one by one), then whole consumers: duplicates acked
//! without a handler call, a failed attempt never taken for a duplicate (the seed's bug),
//! two instances racing on one message id, `done` marks namespaced and expiring, and the
//! missing-`message_id` policy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_redis::redis;
use lapin::BasicProperties;
use reliable_mq::dedup::{self, Claim, DedupStore, RedisStore};
use reliable_mq::{App, ConsumerConfig, HandlerError, RetryBackoff, handler_fn};
use reliable_mq_tests::{
    Broker, Cleanup, eventually, init_tracing, redis_url, test_config, unique,
};

const WAIT: Duration = Duration::from_secs(15);
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

/// A plain Redis connection to inspect and clean up, independent of the store under test.
struct Inspector {
    pool: deadpool_redis::Pool,
}

impl Inspector {
    fn new() -> Self {
        let pool = deadpool_redis::Config::from_url(redis_url())
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .expect("redis pool");
        Self { pool }
    }

    async fn conn(&self) -> deadpool_redis::Connection {
        self.pool
            .get()
            .await
            .expect("Redis must be running on 127.0.0.1:6379 (redis-server --daemonize yes ...)")
    }

    async fn get(&self, key: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.conn().await)
            .await
            .expect("GET")
    }

    /// Remaining time to live in ms; -2 when the key does not exist, -1 when it has no TTL.
    async fn pttl(&self, key: &str) -> i64 {
        redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut self.conn().await)
            .await
            .expect("PTTL")
    }

    async fn keys(&self, prefix: &str) -> Vec<String> {
        let mut conn = self.conn().await;
        let mut cursor = 0u64;
        let mut keys = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .expect("SCAN");
            keys.extend(batch);
            if next == 0 {
                keys.sort();
                keys.dedup();
                return keys;
            }
            cursor = next;
        }
    }

    /// Delete every key starting with `prefix`.
    async fn delete_prefix(&self, prefix: &str) {
        let keys = self.keys(prefix).await;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut self.conn().await)
                .await
                .expect("DEL");
        }
    }
}

fn store() -> RedisStore {
    RedisStore::new(&redis_url(), 8).expect("redis store")
}

// ---------------------------------------------------------------------------------------
// The claim protocol of RedisStore, script by script, against the real Redis.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_claim_is_exclusive_and_complete_turns_it_into_done_with_the_ttl() {
    let (s, redis) = (store(), Inspector::new());
    let prefix = unique("rmq-test:store");
    let k = dedup::KeyScope::new(&prefix, "/").key("q", "m-1");
    assert_eq!(k, format!("{prefix}:/:q:m-1"));

    assert_eq!(s.claim(&k, "t1", LEASE).await.ok(), Some(Claim::Acquired));
    assert_eq!(
        redis.get(&k).await.as_deref(),
        Some("t1"),
        "the claim holds our token"
    );
    let lease_left = redis.pttl(&k).await;
    assert!(
        lease_left > 0 && lease_left <= 30_000,
        "claim has the lease as TTL: {lease_left}"
    );
    assert_eq!(s.claim(&k, "t2", LEASE).await.ok(), Some(Claim::Held));
    assert_eq!(
        redis.get(&k).await.as_deref(),
        Some("t1"),
        "a held claim is not overwritten"
    );

    // Only the holder may complete.
    assert_eq!(s.complete(&k, "t2", TTL).await.ok(), Some(false));
    assert_eq!(redis.get(&k).await.as_deref(), Some("t1"));
    assert_eq!(s.complete(&k, "t1", TTL).await.ok(), Some(true));
    assert_eq!(redis.get(&k).await.as_deref(), Some("done"));
    let ttl_left = redis.pttl(&k).await;
    assert!(
        ttl_left > 30_000 && ttl_left <= 3_600_000,
        "done carries the dedup TTL: {ttl_left}"
    );

    assert_eq!(s.claim(&k, "t3", LEASE).await.ok(), Some(Claim::Done));
    // A done mark is not a claim: nobody can renew, release or re-complete it.
    assert_eq!(s.renew(&k, "t1", LEASE).await.ok(), Some(false));
    assert_eq!(s.release(&k, "t1").await.ok(), Some(false));
    assert_eq!(s.complete(&k, "t3", TTL).await.ok(), Some(false));
    assert_eq!(redis.get(&k).await.as_deref(), Some("done"));
    redis.delete_prefix(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_release_only_with_the_token_and_then_the_retry_claims() {
    let (s, redis) = (store(), Inspector::new());
    let prefix = unique("rmq-test:store");
    let k = dedup::KeyScope::new(&prefix, "/").key("q", "m-1");

    assert_eq!(s.claim(&k, "t1", LEASE).await.ok(), Some(Claim::Acquired));
    assert_eq!(s.release(&k, "someone-else").await.ok(), Some(false));
    assert_eq!(
        redis.get(&k).await.as_deref(),
        Some("t1"),
        "a wrong token deletes nothing"
    );
    assert_eq!(s.release(&k, "t1").await.ok(), Some(true));
    assert_eq!(redis.pttl(&k).await, -2, "released: the key is gone");
    // The seed's bug was exactly here: the retry of a failed attempt must run.
    assert_eq!(s.claim(&k, "t2", LEASE).await.ok(), Some(Claim::Acquired));
    assert_eq!(
        s.release(&k, "t1").await.ok(),
        Some(false),
        "a stale holder cannot release"
    );
    assert_eq!(redis.get(&k).await.as_deref(), Some("t2"));
    redis.delete_prefix(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_renew_extends_only_the_holders_lease() {
    let (s, redis) = (store(), Inspector::new());
    let prefix = unique("rmq-test:store");
    let k = dedup::KeyScope::new(&prefix, "/").key("q", "m-1");

    assert_eq!(
        s.claim(&k, "t1", Duration::from_secs(10)).await.ok(),
        Some(Claim::Acquired)
    );
    assert_eq!(
        s.renew(&k, "t2", Duration::from_secs(600)).await.ok(),
        Some(false)
    );
    assert!(
        redis.pttl(&k).await <= 10_000,
        "a wrong token does not extend the lease"
    );
    assert_eq!(
        s.renew(&k, "t1", Duration::from_secs(600)).await.ok(),
        Some(true)
    );
    let left = redis.pttl(&k).await;
    assert!(left > 10_000 && left <= 600_000, "lease extended: {left}");
    assert_eq!(redis.get(&k).await.as_deref(), Some("t1"));
    // Renewing a key that is gone does not resurrect it.
    let gone = dedup::KeyScope::new(&prefix, "/").key("q", "never-claimed");
    assert_eq!(s.renew(&gone, "t1", LEASE).await.ok(), Some(false));
    assert_eq!(redis.pttl(&gone).await, -2);
    redis.delete_prefix(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_unfinished_claim_expires_with_its_lease() {
    let (s, redis) = (store(), Inspector::new());
    let prefix = unique("rmq-test:store");
    let k = dedup::KeyScope::new(&prefix, "/").key("q", "m-1");

    // A holder that crashed: it never completes nor releases.
    assert_eq!(
        s.claim(&k, "crashed", Duration::from_millis(300))
            .await
            .ok(),
        Some(Claim::Acquired)
    );
    let reclaimed = eventually(Duration::from_secs(10), || async {
        s.claim(&k, "t2", LEASE).await.ok() == Some(Claim::Acquired)
    })
    .await;
    assert!(
        reclaimed,
        "a redelivery claims afresh once the lease is over"
    );
    assert_eq!(s.complete(&k, "crashed", TTL).await.ok(), Some(false));
    assert_eq!(s.release(&k, "crashed").await.ok(), Some(false));
    assert_eq!(s.renew(&k, "crashed", LEASE).await.ok(), Some(false));
    assert_eq!(redis.get(&k).await.as_deref(), Some("t2"));
    assert_eq!(s.complete(&k, "t2", TTL).await.ok(), Some(true));
    assert_eq!(s.claim(&k, "t3", LEASE).await.ok(), Some(Claim::Done));
    redis.delete_prefix(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_late_success_is_recorded_unless_another_claim_took_over() {
    let (s, redis) = (store(), Inspector::new());
    let prefix = unique("rmq-test:store");
    let (k1, k2) = (
        dedup::KeyScope::new(&prefix, "/").key("q", "m-1"),
        dedup::KeyScope::new(&prefix, "/").key("q", "m-2"),
    );
    let short = Duration::from_millis(200);

    // The lease ran out and nobody claimed since: the work is done, record it.
    assert_eq!(
        s.claim(&k1, "slow", short).await.ok(),
        Some(Claim::Acquired)
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            redis.pttl(&k1).await == -2
        })
        .await
    );
    assert_eq!(s.complete(&k1, "slow", TTL).await.ok(), Some(true));
    assert_eq!(redis.get(&k1).await.as_deref(), Some("done"));
    assert!(redis.pttl(&k1).await > 30_000, "with the dedup TTL");

    // The lease ran out and a redelivery holds the key now: leave its claim alone.
    assert_eq!(
        s.claim(&k2, "slow", short).await.ok(),
        Some(Claim::Acquired)
    );
    let taken_over = eventually(Duration::from_secs(10), || async {
        s.claim(&k2, "t2", LEASE).await.ok() == Some(Claim::Acquired)
    })
    .await;
    assert!(taken_over);
    assert_eq!(s.complete(&k2, "slow", TTL).await.ok(), Some(false));
    assert_eq!(redis.get(&k2).await.as_deref(), Some("t2"));
    redis.delete_prefix(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_is_an_error_never_a_decision() {
    // Nothing listens on port 1: every operation must fail, not guess.
    let s = RedisStore::new("redis://127.0.0.1:1", 2).expect("lazy pool");
    assert!(s.ping().await.is_err());
    assert!(s.claim("k", "t", LEASE).await.is_err());
    assert!(s.complete("k", "t", TTL).await.is_err());
    assert!(s.release("k", "t").await.is_err());
    assert!(s.renew("k", "t", LEASE).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_concurrent_claims_of_one_key_have_exactly_one_winner() {
    let s = Arc::new(store());
    let redis = Inspector::new();
    let prefix = unique("rmq-test:store");
    let k = dedup::KeyScope::new(&prefix, "/").key("q", "m-1");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..32 {
        let (s, k) = (Arc::clone(&s), k.clone());
        tasks.spawn(async move { s.claim(&k, &format!("t{i}"), LEASE).await });
    }
    let mut outcomes = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        let claim = r.expect("task").expect("claim");
        *outcomes.entry(format!("{claim:?}")).or_insert(0) += 1;
    }
    assert_eq!(outcomes.get("Acquired"), Some(&1), "{outcomes:?}");
    assert_eq!(outcomes.get("Held"), Some(&31), "{outcomes:?}");
    redis.delete_prefix(&prefix).await;
}

/// Claims and done marks sent together go to Redis in batches; each key still gets the
/// answer the one-key script gives: of two claims per key one wins, the done marks turn
/// every winner's claim into `done`, a mark with a stranger's token is refused, and later
/// claims find `done`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_claims_and_done_marks_sent_together_keep_their_answers() {
    let s = Arc::new(store());
    let redis = Inspector::new();
    let prefix = unique("rmq-test:batch");
    let scope = dedup::KeyScope::new(&prefix, "/");
    let keys: Vec<String> = (0..100)
        .map(|i| scope.key("q", &format!("m-{i}")))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, k) in keys.iter().enumerate() {
        for copy in 0..2 {
            let (s, k) = (Arc::clone(&s), k.clone());
            tasks.spawn(async move {
                let token = format!("t{i}-{copy}");
                let claim = s.claim(&k, &token, LEASE).await.expect("claim");
                (k, token, claim)
            });
        }
    }
    let mut winners = HashMap::new();
    let mut held = 0;
    while let Some(r) = tasks.join_next().await {
        let (k, token, claim) = r.expect("task");
        match claim {
            dedup::Claim::Acquired => {
                assert!(winners.insert(k, token).is_none(), "one winner per key");
            }
            dedup::Claim::Held => held += 1,
            dedup::Claim::Done => panic!("nothing is done yet"),
        }
    }
    assert_eq!((winners.len(), held), (100, 100));

    let mut marks = tokio::task::JoinSet::new();
    for (k, token) in &winners {
        let (store, key, token) = (Arc::clone(&s), k.clone(), token.clone());
        marks.spawn(async move { store.complete(&key, &token, TTL).await.expect("complete") });
        // A stranger's mark on the same key, sent together: refused whatever the order
        // (a held claim of another token, or already done).
        let (store, key) = (Arc::clone(&s), k.clone());
        marks.spawn(async move {
            !store
                .complete(&key, "stranger", TTL)
                .await
                .expect("complete")
        });
    }
    while let Some(r) = marks.join_next().await {
        assert!(
            r.expect("task"),
            "the winner's mark is written, the stranger's refused"
        );
    }
    for k in &keys {
        assert_eq!(
            s.claim(k, "late", LEASE).await.expect("claim"),
            dedup::Claim::Done
        );
    }
    redis.delete_prefix(&prefix).await;
}

// ---------------------------------------------------------------------------------------
// Whole idempotent consumers.
// ---------------------------------------------------------------------------------------

/// A handler counting calls per message id (the payload is the id's number).
fn counting(calls: &Arc<Mutex<HashMap<u64, usize>>>, delay: Duration) -> impl reliable_mq::Handler {
    let calls = Arc::clone(calls);
    handler_fn(move |n: u64| {
        let calls = Arc::clone(&calls);
        async move {
            *calls.lock().expect("calls").entry(n).or_insert(0) += 1;
            tokio::time::sleep(delay).await;
            Ok::<_, HandlerError>(())
        }
    })
}

fn total(calls: &Arc<Mutex<HashMap<u64, usize>>>) -> usize {
    calls.lock().expect("calls").values().sum()
}

/// The queues and exchange one consumer with `with_retries(_, 200ms, Fixed)` declares.
async fn cleanup(broker: &Broker, redis: &Inspector, q: &str, dlx: &str, prefix: &str) {
    broker
        .delete_consumer_topology(q, dlx, &["200ms", "1s", "2s", "4s"], &[])
        .await;
    redis.delete_prefix(prefix).await;
}

fn idempotent_consumer(q: &str, dlx: &str, handler: impl reliable_mq::Handler) -> ConsumerConfig {
    ConsumerConfig::new(q, dlx, handler)
        .with_retries(2, Duration::from_millis(200), RetryBackoff::Fixed)
        .idempotent(Duration::from_secs(600))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_id_twice_runs_the_handler_once_and_acks_both() {
    init_tracing();
    let (broker, redis) = (Broker::connect().await, Inspector::new());
    let q = unique("dedup-twice");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms", "1s", "2s", "4s"], &[])
        .redis_keys(&format!("rmq-test:{q}"));
    let config = test_config(&q);
    let prefix = config.dedup_prefix.clone();
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let app = App::new(config)
        .with_dedup_store(RedisStore::new(&redis_url(), 4).expect("store"))
        .consumer(idempotent_consumer(
            &q,
            &dlx,
            counting(&calls, Duration::ZERO),
        ))
        .start()
        .await
        .expect("start");

    broker
        .publish_json("", &q, &serde_json::json!(1), "same-id")
        .await;
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 1)
        })
        .await
    );
    broker
        .publish_json("", &q, &serde_json::json!(1), "same-id")
        .await;
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.duplicates == 1)
        })
        .await,
        "{:?}",
        app.stats(&q)
    );
    let stats = app.stats(&q).expect("stats");
    assert_eq!(total(&calls), 1, "handler ran once");
    assert_eq!((stats.received, stats.handled, stats.duplicates), (2, 1, 1));
    assert_eq!(stats.dead_lettered, 0);
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(broker.ready_count(&q).await, Some(0), "both copies acked");
    assert_eq!(broker.ready_count(&format!("{q}.dlq")).await, Some(0));
    cleanup(&broker, &redis, &q, &dlx, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_fails_once_runs_again_and_is_never_skipped() {
    // Regression test of the seed's bug: the key written before the handler made the
    // retry of a failed attempt look like a duplicate, and it was acked unhandled.
    init_tracing();
    let (broker, redis) = (Broker::connect().await, Inspector::new());
    let q = unique("dedup-retry");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms", "1s", "2s", "4s"], &[])
        .redis_keys(&format!("rmq-test:{q}"));
    let config = test_config(&q);
    let prefix = config.dedup_prefix.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let handler = handler_fn(move |_n: u64| {
        let c = Arc::clone(&c);
        async move {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(HandlerError::retry("the database blinked"))
            } else {
                Ok(())
            }
        }
    });
    let app = App::new(config)
        .with_dedup_store(RedisStore::new(&redis_url(), 4).expect("store"))
        .consumer(idempotent_consumer(&q, &dlx, handler))
        .start()
        .await
        .expect("start");

    broker
        .publish_json("", &q, &serde_json::json!(7), "flaky-1")
        .await;
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 1)
        })
        .await,
        "the retry ran and succeeded: {:?}",
        app.stats(&q)
    );
    let stats = app.stats(&q).expect("stats");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "handler ran twice: failed, then succeeded"
    );
    assert_eq!(stats.retried, 1);
    assert_eq!(
        stats.duplicates, 0,
        "the retry was not taken for a duplicate"
    );
    assert_eq!(stats.dead_lettered, 0);
    let key = format!("{prefix}:/:{q}:flaky-1");
    assert_eq!(
        redis.get(&key).await.as_deref(),
        Some("done"),
        "marked done after success"
    );

    // Now it is done, a redelivery of the same id is a duplicate.
    broker
        .publish_json("", &q, &serde_json::json!(7), "flaky-1")
        .await;
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.duplicates == 1)
        })
        .await
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(broker.ready_count(&q).await, Some(0));
    assert_eq!(
        broker.ready_count(&format!("{q}.retry.200ms")).await,
        Some(0)
    );
    assert_eq!(broker.ready_count(&format!("{q}.dlq")).await, Some(0));
    cleanup(&broker, &redis, &q, &dlx, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failing_for_good_releases_its_claim() {
    // A rejected message leaves no claim behind: republished later (after a fix), it runs.
    init_tracing();
    let (broker, redis) = (Broker::connect().await, Inspector::new());
    let q = unique("dedup-reject");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms", "1s", "2s", "4s"], &[])
        .redis_keys(&format!("rmq-test:{q}"));
    let config = test_config(&q);
    let prefix = config.dedup_prefix.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let handler = handler_fn(move |_n: u64| {
        let c = Arc::clone(&c);
        async move {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(HandlerError::reject("not yet"))
            } else {
                Ok(())
            }
        }
    });
    let app = App::new(config)
        .with_dedup_store(RedisStore::new(&redis_url(), 4).expect("store"))
        .consumer(idempotent_consumer(&q, &dlx, handler))
        .start()
        .await
        .expect("start");
    broker
        .publish_json("", &q, &serde_json::json!(1), "rej-1")
        .await;
    let dead = broker
        .get_within(&format!("{q}.dlq"), WAIT)
        .await
        .expect("dead-lettered");
    assert_eq!(dead.header("x-error-kind").as_deref(), Some("rejected"));
    let key = format!("{prefix}:/:{q}:rej-1");
    assert!(
        eventually(WAIT, || async { redis.pttl(&key).await == -2 }).await,
        "claim released: {:?}",
        redis.get(&key).await
    );
    broker
        .publish_json("", &q, &serde_json::json!(1), "rej-1")
        .await;
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 1)
        })
        .await
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    app.shutdown().await.expect("clean shutdown");
    cleanup(&broker, &redis, &q, &dlx, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_receiving_one_id_at_once_run_the_handler_once() {
    init_tracing();
    let (broker, redis) = (Broker::connect().await, Inspector::new());
    let q = unique("dedup-race");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms", "1s", "2s", "4s"], &[])
        .redis_keys(&format!("rmq-test:{q}"));
    let config = test_config(&q);
    let prefix = config.dedup_prefix.clone();
    let calls = Arc::new(Mutex::new(HashMap::new()));
    // Prefetch 1 each: while one instance runs the slow handler it cannot take the second
    // copy, so the broker hands it to the other instance, which finds the claim held.
    let consumer = idempotent_consumer(&q, &dlx, counting(&calls, Duration::from_millis(1500)))
        .with_prefetch(1)
        .with_concurrency(1);
    let mut apps = Vec::new();
    for _ in 0..2 {
        let app = App::new(config.clone().with_redis_url(Some(redis_url())))
            .consumer(consumer.clone())
            .start()
            .await
            .expect("start");
        apps.push(app);
    }
    let sum = |f: fn(&reliable_mq::StatsSnapshot) -> u64| -> u64 {
        apps.iter().filter_map(|a| a.stats(&q)).map(|s| f(&s)).sum()
    };

    broker
        .publish_json("", &q, &serde_json::json!(42), "raced")
        .await;
    broker
        .publish_json("", &q, &serde_json::json!(42), "raced")
        .await;
    assert!(
        eventually(WAIT, || async {
            sum(|s| s.handled) == 1 && sum(|s| s.duplicates) == 1
        })
        .await,
        "{:?}",
        apps.iter().map(|a| a.stats(&q)).collect::<Vec<_>>()
    );
    assert_eq!(
        total(&calls),
        1,
        "exactly one handler call across both instances"
    );
    assert!(
        sum(|s| s.requeued) >= 1,
        "the second copy was requeued while the first ran"
    );
    assert_eq!(sum(|s| s.dead_lettered), 0);
    assert_eq!(sum(|s| s.retried), 0, "a held claim is not a failure");
    for app in apps {
        app.shutdown().await.expect("clean shutdown");
    }
    assert_eq!(broker.ready_count(&q).await, Some(0), "both copies acked");
    assert_eq!(
        broker.ready_count(&format!("{q}.retry.200ms")).await,
        Some(0)
    );
    assert_eq!(broker.ready_count(&format!("{q}.dlq")).await, Some(0));
    assert_eq!(total(&calls), 1);
    cleanup(&broker, &redis, &q, &dlx, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn done_keys_are_namespaced_with_the_configured_prefix_and_expire() {
    init_tracing();
    let (broker, redis) = (Broker::connect().await, Inspector::new());
    let q = unique("dedup-keys");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms", "1s", "2s", "4s"], &[])
        .redis_keys(&format!("rmq-test:{q}"));
    let prefix = unique("rmq-test-custom");
    // The store chosen from the configured Redis URL, as `REDIS_URL` would.
    let config = test_config(&q)
        .with_dedup_prefix(&prefix)
        .with_redis_url(Some(redis_url()));
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let consumer = ConsumerConfig::new(&q, &dlx, counting(&calls, Duration::ZERO))
        .with_retries(2, Duration::from_millis(200), RetryBackoff::Fixed)
        .idempotent(Duration::from_secs(90));
    let app = App::new(config)
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    for i in 0..3u64 {
        broker
            .publish_json("", &q, &serde_json::json!(i), &format!("id-{i}"))
            .await;
    }
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 3)
        })
        .await
    );
    let expected: Vec<String> = (0..3).map(|i| format!("{prefix}:/:{q}:id-{i}")).collect();
    assert_eq!(redis.keys(&format!("{prefix}:")).await, expected);
    for key in &expected {
        assert_eq!(redis.get(key).await.as_deref(), Some("done"), "{key}");
        let ttl = redis.pttl(key).await;
        assert!(
            ttl > 0 && ttl <= 90_000,
            "{key} expires with dedup_ttl: PTTL {ttl}"
        );
    }
    app.shutdown().await.expect("clean shutdown");
    cleanup(&broker, &redis, &q, &dlx, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_message_id_is_dead_lettered_with_the_reason() {
    init_tracing();
    let (broker, redis) = (Broker::connect().await, Inspector::new());
    let q = unique("dedup-noid");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms", "1s", "2s", "4s"], &[])
        .redis_keys(&format!("rmq-test:{q}"));
    let dlq = format!("{q}.dlq");
    let config = test_config(&q);
    let prefix = config.dedup_prefix.clone();
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let app = App::new(config)
        .with_dedup_store(RedisStore::new(&redis_url(), 4).expect("store"))
        .consumer(idempotent_consumer(
            &q,
            &dlx,
            counting(&calls, Duration::ZERO),
        ))
        .start()
        .await
        .expect("start");

    let json = BasicProperties::default().with_content_type("application/json".into());
    broker.publish_raw("", &q, b"1", json.clone()).await;
    broker
        .publish_raw("", &q, b"2", json.with_message_id("".into()))
        .await;
    for _ in 0..2 {
        let m = broker.get_within(&dlq, WAIT).await.expect("dead letter");
        assert_eq!(
            m.header("x-error-kind").as_deref(),
            Some("missing-message-id"),
            "{:?}",
            m.headers()
        );
        assert!(
            m.header("x-exception-message")
                .unwrap_or_default()
                .contains("message_id")
        );
        assert_eq!(m.header("x-original-queue").as_deref(), Some(q.as_str()));
    }
    assert_eq!(
        total(&calls),
        0,
        "the handler never ran without an id to dedup on"
    );
    assert!(redis.keys(&prefix).await.is_empty(), "no key was written");
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(broker.ready_count(&q).await, Some(0), "originals acked");
    cleanup(&broker, &redis, &q, &dlx, &prefix).await;
}

/// A RabbitMQ virtual host of its own (guest may use it), deleted with everything in it
/// when dropped, also when an assertion fails.
struct Vhost(String);

impl Vhost {
    fn create() -> Self {
        let name = unique("rmq-test-vhost");
        assert!(
            reliable_mq_tests::sh(&format!("rabbitmqctl -q add_vhost '{name}' >/dev/null")),
            "rabbitmqctl add_vhost"
        );
        let vhost = Self(name);
        assert!(
            reliable_mq_tests::sh(&format!(
                "rabbitmqctl -q set_permissions -p '{}' guest '.*' '.*' '.*' >/dev/null",
                vhost.0
            )),
            "rabbitmqctl set_permissions"
        );
        vhost
    }

    /// The test broker's URL with this vhost instead of the default one.
    fn url(&self) -> String {
        let base = reliable_mq_tests::amqp_url();
        let authority = base.rsplit_once('/').map_or(base.as_str(), |(a, _)| a);
        format!("{authority}/{}", self.0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        reliable_mq_tests::sh(&format!(
            "rabbitmqctl -q delete_vhost '{}' >/dev/null",
            self.0
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vhosts_sharing_redis_and_prefix_never_take_each_others_messages_for_duplicates() {
    // Two environments (a vhost each) on one Redis with the same dedup prefix: a message
    // handled in one must not make the same message_id a "duplicate" in the other.
    init_tracing();
    let (broker, redis) = (Broker::connect().await, Inspector::new());
    let vhost = Vhost::create();
    let q = unique("dedup-vhosts");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms", "1s", "2s", "4s"], &[])
        .redis_keys(&format!("rmq-test:{q}"));
    let config = test_config(&q).with_redis_url(Some(redis_url()));
    let prefix = config.dedup_prefix.clone();
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let consumer = idempotent_consumer(&q, &dlx, counting(&calls, Duration::ZERO));
    let mut apps = Vec::new();
    for url in [reliable_mq_tests::amqp_url(), vhost.url()] {
        let app = App::new(config.clone().with_amqp_url(url))
            .consumer(consumer.clone())
            .start()
            .await
            .expect("start");
        apps.push(app);
    }
    for app in &apps {
        app.publisher()
            .publish_with(
                "",
                &q,
                &7u64,
                reliable_mq::PublishOptions::with_message_id("same-id"),
            )
            .await
            .expect("published");
    }
    assert!(
        eventually(WAIT, || async {
            apps.iter()
                .all(|a| a.stats(&q).is_some_and(|s| s.handled == 1))
        })
        .await,
        "each environment handles its own copy: {:?}",
        apps.iter().map(|a| a.stats(&q)).collect::<Vec<_>>()
    );
    for app in &apps {
        assert_eq!(app.stats(&q).map(|s| s.duplicates), Some(0));
    }
    assert_eq!(total(&calls), 2);
    let keys = redis.keys(&format!("{prefix}:")).await;
    assert_eq!(
        keys,
        vec![
            format!("{prefix}:/:{q}:same-id"),
            format!("{prefix}:{}:{q}:same-id", vhost.0)
        ],
        "one done mark per vhost"
    );
    for app in apps {
        app.shutdown().await.expect("clean shutdown");
    }
    cleanup(&broker, &redis, &q, &dlx, &prefix).await;
}

/// Calls of `command` (lower case) the node has run, from `INFO commandstats` (through
/// `info`, the name `INFO` has on that node).
fn command_calls(redis: &reliable_mq_tests::redis::RedisNodes, info: &str, command: &str) -> u64 {
    let stats = redis
        .cli(&[info, "commandstats"])
        .expect("INFO commandstats");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn redis_7_takes_claims_as_native_commands_and_a_server_without_info_the_script() {
    // Per key: two claims at once (one acquires, one finds it held), the winner's done
    // mark, then a late claim that finds it done. Native claims are one `SET NX GET`
    // each, and only the done-mark script reads with `GET`; scripted claims `GET` first
    // and `SET` only when they acquire. Which form ran shows in the server's command
    // counts; the answers must be the same. Private nodes: the counts are theirs alone.
    const KEYS: u64 = 10;
    let native = reliable_mq_tests::redis::RedisNodes::one("rmq-dedup-native");
    // Some hosted Redis refuse `INFO`: the store cannot tell the version and scripts.
    let scripted = reliable_mq_tests::redis::RedisNodes::one_with(
        "rmq-dedup-scripted",
        &["--rename-command", "INFO", "info-for-tests"],
    );
    for (node, info, gets, sets) in [
        (&native, "INFO", KEYS, 4 * KEYS),
        (&scripted, "info-for-tests", 4 * KEYS, 2 * KEYS),
    ] {
        let s = Arc::new(RedisStore::new(&node.url(), 2).expect("valid URL"));
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..KEYS {
            let s = Arc::clone(&s);
            calls.spawn(async move {
                let key = format!("k{i}");
                let (a, b) = tokio::join!(s.claim(&key, "a", LEASE), s.claim(&key, "b", LEASE));
                let (a, b) = (a.expect("claim a"), b.expect("claim b"));
                let winner = match (a, b) {
                    (Claim::Acquired, Claim::Held) => "a",
                    (Claim::Held, Claim::Acquired) => "b",
                    other => panic!("exactly one claim acquires: {other:?}"),
                };
                assert_eq!(s.complete(&key, winner, TTL).await.ok(), Some(true));
                assert_eq!(s.claim(&key, "late", LEASE).await.ok(), Some(Claim::Done));
            });
        }
        while let Some(r) = calls.join_next().await {
            r.expect("the protocol's answers");
        }
        assert_eq!(
            (
                command_calls(node, info, "get"),
                command_calls(node, info, "set")
            ),
            (gets, sets),
            "GET and SET calls on the node reached with {info}"
        );
    }
}

#[tokio::test]
async fn redis_batches_load_their_scripts_again_after_a_script_flush() {
    // A restarted Redis (or `SCRIPT FLUSH`) no longer knows the batched scripts: the next
    // batch, claims and done marks in one pipeline, loads them and goes through. A private
    // node: flushing the machine's Redis would touch other users' scripts.
    let redis = reliable_mq_tests::redis::RedisNodes::one("rmq-dedup-flush");
    let s = Arc::new(RedisStore::new(&redis.url(), 2).expect("valid URL"));
    for round in 0..3 {
        assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).as_deref(), Some("OK"));
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..20 {
            let s = Arc::clone(&s);
            calls.spawn(async move {
                let (key, token) = (format!("k{round}-{i}"), format!("t{i}"));
                assert_eq!(
                    s.claim(&key, &token, LEASE).await.ok(),
                    Some(Claim::Acquired)
                );
                // Sent while other claims are still queued: one pipeline holds both.
                assert_eq!(s.complete(&key, &token, TTL).await.ok(), Some(true));
                assert_eq!(s.claim(&key, "late", LEASE).await.ok(), Some(Claim::Done));
            });
        }
        while let Some(r) = calls.join_next().await {
            r.expect("every call answered as without the flush");
        }
    }
}
