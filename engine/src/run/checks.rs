//! The checks of a batch run: each check of a node runs as SQL over the
//! node's file before any sink writes. `on_fail: quarantine` splits the file
//! into passing rows (which flow on) and failing rows (kept for the
//! quarantine table), and the check fails only past `max_failures`.

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;

use super::check_sql::{self as sql_of, CheckSql};
use super::report::CheckOutcome;
use super::Executor;
use crate::connectors::codec::json_values;
use crate::connectors::postgres;
use crate::error::{Error, Result};
use crate::spec::model::{Check, OnFail, Severity};
use crate::spec::sql::df_error;

impl Executor<'_> {
    /// Evaluates one check of node `id` on its current file.
    pub(super) async fn check(
        &mut self,
        id: &str,
        index: usize,
        check: &Check,
        rows: u64,
    ) -> Result<CheckOutcome> {
        let what = format!("check '{}' on '{id}'", check.name());
        let table = crate::spec::sql::ident(id);
        let opts = check.options();
        let mut outcome = CheckOutcome::new(id, check);
        match sql_of::compile(check) {
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
                        format!("{not_null} AND {key} IN (SELECT k FROM {})", crate::spec::sql::ident(&name));
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
                    crate::spec::sql::ident(&column)
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
        let table = crate::spec::sql::ident(id);
        let opts = check.options();
        let failing = format!("SELECT * FROM {table} WHERE {predicate}");
        outcome.failing_rows = count;
        let samples = self.query(&what, &format!("{failing} LIMIT 10")).await?;
        outcome.samples = json_values(&samples).map_err(|e| Error::Internal(format!("{what}: {e}")))?;
        outcome.message = if count == 0 { "ok".into() } else { format!("{count} rows: {reason}") };
        if opts.on_fail == OnFail::Quarantine && count > 0 {
            let allowed = opts.max_failures.map_or(0, |m| m.allowed(rows));
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
            let rejects: Vec<postgres::Reject> = json_values(&[batch])
                .map_err(|e| Error::Internal(format!("quarantine of '{id}': {e}")))?
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

fn scalar_i64(batches: &[RecordBatch]) -> Option<i64> {
    use datafusion::arrow::array::{Array, Int64Array};
    let b = batches.iter().find(|b| b.num_rows() > 0)?;
    let col =
        datafusion::arrow::compute::cast(b.column(0), &datafusion::arrow::datatypes::DataType::Int64).ok()?;
    let a = col.as_any().downcast_ref::<Int64Array>()?;
    (!a.is_null(0)).then(|| a.value(0))
}
