//! The stream executor (`engine stream`): one source task reading
//! micro-batches, and a loop that runs each batch through the DAG's
//! transforms (rules compiled once, SQL planned once) into every sink, and
//! acknowledges the batch at the source only after every sink committed it.
//!
//! SIGINT/SIGTERM (or `--max-events`, `--for`) stop reading; batches already
//! read are finished and acknowledged, then the process exits 0. A sink whose
//! system is away holds the stream (with backoff) rather than dropping data.

mod commit;
pub mod http;
pub mod lookup;
mod ops;
mod signals;
mod sinks;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use datafusion::arrow::record_batch::RecordBatch;

use crate::connectors::{registry, Node, StreamArgs, StreamSource, Token};
use crate::error::{Error, Result};
use crate::plan::Plan;
use commit::{Commit, Committer};
use ops::{build, Executor};
use signals::spawn_stoppers;

/// How long a stream runs, and where it reports.
#[derive(Debug, Default, Clone)]
pub struct StreamOptions {
    pub metrics_addr: Option<SocketAddr>,
    /// Stop after this many events (at least; the batch in hand is finished).
    pub max_events: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// `--shard I/N`: read the source's partitions `p` with `p mod N == I`.
    pub shard: Option<(u32, u32)>,
}

/// What a stream did.
#[derive(Debug, Default)]
pub struct Summary {
    pub events: u64,
    pub batches: u64,
    pub written: Vec<(String, u64)>,
    /// Batches left unacknowledged by a shutdown while a sink was away.
    pub unfinished: u64,
    /// Rows sinks refused for their data (sent to the dead letter).
    pub refused: u64,
}

