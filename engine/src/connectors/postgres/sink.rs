//! The postgres sink: Arrow batches bulk-loaded with binary COPY (encoded by
//! `pgpq`). All sinks of one connection load in one transaction, together
//! with the run's watermarks on that connection, so a failed or killed run
//! leaves the tables as they were.
//!
//! - `append`: COPY into the table.
//! - `replace`: TRUNCATE (all replace tables of the connection at once, so
//!   foreign keys between them are no obstacle), then COPY.
//! - `upsert`: into an empty table, COPY; otherwise COPY into a temporary
//!   staging table, then INSERT .. ON CONFLICT (key) DO UPDATE, touching only
//!   rows whose values changed, so a rerun rewrites nothing.

use std::sync::Arc;

use bytes::BytesMut;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;
use sqlx::{Acquire, PgConnection, Row};

use super::config::PostgresSink;
use super::decode::{arrow_type, PgColumn};
use super::{connect, external};
use crate::connectors::Ledger;
use crate::error::{Error, Result};
use crate::spec::model::WriteMode;
use crate::spec::sql::ident;
use crate::spec::sql::qualified;

/// One sink's work in a connection's transaction.
pub struct Load<'a> {
    pub id: String,
    pub sink: &'a PostgresSink,
    pub input: SendableRecordBatchStream,
}

/// Loads every sink of one connection, and writes what the run records on
/// it (`ledger`), in one transaction.
pub async fn load_all(name: &str, url: &str, loads: Vec<Load<'_>>, ledger: &Ledger) -> Result<Vec<u64>> {
    let mut conn = connect(name, url).await?;
    let conn = &mut conn;
    let ext = |e: sqlx::Error| external(name, url, e);
    let mut tx = conn.begin().await.map_err(ext)?;
    let replace: Vec<String> = loads
        .iter()
        .filter(|l| l.sink.mode == WriteMode::Replace)
        .map(|l| qualified(&l.sink.table))
        .collect();
    let mut done = Vec::new();
    let mut prepared = Vec::new();
    for load in loads {
        let target = prepare(&mut tx, &load.id, load.sink, &load.input.schema()).await?;
        prepared.push((load, target));
    }
    if !replace.is_empty() {
        let sql = format!("TRUNCATE {}", replace.join(", "));
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.map_err(ext)?;
    }
    for (load, target) in prepared {
        let rows = write(&mut tx, load, &target).await.map_err(|e| match e {
            Error::External { message, .. } => external(name, url, message),
            other => other,
        })?;
        done.push(rows);
    }
    for r in &ledger.rejects {
        super::write_rejects(&mut tx, r)
            .await
            .map_err(|e| external(name, url, format!("quarantine table '{}': {e}", r.table)))?;
    }
    for w in &ledger.watermarks {
        let sql = format!(
            "INSERT INTO {} (pipeline, node, watermark, updated_at) VALUES ($1, $2, $3, now()) \
             ON CONFLICT (pipeline, node) DO UPDATE SET watermark = EXCLUDED.watermark, updated_at = now()",
            qualified(&w.table)
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&w.pipeline)
            .bind(&w.node)
            .bind(&w.value)
            .execute(&mut *tx)
            .await
            .map_err(ext)?;
    }
    if let Some(run) = &ledger.run {
        super::runs::finish(&mut tx, run).await.map_err(|e| external(name, url, e))?;
    }
    tx.commit().await.map_err(ext)?;
    Ok(done)
}

/// Checks, in a transaction that is rolled back, that the sink's table exists
/// (or would be created) and can take `input` when its schema is known.
pub async fn check_table(
    name: &str,
    url: &str,
    id: &str,
    sink: &PostgresSink,
    input: Option<SchemaRef>,
) -> Result<()> {
    let mut conn = connect(name, url).await?;
    let mut tx = conn.begin().await.map_err(|e| external(name, url, e))?;
    match input {
        Some(schema) => prepare(&mut tx, id, sink, &schema).await.map(|_| ()),
        None => {
            let cols = columns(&mut tx, &sink.table).await.map_err(|e| external(name, url, e))?;
            if cols.is_empty() && !sink.create {
                return Err(Error::Usage(format!(
                    "sink '{id}': table '{}' does not exist; create it in a migration or set 'create: true'",
                    sink.table
                )));
            }
            Ok(())
        }
    }
}

