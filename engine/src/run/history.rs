//! The run history on the state connection (see
//! [`crate::connectors::postgres::runs`]): a run records itself when it
//! starts, its success commits with the loads on that connection, and any
//! other end is recorded on its own. The `volume` check reads it.

use super::report::Status;
use super::Executor;
use crate::connectors::{postgres, RunRecord};
use crate::error::{Error, Result};
use crate::spec::model::StateStore;

impl Executor<'_> {
    /// The state store with its connection's name and URL, when the
    /// pipeline keeps state.
    pub(super) fn state_connection(&self) -> Option<(&StateStore, &String, String)> {
        let state = self.plan.spec.pipeline.state.as_ref()?;
        let name = state.connection.value();
        let url =
            self.plan.spec.pipeline.connections.get(name).map(|c| c.url().to_string()).unwrap_or_default();
        Some((state, name, url))
    }

    /// Records the run as started, when the pipeline keeps state and the
    /// run writes (not `--dry-run`, not `engine test`).
    pub(super) async fn start_history(&mut self) -> Result<()> {
        if self.opts.dry_run || self.opts.given.is_some() {
            return Ok(());
        }
        let spec = &self.plan.spec;
        let Some((state, name, url)) = self.state_connection() else { return Ok(()) };
        let text = std::fs::read(&spec.file).map_err(|e| Error::io(&spec.file, e))?;
        let hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&text));
        postgres::runs::start(name, &url, &state.runs, &self.report.run_id, &spec.pipeline.name, &hash)
            .await?;
        self.history = true;
        Ok(())
    }

    /// The history row of this run as it ends with `status`; `extra` adds
    /// nodes not in the report yet (sinks loading in the same transaction).
    pub(super) fn run_record(
        &self,
        status: &'static str,
        exit_code: i32,
        extra: &[(String, u64)],
    ) -> Result<Option<RunRecord>> {
        let Some(state) = self.plan.spec.pipeline.state.as_ref() else { return Ok(None) };
        let mut nodes = serde_json::Map::new();
        for n in &self.report.nodes {
            nodes.insert(
                n.node.clone(),
                serde_json::json!({
                    "role": n.role,
                    "rows_in": n.rows_in,
                    "rows_out": n.rows_out,
                    "quarantined": n.quarantined,
                    "rows_read": n.rows_out + n.quarantined,
                }),
            );
        }
        for (sink, rows) in extra {
            nodes.insert(
                sink.clone(),
                serde_json::json!({ "role": "sink", "rows_in": rows, "rows_out": rows, "quarantined": 0 }),
            );
        }
        let failed: Vec<&super::report::CheckOutcome> =
            self.report.checks.iter().filter(|c| !c.passed).collect();
        let failed_checks = serde_json::to_value(failed)
            .map_err(|e| Error::Internal(format!("the failed checks as JSON: {e}")))?;
        Ok(Some(RunRecord {
            table: state.runs.clone(),
            run_id: self.report.run_id.clone(),
            status,
            exit_code,
            nodes: serde_json::Value::Object(nodes),
            failed_checks,
            error: self.report.error.clone(),
        }))
    }

    /// The success record, for the transaction on the state's connection;
    /// `None` when this run keeps no history.
    pub(super) fn success_record(&self, extra: &[(String, u64)]) -> Result<Option<RunRecord>> {
        if !self.history {
            return Ok(None);
        }
        self.run_record("success", 0, extra)
    }

    /// Records how the run ended, unless its success was committed with the loads.
    pub(super) async fn end_history(&mut self, error: Option<&Error>) -> Result<()> {
        if !std::mem::take(&mut self.history) {
            return Ok(());
        }
        let (status, code) = match (error, self.report.status) {
            (Some(e), _) => ("failed", e.exit_code()),
            (None, Status::CheckFailed) => ("check_failed", 1),
            (None, _) => ("success", 0),
        };
        let Some(record) = self.run_record(status, code, &[])? else { return Ok(()) };
        let Some((_, name, url)) = self.state_connection() else { return Ok(()) };
        postgres::runs::finish_alone(name, &url, &record).await
    }

    /// The `volume` check of node `id`, which read `rows`: compared with
    /// what it read in the pipeline's last successful run.
    pub(super) async fn volume(
        &self,
        id: &str,
        rows: u64,
        max_drop: Option<f64>,
        max_growth: Option<f64>,
    ) -> Result<(bool, String)> {
        if self.opts.given.is_some() {
            return Ok((true, format!("{rows} rows; tests have no run history")));
        }
        let Some((state, name, url)) = self.state_connection() else {
            return Err(Error::Internal("a volume check without a state connection".into()));
        };
        let pipeline = &self.plan.spec.pipeline.name;
        let last = postgres::runs::last_rows(name, &url, &state.runs, pipeline, id).await?;
        let Some((run, before)) = last else {
            return Ok((true, format!("{rows} rows; no earlier successful run to compare with")));
        };
        if before == 0 {
            return Ok((true, format!("{rows} rows; the last successful run ({run}) read none")));
        }
        let change = (rows as f64 - before as f64) / before as f64 * 100.0;
        if change < 0.0 && max_drop.is_some_and(|m| -change > m) {
            return Ok((
                false,
                format!("{rows} rows, {:.0}% fewer than the last successful run ({before})", -change),
            ));
        }
        if change > 0.0 && max_growth.is_some_and(|m| change > m) {
            return Ok((
                false,
                format!("{rows} rows, {change:.0}% more than the last successful run ({before})"),
            ));
        }
        Ok((true, format!("{rows} rows; the last successful run read {before}")))
    }
}
