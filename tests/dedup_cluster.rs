//! `RedisClusterStore` on a real Redis Cluster: each test starts its own 3-primary cluster
//! on loopback (`reliable_mq_tests::redis`: free ports and bus ports, a temp dir for the
//! node files) with the machine's `redis-server` and `redis-cli`, and shuts it down in a
//! drop guard, even when the test fails. The Redis on 6379 is never touched.
//!
//! The claim protocol runs on keys owned by every primary (so the scripts are routed by
//! slot, and loaded on each node), then one idempotent consumer configured with
//! `REDIS_URL=redis+cluster://...` through `App` handles a message id once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool_redis::redis::{self, AsyncCommands};
use reliable_mq::dedup::{self, Claim, DedupStore, RedisClusterStore};
use reliable_mq::{App, ConsumerConfig, HandlerError, RetryBackoff, handler_fn};
use reliable_mq_tests::redis::{RedisNodes, free_ports};
use reliable_mq_tests::{Broker, Cleanup, eventually, init_tracing, test_config, unique};

const WAIT: Duration = Duration::from_secs(15);
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

/// A private 3-primary Redis Cluster; shut down and its directory removed on drop.
struct RedisCluster {
    nodes: RedisNodes,
    ports: [u16; 3],
}

impl RedisCluster {
    /// Start the nodes, create the cluster and wait until every node says it is ok.
    fn start() -> Self {
        let ports = free_ports(true);
        // From here on the guard cleans up whatever got started.
        let cluster = Self {
            nodes: RedisNodes::new("rmq-redis-cluster", &ports),
            ports,
        };
        cluster.nodes.start_cluster_nodes(None);
        for p in ports {
            cluster.nodes.wait_ours(p);
        }
        cluster.nodes.create_cluster(&[]);
        cluster
    }

    fn node_urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The `REDIS_URL` of this cluster.
    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// A cluster connection of its own, to inspect what the store wrote.
    async fn inspector(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.node_urls())
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("cluster connection")
    }

    /// A plain (non-cluster) connection to one node: it refuses keys it does not own.
    async fn node(&self, port: u16) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("node connection")
    }

    /// The port of the primary owning `key`.
    async fn owner(&self, key: &str) -> u16 {
        for p in self.ports {
            let owned: redis::RedisResult<i64> = self.node(p).await.exists(key).await;
            if owned.is_ok() {
                return p;
            }
        }
        panic!("no node owns {key}");
    }
}

async fn start_cluster() -> RedisCluster {
    tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("cluster start-up")
}

async fn get(c: &mut redis::cluster_async::ClusterConnection, key: &str) -> Option<String> {
    c.get(key).await.expect("GET")
}

