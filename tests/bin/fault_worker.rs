//! A consumer process for the fault suite: consumes `FAULT_QUEUE`, appends each handler
//! call's message id to `FAULT_LOG` (one line per call, O_APPEND, so the record survives
//! SIGKILL of this process and does not depend on the services under fault), and runs
//! until SIGINT/SIGTERM like any service built on `reliable_mq::run`.
//!
//! Environment: `FAULT_QUEUE`, `FAULT_LOG`, `FAULT_HANDLER_MS` (work per message),
//! `FAULT_CONCURRENCY`, `FAULT_IDEMPOTENT` (`1`: Redis dedup via `REDIS_URL`),
//! `FAULT_CONN_NAME`, `FAULT_QUEUE_TYPE` (`quorum`; default classic), plus the usual `AMQP_URL` / `REDIS_URL`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_mq::{App, Config, ConsumerConfig, Delivery, HandlerError, delivery_handler_fn};

fn env(key: &str) -> Result<String, String> {
    std::env::var(key).map_err(|_| format!("{key} must be set"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let queue = env("FAULT_QUEUE")?;
    let log_path = env("FAULT_LOG")?;
    let work = Duration::from_millis(env("FAULT_HANDLER_MS")?.parse()?);
    let concurrency: u16 = env("FAULT_CONCURRENCY")?.parse()?;
    let idempotent = env("FAULT_IDEMPOTENT")? == "1";

    let log = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?,
    ));
    let handler = delivery_handler_fn(move |_n: u64, d: Arc<Delivery>| {
        let log = Arc::clone(&log);
        async move {
            tokio::time::sleep(work).await;
            let id = d.message_id().unwrap_or("<none>").to_owned();
            // The side effect: one line per handler call, written before the ack.
            let mut file = log
                .lock()
                .map_err(|_| HandlerError::retry("log lock poisoned"))?;
            file.write_all(format!("{id}\n").as_bytes())?;
            Ok::<_, HandlerError>(())
        }
    });
    let mut consumer = ConsumerConfig::new(&queue, format!("{queue}.dlx"), handler)
        .with_prefetch(concurrency.saturating_mul(4).max(16))
        .with_concurrency(concurrency)
        .with_timeout(Duration::from_secs(2));
    if std::env::var("FAULT_QUEUE_TYPE").is_ok_and(|t| t == "quorum") {
        consumer = consumer.quorum(None);
    }
    if idempotent {
        // A short TTL is enough for the test; the lease follows the 2s timeout.
        consumer = consumer.idempotent(Duration::from_secs(600));
    }
    let config = Config::from_env()?
        .with_connection_name(env("FAULT_CONN_NAME")?)
        .with_shutdown_grace(Duration::from_secs(10))
        .with_publish_retries(30);
    App::new(config).consumer(consumer).run().await?;
    eprintln!("fault_worker: clean exit");
    Ok(())
}
