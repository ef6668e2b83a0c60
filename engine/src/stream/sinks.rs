//! Sinks of a stream: each micro-batch is written and committed before the
//! source acknowledges it. A sink whose system is away retries the same
//! batch with backoff (nothing is dropped, nothing acknowledged meanwhile);
//! a shutdown during the wait leaves the batch unacknowledged, to be
//! delivered again. Rows the system refuses for their data are not retried:
//! they come back with the write, for the source's dead letter.

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::watch;

use crate::connectors::{registry, Backoff, Node, StreamSink, Written};
use crate::error::{Error, Result};
use crate::spec::model::Sink;
use crate::spec::Spec;

/// One sink of the stream.
pub struct SinkOp {
    pub id: String,
    pub input: String,
    sink: Box<dyn StreamSink>,
    /// The input's schema, where it is known before the first batch.
    schema: Option<SchemaRef>,
}

/// Why a write did not complete.
pub enum Stop {
    /// Shutdown came while the sink's system was away.
    Interrupted,
    Fatal(Error),
}

impl SinkOp {
    pub fn new(spec: &Spec, id: &str, sink: &Sink, schema: Option<SchemaRef>) -> Result<Self> {
        let Some(opener) = registry::stream_sink(sink.kind, sink.settings.as_ref()) else {
            return Err(Error::Internal(format!("sink '{id}': {} in a stream passed validation", sink.kind)));
        };
        let sink_op = opener.open_stream(Node { spec, id })?;
        for name in ["engine_events_in_total", "engine_sink_retries_total", "engine_sink_refused_total"] {
            metrics::counter!(name, "node" => id.to_string()).increment(0);
        }
        Ok(Self { id: id.to_string(), input: sink.input().value().clone(), sink: sink_op, schema })
    }

    /// A sink of the given kind, for the committer's tests.
    #[cfg(test)]
    pub(super) fn of(id: &str, input: &str, sink: Box<dyn StreamSink>) -> Self {
        Self { id: id.to_string(), input: input.to_string(), sink, schema: None }
    }

    /// Readies the sink for its first write where the input's schema is
    /// known: a PostgreSQL sink connects and checks its table, which took
    /// its first alert about 100 ms (and every batch behind it waited).
    pub async fn open(&mut self) {
        if let Some(schema) = self.schema.take() {
            if let Err(e) = self.sink.open(&schema).await {
                tracing::debug!(sink = %self.id, "not ready before its first write: {e}");
            }
        }
    }

    /// Writes and commits `batches`, retrying while the system is away.
    /// Problems of the user's making (a table that does not fit) stop the stream.
    pub async fn write(
        &mut self,
        batches: &[RecordBatch],
        shutdown: &watch::Receiver<bool>,
    ) -> std::result::Result<Written, Stop> {
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        if rows == 0 {
            return Ok(Written::default());
        }
        let mut backoff = Backoff::default();
        let mut failures = 0u32;
        loop {
            match self.sink.write(batches).await {
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
}
