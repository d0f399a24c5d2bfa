//! The cluster suite: a private 3-node RabbitMQ cluster (`scripts/rabbitmq-cluster.sh`,
//! beside the machine's default node, which it never touches), a consumer process and a
//! publisher given all three addresses, 3,000 messages per scenario, and a node failing
//! mid-stream (killed, stopped and restarted one by one, or cut off by a network
//! partition). The checker of `support/fault.rs` counts every message.
//!
//! The partition scenario runs each node in its own network namespace (root and iproute2;
//! skipped with its reason without them). `first_publish_after_the_leaders_node_died_is_confirmed`
//! is the publisher's side of a node failure, without a stream.
//!
//! Opt-in with `RELIABLE_MQ_CLUSTER=1` (`.ci/run` sets it): each test starts its own
//! cluster (20-40 s) and removes it when it ends, also when it fails. The tests share node
//! names and ports, so they run one at a time.
//!
//! Run: `RELIABLE_MQ_CLUSTER=1 cargo test -p reliable-mq-tests --test cluster -- --nocapture`;
//! each scenario prints its row (also appended to target/fault-report.md).

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reliable_mq::Publisher;
use reliable_mq_tests::cluster::{CLUSTER_LOCK, Cluster};
use reliable_mq_tests::fault::{
    Ledger, Report, Worker, WorkerOptions, drain_ids, log_path, produce_while, read_log,
    time_to_resume, wait_settled,
};
use reliable_mq_tests::{Cleanup, eventually, init_tracing, test_config, unique};

/// Messages per scenario: at least these; a stream that goes on through its fault
/// continues until the fault is over, up to `MAX_MESSAGES`.
const MESSAGES: usize = 3000;
/// Where a stream that goes on through its fault ends at the latest.
const MAX_MESSAGES: usize = 8 * MESSAGES;
/// When the fault strikes, after the stream starts.
const FAULT_AT: Duration = Duration::from_secs(3);
/// Handlers in flight in the consumer process; also the bound on duplicate calls that
/// dedup cannot absorb (a handler done, its `done` mark or ack lost with the connection).
const CONCURRENCY: u16 = 8;

