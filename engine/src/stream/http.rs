//! `--metrics-addr`: Prometheus metrics at `/metrics` and the stream's health
//! at `/health` (rules version and last reload error per rules transform,
//! each lookup table's version and last refresh error, source connected,
//! events so far).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::error::{Error, Result};
use crate::rules::watch::Status;

/// What `/health` reports.
pub struct Health {
    pub source_connected: Arc<AtomicBool>,
    pub events: Arc<AtomicU64>,
    pub rules: Vec<(String, Arc<Mutex<Status>>)>,
    pub lookups: Vec<(String, Arc<Mutex<super::lookup::LookupStatus>>)>,
}

impl Health {
    pub fn json(&self) -> (bool, String) {
        let connected = self.source_connected.load(Ordering::Relaxed);
        let (rules, lookups) = (statuses(&self.rules), statuses(&self.lookups));
        let failing = self.rules.iter().any(|(_, st)| st.lock().is_ok_and(|s| s.last_error.is_some()));
        let stale = self.lookups.iter().any(|(_, st)| st.lock().is_ok_and(|s| s.last_error.is_some()));
        let erring = self.rules.iter().any(|(_, st)| st.lock().is_ok_and(|s| s.failing_on_events()));
        let status = match (connected, failing, stale, erring) {
            (false, ..) => "source disconnected",
            (true, true, ..) => "rules reload failed",
            (true, false, true, _) => "lookup refresh failed",
            (true, false, false, true) => "rules failing on events",
            (true, false, false, false) => "ok",
        };
        let body = serde_json::json!({
            "status": status,
            "source_connected": connected,
            "events": self.events.load(Ordering::Relaxed),
            "rules": rules,
            "lookups": lookups,
        });
        (connected, serde_json::to_string_pretty(&body).unwrap_or_default())
    }
}

/// Each named status as JSON.
fn statuses<T: Clone + serde::Serialize>(
    list: &[(String, Arc<Mutex<T>>)],
) -> serde_json::Map<String, serde_json::Value> {
    list.iter()
        .map(|(name, st)| {
            let st = st.lock().unwrap_or_else(|e| e.into_inner()).clone();
            (name.clone(), serde_json::to_value(st).unwrap_or_default())
        })
        .collect()
}

/// Installs the process's metrics recorder (once).
pub fn recorder() -> Option<PrometheusHandle> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).ok()?;
    Some(handle)
}

/// Serves `/metrics` and `/health` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: PrometheusHandle, health: Arc<Health>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Usage(format!("--metrics-addr {addr}: cannot listen: {e}")))?;
    let bound = listener.local_addr().map_err(|e| Error::Usage(format!("--metrics-addr {addr}: {e}")))?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new().route("/metrics", get(move || std::future::ready(metrics.render()))).route(
        "/health",
        get(move || {
            let (ok, body) = health.json();
            let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            std::future::ready((code, [(header::CONTENT_TYPE, "application/json")], body))
        }),
    );
    tokio::spawn(accept(listener, app));
    Ok(bound)
}

/// Connections served at once; more are closed as they come.
const MAX_CONNECTIONS: usize = 64;
/// A request's head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection ends after this, whatever it is doing.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves connections one request each, at most [`MAX_CONNECTIONS`] at
/// once, each with a deadline: idle or slow clients (hundreds of open
/// sockets, a header sent a byte a minute) cannot use up the process's
/// file descriptors or memory. `axum::serve` has no such limits, hence
/// hyper's connection builder here.
async fn accept(listener: tokio::net::TcpListener, app: axum::Router) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!("metrics server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::counter!("engine_metrics_connections_refused_total").increment(1);
            drop(socket);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(socket);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(io, service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}
