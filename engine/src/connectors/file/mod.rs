//! Files: CSV, JSON (one object per line) and Parquet, read through DataFusion
//! and written with Arrow's writers to a temporary file that is flushed,
//! synced to disk and renamed into place (the folder synced after), so a
//! failed or cut-off run never leaves a half-written file.

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
        .map(|p| p.map(|p| p.to_string_lossy().to_string()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| {
            let path = e.path().to_path_buf();
            Error::io(&path, e.into())
        })?;
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
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
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
    let file = writer.finish().map_err(|e| df_error(&what, e))?;
    file.sync_all().map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(&path).map_err(|e| Error::io(&path, e.error))?;
    // The rename itself is durable once the folder is synced.
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))?;
    Ok(rows)
}

/// Arrow's writers over any output; `finish` flushes and hands the output
/// back, so every write error reaches the caller.
enum Writer<W: std::io::Write + Send> {
    Csv(datafusion::arrow::csv::Writer<std::io::BufWriter<W>>),
    Json(datafusion::arrow::json::LineDelimitedWriter<std::io::BufWriter<W>>),
    Parquet(datafusion::parquet::arrow::ArrowWriter<std::io::BufWriter<W>>),
}

impl<W: std::io::Write + Send> Writer<W> {
    fn new(
        format: FileFormat,
        out: W,
        schema: &datafusion::arrow::datatypes::SchemaRef,
    ) -> Result<Self, String> {
        let out = std::io::BufWriter::with_capacity(1 << 20, out);
        Ok(match format {
            FileFormat::Csv => {
                Writer::Csv(datafusion::arrow::csv::WriterBuilder::new().with_header(true).build(out))
            }
            FileFormat::Json => Writer::Json(datafusion::arrow::json::LineDelimitedWriter::new(out)),
            FileFormat::Parquet => Writer::Parquet(
                datafusion::parquet::arrow::ArrowWriter::try_new(out, schema.clone(), None)
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

    fn finish(self) -> Result<W, String> {
        let buffered = match self {
            Writer::Csv(w) => w.into_inner(),
            Writer::Json(mut w) => {
                w.finish().map_err(|e| e.to_string())?;
                w.into_inner()
            }
            Writer::Parquet(w) => w.into_inner().map_err(|e| e.to_string())?,
        };
        buffered.into_inner().map_err(|e| format!("flushing the file: {}", e.error()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use std::sync::Arc;

    /// An output that takes `room` bytes, then fails as a full disk does.
    struct Full {
        room: usize,
    }

    impl std::io::Write for Full {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_error_at_the_last_flush_reaches_the_caller() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1, 2, 3]))])
            .expect("batch");
        for format in [FileFormat::Csv, FileFormat::Json, FileFormat::Parquet] {
            let mut w = Writer::new(format, Full { room: 4 }, &schema).expect("writer");
            // Small rows stay in the buffer: the failure comes at the end.
            let written = w.write(&batch).and_then(|_| w.finish().map(|_| ()));
            let e = written.expect_err("a full disk is an error");
            assert!(e.contains("no space left"), "{format:?}: {e}");
        }
    }
}
