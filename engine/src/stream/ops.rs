//! The transforms of a stream, compiled once: rules (with their windows and
//! live reload) and SQL planned once over slots that hold the current
//! micro-batch; [`Executor::batch`] runs one micro-batch through them.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;
use petgraph::Direction;

use super::sinks::SinkOp;
use crate::connectors::redis::partition;
use crate::connectors::{Refused, State, StateWrite};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::rules::eval::{CompiledRules, RuleState, Step};
use crate::rules::hold::Held;
use crate::rules::watch::{self as rules_watch, Watching};
use crate::rules::window::Windows;
use crate::spec::model::Transform;
use crate::transform::lookup::Lookup;
use crate::transform::prepared::SqlOp;

/// The stored field prefix of a window of transform `id`: a hash of the
/// transform and the window's signature.
fn field_prefix(id: &str, signature: &str) -> [u8; 8] {
    xxhash_rust::xxh3::xxh3_64(format!("{id}\0{signature}").as_bytes()).to_be_bytes()
}

/// A rules transform in a running stream.
pub(super) struct RulesOp {
    id: String,
    input: String,
    current: Arc<CompiledRules>,
    state: RuleState,
    watching: Option<Watching>,
    /// Durable windows: their changes go with each batch's acknowledgement.
    durable: Option<Durable>,
}

/// How a rules transform's window state is stored.
struct Durable {
    /// The stream's partitions and the partition column (`None`: one partition).
    partitioned: Option<(u32, String)>,
}

impl RulesOp {
    /// The stored field of a window's key: a hash of this transform and
    /// the window's signature, then the key.
    fn field_prefix(&self, signature: &str) -> [u8; 8] {
        field_prefix(&self.id, signature)
    }

    /// The stored field prefix of the rows held for event-time order.
    fn held_prefix(&self) -> [u8; 8] {
        self.field_prefix("\0held")
    }

    /// Durable windows track their changed keys (windows a reload added too).
    fn track_windows(&mut self) {
        if self.durable.is_some() {
            for (sig, w) in self.state.windows.iter_mut() {
                w.make_durable(field_prefix(&self.id, sig));
            }
            self.state.held.make_durable();
        }
    }

    /// Makes the windows durable; `saved` is the state earlier runs stored.
    fn restore(&mut self, partitioned: Option<(u32, String)>, saved: &[StateWrite]) -> Restored {
        self.durable = Some(Durable { partitioned });
        self.track_windows();
        let sigs: Vec<([u8; 8], String, usize)> = self
            .current
            .window_signatures()
            .into_iter()
            .map(|(sig, stride, _)| (self.field_prefix(sig), sig.to_string(), stride))
            .collect();
        let holds: Vec<([u8; 8], String)> = self
            .current
            .held_rules()
            .into_iter()
            .map(|(hold, _)| (self.field_prefix(hold), hold.to_string()))
            .collect();
        let held = self.held_prefix();
        let mut restored = Restored::default();
        let fields =
            || saved.iter().filter_map(|s| Some((s, s.value.as_deref()?, s.field.split_first_chunk::<8>()?)));
        for (s, value, (prefix, key)) in fields() {
            if let Some((_, hold)) = holds.iter().find(|(p, _)| p == prefix) {
                self.state.held.restore_mark(hold, s.partition, key, value);
            }
        }
        for (prefix, sig, stride) in &sigs {
            let Some(w) = self.state.windows.get_mut(sig) else { continue };
            let mine = fields()
                .filter(|(_, _, (p, _))| *p == prefix)
                .map(|(s, value, (_, key))| (s.partition, key, value));
            restored.keys += w.restore(mine, *stride);
        }
        // Held rows after every mark: a rule holds again only the rows
        // after its mark.
        let current = self.current.clone();
        let now = std::time::Instant::now();
        for (s, value, (prefix, key)) in fields() {
            let Some(seq) = (prefix == &held).then(|| Held::stored_rows(key)).flatten() else { continue };
            match self.state.held.restore_rows(s.partition, key, seq, value, |b| current.timed(b), now) {
                Ok(n) => restored.held += n,
                Err(e) => tracing::warn!(node = %self.id, "held rows of batch {seq} left out: {e}"),
            }
        }
        restored
    }

