//! Sinks of a stream: each micro-batch is written and committed before the
//! source acknowledges it. A sink whose system is away retries the same
//! batch with backoff (nothing is dropped, nothing acknowledged meanwhile);
//! a shutdown during the wait leaves the batch unacknowledged, to be
//! delivered again.

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use sqlx::PgConnection;
use tokio::sync::watch;

use crate::connectors::postgres::sink::StreamTarget;
use crate::connectors::redis::Backoff;
use crate::connectors::{postgres, redis as redis_conn, stdout};
use crate::error::{Error, Result};
use crate::spec::model::{Connection, PostgresSink, RedisSink, Sink, StdoutSink};
use crate::spec::Spec;

enum Kind {
    Redis { client: redis::Client, url: String, conn: Option<redis::aio::ConnectionManager>, sink: RedisSink },
    Postgres { name: String, url: String, conn: Option<(PgConnection, StreamTarget)>, sink: PostgresSink },
    Stdout(StdoutSink),
}

/// One sink of the stream.
pub struct SinkOp {
    pub id: String,
    pub input: String,
    kind: Kind,
}

/// Why a write did not complete.
pub enum Stop {
    /// Shutdown came while the sink's system was away.
    Interrupted,
    Fatal(Error),
}

impl SinkOp {
    pub fn new(spec: &Spec, id: &str, sink: &Sink) -> Result<Self> {
        let url =
            |name: &str| spec.pipeline.connections.get(name).map(|c| c.url().to_string()).unwrap_or_default();
        let kind = match sink {
            Sink::Redis(r) => {
                let name = r.connection.value();
                let url = url(name);
                Kind::Redis { client: redis_conn::client(name, &url)?, url, conn: None, sink: r.clone() }
            }
            Sink::Postgres(p) => {
                let name = p.connection.value().clone();
                let url = match spec.pipeline.connections.get(&name) {
                    Some(Connection::Postgres(c)) => c.url.clone(),
                    _ => url(&name),
                };
                Kind::Postgres { name, url, conn: None, sink: p.clone() }
            }
            Sink::Stdout(s) => Kind::Stdout(s.clone()),
            Sink::File(_) | Sink::Mongodb(_) => {
                return Err(Error::Internal(format!(
                    "sink '{id}': {} in a stream passed validation",
                    sink.kind().name()
                )))
            }
        };
        Ok(Self { id: id.to_string(), input: sink.input().value().clone(), kind })
    }

    /// Writes and commits `batches`, retrying while the system is away.
    /// Problems of the user's making (a table that does not fit) stop the stream.
    pub async fn write(
        &mut self,
        batches: &[RecordBatch],
        shutdown: &watch::Receiver<bool>,
    ) -> std::result::Result<u64, Stop> {
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        if rows == 0 {
            return Ok(0);
        }
        let mut backoff = Backoff::default();
        let mut failures = 0u32;
        loop {
            match self.try_write(batches).await {
                Ok(n) => {
                    if failures > 0 {
                        tracing::info!(sink = %self.id, "written again after {failures} failed attempts");
                    }
                    return Ok(n);
                }
                Err(Error::External { system, message }) => {
                    failures += 1;
                    let wait = backoff.wait();
                    if failures == 1 || failures % 10 == 0 {
                        tracing::warn!(sink = %self.id, "{system}: {message}; retrying in {wait:?} (attempt {failures})");
                    }
                    metrics::counter!("engine_sink_retries_total", "node" => self.id.clone()).increment(1);
                    let mut shutdown = shutdown.clone();
                    if *shutdown.borrow() {
                        return Err(Stop::Interrupted);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return Err(Stop::Interrupted),
                    }
                }
                Err(other) => return Err(Stop::Fatal(other)),
            }
        }
    }

    async fn try_write(&mut self, batches: &[RecordBatch]) -> Result<u64> {
        match &mut self.kind {
            Kind::Redis { client, url, conn, sink } => {
                let name = sink.connection.value().clone();
                let ext = |e: &dyn std::fmt::Display| redis_conn::external(&name, url, e);
                let c = match conn {
                    Some(c) => c,
                    None => conn.insert(client.get_connection_manager().await.map_err(|e| ext(&e))?),
                };
                redis_conn::sink::write(c, sink, batches).await.map_err(|e| ext(&e))
            }
            Kind::Postgres { name, url, conn, sink } => {
                let json = crate::connectors::json_array(batches).map_err(Error::Internal)?;
                let (c, target) = match conn {
                    Some(c) => c,
                    None => {
                        let mut c = postgres::connect(name, url).await?;
                        let target = StreamTarget::new(&mut c, &self.id, sink, &batches[0].schema()).await?;
                        conn.insert((c, target))
                    }
                };
                match target.write(c, &json).await {
                    Ok(()) => Ok(rows(batches)),
                    Err(e) => {
                        *conn = None; // opened again (and the table checked again) on the next attempt
                        Err(postgres::external(name, url, e))
                    }
                }
            }
            Kind::Stdout(s) => {
                let schema = batches[0].schema();
                let owned: Vec<_> = batches.iter().cloned().map(Ok).collect();
                let input = Box::pin(RecordBatchStreamAdapter::new(schema, futures::stream::iter(owned)));
                stdout::write(s, input).await
            }
        }
    }
}

fn rows(batches: &[RecordBatch]) -> u64 {
    batches.iter().map(|b| b.num_rows() as u64).sum()
}