/// Runs a stream pipeline until it is told to stop.
pub async fn run(plan: &Plan, opts: StreamOptions) -> Result<Summary> {
    let pipeline = &plan.spec.pipeline;
    let is_lookup = |s| crate::plan::validate::is_lookup(&plan.spec, s);
    let (source_id, source) =
        match pipeline.sources.iter().filter(|(_, s)| !is_lookup(s)).collect::<Vec<_>>().as_slice() {
            [(id, s)] => ((*id).clone(), (*s).clone()),
            _ => {
                return Err(Error::Internal(
                    "a stream pipeline without one event source passed validation".into(),
                ))
            }
        };
    let lookup_ids: Vec<String> =
        pipeline.sources.iter().filter(|(_, s)| is_lookup(s)).map(|(id, _)| id.clone()).collect();
    let source_schema = plan
        .schemas
        .get(&source_id)
        .cloned()
        .ok_or_else(|| Error::Usage(format!("source '{source_id}': its schema must be declared")))?;
    // A shard that reads nothing is the user's mistake: said before any
    // connection is made.
    if let Some((i, n)) = opts.shard {
        let Some((partitions, _)) = source.settings.partitions() else {
            return Err(Error::Usage(format!(
                "--shard {i}/{n}: source '{source_id}' has no partitions to share (a redis stream with a group has)"
            )));
        };
        if i >= partitions {
            return Err(Error::Usage(format!(
                "--shard {i}/{n}: source '{source_id}' has {partitions} partitions, and shard {i} of {n} reads the partitions p with p mod {n} = {i}: none"
            )));
        }
    }
    crate::connectors::postgres::migrate_spec(&plan.spec).await?;
    let handle = http::recorder();
    let ctx = crate::transform::sql::session(crate::transform::sql::Purpose::Stream);
    let loaded = {
        let read_ctx = crate::transform::sql::session(crate::transform::sql::Purpose::Batch);
        lookup::load_all(&plan.spec, &read_ctx, &lookup_ids).await?
    };
    let tables: Vec<_> = loaded.iter().map(|(_, k)| k.lookup.clone()).collect();
    let (ops, sinks, statuses) = build(plan, &ctx, &source_id, &source_schema, &tables).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let spec = Arc::new(plan.spec.clone());
    let mut refreshing = Vec::new();
    for (id, kept) in &loaded {
        if let Some(every) = pipeline.sources.get(id).and_then(|s| s.refresh.as_ref()) {
            refreshing.push(lookup::keep_fresh(spec.clone(), id.clone(), kept, every.get(), stop_rx.clone()));
        }
    }
    let stop_tx = Arc::new(stop_tx);
    spawn_stoppers(stop_tx.clone(), opts.duration);
    let connected = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    if let Some(addr) = opts.metrics_addr {
        let handle = handle.ok_or_else(|| Error::Internal("metrics recorder already installed".into()))?;
        let health = Arc::new(http::Health {
            source_connected: connected.clone(),
            events: events.clone(),
            rules: statuses,
            lookups: loaded.iter().map(|(id, k)| (id.clone(), k.status.clone())).collect(),
        });
        let bound = http::serve(addr, handle, health).await?;
        tracing::info!("metrics on http://{bound}/metrics, health on http://{bound}/health");
    }
    let Some(opener) = registry::stream_source(source.kind, source.settings.as_ref()) else {
        return Err(Error::Usage(format!(
            "source '{source_id}': {} sources run with `engine run`",
            source.kind
        )));
    };
    let args = StreamArgs {
        schema: source_schema,
        shutdown: stop_rx.clone(),
        connected: connected.clone(),
        limit: opts.max_events,
        batch: source.batch.clone(),
        shard: opts.shard,
    };
    let ex_schema = args.schema.clone();
    // Every metric shows from the start, at zero, not from its first event.
    metrics::counter!("engine_events_out_total", "node" => source_id.clone()).increment(0);
    metrics::counter!("engine_dead_letters_total", "source" => source_id.clone()).increment(0);
    metrics::gauge!("engine_source_connected", "source" => source_id.clone()).set(0.0);
    let _ = metrics::histogram!("engine_batch_latency_seconds");
    let mut reader = opener.open_stream(Node { spec: &plan.spec, id: &source_id }, args)?;
    let mut acker = reader.acker()?;
    let mut ex = Executor::new(ops, tables);
    if acker.durable() {
        // Windows start where the last acknowledged batch left them: the
        // entries not acknowledged then are delivered again, and count once.
        let started = std::time::Instant::now();
        let saved = acker
            .load_state()
            .await
            .map_err(|e| Error::External { system: format!("source '{source_id}'"), message: e })?;
        let restored = ex.restore(crate::plan::validate::partitioned(&plan.spec), &saved);
        metrics::counter!("engine_window_state_missing_total", "source" => source_id.clone()).increment(0);
        if ex.windowed() {
            for stream in acker.missing_state() {
                metrics::counter!("engine_window_state_missing_total", "source" => source_id.clone()).increment(1);
                tracing::warn!(
                    source = %source_id,
                    "window state of '{stream}' is missing, though its group has read entries before: \
                     its windows start empty (was the key deleted, or evicted by the server's maxmemory-policy?)"
                );
            }
        }
        if restored.keys > 0 {
            let ms = started.elapsed().as_millis();
            tracing::info!(source = %source_id, "window state of {} keys restored in {ms} ms", restored.keys);
        }
        if restored.held > 0 {
            tracing::info!(source = %source_id, "{} events held for event-time order restored", restored.held);
        }
    }
    // Sinks and acknowledgements run in their own task, so batch N is
    // written while the transforms run on batch N + 1; batches are still
    // committed and acknowledged one at a time, in order.
    let (commit_tx, commit_rx) = mpsc::channel::<Commit>(2);
    let committer = Committer {
        sinks,
        acker,
        summary: Summary::default(),
        last_report: Instant::now(),
        last_events: 0,
        events,
        stop: stop_tx.clone(),
        max_events: opts.max_events,
    };
    let committing = tokio::spawn(committer.run(commit_rx, stop_rx.clone()));
    let mut failure = None;
    let idle = RecordBatch::new_empty(ex_schema.clone());
    loop {
        // While rules hold events for event-time order, a quiet source
        // still lets them go when their time comes: a tick runs an empty
        // batch through.
        let next = if ex.holding() > 0 {
            tokio::select! {
                d = reader.next() => Some(d),
                _ = tokio::time::sleep(TICK) => None,
            }
        } else {
            Some(reader.next().await)
        };
        let (batch, token, first_at) = match next {
            Some(Ok(Some(d))) => (d.batch, d.token, d.first_at),
            Some(Ok(None)) => break,
            Some(Err(e)) => {
                failure = Some(e);
                break;
            }
            None => (idle.clone(), Token::none(), Instant::now()),
        };
        if let Err(e) = step(&mut ex, &source_id, batch, token, first_at, false, &commit_tx).await {
            failure = e;
            break;
        }
    }
    // A stopping stream counts what its rules hold: the end of the input.
    if failure.is_none() && ex.holding() > 0 {
        if let Err(e) = step(&mut ex, &source_id, idle, Token::none(), Instant::now(), true, &commit_tx).await
        {
            failure = e;
        }
    }
    // The input ended (or a stop came): the batches read are committed
    // first. Only a stop (a signal, `--for`) cuts short a sink still
    // waiting for its system; the end of the input does not, a failure does.
    if failure.is_some() {
        let _ = stop_tx.send(true);
    }
    drop(commit_tx);
    let (summary, committed) = match committing.await {
        Ok(outcome) => outcome,
        Err(e) => (Summary::default(), Err(Error::Internal(format!("sink task: {e}")))),
    };
    let _ = stop_tx.send(true);
    failure = failure.or(committed.err());
    // Drain what the source still hands over after the stop (never
    // acknowledged: it is delivered again) until it ends, for its outcome.
    if failure.is_none() {
        failure = drain(reader.as_mut()).await.err();
    }
    drop(reader);
    for task in refreshing {
        task.abort();
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// How often rules holding events look at the clock while the source is quiet.
const TICK: Duration = Duration::from_millis(100);

/// Runs one batch through the transforms and hands it to the committer.
/// `Err(Some(e))`: the stream fails; `Err(None)`: the committer stopped
/// (its outcome says why).
async fn step(
    ex: &mut Executor,
    source_id: &str,
    batch: RecordBatch,
    token: Token,
    first_at: Instant,
    flush: bool,
    commit_tx: &mpsc::Sender<Commit>,
) -> std::result::Result<(), Option<Error>> {
    let events = batch.num_rows() as u64;
    let outputs = ex.batch(source_id, batch, flush).await.map_err(Some)?;
    let state = ex.changes().map_err(Some)?;
    let refused = std::mem::take(&mut ex.refused);
    commit_tx.send(Commit { outputs, events, token, first_at, state, refused }).await.map_err(|_| None)
}

/// Reads a stopped source to its end, dropping what it hands over.
async fn drain(reader: &mut dyn StreamSource) -> Result<()> {
    while reader.next().await?.is_some() {}
    Ok(())
}
