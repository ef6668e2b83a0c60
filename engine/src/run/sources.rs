//! The sources of a batch run: each opened through its connector (from its
//! stored watermark when incremental), or, in `engine test`, the test's rows.

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;

use super::Executor;
use crate::connectors::{registry, Node};
use crate::error::{Error, Result};
use crate::spec::model::Source;
use crate::spec::sql::df_error;

impl Executor<'_> {
    /// Opens a source through its connector, from its stored watermark.
    pub(super) async fn open_source(&self, id: &str, src: &Source) -> Result<SendableRecordBatchStream> {
        let watermark = self.stored_watermark(id, src).await?;
        let Some(reader) = registry::batch_source(src.kind, src.settings.as_ref()) else {
            return Err(Error::Usage(format!(
                "source '{id}': {} sources run with `engine stream`",
                src.kind
            )));
        };
        let node = Node { spec: &self.plan.spec, id };
        reader.open(node, &self.ctx, watermark.as_deref()).await
    }

    /// A test's rows for a source; no rows (with the source's schema, when
    /// it is known) for a source the test does not name.
    pub(super) async fn given_stream(
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
}
