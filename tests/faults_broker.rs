//! The fault suite: thousands of messages through a consumer process while something
//! breaks, then a checker counts every message (see `support/fault.rs`).
//!
//! Scenarios stop and restart shared services, so they run one at a time (a lock), in
//! their own test binary (cargo runs test binaries one after another, so nothing else runs
//! beside them), and restore the services even when they fail.
//!
//! Run alone: `cargo test -p reliable-mq-tests --test faults_broker -- --nocapture`; each
//! scenario prints its row of the summary table (also appended to target/fault-report.md).
//!
//! Each scenario runs only with `RELIABLE_MQ_FAULTS=1` (`faults_enabled`): it stops and
//! restarts this machine's services, so the plain test command only prints a skip line.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_mq::Publisher;
use reliable_mq_tests::fault::{
    Ledger, Report, SCENARIO_LOCK, ServiceGuard, Worker, WorkerOptions, drain_ids,
    ensure_rabbit_up, ensure_redis_up, log_lines, log_path, produce, rabbit_accepts, read_log,
    time_to_resume, wait_settled,
};
use reliable_mq_tests::{
    Broker, Cleanup, eventually, faults_enabled, http_get, init_tracing, sh, test_config, unique,
};

/// Messages per scenario.
const MESSAGES: usize = 3000;
/// Publish rate: the stream lasts about five seconds, and the fault lands in its middle.
const RATE: u32 = 600;
/// When the fault strikes, after the stream starts.
const FAULT_AT: Duration = Duration::from_millis(1500);

struct Scenario {
    name: &'static str,
    idempotent: bool,
    handler_ms: u64,
    concurrency: u16,
}

/// What a fault needs: the worker (to kill or stop) and where to restart it from.
struct Ctx {
    worker: Option<Worker>,
    options: WorkerOptions,
}

impl Ctx {
    fn respawn(&mut self) {
        self.worker = Some(Worker::spawn(&self.options));
    }
}

