//! Committing micro-batches: each batch's outputs are written to every sink,
//! then acknowledged at the source, one batch at a time and in order, in
//! tasks of their own so that batch N is written while the transforms run
//! on batch N + 1, and a fast sink need not wait for a slow one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, watch};

use super::sinks::{SinkOp, Stop};
use super::Summary;
use crate::connectors::{Acker, Refused, State, Token, Written};
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
    /// Rows a transform failed on, for the dead letter before the acknowledgement.
    pub(super) refused: Vec<Refused>,
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

/// How many batches, and events, a sink may write ahead of the oldest batch
/// not yet acknowledged.
const AHEAD: usize = 64;
const AHEAD_EVENTS: u64 = 100_000;
/// And how many bytes of output: large events fill memory long before
/// [`AHEAD_EVENTS`]. A batch is always taken while none waits.
pub const AHEAD_BYTES: usize = 64 << 20;

/// The most batches a sink that fell behind writes in one go.
const COALESCE: usize = 16;

/// A batch handed to the sinks, waiting for all of them.
struct Pending {
    seq: u64,
    events: u64,
    token: Token,
    first_at: Instant,
    state: State,
    refused: Vec<Refused>,
    /// Bytes of its outputs.
    bytes: usize,
    /// Each sink's outcome, as they come.
    outcomes: Vec<Option<std::result::Result<Written, Stop>>>,
}

/// The batch number of a panicked sink's outcome.
const PANICKED: u64 = u64::MAX;

/// A sink's outcome for one batch: which sink, which batch.
type Outcome = (usize, u64, std::result::Result<Written, Stop>);

impl Committer {
    /// Commits batches until the executor is done or a sink stops the stream.
    ///
    /// Each sink writes in a task of its own, batch after batch in order, up
    /// to [`AHEAD`] batches ahead of the acknowledgements: a slow sink (a
    /// PostgreSQL write) does not hold back a fast one (the alerts channel).
    /// A batch is acknowledged once every sink wrote it, in order.
    pub(super) async fn run(
        mut self,
        mut batches: mpsc::Receiver<Commit>,
        stop: watch::Receiver<bool>,
    ) -> (Summary, Result<()>) {
        let (done_tx, mut done) = mpsc::channel::<Outcome>(AHEAD * (self.sinks.len() + 1));
        let mut lanes = Vec::new();
        let mut ids = Vec::new();
        for (i, sink) in std::mem::take(&mut self.sinks).into_iter().enumerate() {
            let (tx, rx) = mpsc::channel::<(u64, Vec<RecordBatch>)>(AHEAD);
            ids.push((sink.id.clone(), sink.input.clone()));
            let (id, done) = (sink.id.clone(), done_tx.clone());
            let run = lane(i, sink, rx, done_tx.clone(), stop.clone());
            tokio::spawn(async move {
                // A sink that panics (a bug) stops the stream with an
                // error naming it; unnoticed, its batches would wait for ever.
                use futures::FutureExt;
                if let Err(panic) = std::panic::AssertUnwindSafe(run).catch_unwind().await {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    let e = crate::error::Error::Internal(format!("sink '{id}' panicked: {what}"));
                    let _ = done.send((i, PANICKED, Err(Stop::Fatal(e)))).await;
                }
            });
            lanes.push(tx);
        }
        drop(done_tx);
        let mut queue: std::collections::VecDeque<Pending> = Default::default();
        let mut next_seq = 0u64;
        // Events and output bytes of the batches in `queue`.
        let mut ahead = 0u64;
        let mut ahead_bytes = 0usize;
        let mut open = true;
        loop {
            // The oldest batch, once every sink wrote it, is acknowledged.
            while queue.front().is_some_and(|p| p.outcomes.iter().all(Option::is_some)) {
                let Some(p) = queue.pop_front() else { break };
                ahead -= p.events;
                ahead_bytes -= p.bytes;
                let left = queue.len() + batches.len();
                match self.settle(p, &ids, &stop).await {
                    Ok(()) => {}
                    Err(None) => {
                        self.summary.unfinished += 1 + left as u64;
                        return (self.summary, Ok(()));
                    }
                    Err(Some(e)) => return (self.summary, Err(e)),
                }
            }
            if !open && queue.is_empty() {
                return (self.summary, Ok(()));
            }
            tokio::select! {
                c = batches.recv(), if open && queue.len() < AHEAD && ahead < AHEAD_EVENTS && (queue.is_empty() || ahead_bytes < AHEAD_BYTES) => match c {
                    Some(c) => {
                        let Commit { outputs, events, token, first_at, state, refused } = c;
                        let seq = next_seq;
                        next_seq += 1;
                        let bytes: usize = outputs.values().flatten().map(RecordBatch::get_array_memory_size).sum();
                        for ((_, input), lane) in ids.iter().zip(&lanes) {
                            let rows = outputs.get(input).cloned().unwrap_or_default();
                            // A lane ends only after reporting a fatal outcome, which ends this loop first.
                            let _ = lane.send((seq, rows)).await;
                        }
                        ahead += events;
                        ahead_bytes += bytes;
                        queue.push_back(Pending { seq, events, token, first_at, state, refused, bytes, outcomes: (0..lanes.len()).map(|_| None).collect() });
                    }
                    None => open = false,
                },
                o = done.recv(), if !queue.is_empty() => match o {
                    Some((_, PANICKED, Err(Stop::Fatal(e)))) => return (self.summary, Err(e)),
                    Some((sink, seq, outcome)) => {
                        if let Some(p) = queue.iter_mut().find(|p| p.seq == seq) {
                            p.outcomes[sink] = Some(outcome);
                        }
                    }
                    None => return (self.summary, Err(crate::error::Error::Internal("the sink tasks ended".into()))),
                },
            }
        }
    }

