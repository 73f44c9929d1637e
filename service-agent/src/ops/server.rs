//! The HTTP endpoints, as kube-proxy serves them: `/metrics`, `/healthz`
//! and `/proxyMode` on the metrics address, `/healthz` and `/livez` on the
//! health address.

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, response::IntoResponse, routing::get};

use super::{
    health::{Health, Probe},
    metrics::Metrics,
};
use crate::error::Context as _;

/// What `/proxyMode` answers (kube-proxy answers `iptables`, `ipvs` or
/// `nftables`).
pub const PROXY_MODE: &str = "ebpf";

#[derive(Clone)]
struct Endpoints {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

async fn metrics_handler(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    let body = tokio::task::spawn_blocking(move || endpoints.metrics.encode())
        .await
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

async fn healthz_handler(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    health_answer(&endpoints, Probe::Healthz)
}

async fn livez_handler(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    health_answer(&endpoints, Probe::Livez)
}

fn health_answer(endpoints: &Endpoints, probe: Probe) -> impl IntoResponse + use<> {
    let (code, body) = endpoints.health.report(probe);
    (
        code,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
}

async fn proxy_mode_handler() -> &'static str {
    PROXY_MODE
}

/// Serves `/metrics`, `/healthz` and `/proxyMode` on `metrics_addr`, and
/// `/healthz` and `/livez` on `healthz_addr`, until the runtime stops.
pub async fn serve(
    metrics_addr: SocketAddr,
    healthz_addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> crate::Result<()> {
    let endpoints = Endpoints { metrics, health };
    let metrics_router = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .route("/proxyMode", get(proxy_mode_handler))
        .with_state(endpoints.clone());
    let health_router = Router::new()
        .route("/healthz", get(healthz_handler))
        .route("/livez", get(livez_handler))
        .with_state(endpoints);
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("binding the metrics address {metrics_addr}"))?;
    let health_listener = tokio::net::TcpListener::bind(healthz_addr)
        .await
        .with_context(|| format!("binding the healthz address {healthz_addr}"))?;
    log::info!("metrics on http://{metrics_addr}/metrics, health on http://{healthz_addr}/healthz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(health_listener, health_router).await {
            log::error!("healthz server stopped: {e}");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, metrics_router).await {
            log::error!("metrics server stopped: {e}");
        }
    });
    Ok(())
}