/// Run one scenario: start a worker, stream messages, inject `fault` mid-stream (it returns
/// once the fault is over), wait for everything to settle, check.
async fn run<F, Fut>(s: Scenario, fault: F) -> Report
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Ctx>,
{
    init_tracing();
    let _serial = SCENARIO_LOCK.lock().await;
    let queue = unique(&format!("fault-{}", s.name));
    // Dropped last: the services are back (the guard below) before anything is deleted.
    let _cleanup = Cleanup::consumer(&queue, &["1s", "2s", "4s"], &[])
        .redis_keys(&format!("rmq-test:{queue}"))
        .redis_keys(&format!("reliable-mq:/:{queue}"));
    let _restore = ServiceGuard;
    ensure_rabbit_up();
    ensure_redis_up();
    assert!(eventually(Duration::from_secs(60), rabbit_accepts).await);

    let broker = Broker::connect().await;
    let log = log_path(&queue);
    let options = WorkerOptions {
        bin: env!("CARGO_BIN_EXE_fault_worker").into(),
        queue: queue.clone(),
        log: log.clone(),
        handler_ms: s.handler_ms,
        concurrency: s.concurrency,
        idempotent: s.idempotent,
    };
    let mut ctx = Ctx {
        worker: Some(Worker::spawn(&options)),
        options,
    };
    assert!(
        eventually(Duration::from_secs(30), || broker.queue_exists(&queue)).await,
        "worker declared its queue"
    );

    // Generous publish retries: a confirmed-or-failed answer must outlast a broker restart.
    let config = test_config(&queue)
        .with_publish_retries(60)
        .with_connection_name(format!("fault-producer-{queue}"));
    let publisher = Publisher::from_config(&config).await.expect("publisher");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let producer = {
        let (publisher, queue, ledger) = (publisher.clone(), queue.clone(), Arc::clone(&ledger));
        tokio::spawn(async move { produce(&publisher, &queue, "m", MESSAGES, RATE, &ledger).await })
    };

    tokio::time::sleep(FAULT_AT).await;
    ctx = fault(ctx).await;
    // Time to resume: from the end of the fault to the next handler call.
    let before = log_lines(&log);
    let resume = time_to_resume(&log, before, Duration::from_secs(60)).await;

    producer.await.expect("producer");
    // A broker restart drops our side channel; reconnect for the checks.
    let broker = Broker::connect().await;
    wait_settled(&broker, &queue, &log, &ledger, Duration::from_secs(90)).await;
    if let Some(worker) = ctx.worker.take() {
        let status = worker.terminate();
        assert!(status.success(), "worker exits 0 on SIGTERM: {status:?}");
    }
    let dead = drain_ids(&broker, &format!("{queue}.dlq")).await;
    let calls = read_log(&log);
    let report = {
        let ledger = ledger.lock().expect("ledger");
        Report::check(s.name, &ledger, &calls, &dead, resume)
    };
    report.publish();
    publisher.close().await;

    assert!(
        report.confirmed > MESSAGES / 2,
        "most publishes confirmed: {report:?}"
    );
    report.assert_nothing_lost_and_resumed();
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stop_app_and_start_app_mid_stream() {
    if !reliable_mq_tests::faults_enabled("broker_stop_app_and_start_app_mid_stream") {
        return;
    }
    let s = Scenario {
        name: "broker-restart",
        idempotent: true,
        handler_ms: 2,
        concurrency: 8,
    };
    let report = run(s, |ctx| async move {
        assert!(sh("timeout 60 rabbitmqctl -q stop_app"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(sh("timeout 60 rabbitmqctl -q start_app"));
        ctx
    })
    .await;
    // With dedup, a redelivery after the reconnect is absorbed unless its handler finished
    // and the done mark was written... in which case it is acked as a duplicate: no call.
    assert!(report.duplicates <= 8, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_process_killed_and_restarted_mid_stream() {
    if !reliable_mq_tests::faults_enabled("broker_process_killed_and_restarted_mid_stream") {
        return;
    }
    let s = Scenario {
        name: "broker-kill-9",
        idempotent: true,
        handler_ms: 2,
        concurrency: 8,
    };
    let report = run(s, |ctx| async move {
        assert!(
            sh("pkill -9 -f '[b]eam[.]smp.*rabbit'"),
            "killed the broker"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        ensure_rabbit_up();
        ctx
    })
    .await;
    assert!(report.duplicates <= 8, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_mid_handler_and_restarted() {
    if !reliable_mq_tests::faults_enabled("consumer_killed_mid_handler_and_restarted") {
        return;
    }
    let s = Scenario {
        name: "consumer-kill-9",
        idempotent: true,
        handler_ms: 20,
        concurrency: 8,
    };
    let report = run(s, |mut ctx| async move {
        if let Some(w) = ctx.worker.take() {
            w.kill();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        ctx.respawn();
        ctx
    })
    .await;
    // The documented window: a handler whose side effect was done when the process died,
    // before `done` was written, runs again. At most the handlers in flight at the kill.
    assert!(report.duplicates <= 8, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_stream() {
    if !reliable_mq_tests::faults_enabled("redis_restarted_mid_stream") {
        return;
    }
    let s = Scenario {
        name: "redis-restart",
        idempotent: true,
        handler_ms: 2,
        concurrency: 8,
    };
    let report = run(s, |ctx| async move {
        sh("redis-cli -h 127.0.0.1 -p 6379 shutdown nosave >/dev/null 2>&1");
        tokio::time::sleep(Duration::from_secs(2)).await;
        ensure_redis_up();
        ctx
    })
    .await;
    assert_eq!(report.duplicates, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_sigterm_with_handlers_in_flight() {
    if !reliable_mq_tests::faults_enabled("graceful_sigterm_with_handlers_in_flight") {
        return;
    }
    let s = Scenario {
        name: "consumer-sigterm",
        idempotent: false,
        handler_ms: 50,
        concurrency: 8,
    };
    let report = run(s, |mut ctx| async move {
        if let Some(w) = ctx.worker.take() {
            let status = w.terminate();
            assert!(status.success(), "graceful exit: {status:?}");
        }
        ctx.respawn();
        ctx
    })
    .await;
    // In-flight handlers finished and were acked before exit: no redelivery, no repeat,
    // even without dedup.
    assert_eq!(report.duplicates, 0, "{report:?}");
}

/// Readiness with the real broker stopped: 503 while it is down, 200 again once it is back
/// (a publisher that publishes nothing reconnects when the probe asks). Here, not beside
/// the other readiness tests: stopping the machine's RabbitMQ fails whatever else of one
/// test binary runs at that moment, and this binary runs its scenarios one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_503_while_the_broker_is_stopped() {
    if !faults_enabled("readiness_is_503_while_the_broker_is_stopped") {
        return;
    }
    let _serial = SCENARIO_LOCK.lock().await;
    let _services = ServiceGuard;
    let q = unique("ready-stopped");
    let _cleanup = Cleanup::consumer(&q, &[], &[]);
    let handler = reliable_mq::handler_fn(|_job: serde_json::Value| async {
        Ok::<_, reliable_mq::HandlerError>(())
    });
    let app = reliable_mq::App::new(test_config(&q))
        .consumer(reliable_mq::ConsumerConfig::new(
            &q,
            format!("{q}.dlx"),
            handler,
        ))
        .start()
        .await
        .expect("start");
    let addr = app.serve_http("127.0.0.1:0").await.expect("listen");
    assert_eq!(http_get(addr, "/health/ready").await.0, 200);
    assert!(sh("timeout 60 rabbitmqctl -q stop_app >/dev/null 2>&1"));
    assert!(
        eventually(Duration::from_secs(30), || async {
            http_get(addr, "/health/ready").await.0 == 503
        })
        .await
    );
    ensure_rabbit_up();
    let back = eventually(Duration::from_secs(60), || async {
        http_get(addr, "/health/ready").await.0 == 200
    })
    .await;
    assert!(
        back,
        "ready again once the broker is back; last answer: {:?}",
        http_get(addr, "/health/ready").await
    );
    app.shutdown().await.expect("clean shutdown");
}
