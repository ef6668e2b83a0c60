//! A rule set compiled for streams: each rule's `when` and reason become
//! DataFusion physical expressions once, when the set is loaded, and are then
//! evaluated on every micro-batch with no SQL planning. Windowed rules keep
//! per-key state between batches ([`super::window`]).

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::DFSchema;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;

use super::batch::{reason_sql, version};
use super::hold::{Held, Released, Timed};
use super::window::{self, Func, Key, Windows};
use crate::error::{Diagnostic, Diagnostics};
use crate::spec::rules::{LoadedRule, RuleMode};

/// A compiled windowed rule.
struct WindowPlan {
    by: Vec<usize>,
    time: Option<usize>,
    size: std::time::Duration,
    funcs: Vec<Func>,
    args: Vec<Option<Arc<dyn PhysicalExpr>>>,
    /// Input schema plus one column per aggregate.
    schema: SchemaRef,
    /// Identifies the window so its state survives reloads that keep it.
    signature: String,
    /// With a time column: the hold its events wait in for event-time
    /// order, and how long they may wait. Rules with the same time column
    /// and lateness share one hold (held and released once).
    hold: Option<(String, std::time::Duration)>,
}

/// What a rule set keeps between batches: each windowed rule's windows
/// (by signature), and the rows held back for event-time order.
#[derive(Default)]
pub struct RuleState {
    pub windows: HashMap<String, Windows>,
    pub held: Held,
}

/// One evaluation: the batch's sequence number (ordering rows of equal
/// time), the wall-clock time, and whether to release every held row (the
/// stream is stopping).
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub seq: u64,
    pub now: std::time::Instant,
    pub flush: bool,
}

impl Step {
    pub fn at(seq: u64) -> Self {
        Self { seq, now: std::time::Instant::now(), flush: false }
    }
}

/// What a rule evaluates: the batch, the rows it released from hold, or
/// nothing this time.
enum Input {
    Batch,
    Held(Released),
    Nothing,
}

impl Input {
    /// The rows to evaluate (`batch` for [`Input::Batch`]) with their
    /// partitions; `None` for nothing.
    fn rows<'b>(
        &'b self,
        batch: &'b RecordBatch,
        partitions: Option<&'b [u32]>,
    ) -> Option<(&'b RecordBatch, Option<&'b [u32]>)> {
        match self {
            Input::Batch => Some((batch, partitions)),
            Input::Held(r) => Some((&r.batch, Some(&r.partitions[..]))),
            Input::Nothing => None,
        }
    }
}

/// One compiled rule.
pub struct CompiledRule {
    pub id: String,
    pub severity: String,
    pub mode: RuleMode,
    when: Arc<dyn PhysicalExpr>,
    reason: Arc<dyn PhysicalExpr>,
    window: Option<WindowPlan>,
}

impl CompiledRule {
    /// Whether the rule holds events back for event-time order.
    pub fn holds(&self) -> bool {
        self.window.as_ref().is_some_and(|w| w.hold.is_some())
    }
}

/// The enabled rules of a set, ready to run on batches of `input`.
pub struct CompiledRules {
    pub version: String,
    pub rules: Vec<CompiledRule>,
    /// Rules in the files, enabled or not.
    pub total: usize,
    key: usize,
    input: SchemaRef,
    output: SchemaRef,
}

/// A rule's evaluation on one batch: not started, on a thread, or done.
enum Job<'a, T> {
    Waiting(&'a CompiledRule, Option<&'a mut Windows>, Input),
    Running(T),
    Done(Fired),
}

/// A rule's rows and which fired, and the rows it failed on.
type Fired = Result<(Option<(RecordBatch, BooleanArray)>, Vec<Failure>), String>;

/// An event a rule failed on (a division by zero, a failed cast): it does
/// not fire that rule, and goes to the dead letter with the message.
#[derive(Debug)]
pub struct Failure {
    pub rule: String,
    /// The event (one row of the rule's input).
    pub row: RecordBatch,
    pub message: String,
}

/// Rows from which a windowed rule runs on a thread of its own: fewer take
/// less time than starting one.
const THREAD_ROWS: usize = 256;

/// Hits of one rule in one batch, and its events too late for its window.
pub struct Hits {
    pub rule: String,
    pub mode: RuleMode,
    pub count: usize,
    pub late: usize,
}

