//! /metrics (Prometheus text format), /healthz (the process serves and its event loop goes
//! round), /readyz (every probe is attached).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::net::TcpListener;

use crate::telemetry::{self, Telemetry};

#[derive(Clone)]
pub struct HttpState {
    pub telemetry: Arc<Mutex<Telemetry>>,
    pub ready: Arc<AtomicBool>,
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|err| {
        anyhow::anyhow!(
            "cannot listen on --metrics-addr {addr}: {err}; choose another address or port \
             (e.g. --metrics-addr 127.0.0.1:0 for any free port)"
        )
    })
}

pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let mut telemetry = telemetry::lock(&state.telemetry);
    telemetry.refresh();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        telemetry.metrics.render(),
    )
}

async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    match telemetry::lock(&state.telemetry).pipeline_stalled() {
        None => (StatusCode::OK, "ok\n".to_owned()),
        Some(stalled) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the event pipeline has been stuck for {} s\n",
                stalled.as_secs()
            ),
        ),
    }
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "probes not attached yet\n")
    }
}
