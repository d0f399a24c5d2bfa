//! The options users of clusters ask for, on the real broker: `single_active_consumer`
//! (the queue argument `x-single-active-consumer`), `priority` (the consumer argument
//! `x-priority`) and `exclusive` (an exclusive subscription). Each test runs two
//! instances of one consumer, as two services would, and checks both what the broker
//! reports and which instance got the messages.

use std::time::Duration;

use reliable_mq::{App, ConsumerConfig, Error, HandlerError, RunningApp, handler_fn};
use reliable_mq_tests::{Broker, Cleanup, eventually, init_tracing, test_config, unique};

const TIERS: &[&str] = &["1s", "2s", "4s"];

fn consumer(queue: &str) -> ConsumerConfig {
    ConsumerConfig::new(
        queue,
        format!("{queue}.dlx"),
        handler_fn(|_n: u64| async move { Ok::<_, HandlerError>(()) }),
    )
}

async fn start(queue: &str, config: ConsumerConfig) -> RunningApp {
    App::new(test_config(queue))
        .consumer(config)
        .start()
        .await
        .expect("the app starts")
}

fn handled(app: &RunningApp, queue: &str) -> u64 {
    app.stats(queue).map_or(0, |s| s.handled)
}

/// `rabbitmqctl` output for `queue`'s lines of a listing.
fn rabbitmqctl_lines(args: &[&str], queue: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(queue))
        .map(str::to_owned)
        .collect()
}

async fn publish(broker: &Broker, queue: &str, n: u64) {
    for i in 0..n {
        broker
            .publish_json("", queue, &serde_json::json!(i), &unique("opt"))
            .await;
    }
}

/// Both instances subscribe; the broker hands every message to the one active consumer
/// and keeps the other on standby; stopping the active one promotes the standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_active_consumer_gives_the_queue_to_one_instance() {
    init_tracing();
    let queue = unique("rmq-test-sac");
    let _cleanup = Cleanup::consumer(&queue, TIERS, &[]);
    let first = start(&queue, consumer(&queue).with_single_active_consumer()).await;
    let second = start(&queue, consumer(&queue).with_single_active_consumer()).await;

    let args = rabbitmqctl_lines(&["list_queues", "name", "arguments"], &queue);
    assert!(
        args.iter()
            .any(|l| l.contains("x-single-active-consumer") && l.contains("true")),
        "the queue is declared with x-single-active-consumer: {args:?}"
    );
    let subscribed = eventually(Duration::from_secs(10), || async {
        rabbitmqctl_lines(&["list_consumers", "queue_name"], &queue).len() == 2
    })
    .await;
    assert!(subscribed, "both instances subscribed (one on standby)");

    let broker = Broker::connect().await;
    publish(&broker, &queue, 20).await;
    let all = eventually(Duration::from_secs(10), || async {
        handled(&first, &queue) + handled(&second, &queue) == 20
    })
    .await;
    let (a, b) = (handled(&first, &queue), handled(&second, &queue));
    assert!(all, "20 handled: {a} + {b}");
    assert!(
        a == 0 || b == 0,
        "one instance handled everything: {a} and {b}"
    );

    // The active one leaves: the standby takes over.
    let (active, standby) = if a > 0 {
        (first, second)
    } else {
        (second, first)
    };
    active.shutdown().await.expect("clean shutdown");
    publish(&broker, &queue, 5).await;
    let took_over = eventually(Duration::from_secs(10), || async {
        handled(&standby, &queue) == 5
    })
    .await;
    standby.shutdown().await.expect("clean shutdown");
    assert!(took_over, "the standby handled the next 5");
}

/// The queue exists without the argument: adding `single_active_consumer` is a changed
/// queue argument, refused by the broker; start-up stops with a mismatch naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_active_consumer_on_an_existing_queue_is_a_mismatch() {
    init_tracing();
    let queue = unique("rmq-test-sac-mismatch");
    let _cleanup = Cleanup::consumer(&queue, TIERS, &[]);
    let plain = start(&queue, consumer(&queue)).await;
    plain.shutdown().await.expect("clean shutdown");
    let refused = App::new(test_config(&queue))
        .consumer(consumer(&queue).with_single_active_consumer())
        .start()
        .await;
    match refused {
        Err(Error::TopologyMismatch { object, reason }) => {
            assert!(object.contains(&queue), "names the queue: {object}");
            assert!(
                reason.contains("x-single-active-consumer"),
                "names the argument: {reason}"
            );
        }
        Err(other) => panic!("expected a topology mismatch, got {other}"),
        Ok(app) => {
            let _ = app.shutdown().await;
            panic!("a changed queue argument must stop start-up");
        }
    }
}