/// One evaluation's outcome: the alerts, each rule's hits, and the events
/// a rule failed on.
pub struct Evaluated {
    pub alerts: RecordBatch,
    pub hits: Vec<Hits>,
    pub failures: Vec<Failure>,
}

impl CompiledRules {
    /// Compiles `rules` against `input`; `key` names the event id column.
    pub fn build(
        ctx: &SessionContext,
        rules: &[LoadedRule],
        input: SchemaRef,
        key: &str,
    ) -> Result<Self, Diagnostics> {
        let mut diags = Diagnostics::default();
        let df_schema = DFSchema::try_from(input.as_ref().clone()).map_err(|e| internal(&e))?;
        let key_index = input.index_of(key).map_err(|_| {
            let d = Diagnostic::error(
                std::path::Path::new("<rules>"),
                Default::default(),
                format!("key column '{key}' is not in the input"),
            );
            Diagnostics(vec![d])
        })?;
        let columns: Vec<String> = input.fields().iter().map(|f| f.name().clone()).collect();
        let mut compiled = Vec::new();
        for lr in rules.iter().filter(|r| r.rule.enabled) {
            match compile_rule(ctx, lr, &input, &df_schema, &columns) {
                Ok(c) => compiled.push(c),
                Err(msg) => {
                    diags.push(lr.error(lr.rule.when.pos(), format!("rule '{}': {msg}", lr.rule.id.value())))
                }
            }
        }
        if diags.has_errors() {
            return Err(diags);
        }
        let output = super::alert_schema(&input);
        Ok(Self {
            version: version(rules),
            rules: compiled,
            total: rules.len(),
            key: key_index,
            input,
            output,
        })
    }

    pub fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    /// A window state for every windowed rule, keeping what `old` had for
    /// windows that did not change (and the rows they hold).
    pub fn state(&self, old: RuleState) -> RuleState {
        let RuleState { windows: mut old, mut held } = old;
        let windows = self
            .rules
            .iter()
            .filter_map(|r| r.window.as_ref())
            .map(|w| {
                let state = old.remove(&w.signature).unwrap_or_else(|| Windows::new(w.size));
                (w.signature.clone(), state)
            })
            .collect();
        held.set_rules(&self.held_rules());
        RuleState { windows, held }
    }

    /// The holds of the windowed rules that hold rows for event-time
    /// order (one per time column and lateness), with their lateness.
    pub fn held_rules(&self) -> Vec<(&str, std::time::Duration)> {
        self.holds().map(|(_, hold, lateness)| (hold, lateness)).collect()
    }

