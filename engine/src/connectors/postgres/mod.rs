//! PostgreSQL: connections, tracked migrations, the quarantine table, the
//! source ([`source`], binary COPY decoded by [`decode`]) and the sink
//! ([`sink`]); the runtime traits at the end of this file.

pub mod config;
pub mod decode;
pub mod runs;
pub mod sink;
pub mod source;

use std::path::Path;

use sqlx::PgConnection;

use crate::error::{Error, Result};

/// Opens one connection; errors name the connection, never its password.
/// Statements slower than a second (an index rebuild after a bulk load) are
/// logged at debug, not as warnings in every run's output.
pub async fn connect(name: &str, url: &str) -> Result<PgConnection> {
    use sqlx::ConnectOptions;
    let opts = options(url).map_err(|e| external(name, url, e))?;
    opts.log_slow_statements(log::LevelFilter::Debug, std::time::Duration::from_secs(1))
        .connect()
        .await
        .map_err(|e| external(name, url, e))
}

/// The connection options of a URL. Without an `sslmode` (in the URL or
/// `PGSSLMODE`), a server on this machine is reached as libpq would
/// (`prefer`), and any other over TLS with its certificate and name checked
/// (`verify-full`): credentials and rows do not cross a network in clear, or
/// to a server that only claims the name.
pub fn options(url: &str) -> std::result::Result<sqlx::postgres::PgConnectOptions, sqlx::Error> {
    let opts: sqlx::postgres::PgConnectOptions = url.parse()?;
    let query = url.split_once('?').map(|(_, q)| q.to_ascii_lowercase()).unwrap_or_default();
    let said = query.split('&').any(|p| p.starts_with("sslmode=")) || std::env::var_os("PGSSLMODE").is_some();
    let host = opts.get_host().trim_start_matches('[').trim_end_matches(']');
    let local = host.is_empty()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    Ok(if said || local { opts } else { opts.ssl_mode(sqlx::postgres::PgSslMode::VerifyFull) })
}

/// Whether `table` (possibly `schema.table`) exists.
pub async fn table_exists(conn: &mut PgConnection, table: &str) -> std::result::Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(crate::spec::sql::qualified(table))
        .fetch_one(conn)
        .await
}

pub fn external(name: &str, url: &str, e: impl std::fmt::Display) -> Error {
    super::external("postgres", name, url, e)
}

/// Applies the migrations in `dir` that this database has not seen, in order,
/// each once (tracked in `engine_migrations`).
pub async fn migrate(name: &str, url: &str, conn: &mut PgConnection, dir: &Path) -> Result<()> {
    let mut migrator = sqlx::migrate::Migrator::new(dir.to_path_buf())
        .await
        .map_err(|e| Error::Usage(format!("connection '{name}': migrations in '{}': {e}", dir.display())))?;
    migrator.dangerous_set_table_name("engine_migrations");
    migrator.set_ignore_missing(true);
    migrator
        .run(conn)
        .await
        .map_err(|e| external(name, url, format!("migrations in '{}': {e}", dir.display())))
}

/// Applies the migrations of every postgres connection of `spec` that names them.
pub async fn migrate_spec(spec: &crate::spec::Spec) -> Result<()> {
    for (name, c) in &spec.pipeline.connections {
        if let Some(PostgresConnection { url, migrations: Some(dir) }) = c.settings::<PostgresConnection>() {
            let mut conn = connect(name, url).await?;
            migrate(name, url, &mut conn, &spec.resolve(dir.value())).await?;
        }
    }
    Ok(())
}

/// Appends the rejected rows of one check to the quarantine table, in the
/// caller's transaction.
pub async fn write_rejects(
    conn: &mut PgConnection,
    r: &super::Rejects,
) -> std::result::Result<(), sqlx::Error> {
    let rows: Vec<String> = r.rows.iter().map(|v| v.to_string()).collect();
    let sql = format!(
        "INSERT INTO {} (run_id, node, check_name, reason, row_data) \
         SELECT $1, $2, $3, $4, d::jsonb FROM unnest($5::text[]) AS x(d)",
        crate::spec::sql::qualified(&r.table)
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&r.run_id)
        .bind(&r.node)
        .bind(&r.check)
        .bind(&r.reason)
        .bind(&rows)
        .execute(&mut *conn)
        .await
        .map(|_| ())
}

// ------------------------------------------------------------------ runtime

use config::{PostgresConnection, PostgresSink, PostgresSource};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::SessionContext;

