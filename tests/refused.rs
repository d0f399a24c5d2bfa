//! Settle copies the broker refuses, on the real broker, with a RabbitMQ user of the
//! test's own whose write permission leaves out the dead-letter exchange (or the default
//! exchange the retry tiers are published through): the refused message is held in place,
//! never turned into a reconnect loop; other messages flow; health says why; granting the
//! permission settles it. Also: the counters count confirmed copies only, and two
//! consumers of one queue have a health each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_mq::{App, ConsumerConfig, HandlerError, RetryBackoff, handler_fn};
use reliable_mq_tests::{
    Broker, Cleanup, close_connections_named, eventually, init_tracing, message_total, sh,
    test_config, unique,
};

const WAIT: Duration = Duration::from_secs(15);

/// A RabbitMQ user of this test, deleted when dropped (also when an assertion fails).
struct User {
    name: String,
    password: String,
}

impl User {
    /// A user that may configure and read everything on `/` and write everywhere but
    /// `refused` (an exchange name).
    fn without_write_on(refused: &str) -> Self {
        let user = Self {
            name: unique("rmq-test-user"),
            password: uuid::Uuid::new_v4().simple().to_string(),
        };
        assert!(
            sh(&format!(
                "rabbitmqctl -q add_user '{}' '{}' >/dev/null",
                user.name, user.password
            )),
            "rabbitmqctl add_user"
        );
        user.write_regex(&format!("^(?!{}$).*", refused.replace('.', "\\.")));
        user
    }

    fn write_regex(&self, write: &str) {
        assert!(
            sh(&format!(
                "rabbitmqctl -q set_permissions -p / '{}' '.*' '{write}' '.*' >/dev/null",
                self.name
            )),
            "rabbitmqctl set_permissions"
        );
    }

    /// Let the user write everywhere.
    fn grant_all(&self) {
        self.write_regex(".*");
    }

    /// The test broker's URL with this user's credentials.
    fn url(&self) -> String {
        let base = reliable_mq_tests::amqp_url();
        let host = base
            .rsplit_once('@')
            .map_or("127.0.0.1:5672/%2f", |(_, h)| h);
        format!("amqp://{}:{}@{host}", self.name, self.password)
    }

    /// This user's URL to the broker through `127.0.0.1:{port}`.
    fn url_via(&self, port: u16) -> String {
        format!(
            "amqp://{}:{}@127.0.0.1:{port}/%2f",
            self.name, self.password
        )
    }
}

/// The pids of the connections `user` has open now.
fn connections_of(user: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "user"])
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let pid = parts.next()?;
            (parts.next()? == user).then(|| pid.to_owned())
        })
        .collect()
}

impl Drop for User {
    fn drop(&mut self) {
        // Deleting the user also closes whatever connection it still has.
        sh(&format!(
            "rabbitmqctl -q delete_user '{}' >/dev/null",
            self.name
        ));
    }
}

/// A TCP forwarder to the broker on a port of its own that counts the connections opened
/// through it; stopped when dropped.
struct CountingProxy {
    port: u16,
    opened: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free port");
        let port = listener.local_addr().expect("local addr").port();
        let opened = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&opened);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                    }
                });
            }
        });
        Self { port, opened, task }
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Handler calls per message id (`{"id": .., "poison": ..}`); poison ones are rejected.
type Calls = Arc<Mutex<HashMap<u64, usize>>>;

fn rejecting_poison(calls: &Calls) -> impl reliable_mq::Handler {
    let calls = Arc::clone(calls);
    handler_fn(move |m: serde_json::Value| {
        let calls = Arc::clone(&calls);
        async move {
            let id = m["id"].as_u64().unwrap_or(u64::MAX);
            *calls.lock().expect("calls").entry(id).or_insert(0) += 1;
            if m["poison"].as_bool() == Some(true) {
                return Err(HandlerError::reject("this message can never succeed"));
            }
            Ok(())
        }
    })
}

