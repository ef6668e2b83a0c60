//! The postgres source against a real PostgreSQL (started by
//! `scripts/services`; `ENGINE_TEST_PG` overrides the server URL).

use std::fs;
use std::process::Command;

use super::{engine, text};

pub fn server() -> String {
    std::env::var("ENGINE_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
}

/// Runs SQL with psql against database `db`, panicking with its output on failure.
pub fn psql(db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([&format!("{}/{db}", server()), "-v", "ON_ERROR_STOP=1", "-qtA", "-c", sql])
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "psql failed: {}", text(&out.stderr));
    text(&out.stdout)
}

/// A fresh database for one test.
pub fn database(name: &str) -> String {
    let db = format!("engine_it_{name}");
    psql("postgres", &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
    psql("postgres", &format!("CREATE DATABASE {db}"));
    db
}

#[test]
fn postgres_source_reads_every_supported_type() {
    let db = database("types");
    psql(
        &db,
        "CREATE TABLE t (id int8 PRIMARY KEY, small int2, i int4, f float8, r real, amount numeric(12,2), \
         code char(3), name text, ok bool, day date, at timestamptz, local timestamp, doc jsonb, u uuid); \
         INSERT INTO t VALUES \
         (1, 7, 42, 1.5, 2.25, 2450.00, 'USD', 'Ana', true, '2026-01-02', '2026-11-26T10:15:02.123Z', '2026-01-02 03:04:05', '{\"a\": 1}', '123e4567-e89b-12d3-a456-426614174000'), \
         (2, NULL, NULL, NULL, NULL, -0.05, 'EU', NULL, false, NULL, NULL, NULL, NULL, NULL), \
         (3, -1, -2, -3.5, 0, 12345678.91, 'GBP', 'Zoë ''q''', NULL, '1999-12-31', '1970-01-01T00:00:00Z', NULL, '[]', NULL)",
    );
    let dir = std::env::temp_dir().join(format!("engine-pg-types-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    let spec = format!(
        "version: 1\nname: pgtypes\nconnections:\n  db: {{ type: postgres, url: \"{}/{db}\" }}\nsources:\n  t: {{ connection: db, query: \"SELECT * FROM t ORDER BY id\" }}\nsinks:\n  out: {{ input: t, type: file, path: out.csv, format: csv }}\n",
        server()
    );
    fs::write(dir.join("p.yaml"), spec).expect("spec");
    let out = engine(&dir, &["run", "p.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let csv = fs::read_to_string(dir.join("out.csv")).expect("csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "id,small,i,f,r,amount,code,name,ok,day,at,local,doc,u");
    assert_eq!(
        lines[1],
        "1,7,42,1.5,2.25,2450.00,USD,Ana,true,2026-01-02,2026-11-26T10:15:02.123Z,2026-01-02T03:04:05,\"{\"\"a\"\": 1}\",123e4567-e89b-12d3-a456-426614174000"
    );
    assert_eq!(lines[2], "2,,,,,-0.05,EU,,false,,,,,");
    assert_eq!(lines[3], "3,-1,-2,-3.5,0.0,12345678.91,GBP,Zoë 'q',,1999-12-31,1970-01-01T00:00:00Z,,[],");
    assert_eq!(lines.len(), 4);
}

#[test]
fn validate_connect_checks_connections_and_sink_tables() {
    let db = database("connect");
    psql(&db, "CREATE TABLE t (id int8 PRIMARY KEY, name text NOT NULL)");
    let dir = std::env::temp_dir().join(format!("engine-pg-connect-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    let spec = |url: &str| {
        format!(
            "version: 1\nname: c\nconnections:\n  db: {{ type: postgres, url: \"{url}\" }}\nsources:\n  nums: {{ type: generate, rows: 3, columns: {{ id: n, extra: \"'x'\" }} }}\nsinks:\n  out: {{ input: nums, connection: db, table: t, mode: upsert, key: [id] }}\n"
        )
    };
    fs::write(dir.join("c.yaml"), spec(&format!("{}/{db}", server()))).expect("spec");
    let out = engine(&dir, &["validate", "--connect", "c.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr).trim(),
        "c.yaml: sink 'out': the input does not fit table 't': input column 'extra' is not in table 't'; table column 'name' is NOT NULL without a default, and the input lacks it"
    );
    // Without --connect the spec is valid: nothing is asked of the database.
    assert_eq!(engine(&dir, &["validate", "c.yaml"]).status.code(), Some(0));

    fs::write(dir.join("c.yaml"), spec("postgres://app:s3cret-pw@127.0.0.1:1/nowhere")).expect("spec");
    let out = engine(&dir, &["validate", "--connect", "c.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("c.yaml: postgres connection 'db' (postgres://app:***@127.0.0.1:1/nowhere): "),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn a_missing_source_table_fails_the_run_by_name() {
    let db = database("missing_table");
    let dir = super::scratch("pg-missing-table");
    let spec = format!(
        "version: 1\nname: m\nconnections:\n  db: {{ type: postgres, url: \"{}/{db}\" }}\nsources:\n  t: {{ connection: db, table: ledger_entries }}\nsinks:\n  out: {{ input: t, type: file, path: out.csv, format: csv }}\n",
        server()
    );
    fs::write(dir.join("p.yaml"), spec).expect("spec");
    let out = engine(&dir, &["run", "p.yaml"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("relation \"ledger_entries\" does not exist"), "{err}");
    assert!(!dir.join("out.csv").exists());
}

#[test]
fn slow_statements_stay_out_of_a_runs_output() {
    let db = database("slow");
    // Every insert into the table takes over a second: sqlx's slow-statement threshold.
    psql(
        &db,
        "CREATE TABLE t (id int8 PRIMARY KEY); INSERT INTO t VALUES (100); \
         CREATE FUNCTION nap() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1.1); RETURN NULL; END $$; \
         CREATE TRIGGER nap AFTER INSERT ON t FOR EACH STATEMENT EXECUTE FUNCTION nap()",
    );
    let dir = super::scratch("pg-slow");
    let spec = format!(
        "version: 1\nname: s\nconnections:\n  db: {{ type: postgres, url: \"{}/{db}\" }}\nsources:\n  nums: {{ type: generate, rows: 3, columns: {{ id: n }} }}\nsinks:\n  out: {{ input: nums, connection: db, table: t, mode: upsert, key: [id] }}\n",
        server()
    );
    fs::write(dir.join("s.yaml"), spec).expect("spec");
    let out = engine(&dir, &["run", "s.yaml"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(psql(&db, "SELECT count(*) FROM t").trim(), "4");
    assert!(!err.contains("slow statement"), "{err}");
}

/// An unconstrained `numeric` is read at 10 places unless the source
/// declares its type: a value with more places is an error naming the
/// column and the value, never rounded; declared, it is read exactly.
#[test]
fn a_numeric_with_more_places_than_it_is_read_at_is_an_error_not_a_rounding() {
    let db = database("numeric_places");
    psql(&db, "CREATE TABLE t (id int8, v numeric); INSERT INTO t VALUES (1, 1.5), (2, 0.12345678901234)");
    let dir = std::env::temp_dir().join(format!("engine-pg-numeric-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    let spec = |schema: &str| {
        format!(
            "version: 1\nname: places\nconnections:\n  db: {{ type: postgres, url: \"{}/{db}\" }}\nsources:\n  t: {{ connection: db, query: \"SELECT * FROM t ORDER BY id\"{schema} }}\nsinks:\n  out: {{ input: t, type: file, path: out.csv, format: csv }}\n",
            server()
        )
    };
    fs::write(dir.join("p.yaml"), spec("")).expect("spec");
    let out = engine(&dir, &["run", "p.yaml"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("column 'v'") && err.contains("0.12345678901234") && err.contains("10 decimal places"), "{err}");
    assert!(!dir.join("out.csv").exists());
    fs::write(dir.join("p.yaml"), spec(", schema: { id: int64, v: \"decimal(30,14)\" }")).expect("spec");
    let out = engine(&dir, &["run", "p.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let csv = fs::read_to_string(dir.join("out.csv")).expect("csv");
    assert!(csv.contains("2,0.12345678901234"), "{csv}");
}
