//! The run history: one row per `engine run` in a table on the state
//! connection (`etl_runs` unless `state.runs` names another). A run inserts
//! its row as `running` when it starts; the row becomes `success` in the
//! same transaction as the loads on that connection, or `check_failed` /
//! `failed` when the run ends otherwise. A run that was killed stays
//! `running` with no end time.

use sqlx::PgConnection;

use super::{connect, external};
use crate::connectors::RunRecord;
use crate::error::Result;
use crate::spec::sql::qualified;

/// Creates the history table if it is missing, and records the run as started.
pub async fn start(
    name: &str,
    url: &str,
    table: &str,
    run_id: &str,
    pipeline: &str,
    spec_hash: &str,
) -> Result<()> {
    let mut conn = connect(name, url).await?;
    let ext = |e: sqlx::Error| external(name, url, format!("run history '{table}': {e}"));
    let t = qualified(table);
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {t} (\
           run_id        TEXT PRIMARY KEY,\
           pipeline      TEXT NOT NULL,\
           spec_hash     TEXT NOT NULL,\
           started_at    TIMESTAMPTZ NOT NULL,\
           finished_at   TIMESTAMPTZ,\
           status        TEXT NOT NULL,\
           exit_code     INT,\
           nodes         JSONB NOT NULL DEFAULT '{{}}',\
           failed_checks JSONB NOT NULL DEFAULT '[]',\
           error         TEXT)"
    );
    sqlx::query(sqlx::AssertSqlSafe(create)).execute(&mut conn).await.map_err(ext)?;
    let index = format!(
        "CREATE INDEX IF NOT EXISTS {} ON {t} (pipeline, started_at)",
        crate::spec::sql::ident(&format!("{}_pipeline", table.rsplit('.').next().unwrap_or(table)))
    );
    sqlx::query(sqlx::AssertSqlSafe(index)).execute(&mut conn).await.map_err(ext)?;
    let insert = format!(
        "INSERT INTO {t} (run_id, pipeline, spec_hash, started_at, status) \
         VALUES ($1, $2, $3, clock_timestamp(), 'running')"
    );
    sqlx::query(sqlx::AssertSqlSafe(insert))
        .bind(run_id)
        .bind(pipeline)
        .bind(spec_hash)
        .execute(&mut conn)
        .await
        .map_err(ext)?;
    Ok(())
}

/// Records how the run ended, in the caller's transaction.
pub async fn finish(conn: &mut PgConnection, run: &RunRecord) -> std::result::Result<(), String> {
    let sql = format!(
        "UPDATE {} SET finished_at = clock_timestamp(), status = $2, exit_code = $3, \
         nodes = $4::text::jsonb, failed_checks = $5::text::jsonb, error = $6 WHERE run_id = $1",
        qualified(&run.table)
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&run.run_id)
        .bind(run.status)
        .bind(run.exit_code)
        .bind(run.nodes.to_string())
        .bind(run.failed_checks.to_string())
        .bind(&run.error)
        .execute(&mut *conn)
        .await
        .map_err(|e| format!("run history '{}': {e}", run.table))?;
    if done.rows_affected() != 1 {
        return Err(format!("run history '{}': run '{}' is not recorded", run.table, run.run_id));
    }
    Ok(())
}

/// Records how a run ended that loaded nothing on the state connection.
pub async fn finish_alone(name: &str, url: &str, run: &RunRecord) -> Result<()> {
    let mut conn = connect(name, url).await?;
    finish(&mut conn, run).await.map_err(|e| external(name, url, e))
}

/// The rows `node` read in the pipeline's last successful run: `None` when
/// there is no such run or it did not run that node.
pub async fn last_rows(
    name: &str,
    url: &str,
    table: &str,
    pipeline: &str,
    node: &str,
) -> Result<Option<(String, u64)>> {
    let mut conn = connect(name, url).await?;
    if !super::table_exists(&mut conn, table).await.map_err(|e| external(name, url, e))? {
        return Ok(None);
    }
    let sql = format!(
        "SELECT run_id, (nodes -> $2 ->> 'rows_read')::int8 FROM {} \
         WHERE pipeline = $1 AND status = 'success' ORDER BY finished_at DESC LIMIT 1",
        qualified(table)
    );
    let row: Option<(String, Option<i64>)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(pipeline)
        .bind(node)
        .fetch_optional(&mut conn)
        .await
        .map_err(|e| external(name, url, format!("run history '{table}': {e}")))?;
    Ok(row.and_then(|(id, rows)| Some((id, u64::try_from(rows?).ok()?))))
}
