//! Watermarks of incremental sources: read from the state table before a
//! source opens, taken as the maximum of the cursor column of what it read,
//! and written in the same transaction as the loads on the state's
//! connection, which commits after every other sink (see `sinks`). A
//! source some of whose sinks this run does not write (`--select`) keeps
//! its watermark.

use datafusion::arrow::record_batch::RecordBatch;

use super::Executor;
use crate::connectors::{self, postgres};
use crate::error::Result;
use crate::spec::model::Source;
use crate::spec::sql::ident;

impl Executor<'_> {
    /// Remembers the new watermark of an incremental source that read rows.
    pub(super) async fn note_watermark(&mut self, id: &str) -> Result<()> {
        let pipeline = &self.plan.spec.pipeline;
        let Some(inc) = pipeline.sources.get(id).and_then(|s| s.settings.incremental()) else {
            return Ok(());
        };
        let sql = format!("SELECT CAST(max({}) AS VARCHAR) FROM {}", ident(&inc.column), ident(id));
        if let Some(wm) = scalar_string(&self.query(&format!("source '{id}'"), &sql).await?) {
            self.watermarks.push((id.to_string(), wm));
        }
        Ok(())
    }

    /// The stored watermark of an incremental postgres source, unless `--full-refresh`.
    pub(super) async fn stored_watermark(&self, id: &str, src: &Source) -> Result<Option<String>> {
        if src.settings.incremental().is_none() {
            return Ok(None);
        }
        let Some((state, name, url)) = self.state_connection() else { return Ok(None) };
        if self.opts.full_refresh {
            return Ok(None);
        }
        let mut conn = postgres::connect(name, &url).await?;
        if !postgres::table_exists(&mut conn, &state.table)
            .await
            .map_err(|e| postgres::external(name, &url, e))?
        {
            // Not migrated yet (a dry run before the first run): no watermarks.
            return Ok(None);
        }
        let sql = format!(
            "SELECT watermark FROM {} WHERE pipeline = $1 AND node = $2",
            crate::spec::sql::qualified(&state.table)
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

    pub(super) fn watermark_rows(&self) -> Vec<connectors::Watermark> {
        let Some(state) = &self.plan.spec.pipeline.state else { return vec![] };
        self.watermarks
            .iter()
            .filter(|(node, _)| {
                let skipped = self.unwritten_sinks(node);
                if !skipped.is_empty() {
                    tracing::info!(
                        "source '{node}' keeps its watermark: this run does not write {}",
                        skipped.join(", ")
                    );
                }
                skipped.is_empty()
            })
            .map(|(node, value)| connectors::Watermark {
                table: state.table.clone(),
                pipeline: self.plan.spec.pipeline.name.clone(),
                node: node.clone(),
                value: value.clone(),
            })
            .collect()
    }

    /// The sinks downstream of `node` that this run does not write.
    fn unwritten_sinks(&self, node: &str) -> Vec<String> {
        let plan = self.plan;
        let Some(&start) = plan.nodes.get(node) else { return vec![] };
        let mut out = Vec::new();
        let mut dfs = petgraph::visit::Dfs::new(&plan.graph, start);
        while let Some(n) = dfs.next(&plan.graph) {
            let id = &plan.graph[n].id;
            if plan.spec.pipeline.sinks.contains_key(id) && !self.selected.contains(id) && !out.contains(id) {
                out.push(id.clone());
            }
        }
        out
    }
}

fn scalar_string(batches: &[RecordBatch]) -> Option<String> {
    use datafusion::arrow::array::{Array, StringArray};
    let b = batches.iter().find(|b| b.num_rows() > 0)?;
    let col =
        datafusion::arrow::compute::cast(b.column(0), &datafusion::arrow::datatypes::DataType::Utf8).ok()?;
    let a = col.as_any().downcast_ref::<StringArray>()?;
    (!a.is_null(0)).then(|| a.value(0).to_string())
}
