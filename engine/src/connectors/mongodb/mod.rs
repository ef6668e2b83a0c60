//! MongoDB: documents read with `find` (filter and batch cursor on the
//! server) and flattened by the declared `schema` with dotted paths, extracted
//! here on the client; documents written with `insert_many`.
//!
//! Projection happens client-side on purpose: it keeps the source working
//! against MongoDB-wire servers that lack server-side projection.
//!
//! Nothing is read as something else: a collection that does not exist is
//! an error (the server answers it with no documents), decimals are read
//! exactly, and a value that does not fit its column is an error naming the
//! document and the field. `replace` writes the new documents into a staging
//! collection and renames it over the target; an upsert refuses a NULL key.

pub mod config;

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, Date32Array, Decimal128Array, Float32Array, Float64Array,
    Float64Builder, Int16Array, Int32Array, Int64Array, Int64Builder, StringArray, StringBuilder,
    StructArray, TimestampMicrosecondArray, TimestampMicrosecondBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{self, Bson, Document};

use crate::error::{Error, Result};
use crate::plan::schema::from_declared;
use crate::spec::model::WriteMode;
use config::{MongoConnection, MongoSink, MongoSource};

const BATCH_ROWS: usize = 8192;

fn external(name: &str, url: &str, e: impl std::fmt::Display) -> Error {
    super::external("mongodb", name, url, e)
}

async fn collection(
    name: &str,
    url: &str,
    database: &str,
    coll: &str,
) -> Result<mongodb::Collection<Document>> {
    let client = mongodb::Client::with_uri_str(url).await.map_err(|e| external(name, url, e))?;
    Ok(client.database(database).collection::<Document>(coll))
}

/// Streams the matching documents as batches of the declared columns.
pub async fn open(
    id: &str,
    name: &str,
    url: &str,
    database: &str,
    src: &MongoSource,
) -> Result<SendableRecordBatchStream> {
    let schema = from_declared(&src.schema).map_err(|e| Error::Usage(e.join("; ")))?;
    let paths: Vec<(String, bool)> =
        src.schema.iter().map(|(col, spec)| (spec.path(col).to_string(), spec.required())).collect();
    let filter = match &src.filter {
        Some(f) => bson::to_document(&f.0).map_err(|e| Error::Usage(format!("filter: {e}")))?,
        None => Document::new(),
    };
    let coll = collection(name, url, database, &src.collection).await?;
    // The server answers a missing collection with no documents, which
    // would load as an empty source.
    if !exists(&coll, database).await.map_err(|e| external(name, url, e))? {
        return Err(Error::External {
            system: format!("source '{id}'"),
            message: format!("collection '{}' does not exist in database '{database}'", src.collection),
        });
    }
    let cursor = coll.find(filter).batch_size(BATCH_ROWS as u32).await.map_err(|e| external(name, url, e))?;
    let (name, url, id) = (name.to_string(), url.to_string(), id.to_string());
    let out_schema = schema.clone();
    let stream = cursor.try_chunks(BATCH_ROWS).map(move |chunk| {
        let docs = chunk.map_err(|e| DataFusionError::External(Box::new(external(&name, &url, e.1))))?;
        to_batch(&docs, &out_schema, &paths).map_err(|e| {
            DataFusionError::External(Box::new(Error::External {
                system: format!("source '{id}'"),
                message: e,
            }))
        })
    });
    Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
}

/// Whether the collection exists. A server without `listCollections`
/// (PoloDB) cannot tell a missing collection from an empty one; there a
/// collection without documents counts as missing.
async fn exists(coll: &mongodb::Collection<Document>, database: &str) -> mongodb::error::Result<bool> {
    match coll.client().database(database).list_collection_names().await {
        Ok(names) => Ok(names.iter().any(|n| n == coll.name())),
        Err(e) => {
            tracing::debug!("listCollections is not available ({e}); looking for a document");
            Ok(coll.find_one(Document::new()).await?.is_some())
        }
    }
}