/// How long until a message published after `since_index` is handled: the time from a
/// fault until consumption resumes end to end (publisher, broker and consumer), which the
/// prefetched backlog cannot fake.
async fn time_to_handle_after(
    log: &Path,
    since_index: usize,
    t0: Instant,
    within: Duration,
) -> Option<Duration> {
    while t0.elapsed() < within {
        let calls = read_log(log);
        if calls.keys().any(|id| {
            id.strip_prefix("m-")
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n > since_index)
        }) {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn attempted(ledger: &Arc<Mutex<Ledger>>) -> usize {
    ledger.lock().map(|l| l.attempted.len()).unwrap_or(0)
}

/// What a fault sees: the cluster, the queue, the consumer's connection name, the log and
/// the producer's ledger (to time the resumption).
struct Ctx {
    cluster: Arc<Cluster>,
    queue: String,
    conn_name: String,
    log: std::path::PathBuf,
    ledger: Arc<Mutex<Ledger>>,
    /// The stream's end, once the producer has sent `MESSAGES`.
    stream_end: Arc<StreamEnd>,
}

/// Where a scenario's stream ends: after `MESSAGES`, or, when it goes on through its
/// fault, once the fault is over. The cluster's tools (`rabbitmqctl`) take seconds each
/// on a busy machine, so a fixed-length stream could end before a fault that first looks
/// up its target strikes, leaving no resumption to measure.
struct StreamEnd {
    through_the_fault: bool,
    fault_over: AtomicBool,
}

impl StreamEnd {
    /// Whether message `i` is part of the stream.
    fn includes(&self, i: usize) -> bool {
        i < MESSAGES
            || (self.through_the_fault
                && !self.fault_over.load(Ordering::SeqCst)
                && i < MAX_MESSAGES)
    }
}

impl Ctx {
    /// The node the consumer process's consuming connection is on.
    fn consumer_node(&self) -> Option<usize> {
        self.cluster
            .connection_node(&format!("{} (consumer", self.conn_name))
            .or_else(|| self.cluster.connection_node(&self.conn_name))
    }

    /// Whether the producer has messages left to publish.
    fn streaming(&self) -> bool {
        self.stream_end.includes(attempted(&self.ledger))
    }

    /// Time from now until a message published from now on is handled (`None` if it does
    /// not happen, or if the stream is already over and there is nothing to wait for).
    async fn resume_from_now(&self) -> Option<Duration> {
        if !self.streaming() {
            return None;
        }
        let since = attempted(&self.ledger);
        time_to_handle_after(&self.log, since, Instant::now(), Duration::from_secs(90)).await
    }
}

/// One scenario's stream and set-up.
struct Scenario<'a> {
    /// In the queue's name.
    slug: &'a str,
    /// In the report.
    name: &'a str,
    /// A quorum queue (else classic).
    quorum: bool,
    /// Messages per second.
    rate: u32,
    /// Work per message in the consumer process.
    handler_ms: u64,
    /// Publishes that must be confirmed.
    min_confirmed: usize,
    /// Each node in its own network namespace, so that one can be cut off; the consumer
    /// process and the publisher then use a 5 s heartbeat, so that they notice a silent
    /// node within seconds rather than the default 20 s heartbeat's 40.
    partitionable: bool,
    /// The stream goes on until the fault is over (else it ends after `MESSAGES`).
    through_the_fault: bool,
}

/// The AMQP heartbeat of the partition scenario's clients.
const PARTITION_HEARTBEAT: Duration = Duration::from_secs(5);

/// Run one scenario on a fresh cluster: a consumer process (a quorum or a classic queue,
/// `handler_ms` of work per message) and `rate` messages per second, `fault` mid-stream
/// (it returns the time to resume), then settle and check.
async fn run<F, Fut>(scenario: Scenario<'_>, fault: F) -> Report
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Option<Duration>>,
{
    let Scenario {
        slug,
        name,
        quorum,
        rate,
        handler_ms,
        min_confirmed,
        partitionable,
        through_the_fault,
    } = scenario;
    init_tracing();
    let _serial = CLUSTER_LOCK.lock().await;
    let queue = unique(&format!("cluster-{slug}"));
    // The broker objects go with the cluster's data; only the Redis keys need cleaning.
    let _cleanup = Cleanup::default().redis_keys(&format!("reliable-mq:/:{queue}"));
    let cluster = Arc::new(if partitionable {
        Cluster::start_partitionable()
    } else {
        Cluster::start()
    });
    let broker = cluster.broker().await.expect("a cluster node accepts");
    let log = log_path(&queue);
    let conn_name = format!("fault-{queue}");
    let options = WorkerOptions {
        bin: env!("CARGO_BIN_EXE_fault_worker").into(),
        queue: queue.clone(),
        log: log.clone(),
        handler_ms,
        concurrency: CONCURRENCY,
        idempotent: true,
    };
    let queue_type = if quorum { "quorum" } else { "classic" };
    let mut env = vec![
        ("AMQP_URL", cluster.url()),
        ("FAULT_QUEUE_TYPE", queue_type.to_owned()),
    ];
    if partitionable {
        env.push((
            "RELIABLE_MQ_HEARTBEAT",
            format!("{}s", PARTITION_HEARTBEAT.as_secs()),
        ));
    }
    let worker = Worker::spawn_with_env(&options, &env);
    assert!(
        eventually(Duration::from_secs(60), || broker.queue_exists(&queue)).await,
        "worker declared its queue"
    );
    let ctx = Ctx {
        cluster: Arc::clone(&cluster),
        queue: queue.clone(),
        conn_name,
        log: log.clone(),
        ledger: Arc::new(Mutex::new(Ledger::default())),
        stream_end: Arc::new(StreamEnd {
            through_the_fault,
            fault_over: AtomicBool::new(false),
        }),
    };
    assert!(
        eventually(Duration::from_secs(30), || async {
            ctx.consumer_node().is_some()
        })
        .await,
        "the consumer's connection is listed"
    );

    if quorum {
        // Leader and consumer on different nodes, so that each scenario breaks one thing.
        let consumer = ctx.consumer_node().expect("consumer node");
        let leader = cluster.leader(&queue);
        eprintln!("{name}: consumer on node {consumer}, leader on {leader:?}");
        if leader == Some(consumer) {
            assert!(cluster.move_leader_off(&queue, consumer), "leader moved");
            assert!(cluster.await_members(&queue, Duration::from_secs(60)).await);
        }
        assert!(
            eventually(Duration::from_secs(30), || async {
                cluster.leader(&queue).is_some_and(|l| l != consumer)
            })
            .await,
            "the leader is on another node than the consumer"
        );
    }

    let mut config = test_config(&queue)
        .with_amqp_url(cluster.url())
        .with_publish_retries(120)
        .with_connection_name(format!("fault-producer-{queue}"));
    if partitionable {
        config = config.with_heartbeat(PARTITION_HEARTBEAT);
    }
    let publisher = Publisher::from_config(&config).await.expect("publisher");
    let producer = {
        let (publisher, queue, ledger, end) = (
            publisher.clone(),
            queue.clone(),
            Arc::clone(&ctx.ledger),
            Arc::clone(&ctx.stream_end),
        );
        tokio::spawn(async move {
            produce_while(&publisher, &queue, "m", rate, &ledger, |i| end.includes(i)).await
        })
    };
    tokio::time::sleep(FAULT_AT).await;
    let ledger = Arc::clone(&ctx.ledger);
    let stream_end = Arc::clone(&ctx.stream_end);
    let resume = fault(ctx).await;
    stream_end.fault_over.store(true, Ordering::SeqCst);

    producer.await.expect("producer");
    let broker = cluster.broker().await.expect("a cluster node accepts");
    wait_settled(&broker, &queue, &log, &ledger, Duration::from_secs(120)).await;
    let status = worker.terminate();
    assert!(status.success(), "worker exits 0 on SIGTERM: {status:?}");
    let dead = drain_ids(&broker, &format!("{queue}.dlq")).await;
    let calls = read_log(&log);
    let report = {
        let ledger = ledger.lock().expect("ledger");
        Report::check(&format!("cluster: {name}"), &ledger, &calls, &dead, resume)
    };
    report.publish();
    publisher.close().await;

    assert!(
        report.confirmed >= min_confirmed,
        "at least {min_confirmed} publishes confirmed: {report:?}"
    );
    report.assert_nothing_lost_and_resumed();
    // Dedup absorbs redeliveries whose handler finished; what it cannot absorb is a
    // handler whose side effect was done when its connection died, before `done` was
    // written: at most the handlers in flight, per break of the consumer's connection.
    assert!(report.duplicates <= 3 * CONCURRENCY as usize, "{report:?}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_leader_node_killed_mid_stream() {
    if !reliable_mq_tests::cluster_enabled("quorum_leader_node_killed_mid_stream") {
        return;
    }
    run(
        Scenario {
            slug: "leader",
            name: "quorum leader's node killed",
            quorum: true,
            rate: 300,
            handler_ms: 2,
            min_confirmed: MESSAGES / 2,
            partitionable: false,
            through_the_fault: true,
        },
        |ctx| async move {
            let consumer = ctx.consumer_node().expect("consumer node");
            let leader = ctx.cluster.leader(&ctx.queue).expect("leader");
            assert_ne!(leader, consumer, "leader and consumer on different nodes");
            assert!(ctx.cluster.kill(leader), "killed node {leader}");
            let resume = ctx.resume_from_now().await;
            assert!(ctx.cluster.start_node(leader), "node {leader} back");
            resume
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_node_killed_mid_stream() {
    if !reliable_mq_tests::cluster_enabled("consumer_node_killed_mid_stream") {
        return;
    }
    run(
        Scenario {
            slug: "consumer-node",
            name: "consumer's node killed",
            quorum: true,
            rate: 300,
            handler_ms: 2,
            min_confirmed: MESSAGES / 2,
            partitionable: false,
            through_the_fault: true,
        },
        |ctx| async move {
            let consumer = ctx.consumer_node().expect("consumer node");
            assert!(ctx.cluster.kill(consumer), "killed node {consumer}");
            let resume = ctx.resume_from_now().await;
            let moved = ctx.consumer_node();
            assert!(
                moved.is_some_and(|n| n != consumer),
                "the consumer reconnected to another node: {moved:?}"
            );
            assert!(ctx.cluster.start_node(consumer), "node {consumer} back");
            resume
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_every_node() {
    if !reliable_mq_tests::cluster_enabled("rolling_restart_of_every_node") {
        return;
    }
    // A slower stream, as the three restarts take a minute or more: fewer messages to
    // settle at the end.
    run(
        Scenario {
            slug: "rolling",
            name: "rolling restart",
            quorum: true,
            rate: 60,
            handler_ms: 2,
            min_confirmed: MESSAGES / 2,
            partitionable: false,
            through_the_fault: true,
        },
        |ctx| async move {
            // The longest resumption over the restarts, each mid-stream (the stream goes
            // on until the fault is over).
            let mut worst: Option<Duration> = None;
            let mut measured = 0;
            for node in 1..=3 {
                // As an operator would: the queue fully replicated before the next node goes.
                assert!(
                    ctx.cluster
                        .await_members(&ctx.queue, Duration::from_secs(60))
                        .await,
                    "all members online before stopping node {node}"
                );
                let mid_stream = ctx.streaming();
                assert!(ctx.cluster.stop(node), "stopped node {node}");
                if mid_stream {
                    let resume = ctx.resume_from_now().await;
                    assert!(
                        resume.is_some(),
                        "resumed after stopping node {node}; {}",
                        ctx.cluster.describe(&ctx.queue)
                    );
                    eprintln!("rolling restart: node {node} stopped, resumed in {resume:?}");
                    worst = worst.max(resume);
                    measured += 1;
                }
                assert!(ctx.cluster.start_node(node), "node {node} back");
            }
            eprintln!("rolling restart: {measured} of 3 restarts mid-stream");
            assert_eq!(measured, 3, "every restart struck mid-stream");
            worst
        },
    )
    .await;
}

/// A network partition: the consumer's node is cut off from its peers and from every
/// client (the host end of its veth pair goes down: no reset, its packets just stop) for
/// 20 s, then connected again. Its side is the minority, so it pauses itself
/// (`pause_minority`, about 10 s after the cut with a 10 s `net_ticktime`); the two
/// others keep the quorum queue's leader (never on the consumer's node here) and go on.
/// The consumer notices the silence by its heartbeat and reconnects to a node of the
/// majority; after the heal the cut node rejoins and its queue member catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_node_partitioned_then_healed() {
    if !reliable_mq_tests::cluster_enabled("consumer_node_partitioned_then_healed") {
        return;
    }
    if let Some(why) = reliable_mq_tests::cluster::netns_unavailable() {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "skipped consumer_node_partitioned_then_healed: {why}"
        );
        return;
    }
    // A slower stream: the 20 s cut, the reconnect and the heal take a minute or more.
    run(
        Scenario {
            slug: "partition",
            name: "consumer's node cut off 20 s (network partition), then healed",
            quorum: true,
            rate: 60,
            handler_ms: 2,
            min_confirmed: MESSAGES / 2,
            partitionable: true,
            through_the_fault: true,
        },
        |ctx| async move {
            const CUT_FOR: Duration = Duration::from_secs(20);
            let consumer = ctx.consumer_node().expect("consumer node");
            let leader = ctx.cluster.leader(&ctx.queue).expect("leader");
            assert_ne!(leader, consumer, "leader and consumer on different nodes");
            assert!(ctx.cluster.partition(consumer), "cut node {consumer} off");
            let cut = Instant::now();
            let resume = ctx.resume_from_now().await;
            eprintln!("partition: node {consumer} cut off, resumed in {resume:?}");
            let moved = ctx.consumer_node();
            assert!(
                moved.is_some_and(|n| n != consumer),
                "the consumer reconnected to a node of the majority: {moved:?}"
            );
            tokio::time::sleep(CUT_FOR.saturating_sub(cut.elapsed())).await;
            assert!(
                ctx.cluster.heal(consumer),
                "node {consumer} connected again"
            );
            let healed = Instant::now();
            assert!(
                ctx.cluster
                    .await_members(&ctx.queue, Duration::from_secs(120))
                    .await,
                "node {consumer} rejoined and its queue member is online; {}",
                ctx.cluster.describe(&ctx.queue)
            );
            eprintln!(
                "partition: node {consumer} rejoined {:?} after the heal",
                healed.elapsed()
            );
            resume
        },
    )
    .await;
}

/// A classic queue lives on one node. While that node is down the queue is unavailable
/// from every node: a declare (even passive) is refused with 404 NOT_FOUND "home node ...
/// is down or inaccessible", publishes to it are not confirmed (the publisher gets an
/// error), and consumers cannot consume it. The consumer keeps reconnecting and
/// redeclaring with backoff, and resumes when the node returns; durable messages
/// confirmed before the stop are all there. The handler is slower than the stream here,
/// so a backlog waits in the queue when its node dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queue_node_stopped_until_it_returns() {
    if !reliable_mq_tests::cluster_enabled("classic_queue_node_stopped_until_it_returns") {
        return;
    }
    run(
        Scenario {
            slug: "classic",
            name: "classic queue's node down 10 s",
            quorum: false,
            rate: 600,
            handler_ms: 20,
            min_confirmed: MESSAGES / 4,
            partitionable: false,
            through_the_fault: false,
        },
        |ctx| async move {
            let home = ctx.cluster.leader(&ctx.queue).expect("the queue's node");
            assert!(ctx.cluster.kill(home), "killed node {home}");
            let other = if home == 1 { 2 } else { 1 };
            let conn = lapin::Connection::connect(
                &ctx.cluster.url_of(other),
                lapin::ConnectionProperties::default(),
            )
            .await
            .expect("another node accepts");
            let channel = conn.create_channel().await.expect("channel");
            let declared = channel
                .queue_declare(
                    ctx.queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await;
            let refusal = declared.expect_err("a classic queue whose node is down is unavailable");
            eprintln!("passive declare on node {other} while node {home} is down: {refusal}");
            assert!(
                refusal.to_string().contains("down"),
                "the broker says the queue's node is down: {refusal}"
            );
            let _ = conn.close(200, "done".into()).await;
            // Nothing is consumed while the node is down (after the in-flight handlers end).
            tokio::time::sleep(Duration::from_secs(2)).await;
            let stalled = read_log(&ctx.log).values().sum::<usize>();
            tokio::time::sleep(Duration::from_secs(8)).await;
            let still = read_log(&ctx.log).values().sum::<usize>();
            assert_eq!(
                stalled, still,
                "no handler ran while the queue's node was down"
            );
            // The stream is over by now (publishes while the node was down were not
            // confirmed): resuming means the backlog drains.
            assert!(ctx.cluster.start_node(home), "node {home} back");
            time_to_resume(&ctx.log, still, Duration::from_secs(90)).await
        },
    )
    .await;
}

/// A publisher whose channel first publishes to a quorum queue just after the node of the
/// queue's leader died. RabbitMQ 3.10 sets up the channel's side of the queue on that first
/// publish, from the queue's record, which still names the dead node as leader until the
/// new leader has updated it: the check it makes on that node fails, the publish is
/// nacked, and the channel keeps that state, so every later publish on the same channel
/// is nacked too, until the dead node comes back. Only a new channel recovers: after a
/// nack the publisher retries on a fresh channel (same connection). Publishers start one
/// every 100 ms from the kill, each on its own connection to a node that stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_publish_after_the_leaders_node_died_is_confirmed() {
    if !reliable_mq_tests::cluster_enabled("first_publish_after_the_leaders_node_died_is_confirmed")
    {
        return;
    }
    init_tracing();
    let _serial = CLUSTER_LOCK.lock().await;
    let queue = unique("cluster-first-publish");
    let cluster = Cluster::start();
    let broker = cluster.broker().await.expect("a cluster node accepts");
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    broker
        .channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions::durable(),
            args,
        )
        .await
        .expect("quorum queue declared");
    assert!(cluster.await_members(&queue, Duration::from_secs(60)).await);
    let leader = cluster.leader(&queue).expect("leader");
    let other = if leader == 1 { 2 } else { 1 };
    eprintln!("leader on node {leader}; publishers on node {other}");
    const PUBLISHERS: usize = 20;
    let mut publishers = Vec::new();
    for i in 0..PUBLISHERS {
        let config = test_config(&queue)
            .with_amqp_url(cluster.url_of(other))
            .with_publish_retries(8)
            .with_connection_name(format!("first-publish-{i}"));
        publishers.push(Publisher::from_config(&config).await.expect("publisher"));
    }
    assert!(cluster.kill(leader), "killed node {leader}");
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, publisher) in publishers.iter().enumerate() {
        let (publisher, queue) = (publisher.clone(), queue.clone());
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(100) * i as u32).await;
            let sent = t0.elapsed();
            let outcome = publisher
                .publish_with(
                    "",
                    &queue,
                    &i,
                    reliable_mq::PublishOptions::with_message_id(format!("p-{i}")),
                )
                .await;
            (i, sent, t0.elapsed(), outcome)
        });
    }
    let mut failed = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (i, sent, settled, outcome) = done.expect("publish task");
        eprintln!(
            "publisher {i}: first publish at {sent:?} after the kill, outcome {:?} at {settled:?}",
            outcome.as_ref().map(|_| "confirmed")
        );
        if let Err(e) = outcome {
            failed.push((i, e.to_string()));
        }
    }
    for publisher in &publishers {
        publisher.close().await;
    }
    assert!(
        failed.is_empty(),
        "publishes not confirmed while node {leader} is down: {failed:?}; {}",
        cluster.describe(&queue)
    );
}