async fn pttl(c: &mut redis::cluster_async::ClusterConnection, key: &str) -> i64 {
    c.pttl(key).await.expect("PTTL")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_claim_protocol_on_keys_owned_by_every_primary() {
    let cluster = start_cluster().await;
    let store = RedisClusterStore::new(&cluster.node_urls(), 4).expect("cluster store");
    store.ping().await.expect("every primary answers PING");
    let mut inspect = cluster.inspector().await;
    let prefix = unique("rmq-test:cluster");

    // Two keys per primary: the scripts run on all three nodes.
    let mut keys: Vec<(String, u16)> = Vec::new();
    let mut per_node: HashMap<u16, usize> = HashMap::new();
    for i in 0..300 {
        let k = dedup::KeyScope::new(&prefix, "/").key("q", &format!("m-{i}"));
        let owner = cluster.owner(&k).await;
        let n = per_node.entry(owner).or_insert(0);
        if *n < 2 {
            *n += 1;
            keys.push((k, owner));
        }
        if keys.len() == 6 {
            break;
        }
    }
    assert_eq!(keys.len(), 6, "keys on every primary: {per_node:?}");

    for (k, owner) in &keys {
        assert_eq!(
            store.claim(k, "t1", LEASE).await.ok(),
            Some(Claim::Acquired)
        );
        assert_eq!(get(&mut inspect, k).await.as_deref(), Some("t1"));
        let plain: Option<String> = cluster.node(*owner).await.get(k).await.expect("GET");
        assert_eq!(plain.as_deref(), Some("t1"), "{k} lives on node {owner}");
        let lease_left = pttl(&mut inspect, k).await;
        assert!(
            lease_left > 0 && lease_left <= 30_000,
            "lease as TTL: {lease_left}"
        );
        assert_eq!(store.claim(k, "t2", LEASE).await.ok(), Some(Claim::Held));

        // Only the holder renews, completes or releases.
        assert_eq!(store.renew(k, "t2", TTL).await.ok(), Some(false));
        assert!(pttl(&mut inspect, k).await <= 30_000);
        assert_eq!(
            store.renew(k, "t1", Duration::from_secs(600)).await.ok(),
            Some(true)
        );
        assert!(pttl(&mut inspect, k).await > 30_000, "lease renewed");
        assert_eq!(store.complete(k, "t2", TTL).await.ok(), Some(false));
        assert_eq!(store.release(k, "t2").await.ok(), Some(false));
        assert_eq!(get(&mut inspect, k).await.as_deref(), Some("t1"));
        assert_eq!(store.release(k, "t1").await.ok(), Some(true));
        assert_eq!(pttl(&mut inspect, k).await, -2, "released: the key is gone");

        // The retry claims afresh; the stale holder can no longer complete.
        assert_eq!(
            store.claim(k, "t3", LEASE).await.ok(),
            Some(Claim::Acquired)
        );
        assert_eq!(store.complete(k, "t1", TTL).await.ok(), Some(false));
        assert_eq!(store.complete(k, "t3", TTL).await.ok(), Some(true));
        assert_eq!(get(&mut inspect, k).await.as_deref(), Some("done"));
        let ttl_left = pttl(&mut inspect, k).await;
        assert!(
            ttl_left > 30_000 && ttl_left <= 3_600_000,
            "done TTL: {ttl_left}"
        );

        // A done mark is not a claim.
        assert_eq!(store.claim(k, "t4", LEASE).await.ok(), Some(Claim::Done));
        assert_eq!(store.renew(k, "t3", LEASE).await.ok(), Some(false));
        assert_eq!(store.release(k, "t3").await.ok(), Some(false));
        assert_eq!(store.complete(k, "t4", TTL).await.ok(), Some(false));
        assert_eq!(get(&mut inspect, k).await.as_deref(), Some("done"));
    }

    // A key that was never claimed is not resurrected by a renew; a gone claim completes.
    let gone = dedup::KeyScope::new(&prefix, "/").key("q", "never-claimed");
    assert_eq!(store.renew(&gone, "t1", LEASE).await.ok(), Some(false));
    assert_eq!(pttl(&mut inspect, &gone).await, -2);
    assert_eq!(store.complete(&gone, "t1", TTL).await.ok(), Some(true));
    assert_eq!(get(&mut inspect, &gone).await.as_deref(), Some("done"));

    // Concurrent claims of one key: exactly one winner.
    let store = Arc::new(store);
    let k = dedup::KeyScope::new(&prefix, "/").key("q", "raced");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..32 {
        let (s, k) = (Arc::clone(&store), k.clone());
        tasks.spawn(async move { s.claim(&k, &format!("t{i}"), LEASE).await });
    }
    let mut outcomes = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        let claim = r.expect("task").expect("claim");
        *outcomes.entry(format!("{claim:?}")).or_insert(0) += 1;
    }
    assert_eq!(outcomes.get("Acquired"), Some(&1), "{outcomes:?}");
    assert_eq!(outcomes.get("Held"), Some(&31), "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_unreachable_is_an_error_never_a_decision() {
    // Nothing listens on port 1: every operation must fail, not guess.
    let s = RedisClusterStore::new(&["redis://127.0.0.1:1"], 2).expect("lazy pool");
    assert!(s.ping().await.is_err());
    assert!(s.claim("k", "t", LEASE).await.is_err());
    assert!(s.complete("k", "t", TTL).await.is_err());
    assert!(s.release("k", "t").await.is_err());
    assert!(s.renew("k", "t", LEASE).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_redis_url_the_same_message_id_twice_runs_the_handler_once() {
    init_tracing();
    let cluster = start_cluster().await;
    let broker = Broker::connect().await;
    let q = unique("dedup-cluster");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms", "1s", "2s", "4s"], &[]);
    // No explicit store: App picks the cluster store from REDIS_URL.
    let config = test_config(&q).with_redis_url(Some(cluster.url()));
    let prefix = config.dedup_prefix.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        handler_fn(move |_n: u64| {
            let calls = Arc::clone(&calls);
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        })
    };
    let app = App::new(config)
        .consumer(
            ConsumerConfig::new(&q, &dlx, handler)
                .with_retries(2, Duration::from_millis(200), RetryBackoff::Fixed)
                .idempotent(Duration::from_secs(600)),
        )
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
        .await,
        "{:?}",
        app.stats(&q)
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
    assert_eq!(calls.load(Ordering::SeqCst), 1, "handler ran once");
    assert_eq!((stats.received, stats.handled, stats.duplicates), (2, 1, 1));
    assert_eq!(stats.dead_lettered, 0);
    assert!(app.health().await.dedup_up, "the cluster store answers");
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(broker.ready_count(&q).await, Some(0), "both copies acked");
    assert_eq!(broker.ready_count(&format!("{q}.dlq")).await, Some(0));

    let k = dedup::KeyScope::new(&prefix, "/").key(&q, "same-id");
    let mut inspect = cluster.inspector().await;
    assert_eq!(
        get(&mut inspect, &k).await.as_deref(),
        Some("done"),
        "done mark in the cluster"
    );
}
