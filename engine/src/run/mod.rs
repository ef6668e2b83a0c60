//! The batch executor: runs a compiled [`Plan`] once.
//!
//! Each source and transform streams its output into an Arrow IPC file in a
//! run folder, which then serves as the table of that node id in one
//! DataFusion session: downstream SQL, checks and sinks read it back as a
//! stream, so memory does not grow with the data. Checks run on those files
//! before any sink writes; `on_fail: quarantine` splits a node's file into
//! passing and quarantined rows. A failing check of severity `error` ends the
//! run with status 1 and nothing written.

pub mod checks;
mod ipc;
pub mod report;
pub mod spec_test;

use std::collections::HashSet;
use std::fs::File;
use std::path::PathBuf;
use std::time::Instant;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::writer::FileWriter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;

use crate::connectors::{self, df_error, postgres};
use crate::error::{Error, Result};
use crate::plan::validate::{parse_max_failures, MaxFailures};
use crate::plan::Plan;
use crate::spec::model::{Check, OnFail, PostgresSink, PostgresSource, Severity, Sink, Source, Transform};
use checks::CheckSql;
use report::{CheckOutcome, NodeReport, RunReport, Status};

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
}

/// Runs the plan. The report says how far it got (`Status`), also when the
/// run stopped on an error, which comes back beside it.
pub async fn run(plan: &Plan, opts: &RunOptions) -> (RunReport, Result<()>) {
    let mut ex = match Executor::new(plan, opts) {
        Ok(ex) => ex,
        Err(e) => return (RunReport::new(&plan.spec.pipeline.name), Err(e)),
    };
    let started = Instant::now();
    let outcome = ex.run_nodes().await;
    let mut report = ex.report;
    report.seconds = started.elapsed().as_secs_f64();
    if let Err(e) = &outcome {
        report.status = Status::Failed;
        report.error = Some(plan.spec.secrets.scrub(&e.to_string()));
    }
    (report, outcome)
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
        Err(e) => return (RunReport::new(&plan.spec.pipeline.name), Err(e)),
    };
    let outcome = ex.run_nodes().await;
    let mut outputs = std::collections::HashMap::new();
    if outcome.is_ok() {
        for n in nodes {
            match ex.query(&format!("node '{n}'"), &format!("SELECT * FROM {}", checks::ident(n))).await {
                Ok(b) => {
                    outputs.insert(n.clone(), b);
                }
                Err(e) => return (ex.report, Err(e)),
            }
        }
    }
    (ex.report, outcome.map(|_| outputs))
}

/// A session with the engine's functions and a memory limit that makes large
/// joins and aggregates spill to disk instead of growing without bound.
pub fn session() -> SessionContext {
    let config = SessionConfig::new().with_target_partitions(2).with_batch_size(8192);
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(512 * 1024 * 1024, 1.0)
        .build_arc()
        .unwrap_or_default();
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    crate::transform::sql::register_functions(&ctx);
    crate::transform::generate::register(&ctx);
    ctx
}

struct Executor<'a> {
    plan: &'a Plan,
    opts: &'a RunOptions,
    ctx: SessionContext,
    dir: tempfile::TempDir,
    selected: HashSet<String>,
    report: RunReport,
    /// The quarantine table's connection, once a check has needed it.
    quarantine: Option<sqlx::PgConnection>,
    /// New watermarks of incremental sources, stored with the sinks.
    watermarks: Vec<(String, String)>,
}

