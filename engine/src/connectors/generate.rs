//! The generate source: rows computed from SQL expressions over the row
//! number `n`, with seeded random functions (see `transform::generate`).

use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::SessionContext;

use super::df_error;
use crate::error::{Error, Result};
use crate::spec::model::GenerateSource;
use crate::transform::generate;

/// The SELECT that makes `rows` rows of `g`.
pub fn sql(g: &GenerateSource, rows: u64) -> Result<String> {
    let last = rows as i64 - 1;
    Ok(format!(
        "{} FROM (SELECT CAST(value AS BIGINT) AS n FROM generate_series(0, {last})) AS rows",
        select(g)?
    ))
}

/// `SELECT <columns>` of `g`, for a FROM that provides the row number `n`.
pub fn select(g: &GenerateSource) -> Result<String> {
    let seed = g.seed.unwrap_or(0);
    let mut cols = Vec::new();
    for (i, (name, expr)) in g.columns.iter().enumerate() {
        let e = generate::rewrite(expr.value(), seed, i)
            .map_err(|e| Error::Usage(format!("column '{name}': {e}")))?;
        cols.push(format!("{e} AS \"{}\"", name.replace('"', "\"\"")));
    }
    Ok(format!("SELECT {}", cols.join(", ")))
}

pub async fn open(ctx: &SessionContext, g: &GenerateSource) -> Result<SendableRecordBatchStream> {
    let query = sql(g, g.rows.unwrap_or(0))?;
    let df = ctx.sql(&query).await.map_err(|e| df_error("generate", e))?;
    df.execute_stream().await.map_err(|e| df_error("generate", e))
}