    /// Each hold's event times in `batch`.
    pub fn timed(&self, batch: &RecordBatch) -> Result<Vec<Timed<'_>>, String> {
        self.holds()
            .map(|(w, rule, lateness)| {
                let times = event_times(w, batch)?.unwrap_or_else(|| Int64Array::from(Vec::<i64>::new()));
                Ok(Timed { rule, lateness, times })
            })
            .collect()
    }

    /// Each hold once, with the first window that uses it (its time
    /// column is the hold's), its name and its lateness.
    fn holds(&self) -> impl Iterator<Item = (&WindowPlan, &str, std::time::Duration)> {
        let mut seen: Vec<&str> = Vec::new();
        self.rules.iter().filter_map(|r| r.window.as_ref()).filter_map(move |w| {
            let (hold, lateness) = w.hold.as_ref()?;
            if seen.contains(&hold.as_str()) {
                return None;
            }
            seen.push(hold);
            Some((w, hold.as_str(), *lateness))
        })
    }

    /// Each window's signature (what identifies its state), its number of
    /// aggregates (the stride of its stored events) and its size.
    pub fn window_signatures(&self) -> Vec<(&str, usize, std::time::Duration)> {
        self.rules
            .iter()
            .filter_map(|r| r.window.as_ref())
            .map(|w| (w.signature.as_str(), w.funcs.len(), w.size))
            .collect()
    }

    /// The alerts of `batch`, and the hits of every rule (shadow rules too).
    /// `arrival_us` is the event time of windows without a time column;
    /// `partitions`, when windows are durable, the partition of each row.
    /// Windowed rules with a time column count the rows they release from
    /// hold (see [`super::hold`]), from this batch or earlier ones.
    pub fn evaluate(
        &self,
        batch: &RecordBatch,
        state: &mut RuleState,
        arrival_us: i64,
        partitions: Option<&[u32]>,
        step: Step,
    ) -> Result<Evaluated, String> {
        let timed = self.timed(batch)?;
        let mut late = vec![0; timed.len()];
        if batch.num_rows() > 0 && !timed.is_empty() {
            late = state.held.admit(step.seq, batch, partitions, &timed, step.now);
        }
        let mut released: HashMap<&str, (Option<Released>, usize)> = HashMap::new();
        for (t, late) in timed.iter().zip(late) {
            released.insert(t.rule, (state.held.release(t.rule, step.flush, step.now)?, late));
        }
        // Each windowed rule runs on a thread of its own while this one
        // evaluates the others: its time goes to per-key state spread over
        // memory (cache misses), which threads overlap.
        let mut states: HashMap<&str, &mut Windows> =
            state.windows.iter_mut().map(|(k, v)| (k.as_str(), v)).collect();
        let mut jobs: Vec<(&CompiledRule, Option<&mut Windows>, Input)> =
            Vec::with_capacity(self.rules.len());
        let mut lates = Vec::with_capacity(self.rules.len());
        for rule in &self.rules {
            let (state, input, late) = match &rule.window {
                Some(w) => {
                    let state = states.remove(w.signature.as_str()).ok_or("window state missing")?;
                    match w.hold.as_ref().and_then(|(hold, _)| released.get(hold.as_str())) {
                        Some((Some(r), late)) => (Some(state), Input::Held(r.clone()), *late),
                        Some((None, late)) => (Some(state), Input::Nothing, *late),
                        None => (Some(state), Input::Batch, 0),
                    }
                }
                None => (None, Input::Batch, 0),
            };
            jobs.push((rule, state, input));
            lates.push(late);
        }
        let fire = |rule: &CompiledRule, state: Option<&mut Windows>, input: Input| -> Fired {
            let Some((rows, parts)) = input.rows(batch, partitions) else { return Ok((None, vec![])) };
            let mut failed = Vec::new();
            let scope = match (&rule.window, state) {
                (Some(w), Some(state)) => with_aggregates(w, rows, state, arrival_us, parts, &mut failed)?,
                _ => rows.clone(),
            };
            let mask = eval_bool(&rule.when, &scope, &mut failed)?;
            failed.sort_unstable_by_key(|f| f.0);
            failed.dedup_by_key(|f| f.0);
            let failures = failed
                .into_iter()
                .map(|(row, message)| Failure { rule: rule.id.clone(), row: rows.slice(row, 1), message })
                .collect();
            Ok((Some((scope, mask)), failures))
        };
        let outcomes: Vec<Fired> = std::thread::scope(|scope| {
            // The windowed rules start first, on threads of their own when
            // they have rows enough to pay for one; then this thread does
            // the rest.
            let pending: Vec<_> = jobs
                .into_iter()
                .map(|(rule, state, input)| {
                    let rows = input.rows(batch, partitions).map_or(0, |(b, _)| b.num_rows());
                    match state {
                        Some(state) if rows >= THREAD_ROWS => {
                            Job::Running(scope.spawn(move || fire(rule, Some(state), input)))
                        }
                        state => Job::Waiting(rule, state, input),
                    }
                })
                .collect();
            let done: Vec<_> = pending
                .into_iter()
                .map(|job| match job {
                    Job::Waiting(rule, state, input) => Job::Done(fire(rule, state, input)),
                    running => running,
                })
                .collect();
            done.into_iter()
                .map(|job| match job {
                    Job::Running(thread) => {
                        thread.join().unwrap_or_else(|_| Err("a windowed rule's thread panicked".into()))
                    }
                    Job::Done(outcome) => outcome,
                    Job::Waiting(..) => Err("a rule was not evaluated".into()),
                })
                .collect()
        });
        let mut alerts = Vec::new();
        let mut hits = Vec::new();
        let mut failures = Vec::new();
        for ((rule, outcome), late) in self.rules.iter().zip(outcomes).zip(lates) {
            let (fired, failed) = outcome?;
            failures.extend(failed);
            let Some((scope, mask)) = fired else {
                hits.push(Hits { rule: rule.id.clone(), mode: rule.mode, count: 0, late });
                continue;
            };
            let count = mask.true_count();
            hits.push(Hits { rule: rule.id.clone(), mode: rule.mode, count, late });
            if count > 0 && rule.mode == RuleMode::Live {
                let fired = filter_record_batch(&scope, &mask).map_err(|e| e.to_string())?;
                alerts.push(self.alert_rows(rule, &fired)?);
            }
        }
        let alerts = concat_batches(&self.output, &alerts).map_err(|e| e.to_string())?;
        Ok(Evaluated { alerts, hits, failures })
    }

    fn alert_rows(&self, rule: &CompiledRule, fired: &RecordBatch) -> Result<RecordBatch, String> {
        let n = fired.num_rows();
        let keys = cast(fired.column(self.key), &DataType::Utf8).map_err(|e| e.to_string())?;
        let keys = keys.as_any().downcast_ref::<StringArray>().ok_or("key as text")?;
        let ids: StringArray = (0..n)
            .map(|i| Some(format!("{}:{}", rule.id, if keys.is_null(i) { "" } else { keys.value(i) })))
            .collect();
        // The reason evaluates what `when` did; should it fail on a row
        // all the same, the alert still goes out, saying so.
        let mut failed = Vec::new();
        let reason = evaluate_rows(&rule.reason, fired, &mut failed)?;
        let reason = cast(&reason, &DataType::Utf8).map_err(|e| e.to_string())?;
        let reason = reason.as_any().downcast_ref::<StringArray>().ok_or("reason as text")?;
        let reason: StringArray = (0..n)
            .map(|i| match failed.iter().find(|f| f.0 == i) {
                Some((_, e)) => Some(format!("{} (its reason could not be computed: {e})", rule.id)),
                None => reason.is_valid(i).then(|| reason.value(i).to_string()),
            })
            .collect();
        let repeat = |s: &str| Arc::new(StringArray::from(vec![s; n])) as ArrayRef;
        let mut cols: Vec<ArrayRef> =
            vec![Arc::new(ids), repeat(&rule.id), repeat(&rule.severity), repeat(&self.version), Arc::new(reason)];
        for f in self.output.fields().iter().skip(5) {
            let i = self.input.index_of(f.name()).map_err(|e| e.to_string())?;
            cols.push(fired.column(i).clone());
        }
        RecordBatch::try_new(self.output.clone(), cols).map_err(|e| e.to_string())
    }
}

