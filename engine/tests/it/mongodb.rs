//! The MongoDB source and sink against a MongoDB-wire server: values are
//! read exactly or refused with the document and field, never turned into
//! something else. Each test has its own collection names (a server may
//! share collections between databases).

use std::fs;

use mongodb::bson::{doc, Document};

use super::{engine_env, scratch, text};

fn url() -> String {
    std::env::var("ENGINE_TEST_MONGODB").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".to_string())
}

/// A collection no earlier run used: process ids come round again, and the
/// server keeps what earlier runs wrote.
fn coll_name(test: &str) -> String {
    format!("it_{test}_{}", super::unique())
}

fn with_coll<F, T>(name: &str, f: impl FnOnce(mongodb::Collection<Document>) -> F) -> T
where
    F: std::future::Future<Output = T>,
{
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = mongodb::Client::with_uri_str(url()).await.expect("mongo");
        f(client.database("engine_it").collection(name)).await
    })
}

fn all_docs(name: &str) -> Vec<Document> {
    with_coll(name, |c| async move {
        use futures::TryStreamExt;
        c.find(Document::new()).await.expect("find").try_collect().await.expect("docs")
    })
}

fn run(dir: &std::path::Path, spec: &str) -> (i32, String) {
    fs::write(dir.join("p.yaml"), spec).expect("spec");
    let u = url();
    let out = engine_env(dir, &["run", "p.yaml"], &[("MONGODB_URL", &u)]);
    (out.status.code().unwrap_or(-1), text(&out.stderr))
}

fn read_spec(coll: &str, schema: &str) -> String {
    format!(
        "version: 1\nname: m\nconnections:\n  docs: {{ type: mongodb, url: \"{{{{ env.MONGODB_URL }}}}\", database: engine_it }}\nsources:\n  d:\n    connection: docs\n    collection: {coll}\n    schema: {schema}\nsinks:\n  out: {{ input: d, type: file, path: out.csv, format: csv }}\n"
    )
}

#[test]
fn decimals_are_read_exactly() {
    let coll = coll_name("decimals");
    with_coll(&coll, |c| async move {
        let big: mongodb::bson::Decimal128 = "12345678901234567.89".parse().expect("decimal");
        c.insert_many([doc! { "id": 1, "amount": big }, doc! { "id": 2, "amount": 0.1 }])
            .await
            .expect("insert");
    });
    let dir = scratch("mongo-decimals");
    let (code, err) = run(&dir, &read_spec(&coll, "{ id: int64, amount: \"decimal(20,2)\" }"));
    assert_eq!(code, 0, "{err}");
    let csv = fs::read_to_string(dir.join("out.csv")).expect("csv");
    let mut lines: Vec<&str> = csv.lines().skip(1).collect();
    lines.sort();
    assert_eq!(lines, ["1,12345678901234567.89", "2,0.10"]);
}

#[test]
fn a_value_that_does_not_fit_is_an_error_naming_the_document_and_field() {
    let coll = coll_name("overflow");
    with_coll(&coll, |c| async move {
        c.insert_many([doc! { "_id": "ok", "n": 5 }, doc! { "_id": "big", "n": 1i64 << 40 }])
            .await
            .expect("insert");
    });
    let dir = scratch("mongo-overflow");
    let (code, err) = run(&dir, &read_spec(&coll, "{ n: int32 }"));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("source 'd'"), "{err}");
    assert!(err.contains("document \"big\""), "{err}");
    assert!(err.contains("field 'n'"), "{err}");
    assert!(!dir.join("out.csv").exists());
}

#[test]
fn a_missing_collection_is_an_error() {
    let coll = coll_name("absent");
    let dir = scratch("mongo-absent");
    let (code, err) = run(&dir, &read_spec(&coll, "{ n: int64 }"));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&format!("collection '{coll}' does not exist")), "{err}");
}

fn write_spec(coll: &str, sql: &str, mode: &str) -> String {
    format!(
        "version: 1\nname: m\nconnections:\n  docs: {{ type: mongodb, url: \"{{{{ env.MONGODB_URL }}}}\", database: engine_it }}\nsources:\n  rows: {{ type: generate, rows: 1, columns: {{ n: n }} }}\ntransforms:\n  t:\n    sql: \"{sql}\"\nsinks:\n  out: {{ input: t, connection: docs, collection: {coll}, {mode} }}\n"
    )
}

#[test]
fn an_upsert_with_a_null_key_is_refused_and_overwrites_nothing() {
    let coll = coll_name("nullkey");
    with_coll(&coll, |c| async move {
        c.insert_many([doc! { "id": 1, "v": "a" }, doc! { "id": 2, "v": "b" }]).await.expect("insert");
    });
    let dir = scratch("mongo-nullkey");
    let sql = "SELECT CAST(NULL AS BIGINT) AS id, 'x' AS v FROM rows";
    let (code, err) = run(&dir, &write_spec(&coll, sql, "mode: upsert, key: [id]"));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("sink 'out'"), "{err}");
    assert!(err.contains("row 1") && err.contains("key field 'id' is NULL"), "{err}");
    let mut vs: Vec<String> =
        all_docs(&coll).iter().map(|d| d.get_str("v").unwrap_or("?").to_string()).collect();
    vs.sort();
    assert_eq!(vs, ["a", "b"]);
}

#[test]
fn a_replace_that_fails_leaves_the_collection_as_it_was() {
    let coll = coll_name("replace");
    with_coll(&coll, |c| async move {
        c.insert_many([doc! { "id": 1 }, doc! { "id": 2 }, doc! { "id": 3 }]).await.expect("insert");
    });
    let dir = scratch("mongo-replace");
    // A list column has no document form: the write fails before any swap.
    let sql = "SELECT n AS id, make_array(n, n) AS xs FROM rows";
    let (code, err) = run(&dir, &write_spec(&coll, sql, "mode: replace"));
    assert_eq!(code, 3, "{err}");
    assert_eq!(all_docs(&coll).len(), 3, "{err}");
    // A replace that works swaps the whole collection.
    let (code, err) = run(&dir, &write_spec(&coll, "SELECT n + 10 AS id FROM rows", "mode: replace"));
    assert_eq!(code, 0, "{err}");
    let docs = all_docs(&coll);
    assert_eq!(docs.len(), 1, "{docs:?}");
    assert_eq!(docs[0].get_i64("id").ok(), Some(10));
}

/// `validate --connect` says whether a mongodb connection uses TLS, and
/// `tls=true` is honoured: a server without TLS cannot be reached with it.
#[test]
fn validate_connect_reports_tls_and_tls_true_is_honoured() {
    let dir = scratch("mongo-tls");
    let coll = coll_name("tls");
    fs::write(dir.join("p.yaml"), read_spec(&coll, "{ id: int64 }")).expect("spec");
    let u = url();
    let out = engine_env(&dir, &["validate", "--connect", "p.yaml"], &[("MONGODB_URL", &u)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("connection 'docs': no TLS"), "{}", text(&out.stdout));

    let base = u.trim_end_matches('/');
    let options = "tls=true&serverSelectionTimeoutMS=2000";
    let tls = match (base.contains('?'), base["mongodb://".len()..].contains('/')) {
        (true, _) => format!("{base}&{options}"),
        (false, true) => format!("{base}?{options}"),
        (false, false) => format!("{base}/?{options}"),
    };
    let out = engine_env(&dir, &["validate", "--connect", "p.yaml"], &[("MONGODB_URL", &tls)]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("mongodb connection 'docs'"), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("tls") || stderr.contains("handshake") || stderr.contains("SSL"),
        "{stderr}"
    );
}
