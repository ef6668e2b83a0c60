//! The http sink against a real HTTP server run by the test (axum on
//! loopback): every row arrives exactly once through answers of 5xx (tried
//! again) and 4xx (kept in the dead letter), in a batch run and in a stream;
//! an endpoint that never answers fails a batch run with its host, never its
//! path's secret.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::Value;

use super::{engine_env, scratch, text};

/// What the endpoint answers to the `n`-th request (from 0) with this body.
type Answer = dyn Fn(usize, &Value) -> u16 + Send + Sync;

/// Bodies answered 2xx, with their Authorization header.
type Delivered = Vec<(Option<String>, Value)>;

#[derive(Clone)]
struct Hook {
    answer: Arc<Answer>,
    requests: Arc<Mutex<usize>>,
    delivered: Arc<Mutex<Delivered>>,
}

async fn receive(State(h): State<Hook>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let n = {
        let mut r = h.requests.lock().expect("lock");
        *r += 1;
        *r - 1
    };
    let status = (h.answer)(n, &value);
    if (200..300).contains(&status) {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        h.delivered.lock().expect("lock").push((auth, value));
    }
    StatusCode::from_u16(status).expect("a status")
}

/// Starts the endpoint at `/hooks/T0/s3cret` on a free loopback port.
fn endpoint(answer: impl Fn(usize, &Value) -> u16 + Send + Sync + 'static) -> (Hook, u16) {
    let hook = Hook { answer: Arc::new(answer), requests: Arc::default(), delivered: Arc::default() };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let h = hook.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = axum::Router::new().route("/hooks/T0/s3cret", post(receive).put(receive)).with_state(h);
            let _ = axum::serve(listener, app).await;
        });
    });
    (hook, port)
}

/// The ids delivered, each with how many times it arrived.
fn delivered_ids(h: &Hook) -> BTreeMap<i64, usize> {
    let mut out = BTreeMap::new();
    for (_, body) in h.delivered.lock().expect("lock").iter() {
        let rows = match body {
            Value::Array(rows) => rows.clone(),
            one => vec![one.clone()],
        };
        for r in rows {
            *out.entry(r["id"].as_i64().expect("an id")).or_default() += 1;
        }
    }
    out
}

fn spec(mode: &str, source: &str, sink_extra: &str) -> String {
    format!(
        r#"version: 1
name: hook
mode: {mode}
sources:
  numbers: {source}
sinks:
  hook:
    type: http
    input: numbers
    url: "http://127.0.0.1:{{{{ env.HOOK_PORT }}}}/hooks/T0/{{{{ env.HOOK_SECRET }}}}"
    headers: {{ Authorization: "Bearer {{{{ env.HOOK_TOKEN }}}}" }}
{sink_extra}"#
    )
}