/// The target's columns in input order, as Arrow types the encoder writes.
struct Target {
    columns: Vec<String>,
    schema: SchemaRef,
}

/// Creates the table if asked, and checks the input against it before any row moves.
async fn prepare(
    conn: &mut PgConnection,
    id: &str,
    sink: &PostgresSink,
    input: &SchemaRef,
) -> Result<Target> {
    let what = format!("sink '{id}'");
    let sqlerr = |e: sqlx::Error| Error::External { system: what.clone(), message: e.to_string() };
    let mut cols = columns(conn, &sink.table).await.map_err(sqlerr)?;
    if cols.is_empty() {
        if !sink.create {
            return Err(Error::Usage(format!(
                "{what}: table '{}' does not exist; create it in a migration or set 'create: true'",
                sink.table
            )));
        }
        sqlx::query(sqlx::AssertSqlSafe(
            create_sql(
                &sink.table,
                input,
                (sink.mode == WriteMode::Upsert).then_some(sink.key.as_deref()).flatten(),
            )
            .map_err(|e| Error::Usage(format!("{what}: {e}")))?,
        ))
        .execute(&mut *conn)
        .await
        .map_err(sqlerr)?;
        cols = columns(conn, &sink.table).await.map_err(sqlerr)?;
    }
    let mut fields = Vec::new();
    let mut names = Vec::new();
    let mut problems = Vec::new();
    for f in input.fields() {
        let Some((col, _)) = cols.iter().find(|(c, _)| c.name == *f.name()) else {
            problems.push(format!("input column '{}' is not in table '{}'", f.name(), sink.table));
            continue;
        };
        match target_type(col) {
            Ok(t) if datafusion::arrow::compute::can_cast_types(f.data_type(), &t) => {
                fields.push(Field::new(f.name(), t, true));
                names.push(f.name().clone());
            }
            Ok(_) => problems.push(format!(
                "column '{}' is {} in the input but {} in the table",
                f.name(),
                f.data_type(),
                col.type_name
            )),
            Err(e) => problems.push(e),
        }
    }
    for (c, not_null_no_default) in &cols {
        if *not_null_no_default && !input.fields().iter().any(|f| f.name() == &c.name) {
            problems.push(format!(
                "table column '{}' is NOT NULL without a default, and the input lacks it",
                c.name
            ));
        }
    }
    if let (WriteMode::Upsert, Some(key)) = (sink.mode, &sink.key) {
        for k in key {
            if !names.contains(k) {
                problems.push(format!("key column '{k}' is not in the input"));
            }
        }
    }
    if !problems.is_empty() {
        return Err(Error::Usage(format!(
            "{what}: the input does not fit table '{}': {}",
            sink.table,
            problems.join("; ")
        )));
    }
    Ok(Target { columns: names, schema: Arc::new(Schema::new(fields)) })
}

fn target_type(c: &PgColumn) -> Result<DataType, String> {
    if matches!(c.oid, 114 | 3802) {
        return Err(format!(
            "column '{}' is {}, which the postgres sink does not load yet",
            c.name, c.type_name
        ));
    }
    arrow_type(c)
}

/// The table's columns, each with whether it is NOT NULL without a default.
async fn columns(
    conn: &mut PgConnection,
    table: &str,
) -> std::result::Result<Vec<(PgColumn, bool)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT a.attname::text, a.atttypid::int8, a.atttypmod, format_type(a.atttypid, a.atttypmod), \
                a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' \
         FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
    )
    .bind(qualified(table))
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let c = PgColumn {
                name: r.get(0),
                oid: r.get::<i64, _>(1) as u32,
                typmod: r.get(2),
                type_name: r.get(3),
            };
            (c, r.get::<bool, _>(4))
        })
        .collect())
}

