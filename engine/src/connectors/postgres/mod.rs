//! PostgreSQL: connections, tracked migrations, the quarantine table, and
//! the source ([`source`], binary COPY decoded by [`decode`]).

pub mod decode;
pub mod sink;
pub mod source;

use std::path::Path;

use sqlx::{Connection, PgConnection};

use crate::error::{Error, Result};

/// Opens one connection; errors name the connection, never its password.
pub async fn connect(name: &str, url: &str) -> Result<PgConnection> {
    PgConnection::connect(url).await.map_err(|e| external(name, url, e))
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
    use crate::spec::model::{Connection, PostgresConnection};
    for (name, c) in &spec.pipeline.connections {
        if let Connection::Postgres(PostgresConnection { url, migrations: Some(dir), .. }) = c {
            let mut conn = connect(name, url).await?;
            migrate(name, url, &mut conn, &spec.resolve(dir.value())).await?;
        }
    }
    Ok(())
}

/// One quarantined row.
pub struct Reject {
    pub reason: String,
    pub row: serde_json::Value,
}

/// Appends rejected rows of one check to the quarantine table in one transaction.
pub async fn write_rejects(
    conn: &mut PgConnection,
    table: &str,
    run_id: &str,
    node: &str,
    check: &str,
    rejects: &[Reject],
) -> std::result::Result<(), sqlx::Error> {
    let reasons: Vec<&str> = rejects.iter().map(|r| r.reason.as_str()).collect();
    let rows: Vec<String> = rejects.iter().map(|r| r.row.to_string()).collect();
    let sql = format!(
        "INSERT INTO {} (run_id, node, check_name, reason, row_data) \
         SELECT $1, $2, $3, r, d::jsonb FROM unnest($4::text[], $5::text[]) AS x(r, d)",
        quote_table(table)
    );
    let mut tx = conn.begin().await?;
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(run_id)
        .bind(node)
        .bind(check)
        .bind(&reasons)
        .bind(&rows)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// `schema.table` or `table`, each part quoted.
pub fn quote_table(name: &str) -> String {
    name.split('.').map(|p| format!("\"{}\"", p.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}