use super::{
    BatchSink, BatchSource, Ledger, Load, Node, OpenStreamSink, Probe, Refused, StreamSink, Transaction,
    Written,
};
use crate::spec::Spec;

#[async_trait::async_trait]
impl BatchSource for PostgresSource {
    async fn open(
        &self,
        node: Node<'_>,
        _ctx: &SessionContext,
        watermark: Option<&str>,
    ) -> Result<SendableRecordBatchStream> {
        let (name, c) = node.connection::<PostgresConnection>(&self.connection)?;
        source::open(name, &c.url, self, watermark).await
    }
}

#[async_trait::async_trait]
impl Probe for PostgresSource {
    async fn probe(&self, node: Node<'_>, _input: Option<SchemaRef>) -> Result<Option<String>> {
        let (name, c) = node.connection::<PostgresConnection>(&self.connection)?;
        source::describe_source(name, &c.url, self).await.map(|_| None)
    }
}

#[async_trait::async_trait]
impl Probe for PostgresConnection {
    /// Tells whether the connection uses TLS, as the server sees it.
    async fn probe(&self, node: Node<'_>, _input: Option<SchemaRef>) -> Result<Option<String>> {
        let mut conn = connect(node.id, &self.url).await?;
        let (ssl, version): (bool, Option<String>) =
            sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&mut conn)
                .await
                .map_err(|e| external(node.id, &self.url, e))?;
        Ok(Some(tls_note(&self.url, ssl, version.as_deref())))
    }
}

/// `TLS (TLSv1.3, sslmode=verify-full)` or `no TLS (sslmode=prefer)`.
fn tls_note(url: &str, ssl: bool, version: Option<&str>) -> String {
    let mode = options(url)
        .map(|o| format!("{:?}", o.get_ssl_mode()))
        .unwrap_or_default();
    // PgSslMode's names in the URL's spelling: VerifyFull -> verify-full.
    let mut sslmode = String::new();
    for (i, ch) in mode.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            sslmode.push('-');
        }
        sslmode.push(ch.to_ascii_lowercase());
    }
    match (ssl, version) {
        (true, Some(v)) => format!("TLS ({v}, sslmode={sslmode})"),
        (true, None) => format!("TLS (sslmode={sslmode})"),
        (false, _) => format!("no TLS (sslmode={sslmode})"),
    }
}

#[async_trait::async_trait]
impl Transaction for PostgresConnection {
    async fn load(&self, spec: &Spec, name: &str, loads: Vec<Load>, ledger: &Ledger) -> Result<Vec<u64>> {
        let mut members = Vec::with_capacity(loads.len());
        for Load { id, input } in loads {
            let sink = spec
                .pipeline
                .sinks
                .get(&id)
                .and_then(|s| s.settings::<PostgresSink>())
                .ok_or_else(|| Error::Internal(format!("sink '{id}' is not a postgres sink")))?;
            members.push(sink::Load { id, sink, input });
        }
        sink::load_all(name, &self.url, members, ledger).await
    }
}

#[async_trait::async_trait]
impl BatchSink for PostgresSink {
    fn transaction(&self) -> Option<&crate::spec::yaml::Sp<String>> {
        Some(&self.connection)
    }

    async fn write(&self, node: Node<'_>, input: SendableRecordBatchStream) -> Result<u64> {
        let (name, c) = node.connection::<PostgresConnection>(&self.connection)?;
        let load = sink::Load { id: node.id.to_string(), sink: self, input };
        Ok(sink::load_all(name, &c.url, vec![load], &Ledger::default()).await?.iter().sum())
    }
}

#[async_trait::async_trait]
impl Probe for PostgresSink {
    async fn probe(&self, node: Node<'_>, input: Option<SchemaRef>) -> Result<Option<String>> {
        let (name, c) = node.connection::<PostgresConnection>(&self.connection)?;
        sink::check_table(name, &c.url, node.id, self, input).await.map(|()| None)
    }
}

impl OpenStreamSink for PostgresSink {
    fn open_stream(&self, node: Node<'_>) -> Result<Box<dyn StreamSink>> {
        let (name, c) = node.connection::<PostgresConnection>(&self.connection)?;
        Ok(Box::new(PgStream {
            id: node.id.to_string(),
            name: name.to_string(),
            url: c.url.clone(),
            sink: self.clone(),
            conn: None,
            split: None,
        }))
    }
}

