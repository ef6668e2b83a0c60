//! A node's materialized output as a DataFusion table that streams its Arrow
//! IPC file batch by batch on every scan, so checks and downstream SQL read
//! it with bounded memory however large the file is.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::FileReader;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;

#[derive(Debug)]
struct IpcFile {
    path: PathBuf,
    schema: SchemaRef,
}

impl PartitionStream for IpcFile {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let path = self.path.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            let read = || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
                let reader =
                    FileReader::try_new(BufReader::with_capacity(1 << 20, File::open(&path)?), None)?;
                for batch in reader {
                    if tx.blocking_send(Ok(batch?)).is_err() {
                        break; // the scan was dropped (a LIMIT was reached)
                    }
                }
                Ok(())
            };
            if let Err(e) = read() {
                let _ = tx.blocking_send(Err(DataFusionError::External(e)));
            }
        });
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

/// A table over an IPC file written by the executor.
pub fn table(path: PathBuf, schema: SchemaRef) -> Result<StreamingTable, DataFusionError> {
    StreamingTable::try_new(schema.clone(), vec![Arc::new(IpcFile { path, schema })])
}