    /// The window state changed since the last call, as stored.
    fn changes(&mut self, state: &mut State) -> Result<()> {
        if self.durable.is_none() {
            return Ok(());
        }
        for (sig, stride, _) in self.current.window_signatures() {
            let Some(w) = self.state.windows.get_mut(sig) else { continue };
            state.writes.extend(w.changes(stride).into_iter().map(|c| StateWrite {
                partition: c.partition,
                field: c.field,
                value: c.value,
            }));
        }
        let held = self
            .state
            .held
            .changes()
            .map_err(|e| Error::Internal(format!("transform '{}': {e}", self.id)))?;
        for h in held {
            let prefix = match &h.rule {
                Some(sig) => self.field_prefix(sig),
                None => self.held_prefix(),
            };
            state.writes.push(StateWrite {
                partition: h.partition,
                field: [prefix.as_slice(), &h.key].concat(),
                value: h.value,
            });
        }
        Ok(())
    }

    /// Runs a batch; events a rule failed on are added to `refused`.
    fn run(&mut self, input: &[RecordBatch], step: Step, refused: &mut Vec<Refused>) -> Result<RecordBatch> {
        if let Some(w) = &mut self.watching {
            if w.rules.has_changed().unwrap_or(false) {
                let next = w.rules.borrow_and_update().clone();
                self.state = next.state(std::mem::take(&mut self.state));
                self.track_windows();
                self.current = next;
            }
        }
        let batch = match input {
            [one] => one.clone(),
            _ => concat_batches(&self.current_input_schema(input), input)
                .map_err(|e| Error::Internal(e.to_string()))?,
        };
        let partitions = match &self.durable {
            Some(Durable { partitioned: Some((p, column)) }) => {
                let i = batch.schema().index_of(column).map_err(|_| {
                    Error::Internal(format!("transform '{}': partition column '{column}' missing", self.id))
                })?;
                Some(partition::of_column(batch.column(i), *p).map_err(Error::Internal)?)
            }
            _ => None,
        };
        let evaluated = self
            .current
            .evaluate(&batch, &mut self.state, now_us(), partitions.as_deref(), step)
            .map_err(|e| Error::External { system: format!("transform '{}'", self.id), message: e })?;
        let (alerts, hits) = (evaluated.alerts, evaluated.hits);
        for f in evaluated.failures {
            metrics::counter!("engine_rule_errors_total", "node" => self.id.clone(), "rule" => f.rule.clone())
                .increment(1);
            if let Some(w) = &self.watching {
                w.status.lock().unwrap_or_else(|e| e.into_inner()).event_error(&f.rule, &f.message);
            }
            tracing::warn!(node = %self.id, rule = %f.rule, "the rule failed on an event (to the dead letter): {}", f.message);
            let row = crate::connectors::codec::json_rows(&[f.row]).map_err(Error::Internal)?;
            refused.extend(row.into_iter().map(|row| Refused {
                node: self.id.clone(),
                row,
                reason: format!("rule '{}' of transform '{}' failed on this event: {}", f.rule, self.id, f.message),
            }));
        }
        for h in hits {
            if h.late > 0 {
                metrics::counter!("engine_late_events_total", "node" => self.id.clone(), "rule" => h.rule.clone())
                    .increment(h.late as u64);
            }
            metrics::counter!("engine_rule_hits_total", "node" => self.id.clone(), "rule" => h.rule, "mode" => h.mode.label())
                .increment(h.count as u64);
        }
        if !self.state.windows.is_empty() {
            let keys: usize = self.state.windows.values().map(Windows::keys).sum();
            metrics::gauge!("engine_window_keys", "node" => self.id.clone()).set(keys as f64);
            metrics::gauge!("engine_window_held_events", "node" => self.id.clone())
                .set(self.state.held.len() as f64);
        }
        Ok(alerts)
    }

    /// Registers the transform's metrics at zero, so they show from start.
    fn register_metrics(&self) {
        let node = || self.id.clone();
        for r in &self.current.rules {
            metrics::counter!("engine_rule_hits_total", "node" => node(), "rule" => r.id.clone(), "mode" => r.mode.label())
                .increment(0);
            metrics::counter!("engine_rule_errors_total", "node" => node(), "rule" => r.id.clone()).increment(0);
            if r.holds() {
                metrics::counter!("engine_late_events_total", "node" => node(), "rule" => r.id.clone())
                    .increment(0);
            }
        }
        metrics::counter!("engine_rule_reloads_total", "node" => node()).increment(0);
        metrics::counter!("engine_rule_reload_failures_total", "node" => node()).increment(0);
        if !self.state.windows.is_empty() {
            metrics::gauge!("engine_window_keys", "node" => node()).set(0.0);
            metrics::gauge!("engine_window_held_events", "node" => node()).set(0.0);
        }
    }

