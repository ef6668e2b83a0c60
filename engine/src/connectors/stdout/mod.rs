//! Prints rows: an aligned table, or one JSON object per line.

pub mod config;

use std::io::Write;

use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::spec::sql::df_error;
use config::{StdoutFormat, StdoutSink};

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

// ------------------------------------------------------------------ runtime

#[async_trait::async_trait]
impl super::BatchSink for StdoutSink {
    async fn write(&self, _node: super::Node<'_>, input: SendableRecordBatchStream) -> Result<u64> {
        write(self, input).await
    }
}

impl super::OpenStreamSink for StdoutSink {
    fn open_stream(&self, _node: super::Node<'_>) -> Result<Box<dyn super::StreamSink>> {
        Ok(Box::new(self.clone()))
    }
}

#[async_trait::async_trait]
impl super::StreamSink for StdoutSink {
    async fn write(
        &mut self,
        batches: &[datafusion::arrow::record_batch::RecordBatch],
    ) -> Result<super::Written> {
        let schema = batches[0].schema();
        let owned: Vec<_> = batches.iter().cloned().map(Ok).collect();
        let input = Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
            schema,
            futures::stream::iter(owned),
        ));
        write(self, input).await.map(super::Written::all)
    }
}