/// Empties a collection: `drop`, or where the server lacks it (PoloDB),
/// deleting every document.
async fn clear(coll: &mongodb::Collection<Document>) -> mongodb::error::Result<()> {
    if coll.drop().await.is_err() {
        coll.delete_many(Document::new()).await?;
    }
    Ok(())
}

/// The value at a dotted path; `None` when any step is missing.
fn lookup<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut at = doc.get(parts.next()?)?;
    for p in parts {
        at = match at {
            Bson::Document(d) => d.get(p)?,
            Bson::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    (!matches!(at, Bson::Null | Bson::Undefined)).then_some(at)
}

fn to_batch(
    docs: &[Document],
    schema: &SchemaRef,
    paths: &[(String, bool)],
) -> std::result::Result<RecordBatch, String> {
    let doc_id = |i: usize| docs[i].get("_id").map(|v| v.to_string()).unwrap_or_else(|| format!("#{i}"));
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(paths.len());
    for (field, (path, required)) in schema.fields().iter().zip(paths) {
        let values: Vec<Option<&Bson>> = docs.iter().map(|d| lookup(d, path)).collect();
        if *required {
            if let Some(i) = values.iter().position(Option::is_none) {
                return Err(format!(
                    "document {} has no '{path}', which column '{}' requires",
                    doc_id(i),
                    field.name()
                ));
            }
        }
        let col = column(field.data_type(), &values).map_err(|(i, e)| {
            format!("document {} field '{path}' (column '{}'): {e}", doc_id(i), field.name())
        })?;
        arrays.push(col);
    }
    RecordBatch::try_new(schema.clone(), arrays).map_err(|e| e.to_string())
}

/// The values as a column of type `t`; a value that does not fit is an
/// error with its index.
fn column(t: &DataType, values: &[Option<&Bson>]) -> std::result::Result<ArrayRef, (usize, String)> {
    let bad = |i: usize, v: &Bson| (i, format!("cannot read {v} as {t}"));
    Ok(match t {
        DataType::Utf8 => {
            let mut b = StringBuilder::with_capacity(values.len(), values.len() * 12);
            for (i, v) in values.iter().enumerate() {
                match v {
                    None => b.append_null(),
                    Some(Bson::String(s)) => b.append_value(s),
                    Some(Bson::ObjectId(o)) => b.append_value(o.to_hex()),
                    Some(x @ (Bson::Document(_) | Bson::Array(_))) => {
                        let json = serde_json::to_string(&(*x).clone().into_relaxed_extjson())
                            .map_err(|e| (i, format!("cannot write {x} as JSON text: {e}")))?;
                        b.append_value(json)
                    }
                    Some(other) => b.append_value(other.to_string().trim_matches('"')),
                }
            }
            Arc::new(b.finish())
        }
        DataType::Boolean => {
            let mut b = BooleanBuilder::with_capacity(values.len());
            for (i, v) in values.iter().enumerate() {
                match v {
                    None => b.append_null(),
                    Some(Bson::Boolean(x)) => b.append_value(*x),
                    Some(o) => return Err(bad(i, o)),
                }
            }
            Arc::new(b.finish())
        }
        DataType::Int32 | DataType::Int64 => {
            let (lo, hi) =
                if *t == DataType::Int32 { (i32::MIN as i64, i32::MAX as i64) } else { (i64::MIN, i64::MAX) };
            let mut b = Int64Builder::with_capacity(values.len());
            for (i, v) in values.iter().enumerate() {
                let n = match v {
                    None => {
                        b.append_null();
                        continue;
                    }
                    Some(Bson::Int32(x)) => *x as i64,
                    Some(Bson::Int64(x)) => *x,
                    // 2^63 as f64 is the first value past i64.
                    Some(Bson::Double(x)) if x.fract() == 0.0 && x.abs() < 9.223_372_036_854_776e18 => {
                        *x as i64
                    }
                    Some(o) => return Err(bad(i, o)),
                };
                if n < lo || n > hi {
                    return Err((i, format!("{n} does not fit {t}")));
                }
                b.append_value(n);
            }
            cast(&(Arc::new(b.finish()) as ArrayRef), t).map_err(|e| (0, e.to_string()))?
        }
        DataType::Decimal128(p, s) => {
            use datafusion::arrow::array::Decimal128Builder;
            use datafusion::arrow::compute::kernels::cast_utils::parse_decimal;
            use datafusion::arrow::datatypes::Decimal128Type;
            let mut b = Decimal128Builder::with_capacity(values.len())
                .with_precision_and_scale(*p, *s)
                .map_err(|e| (0, e.to_string()))?;
            for (i, v) in values.iter().enumerate() {
                // Each value through its exact decimal text: a double as the
                // shortest text that reads back as it (0.1, not 0.1000000000000000055).
                let text = match v {
                    None => {
                        b.append_null();
                        continue;
                    }
                    Some(Bson::Decimal128(d)) => d.to_string(),
                    Some(Bson::Int32(x)) => x.to_string(),
                    Some(Bson::Int64(x)) => x.to_string(),
                    Some(Bson::Double(x)) if x.is_finite() => x.to_string(),
                    Some(o) => return Err(bad(i, o)),
                };
                let n = parse_decimal::<Decimal128Type>(&text, *p, *s)
                    .map_err(|e| (i, format!("{text} does not fit {t}: {e}")))?;
                let rounded =
                    text.split_once('.').is_some_and(|(_, f)| f.trim_end_matches('0').len() > *s as usize);
                if rounded {
                    return Err((i, format!("{text} has more than {s} decimal places")));
                }
                b.append_value(n);
            }
            Arc::new(b.finish())
        }
        DataType::Float64 => {
            let mut b = Float64Builder::with_capacity(values.len());
            for (i, v) in values.iter().enumerate() {
                match v {
                    None => b.append_null(),
                    Some(Bson::Double(x)) => b.append_value(*x),
                    Some(Bson::Int32(x)) => b.append_value(*x as f64),
                    Some(Bson::Int64(x)) => b.append_value(*x as f64),
                    Some(x @ Bson::Decimal128(d)) => {
                        b.append_value(d.to_string().parse().map_err(|_| bad(i, x))?)
                    }
                    Some(o) => return Err(bad(i, o)),
                }
            }
            Arc::new(b.finish())
        }
        DataType::Date32 | DataType::Timestamp(..) => {
            let mut b = TimestampMicrosecondBuilder::with_capacity(values.len()).with_timezone("UTC");
            for (i, v) in values.iter().enumerate() {
                match v {
                    None => b.append_null(),
                    Some(Bson::DateTime(d)) => b.append_value(d.timestamp_millis() * 1000),
                    Some(x @ Bson::String(s)) => {
                        let d = bson::DateTime::parse_rfc3339_str(s).map_err(|_| bad(i, x))?;
                        b.append_value(d.timestamp_millis() * 1000)
                    }
                    Some(o) => return Err(bad(i, o)),
                }
            }
            cast(&(Arc::new(b.finish()) as ArrayRef), t).map_err(|e| (0, e.to_string()))?
        }
        other => return Err((0, format!("type {other} is not read from documents"))),
    })
}

/// Writes the input's rows as documents; NULL fields are left out, as
/// semi-structured documents do.
pub async fn write(
    id: &str,
    name: &str,
    url: &str,
    database: &str,
    sink: &MongoSink,
    mut input: SendableRecordBatchStream,
) -> Result<u64> {
    let what = format!("sink '{id}'");
    let refuse = |e: String| Error::External { system: what.clone(), message: e };
    let target = collection(name, url, database, &sink.collection).await?;
    // A replace fills a staging collection first: a failure on the way
    // leaves the target as it was.
    let staging = format!("{}__engine_staging", sink.collection);
    let coll = if sink.mode == WriteMode::Replace {
        let c = collection(name, url, database, &staging).await?;
        clear(&c).await.map_err(|e| external(name, url, e))?;
        c
    } else {
        target.clone()
    };
    let mut rows = 0u64;
    while let Some(batch) = input.next().await {
        let batch = batch.map_err(|e| external(name, url, e))?;
        let docs = documents(&batch).map_err(|e| refuse(format!("collection '{}': {e}", sink.collection)))?;
        let first = rows + 1;
        rows += docs.len() as u64;
        if docs.is_empty() {
            continue;
        }
        match (sink.mode, &sink.key) {
            (WriteMode::Upsert, Some(key)) => {
                for (n, d) in docs.into_iter().enumerate() {
                    let mut filter = Document::new();
                    for k in key {
                        match d.get(k) {
                            Some(v) => filter.insert(k.clone(), v.clone()),
                            None => {
                                return Err(refuse(format!(
                                    "row {}: key field '{k}' is NULL; an upsert needs the whole key to find its document",
                                    first + n as u64
                                )))
                            }
                        };
                    }
                    coll.replace_one(filter, d).upsert(true).await.map_err(|e| external(name, url, e))?;
                }
            }
            _ => {
                coll.insert_many(docs).await.map_err(|e| external(name, url, e))?;
            }
        }
    }
    if sink.mode == WriteMode::Replace {
        swap(name, url, database, &staging, &target).await?;
    }
    Ok(rows)
}

/// Puts the staging collection in the target's place: one `renameCollection`
/// with `dropTarget` (atomic on MongoDB). A server without that command gets
/// the documented fallback: the target emptied, then filled from staging,
/// which a crash in between can leave partly filled.
async fn swap(
    name: &str,
    url: &str,
    database: &str,
    staging: &str,
    target: &mongodb::Collection<Document>,
) -> Result<()> {
    let client = target.client();
    let rename = bson::doc! {
        "renameCollection": format!("{database}.{staging}"),
        "to": format!("{database}.{}", target.name()),
        "dropTarget": true,
    };
    let renamed = client.database("admin").run_command(rename).await;
    if renamed.is_ok() {
        return Ok(());
    }
    tracing::debug!("renameCollection not available ({renamed:?}); replacing in place");
    let staged = client.database(database).collection::<Document>(staging);
    target.delete_many(Document::new()).await.map_err(|e| external(name, url, e))?;
    let mut cursor = staged
        .find(Document::new())
        .batch_size(BATCH_ROWS as u32)
        .await
        .map_err(|e| external(name, url, e))?;
    let mut chunk = Vec::with_capacity(BATCH_ROWS);
    while let Some(mut doc) = cursor.try_next().await.map_err(|e| external(name, url, e))? {
        doc.remove("_id");
        chunk.push(doc);
        if chunk.len() == BATCH_ROWS {
            target.insert_many(std::mem::take(&mut chunk)).await.map_err(|e| external(name, url, e))?;
        }
    }
    if !chunk.is_empty() {
        target.insert_many(chunk).await.map_err(|e| external(name, url, e))?;
    }
    clear(&staged).await.map_err(|e| external(name, url, e))
}

fn documents(batch: &RecordBatch) -> std::result::Result<Vec<Document>, String> {
    let mut docs = vec![Document::new(); batch.num_rows()];
    for (field, col) in batch.schema().fields().iter().zip(batch.columns()) {
        for (row, doc) in docs.iter_mut().enumerate() {
            if let Some(v) = value(col, row)? {
                doc.insert(field.name().clone(), v);
            }
        }
    }
    Ok(docs)
}

/// One cell as BSON; `None` for NULL.
fn value(col: &ArrayRef, row: usize) -> std::result::Result<Option<Bson>, String> {
    if col.is_null(row) {
        return Ok(None);
    }
    macro_rules! get {
        ($t:ty) => {
            col.as_any().downcast_ref::<$t>().ok_or("unexpected array type")?.value(row)
        };
    }
    Ok(Some(match col.data_type() {
        DataType::Utf8 => Bson::String(get!(StringArray).to_string()),
        DataType::Boolean => Bson::Boolean(get!(BooleanArray)),
        DataType::Int16 => Bson::Int32(get!(Int16Array) as i32),
        DataType::Int32 => Bson::Int32(get!(Int32Array)),
        DataType::Int64 => Bson::Int64(get!(Int64Array)),
        DataType::Float32 => Bson::Double(get!(Float32Array) as f64),
        DataType::Float64 => Bson::Double(get!(Float64Array)),
        DataType::Decimal128(..) => {
            // Exact: through the decimal's text, never a double.
            let text = col
                .as_any()
                .downcast_ref::<Decimal128Array>()
                .ok_or("unexpected array type")?
                .value_as_string(row);
            Bson::Decimal128(text.parse().map_err(|e| format!("decimal {text}: {e}"))?)
        }
        DataType::Date32 => {
            Bson::DateTime(bson::DateTime::from_millis(get!(Date32Array) as i64 * 86_400_000))
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            Bson::DateTime(bson::DateTime::from_millis(get!(TimestampMicrosecondArray) / 1000))
        }
        DataType::Timestamp(..) => {
            let micros =
                cast(col, &DataType::Timestamp(TimeUnit::Microsecond, None)).map_err(|e| e.to_string())?;
            return value(&micros, row);
        }
        DataType::Struct(_) => {
            let s = col.as_any().downcast_ref::<StructArray>().ok_or("unexpected array type")?;
            let mut d = Document::new();
            for (f, c) in s.fields().iter().zip(s.columns()) {
                if let Some(v) = value(c, row)? {
                    d.insert(f.name().clone(), v);
                }
            }
            Bson::Document(d)
        }
        DataType::Utf8View | DataType::LargeUtf8 => {
            let s = cast(col, &DataType::Utf8).map_err(|e| e.to_string())?;
            return value(&s, row);
        }
        other => return Err(format!("type {other} cannot be written as a document field")),
    }))
}

// ------------------------------------------------------------------ runtime

#[async_trait::async_trait]
impl super::BatchSource for MongoSource {
    async fn open(
        &self,
        node: super::Node<'_>,
        _ctx: &datafusion::prelude::SessionContext,
        _watermark: Option<&str>,
    ) -> Result<SendableRecordBatchStream> {
        let (name, c) = node.connection::<MongoConnection>(&self.connection)?;
        open(node.id, name, &c.url, &c.database, self).await
    }
}

#[async_trait::async_trait]
impl super::BatchSink for MongoSink {
    async fn write(&self, node: super::Node<'_>, input: SendableRecordBatchStream) -> Result<u64> {
        let (name, c) = node.connection::<MongoConnection>(&self.connection)?;
        write(node.id, name, &c.url, &c.database, self, input).await
    }
}

#[async_trait::async_trait]
impl super::Probe for MongoConnection {
    /// Tells whether the connection uses TLS (`tls=true`, or a
    /// `mongodb+srv://` URL, where TLS is the default).
    async fn probe(&self, node: super::Node<'_>, _input: Option<SchemaRef>) -> Result<Option<String>> {
        let coll = collection(node.id, &self.url, &self.database, "engine_connect_check").await?;
        let mut cursor =
            coll.find(Document::new()).limit(1).await.map_err(|e| external(node.id, &self.url, e))?;
        cursor.try_next().await.map_err(|e| external(node.id, &self.url, e))?;
        let options = mongodb::options::ClientOptions::parse(&self.url)
            .await
            .map_err(|e| external(node.id, &self.url, e))?;
        Ok(Some(match options.tls {
            Some(mongodb::options::Tls::Enabled(o)) if o.ca_file_path.is_some() => {
                "TLS (tlsCAFile)".to_string()
            }
            Some(mongodb::options::Tls::Enabled(_)) => "TLS".to_string(),
            _ => "no TLS".to_string(),
        }))
    }
}