    fn current_input_schema(&self, input: &[RecordBatch]) -> SchemaRef {
        input.first().map(|b| b.schema()).unwrap_or_else(|| Arc::new(Schema::empty()))
    }
}

pub(super) enum Op {
    Rules(Box<RulesOp>),
    Sql(SqlOp),
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// What came back of the state earlier runs stored.
#[derive(Debug, Default)]
pub(super) struct Restored {
    /// Keys whose windows came back.
    pub(super) keys: usize,
    /// Rows held for event-time order that came back.
    pub(super) held: usize,
}

pub(super) struct Executor {
    pub(super) ops: Vec<Op>,
    /// Lookup tables: a refreshed one is taken into use between batches.
    pub(super) lookups: Vec<Arc<Lookup>>,
    /// The next batch's sequence number: rows of equal event time count in
    /// the order they were read, over restarts too (it starts at the clock).
    pub(super) seq: u64,
    /// Rows a transform failed on since the last batch was handed on.
    pub(super) refused: Vec<Refused>,
}

impl Executor {
    pub(super) fn new(ops: Vec<Op>, lookups: Vec<Arc<Lookup>>) -> Self {
        for op in &ops {
            let id = match op {
                Op::Rules(r) => {
                    r.register_metrics();
                    &r.id
                }
                Op::Sql(s) => {
                    metrics::counter!("engine_transform_errors_total", "node" => s.id.clone()).increment(0);
                    &s.id
                }
            };
            metrics::counter!("engine_events_in_total", "node" => id.clone()).increment(0);
            metrics::counter!("engine_events_out_total", "node" => id.clone()).increment(0);
        }
        Self { ops, lookups, seq: now_us().max(0) as u64, refused: Vec::new() }
    }

    /// Makes every rules transform's windows durable, from the state saved
    /// by earlier runs.
    pub(super) fn restore(&mut self, partitioned: Option<(u32, String)>, saved: &[StateWrite]) -> Restored {
        let mut restored = Restored::default();
        for op in &mut self.ops {
            if let Op::Rules(r) = op {
                let one = r.restore(partitioned.clone(), saved);
                restored.keys += one.keys;
                restored.held += one.held;
            }
        }
        restored
    }

    /// Whether a rules transform has windowed rules.
    pub(super) fn windowed(&self) -> bool {
        self.ops.iter().any(|op| matches!(op, Op::Rules(r) if !r.state.windows.is_empty()))
    }