/// A stream's postgres sink: one connection kept between batches, the table
/// checked again whenever it is opened again.
struct PgStream {
    id: String,
    name: String,
    url: String,
    sink: PostgresSink,
    conn: Option<(PgConnection, sink::StreamTarget)>,
    /// The batch being written, kept while the database is away so that a
    /// retry goes on where the last attempt stopped.
    split: Option<Split>,
}

impl PgStream {
    /// The connection, opened (and the table checked) if it is not.
    async fn ready(&mut self, schema: &SchemaRef) -> Result<&mut (PgConnection, sink::StreamTarget)> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let mut c = connect(&self.name, &self.url).await?;
                let target = sink::StreamTarget::new(&mut c, &self.id, &self.sink, schema).await?;
                (c, target)
            }
        };
        Ok(self.conn.insert(conn))
    }
}

/// A batch's rows and the ranges of them still to write. A statement the
/// database refuses for its data is split in halves until each refused row
/// stands alone; the rest are written.
struct Split {
    rows: Vec<Vec<u8>>,
    todo: Vec<std::ops::Range<usize>>,
    done: Written,
}

#[async_trait::async_trait]
impl StreamSink for PgStream {
    async fn open(&mut self, schema: &SchemaRef) -> Result<()> {
        self.ready(schema).await.map(|_| ())
    }

    async fn write(&mut self, batches: &[RecordBatch]) -> Result<Written> {
        let mut split = match self.split.take() {
            Some(s) => s,
            None => {
                let rows = super::codec::json_rows(batches).map_err(Error::Internal)?;
                let whole = 0..rows.len();
                Split { todo: std::iter::once(whole).collect(), rows, done: Written::default() }
            }
        };
        while let Some(range) = split.todo.pop() {
            let (c, target) = match self.ready(&batches[0].schema()).await {
                Ok(c) => c,
                Err(e) => {
                    split.todo.push(range);
                    self.split = Some(split);
                    return Err(e);
                }
            };
            let json = super::codec::join_array(&split.rows[range.clone()]).map_err(Error::Internal)?;
            match target.write(c, &json).await {
                Ok(()) => split.done.rows += range.len() as u64,
                Err(e) if sink::refused_for_data(&e) => {
                    if range.len() == 1 {
                        split.done.refused.push(Refused {
                            node: self.id.clone(),
                            row: split.rows[range.start].clone(),
                            reason: format!("sink '{}' refused the row: {}", self.id, refusal(&e)),
                        });
                    } else {
                        let mid = range.start + range.len() / 2;
                        split.todo.push(mid..range.end);
                        split.todo.push(range.start..mid);
                    }
                }
                Err(e) => {
                    self.conn = None; // opened again (and the table checked again) on the next attempt
                    split.todo.push(range);
                    self.split = Some(split);
                    return Err(external(&self.name, &self.url, e));
                }
            }
        }
        if !split.done.refused.is_empty() {
            tracing::warn!(sink = %self.id, "{} rows refused by the database", split.done.refused.len());
        }
        Ok(split.done)
    }
}

/// The database's reason for refusing a row, with its SQLSTATE.
fn refusal(e: &sqlx::Error) -> String {
    match e.as_database_error() {
        Some(d) => match d.code() {
            Some(code) => format!("{} (SQLSTATE {code})", d.message()),
            None => d.message().to_string(),
        },
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::postgres::PgSslMode;

    /// Without `sslmode`, a server elsewhere is reached over TLS with its
    /// certificate checked; a server on this machine as libpq would.
    #[test]
    fn without_sslmode_a_remote_server_is_verified_and_a_local_one_is_preferred() {
        let mode = |u: &str| options(u).expect("a URL").get_ssl_mode();
        assert!(matches!(mode("postgres://app@db.example.com/dwh"), PgSslMode::VerifyFull));
        assert!(matches!(mode("postgres://app:pw@10.0.0.5:5432/dwh"), PgSslMode::VerifyFull));
        assert!(matches!(mode("postgres://postgres@127.0.0.1:5432/dwh"), PgSslMode::Prefer));
        assert!(matches!(mode("postgres://postgres@localhost/dwh"), PgSslMode::Prefer));
        assert!(matches!(mode("postgres://postgres@[::1]:5432/dwh"), PgSslMode::Prefer));
        assert!(matches!(mode("postgres://app@db.example.com/dwh?sslmode=disable"), PgSslMode::Disable));
        assert!(matches!(mode("postgres://app@db.example.com/dwh?sslmode=require"), PgSslMode::Require));
    }
}