impl<'a> Executor<'a> {
    fn new(plan: &'a Plan, opts: &'a RunOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("engine-run-")
            .tempdir()
            .map_err(|e| Error::io(&std::env::temp_dir(), e))?;
        let selected = select(plan, &opts.select)?;
        let report = RunReport::new(&plan.spec.pipeline.name);
        Ok(Self { plan, opts, ctx: session(), dir, selected, report, quarantine: None, watermarks: vec![] })
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
            let watermark = self.stored_watermark(id, src).await?;
            (
                "source",
                connectors::open_source(&self.ctx, &self.plan.spec, id, src, watermark.as_deref()).await?,
            )
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
                    let version = crate::transform::rules::version(rules);
                    let sql =
                        crate::transform::rules::batch_sql(input, r.key.value(), rules, &columns, &version)
                            .map_err(|e| Error::Usage(format!("{what}: {e}")))?;
                    self.stream(&what, &sql).await?
                }
            };
            ("transform", stream)
        };
        let rows_in = self.input_rows(id);
        let (path, rows) = self.materialize(id, "out", stream).await?;
        self.register(id, &path).await?;
        if let Some(Source::Postgres(PostgresSource { incremental: Some(inc), .. })) =
            pipeline.sources.get(id)
        {
            if rows > 0 {
                let sql = format!(
                    "SELECT CAST(max({}) AS VARCHAR) FROM {}",
                    checks::ident(&inc.column),
                    checks::ident(id)
                );
                if let Some(wm) = scalar_string(&self.query(&format!("source '{id}'"), &sql).await?) {
                    self.watermarks.push((id.to_string(), wm));
                }
            }
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
        Some(
            inputs
                .iter()
                .filter_map(|i| self.report.nodes.iter().find(|n| &n.node == *i))
                .map(|n| n.rows_out)
                .sum(),
        )
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

    /// Evaluates one check of node `id` on its current file.
    async fn check(&mut self, id: &str, index: usize, check: &Check, rows: u64) -> Result<CheckOutcome> {
        let what = format!("check '{}' on '{id}'", check.name());
        let table = checks::ident(id);
        let opts = check.options();
        let mut outcome = CheckOutcome::new(id, check);
        match checks::compile(check) {
            CheckSql::Rows { predicate, reason } => {
                let failing = format!("SELECT * FROM {table} WHERE {predicate}");
                let count =
                    scalar_u64(&self.query(&what, &format!("SELECT count(*) FROM ({failing})")).await?);
                self.row_check(id, index, check, rows, &predicate, reason, count, &mut outcome).await?;
            }
            CheckSql::Unique { key, not_null, reason } => {
                let dups = self
                    .query(&what, &format!("SELECT {key} AS k, count(*) AS n FROM {table} WHERE {not_null} GROUP BY {key} HAVING count(*) > 1"))
                    .await?;
                let count = sum_column(&dups, 1);
                if count == 0 {
                    outcome.message = "ok".into();
                } else {
                    // Few keys repeat: keep them in memory and find their rows.
                    let name = format!("__dups_{id}_{index}");
                    let schema = dups.first().map(|b| b.schema()).unwrap_or_else(|| {
                        std::sync::Arc::new(datafusion::arrow::datatypes::Schema::empty())
                    });
                    let mem = datafusion::datasource::MemTable::try_new(schema, vec![dups])
                        .map_err(|e| df_error(&what, e))?;
                    self.ctx.deregister_table(name.as_str()).map_err(|e| df_error(&what, e))?;
                    self.ctx
                        .register_table(name.as_str(), std::sync::Arc::new(mem))
                        .map_err(|e| df_error(&what, e))?;
                    let predicate =
                        format!("{not_null} AND {key} IN (SELECT k FROM {})", checks::ident(&name));
                    self.row_check(id, index, check, rows, &predicate, reason, count, &mut outcome).await?;
                }
            }
            CheckSql::RowCount { min, max } => {
                let n = scalar_u64(&self.query(&what, &format!("SELECT count(*) FROM {table}")).await?);
                outcome.passed = min.is_none_or(|m| n >= m) && max.is_none_or(|m| n <= m);
                outcome.message = format!("{n} rows");
            }
            CheckSql::Freshness { column, max_age_secs } => {
                let sql = format!(
                    "SELECT CAST(date_part('epoch', now()) - date_part('epoch', max({})) AS BIGINT) FROM {table}",
                    checks::ident(&column)
                );
                let age = scalar_i64(&self.query(&what, &sql).await?);
                outcome.passed = age.is_some_and(|a| a as u64 <= max_age_secs);
                outcome.message = match age {
                    Some(a) => format!("newest {column} is {a}s old (max {max_age_secs}s)"),
                    None => format!("no {column} values"),
                };
            }
        }
        if !outcome.passed && opts.severity == Severity::Warn {
            tracing::info!("{what}: {}", outcome.message);
        }
        Ok(outcome)
    }

    /// Samples, and with `on_fail: quarantine` moves out, the `count` rows
    /// of node `id` for which `predicate` holds.
    #[allow(clippy::too_many_arguments)]
    async fn row_check(
        &mut self,
        id: &str,
        index: usize,
        check: &Check,
        rows: u64,
        predicate: &str,
        reason: String,
        count: u64,
        outcome: &mut CheckOutcome,
    ) -> Result<()> {
        let what = format!("check '{}' on '{id}'", check.name());
        let table = checks::ident(id);
        let opts = check.options();
        let failing = format!("SELECT * FROM {table} WHERE {predicate}");
        outcome.failing_rows = count;
        outcome.samples = to_json_rows(&self.query(&what, &format!("{failing} LIMIT 10")).await?);
        outcome.message = if count == 0 { "ok".into() } else { format!("{count} rows: {reason}") };
        if opts.on_fail == OnFail::Quarantine && count > 0 {
            let allowed = match opts.max_failures.and_then(parse_max_failures) {
                Some(MaxFailures::Count(n)) => n,
                Some(MaxFailures::Percent(p)) => ((rows as f64) * p / 100.0).floor() as u64,
                None => 0,
            };
            outcome.passed = count <= allowed;
            let failing_rows = self.stream(&what, &failing).await?;
            self.quarantine_rows(id, check.name(), &reason, failing_rows).await?;
            let passing =
                self.stream(&what, &format!("SELECT * FROM {table} WHERE NOT ({predicate})")).await?;
            let (path, _) = self.materialize(id, &format!("check{index}"), passing).await?;
            self.register(id, &path).await?;
            outcome.quarantined = count;
            outcome.reason = Some(reason);
        } else {
            outcome.passed = count == 0;
        }
        Ok(())
    }

    /// Moves failing rows into the quarantine table (not in a dry run).
    async fn quarantine_rows(
        &mut self,
        id: &str,
        check: &str,
        reason: &str,
        mut rows: SendableRecordBatchStream,
    ) -> Result<()> {
        if self.opts.dry_run {
            return Ok(());
        }
        let Some(q) = &self.plan.spec.pipeline.quarantine else {
            return Err(Error::Internal("a quarantine check without a quarantine table".into()));
        };
        let name = q.connection.value();
        let Some(conn) = self.plan.spec.pipeline.connections.get(name) else {
            return Err(Error::Internal(format!("quarantine connection '{name}' is missing")));
        };
        let url = conn.url().to_string();
        if self.quarantine.is_none() {
            self.quarantine = Some(postgres::connect(name, &url).await?);
        }
        let run_id = self.report.run_id.clone();
        let table = q.table.clone();
        while let Some(batch) = rows.next().await {
            let batch = batch.map_err(|e| df_error("quarantine", e))?;
            let rejects: Vec<postgres::Reject> = to_json_rows(&[batch])
                .into_iter()
                .map(|row| postgres::Reject { reason: reason.to_string(), row })
                .collect();
            let conn =
                self.quarantine.as_mut().ok_or_else(|| Error::Internal("quarantine connection".into()))?;
            postgres::write_rejects(conn, &table, &run_id, id, check, &rejects)
                .await
                .map_err(|e| postgres::external(name, &url, e))?;
        }
        Ok(())
    }

    /// A test's rows for a source; no rows (with the source's schema, when
    /// it is known) for a source the test does not name.
    async fn given_stream(
        &self,
        id: &str,
        src: &Source,
        rows: Option<&RecordBatch>,
    ) -> Result<SendableRecordBatchStream> {
        let batch =
            match rows {
                Some(b) => b.clone(),
                None => {
                    let schema = self.plan.schemas.get(id).cloned().or_else(|| {
                        src.declared_schema().and_then(|d| crate::plan::schema::from_declared(d).ok())
                    });
                    RecordBatch::new_empty(schema.unwrap_or_else(|| {
                        std::sync::Arc::new(datafusion::arrow::datatypes::Schema::empty())
                    }))
                }
            };
        let df = self.ctx.read_batch(batch).map_err(|e| df_error(&format!("source '{id}'"), e))?;
        df.execute_stream().await.map_err(|e| df_error(&format!("source '{id}'"), e))
    }

    /// The stored watermark of an incremental postgres source, unless `--full-refresh`.
    async fn stored_watermark(&self, id: &str, src: &Source) -> Result<Option<String>> {
        let Source::Postgres(PostgresSource { incremental: Some(_), .. }) = src else { return Ok(None) };
        let Some(state) = &self.plan.spec.pipeline.state else { return Ok(None) };
        if self.opts.full_refresh {
            return Ok(None);
        }
        let name = state.connection.value();
        let url =
            self.plan.spec.pipeline.connections.get(name).map(|c| c.url().to_string()).unwrap_or_default();
        let mut conn = postgres::connect(name, &url).await?;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(postgres::quote_table(&state.table))
            .fetch_one(&mut conn)
            .await
            .map_err(|e| postgres::external(name, &url, e))?;
        if !exists {
            // Not migrated yet (a dry run before the first run): no watermarks.
            return Ok(None);
        }
        let sql = format!(
            "SELECT watermark FROM {} WHERE pipeline = $1 AND node = $2",
            postgres::quote_table(&state.table)
        );
        sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
            .bind(&self.plan.spec.pipeline.name)
            .bind(id)
            .fetch_optional(&mut conn)
            .await
            .map_err(|e| {
                postgres::external(name, &url, format!("reading watermarks from '{}': {e}", state.table))
            })
    }

    /// A stream of a node's current output.
    async fn output(&self, id: &str, node: &str) -> Result<SendableRecordBatchStream> {
        self.stream(&format!("sink '{id}'"), &format!("SELECT * FROM {}", checks::ident(node))).await
    }

    /// Writes every selected sink: postgres sinks per connection in one
    /// transaction with the run's watermarks, the others one by one.
    async fn write_sinks(&mut self) -> Result<()> {
        let pipeline = &self.plan.spec.pipeline;
        // Declaration order: on one connection, sinks load in the order they
        // are written, so a table is loaded before the tables referencing it.
        let sinks: Vec<(&String, &Sink)> =
            pipeline.sinks.iter().filter(|(id, _)| self.selected.contains(*id)).collect();
        let mut groups: indexmap::IndexMap<String, Vec<(&String, &PostgresSink)>> = indexmap::IndexMap::new();
        for (id, sink) in &sinks {
            if let Sink::Postgres(p) = sink {
                groups.entry(p.connection.value().clone()).or_default().push((id, p));
            }
        }
        let state_conn = pipeline.state.as_ref().map(|s| s.connection.value().clone());
        if let Some(sc) = &state_conn {
            if !self.watermarks.is_empty() && !groups.contains_key(sc) {
                groups.insert(sc.clone(), vec![]);
            }
        }
        for (name, members) in groups {
            let started = Instant::now();
            let url = pipeline.connections.get(&name).map(|c| c.url().to_string()).unwrap_or_default();
            let mut loads = Vec::new();
            for (id, p) in &members {
                loads.push(postgres::sink::Load {
                    id,
                    sink: p,
                    input: self.output(id, p.input.value()).await?,
                });
            }
            let marks =
                if state_conn.as_deref() == Some(name.as_str()) { self.watermark_rows() } else { vec![] };
            let bar = self.progress(&format!("loading {} sinks into '{name}'", members.len()));
            let written = if self.opts.dry_run {
                members.iter().map(|(id, _)| (id.to_string(), 0)).collect()
            } else {
                postgres::sink::load_all(&name, &url, loads, &marks).await?
            };
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let seconds = started.elapsed().as_secs_f64() / members.len().max(1) as f64;
            for ((id, p), (_, rows)) in members.iter().zip(written) {
                self.sink_report(id, p.input.value(), rows, seconds);
            }
        }
        for (id, sink) in sinks {
            if matches!(sink, Sink::Postgres(_)) {
                continue;
            }
            let started = Instant::now();
            let input = sink.input().value();
            let stream = self.output(id, input).await?;
            let rows = if self.opts.dry_run {
                0
            } else {
                connectors::write_local(&self.plan.spec, id, sink, stream).await?
            };
            self.sink_report(id, input, rows, started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn watermark_rows(&self) -> Vec<postgres::sink::Watermark> {
        let Some(state) = &self.plan.spec.pipeline.state else { return vec![] };
        self.watermarks
            .iter()
            .map(|(node, value)| postgres::sink::Watermark {
                table: state.table.clone(),
                pipeline: self.plan.spec.pipeline.name.clone(),
                node: node.clone(),
                value: value.clone(),
            })
            .collect()
    }

    fn sink_report(&mut self, id: &str, input: &str, rows: u64, seconds: f64) {
        let rows_in = self.report.nodes.iter().find(|n| n.node == input).map(|n| n.rows_out);
        let mut node = NodeReport::new(id, "sink", rows_in, rows);
        node.seconds = seconds;
        self.report.nodes.push(node);
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

fn scalar_u64(batches: &[RecordBatch]) -> u64 {
    scalar_i64(batches).unwrap_or(0).max(0) as u64
}

/// The sum of an integer column over batches.
fn sum_column(batches: &[RecordBatch], col: usize) -> u64 {
    use datafusion::arrow::array::{Array, Int64Array};
    batches
        .iter()
        .filter_map(|b| {
            datafusion::arrow::compute::cast(b.column(col), &datafusion::arrow::datatypes::DataType::Int64)
                .ok()
        })
        .map(|a| {
            a.as_any().downcast_ref::<Int64Array>().map(|a| a.iter().flatten().sum::<i64>()).unwrap_or(0)
        })
        .sum::<i64>()
        .max(0) as u64
}

fn scalar_string(batches: &[RecordBatch]) -> Option<String> {
    use datafusion::arrow::array::{Array, StringArray};
    let b = batches.iter().find(|b| b.num_rows() > 0)?;
    let col =
        datafusion::arrow::compute::cast(b.column(0), &datafusion::arrow::datatypes::DataType::Utf8).ok()?;
    let a = col.as_any().downcast_ref::<StringArray>()?;
    (!a.is_null(0)).then(|| a.value(0).to_string())
}

fn scalar_i64(batches: &[RecordBatch]) -> Option<i64> {
    use datafusion::arrow::array::{Array, Int64Array};
    let b = batches.iter().find(|b| b.num_rows() > 0)?;
    let col =
        datafusion::arrow::compute::cast(b.column(0), &datafusion::arrow::datatypes::DataType::Int64).ok()?;
    let a = col.as_any().downcast_ref::<Int64Array>()?;
    (!a.is_null(0)).then(|| a.value(0))
}

/// Rows as JSON objects, for reports and the quarantine table.
pub fn to_json_rows(batches: &[RecordBatch]) -> Vec<serde_json::Value> {
    let mut buf = Vec::new();
    {
        let mut w = datafusion::arrow::json::ArrayWriter::new(&mut buf);
        for b in batches {
            if w.write(b).is_err() {
                return vec![];
            }
        }
        if w.finish().is_err() {
            return vec![];
        }
    }
    serde_json::from_slice(&buf).unwrap_or_default()
}