/// CREATE TABLE for an Arrow schema (`create: true`); an upsert's key
/// columns are its primary key (ON CONFLICT needs one).
pub fn create_sql(
    table: &str,
    schema: &SchemaRef,
    key: Option<&[String]>,
) -> std::result::Result<String, String> {
    let cols: std::result::Result<Vec<String>, String> = schema
        .fields()
        .iter()
        .map(|f| {
            let t = match f.data_type() {
                DataType::Boolean => "boolean".to_string(),
                DataType::Int8 | DataType::Int16 | DataType::UInt8 => "smallint".into(),
                DataType::Int32 | DataType::UInt16 => "integer".into(),
                DataType::Int64 | DataType::UInt32 => "bigint".into(),
                DataType::Float32 => "real".into(),
                DataType::Float64 => "double precision".into(),
                DataType::Decimal128(p, s) => format!("numeric({p},{s})"),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
                DataType::Date32 => "date".into(),
                DataType::Timestamp(_, Some(_)) => "timestamptz".into(),
                DataType::Timestamp(_, None) => "timestamp".into(),
                other => return Err(format!("column '{}' of type {other} has no PostgreSQL type", f.name())),
            };
            Ok(format!("{} {t}", ident(f.name())))
        })
        .collect();
    let mut cols = cols?;
    if let Some(key) = key.filter(|k| !k.is_empty()) {
        cols.push(format!("PRIMARY KEY ({})", key.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ")));
    }
    Ok(format!("CREATE TABLE IF NOT EXISTS {} ({})", qualified(table), cols.join(", ")))
}

async fn write(conn: &mut PgConnection, mut load: Load<'_>, target: &Target) -> Result<u64> {
    let sink = load.sink;
    let table = qualified(&sink.table);
    let cols = target.columns.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
    let ext =
        |e: sqlx::Error| Error::External { system: format!("sink '{}'", load.id), message: e.to_string() };
    let direct = match sink.mode {
        WriteMode::Append | WriteMode::Replace => true,
        WriteMode::Upsert => {
            let sql = format!("SELECT NOT EXISTS (SELECT 1 FROM {table})");
            sqlx::query_scalar::<_, bool>(sqlx::AssertSqlSafe(sql))
                .fetch_one(&mut *conn)
                .await
                .map_err(ext)?
        }
    };
    // Loading an empty table: secondary indexes and foreign keys are dropped
    // and rebuilt after the COPY (in the same transaction), as pg_restore
    // does, which is much faster than maintaining them row by row.
    let rebuild = if direct && is_empty(conn, &table, sink.mode).await.map_err(ext)? {
        deferrable(conn, &sink.table).await.map_err(ext)?
    } else {
        Rebuild::default()
    };
    for drop in &rebuild.drops {
        sqlx::query(sqlx::AssertSqlSafe(drop.clone())).execute(&mut *conn).await.map_err(ext)?;
    }
    let into = if direct {
        table.clone()
    } else {
        let sql = format!("CREATE TEMP TABLE engine_stage (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DROP");
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await.map_err(ext)?;
        "engine_stage".to_string()
    };
    let rows = copy_in(conn, &into, &cols, &mut load.input, target, &load.id).await?;
    for create in &rebuild.creates {
        sqlx::query(sqlx::AssertSqlSafe(create.clone())).execute(&mut *conn).await.map_err(ext)?;
    }
    if !direct {
        let key = sink.key.clone().unwrap_or_default();
        let sql = format!(
            "INSERT INTO {table} ({cols}) SELECT {cols} FROM engine_stage {}",
            on_conflict(&table, &target.columns, &key)
        );
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await.map_err(ext)?;
        sqlx::query("DROP TABLE engine_stage").execute(&mut *conn).await.map_err(ext)?;
    }
    Ok(rows)
}

/// `ON CONFLICT (key) DO UPDATE` of the non-key columns, touching only rows
/// whose values changed (`DO NOTHING` when every column is a key).
fn on_conflict(table: &str, columns: &[String], key: &[String]) -> String {
    let keys = key.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
    let rest: Vec<&String> = columns.iter().filter(|c| !key.contains(c)).collect();
    if rest.is_empty() {
        return format!("ON CONFLICT ({keys}) DO NOTHING");
    }
    let set: Vec<String> = rest.iter().map(|c| format!("{} = EXCLUDED.{}", ident(c), ident(c))).collect();
    let old: Vec<String> = rest.iter().map(|c| format!("{table}.{}", ident(c))).collect();
    let new: Vec<String> = rest.iter().map(|c| format!("EXCLUDED.{}", ident(c))).collect();
    format!(
        "ON CONFLICT ({keys}) DO UPDATE SET {} WHERE ({}) IS DISTINCT FROM ({})",
        set.join(", "),
        old.join(", "),
        new.join(", ")
    )
}

/// A stream's postgres sink: the table checked (or created) once, then one
/// statement per micro-batch. The rows travel as one JSON parameter, so a
/// batch is a single round trip: COPY takes several small writes per batch,
/// which TCP's delayed acknowledgements turn into about 40 ms each.
pub struct StreamTarget {
    sql: String,
}

impl StreamTarget {
    /// Checks the table against `input` (creating it with `create: true`).
    pub async fn new(
        conn: &mut PgConnection,
        id: &str,
        sink: &PostgresSink,
        input: &SchemaRef,
    ) -> Result<Self> {
        let what = format!("sink '{id}'");
        let sqlerr = |e: sqlx::Error| Error::External { system: what.clone(), message: e.to_string() };
        let mut tx = conn.begin().await.map_err(sqlerr)?;
        let target = prepare(&mut tx, id, sink, input).await?;
        tx.commit().await.map_err(sqlerr)?;
        let table = qualified(&sink.table);
        let cols = target.columns.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
        let source = format!("json_populate_recordset(NULL::{table}, $1::json)");
        let sql = match (sink.mode, &sink.key) {
            (WriteMode::Upsert, Some(key)) => {
                // One row per key: a batch may carry an event twice, and
                // the last one wins, as it would over two batches.
                let keys = key.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
                format!(
                    "INSERT INTO {table} ({cols}) SELECT DISTINCT ON ({keys}) {cols} \
                     FROM {source} WITH ORDINALITY AS engine_rows ORDER BY {keys}, engine_rows.ordinality DESC {}",
                    on_conflict(&table, &target.columns, key)
                )
            }
            _ => format!("INSERT INTO {table} ({cols}) SELECT {cols} FROM {source}"),
        };
        Ok(Self { sql })
    }

    /// Writes `json`, an array of row objects, in one statement.
    pub async fn write(&self, conn: &mut PgConnection, json: &str) -> std::result::Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(self.sql.clone())).bind(json).execute(conn).await.map(|_| ())
    }
}

