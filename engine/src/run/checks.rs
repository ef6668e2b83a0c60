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
                let count = scalar_u64(
                    &what,
                    &self.query(&what, &format!("SELECT count(*) FROM ({failing})")).await?,
                )?;
                self.row_check(id, index, check, rows, &predicate, reason, count, &mut outcome).await?;
            }
            CheckSql::Unique { key, not_null, reason } => {
                let dups = self
                    .query(&what, &format!("SELECT {key} AS k, count(*) AS n FROM {table} WHERE {not_null} GROUP BY {key} HAVING count(*) > 1"))
                    .await?;
                let count = sum_column(&what, &dups, 1)?;
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
                let n =
                    scalar_u64(&what, &self.query(&what, &format!("SELECT count(*) FROM {table}")).await?)?;
                outcome.passed = min.is_none_or(|m| n >= m) && max.is_none_or(|m| n <= m);
                outcome.message = format!("{n} rows");
            }
            CheckSql::Volume { max_drop, max_growth } => {
                let (passed, message) = self.volume(id, rows, max_drop, max_growth).await?;
                outcome.passed = passed;
                outcome.message = message;
            }
            CheckSql::Freshness { column, max_age_secs } => {
                let sql = format!(
                    "SELECT CAST(date_part('epoch', now()) - date_part('epoch', max({})) AS BIGINT) FROM {table}",
                    crate::spec::sql::ident(&column)
                );
                let age = scalar_i64(&what, &self.query(&what, &sql).await?)?;
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

    /// Keeps failing rows for the quarantine table, which takes them in the
    /// transaction of its connection's loads (never in a dry run, nor when a
    /// check fails and nothing is written).
    async fn quarantine_rows(
        &mut self,
        id: &str,
        check: &str,
        reason: &str,
        mut rows: SendableRecordBatchStream,
    ) -> Result<()> {
        let Some(q) = &self.plan.spec.pipeline.quarantine else {
            return Err(Error::Internal("a quarantine check without a quarantine table".into()));
        };
        let mut kept = Vec::new();
        while let Some(batch) = rows.next().await {
            let batch = batch.map_err(|e| df_error("quarantine", e))?;
            kept.extend(
                json_values(&[batch]).map_err(|e| Error::Internal(format!("quarantine of '{id}': {e}")))?,
            );
        }
        self.rejects.push(crate::connectors::Rejects {
            table: q.table.clone(),
            run_id: self.report.run_id.clone(),
            node: id.to_string(),
            check: check.to_string(),
            reason: reason.to_string(),
            rows: kept,
        });
        Ok(())
    }
}

/// The count a check query returned; a query that returned none, or
/// something that is not a count, is an error (never a count of 0, which
/// would pass the check).
fn scalar_u64(what: &str, batches: &[RecordBatch]) -> Result<u64> {
    scalar_i64(what, batches)?
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| Error::Internal(format!("{what}: the count query returned no count")))
}

/// The sum of an integer column over batches.
fn sum_column(what: &str, batches: &[RecordBatch], col: usize) -> Result<u64> {
    use datafusion::arrow::array::Array;
    let mut sum = 0u64;
    for b in batches {
        let a = int64s(what, b, col)?;
        if a.null_count() > 0 {
            return Err(Error::Internal(format!("{what}: a count is NULL")));
        }
        sum += a.values().iter().map(|&v| u64::try_from(v).unwrap_or(0)).sum::<u64>();
    }
    Ok(sum)
}

/// The first value of the first column, `None` when it is NULL.
fn scalar_i64(what: &str, batches: &[RecordBatch]) -> Result<Option<i64>> {
    use datafusion::arrow::array::Array;
    let Some(b) = batches.iter().find(|b| b.num_rows() > 0) else {
        return Err(Error::Internal(format!("{what}: the query returned no row")));
    };
    let a = int64s(what, b, 0)?;
    Ok((!a.is_null(0)).then(|| a.value(0)))
}

/// A column as 64-bit integers; a value that does not convert is an error.
fn int64s(what: &str, b: &RecordBatch, col: usize) -> Result<datafusion::arrow::array::Int64Array> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::compute::{cast_with_options, CastOptions};
    use datafusion::arrow::datatypes::{DataType, Int64Type};
    let column = b.columns().get(col).ok_or_else(|| Error::Internal(format!("{what}: no column {col}")))?;
    let opts = CastOptions { safe: false, ..Default::default() };
    let cast = cast_with_options(column, &DataType::Int64, &opts)
        .map_err(|e| Error::Internal(format!("{what}: {} is not a count: {e}", column.data_type())))?;
    Ok(cast.as_primitive::<Int64Type>().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    fn one(col: datafusion::arrow::array::ArrayRef) -> Vec<RecordBatch> {
        let schema = Arc::new(Schema::new(vec![Field::new("n", col.data_type().clone(), true)]));
        vec![RecordBatch::try_new(schema, vec![col]).expect("batch")]
    }

    #[test]
    fn counts_that_are_not_counts_are_errors_not_zero() {
        assert_eq!(scalar_u64("c", &one(Arc::new(Int64Array::from(vec![7])))).ok(), Some(7));
        assert!(scalar_u64("c", &one(Arc::new(StringArray::from(vec!["seven"])))).is_err());
        assert!(scalar_u64("c", &one(Arc::new(Int64Array::from(vec![None::<i64>])))).is_err());
        assert!(scalar_u64("c", &[]).is_err());
        assert!(sum_column("c", &one(Arc::new(StringArray::from(vec!["2", "x"]))), 0).is_err());
        assert_eq!(sum_column("c", &one(Arc::new(Int64Array::from(vec![2, 3]))), 0).ok(), Some(5));
    }
}