/// Declare `consumer`'s topology as the administrator would: the broker lets only a user
/// who may write to a queue's dead-letter exchange declare the queue, so the restricted
/// user of these tests finds it in place (as when the permission is taken away later).
async fn declare_as_guest(q: &str, consumer: ConsumerConfig) {
    let app = App::new(test_config(q))
        .consumer(consumer)
        .start()
        .await
        .expect("declared as guest");
    app.shutdown().await.expect("clean shutdown");
}

fn count(calls: &Calls, id: u64) -> usize {
    calls.lock().expect("calls").get(&id).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_broker_refuses_is_held_not_a_reconnect_loop() {
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique("refused-dlx");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms"], &[]);
    let user = User::without_write_on(&dlx);
    // Every connection the app opens goes through the proxy, which counts them.
    let proxy = CountingProxy::start().await;
    let mut config = test_config(&q).with_amqp_url(user.url_via(proxy.port));
    // Held copies try again at most this far apart: the recovery below comes that soon.
    config.max_reconnect_delay = Duration::from_secs(3);
    let calls: Calls = Arc::default();
    let consumer = ConsumerConfig::new(&q, &dlx, rejecting_poison(&calls))
        .with_retries(1, Duration::from_millis(200), RetryBackoff::Fixed)
        .with_prefetch(8)
        .with_concurrency(2);
    declare_as_guest(&q, consumer.clone()).await;
    let app = App::new(config)
        .consumer(consumer)
        .start()
        .await
        .expect("start");

    let publish = |id: u64, poison: bool| {
        let body = serde_json::json!({"id": id, "poison": poison});
        let broker = &broker;
        let q = &q;
        async move {
            broker.publish_json("", q, &body, &format!("m-{id}")).await;
        }
    };
    publish(0, true).await;
    for id in 1..=5 {
        publish(id, false).await;
    }

    // Watch for 30 s: the connections the app opens, the consumer's sessions, the
    // poison's handler calls; and the user's connections open at the end.
    let opened_at_start = proxy.opened();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let opened = proxy.opened() - opened_at_start;
    let name = user.name.clone();
    let open_now = tokio::task::spawn_blocking(move || connections_of(&name))
        .await
        .expect("rabbitmqctl")
        .len();
    let stats = app.stats(&q).expect("stats");
    eprintln!(
        "in 30 s: {opened} connections opened ({open_now} open at the end), {} consumer session(s), {} call(s) of the refused message's handler",
        stats.sessions,
        count(&calls, 0)
    );
    assert_eq!(stats.sessions, 1, "no reconnect at all: {stats:?}");
    assert_eq!(
        count(&calls, 0),
        1,
        "the refused message's handler ran once"
    );
    // The publisher loses its channel to each refused try (the broker closes it) and opens
    // the next one on the same connection; the tries are spaced by a doubling delay capped
    // at 3 s. No connection is opened for them.
    assert!(opened <= 2, "connections opened in 30 s: {opened}");
    assert!(
        (1..=2).contains(&open_now),
        "the consumer's and (between tries) the publisher's: {open_now}"
    );
    for id in 1..=5 {
        assert_eq!(count(&calls, id), 1, "message {id} handled once");
    }
    assert_eq!(
        (stats.handled, stats.dead_lettered, stats.held),
        (5, 0, 1),
        "{stats:?}"
    );
    assert_eq!(
        message_total(&q),
        Some(1),
        "the refused message is still in its queue (unacked)"
    );
    assert_eq!(broker.ready_count(&format!("{q}.dlq")).await, Some(0));
    let health = app.health().await;
    let degraded: Vec<_> = health.degraded().collect();
    assert_eq!(degraded.len(), 1, "{health:?}");
    let reason = degraded[0].degraded.clone().unwrap_or_default();
    assert!(
        reason.starts_with(&format!("cannot publish to {dlx}: "))
            && reason.contains("ACCESS_REFUSED"),
        "health names the target and the broker's reason: {reason}"
    );
    assert!(health.consumers_attached, "{health:?}");

    // Granted the permission, the held copy goes through: dead-lettered with its reason.
    user.grant_all();
    let dead = broker
        .get_within(&format!("{q}.dlq"), WAIT)
        .await
        .expect("the held message is dead-lettered once the DLX takes it");
    assert_eq!(dead.header("x-error-kind").as_deref(), Some("rejected"));
    assert_eq!(dead.message_id().as_deref(), Some("m-0"));
    assert!(
        eventually(WAIT, || async {
            message_total(&q) == Some(0)
                && app
                    .stats(&q)
                    .is_some_and(|s| s.dead_lettered == 1 && s.held == 0)
                && app.health().await.degraded().next().is_none()
        })
        .await,
        "recovered: {:?} {:?}",
        app.stats(&q),
        app.health().await
    );
    assert_eq!(count(&calls, 0), 1, "and its handler never ran again");
    publish(6, false).await;
    assert!(
        eventually(WAIT, || async { count(&calls, 6) == 1 }).await,
        "new messages keep flowing"
    );
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_counts_only_retry_copies_the_broker_confirmed() {
    // The retry tiers are fed through the default exchange: without write on it, the
    // retry copy of a failed attempt is refused and held; `retried` waits for the confirm.
    init_tracing();
    let broker = Broker::connect().await;
    let q = unique("refused-tier");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &["200ms"], &[]);
    let user = User::without_write_on("amq.default");
    let mut config = test_config(&q).with_amqp_url(user.url());
    config.max_reconnect_delay = Duration::from_secs(2);
    let calls = Arc::new(Mutex::new(0usize));
    let c = Arc::clone(&calls);
    let handler = handler_fn(move |_n: u64| {
        let c = Arc::clone(&c);
        async move {
            let mut n = c.lock().expect("calls");
            *n += 1;
            if *n == 1 {
                Err(HandlerError::retry("first attempt fails"))
            } else {
                Ok(())
            }
        }
    });
    let consumer = ConsumerConfig::new(&q, &dlx, handler).with_retries(
        1,
        Duration::from_millis(200),
        RetryBackoff::Fixed,
    );
    declare_as_guest(&q, consumer.clone()).await;
    let app = App::new(config)
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    broker
        .publish_json("", &q, &serde_json::json!(1), "m-1")
        .await;
    assert!(
        eventually(WAIT, || async {
            app.health().await.degraded().next().is_some()
        })
        .await,
        "the refused retry copy shows in health"
    );
    // Several tries of the copy have failed by now: none of them counted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = app.stats(&q).expect("stats");
    assert_eq!((stats.retried, stats.requeued), (0, 0), "{stats:?}");
    assert_eq!(*calls.lock().expect("calls"), 1);

    user.grant_all();
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 1)
        })
        .await,
        "{:?}",
        app.stats(&q)
    );
    let stats = app.stats(&q).expect("stats");
    assert_eq!(
        (stats.retried, stats.requeued, stats.sessions),
        (1, 0, 1),
        "{stats:?}"
    );
    assert_eq!(*calls.lock().expect("calls"), 2, "the retry ran once");
    assert!(app.health().await.degraded().next().is_none());
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_of_one_queue_have_a_health_each() {
    init_tracing();
    let q = unique("health-two");
    let dlx = format!("{q}.dlx");
    let _cleanup = Cleanup::consumer(&q, &[], &[]);
    // A connection each (consumers share connections by default), so one's can be cut.
    let config = test_config(&q)
        .with_connection_name(format!("test-{q}"))
        .with_consumer_connections(2);
    let consumer = |name: &str| {
        ConsumerConfig::new(
            &q,
            &dlx,
            handler_fn(|_n: u64| async { Ok::<_, HandlerError>(()) }),
        )
        .with_retries(0, Duration::from_millis(200), RetryBackoff::Fixed)
        .with_name(name)
    };
    let app = App::new(config)
        .consumer(consumer("steady"))
        .consumer(consumer("bounced"))
        .start()
        .await
        .expect("start");
    let health = app.health().await;
    assert_eq!(
        health
            .consumers
            .iter()
            .map(|c| (c.name.as_str(), c.queue.as_str(), c.attached))
            .collect::<Vec<_>>(),
        vec![("steady", q.as_str(), true), ("bounced", q.as_str(), true)]
    );

    // One consumer's connection dies; the other's health must not move meanwhile.
    let name = format!("test-{q} (consumers 2/2)");
    let closed = tokio::task::spawn_blocking(move || close_connections_named(&name))
        .await
        .expect("rabbitmqctl");
    assert_eq!(closed, 1);
    let steady_detached = AtomicBool::new(false);
    let back = eventually(WAIT, || async {
        let health = app.health().await;
        if !health.consumers[0].attached {
            steady_detached.store(true, Ordering::SeqCst);
        }
        app.consumer_stats("bounced")
            .is_some_and(|s| s.sessions == 2 && s.attached)
    })
    .await;
    assert!(back, "{:?}", app.consumer_stats("bounced"));
    assert!(
        !steady_detached.load(Ordering::SeqCst),
        "the other consumer never looked detached"
    );
    assert_eq!(app.consumer_stats("steady").map(|s| s.sessions), Some(1));
    assert_eq!(
        app.stats(&q).map(|s| s.sessions),
        Some(3),
        "the queue's counters add up"
    );
    assert!(app.health().await.consumers_attached);
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeued_counts_each_delivery_put_back_once() {
    // A held claim sends the delivery to the requeue tier through the default exchange,
    // which this user may not write to: the copy is held, then the delivery is handed
    // back before the (short) consumer_timeout. Each hand-back counts once, a refused copy
    // not at all.
    init_tracing();
    let q = unique("refused-requeue");
    let dlx = format!("{q}.dlx");
    let user = User::without_write_on("amq.default");
    let mut config = test_config(&q)
        .with_amqp_url(user.url())
        .with_redis_url(Some(reliable_mq_tests::redis_url()))
        .with_consumer_timeout(Duration::from_secs(4));
    config.max_reconnect_delay = Duration::from_secs(1);
    let _cleanup = Cleanup::consumer(&q, &["200ms"], &[]).redis_keys(&config.dedup_prefix.clone());
    // Another instance holds the message's claim.
    let key = reliable_mq::dedup::KeyScope::from_config(&config)
        .expect("scope")
        .key(&q, "held-1");
    assert!(sh(&format!(
        "redis-cli -h 127.0.0.1 -p 6379 SET '{key}' another-instance PX 120000 >/dev/null"
    )));
    let calls = Arc::new(Mutex::new(0usize));
    let c = Arc::clone(&calls);
    let handler = handler_fn(move |_n: u64| {
        let c = Arc::clone(&c);
        async move {
            *c.lock().expect("calls") += 1;
            Ok::<_, HandlerError>(())
        }
    });
    let consumer = ConsumerConfig::new(&q, &dlx, handler)
        .with_retries(1, Duration::from_millis(200), RetryBackoff::Fixed)
        .idempotent(Duration::from_secs(600));
    declare_as_guest(&q, consumer.clone()).await;
    let app = App::new(config)
        .consumer(consumer)
        .start()
        .await
        .expect("start");
    let broker = Broker::connect().await;
    broker
        .publish_json("", &q, &serde_json::json!(1), "held-1")
        .await;

    assert!(
        eventually(WAIT, || async {
            app.health().await.degraded().next().is_some()
        })
        .await,
        "the refused requeue copy shows in health"
    );
    assert_eq!(
        app.stats(&q).map(|s| s.requeued),
        Some(0),
        "a refused copy is not a requeue"
    );
    // Handed back 3 s into each 4 s consumer_timeout, received again: one count each time.
    assert!(
        eventually(Duration::from_secs(20), || async {
            app.stats(&q)
                .is_some_and(|s| s.received >= 3 && s.requeued == s.received - 1)
        })
        .await,
        "{:?}",
        app.stats(&q)
    );
    let stats = app.stats(&q).expect("stats");
    assert_eq!(stats.sessions, 1, "{stats:?}");
    assert_eq!(*calls.lock().expect("calls"), 0);

    // The other instance lets go and the permission comes back: handled once.
    sh(&format!(
        "redis-cli -h 127.0.0.1 -p 6379 DEL '{key}' >/dev/null"
    ));
    user.grant_all();
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.handled == 1)
        })
        .await,
        "{:?}",
        app.stats(&q)
    );
    assert_eq!(*calls.lock().expect("calls"), 1);
    app.shutdown().await.expect("clean shutdown");
}
