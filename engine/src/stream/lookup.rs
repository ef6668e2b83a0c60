//! Lookup tables of a stream: the pipeline's sources other than its event
//! source, read whole through their batch connectors at start and again
//! every `refresh`. A refresh that fails keeps the last good table (and
//! shows on `/health` and in `engine_lookup_refresh_failures_total`); a new
//! table waits until the executor takes it, between two batches, so one
//! batch sees one version of every lookup.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use serde::Serialize;
use tokio::sync::watch;

use crate::connectors::{registry, Node};
use crate::error::{Error, Result};
use crate::spec::sql::df_error;
use crate::spec::Spec;
use crate::transform::lookup::{Lookup, Version};

/// What `/health` shows of a lookup table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LookupStatus {
    /// The newest version read (1 at start, one more per successful
    /// refresh); the next batch takes it into use.
    pub version: u64,
    pub rows: usize,
    /// Memory the table takes, in bytes.
    pub bytes: usize,
    /// When the newest version was read (RFC 3339).
    pub loaded_at: String,
    pub refreshes: u64,
    pub failures: u64,
    /// The last refresh's error, until a refresh succeeds.
    pub last_error: Option<String>,
}

/// A lookup table being kept fresh.
pub struct Kept {
    pub lookup: Arc<Lookup>,
    pub status: Arc<Mutex<LookupStatus>>,
}

/// Reads one lookup table whole: every batch of its source, as one.
async fn read(spec: &Spec, ctx: &SessionContext, id: &str) -> Result<RecordBatch> {
    let src = spec
        .pipeline
        .sources
        .get(id)
        .ok_or_else(|| Error::Internal(format!("lookup '{id}' is not a source")))?;
    let reader = registry::batch_source(src.kind, src.settings.as_ref()).ok_or_else(|| {
        Error::Internal(format!("source '{id}': {} sources are not read in batch", src.kind))
    })?;
    let stream = reader.open(Node { spec, id }, ctx, None).await?;
    let schema = stream.schema();
    let batches: Vec<RecordBatch> =
        stream.try_collect().await.map_err(|e| df_error(&format!("source '{id}'"), e))?;
    let all =
        concat_batches(&schema, &batches).map_err(|e| Error::Internal(format!("source '{id}': {e}")))?;
    compact(&all).map_err(|e| Error::Internal(format!("source '{id}': {e}")))
}

/// The rows in buffers of their own size: a reader's batches keep buffers
/// sized for many more rows, and a lookup is held for its whole version.
fn compact(batch: &RecordBatch) -> std::result::Result<RecordBatch, datafusion::arrow::error::ArrowError> {
    let all = datafusion::arrow::array::UInt32Array::from_iter_values(0..batch.num_rows() as u32);
    let columns = batch
        .columns()
        .iter()
        .map(|c| datafusion::arrow::compute::take(c.as_ref(), &all, None))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    RecordBatch::try_new(batch.schema(), columns)
}

fn now_text() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn record(id: &str, status: &mut LookupStatus, batch: &RecordBatch) {
    status.version += 1;
    status.rows = batch.num_rows();
    status.bytes = batch.get_array_memory_size();
    status.loaded_at = now_text();
    status.last_error = None;
    metrics::gauge!("engine_lookup_rows", "lookup" => id.to_string()).set(status.rows as f64);
    metrics::gauge!("engine_lookup_bytes", "lookup" => id.to_string()).set(status.bytes as f64);
}

/// Reads every lookup table of `plan` once; a table that cannot be read is
/// an error naming the source and where it is declared.
pub async fn load_all(spec: &Spec, ctx: &SessionContext, ids: &[String]) -> Result<Vec<(String, Kept)>> {
    let mut out = Vec::new();
    for id in ids {
        let batch = read(spec, ctx, id).await.map_err(|e| {
            let at =
                spec.id_pos.get(id).map(|p| format!(" ({}:{}:{})", spec.file.display(), p.line, p.column));
            Error::External {
                system: format!("lookup table '{id}'{}", at.unwrap_or_default()),
                message: format!("cannot be read at start: {}", spec.secrets.scrub(&e.to_string())),
            }
        })?;
        let mut status = LookupStatus::default();
        record(id, &mut status, &batch);
        metrics::counter!("engine_lookup_refreshes_total", "lookup" => id.clone()).increment(0);
        metrics::counter!("engine_lookup_refresh_failures_total", "lookup" => id.clone()).increment(0);
        tracing::info!(lookup = %id, rows = status.rows, bytes = status.bytes, "lookup table loaded");
        let lookup = Arc::new(Lookup::new(id, Version { number: 1, batch }));
        out.push((id.clone(), Kept { lookup, status: Arc::new(Mutex::new(status)) }));
    }
    Ok(out)
}

/// Reads lookup `id` again every `every` until `stop`, handing each new
/// table to the executor; a failed read keeps the table in use.
pub fn keep_fresh(
    spec: Arc<Spec>,
    id: String,
    kept: &Kept,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let (lookup, status) = (kept.lookup.clone(), kept.status.clone());
    tokio::spawn(async move {
        let ctx = crate::transform::sql::session(crate::transform::sql::Purpose::Batch);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            match read(&spec, &ctx, &id).await {
                Ok(batch) if batch.schema() != lookup.schema() => fail(
                    &id,
                    &status,
                    format!(
                        "its columns changed (now {}); restart the stream to plan with them",
                        columns(&batch.schema())
                    ),
                ),
                Ok(batch) => {
                    let number = {
                        let mut st = status.lock().unwrap_or_else(|e| e.into_inner());
                        record(&id, &mut st, &batch);
                        st.refreshes += 1;
                        st.version
                    };
                    metrics::counter!("engine_lookup_refreshes_total", "lookup" => id.clone()).increment(1);
                    tracing::debug!(lookup = %id, version = number, rows = batch.num_rows(), "lookup table refreshed");
                    lookup.offer(Version { number, batch });
                }
                Err(e) => fail(&id, &status, spec.secrets.scrub(&e.to_string())),
            }
        }
    })
}

fn fail(id: &str, status: &Mutex<LookupStatus>, error: String) {
    tracing::warn!(lookup = %id, "refresh failed, the last good table stays in use: {error}");
    metrics::counter!("engine_lookup_refresh_failures_total", "lookup" => id.to_string()).increment(1);
    let mut st = status.lock().unwrap_or_else(|e| e.into_inner());
    st.failures += 1;
    st.last_error = Some(error);
}

fn columns(schema: &SchemaRef) -> String {
    schema.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", ")
}