#[test]
fn a_batch_run_delivers_every_row_once_through_5xx_and_dead_letters_4xx() {
    let dir = scratch("http-batch");
    // Row 7 is refused (400); the first request and every 10th after it find
    // the endpoint away (503) and are sent again.
    let (hook, port) = endpoint(|n, body| match (n, body["id"].as_i64()) {
        (_, Some(7)) => 400,
        (n, _) if n % 10 == 0 => 503,
        _ => 200,
    });
    let source = "{ type: generate, rows: 40, columns: { id: n, label: \"concat('row ', n)\" } }";
    let text_spec = spec("batch", source, "    per: row\n    dead_letter: refused.jsonl\n");
    std::fs::write(dir.join("hook.yaml"), text_spec).expect("spec");
    let port_s = port.to_string();
    let env = [("HOOK_PORT", port_s.as_str()), ("HOOK_SECRET", "s3cret"), ("HOOK_TOKEN", "tok-1")];
    let out = engine_env(&dir, &["run", "hook.yaml"], &env);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let got = delivered_ids(&hook);
    let want: BTreeMap<i64, usize> = (0..40).filter(|i| *i != 7).map(|i| (i, 1)).collect();
    assert_eq!(got, want, "every row but the refused one, exactly once");
    assert!(hook
        .delivered
        .lock()
        .expect("lock")
        .iter()
        .all(|(auth, _)| auth.as_deref() == Some("Bearer tok-1")));
    let refused = std::fs::read_to_string(dir.join("refused.jsonl")).expect("a dead letter file");
    let lines: Vec<Value> = refused.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 1, "{refused}");
    assert_eq!(lines[0]["status"], 400);
    assert_eq!(lines[0]["rows"]["id"], 7);
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[test]
fn a_stream_sends_its_batches_through_an_outage_exactly_once() {
    let dir = scratch("http-stream");
    // The endpoint is away for its first five requests.
    let (hook, port) = endpoint(|n, _| if n < 5 { 500 } else { 200 });
    let source = "{ type: generate, rate: 2000/s, batch: { max_rows: 50 }, columns: { id: n } }";
    std::fs::write(dir.join("hook.yaml"), spec("stream", source, "")).expect("spec");
    let port_s = port.to_string();
    let env = [("HOOK_PORT", port_s.as_str()), ("HOOK_SECRET", "s3cret"), ("HOOK_TOKEN", "tok-2")];
    let out = engine_env(&dir, &["stream", "hook.yaml", "--max-events", "500"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let got = delivered_ids(&hook);
    let want: BTreeMap<i64, usize> = (0..500).map(|i| (i, 1)).collect();
    assert_eq!(got, want, "every event exactly once");
    assert!(*hook.requests.lock().expect("lock") > 5, "the outage was met");
}

#[test]
fn an_endpoint_that_stays_away_fails_the_run_naming_its_host_only() {
    let dir = scratch("http-away");
    let (_hook, port) = endpoint(|_, _| 503);
    let source = "{ type: generate, rows: 3, columns: { id: n } }";
    std::fs::write(dir.join("hook.yaml"), spec("batch", source, "    max_retries: 2\n")).expect("spec");
    let port_s = port.to_string();
    let env = [("HOOK_PORT", port_s.as_str()), ("HOOK_SECRET", "s3cret"), ("HOOK_TOKEN", "tok-3")];
    let out = engine_env(&dir, &["run", "hook.yaml"], &env);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains(&format!("sink 'hook' (http 127.0.0.1:{port})")), "{stderr}");
    assert!(stderr.contains("503"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[test]
fn no_server_at_all_is_an_outage_tried_again_then_reported() {
    let dir = scratch("http-closed");
    // A port nobody listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let source = "{ type: generate, rows: 2, columns: { id: n } }";
    std::fs::write(dir.join("hook.yaml"), spec("batch", source, "    max_retries: 1\n")).expect("spec");
    let port_s = port.to_string();
    let env = [("HOOK_PORT", port_s.as_str()), ("HOOK_SECRET", "s3cret"), ("HOOK_TOKEN", "tok-4")];
    let out = engine_env(&dir, &["run", "hook.yaml"], &env);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("retrying in"), "the outage is tried again first: {stderr}");
    assert!(stderr.contains(&format!("sink 'hook' (http 127.0.0.1:{port})")), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

/// Every request a server got: its method, path and headers.
type Seen = Arc<Mutex<Vec<(String, String, HeaderMap)>>>;

/// A server on a free loopback port answering every request with `status`
/// (and `location`, if given), keeping what it was sent.
fn recording(status: u16, location: Option<String>) -> (Seen, u16) {
    let seen: Seen = Arc::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let s = seen.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = axum::Router::new().fallback(
                move |method: axum::http::Method, uri: axum::http::Uri, headers: HeaderMap| {
                    s.lock().expect("lock").push((method.to_string(), uri.path().to_string(), headers));
                    let mut answer = axum::http::Response::builder().status(status);
                    if let Some(l) = &location {
                        answer = answer.header("location", l.as_str());
                    }
                    std::future::ready(answer.body(axum::body::Body::empty()).expect("a response"))
                },
            );
            let _ = axum::serve(listener, app).await;
        });
    });
    (seen, port)
}

#[test]
fn a_redirect_is_not_followed_and_its_rows_are_not_counted_delivered() {
    let dir = scratch("http-redirect");
    let (elsewhere, other) = recording(200, None);
    let (hook, port) = recording(302, Some(format!("http://127.0.0.1:{other}/collect")));
    let source = "{ type: generate, rows: 3, columns: { id: n } }";
    let sink = "    dead_letter: refused.jsonl\n";
    let text_spec = spec("batch", source, sink).replace(
        "headers: { Authorization: \"Bearer {{ env.HOOK_TOKEN }}\" }",
        "headers: { X-Api-Key: \"{{ env.HOOK_TOKEN }}\" }",
    );
    std::fs::write(dir.join("hook.yaml"), text_spec).expect("spec");
    let port_s = port.to_string();
    let env = [("HOOK_PORT", port_s.as_str()), ("HOOK_SECRET", "s3cret"), ("HOOK_TOKEN", "key-9")];
    let out = engine_env(&dir, &["run", "hook.yaml"], &env);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(hook.lock().expect("lock").len(), 1, "one request, answered 302");
    assert!(elsewhere.lock().expect("lock").is_empty(), "nothing, and no X-Api-Key, went to the other host");
    let refused = std::fs::read_to_string(dir.join("refused.jsonl")).expect("a dead letter file");
    let line: Value = serde_json::from_str(refused.lines().next().expect("a line")).expect("json line");
    assert_eq!(line["status"], 302, "{refused}");
    assert_eq!(line["rows"].as_array().map(Vec::len), Some(3), "{refused}");
    assert!(stderr.contains("redirect"), "{stderr}");
}
