//! The batch executor: runs a compiled [`Plan`] once.
//!
//! Each source and transform streams its output into an Arrow IPC file in a
//! run folder, which then serves as the table of that node id in one
//! DataFusion session: downstream SQL, checks and sinks read it back as a
//! stream, so memory does not grow with the data. Checks run on those files
//! before any sink writes; `on_fail: quarantine` splits a node's file into
//! passing and quarantined rows. A failing check of severity `error` ends the
//! run with status 1 and nothing written.
//!
//! The writes then go in an order that cannot lose rows (`sinks`): sinks
//! that load alone, then each connection's transaction, the state's
//! connection last, where the watermarks, the quarantined rows kept there
//! and the run's own history row commit with its loads (`history`).

mod check_sql;
mod checks;
mod history;
mod ipc;
pub mod report;
mod sinks;
mod sources;
pub mod spec_test;
mod watermarks;

use std::collections::HashSet;
use std::fs::File;
use std::path::PathBuf;
use std::time::Instant;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::writer::FileWriter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use crate::connectors::postgres;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::spec::model::{Check, Severity, Transform};
use crate::spec::sql::df_error;

use report::{NodeReport, RunReport, Status};

/// How `engine run` runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run only these nodes and what they need (empty: all).
    pub select: Vec<String>,
    /// Compute and check everything, write nothing.
    pub dry_run: bool,
    /// Ignore stored watermarks: incremental sources read everything.
    pub full_refresh: bool,
    /// Rows that replace sources (`engine test`): no connection is opened and
    /// no sink runs.
    pub given: Option<std::collections::HashMap<String, RecordBatch>>,
    /// Show progress on the terminal.
    pub progress: bool,
    /// The run's id (a new one when `None`).
    pub run_id: Option<String>,
}

/// Runs the plan. The report says how far it got (`Status`), also when the
/// run stopped on an error, which comes back beside it.
pub async fn run(plan: &Plan, opts: &RunOptions) -> (RunReport, Result<()>) {
    let mut ex = match Executor::new(plan, opts) {
        Ok(ex) => ex,
        Err(e) => return (RunReport::new(&plan.spec.pipeline.name, opts.run_id.as_deref()), Err(e)),
    };
    let started = Instant::now();
    let mut outcome = ex.start_history().await;
    if outcome.is_ok() {
        outcome = ex.run_nodes().await;
    }
    ex.report.seconds = started.elapsed().as_secs_f64();
    if let Err(e) = &outcome {
        ex.report.status = Status::Failed;
        ex.report.error = Some(plan.spec.secrets.scrub(&e.to_string()));
    }
    // A run that did not commit its success records how it ended.
    if let Err(e) = ex.end_history(outcome.as_ref().err()).await {
        if outcome.is_ok() {
            ex.report.status = Status::Failed;
            ex.report.error = Some(plan.spec.secrets.scrub(&e.to_string()));
            outcome = Err(e);
        } else {
            tracing::warn!("the run history could not record this failed run: {e}");
        }
    }
    (ex.report, outcome)
}

/// Runs the plan as `engine test` does (see [`RunOptions::given`]) and
/// returns the outputs of `nodes` after their checks.
pub(crate) async fn run_collect(
    plan: &Plan,
    opts: &RunOptions,
    nodes: &[String],
) -> (RunReport, Result<std::collections::HashMap<String, Vec<RecordBatch>>>) {
    let mut ex = match Executor::new(plan, opts) {
        Ok(ex) => ex,
        Err(e) => return (RunReport::new(&plan.spec.pipeline.name, opts.run_id.as_deref()), Err(e)),
    };
    let outcome = ex.run_nodes().await;
    let mut outputs = std::collections::HashMap::new();
    if outcome.is_ok() {
        for n in nodes {
            match ex
                .query(&format!("node '{n}'"), &format!("SELECT * FROM {}", crate::spec::sql::ident(n)))
                .await
            {
                Ok(b) => {
                    outputs.insert(n.clone(), b);
                }
                Err(e) => return (ex.report, Err(e)),
            }
        }
    }
    (ex.report, outcome.map(|_| outputs))
}

struct Executor<'a> {
    plan: &'a Plan,
    opts: &'a RunOptions,
    ctx: SessionContext,
    dir: tempfile::TempDir,
    selected: HashSet<String>,
    report: RunReport,
    /// Rows quarantined by checks, written with the loads.
    rejects: Vec<crate::connectors::Rejects>,
    /// New watermarks of incremental sources, stored with the sinks.
    watermarks: Vec<(String, String)>,
    /// Whether this run is recorded in the run history with its end still
    /// to write.
    history: bool,
}