fn internal(e: &dyn std::fmt::Display) -> Diagnostics {
    Diagnostics(vec![Diagnostic::error(std::path::Path::new("<rules>"), Default::default(), e.to_string())])
}

/// `expr` on every row of `batch`. Should it fail, the batch is halved
/// until the rows it fails on are found (a few evaluations per bad row):
/// those are NULL in the result and added to `failed` with the message, and
/// every other row has its value. A panic counts as a failure.
fn evaluate_rows(
    expr: &Arc<dyn PhysicalExpr>,
    batch: &RecordBatch,
    failed: &mut Vec<(usize, String)>,
) -> Result<ArrayRef, String> {
    fn once(expr: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> Result<ArrayRef, String> {
        let n = batch.num_rows();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            expr.evaluate(batch).and_then(|v| v.into_array(n))
        })) {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(crate::spec::sql::short(e)),
            Err(_) => Err("the evaluation panicked".into()),
        }
    }
    fn narrow(
        expr: &Arc<dyn PhysicalExpr>,
        batch: &RecordBatch,
        offset: usize,
        error: String,
        failed: &mut Vec<(usize, String)>,
    ) -> Result<ArrayRef, String> {
        let n = batch.num_rows();
        if n <= 1 {
            failed.push((offset, error));
            let t = expr.data_type(&batch.schema()).map_err(|e| e.to_string())?;
            return Ok(datafusion::arrow::array::new_null_array(&t, n));
        }
        let half = n / 2;
        let mut parts = Vec::with_capacity(2);
        for (start, len) in [(0, half), (half, n - half)] {
            let part = batch.slice(start, len);
            parts.push(match once(expr, &part) {
                Ok(a) => a,
                Err(e) => narrow(expr, &part, offset + start, e, failed)?,
            });
        }
        let refs: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
        datafusion::arrow::compute::concat(&refs).map_err(|e| e.to_string())
    }
    match once(expr, batch) {
        Ok(a) => Ok(a),
        Err(e) => narrow(expr, batch, 0, e, failed),
    }
}

