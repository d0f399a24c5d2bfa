//! The fault-suite harness, in the style of RabbitMQ's Jepsen tests: every message has a
//! unique id; the producer records what was confirmed, failed or left unknown; the
//! consumer process records every handler call in an append-only file; at the end the
//! checker compares the two and counts what was lost, unexpected or duplicated.
//!
//! It also owns the services it breaks: [`ServiceGuard`] brings RabbitMQ and Redis back
//! when a scenario ends, even when it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reliable_mq::{PublishError, PublishOptions, Publisher};
use tokio::sync::Semaphore;

use crate::{Broker, amqp_url, redis_url, sh};

/// Serializes scenarios across the tests of one binary: they stop shared services.
pub static SCENARIO_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whether RabbitMQ answers.
pub fn rabbit_up() -> bool {
    sh("timeout 20 rabbitmqctl -q status >/dev/null 2>&1")
}

/// Whether RabbitMQ accepts AMQP connections right now.
pub async fn rabbit_accepts() -> bool {
    lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .is_ok()
}

/// Whether Redis answers.
pub fn redis_up() -> bool {
    sh("timeout 5 redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG")
}

/// Start RabbitMQ if it is not running (app stopped or node down) and wait for it.
pub fn ensure_rabbit_up() {
    if rabbit_up() {
        return;
    }
    // After stop_app the node runs but `status` fails: start the app. `await_startup` alone
    // would wait for an app that nobody starts, until its timeout.
    sh("timeout 60 rabbitmqctl -q start_app >/dev/null 2>&1");
    if !rabbit_up() {
        sh("rabbitmq-server -detached >/dev/null 2>&1");
        sh("timeout 120 rabbitmqctl -q await_startup >/dev/null 2>&1");
        sh("timeout 60 rabbitmqctl -q start_app >/dev/null 2>&1");
    }
}

/// Start Redis if it is not running and wait for it.
pub fn ensure_redis_up() {
    if !redis_up() {
        sh(
            "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no >/dev/null 2>&1",
        );
        for _ in 0..50 {
            if redis_up() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Restores RabbitMQ and Redis when dropped (scenario passed, failed or panicked).
pub struct ServiceGuard;

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        ensure_rabbit_up();
        ensure_redis_up();
    }
}

/// Options of the consumer process.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The worker binary: `env!("CARGO_BIN_EXE_fault_worker")` in the test.
    pub bin: PathBuf,
    /// Queue to consume.
    pub queue: String,
    /// Where handler calls are logged.
    pub log: PathBuf,
    /// Simulated work per message.
    pub handler_ms: u64,
    /// Handlers in flight.
    pub concurrency: u16,
    /// Dedup through Redis.
    pub idempotent: bool,
}

/// A running consumer process (`tests/bin/fault_worker.rs`).
pub struct Worker {
    child: Child,
}

impl Worker {
    /// Start a worker.
    pub fn spawn(o: &WorkerOptions) -> Self {
        Self::spawn_with_env(o, &[])
    }