impl<'a> Executor<'a> {
    fn new(plan: &'a Plan, opts: &'a RunOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("engine-run-")
            .tempdir()
            .map_err(|e| Error::io(&std::env::temp_dir(), e))?;
        let selected = select(plan, &opts.select)?;
        let report = RunReport::new(&plan.spec.pipeline.name, opts.run_id.as_deref());
        Ok(Self {
            plan,
            opts,
            ctx: crate::transform::sql::session(crate::transform::sql::Purpose::Batch),
            dir,
            selected,
            report,
            rejects: vec![],
            watermarks: vec![],
            history: false,
        })
    }

    async fn run_nodes(&mut self) -> Result<()> {
        if !self.opts.dry_run && self.opts.given.is_none() {
            postgres::migrate_spec(&self.plan.spec).await?;
        }
        let pipeline = &self.plan.spec.pipeline;
        let order: Vec<String> = self.plan.order();
        for id in &order {
            if !self.selected.contains(id) || pipeline.sinks.contains_key(id) {
                continue;
            }
            self.compute(id).await?;
        }
        if self.report.checks.iter().any(|c| !c.passed && c.severity == Severity::Error) {
            self.report.status = Status::CheckFailed;
            return Ok(());
        }
        if self.opts.given.is_some() {
            return Ok(());
        }
        self.write_sinks().await
    }

    /// Computes a source or transform into its file, then runs its checks.
    async fn compute(&mut self, id: &str) -> Result<()> {
        let started = Instant::now();
        let pipeline = &self.plan.spec.pipeline;
        let given = self.opts.given.as_ref().map(|g| g.get(id));
        let (role, stream) = if let (Some(given), Some(src)) = (given, pipeline.sources.get(id)) {
            ("source", self.given_stream(id, src, given).await?)
        } else if let Some(src) = pipeline.sources.get(id) {
            ("source", self.open_source(id, src).await?)
        } else {
            let Some(t) = pipeline.transforms.get(id) else { return Ok(()) };
            let stream = match t {
                Transform::Sql(s) => {
                    let df = self
                        .ctx
                        .sql(s.sql.value())
                        .await
                        .map_err(|e| df_error(&format!("transform '{id}'"), e))?;
                    df.execute_stream().await.map_err(|e| df_error(&format!("transform '{id}'"), e))?
                }
                Transform::Rules(r) => {
                    let what = format!("transform '{id}'");
                    let input = r.input.value();
                    let table = self.ctx.table(input.as_str()).await.map_err(|e| df_error(&what, e))?;
                    let columns: Vec<String> =
                        table.schema().fields().iter().map(|f| f.name().clone()).collect();
                    let rules = self.plan.rules.get(id).map(Vec::as_slice).unwrap_or_default();
                    let version = crate::rules::batch::version(rules);
                    // A test checks shadow rules too: what they would do live.
                    let shadow = self.opts.given.is_some() || r.shadow.unwrap_or(false);
                    let sql = crate::rules::batch::batch_sql(
                        input,
                        r.key.value(),
                        rules,
                        &columns,
                        &version,
                        shadow,
                    )
                    .map_err(|e| Error::Usage(format!("{what}: {e}")))?;
                    self.stream(&what, &sql).await?
                }
            };
            ("transform", stream)
        };
        let rows_in = self.input_rows(id);
        let (path, rows) = self.materialize(id, "out", stream).await?;
        self.register(id, &path).await?;
        if rows > 0 {
            self.note_watermark(id).await?;
        }
        let mut node = NodeReport::new(id, role, rows_in, rows);
        let checks: Vec<Check> = match (pipeline.sources.get(id), pipeline.transforms.get(id)) {
            (Some(s), _) => s.checks().to_vec(),
            (_, Some(t)) => t.checks().to_vec(),
            _ => vec![],
        };
        for (i, check) in checks.iter().enumerate() {
            let outcome = self.check(id, i, check, rows).await?;
            node.quarantined += outcome.quarantined;
            self.report.checks.push(outcome);
        }
        node.rows_out = rows - node.quarantined;
        node.seconds = started.elapsed().as_secs_f64();
        self.report.nodes.push(node);
        Ok(())
    }

