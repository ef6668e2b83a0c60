//! Files: CSV, JSON (one object per line) and Parquet, read through DataFusion
//! and written with Arrow's writers to a temporary file that is renamed into
//! place, so a failed run never leaves a half-written file.

pub mod config;

use std::fs::File;
use std::path::Path;

use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::{CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionContext};
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::plan::schema::from_declared;
use crate::spec::sql::df_error;
use crate::spec::Spec;
use config::{FileFormat, FileSink, FileSource};

pub async fn open(ctx: &SessionContext, spec: &Spec, f: &FileSource) -> Result<SendableRecordBatchStream> {
    let path = spec.resolve(f.path.value());
    let pattern = path.to_string_lossy().to_string();
    let files: Vec<String> = glob::glob(&pattern)
        .map_err(|e| Error::Usage(format!("bad path '{}': {e}", f.path.value())))?
        .flatten()
        .map(|p| p.to_string_lossy().to_string())
        .collect();
    if files.is_empty() {
        return Err(Error::Usage(format!("no file matches '{}'", f.path.value())));
    }
    let schema = match &f.schema {
        Some(s) => Some(from_declared(s).map_err(|e| Error::Usage(e.join("; ")))?),
        None => None,
    };
    let what = format!("file {}", f.path.value());
    let df = match f.format {
        FileFormat::Csv => {
            let mut o = CsvReadOptions::new().has_header(true).file_extension("");
            if let Some(s) = &schema {
                o = o.schema(s);
            }
            ctx.read_csv(files, o).await
        }
        FileFormat::Json => {
            let mut o = JsonReadOptions::default().file_extension("");
            if let Some(s) = &schema {
                o = o.schema(s);
            }
            ctx.read_json(files, o).await
        }
        FileFormat::Parquet => {
            let mut o = ParquetReadOptions::default().file_extension("");
            if let Some(s) = &schema {
                o = o.schema(s);
            }
            ctx.read_parquet(files, o).await
        }
    }
    .map_err(|e| df_error(&what, e))?;
    df.execute_stream().await.map_err(|e| df_error(&what, e))
}

pub async fn write(spec: &Spec, f: &FileSink, mut input: SendableRecordBatchStream) -> Result<u64> {
    let path = spec.resolve(f.path.value());
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    let file = tmp.reopen().map_err(|e| Error::io(tmp.path(), e))?;
    let schema = input.schema();
    let what = format!("file {}", f.path.value());
    let mut writer = Writer::new(f.format, file, &schema).map_err(|e| df_error(&what, e))?;
    let mut rows = 0u64;
    while let Some(batch) = input.next().await {
        let batch = batch.map_err(|e| df_error(&what, e))?;
        rows += batch.num_rows() as u64;
        writer.write(&batch).map_err(|e| df_error(&what, e))?;
    }
    writer.finish().map_err(|e| df_error(&what, e))?;
    tmp.persist(&path).map_err(|e| Error::io(&path, e.error))?;
    Ok(rows)
}

enum Writer {
    Csv(datafusion::arrow::csv::Writer<File>),
    Json(datafusion::arrow::json::LineDelimitedWriter<File>),
    Parquet(datafusion::parquet::arrow::ArrowWriter<File>),
}

impl Writer {
    fn new(
        format: FileFormat,
        file: File,
        schema: &datafusion::arrow::datatypes::SchemaRef,
    ) -> Result<Self, String> {
        Ok(match format {
            FileFormat::Csv => {
                Writer::Csv(datafusion::arrow::csv::WriterBuilder::new().with_header(true).build(file))
            }
            FileFormat::Json => Writer::Json(datafusion::arrow::json::LineDelimitedWriter::new(file)),
            FileFormat::Parquet => Writer::Parquet(
                datafusion::parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None)
                    .map_err(|e| e.to_string())?,
            ),
        })
    }

    fn write(&mut self, batch: &datafusion::arrow::record_batch::RecordBatch) -> Result<(), String> {
        match self {
            Writer::Csv(w) => w.write(batch).map_err(|e| e.to_string()),
            Writer::Json(w) => w.write(batch).map_err(|e| e.to_string()),
            Writer::Parquet(w) => w.write(batch).map_err(|e| e.to_string()),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self {
            Writer::Csv(_) => Ok(()),
            Writer::Json(mut w) => w.finish().map_err(|e| e.to_string()),
            Writer::Parquet(w) => w.close().map(|_| ()).map_err(|e| e.to_string()),
        }
    }
}

// ------------------------------------------------------------------ runtime

#[async_trait::async_trait]
impl super::BatchSource for FileSource {
    async fn open(
        &self,
        node: super::Node<'_>,
        ctx: &SessionContext,
        _watermark: Option<&str>,
    ) -> Result<SendableRecordBatchStream> {
        open(ctx, node.spec, self).await
    }
}

#[async_trait::async_trait]
impl super::BatchSink for FileSink {
    async fn write(&self, node: super::Node<'_>, input: SendableRecordBatchStream) -> Result<u64> {
        write(node.spec, self, input).await
    }
}
