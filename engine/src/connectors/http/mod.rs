//! The http sink: rows as JSON in POST (or PUT) requests, one per batch or
//! per row, so alerts and loads can reach a webhook.
//!
//! An answer is classified the way it must be handled:
//! - 2xx: delivered.
//! - 5xx, 408, 429, a timeout or no connection: the endpoint is away; the
//!   same request is tried again with backoff (a batch run gives up after
//!   `max_retries` and fails; a stream retries until the endpoint is back, its
//!   source unacknowledged meanwhile).
//! - any other 4xx: the endpoint refuses these rows; they go to the dead
//!   letter with the status and the answer, and the rest goes on.

pub mod config;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;

use super::codec::{json_array, json_rows};
use super::{Backoff, BatchSink, Node, OpenStreamSink, StreamSink, Written};
use crate::error::{Error, Result};
use crate::spec::redact::redact_url;
use config::{HttpSink, Method, Per};

/// How a request ended.
#[derive(Debug)]
enum Outcome {
    Delivered,
    /// Worth trying again: the endpoint or the network is away.
    Away(String),
    /// The endpoint refuses the request: status and answer.
    Refused(u16, String),
}

/// One endpoint with its client, headers and dead letter.
struct Endpoint {
    id: String,
    url: String,
    method: Method,
    per: Per,
    client: reqwest::Client,
    headers: reqwest::header::HeaderMap,
    dead_letter: Option<PathBuf>,
    max_retries: u32,
}

impl Endpoint {
    fn new(node: Node<'_>, s: &HttpSink) -> Result<Self> {
        let timeout = s.timeout.as_ref().map_or(Duration::from_secs(10), |t| t.get());
        // A redirect is not followed: reqwest would turn a 302'd POST into
        // a GET (the rows unsent, yet counted delivered) and could carry
        // the sink's secret headers to another host.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .build()
            .map_err(|e| Error::Internal(format!("sink '{}': http client: {e}", node.id)))?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/json"),
        );
        for (k, v) in &s.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| Error::Usage(format!("sink '{}': header '{k}': {e}", node.id)))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|e| Error::Usage(format!("sink '{}': header '{k}': {e}", node.id)))?;
            headers.insert(name, value);
        }
        Ok(Self {
            id: node.id.to_string(),
            url: s.url.value().clone(),
            method: s.method,
            per: s.per,
            client,
            headers,
            dead_letter: s.dead_letter.as_ref().map(|p| node.spec.resolve(p.value())),
            max_retries: s.max_retries.unwrap_or(5),
        })
    }

    /// The bodies of one batch's requests with their row counts.
    fn bodies(&self, batches: &[RecordBatch]) -> Result<Vec<(Vec<u8>, u64)>> {
        let what = |e: String| Error::Internal(format!("sink '{}': rows as JSON: {e}", self.id));
        Ok(match self.per {
            Per::Batch => {
                let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
                vec![(json_array(batches).map_err(what)?.into_bytes(), rows)]
            }
            Per::Row => json_rows(batches).map_err(what)?.into_iter().map(|r| (r, 1)).collect(),
        })
    }

    async fn send(&self, body: &[u8]) -> Outcome {
        let request = match self.method {
            Method::Post => self.client.post(&self.url),
            Method::Put => self.client.put(&self.url),
        };
        let answer = request.headers(self.headers.clone()).body(body.to_vec()).send().await;
        let response = match answer {
            Ok(r) => r,
            Err(e) => return Outcome::Away(self.scrub(&e.without_url().to_string())),
        };
        let status = response.status();
        if status.is_success() {
            return Outcome::Delivered;
        }
        if status.is_redirection() {
            let to = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| self.url_host(l))
                .unwrap_or_else(|| "elsewhere".into());
            tracing::warn!(sink = %self.id, "the endpoint answered {status}, a redirect to {to}: not followed");
            return Outcome::Refused(status.as_u16(), format!("redirect to {to} not followed"));
        }
        // The answer is read up to 64 KiB: an endpoint cannot fill memory.
        let mut response = response;
        let mut raw = Vec::new();
        while raw.len() < 65_536 {
            match response.chunk().await {
                Ok(Some(c)) => raw.extend_from_slice(&c[..c.len().min(65_536 - raw.len())]),
                _ => break,
            }
        }
        let text: String = String::from_utf8_lossy(&raw).chars().take(1000).collect();
        match status.as_u16() {
            408 | 429 => Outcome::Away(format!("{status}: {text}")),
            s if status.is_server_error() => Outcome::Away(format!("{s}: {text}")),
            s => Outcome::Refused(s, text),
        }
    }

    /// The host (and port) of a redirect's `Location`, relative to the endpoint.
    fn url_host(&self, location: &str) -> Option<String> {
        let base = reqwest::Url::parse(&self.url).ok()?;
        let to = base.join(location).ok()?;
        Some(match to.port() {
            Some(p) => format!("{}:{p}", to.host_str()?),
            None => to.host_str()?.to_string(),
        })
    }

    fn scrub(&self, text: &str) -> String {
        text.replace(&self.url, &redact_url(&self.url))
    }

    /// An error naming the endpoint by its host, never its path or password.
    fn away(&self, message: String) -> Error {
        Error::External { system: format!("sink '{}' (http {})", self.id, config::host(&self.url)), message }
    }

    /// Keeps a refused request's rows with the endpoint's answer.
    fn refuse(&self, status: u16, answer: &str, body: &[u8], rows: u64) -> Result<()> {
        metrics::counter!("engine_sink_dead_letters_total", "node" => self.id.clone()).increment(rows);
        let Some(path) = &self.dead_letter else {
            tracing::warn!(sink = %self.id, "the endpoint refused {rows} rows ({status}): {answer}");
            return Ok(());
        };
        let rows: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
        let line = serde_json::json!({ "sink": self.id, "status": status, "answer": answer, "rows": rows });
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        writeln!(file, "{line}").and_then(|()| file.sync_data()).map_err(|e| Error::io(path, e))?;
        tracing::warn!(sink = %self.id, "the endpoint refused a request ({status}); kept in {}", path.display());
        Ok(())
    }

    /// Sends one batch's requests once each; `Err` (the endpoint is away)
    /// leaves the rest unsent, to be tried again from `from`.
    async fn attempt(&self, bodies: &[(Vec<u8>, u64)], from: &mut usize, sent: &mut u64) -> Result<()> {
        while let Some((body, rows)) = bodies.get(*from) {
            match self.send(body).await {
                Outcome::Delivered => *sent += rows,
                Outcome::Refused(status, answer) => self.refuse(status, &answer, body, *rows)?,
                Outcome::Away(message) => return Err(self.away(message)),
            }
            *from += 1;
        }
        Ok(())
    }
}