    /// Start a worker with extra environment (`AMQP_URL` of a cluster, `FAULT_QUEUE_TYPE`),
    /// which overrides the defaults.
    pub fn spawn_with_env(o: &WorkerOptions, extra: &[(&str, String)]) -> Self {
        let mut command = Command::new(&o.bin);
        command
            .env("AMQP_URL", amqp_url())
            .env("REDIS_URL", redis_url())
            .env("FAULT_QUEUE", &o.queue)
            .env("FAULT_LOG", &o.log)
            .env("FAULT_HANDLER_MS", o.handler_ms.to_string())
            .env("FAULT_CONCURRENCY", o.concurrency.to_string())
            .env("FAULT_IDEMPOTENT", if o.idempotent { "1" } else { "0" })
            .env("FAULT_CONN_NAME", format!("fault-{}", o.queue));
        for (key, value) in extra {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn fault_worker");
        Self { child }
    }

    /// SIGKILL: no chance to settle anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status (graceful shutdown).
    pub fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id();
        sh(&format!("kill -TERM {pid}"));
        self.child.wait().expect("wait for worker")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What the producer knows about each message.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Every id a publish was attempted for.
    pub attempted: BTreeSet<String>,
    /// Confirmed by the broker: must be handled or dead-lettered.
    pub confirmed: BTreeSet<String>,
    /// Refused (nack, unroutable): may not arrive.
    pub failed: BTreeSet<String>,
    /// Outcome unknown (timeout, connection lost after retries): may or may not arrive.
    pub unknown: BTreeSet<String>,
}

/// Publish `n` messages `{prefix}-{i}` to `queue` at about `rate` per second, up to 64
/// in flight, recording each outcome.
pub async fn produce(
    publisher: &Publisher,
    queue: &str,
    prefix: &str,
    n: usize,
    rate: u32,
    ledger: &Arc<Mutex<Ledger>>,
) {
    produce_while(publisher, queue, prefix, rate, ledger, |i| i < n).await;
}

/// Publish messages `{prefix}-{i}` as [`produce`] does, for as long as `go_on(i)` says
/// message `i` is still part of the stream.
pub async fn produce_while(
    publisher: &Publisher,
    queue: &str,
    prefix: &str,
    rate: u32,
    ledger: &Arc<Mutex<Ledger>>,
    go_on: impl Fn(usize) -> bool,
) {
    let slots = Arc::new(Semaphore::new(64));
    let pause = Duration::from_secs(1) / rate.max(1);
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    for i in 0.. {
        tokio::time::sleep_until(start + pause * u32::try_from(i).unwrap_or(u32::MAX)).await;
        if !go_on(i) {
            break;
        }
        let permit = Arc::clone(&slots).acquire_owned().await.expect("semaphore");
        let id = format!("{prefix}-{i}");
        if let Ok(mut l) = ledger.lock() {
            l.attempted.insert(id.clone());
        }
        let (publisher, queue, ledger) = (publisher.clone(), queue.to_owned(), Arc::clone(ledger));
        tasks.spawn(async move {
            let outcome = publisher
                .publish_with(
                    "",
                    &queue,
                    &(i as u64),
                    PublishOptions::with_message_id(id.clone()),
                )
                .await;
            if let Ok(mut l) = ledger.lock() {
                match outcome {
                    Ok(_) => l.confirmed.insert(id),
                    Err(
                        PublishError::ConfirmTimeout { .. } | PublishError::ConnectionLost { .. },
                    ) => l.unknown.insert(id),
                    Err(_) => l.failed.insert(id),
                };
            }
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Handler calls per message id, from the worker's log.
pub fn read_log(path: &Path) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut calls = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        *calls.entry(line.to_owned()).or_insert(0) += 1;
    }
    calls
}

/// Number of handler calls logged so far.
pub fn log_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Wait until the log grows past `from` lines; the time it took.
pub async fn time_to_resume(path: &Path, from: usize, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if log_lines(path) > from {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// The checker's verdict on one scenario.
#[derive(Debug, Clone)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Publishes attempted.
    pub attempted: usize,
    /// Publishes confirmed.
    pub confirmed: usize,
    /// Publishes with unknown outcome.
    pub unknown: usize,
    /// Distinct ids handled.
    pub handled: usize,
    /// Handler calls in all.
    pub handler_calls: usize,
    /// Distinct ids in the DLQ.
    pub dead_lettered: usize,
    /// Confirmed but neither handled nor dead-lettered.
    pub lost: Vec<String>,
    /// Handled or dead-lettered but never attempted.
    pub unexpected: Vec<String>,
    /// Extra handler calls (calls - distinct ids handled).
    pub duplicates: usize,
    /// Time from the fault's end to the first handler call after it.
    pub resume: Option<Duration>,
}

impl Report {
    /// Compare the producer's ledger with the handler log and the DLQ contents.
    pub fn check(
        scenario: &str,
        ledger: &Ledger,
        calls: &BTreeMap<String, usize>,
        dead: &BTreeSet<String>,
        resume: Option<Duration>,
    ) -> Self {
        let handled: BTreeSet<&String> = calls.keys().collect();
        let lost = ledger
            .confirmed
            .iter()
            .filter(|id| !handled.contains(id) && !dead.contains(*id))
            .cloned()
            .collect();
        let unexpected = handled
            .iter()
            .map(|s| (*s).clone())
            .chain(dead.iter().cloned())
            .filter(|id| !ledger.attempted.contains(id))
            .collect();
        let handler_calls: usize = calls.values().sum();
        Self {
            scenario: scenario.to_owned(),
            attempted: ledger.attempted.len(),
            confirmed: ledger.confirmed.len(),
            unknown: ledger.unknown.len(),
            handled: handled.len(),
            handler_calls,
            dead_lettered: dead.len(),
            lost,
            unexpected,
            duplicates: handler_calls - handled.len(),
            resume,
        }
    }

    /// The verdict every fault scenario shares: no confirmed message lost, nothing in the
    /// handler log or DLQ that was never published, and consumption resumed after the fault.
    pub fn assert_nothing_lost_and_resumed(&self) {
        assert!(
            self.lost.is_empty(),
            "lost confirmed messages: {:?}",
            self.lost
        );
        assert!(
            self.unexpected.is_empty(),
            "unexpected: {:?}",
            self.unexpected
        );
        assert!(self.resume.is_some(), "consumption resumed after the fault");
    }

    /// One Markdown table row.
    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.scenario,
            self.attempted,
            self.confirmed,
            self.unknown,
            self.handled,
            self.dead_lettered,
            self.lost.len(),
            self.unexpected.len(),
            self.duplicates,
            self.resume
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
        )
    }

    /// Print the row and append it to `target/fault-report.md` (read by RELIABILITY.md's
    /// author; the file is rewritten by each suite run's first scenario).
    pub fn publish(&self) {
        let header = "| scenario | attempted | confirmed | unknown | handled | dead-lettered | lost | unexpected | duplicate calls | time to resume |\n|---|---|---|---|---|---|---|---|---|---|";
        eprintln!("{header}\n{}", self.row());
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fault-report.md");
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.is_empty() {
            text = format!("{header}\n");
        }
        text.push_str(&self.row());
        text.push('\n');
        let _ = std::fs::write(&path, text);
    }
}

/// Take every message out of `queue` (auto-ack), returning their ids.
pub async fn drain_ids(broker: &Broker, queue: &str) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    while let Some(m) = broker.get(queue).await {
        if let Some(id) = m.message_id() {
            ids.insert(id);
        }
    }
    ids
}

/// Wait until every confirmed id is handled or the work queue and the DLQ account for the
/// rest, or `within` passes.
pub async fn wait_settled(
    broker: &Broker,
    queue: &str,
    log: &Path,
    ledger: &Arc<Mutex<Ledger>>,
    within: Duration,
) {
    let t0 = Instant::now();
    let dlq = format!("{queue}.dlq");
    while t0.elapsed() < within {
        let calls = read_log(log);
        let dead = broker.ready_count(&dlq).await.unwrap_or(0) as usize;
        let confirmed = ledger
            .lock()
            .map(|l| l.confirmed.clone())
            .unwrap_or_default();
        let missing = confirmed
            .iter()
            .filter(|id| !calls.contains_key(*id))
            .count();
        let waiting = broker.ready_count(queue).await.unwrap_or(0);
        if missing <= dead && waiting == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A fresh log path under the target directory.
pub fn log_path(queue: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fault-logs");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{queue}.log"));
    let _ = std::fs::remove_file(&path);
    path
}
