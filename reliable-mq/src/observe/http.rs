//! The HTTP endpoint (feature `http`), on axum:
//!
//! - `GET /health/live`: 200 while the process serves requests;
//! - `GET /health/ready`: 200 when every consumer is attached, the publisher connected and
//!   the dedup store answers, otherwise 503; both with the state as JSON, the 503 with
//!   the reasons; with an outbox relay (feature `postgres`), its backlog and failed rows
//!   (reported, not a reason to be unready);
//! - `GET /metrics`: the metrics in Prometheus text format (404 when the application
//!   installed a `metrics` recorder of its own).
//!
//! [`run`](crate::run) serves it on `RELIABLE_MQ_HTTP_ADDR` (e.g. `0.0.0.0:9090`) when
//! that is set; code can start it with [`RunningApp::serve_http`]. It stops with the app.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tracing::info;

use crate::app::HealthProbe;
use crate::{Error, Health, RunningApp};

/// The environment variable that makes [`run`](crate::run) serve the endpoint.
pub const ADDR_ENV: &str = "RELIABLE_MQ_HTTP_ADDR";

impl RunningApp {
    /// Serve `/health/live`, `/health/ready` and `/metrics` on `addr` (port 0: any free
    /// port) until the app shuts down. Returns the address it listens on.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), reliable_mq::Error> {
    /// let running = reliable_mq::App::from_env()?.start().await?;
    /// let addr = running.serve_http("0.0.0.0:9090").await?;
    /// println!("health on http://{addr}/health/ready");
    /// # Ok(()) }
    /// ```
    pub async fn serve_http(&self, addr: &str) -> Result<SocketAddr, Error> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("cannot listen for HTTP on {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::Config(format!("cannot listen for HTTP on {addr}: {e}")))?;
        let router = router(self.health_probe());
        let mut stop = self.shutdown_handle().signal();
        tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the HTTP endpoint stopped");
            }
        });
        info!(%local, "health and metrics on http://{local}/health/ready and /metrics");
        Ok(local)
    }
}

/// Serve the endpoint on `RELIABLE_MQ_HTTP_ADDR` when it is set.
pub(crate) async fn serve_from_env(running: &RunningApp) -> Result<(), Error> {
    match std::env::var(ADDR_ENV) {
        Ok(addr) if !addr.trim().is_empty() => running.serve_http(addr.trim()).await.map(|_| ()),
        _ => Ok(()),
    }
}

fn router(probe: HealthProbe) -> Router {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(probe)
}

async fn live() -> Response {
    json_response(StatusCode::OK, &json!({ "live": true }))
}

async fn ready(State(probe): State<HealthProbe>) -> Response {
    let health = probe.health().await;
    let status = if health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &readiness(&health))
}

async fn metrics() -> Response {
    match super::metrics::render() {
        Some(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "metrics go to the application's own `metrics` recorder\n",
        )
            .into_response(),
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The readiness document: the verdict, why not, and each consumer.
fn readiness(health: &Health) -> serde_json::Value {
    let mut reasons = Vec::new();
    for c in health.consumers.iter().filter(|c| !c.attached) {
        reasons.push(format!(
            "consumer {} is not attached to queue {}",
            c.name, c.queue
        ));
    }
    if !health.publisher_connected {
        reasons.push("the publisher is not connected to the broker".to_owned());
    }
    if !health.dedup_up {
        reasons.push("the dedup store does not answer".to_owned());
    }
    let consumers: Vec<_> = health
        .consumers
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "queue": c.queue,
                "attached": c.attached,
                "degraded": c.degraded,
            })
        })
        .collect();
    #[allow(unused_mut)] // Without `postgres` nothing is added.
    let mut doc = json!({
        "ready": health.is_ready(),
        "reasons": reasons,
        "consumers_attached": health.consumers_attached,
        "publisher_connected": health.publisher_connected,
        "dedup_up": health.dedup_up,
        "consumers": consumers,
    });
    #[cfg(feature = "postgres")]
    if let Some(outbox) = &health.outbox {
        doc["outbox"] = outbox_doc(outbox);
    }
    doc
}

/// The outbox part of the readiness document: reported, never a reason to be unready.
#[cfg(feature = "postgres")]
fn outbox_doc(outbox: &crate::postgres::OutboxHealth) -> serde_json::Value {
    let backlog = outbox.backlog;
    json!({
        "relays": outbox.relays,
        "relays_running": outbox.relays_running,
        "pending": backlog.map(|b| b.pending),
        "failed": backlog.map(|b| b.failed),
        "oldest_pending_seconds": backlog.and_then(|b| b.oldest_pending).map(|d| d.as_secs_f64()),
        "error": outbox.error,
    })
}
