//! The stream executor (`engine stream`): one source task reading
//! micro-batches, and a loop that runs each batch through the DAG's
//! transforms (rules compiled once, SQL planned once) into every sink, and
//! acknowledges the batch at the source only after every sink committed it.
//!
//! SIGINT/SIGTERM (or `--max-events`, `--for`) stop reading; batches already
//! read are finished and acknowledged, then the process exits 0. A sink whose
//! system is away holds the stream (with backoff) rather than dropping data.

pub mod decode;
pub mod http;
mod sinks;
pub mod sql;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::Int64Array;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::{SessionConfig, SessionContext};
use petgraph::Direction;
use tokio::sync::{mpsc, watch};

use crate::connectors::redis::dead_letter::DeadLetters;
use crate::connectors::redis::source::{self as redis_source, Delivery};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::rules::eval::CompiledRules;
use crate::rules::watch::{self as rules_watch, Watching};
use crate::rules::window::Windows;
use crate::spec::model::{GenerateSource, RedisSource, Source, Transform};
use sinks::{SinkOp, Stop};

/// How long a stream runs, and where it reports.
#[derive(Debug, Default, Clone)]
pub struct StreamOptions {
    pub metrics_addr: Option<SocketAddr>,
    /// Stop after this many events (at least; the batch in hand is finished).
    pub max_events: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

/// What a stream did.
#[derive(Debug, Default)]
pub struct Summary {
    pub events: u64,
    pub batches: u64,
    pub written: Vec<(String, u64)>,
    /// Batches left unacknowledged by a shutdown while a sink was away.
    pub unfinished: u64,
}

/// A session for stream queries: one partition (a micro-batch is small, and
/// plans without repartitioning can run again and again), the engine's
/// functions, and a `now()` read per batch.
pub fn session() -> SessionContext {
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    crate::transform::sql::register_functions(&ctx);
    crate::transform::generate::register(&ctx);
    ctx.register_udf(ScalarUDF::from(crate::transform::sql::LiveNow::new()));
    ctx
}

/// A rules transform in a running stream.
struct RulesOp {
    id: String,
    input: String,
    current: Arc<CompiledRules>,
    windows: HashMap<String, Windows>,
    watching: Option<Watching>,
}

impl RulesOp {
    fn run(&mut self, input: &[RecordBatch]) -> Result<RecordBatch> {
        if let Some(w) = &mut self.watching {
            if w.rules.has_changed().unwrap_or(false) {
                let next = w.rules.borrow_and_update().clone();
                self.windows = next.windows(std::mem::take(&mut self.windows));
                self.current = next;
            }
        }
        let batch = match input {
            [one] => one.clone(),
            _ => concat_batches(&self.current_input_schema(input), input)
                .map_err(|e| Error::Internal(e.to_string()))?,
        };
        let (alerts, hits) = self
            .current
            .evaluate(&batch, &mut self.windows, now_us())
            .map_err(|e| Error::External { system: format!("transform '{}'", self.id), message: e })?;
        for h in hits {
            let mode = if h.mode == crate::rules::RuleMode::Shadow { "shadow" } else { "live" };
            metrics::counter!("engine_rule_hits_total", "node" => self.id.clone(), "rule" => h.rule, "mode" => mode)
                .increment(h.count as u64);
        }
        Ok(alerts)
    }