/// The batch run's writes: every record batch of the input, each request
/// retried with backoff up to `max_retries` times.
#[async_trait::async_trait]
impl BatchSink for HttpSink {
    async fn write(&self, node: Node<'_>, mut input: SendableRecordBatchStream) -> Result<u64> {
        let endpoint = Endpoint::new(node, self)?;
        let mut sent = 0u64;
        while let Some(batch) = input.next().await {
            let batch = batch.map_err(|e| crate::spec::sql::df_error(&format!("sink '{}'", node.id), e))?;
            if batch.num_rows() == 0 {
                continue;
            }
            let bodies = endpoint.bodies(&[batch])?;
            let (mut from, mut backoff, mut failures) = (0, Backoff::default(), 0u32);
            while let Err(e) = endpoint.attempt(&bodies, &mut from, &mut sent).await {
                failures += 1;
                if failures > endpoint.max_retries {
                    return Err(e);
                }
                let wait = backoff.wait();
                tracing::warn!(sink = %node.id, "{e}; retrying in {wait:?} (attempt {failures})");
                tokio::time::sleep(wait).await;
            }
        }
        Ok(sent)
    }
}

impl OpenStreamSink for HttpSink {
    fn open_stream(&self, node: Node<'_>) -> Result<Box<dyn StreamSink>> {
        Ok(Box::new(Streaming { endpoint: Endpoint::new(node, self)?, pending: None }))
    }
}

/// A stream's http sink. A batch whose requests were partly sent when the
/// endpoint went away resumes where it stopped, so a retried batch sends no
/// request twice.
struct Streaming {
    endpoint: Endpoint,
    pending: Option<Pending>,
}

/// A batch being sent: its request bodies (with their rows), the next one
/// to send, and the rows delivered so far.
struct Pending {
    bodies: Vec<(Vec<u8>, u64)>,
    next: usize,
    sent: u64,
}

#[async_trait::async_trait]
impl StreamSink for Streaming {
    async fn write(&mut self, batches: &[RecordBatch]) -> Result<Written> {
        let mut p = match self.pending.take() {
            Some(p) => p,
            None => Pending { bodies: self.endpoint.bodies(batches)?, next: 0, sent: 0 },
        };
        match self.endpoint.attempt(&p.bodies, &mut p.next, &mut p.sent).await {
            Ok(()) => Ok(Written::all(p.sent)),
            Err(e) => {
                self.pending = Some(p);
                Err(e)
            }
        }
    }
}
