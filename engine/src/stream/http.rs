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
        let status = match (connected, failing, stale) {
            (false, _, _) => "source disconnected",
            (true, true, _) => "rules reload failed",
            (true, false, true) => "lookup refresh failed",
            (true, false, false) => "ok",
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
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });
    Ok(bound)
}
