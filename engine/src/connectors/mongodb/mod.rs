//! MongoDB: documents read with `find` (filter and batch cursor on the
//! server) and flattened by the declared `schema` with dotted paths, extracted
//! here on the client; documents written with `insert_many`.
//!
//! Projection happens client-side on purpose: it keeps the source working
//! against MongoDB-wire servers that lack server-side projection.

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
    let cursor = coll.find(filter).batch_size(BATCH_ROWS as u32).await.map_err(|e| external(name, url, e))?;
    let (name, url) = (name.to_string(), url.to_string());
    let out_schema = schema.clone();
    let stream = cursor.try_chunks(BATCH_ROWS).map(move |chunk| {
        let docs = chunk.map_err(|e| DataFusionError::External(Box::new(external(&name, &url, e.1))))?;
        to_batch(&docs, &out_schema, &paths).map_err(|e| {
            DataFusionError::External(Box::new(Error::External {
                system: format!("mongodb collection '{}'", name),
                message: e,
            }))
        })
    });
    Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
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
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(paths.len());
    for (field, (path, required)) in schema.fields().iter().zip(paths) {
        let values: Vec<Option<&Bson>> = docs.iter().map(|d| lookup(d, path)).collect();
        if *required {
            if let Some(i) = values.iter().position(Option::is_none) {
                let id = docs[i].get("_id").map(|v| v.to_string()).unwrap_or_default();
                return Err(format!(
                    "document {id} has no '{path}', which column '{}' requires",
                    field.name()
                ));
            }
        }
        let col = column(field.data_type(), &values)
            .map_err(|e| format!("column '{}' (path '{path}'): {e}", field.name()))?;
        arrays.push(col);
    }
    RecordBatch::try_new(schema.clone(), arrays).map_err(|e| e.to_string())
}

fn column(t: &DataType, values: &[Option<&Bson>]) -> std::result::Result<ArrayRef, String> {
    let bad = |v: &Bson| format!("cannot read {v} as {t}");
    Ok(match t {
        DataType::Utf8 => {
            let mut b = StringBuilder::with_capacity(values.len(), values.len() * 12);
            for v in values {
                match v {
                    None => b.append_null(),
                    Some(Bson::String(s)) => b.append_value(s),
                    Some(Bson::ObjectId(o)) => b.append_value(o.to_hex()),
                    Some(Bson::Document(_) | Bson::Array(_)) => b.append_value(
                        serde_json::to_string(&v.map(|x| x.clone().into_relaxed_extjson()))
                            .unwrap_or_default(),
                    ),
                    Some(other) => b.append_value(other.to_string().trim_matches('"')),
                }
            }
            Arc::new(b.finish())
        }
        DataType::Boolean => {
            let mut b = BooleanBuilder::with_capacity(values.len());
            for v in values {
                match v {
                    None => b.append_null(),
                    Some(Bson::Boolean(x)) => b.append_value(*x),
                    Some(o) => return Err(bad(o)),
                }
            }
            Arc::new(b.finish())
        }
        DataType::Int32 | DataType::Int64 => {
            let mut b = Int64Builder::with_capacity(values.len());
            for v in values {
                match v {
                    None => b.append_null(),
                    Some(Bson::Int32(x)) => b.append_value(*x as i64),
                    Some(Bson::Int64(x)) => b.append_value(*x),
                    Some(Bson::Double(x)) if x.fract() == 0.0 => b.append_value(*x as i64),
                    Some(o) => return Err(bad(o)),
                }
            }
            cast(&(Arc::new(b.finish()) as ArrayRef), t).map_err(|e| e.to_string())?
        }
        DataType::Float64 | DataType::Decimal128(..) => {
            let mut b = Float64Builder::with_capacity(values.len());
            for v in values {
                match v {
                    None => b.append_null(),
                    Some(Bson::Double(x)) => b.append_value(*x),
                    Some(Bson::Int32(x)) => b.append_value(*x as f64),
                    Some(Bson::Int64(x)) => b.append_value(*x as f64),
                    Some(Bson::Decimal128(d)) => {
                        b.append_value(d.to_string().parse().map_err(|_| bad(v.unwrap_or(&Bson::Null)))?)
                    }
                    Some(o) => return Err(bad(o)),
                }
            }
            cast(&(Arc::new(b.finish()) as ArrayRef), t).map_err(|e| e.to_string())?
        }
        DataType::Date32 | DataType::Timestamp(..) => {
            let mut b = TimestampMicrosecondBuilder::with_capacity(values.len()).with_timezone("UTC");
            for v in values {
                match v {
                    None => b.append_null(),
                    Some(Bson::DateTime(d)) => b.append_value(d.timestamp_millis() * 1000),
                    Some(Bson::String(s)) => {
                        let d = bson::DateTime::parse_rfc3339_str(s)
                            .map_err(|_| bad(v.unwrap_or(&Bson::Null)))?;
                        b.append_value(d.timestamp_millis() * 1000)
                    }
                    Some(o) => return Err(bad(o)),
                }
            }
            cast(&(Arc::new(b.finish()) as ArrayRef), t).map_err(|e| e.to_string())?
        }
        other => return Err(format!("type {other} is not read from documents")),
    })
}

/// Writes the input's rows as documents; NULL fields are left out, as
/// semi-structured documents do.
pub async fn write(
    name: &str,
    url: &str,
    database: &str,
    sink: &MongoSink,
    mut input: SendableRecordBatchStream,
) -> Result<u64> {
    let coll = collection(name, url, database, &sink.collection).await?;
    if sink.mode == WriteMode::Replace {
        coll.delete_many(Document::new()).await.map_err(|e| external(name, url, e))?;
    }
    let mut rows = 0u64;
    while let Some(batch) = input.next().await {
        let batch = batch.map_err(|e| external(name, url, e))?;
        let docs =
            documents(&batch).map_err(|e| Error::Usage(format!("sink into '{}': {e}", sink.collection)))?;
        rows += docs.len() as u64;
        if docs.is_empty() {
            continue;
        }
        match (sink.mode, &sink.key) {
            (WriteMode::Upsert, Some(key)) => {
                for d in docs {
                    let filter: Document =
                        key.iter().filter_map(|k| d.get(k).map(|v| (k.clone(), v.clone()))).collect();
                    coll.replace_one(filter, d).upsert(true).await.map_err(|e| external(name, url, e))?;
                }
            }
            _ => {
                coll.insert_many(docs).await.map_err(|e| external(name, url, e))?;
            }
        }
    }
    Ok(rows)
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
        DataType::Decimal128(_, s) => Bson::Double(get!(Decimal128Array) as f64 / 10f64.powi(*s as i32)),
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
        open(name, &c.url, &c.database, self).await
    }
}

#[async_trait::async_trait]
impl super::BatchSink for MongoSink {
    async fn write(&self, node: super::Node<'_>, input: SendableRecordBatchStream) -> Result<u64> {
        let (name, c) = node.connection::<MongoConnection>(&self.connection)?;
        write(name, &c.url, &c.database, self, input).await
    }
}

#[async_trait::async_trait]
impl super::Probe for MongoConnection {
    async fn probe(&self, node: super::Node<'_>, _input: Option<SchemaRef>) -> Result<()> {
        let coll = collection(node.id, &self.url, &self.database, "engine_connect_check").await?;
        let mut cursor =
            coll.find(Document::new()).limit(1).await.map_err(|e| external(node.id, &self.url, e))?;
        cursor.try_next().await.map_err(|e| external(node.id, &self.url, e))?;
        Ok(())
    }
}
