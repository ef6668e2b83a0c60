//! The postgres source: a table or query streamed through binary COPY and
//! decoded into Arrow batches as the bytes arrive.

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use sqlx::{PgConnection, Row};

use super::config::PostgresSource;
use super::decode::{Decoder, PgColumn};
use super::{connect, external};
use crate::error::{Error, Result};

const BATCH_ROWS: usize = 65_536;

/// The SELECT a source reads, before any incremental filter.
pub fn base_query(src: &PostgresSource) -> String {
    match (&src.table, &src.query) {
        (Some(t), _) => format!("SELECT * FROM {}", crate::spec::sql::qualified(t.value())),
        (None, Some(q)) => q.value().trim().trim_end_matches(';').to_string(),
        (None, None) => "SELECT 1 WHERE false".to_string(),
    }
}

/// The columns a query returns, with their exact types (numeric precision
/// included), found through a temporary view.
pub async fn describe(
    conn: &mut PgConnection,
    query: &str,
) -> std::result::Result<Vec<PgColumn>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE OR REPLACE TEMP VIEW engine_describe AS {query}")))
        .execute(&mut *conn)
        .await?;
    let rows = sqlx::query(
        "SELECT a.attname::text, a.atttypid::int8, a.atttypmod, format_type(a.atttypid, a.atttypmod) \
         FROM pg_attribute a WHERE a.attrelid = 'engine_describe'::regclass AND a.attnum > 0 \
         AND NOT a.attisdropped ORDER BY a.attnum",
    )
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query("DROP VIEW engine_describe").execute(&mut *conn).await?;
    Ok(rows
        .iter()
        .map(|r| PgColumn {
            name: r.get(0),
            oid: r.get::<i64, _>(1) as u32,
            typmod: r.get(2),
            type_name: r.get(3),
        })
        .collect())
}

/// Connects and describes what `src` reads: the table or query must exist
/// and have only column types the engine reads.
pub async fn describe_source(name: &str, url: &str, src: &PostgresSource) -> Result<Vec<PgColumn>> {
    let mut conn = connect(name, url).await?;
    let columns = describe(&mut conn, &base_query(src)).await.map_err(|e| external(name, url, e))?;
    super::decode::schema(&columns).map_err(Error::Usage)?;
    Ok(columns)
}

/// Streams the rows of `src` (above `watermark` when incremental) as batches.
pub async fn open(
    name: &str,
    url: &str,
    src: &PostgresSource,
    watermark: Option<&str>,
) -> Result<SendableRecordBatchStream> {
    let mut conn = connect(name, url).await?;
    let base = base_query(src);
    let columns = describe(&mut conn, &base).await.map_err(|e| external(name, url, e))?;
    let mut query = base;
    if let (Some(inc), Some(wm)) = (&src.incremental, watermark) {
        let col = columns.iter().find(|c| c.name == inc.column).ok_or_else(|| {
            Error::Usage(format!("incremental column '{}' is not in the source's columns", inc.column))
        })?;
        // Rows at the watermark, and within the lookback behind it on time
        // columns, are read again: a row committed late with an older cursor
        // value is not skipped, and upserts keep each row once.
        let wm = crate::spec::sql::literal(wm);
        let time = col.type_name.starts_with("timestamp") || col.type_name == "date";
        let secs = inc.lookback().as_secs();
        let bound = if time && secs > 0 {
            format!("CAST({wm} AS {}) - INTERVAL '{secs} seconds'", col.type_name)
        } else {
            format!("CAST({wm} AS {})", col.type_name)
        };
        query =
            format!("SELECT * FROM ({query}) AS s WHERE {} >= {bound}", crate::spec::sql::ident(&inc.column));
    }
    // A numeric column declared decimal(p,s) is read at that precision and
    // scale: an unconstrained numeric would be read at 10 places.
    let mut columns = columns;
    if let Some(d) = &src.schema {
        let declared = crate::plan::schema::from_declared(d).map_err(|e| Error::Usage(e.join("; ")))?;
        for c in columns.iter_mut().filter(|c| c.oid == super::decode::NUMERIC_OID) {
            if let Ok(f) = declared.field_with_name(&c.name) {
                if let datafusion::arrow::datatypes::DataType::Decimal128(p, s) = f.data_type() {
                    c.typmod = ((i32::from(*p) << 16) | i32::from((*s).max(0) as u8)) + 4;
                }
            }
        }
    }
    let mut decoder = Decoder::new(&columns, BATCH_ROWS).map_err(Error::Usage)?;
    let schema = decoder.schema();
    // With a declared schema: where each declared column is in what is read.
    let declared = match &src.schema {
        Some(d) => {
            let declared = crate::plan::schema::from_declared(d).map_err(|e| Error::Usage(e.join("; ")))?;
            let mut at = Vec::with_capacity(declared.fields().len());
            for f in declared.fields() {
                let Ok(i) = schema.index_of(f.name()) else {
                    let found: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
                    return Err(external(
                        name,
                        url,
                        format!(
                            "declared column '{}' is not in what the source reads ({})",
                            f.name(),
                            found.join(", ")
                        ),
                    ));
                };
                at.push(i);
            }
            Some((declared, at))
        }
        None => None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let (name, url) = (name.to_string(), url.to_string());
    let (name2, url2) = (name.clone(), url.clone());
    tokio::spawn(async move {
        let result: std::result::Result<(), String> = async {
            let copy = format!("COPY ({query}) TO STDOUT (FORMAT binary)");
            let mut stream = conn.copy_out_raw(&copy).await.map_err(|e| e.to_string())?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                for batch in decoder.push(&chunk)? {
                    if tx.send(Ok(batch)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            if let Some(batch) = decoder.finish()? {
                let _ = tx.send(Ok(batch)).await;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let e = external(&name, &url, e);
            let _ = tx.send(Err(DataFusionError::External(Box::new(e)))).await;
        }
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Ok(match declared {
        None => Box::pin(RecordBatchStreamAdapter::new(schema, stream)),
        Some((declared, at)) => {
            let out = declared.clone();
            let stream = stream.map(move |b| {
                conform(&b?, &declared, &at)
                    .map_err(|e| DataFusionError::External(Box::new(external(&name2, &url2, e))))
            });
            Box::pin(RecordBatchStreamAdapter::new(out, stream))
        }
    })
}

/// `batch` as the declared columns, the one at `at[k]` cast to the type of
/// declared column `k`; a value that does not fit, or a NULL in a required
/// column, is an error naming the column.
fn conform(
    batch: &RecordBatch,
    declared: &SchemaRef,
    at: &[usize],
) -> std::result::Result<RecordBatch, String> {
    use datafusion::arrow::compute::{cast_with_options, CastOptions};
    let options = CastOptions { safe: false, ..Default::default() };
    let mut columns = Vec::with_capacity(declared.fields().len());
    for (f, &i) in declared.fields().iter().zip(at) {
        let c = cast_with_options(batch.column(i), f.data_type(), &options)
            .map_err(|e| format!("column '{}' as {}: {e}", f.name(), f.data_type()))?;
        if !f.is_nullable() && c.null_count() > 0 {
            return Err(format!("column '{}' is declared required but holds NULL", f.name()));
        }
        columns.push(c);
    }
    RecordBatch::try_new(declared.clone(), columns).map_err(|e| e.to_string())
}
