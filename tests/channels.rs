//! Consumers share connections: each gets a channel on the consumers' connection, so an
//! app with many consumers opens two connections (consuming, publishing), not one per
//! consumer. A failure of one consumer's channel restarts that consumer alone; a lost
//! connection restarts every consumer on it, and nothing is lost or acked on a stale
//! channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_mq::{App, ConsumerConfig, HandlerError, RunningApp, handler_fn};
use reliable_mq_tests::{
    Broker, Cleanup, close_connections_named, eventually, init_tracing, test_config, unique,
};

const TIERS: &[&str] = &["1s", "2s", "4s"];
const CONSUMERS: usize = 12;

type Calls = Arc<Mutex<HashMap<String, usize>>>;

fn consumer(queue: &str, calls: &Calls) -> ConsumerConfig {
    let calls = Arc::clone(calls);
    ConsumerConfig::new(
        queue,
        format!("{queue}.dlx"),
        handler_fn(move |id: String| {
            let calls = Arc::clone(&calls);
            async move {
                *calls.lock().expect("calls").entry(id).or_insert(0) += 1;
                Ok::<_, HandlerError>(())
            }
        }),
    )
}

/// Connections the broker lists under `name` (our connections are named
/// `{connection_name} ({role})`).
fn connections_named(name: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(name))
        .count()
}

fn sessions(app: &RunningApp, queue: &str) -> u64 {
    app.stats(queue).map_or(0, |s| s.sessions)
}

struct Fixture {
    name: String,
    queues: Vec<String>,
    _cleanup: Vec<Cleanup>,
    calls: Calls,
    app: RunningApp,
    broker: Broker,
}

async fn fixture(base: &str) -> Fixture {
    init_tracing();
    let name = unique(base);
    let queues: Vec<String> = (0..CONSUMERS).map(|i| format!("{name}-q{i}")).collect();
    let cleanup = queues
        .iter()
        .map(|q| Cleanup::consumer(q, TIERS, &[]))
        .collect();
    let calls = Calls::default();
    let mut app = App::new(test_config(&name).with_connection_name(name.clone()));
    for q in &queues {
        app = app.consumer(consumer(q, &calls));
    }
    let app = app.start().await.expect("the app starts");
    Fixture {
        name,
        queues,
        _cleanup: cleanup,
        calls,
        app,
        broker: Broker::connect().await,
    }
}

impl Fixture {
    async fn publish_to_all(&self, tag: &str) -> Vec<String> {
        let mut ids = Vec::new();
        for q in &self.queues {
            let id = format!("{q}-{tag}");
            self.broker
                .publish_json("", q, &serde_json::json!(id), &id)
                .await;
            ids.push(id);
        }
        ids
    }

    async fn all_handled(&self, ids: &[String]) -> bool {
        eventually(Duration::from_secs(20), || async {
            let calls = self.calls.lock().expect("calls");
            ids.iter().all(|id| calls.contains_key(id))
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_consumers_share_one_consuming_connection() {
    let f = fixture("rmq-test-channels").await;
    let ids = f.publish_to_all("a").await;
    assert!(
        f.all_handled(&ids).await,
        "every consumer handles its message"
    );
    let open = connections_named(&f.name);
    f.app.shutdown().await.expect("clean shutdown");
    assert_eq!(
        open, 2,
        "{CONSUMERS} consumers: one consuming and one publishing connection"
    );
    let after = eventually(Duration::from_secs(5), || async {
        connections_named(&f.name) == 0
    })
    .await;
    assert!(after, "shutdown closes both");
}

/// Deleting one consumer's queue cancels its subscription on its channel: that consumer
/// starts a new session (redeclaring the queue), the others keep theirs, and the shared
/// connection stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_failure_restarts_only_its_consumer() {
    let f = fixture("rmq-test-channels-one").await;
    let victim = &f.queues[0];
    f.broker.delete(&[victim.as_str()], &[]).await;
    let restarted = eventually(Duration::from_secs(20), || async {
        sessions(&f.app, victim) == 2
    })
    .await;
    let ids = f.publish_to_all("b").await;
    let handled = f.all_handled(&ids).await;
    let others: Vec<u64> = f.queues[1..].iter().map(|q| sessions(&f.app, q)).collect();
    let open = connections_named(&f.name);
    f.app.shutdown().await.expect("clean shutdown");
    assert!(
        restarted,
        "the consumer of the deleted queue started a new session"
    );
    assert!(
        handled,
        "every consumer, the restarted one too, handles its message"
    );
    assert!(
        others.iter().all(|&s| s == 1),
        "the other consumers kept their first session: {others:?}"
    );
    assert_eq!(open, 2, "no connection was reopened");
}

/// The broker closes the consumers' connection: every consumer resumes on a reopened
/// one; messages published meanwhile and those unacked at the cut are all handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_restarts_every_consumer_on_it() {
    let f = fixture("rmq-test-channels-all").await;
    let before = f.publish_to_all("c").await;
    assert!(f.all_handled(&before).await, "handled before the cut");
    let closed = close_connections_named(&format!("{} (consumers)", f.name));
    assert_eq!(closed, 1, "one consuming connection to close");
    let during = f.publish_to_all("d").await;
    let resumed = eventually(Duration::from_secs(30), || async {
        f.queues.iter().all(|q| sessions(&f.app, q) >= 2)
    })
    .await;
    let handled = f.all_handled(&during).await;
    let open = connections_named(&f.name);
    f.app.shutdown().await.expect("clean shutdown");
    assert!(resumed, "every consumer started a new session");
    assert!(handled, "every message published across the cut is handled");
    assert_eq!(
        open, 2,
        "the consuming connection was reopened once, not per consumer"
    );
    for q in &f.queues {
        assert_eq!(reliable_mq_tests::message_total(q), Some(0), "{q} drained");
    }
}