fn eval_bool(
    expr: &Arc<dyn PhysicalExpr>,
    batch: &RecordBatch,
    failed: &mut Vec<(usize, String)>,
) -> Result<BooleanArray, String> {
    let v = evaluate_rows(expr, batch, failed)?;
    let b = v.as_any().downcast_ref::<BooleanArray>().ok_or("'when' is not true or false")?;
    // A NULL outcome does not fire.
    Ok(match b.nulls() {
        Some(nulls) => BooleanArray::new(b.values() & nulls.inner(), None),
        None => b.clone(),
    })
}

fn physical(ctx: &SessionContext, sql: &str, schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>, String> {
    let expr = ctx.parse_sql_expr(sql, schema).map_err(crate::spec::sql::short)?;
    ctx.create_physical_expr(expr, schema).map_err(crate::spec::sql::short)
}

fn compile_rule(
    ctx: &SessionContext,
    lr: &LoadedRule,
    input: &SchemaRef,
    df_schema: &DFSchema,
    columns: &[String],
) -> Result<CompiledRule, String> {
    let r = &lr.rule;
    let is_column = |w: &str| columns.iter().any(|c| c == w).then(|| w.to_string());
    let (when, reason, window) = match &r.window {
        None => {
            let when = physical(ctx, r.when.value(), df_schema)?;
            let reason = physical(ctx, &reason_sql(r.when.value(), &is_column), df_schema)?;
            (when, reason, None)
        }
        Some(w) => {
            let (text, aggs) = window::rewrite(r.when.value())?;
            let size = lr.window_size().ok_or("bad window size")?;
            let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
            let mut args = Vec::new();
            for (i, a) in aggs.iter().enumerate() {
                let ty = if matches!(a.func, Func::Count | Func::CountAll) {
                    DataType::Int64
                } else {
                    DataType::Float64
                };
                fields.push(Field::new(window::column(i), ty, true));
                args.push(match &a.arg {
                    Some(arg) => {
                        Some(physical(ctx, arg, df_schema).map_err(|e| format!("in '{}': {e}", a.text))?)
                    }
                    None => None,
                });
            }
            let schema = Arc::new(Schema::new(fields));
            let aug = DFSchema::try_from(schema.as_ref().clone()).map_err(|e| e.to_string())?;
            let label = |word: &str| match aggs.iter().enumerate().find(|(i, _)| window::column(*i) == word) {
                Some((_, a)) => Some(a.text.clone()),
                None => is_column(word),
            };
            let when = physical(ctx, &text, &aug)?;
            let reason = physical(ctx, &reason_sql(&text, &label), &aug)?;
            let index =
                |c: &str| input.index_of(c).map_err(|_| format!("window column '{c}' is not in the input"));
            let by = w.by.iter().map(|c| index(c)).collect::<Result<Vec<_>, _>>()?;
            let time = w.time.as_deref().map(index).transpose()?;
            let signature =
                format!("{}|{:?}|{:?}|{}|{}", r.id.value(), w.by, w.time, w.size.value(), r.when.value());
            let funcs = aggs.iter().map(|a| a.func).collect();
            let hold = lr.allowed_lateness().map(|l| (format!("hold|{:?}|{}", w.time, l.as_micros()), l));
            (when, reason, Some(WindowPlan { by, time, size, funcs, args, schema, signature, hold }))
        }
    };
    let ty = when
        .data_type(window.as_ref().map(|w| w.schema.as_ref()).unwrap_or(input))
        .map_err(|e| e.to_string())?;
    if ty != DataType::Boolean {
        return Err(format!("'when' must be true or false, but it gives {ty}"));
    }
    Ok(CompiledRule {
        id: r.id.value().clone(),
        severity: format!("{:?}", r.severity).to_lowercase(),
        mode: r.mode,
        when,
        reason,
        window,
    })
}

/// A window's event times in `batch` (µs), when it has a time column.
fn event_times(w: &WindowPlan, batch: &RecordBatch) -> Result<Option<Int64Array>, String> {
    let Some(i) = w.time else { return Ok(None) };
    let us = cast(batch.column(i), &DataType::Timestamp(TimeUnit::Microsecond, None))
        .and_then(|a| cast(&a, &DataType::Int64))
        .map_err(|e| e.to_string())?;
    Ok(Some(us.as_any().downcast_ref::<Int64Array>().ok_or("event time")?.clone()))
}

/// `batch` plus the aggregate columns of a windowed rule, each event added to
/// its key's window in order.
fn with_aggregates(
    w: &WindowPlan,
    batch: &RecordBatch,
    state: &mut Windows,
    arrival_us: i64,
    partitions: Option<&[u32]>,
    failed: &mut Vec<(usize, String)>,
) -> Result<RecordBatch, String> {
    let n = batch.num_rows();
    let mut inputs: Vec<Option<Float64Array>> = Vec::new();
    for a in &w.args {
        inputs.push(match a {
            None => None,
            Some(e) => {
                // A row the argument fails on adds nothing to its window.
                let v = evaluate_rows(e, batch, failed)?;
                let f = cast(&v, &DataType::Float64).map_err(|e| e.to_string())?;
                Some(f.as_any().downcast_ref::<Float64Array>().ok_or("aggregate input as float")?.clone())
            }
        });
    }
    let times = event_times(w, batch)?;
    let key_cols: Vec<ArrayRef> = w.by.iter().map(|i| batch.column(*i).clone()).collect();
    let int_keys: Option<Int64Array> = match key_cols.as_slice() {
        [k] if k.data_type().is_integer() => {
            let k = cast(k, &DataType::Int64).map_err(|e| e.to_string())?;
            k.as_any().downcast_ref::<Int64Array>().cloned()
        }
        _ => None,
    };
    let rows = match int_keys {
        Some(_) => None,
        None => {
            let fields = key_cols.iter().map(|c| SortField::new(c.data_type().clone())).collect();
            let converter = RowConverter::new(fields).map_err(|e| e.to_string())?;
            Some(converter.convert_columns(&key_cols).map_err(|e| e.to_string())?)
        }
    };
    let key = |row: usize| match (&int_keys, &rows) {
        (Some(k), _) if k.is_valid(row) => Key::Int(k.value(row)),
        (_, Some(r)) => Key::Row(r.row(row).data()),
        _ => Key::Row(&[]),
    };
    let mut out: Vec<Vec<Option<f64>>> = vec![Vec::with_capacity(n); w.funcs.len()];
    let mut values = Vec::with_capacity(w.funcs.len());
    let mut aggs = Vec::with_capacity(w.funcs.len());
    for row in 0..n {
        let t = times.as_ref().filter(|t| t.is_valid(row)).map(|t| t.value(row)).unwrap_or(arrival_us);
        values.clear();
        values.extend(inputs.iter().map(|a| a.as_ref().filter(|a| a.is_valid(row)).map(|a| a.value(row))));
        let partition = partitions.and_then(|p| p.get(row).copied()).unwrap_or(0);
        state.add(key(row), partition, t, &values, &w.funcs, &mut aggs);
        for (j, v) in aggs.iter().enumerate() {
            out[j].push(*v);
        }
    }
    state.sweep();
    state.encode_changes(w.funcs.len());
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    for (j, vals) in out.into_iter().enumerate() {
        cols.push(match w.funcs[j] {
            Func::Count | Func::CountAll => {
                Arc::new(vals.into_iter().map(|v| v.map(|v| v as i64)).collect::<Int64Array>())
            }
            _ => Arc::new(vals.into_iter().collect::<Float64Array>()),
        });
    }
    RecordBatch::try_new(w.schema.clone(), cols).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::differential::schema;
    use datafusion::arrow::array::TimestampMicrosecondArray;

    fn batch(rows: &[(i64, i64, f64, i64)]) -> RecordBatch {
        let col = |f: fn(&(i64, i64, f64, i64)) -> i64| {
            Arc::new(rows.iter().map(f).collect::<Int64Array>()) as ArrayRef
        };
        let amounts: Float64Array = rows.iter().map(|r| r.2).collect();
        let times = TimestampMicrosecondArray::from(rows.iter().map(|r| r.3 * 1_000_000).collect::<Vec<_>>())
            .with_timezone("UTC");
        RecordBatch::try_new(schema(), vec![col(|r| r.0), col(|r| r.1), Arc::new(amounts), Arc::new(times)])
            .unwrap()
    }

    fn compiled(files: &[(&str, &str)]) -> CompiledRules {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in files {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        let (set, diags) = crate::spec::rules::load(&crate::spec::rules::files(dir.path()).unwrap());
        assert!(!diags.has_errors(), "{diags}");
        CompiledRules::build(
            &crate::transform::sql::session(crate::transform::sql::Purpose::Stream),
            &set,
            schema(),
            "transaction_id",
        )
        .unwrap()
    }

    fn column(b: &RecordBatch, name: &str) -> Vec<String> {
        let a = cast(b.column(b.schema().index_of(name).unwrap()), &DataType::Utf8).unwrap();
        let s = a.as_any().downcast_ref::<StringArray>().unwrap();
        (0..s.len()).map(|i| s.value(i).to_string()).collect()
    }

    #[test]
    fn windows_carry_over_between_batches_and_shadow_rules_only_count() {
        let rules = compiled(&[
            ("rapid.yaml", "id: rapid\nseverity: medium\nwindow: { by: [customer_id], size: 60s, time: timestamp }\nwhen: count(*) > 2 AND sum(amount) > 100\n"),
            ("big.yaml", "id: big\nseverity: high\nmode: shadow\nwhen: amount > 50\n"),
        ]);
        let mut windows = rules.state(RuleState::default());
        let e = rules
            .evaluate(
                &batch(&[(1, 7, 60.0, 0), (2, 8, 1.0, 1), (3, 7, 30.0, 10)]),
                &mut windows,
                0,
                None,
                Step::at(1),
            )
            .unwrap();
        let (a, hits) = (e.alerts, e.hits);
        assert_eq!(a.num_rows(), 0);
        assert_eq!(hits.iter().find(|h| h.rule == "big").map(|h| h.count), Some(1));
        let a = rules
            .evaluate(&batch(&[(4, 7, 20.0, 20), (5, 7, 5.0, 200)]), &mut windows, 0, None, Step::at(1))
            .unwrap()
            .alerts;
        assert_eq!(column(&a, "alert_id"), vec!["rapid:4"]);
        assert_eq!(column(&a, "reason"), vec!["count(*) 3 > 2 AND sum(amount) 110.0 > 100"]);
        assert_eq!(column(&a, "severity"), vec!["medium"]);
        assert_eq!(column(&a, "rules_version"), vec![rules.version.clone()]);
    }

    /// A rule that divides by a column fails on the events where it is
    /// zero: those are returned with the message, the others are evaluated.
    #[test]
    fn a_rule_failing_on_some_rows_fails_on_those_alone() {
        let rules = compiled(&[("ratio.yaml", "id: ratio\nseverity: low\nwhen: 100 / customer_id > 10\n")]);
        let mut state = rules.state(RuleState::default());
        let rows: Vec<(i64, i64, f64, i64)> =
            (0..40).map(|i| (i, if i % 13 == 5 { 0 } else { 2 }, 1000.0, i)).collect();
        let e = rules.evaluate(&batch(&rows), &mut state, 0, None, Step::at(1)).unwrap();
        assert_eq!(e.alerts.num_rows(), 37);
        let failed: Vec<String> = e.failures.iter().flat_map(|f| column(&f.row, "transaction_id")).collect();
        assert_eq!(failed, vec!["5", "18", "31"]);
        assert!(e.failures.iter().all(|f| f.rule == "ratio" && f.message.to_lowercase().contains("divide by zero")));
    }

    #[test]
    fn reloading_keeps_unchanged_windows() {
        let rapid = (
            "rapid.yaml",
            "id: rapid\nseverity: low\nwindow: { by: [customer_id], size: 60s }\nwhen: count(*) > 1\n",
        );
        let first = compiled(&[rapid]);
        let mut windows = first.state(RuleState::default());
        let a = first.evaluate(&batch(&[(1, 7, 1.0, 0)]), &mut windows, 0, None, Step::at(1)).unwrap().alerts;
        assert_eq!(a.num_rows(), 0);
        let second = compiled(&[rapid, ("big.yaml", "id: big\nseverity: high\nwhen: amount > 1000\n")]);
        let mut windows = second.state(windows);
        let a =
            second.evaluate(&batch(&[(2, 7, 1.0, 1)]), &mut windows, 1_000_000, None, Step::at(2)).unwrap().alerts;
        assert_eq!(column(&a, "alert_id"), vec!["rapid:2"]);
    }
}