    fn input_rows(&self, id: &str) -> Option<u64> {
        let inputs: Vec<&String> = match self.plan.spec.pipeline.transforms.get(id)? {
            Transform::Sql(_) => self.plan.nodes.keys().filter(|n| self.reads(id, n)).collect(),
            Transform::Rules(r) => vec![r.input.value()],
        };
        Some(inputs.iter().filter_map(|i| self.rows_out(i)).sum())
    }

    /// The rows a node passed on, once it ran.
    fn rows_out(&self, node: &str) -> Option<u64> {
        self.report.nodes.iter().find(|n| n.node == node).map(|n| n.rows_out)
    }

    fn reads(&self, id: &str, input: &str) -> bool {
        let (Some(&to), Some(&from)) = (self.plan.nodes.get(id), self.plan.outputs.get(input)) else {
            return false;
        };
        self.plan.graph.contains_edge(from, to)
    }

    /// Streams batches into an Arrow IPC file of the run folder.
    /// A spinner with a row count for a node, when progress is shown.
    fn progress(&self, id: &str) -> Option<indicatif::ProgressBar> {
        if !self.opts.progress {
            return None;
        }
        let bar = indicatif::ProgressBar::new_spinner();
        let style =
            indicatif::ProgressStyle::with_template("{spinner} {prefix}: {human_pos} rows ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.set_prefix(id.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Some(bar)
    }

    async fn materialize(
        &self,
        id: &str,
        tag: &str,
        mut stream: SendableRecordBatchStream,
    ) -> Result<(PathBuf, u64)> {
        let bar = self.progress(id);
        let path = self.dir.path().join(format!("{id}.{tag}.arrow"));
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let schema: SchemaRef = stream.schema();
        let what = format!("node '{id}'");
        let mut writer = FileWriter::try_new(file, &schema).map_err(|e| df_error(&what, e))?;
        let mut rows = 0u64;
        while let Some(batch) = stream.next().await {
            let batch: RecordBatch = batch.map_err(|e| df_error(&what, e))?;
            rows += batch.num_rows() as u64;
            writer.write(&batch).map_err(|e| df_error(&what, e))?;
            if let Some(b) = &bar {
                b.set_position(rows);
            }
        }
        writer.finish().map_err(|e| df_error(&what, e))?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        Ok((path, rows))
    }

    async fn register(&self, id: &str, path: &std::path::Path) -> Result<()> {
        let what = format!("node '{id}'");
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let schema = datafusion::arrow::ipc::reader::FileReader::try_new(std::io::BufReader::new(file), None)
            .map_err(|e| df_error(&what, e))?
            .schema();
        let table = ipc::table(path.to_path_buf(), schema).map_err(|e| df_error(&what, e))?;
        self.ctx.deregister_table(id).map_err(|e| df_error(&what, e))?;
        self.ctx.register_table(id, std::sync::Arc::new(table)).map_err(|e| df_error(&what, e))?;
        Ok(())
    }

    pub(crate) async fn query(&self, what: &str, sql: &str) -> Result<Vec<RecordBatch>> {
        let df = self.ctx.sql(sql).await.map_err(|e| df_error(what, e))?;
        df.collect().await.map_err(|e| df_error(what, e))
    }

    async fn stream(&self, what: &str, sql: &str) -> Result<SendableRecordBatchStream> {
        let df = self.ctx.sql(sql).await.map_err(|e| df_error(what, e))?;
        df.execute_stream().await.map_err(|e| df_error(what, e))
    }
}

/// The nodes `--select` asks for and everything they read from; all when empty.
fn select(plan: &Plan, names: &[String]) -> Result<HashSet<String>> {
    let all: HashSet<String> = plan.nodes.keys().cloned().collect();
    if names.is_empty() {
        return Ok(all);
    }
    let mut out = HashSet::new();
    for name in names {
        let Some(&idx) = plan.nodes.get(name) else {
            let hint = crate::spec::suggest::hint(name, all.iter().map(String::as_str));
            return Err(Error::Usage(format!("--select: unknown node '{name}'{hint}")));
        };
        let mut dfs = petgraph::visit::Dfs::new(petgraph::visit::Reversed(&plan.graph), idx);
        while let Some(n) = dfs.next(petgraph::visit::Reversed(&plan.graph)) {
            out.insert(plan.graph[n].id.clone());
        }
    }
    Ok(out)
}