/// The broker delivers to the higher-priority consumer while it has room in its
/// prefetch window: with fewer messages than the window, it gets all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_prefers_the_higher_priority_instance() {
    init_tracing();
    let queue = unique("rmq-test-priority");
    let _cleanup = Cleanup::consumer(&queue, TIERS, &[]);
    let low = start(&queue, consumer(&queue)).await;
    let high = start(&queue, consumer(&queue).with_priority(10)).await;

    // One look that sees both subscriptions and the argument (a rabbitmqctl call on a
    // busy machine can come back empty, so never assert on a second, separate look).
    let mut seen = Vec::new();
    let subscribed = eventually(Duration::from_secs(20), || {
        let lines = rabbitmqctl_lines(&["list_consumers", "queue_name", "arguments"], &queue);
        let ok = lines.len() == 2
            && lines
                .iter()
                .any(|l| l.contains("x-priority") && l.contains("10"));
        seen = lines;
        async move { ok }
    })
    .await;
    assert!(
        subscribed,
        "both instances subscribed, one with x-priority 10: {seen:?}"
    );

    let broker = Broker::connect().await;
    publish(&broker, &queue, 20).await;
    let all = eventually(Duration::from_secs(10), || async {
        handled(&high, &queue) + handled(&low, &queue) == 20
    })
    .await;
    let (h, l) = (handled(&high, &queue), handled(&low, &queue));
    low.shutdown().await.expect("clean shutdown");
    high.shutdown().await.expect("clean shutdown");
    assert!(all, "20 handled: {h} + {l}");
    assert_eq!(
        (h, l),
        (20, 0),
        "the priority 10 instance got every message"
    );
}

/// An exclusive subscription keeps the other instance out: its subscription is refused
/// and retried, so it gets nothing (and its start-up, which waits for every consumer to
/// attach, does not return) while the first one lasts; it takes over once that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_keeps_other_instances_out() {
    init_tracing();
    let queue = unique("rmq-test-exclusive");
    let _cleanup = Cleanup::consumer(&queue, TIERS, &[]);
    let owner = start(&queue, consumer(&queue).exclusive()).await;
    let other = {
        let queue = queue.clone();
        tokio::spawn(async move { start(&queue, consumer(&queue).exclusive()).await })
    };

    let broker = Broker::connect().await;
    publish(&broker, &queue, 10).await;
    let all = eventually(Duration::from_secs(10), || async {
        handled(&owner, &queue) == 10
    })
    .await;
    assert!(all, "the owner handled all 10");
    // One look can come back empty while the CLI is slow on a loaded machine: look again
    // for a while, and keep the last answer for the assertions.
    let look = || rabbitmqctl_lines(&["list_consumers", "queue_name", "activity_status"], &queue);
    let mut consumers = look();
    for _ in 0..20 {
        if consumers.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        consumers = look();
    }
    assert_eq!(consumers.len(), 1, "one subscription: {consumers:?}");
    assert!(
        consumers[0].contains("exclusive"),
        "exclusive: {consumers:?}"
    );
    assert!(!other.is_finished(), "the other instance never attached");

    owner.shutdown().await.expect("clean shutdown");
    let other = tokio::time::timeout(Duration::from_secs(30), other)
        .await
        .expect("the other instance attaches once the owner is gone")
        .expect("its start-up task");
    publish(&broker, &queue, 3).await;
    let took_over = eventually(Duration::from_secs(10), || async {
        handled(&other, &queue) == 3
    })
    .await;
    other.shutdown().await.expect("clean shutdown");
    assert!(
        took_over,
        "the other instance took over once the owner left"
    );
}

/// Order holds only until a message fails: its retry goes through the wait tier and comes
/// back behind the messages published meanwhile (the in-memory twin of this test is in
/// `tests/no_broker.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_active_consumer_keeps_order_until_a_message_fails() {
    use std::sync::{Arc, Mutex};

    use reliable_mq::{Delivery, RetryBackoff, delivery_handler_fn};

    init_tracing();
    let queue = unique("rmq-test-sac-order");
    let _cleanup = Cleanup::consumer(&queue, &["1s"], &[]);
    let seen: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let s = Arc::clone(&seen);
    let handler = delivery_handler_fn(move |n: u64, d: Arc<Delivery>| {
        let s = Arc::clone(&s);
        async move {
            s.lock()
                .map_err(|_| HandlerError::retry("poisoned"))?
                .push((n, d.attempt()));
            if n == 1 && d.attempt() == 1 {
                return Err(HandlerError::retry("the first attempt fails"));
            }
            Ok(())
        }
    });
    let app = start(
        &queue,
        ConsumerConfig::new(&queue, format!("{queue}.dlx"), handler)
            .with_retries(1, Duration::from_secs(1), RetryBackoff::Fixed)
            .with_single_active_consumer(),
    )
    .await;
    let broker = Broker::connect().await;
    // Four confirmed publishes take milliseconds, the retry tier a second: a margin
    // against a loaded machine, where the order would otherwise depend on timing.
    publish(&broker, &queue, 4).await;
    let all = eventually(Duration::from_secs(10), || async {
        handled(&app, &queue) == 4
    })
    .await;
    app.shutdown().await.expect("clean shutdown");
    assert!(all, "4 handled");
    assert_eq!(
        seen.lock().map(|v| v.clone()).unwrap_or_default(),
        [(0, 1), (1, 1), (2, 1), (3, 1), (1, 2)],
        "in order until 1 failed; its retry came back after 2 and 3"
    );
}
