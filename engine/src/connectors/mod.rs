//! Connectors: one folder or file per system, and the exhaustive match that
//! turns a source or sink of the spec into running code. Adding a system
//! means one module here, one variant in `spec::model`, and the match arms the
//! compiler then asks for.

pub mod check;
pub mod file;
pub mod generate;
pub mod mongodb;
pub mod postgres;
pub mod redis;
pub mod stdout;

use datafusion::arrow::json::writer::{LineDelimited, WriterBuilder};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};
use crate::spec::model::{Sink, Source};
use crate::spec::Spec;

/// Opens a source of a batch run as a stream of record batches.
pub async fn open_source(
    ctx: &SessionContext,
    spec: &Spec,
    id: &str,
    source: &Source,
    watermark: Option<&str>,
) -> Result<SendableRecordBatchStream> {
    match source {
        Source::File(f) => file::open(ctx, spec, f).await,
        Source::Generate(g) => generate::open(ctx, g).await,
        Source::Postgres(p) => {
            let name = p.connection.value();
            let url = spec.pipeline.connections.get(name).map(|c| c.url().to_string()).unwrap_or_default();
            postgres::source::open(name, &url, p, watermark).await
        }
        Source::Mongodb(m) => {
            let (name, url, database) = mongo_connection(spec, m.connection.value())?;
            mongodb::open(name, url, database, m).await
        }
        Source::Redis(_) => {
            Err(Error::Usage(format!("source '{id}': redis sources run with `engine stream`")))
        }
    }
}

/// Writes a stream into a sink that needs no connection; returns the rows written.
pub async fn write_local(
    spec: &Spec,
    id: &str,
    sink: &Sink,
    input: SendableRecordBatchStream,
) -> Result<u64> {
    match sink {
        Sink::File(f) => file::write(spec, f, input).await,
        Sink::Stdout(s) => stdout::write(s, input).await,
        Sink::Postgres(_) => Err(Error::Internal(format!("sink '{id}': postgres sinks load per connection"))),
        Sink::Mongodb(m) => {
            let (name, url, database) = mongo_connection(spec, m.connection.value())?;
            mongodb::write(name, url, database, m, input).await
        }
        Sink::Redis(_) => Err(Error::Usage(format!(
            "sink '{id}': writing to {} is not available in this version",
            sink.kind().name()
        ))),
    }
}

/// The name, URL and database of a mongodb connection.
fn mongo_connection<'a>(spec: &'a Spec, name: &'a str) -> Result<(&'a str, &'a str, &'a str)> {
    match spec.pipeline.connections.get(name) {
        Some(crate::spec::model::Connection::Mongodb(c)) => Ok((name, &c.url, &c.database)),
        _ => Err(Error::Internal(format!("connection '{name}' is not a mongodb connection"))),
    }
}

/// An error of connection `name` to a `system` (postgres, mongodb, redis):
/// it names the connection and shows its URL and message without the password.
pub fn external(system: &str, name: &str, url: &str, e: impl std::fmt::Display) -> Error {
    let msg = e.to_string();
    let msg = match crate::spec::redact::url_password(url) {
        Some(p) => msg.replace(&p, "***"),
        None => msg,
    };
    let url = crate::spec::redact::redact_url(url);
    Error::External { system: format!("{system} connection '{name}' ({url})"), message: msg }
}

/// Rows as JSON objects, one per row; NULLs are written as `null`.
pub fn json_rows(batches: &[RecordBatch]) -> std::result::Result<Vec<Vec<u8>>, String> {
    let mut buf = Vec::new();
    let mut w = WriterBuilder::new().with_explicit_nulls(true).build::<_, LineDelimited>(&mut buf);
    for b in batches {
        w.write(b).map_err(|e| e.to_string())?;
    }
    w.finish().map_err(|e| e.to_string())?;
    drop(w);
    Ok(buf.split(|c| *c == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect())
}

/// Rows as one JSON array of objects.
pub fn json_array(batches: &[RecordBatch]) -> std::result::Result<String, String> {
    let rows = json_rows(batches)?;
    let mut out = Vec::with_capacity(rows.iter().map(|r| r.len() + 1).sum::<usize>() + 2);
    out.push(b'[');
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(r);
    }
    out.push(b']');
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// A DataFusion error from reading or computing data.
pub fn df_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::External { system: what.to_string(), message: crate::transform::sql::short(e) }
}