    fn current_input_schema(&self, input: &[RecordBatch]) -> SchemaRef {
        input.first().map(|b| b.schema()).unwrap_or_else(|| Arc::new(Schema::empty()))
    }
}

enum Op {
    Rules(RulesOp),
    Sql(sql::SqlOp),
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// Runs a stream pipeline until it is told to stop.
pub async fn run(plan: &Plan, opts: StreamOptions) -> Result<Summary> {
    let pipeline = &plan.spec.pipeline;
    let (source_id, source) = match pipeline.sources.iter().collect::<Vec<_>>().as_slice() {
        [(id, s)] => ((*id).clone(), (*s).clone()),
        _ => return Err(Error::Internal("a stream pipeline with several sources passed validation".into())),
    };
    let source_schema = plan
        .schemas
        .get(&source_id)
        .cloned()
        .ok_or_else(|| Error::Usage(format!("source '{source_id}': its schema must be declared")))?;
    crate::connectors::postgres::migrate_spec(&plan.spec).await?;
    let handle = http::recorder();
    let ctx = session();
    let (ops, sinks, statuses) = build(plan, &ctx, &source_id, &source_schema).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
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
        });
        let bound = http::serve(addr, handle, health).await?;
        tracing::info!("metrics on http://{bound}/metrics, health on http://{bound}/health");
    }
    let (tx, mut rx) = mpsc::channel::<Delivery>(4);
    let control = redis_source::Control { shutdown: stop_rx.clone(), connected: connected.clone() };
    let reader = spawn_source(plan, &source_id, &source, source_schema, tx, control, opts.max_events)?;
    // Sinks and acknowledgements run in their own task, so batch N is
    // written while the transforms run on batch N + 1; batches are still
    // committed and acknowledged one at a time, in order.
    let (commit_tx, commit_rx) = mpsc::channel::<Commit>(2);
    let committer = Committer {
        sinks,
        acker: Acker::new(plan, &source)?,
        summary: Summary::default(),
        last_report: Instant::now(),
        last_events: 0,
        events,
        stop: stop_tx.clone(),
        max_events: opts.max_events,
    };
    let committing = tokio::spawn(committer.run(commit_rx, stop_rx.clone()));
    let mut ex = Executor { ops };
    let mut failure = None;
    while let Some(d) = rx.recv().await {
        let events = d.batch.num_rows() as u64;
        let outputs = match ex.batch(&source_id, d.batch).await {
            Ok(o) => o,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        if commit_tx.send(Commit { outputs, events, ids: d.ids, first_at: d.first_at }).await.is_err() {
            break; // the committer stopped: its outcome says why
        }
    }
    let _ = stop_tx.send(true);
    drop(commit_tx);
    // What the source read after a failure is never acknowledged; stop it.
    drop(rx);
    let (summary, committed) = match committing.await {
        Ok(outcome) => outcome,
        Err(e) => (Summary::default(), Err(Error::Internal(format!("sink task: {e}")))),
    };
    failure = failure.or(committed.err());
    match reader.await {
        Ok(Err(e)) => failure = failure.or(Some(e)),
        Err(e) => failure = failure.or(Some(Error::Internal(format!("source task: {e}")))),
        Ok(Ok(())) => {}
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// A transformed batch on its way to the sinks.
struct Commit {
    outputs: HashMap<String, Vec<RecordBatch>>,
    /// Events of the source batch.
    events: u64,
    ids: Vec<String>,
    first_at: Instant,
}

/// Writes each batch to every sink, then acknowledges it at the source.
struct Committer {
    sinks: Vec<SinkOp>,
    acker: Acker,
    summary: Summary,
    last_report: Instant,
    last_events: u64,
    events: Arc<AtomicU64>,
    stop: Arc<watch::Sender<bool>>,
    max_events: Option<u64>,
}

impl Committer {
    /// Commits batches until the executor is done or a sink stops the stream.
    async fn run(
        mut self,
        mut batches: mpsc::Receiver<Commit>,
        stop: watch::Receiver<bool>,
    ) -> (Summary, Result<()>) {
        while let Some(c) = batches.recv().await {
            match self.commit(&c.outputs, &stop).await {
                Ok(()) => {}
                Err(Stop::Interrupted) => {
                    self.summary.unfinished += 1 + batches.len() as u64;
                    return (self.summary, Ok(()));
                }
                Err(Stop::Fatal(e)) => return (self.summary, Err(e)),
            }
            if let Err(e) = self.acker.ack(&c.ids, &stop).await {
                tracing::warn!("{e}; the batch will be delivered again");
            }
            metrics::histogram!("engine_batch_latency_seconds").record(c.first_at.elapsed().as_secs_f64());
            let rows = c.events;
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

    /// Writes one batch's outputs to every sink, all at once.
    async fn commit(
        &mut self,
        outputs: &HashMap<String, Vec<RecordBatch>>,
        stop: &watch::Receiver<bool>,
    ) -> std::result::Result<(), Stop> {
        let writes = self.sinks.iter_mut().map(|s| {
            let input = outputs.get(&s.input).cloned().unwrap_or_default();
            async move {
                let started = Instant::now();
                let n = s.write(&input, stop).await?;
                tracing::debug!(sink = %s.id, "{n} rows in {:?}", started.elapsed());
                metrics::counter!("engine_events_in_total", "node" => s.id.clone()).increment(n);
                Ok::<_, Stop>((s.id.clone(), n))
            }
        });
        for outcome in futures::future::join_all(writes).await {
            let (id, n) = outcome?;
            match self.summary.written.iter_mut().find(|(s, _)| *s == id) {
                Some(w) => w.1 += n,
                None => self.summary.written.push((id, n)),
            }
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

struct Executor {
    ops: Vec<Op>,
}

impl Executor {
    /// Runs one micro-batch through the transforms: every node's output.
    async fn batch(
        &mut self,
        source_id: &str,
        batch: RecordBatch,
    ) -> Result<HashMap<String, Vec<RecordBatch>>> {
        let mut outputs: HashMap<String, Vec<RecordBatch>> = HashMap::new();
        metrics::counter!("engine_events_out_total", "node" => source_id.to_string())
            .increment(batch.num_rows() as u64);
        outputs.insert(source_id.to_string(), vec![batch]);
        for op in &mut self.ops {
            let (id, rows_in, out) = match op {
                Op::Rules(r) => {
                    let input = outputs.get(&r.input).cloned().unwrap_or_default();
                    let out = r.run(&input)?;
                    (r.id.clone(), rows(&input), vec![out])
                }
                Op::Sql(s) => {
                    let mut rows_in = 0;
                    for (name, slot) in &s.inputs {
                        let input = outputs.get(name).cloned().unwrap_or_default();
                        rows_in += rows(&input);
                        slot.set(input);
                    }
                    (s.id.clone(), rows_in, s.run().await?)
                }
            };
            tracing::debug!(node = %id, "{rows_in} rows in, {} out", rows(&out));
            metrics::counter!("engine_events_in_total", "node" => id.clone()).increment(rows_in);
            metrics::counter!("engine_events_out_total", "node" => id.clone()).increment(rows(&out));
            outputs.insert(id, out);
        }
        Ok(outputs)
    }
}

fn rows(batches: &[RecordBatch]) -> u64 {
    batches.iter().map(|b| b.num_rows() as u64).sum()
}

type Built = (Vec<Op>, Vec<SinkOp>, Vec<(String, Arc<std::sync::Mutex<rules_watch::Status>>)>);

/// Compiles every transform once and opens no sink yet.
async fn build(
    plan: &Plan,
    ctx: &SessionContext,
    source_id: &str,
    source_schema: &SchemaRef,
) -> Result<Built> {
    let pipeline = &plan.spec.pipeline;
    let mut schemas: HashMap<String, SchemaRef> =
        HashMap::from([(source_id.to_string(), source_schema.clone())]);
    let (mut ops, mut sinks, mut statuses) = (Vec::new(), Vec::new(), Vec::new());
    for id in plan.order() {
        match pipeline.transforms.get(&id) {
            Some(Transform::Rules(r)) => {
                let input = r.input.value().clone();
                let schema = schemas
                    .get(&input)
                    .cloned()
                    .ok_or_else(|| Error::Internal(format!("no schema for '{input}'")))?;
                let src = rules_watch::Source {
                    node: id.clone(),
                    target: plan.spec.resolve(r.rules.value()),
                    schema,
                    key: r.key.value().clone(),
                };
                let first = src.load().await.map_err(|e| Error::Usage(format!("transform '{id}': {e}")))?;
                schemas.insert(id.clone(), first.output_schema());
                let current = Arc::new(first);
                let windows = current.windows(HashMap::new());
                let watching = if r.reload.unwrap_or(true) {
                    let w = rules_watch::start(src, current.clone())?;
                    statuses.push((id.clone(), w.status.clone()));
                    Some(w)
                } else {
                    None
                };
                tracing::info!(node = %id, version = %current.version, rules = current.total, "rules loaded");
                ops.push(Op::Rules(RulesOp { id: id.clone(), input, current, windows, watching }));
            }
            Some(Transform::Sql(t)) => {
                let inputs: Vec<(String, SchemaRef)> = inputs_of(plan, &id)
                    .into_iter()
                    .filter_map(|i| schemas.get(&i).map(|s| (i, s.clone())))
                    .collect();
                let op = sql::SqlOp::plan(ctx, &id, t.sql.value(), &inputs).await?;
                schemas.insert(id.clone(), op.schema());
                ops.push(Op::Sql(op));
            }
            None => {
                if let Some(s) = pipeline.sinks.get(&id) {
                    sinks.push(SinkOp::new(&plan.spec, &id, s)?);
                }
            }
        }
    }
    Ok((ops, sinks, statuses))
}

/// The node ids a node reads.
fn inputs_of(plan: &Plan, id: &str) -> Vec<String> {
    let Some(&idx) = plan.nodes.get(id) else { return vec![] };
    plan.graph.neighbors_directed(idx, Direction::Incoming).map(|i| plan.graph[i].id.clone()).collect()
}

/// SIGINT, SIGTERM and `--for` all stop the stream the same way.
fn spawn_stoppers(stop: Arc<watch::Sender<bool>>, duration: Option<Duration>) {
    let s = stop.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    let _ = s.send(true);
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("stopping: finishing the batches in hand");
        let _ = s.send(true);
    });
    if let Some(d) = duration {
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            let _ = stop.send(true);
        });
    }
}

fn spawn_source(
    plan: &Plan,
    id: &str,
    source: &Source,
    schema: SchemaRef,
    tx: mpsc::Sender<Delivery>,
    control: redis_source::Control,
    limit: Option<u64>,
) -> Result<tokio::task::JoinHandle<Result<()>>> {
    match source {
        Source::Redis(r) => {
            let cfg = redis_config(plan, id, r)?;
            let dead = DeadLetters::new(&plan.spec, id, r.dead_letter.as_ref());
            Ok(tokio::spawn(redis_source::run(cfg, schema, dead, tx, control)))
        }
        Source::Generate(g) => {
            control.connected.store(true, Ordering::Relaxed);
            let g = g.clone();
            Ok(tokio::spawn(generate(g, schema, tx, control.shutdown, limit)))
        }
        other => Err(Error::Internal(format!(
            "source '{id}': {} in a stream passed validation",
            other.kind().name()
        ))),
    }
}

fn batch_limits(b: Option<&crate::spec::model::BatchSpec>) -> (usize, Duration) {
    let rows = b.and_then(|b| b.max_rows).unwrap_or(1000).max(1) as usize;
    let wait = b
        .and_then(|b| b.max_wait.as_deref())
        .and_then(|w| humantime::parse_duration(w).ok())
        .unwrap_or(Duration::from_millis(50));
    (rows, wait)
}

fn redis_config(plan: &Plan, id: &str, r: &RedisSource) -> Result<redis_source::Config> {
    let name = r.connection.value().clone();
    let url = plan.spec.pipeline.connections.get(&name).map(|c| c.url().to_string()).unwrap_or_default();
    let (max_rows, max_wait) = batch_limits(r.batch.as_ref());
    let reclaim_after = r
        .reclaim_after
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()
        .map_err(|e| Error::Usage(format!("source '{id}': reclaim_after: {e}")))?
        .unwrap_or(Duration::from_secs(30));
    let consumer = r.consumer.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let host = if host.is_empty() { "engine".to_string() } else { host };
        format!("{host}-{}", std::process::id())
    });
    Ok(redis_source::Config {
        node: id.to_string(),
        connection: name,
        url,
        channel: r.channel.clone(),
        stream: r.stream.clone(),
        group: r.group.clone().unwrap_or_default(),
        consumer,
        field: r.field.clone(),
        max_rows,
        max_wait,
        max_deliveries: r.max_deliveries.unwrap_or(5),
        reclaim_after,
        max_message_bytes: r.max_message_bytes.unwrap_or(1 << 20) as usize,
    })
}

/// The generate source at a rate: rows `n = 0, 1, ...` made by the
/// source's SELECT (planned once) over a slot holding the next row numbers;
/// exactly `limit` rows when given.
async fn generate(
    g: GenerateSource,
    schema: SchemaRef,
    out: mpsc::Sender<Delivery>,
    mut stop: watch::Receiver<bool>,
    limit: Option<u64>,
) -> Result<()> {
    let rate = g
        .rate
        .as_ref()
        .and_then(|r| crate::plan::validate::parse_rate(r.value()))
        .ok_or_else(|| Error::Usage("generate source needs a 'rate' in stream mode".into()))?;
    let n_schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let ctx = session();
    let query = format!("{} FROM __rows", crate::connectors::generate::select(&g)?);
    let op = sql::SqlOp::plan(&ctx, "generate", &query, &[("__rows".to_string(), n_schema.clone())]).await?;
    let (max_rows, _) = batch_limits(g.batch.as_ref());
    let started = Instant::now();
    let mut made: u64 = 0;
    let tick = Duration::from_millis(10);
    loop {
        if *stop.borrow() || limit.is_some_and(|l| made >= l) {
            return Ok(());
        }
        let due = ((started.elapsed().as_secs_f64() * rate) as u64)
            .saturating_sub(made)
            .min(max_rows as u64 * 10)
            .min(limit.map_or(u64::MAX, |l| l - made));
        if due == 0 {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let n: Int64Array = (made as i64..(made + due) as i64).collect();
        let rows = RecordBatch::try_new(n_schema.clone(), vec![Arc::new(n)])
            .map_err(|e| Error::Internal(e.to_string()))?;
        op.inputs[0].1.set(vec![rows]);
        let batches = op.run().await?;
        let batch = concat_batches(&schema, &batches)
            .or_else(|_| concat_batches(&op.schema(), &batches))
            .map_err(|e| Error::Internal(e.to_string()))?;
        made += due;
        if out.send(Delivery { batch, ids: vec![], first_at: Instant::now() }).await.is_err() {
            return Ok(());
        }
    }
}

/// Acknowledges stream entries once their batch is committed.
struct Acker {
    target: Option<(redis::Client, String, String)>,
    conn: Option<redis::aio::MultiplexedConnection>,
}

impl Acker {
    fn new(plan: &Plan, source: &Source) -> Result<Self> {
        let target = match source {
            Source::Redis(RedisSource { stream: Some(stream), group: Some(group), connection, .. }) => {
                let name = connection.value();
                let url =
                    plan.spec.pipeline.connections.get(name).map(|c| c.url().to_string()).unwrap_or_default();
                Some((crate::connectors::redis::client(name, &url)?, stream.clone(), group.clone()))
            }
            _ => None,
        };
        Ok(Self { target, conn: None })
    }

    /// XACKs `ids`, retrying while Redis is away (until shutdown: the entries
    /// then stay pending and are delivered again, which sinks absorb).
    async fn ack(&mut self, ids: &[String], stop: &watch::Receiver<bool>) -> std::result::Result<(), String> {
        let Some((client, stream, group)) = &self.target else { return Ok(()) };
        let mut backoff = crate::connectors::redis::Backoff::default();
        loop {
            let conn = match &mut self.conn {
                Some(c) => Ok(c),
                None => crate::connectors::redis::connect(client, Duration::ZERO)
                    .await
                    .map(|c| self.conn.insert(c)),
            };
            let outcome = match conn {
                Ok(c) => redis_source::ack(c, stream, group, ids).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) if *stop.borrow() => return Err(format!("cannot acknowledge: {e}")),
                Err(e) => {
                    self.conn = None;
                    let wait = backoff.wait();
                    tracing::warn!("cannot acknowledge {} entries: {e}; retrying in {wait:?}", ids.len());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}
