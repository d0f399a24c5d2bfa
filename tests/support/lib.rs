//! Shared helpers for the integration tests: unique names, a raw lapin side channel to
//! publish, inspect and clean up without going through the code under test, and polling
//! helpers with deadlines (never bare sleeps as assertions).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use reliable_mq::Config;

pub mod cluster;
pub mod fault;
pub mod raw;
pub mod recording;
pub mod redis;
pub mod tls;

/// The broker of this machine (or `AMQP_URL`).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The Redis of this machine (or `REDIS_URL`).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Whether the fault suites may run: they stop, kill and restart the machine's RabbitMQ,
/// Redis and PostgreSQL, so they run only when `RELIABLE_MQ_FAULTS=1` is set (`.ci/run`
/// sets it). Otherwise this prints one line saying the test was skipped and why, so the
/// skip is never silent, and returns `false`.
pub fn faults_enabled(test: &str) -> bool {
    switch_enabled(
        "RELIABLE_MQ_FAULTS",
        test,
        "it stops and restarts this machine's services",
    )
}

/// Whether the cluster suites may run (`RELIABLE_MQ_CLUSTER=1`); prints a skip line if not.
pub fn cluster_enabled(test: &str) -> bool {
    switch_enabled(
        "RELIABLE_MQ_CLUSTER",
        test,
        "it starts a private multi-node cluster",
    )
}

fn switch_enabled(switch: &str, test: &str, why: &str) -> bool {
    if std::env::var(switch).is_ok_and(|v| v == "1") {
        return true;
    }
    // Written to stderr directly, not with `eprintln!`, which the test harness captures:
    // the skip line shows in a plain `cargo test` run.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "skipped {test}: {why}; set {switch}=1 to run it"
    );
    false
}

/// A runtime config for tests: fast confirms, short grace, unique dedup prefix.
pub fn test_config(prefix: &str) -> Config {
    Config::default()
        .with_amqp_url(amqp_url())
        .with_shutdown_grace(Duration::from_secs(5))
        .with_confirm_timeout(Duration::from_secs(5))
        .with_dedup_prefix(format!("rmq-test:{prefix}"))
}

/// A name unique to this test run: `{base}-{8 hex}`.
pub fn unique(base: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{base}-{}", &id[..8])
}

/// Log to stderr once per process when `RUST_LOG` is set, without message bodies (the
/// directives the crate documents for that).
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let mut filter = tracing_subscriber::EnvFilter::from_default_env();
        for d in reliable_mq::Config::QUIET_LAPIN_DIRECTIVES {
            if let Ok(d) = d.parse() {
                filter = filter.add_directive(d);
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// A raw lapin connection for publishing test input and inspecting queues, independent
/// of the code under test.
pub struct Broker {
    /// The connection.
    pub connection: Connection,
    /// A confirm-mode channel.
    pub channel: Channel,
}

impl Broker {
    /// Connect to the test broker.
    pub async fn connect() -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ must be running on 127.0.0.1:5672 (rabbitmq-server -detached)");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Self {
            connection,
            channel,
        }
    }

    /// A fresh channel (for operations that may close it, like passive declares).
    pub async fn fresh_channel(&self) -> Channel {
        self.connection.create_channel().await.expect("channel")
    }

    /// Publish raw bytes with properties to `exchange`/`routing_key`, waiting for the confirm.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "broker nacked test input");
    }

    /// Publish JSON with a message id (as a well-behaved publisher would).
    pub async fn publish_json(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &serde_json::Value,
        message_id: &str,
    ) {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(message_id.into());
        let bytes = serde_json::to_vec(body).expect("json");
        self.publish_raw(exchange, routing_key, &bytes, props).await;
    }

    /// Whether `queue` exists (passive declare on a throwaway channel).
    pub async fn queue_exists(&self, queue: &str) -> bool {
        self.ready_count(queue).await.is_some()
    }

    /// Number of ready messages in `queue` (passive declare), `None` if it does not exist.
    pub async fn ready_count(&self, queue: &str) -> Option<u32> {
        let ch = self.fresh_channel().await;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        let _ = ch.close(200, "done".into()).await;
        Some(q.message_count())
    }

    /// Whether `exchange` exists.
    pub async fn exchange_exists(&self, exchange: &str) -> bool {
        let ch = self.fresh_channel().await;
        ch.exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok()
    }

    /// Take one message from `queue` (auto-ack), if any.
    pub async fn get(&self, queue: &str) -> Option<Got> {
        let msg = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")?;
        let d = msg.delivery;
        Some(Got {
            body: d.data,
            properties: d.properties,
            routing_key: d.routing_key.to_string(),
        })
    }

    /// Poll `queue` until a message arrives or `within` passes.
    pub async fn get_within(&self, queue: &str, within: Duration) -> Option<Got> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(m) = self.get(queue).await {
                return Some(m);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Delete queues and exchanges (missing ones are fine).
    pub async fn delete(&self, queues: &[&str], exchanges: &[&str]) {
        for q in queues {
            let ch = self.fresh_channel().await;
            let _ = ch
                .queue_delete((*q).into(), QueueDeleteOptions::default())
                .await;
        }
        for e in exchanges {
            let ch = self.fresh_channel().await;
            let _ = ch
                .exchange_delete((*e).into(), ExchangeDeleteOptions::default())
                .await;
        }
    }

    /// Delete everything a consumer of `queue` declares: queue, DLQ, DLX, retry tiers
    /// (`{queue}.retry.*` for the given delays), and `extra_exchanges`.
    pub async fn delete_consumer_topology(
        &self,
        queue: &str,
        dlx: &str,
        tiers: &[&str],
        extra_exchanges: &[&str],
    ) {
        let dlq = format!("{queue}.dlq");
        let tier_names: Vec<String> = tiers.iter().map(|t| format!("{queue}.retry.{t}")).collect();
        let mut queues: Vec<&str> = vec![queue, &dlq];
        queues.extend(tier_names.iter().map(String::as_str));
        let mut exchanges = vec![dlx];
        exchanges.extend_from_slice(extra_exchanges);
        self.delete(&queues, &exchanges).await;
    }
}

