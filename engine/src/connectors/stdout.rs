//! Prints rows: an aligned table, or one JSON object per line.

use std::io::Write;

use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;

use super::df_error;
use crate::error::{Error, Result};
use crate::spec::model::{StdoutFormat, StdoutSink};

pub async fn write(s: &StdoutSink, mut input: SendableRecordBatchStream) -> Result<u64> {
    let mut rows = 0u64;
    let mut batches = Vec::new();
    let stdout = std::io::stdout();
    while let Some(batch) = input.next().await {
        let batch = batch.map_err(|e| df_error("stdout", e))?;
        rows += batch.num_rows() as u64;
        match s.format {
            StdoutFormat::Table => batches.push(batch),
            StdoutFormat::Json => {
                let mut w = datafusion::arrow::json::LineDelimitedWriter::new(stdout.lock());
                w.write(&batch).map_err(|e| df_error("stdout", e))?;
                w.finish().map_err(|e| df_error("stdout", e))?;
            }
        }
    }
    if s.format == StdoutFormat::Table {
        let table = pretty_format_batches(&batches).map_err(|e| df_error("stdout", e))?;
        writeln!(stdout.lock(), "{table}")
            .map_err(|e| Error::External { system: "stdout".into(), message: e.to_string() })?;
    }
    Ok(rows)
}
