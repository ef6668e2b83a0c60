//! Connectors: one folder or file per system, and the exhaustive match that
//! turns a source or sink of the spec into running code. Adding a system
//! means one module here, one variant in `spec::model`, and the match arms the
//! compiler then asks for.

pub mod file;
pub mod generate;
pub mod postgres;
pub mod stdout;

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
        Source::Mongodb(_) => Err(Error::Usage(format!(
            "source '{id}': batch reading from {} is not available in this version",
            source.kind().name()
        ))),
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
        Sink::Postgres(_) | Sink::Mongodb(_) | Sink::Redis(_) => Err(Error::Usage(format!(
            "sink '{id}': writing to {} is not available in this version",
            sink.kind().name()
        ))),
    }
}

/// A DataFusion error from reading or computing data.
pub fn df_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::External { system: what.to_string(), message: crate::transform::sql::short(e) }
}