/// A message taken with [`Broker::get`].
#[derive(Debug)]
pub struct Got {
    /// Body bytes.
    pub body: Vec<u8>,
    /// Properties and headers.
    pub properties: BasicProperties,
    /// Routing key it arrived with.
    pub routing_key: String,
}

impl Got {
    /// A header as a string (string headers) or its debug form (others).
    pub fn header(&self, key: &str) -> Option<String> {
        let h = self.properties.headers().as_ref()?;
        match h.inner().get(key)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            AMQPValue::LongLongInt(n) => Some(n.to_string()),
            AMQPValue::LongInt(n) => Some(n.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    /// An integer header.
    pub fn header_int(&self, key: &str) -> Option<i64> {
        self.header(key)?.parse().ok()
    }

    /// All headers as strings.
    pub fn headers(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Some(h) = self.properties.headers().as_ref() {
            for k in h.inner().keys() {
                if let Some(v) = self.header(k.as_str()) {
                    out.insert(k.to_string(), v);
                }
            }
        }
        out
    }

    /// The message id.
    pub fn message_id(&self) -> Option<String> {
        self.properties.message_id().as_ref().map(|s| s.to_string())
    }
}

/// Poll `check` every 20ms until it returns true or `within` passes; returns the last result.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Run a shell command, returning whether it succeeded (for rabbitmqctl / redis-cli).
pub fn sh(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Close, from the broker side, every connection whose client-provided name contains
/// `name_part` (our connections are named `{Config::connection_name} ({role})`). Returns
/// how many were closed. Unlike `close_all_connections` this leaves other tests alone.
pub fn close_connections_named(name_part: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output();
    let Ok(out) = out else { return 0 };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(name_part)) {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let ok = std::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "close_connection",
                pid,
                "closed by a reliable-mq test",
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            closed += 1;
        }
    }
    closed
}

/// Messages in `queue` counting both ready and delivered-but-unacked ones (from
/// `rabbitmqctl list_queues`), `None` if the queue is not listed.
pub fn message_total(queue: &str) -> Option<u64> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "messages"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut parts = line.split_whitespace();
            (parts.next()? == queue).then(|| parts.next()?.parse().ok())?
        })
}

/// Deletes a test's broker objects (and Redis keys) when dropped, so a failing assertion
/// leaves nothing behind on the shared broker. Create it right after choosing the names.
#[derive(Debug, Default)]
pub struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
    redis_prefixes: Vec<String>,
}

impl Cleanup {
    /// Everything a consumer of `queue` declares: the queue, `{queue}.dlq`, `{queue}.dlx`,
    /// the retry tiers `{queue}.retry.{t}` for `tiers`, and `extra_exchanges`.
    pub fn consumer(queue: &str, tiers: &[&str], extra_exchanges: &[&str]) -> Self {
        let mut queues = vec![queue.to_owned(), format!("{queue}.dlq")];
        queues.extend(tiers.iter().map(|t| format!("{queue}.retry.{t}")));
        let mut exchanges = vec![format!("{queue}.dlx")];
        exchanges.extend(extra_exchanges.iter().map(|e| (*e).to_owned()));
        Self {
            queues,
            exchanges,
            redis_prefixes: Vec::new(),
        }
    }

    /// Also delete the Redis keys under `prefix:`.
    pub fn redis_keys(mut self, prefix: &str) -> Self {
        self.redis_prefixes.push(prefix.to_owned());
        self
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (queues, exchanges) = (
            std::mem::take(&mut self.queues),
            std::mem::take(&mut self.exchanges),
        );
        for prefix in &self.redis_prefixes {
            sh(&format!(
                "redis-cli -h 127.0.0.1 -p 6379 --scan --pattern '{prefix}:*' | xargs -r redis-cli -h 127.0.0.1 -p 6379 del >/dev/null 2>&1"
            ));
        }
        // Drop cannot await: delete from a short-lived runtime on its own thread (this also
        // works while the test's runtime is unwinding).
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(connection) =
                    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
                else {
                    return;
                };
                for q in &queues {
                    if let Ok(ch) = connection.create_channel().await {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                for e in &exchanges {
                    if let Ok(ch) = connection.create_channel().await {
                        let _ = ch
                            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                let _ = connection.close(200, "cleaned up".into()).await;
            });
        })
        .join();
    }
}

/// A minimal HTTP/1.1 GET over a fresh connection: status and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