/// Whether PostgreSQL refused a statement for the data it carried
/// (SQLSTATE class 22, data exception: a value out of range, a bad cast;
/// class 23, integrity constraint violation: CHECK, NOT NULL, foreign key,
/// unique). Sending the same rows again cannot succeed.
pub fn refused_for_data(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
}

/// Whether the table is empty now (after a replace's TRUNCATE it is).
async fn is_empty(
    conn: &mut PgConnection,
    table: &str,
    mode: WriteMode,
) -> std::result::Result<bool, sqlx::Error> {
    if mode == WriteMode::Replace {
        return Ok(true);
    }
    let sql = format!("SELECT NOT EXISTS (SELECT 1 FROM {table})");
    sqlx::query_scalar::<_, bool>(sqlx::AssertSqlSafe(sql)).fetch_one(&mut *conn).await
}

/// What a bulk load into an empty table drops before and recreates after.
#[derive(Default)]
struct Rebuild {
    drops: Vec<String>,
    creates: Vec<String>,
}

/// The table's foreign keys and its indexes that back no constraint.
async fn deferrable(conn: &mut PgConnection, table: &str) -> std::result::Result<Rebuild, sqlx::Error> {
    let quoted = qualified(table);
    let fks = sqlx::query(
        "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
         WHERE conrelid = to_regclass($1) AND contype = 'f' ORDER BY conname",
    )
    .bind(&quoted)
    .fetch_all(&mut *conn)
    .await?;
    let indexes = sqlx::query(
        "SELECT n.nspname::text, i.relname::text, pg_get_indexdef(i.oid) FROM pg_index x \
         JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_namespace n ON n.oid = i.relnamespace \
         WHERE x.indrelid = to_regclass($1) AND NOT x.indisprimary AND NOT x.indisunique \
         AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid) ORDER BY i.relname",
    )
    .bind(&quoted)
    .fetch_all(&mut *conn)
    .await?;
    let mut drops = Vec::new();
    let mut creates = Vec::new();
    for r in &fks {
        let name: String = r.get(0);
        drops.push(format!("ALTER TABLE {quoted} DROP CONSTRAINT {}", ident(&name)));
    }
    for r in &indexes {
        let (schema, name, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        drops.push(format!("DROP INDEX {}.{}", ident(&schema), ident(&name)));
        creates.push(def);
    }
    // Indexes first, so the foreign keys are checked with them in place.
    for r in &fks {
        let (name, def): (String, String) = (r.get(0), r.get(1));
        creates.push(format!("ALTER TABLE {quoted} ADD CONSTRAINT {} {def}", ident(&name)));
    }
    Ok(Rebuild { drops, creates })
}

/// Streams the input through binary COPY; returns the rows sent.
async fn copy_in(
    conn: &mut PgConnection,
    table: &str,
    cols: &str,
    input: &mut SendableRecordBatchStream,
    target: &Target,
    id: &str,
) -> Result<u64> {
    let what = format!("sink '{id}'");
    let ext = |e: String| Error::External { system: what.clone(), message: e };
    let mut encoder =
        pgpq::ArrowToPostgresBinaryEncoder::try_new(&target.schema).map_err(|e| ext(e.to_string()))?;
    let mut copy = conn
        .copy_in_raw(&format!("COPY {table} ({cols}) FROM STDIN (FORMAT binary)"))
        .await
        .map_err(|e| ext(e.to_string()))?;
    let mut buf = BytesMut::with_capacity(1 << 20);
    encoder.write_header(&mut buf).map_err(|e| ext(e.to_string()))?;
    let mut rows = 0u64;
    while let Some(batch) = input.next().await {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                let _ = copy.abort("input failed").await;
                return Err(ext(crate::spec::sql::short(e)));
            }
        };
        let batch = conform(&batch, target).map_err(ext)?;
        rows += batch.num_rows() as u64;
        encoder.write_batch(&batch, &mut buf).map_err(|e| ext(e.to_string()))?;
        if buf.len() >= 1 << 20 {
            copy.send(buf.split().freeze()).await.map_err(|e| ext(e.to_string()))?;
        }
    }
    encoder.write_footer(&mut buf).map_err(|e| ext(e.to_string()))?;
    copy.send(buf.freeze()).await.map_err(|e| ext(e.to_string()))?;
    copy.finish().await.map_err(|e| ext(e.to_string()))?;
    Ok(rows)
}

/// The batch's columns cast to the table's types, in the target's order.
fn conform(batch: &RecordBatch, target: &Target) -> std::result::Result<RecordBatch, String> {
    let schema = batch.schema();
    let mut arrays = Vec::with_capacity(target.columns.len());
    for f in target.schema.fields() {
        let i = schema.index_of(f.name()).map_err(|e| e.to_string())?;
        let col = batch.column(i);
        let cast_col = if col.data_type() == f.data_type() {
            col.clone()
        } else {
            let opts = datafusion::arrow::compute::CastOptions { safe: false, ..Default::default() };
            datafusion::arrow::compute::cast_with_options(col, f.data_type(), &opts)
                .map_err(|e| format!("column '{}': {e}", f.name()))?
        };
        arrays.push(cast_col);
    }
    RecordBatch::try_new(target.schema.clone(), arrays).map_err(|e| e.to_string())
}
