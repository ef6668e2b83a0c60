//! Committing micro-batches: each batch's outputs are written to every sink
//! at once, then acknowledged at the source, one batch at a time and in
//! order, in a task of its own so that batch N is written while the
//! transforms run on batch N + 1.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, watch};

use super::sinks::{SinkOp, Stop};
use super::Summary;
use crate::connectors::{Acker, Refused, State, Token};
use crate::error::Result;

/// A transformed batch on its way to the sinks.
pub(super) struct Commit {
    pub(super) outputs: HashMap<String, Vec<RecordBatch>>,
    /// Events of the source batch.
    pub(super) events: u64,
    pub(super) token: Token,
    pub(super) first_at: Instant,
    /// The window state the batch changed, saved with its acknowledgement.
    pub(super) state: State,
}

/// Writes each batch to every sink, then acknowledges it at the source.
pub(super) struct Committer {
    pub(super) sinks: Vec<SinkOp>,
    pub(super) acker: Box<dyn Acker>,
    pub(super) summary: Summary,
    pub(super) last_report: Instant,
    pub(super) last_events: u64,
    pub(super) events: Arc<AtomicU64>,
    pub(super) stop: Arc<watch::Sender<bool>>,
    pub(super) max_events: Option<u64>,
}

impl Committer {
    /// Commits batches until the executor is done or a sink stops the stream.
    pub(super) async fn run(
        mut self,
        mut batches: mpsc::Receiver<Commit>,
        stop: watch::Receiver<bool>,
    ) -> (Summary, Result<()>) {
        while let Some(c) = batches.recv().await {
            let Commit { outputs, events, token, first_at, state } = c;
            let refused = match self.commit(&outputs, &stop).await {
                Ok(refused) => refused,
                Err(Stop::Interrupted) => {
                    self.summary.unfinished += 1 + batches.len() as u64;
                    return (self.summary, Ok(()));
                }
                Err(Stop::Fatal(e)) => return (self.summary, Err(e)),
            };
            if !refused.is_empty() {
                // Stored before the acknowledgement: a batch acknowledged has
                // lost none of its rows.
                self.summary.refused += refused.len() as u64;
                if let Err(e) = self.acker.refuse(refused, &stop).await {
                    // Only at shutdown: this batch and the ones after it
                    // stay unacknowledged (window state is saved in order).
                    tracing::warn!("{e}; the batch will be delivered again");
                    self.summary.unfinished += 1 + batches.len() as u64;
                    return (self.summary, Ok(()));
                }
            }
            if let Err(e) = self.acker.ack(token, state, &stop).await {
                tracing::warn!("{e}; the batch will be delivered again");
                self.summary.unfinished += 1 + batches.len() as u64;
                return (self.summary, Ok(()));
            }
            metrics::histogram!("engine_batch_latency_seconds").record(first_at.elapsed().as_secs_f64());
            let rows = events;
            let total = self.events.fetch_add(rows, Ordering::Relaxed) + rows;
            self.summary.events = total;
            self.summary.batches += 1;
            self.progress();
            if self.max_events.is_some_and(|m| total >= m) {
                let _ = self.stop.send(true);
            }
        }
        (self.summary, Ok(()))
    }

    /// Writes one batch's outputs to every sink, all at once; returns the
    /// rows the sinks refused.
    async fn commit(
        &mut self,
        outputs: &HashMap<String, Vec<RecordBatch>>,
        stop: &watch::Receiver<bool>,
    ) -> std::result::Result<Vec<Refused>, Stop> {
        let writes = self.sinks.iter_mut().map(|s| {
            let input = outputs.get(&s.input).cloned().unwrap_or_default();
            async move {
                let started = Instant::now();
                let w = s.write(&input, stop).await?;
                tracing::debug!(sink = %s.id, "{} rows in {:?}", w.rows, started.elapsed());
                metrics::counter!("engine_events_in_total", "node" => s.id.clone()).increment(w.rows);
                metrics::counter!("engine_sink_refused_total", "node" => s.id.clone())
                    .increment(w.refused.len() as u64);
                Ok::<_, Stop>((s.id.clone(), w))
            }
        });
        let mut refused = Vec::new();
        for outcome in futures::future::join_all(writes).await {
            let (id, w) = outcome?;
            match self.summary.written.iter_mut().find(|(s, _)| *s == id) {
                Some(s) => s.1 += w.rows,
                None => self.summary.written.push((id, w.rows)),
            }
            refused.extend(w.refused);
        }
        Ok(refused)
    }

    /// A progress line every 10 s.
    fn progress(&mut self) {
        let secs = self.last_report.elapsed().as_secs_f64();
        if secs < 10.0 {
            return;
        }
        let rate = (self.summary.events - self.last_events) as f64 / secs;
        let written: Vec<String> = self.summary.written.iter().map(|(s, n)| format!("{s} {n}")).collect();
        tracing::info!("{} events ({rate:.0}/s); written: {}", self.summary.events, written.join(", "));
        self.last_report = Instant::now();
        self.last_events = self.summary.events;
    }
}