    /// Settles a batch every sink wrote: its refused rows to the dead
    /// letter, then its acknowledgement. `Err(None)`: shutdown stopped it
    /// (the batch stays unacknowledged).
    async fn settle(
        &mut self,
        p: Pending,
        ids: &[(String, String)],
        stop: &watch::Receiver<bool>,
    ) -> std::result::Result<(), Option<crate::error::Error>> {
        let mut refused: Vec<Refused> = p.refused;
        for ((id, _), outcome) in ids.iter().zip(p.outcomes) {
            let w = match outcome {
                Some(Ok(w)) => w,
                Some(Err(Stop::Interrupted)) | None => return Err(None),
                Some(Err(Stop::Fatal(e))) => return Err(Some(e)),
            };
            match self.summary.written.iter_mut().find(|(s, _)| s == id) {
                Some(s) => s.1 += w.rows,
                None => self.summary.written.push((id.clone(), w.rows)),
            }
            refused.extend(w.refused);
        }
        if !refused.is_empty() {
            // Stored before the acknowledgement: a batch acknowledged has
            // lost none of its rows.
            self.summary.refused += refused.len() as u64;
            if let Err(e) = self.acker.refuse(refused, stop).await {
                // Only at shutdown: this batch and the ones after it stay
                // unacknowledged (window state is saved in order).
                tracing::warn!("{e}; the batch will be delivered again");
                return Err(None);
            }
        }
        if let Err(e) = self.acker.ack(p.token, p.state, stop).await {
            tracing::warn!("{e}; the batch will be delivered again");
            return Err(None);
        }
        if p.events == 0 {
            return Ok(()); // a tick of the clock: rows released from hold
        }
        metrics::histogram!("engine_batch_latency_seconds").record(p.first_at.elapsed().as_secs_f64());
        let total = self.events.fetch_add(p.events, Ordering::Relaxed) + p.events;
        self.summary.events = total;
        self.summary.batches += 1;
        self.progress();
        if self.max_events.is_some_and(|m| total >= m) {
            let _ = self.stop.send(true);
        }
        Ok(())
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

/// One sink's task: writes the batches it is handed, in order, and reports
/// each outcome; ends after a fatal one.
///
/// A sink that fell behind (a PostgreSQL commit slower than the batches
/// come) writes the batches waiting for it in one go, up to [`COALESCE`]:
/// one commit for several batches keeps it up with the others, rather than
/// holding every sink back at [`AHEAD`]. The first batch of such a group
/// carries the group's outcome (its rows, and the rows refused, which so
/// reach the dead letter before any batch of the group is acknowledged);
/// the others report an empty write.
async fn lane(
    index: usize,
    mut sink: SinkOp,
    mut batches: mpsc::Receiver<(u64, Vec<RecordBatch>)>,
    done: mpsc::Sender<Outcome>,
    stop: watch::Receiver<bool>,
) {
    sink.open().await;
    while let Some((seq, mut input)) = batches.recv().await {
        let mut rest = Vec::new();
        while rest.len() + 1 < COALESCE {
            match batches.try_recv() {
                Ok((s, rows)) => {
                    rest.push(s);
                    input.extend(rows);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let outcome = sink.write(&input, &stop).await;
        if let Ok(w) = &outcome {
            tracing::debug!(sink = %sink.id, "{} rows of {} batches in {:?}", w.rows, 1 + rest.len(), started.elapsed());
            metrics::counter!("engine_events_in_total", "node" => sink.id.clone()).increment(w.rows);
            metrics::counter!("engine_sink_refused_total", "node" => sink.id.clone())
                .increment(w.refused.len() as u64);
        }
        // After a fatal outcome the stream stops at the group's first batch.
        let (written, fatal) = (outcome.is_ok(), matches!(outcome, Err(Stop::Fatal(_))));
        if done.send((index, seq, outcome)).await.is_err() || fatal {
            return;
        }
        for s in rest {
            let o = if written { Ok(Written::default()) } else { Err(Stop::Interrupted) };
            if done.send((index, s, o)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::{NoAck, StreamSink};
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    struct Panics;
    struct Takes;

    #[async_trait::async_trait]
    impl StreamSink for Panics {
        async fn write(&mut self, _: &[RecordBatch]) -> Result<Written> {
            panic!("a bug in a sink");
        }
    }

    #[async_trait::async_trait]
    impl StreamSink for Takes {
        async fn write(&mut self, batches: &[RecordBatch]) -> Result<Written> {
            Ok(Written::all(batches.iter().map(|b| b.num_rows() as u64).sum()))
        }
    }

    /// A sink task that panics ends the stream with an error naming the
    /// sink, while another sink goes on: it does not wait for ever.
    #[tokio::test]
    async fn a_sink_that_panics_stops_the_stream_with_an_error_not_a_stall() {
        let (stop_tx, stop_rx) = watch::channel(false);
        let committer = Committer {
            sinks: vec![SinkOp::of("bad", "out", Box::new(Panics)), SinkOp::of("good", "out", Box::new(Takes))],
            acker: Box::new(NoAck),
            summary: Summary::default(),
            last_report: Instant::now(),
            last_events: 0,
            events: Arc::default(),
            stop: Arc::new(stop_tx),
            max_events: None,
        };
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1]))]).expect("a batch");
        let (tx, rx) = mpsc::channel(2);
        let commit = Commit {
            outputs: HashMap::from([("out".to_string(), vec![batch])]),
            events: 1,
            token: Token::none(),
            first_at: Instant::now(),
            state: State::default(),
            refused: Vec::new(),
        };
        assert!(tx.send(commit).await.is_ok());
        let ran = tokio::time::timeout(std::time::Duration::from_secs(10), committer.run(rx, stop_rx)).await;
        let (_, outcome) = ran.expect("the committer ends rather than waiting for the panicked sink");
        let e = outcome.expect_err("an error");
        assert!(e.to_string().contains("sink 'bad'") && e.to_string().contains("panicked"), "{e}");
        drop(tx);
    }
}