    /// Rows the rules hold for event-time order.
    pub(super) fn holding(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Rules(r) => r.state.held.len(),
                Op::Sql(_) => 0,
            })
            .sum()
    }

    /// The window state the batches since the last call changed.
    pub(super) fn changes(&mut self) -> Result<State> {
        let mut state = State::default();
        for op in &mut self.ops {
            if let Op::Rules(r) = op {
                r.changes(&mut state)?;
            }
        }
        Ok(state)
    }

    /// Runs one micro-batch through the transforms: every node's output.
    /// `flush` releases every row held for event-time order (the stream
    /// is stopping); an empty batch releases the rows whose time came.
    pub(super) async fn batch(
        &mut self,
        source_id: &str,
        batch: RecordBatch,
        flush: bool,
    ) -> Result<HashMap<String, Vec<RecordBatch>>> {
        let step = Step { flush, ..Step::at(self.seq) };
        self.seq += 1;
        for lookup in &self.lookups {
            lookup.advance();
        }
        let mut outputs: HashMap<String, Vec<RecordBatch>> = HashMap::new();
        metrics::counter!("engine_events_out_total", "node" => source_id.to_string())
            .increment(batch.num_rows() as u64);
        outputs.insert(source_id.to_string(), vec![batch]);
        for op in &mut self.ops {
            let (id, rows_in, out) = match op {
                Op::Rules(r) => {
                    let input = outputs.get(&r.input).cloned().unwrap_or_default();
                    let out = r.run(&input, step, &mut self.refused)?;
                    (r.id.clone(), rows(&input), vec![out])
                }
                Op::Sql(s) => {
                    let mut rows_in = 0;
                    let mut inputs = Vec::with_capacity(s.inputs.len());
                    for (name, slot) in &s.inputs {
                        let input = outputs.get(name).cloned().unwrap_or_default();
                        rows_in += rows(&input);
                        slot.set(input.clone());
                        inputs.push(input);
                    }
                    let out = match s.run().await {
                        Ok(out) => out,
                        Err(e) => narrow(s, inputs, e, &mut self.refused).await?,
                    };
                    (s.id.clone(), rows_in, out)
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

/// A SQL transform that failed on a batch (a division by zero, a failed
/// cast) runs again on halves of its first input with rows until the rows
/// it fails on are found: those are refused, for the dead letter, and the
/// output of the others goes on. A few runs per bad row; a transform
/// without rows to narrow fails the stream as before.
async fn narrow(
    s: &SqlOp,
    mut inputs: Vec<Vec<RecordBatch>>,
    error: Error,
    refused: &mut Vec<Refused>,
) -> Result<Vec<RecordBatch>> {
    let Some(k) = inputs.iter().position(|i| rows(i) > 0) else { return Err(error) };
    let first = std::mem::take(&mut inputs[k]);
    let all = concat_batches(&first[0].schema(), &first).map_err(|e| Error::Internal(e.to_string()))?;
    let mut out = Vec::new();
    let mut bad = 0u64;
    // Ranges to run, the next on top (rows stay in their order), with
    // their outcome where it is known: the whole batch failed.
    let mut todo = vec![(0, all.num_rows(), Some(error.to_string()))];
    while let Some((start, len, known)) = todo.pop() {
        let outcome = match known {
            Some(e) => Err(e),
            None => {
                s.inputs[k].1.set(vec![all.slice(start, len)]);
                s.run().await.map_err(|e| e.to_string())
            }
        };
        match outcome {
            Ok(batches) => out.extend(batches),
            Err(e) if len <= 1 => {
                bad += 1;
                let row = crate::connectors::codec::json_rows(&[all.slice(start, 1)]).map_err(Error::Internal)?;
                tracing::warn!(node = %s.id, "the transform failed on a row (to the dead letter): {e}");
                refused.extend(row.into_iter().map(|row| Refused {
                    node: s.id.clone(),
                    row,
                    reason: format!("transform '{}' failed on this row: {e}", s.id),
                }));
            }
            Err(_) => {
                let half = len / 2;
                todo.push((start + half, len - half, None));
                todo.push((start, half, None));
            }
        }
    }
    s.inputs[k].1.set(Vec::new());
    metrics::counter!("engine_transform_errors_total", "node" => s.id.clone()).increment(bad);
    Ok(out)
}

fn rows(batches: &[RecordBatch]) -> u64 {
    batches.iter().map(|b| b.num_rows() as u64).sum()
}

pub(super) type Built = (Vec<Op>, Vec<SinkOp>, Vec<(String, Arc<std::sync::Mutex<rules_watch::Status>>)>);

/// Compiles every transform once and opens no sink yet.
pub(super) async fn build(
    plan: &Plan,
    ctx: &SessionContext,
    source_id: &str,
    source_schema: &SchemaRef,
    lookups: &[Arc<Lookup>],
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
                    partitioned: crate::plan::validate::partitioned(&plan.spec),
                };
                let first = src.load().await.map_err(|e| Error::Usage(format!("transform '{id}': {e}")))?;
                schemas.insert(id.clone(), first.output_schema());
                let current = Arc::new(first);
                let state = current.state(RuleState::default());
                let watching = if r.reload.unwrap_or(true) {
                    let w = rules_watch::start(src, current.clone())?;
                    statuses.push((id.clone(), w.status.clone()));
                    Some(w)
                } else {
                    None
                };
                tracing::info!(node = %id, version = %current.version, rules = current.total, "rules loaded");
                ops.push(Op::Rules(Box::new(RulesOp {
                    id: id.clone(),
                    input,
                    current,
                    state,
                    watching,
                    durable: None,
                })));
            }
            Some(Transform::Sql(t)) => {
                let names = inputs_of(plan, &id);
                let inputs: Vec<(String, SchemaRef)> =
                    names.iter().filter_map(|i| schemas.get(i).map(|s| (i.clone(), s.clone()))).collect();
                let tables: Vec<Arc<Lookup>> =
                    lookups.iter().filter(|l| names.contains(&l.name)).cloned().collect();
                let op = SqlOp::plan_with(ctx, &id, t.sql.value(), &inputs, &tables).await?;
                if !tables.is_empty() {
                    let (joins, _) = crate::transform::lookup::index_builds(&op.physical());
                    tracing::info!(node = %id, lookup_joins = joins, "joins with lookup tables hashed once per refresh");
                }
                schemas.insert(id.clone(), op.schema());
                ops.push(Op::Sql(op));
            }
            None => {
                if let Some(s) = pipeline.sinks.get(&id) {
                    let schema = schemas.get(s.input().value()).cloned();
                    sinks.push(SinkOp::new(&plan.spec, &id, s, schema)?);
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
