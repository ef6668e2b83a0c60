//! The warehouse pipeline end to end on real PostgreSQL and a MongoDB-wire
//! server, at a small size: seed, load, compare with the sources, rerun,
//! incremental rerun.

use std::collections::HashMap;

use super::postgres::{database, psql, server};
use super::{engine_env, repo_dir, text};

fn mongo_url() -> String {
    std::env::var("ENGINE_TEST_MONGODB").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".to_string())
}

struct Env {
    src: String,
    dwh: String,
    mongo_db: String,
}

impl Env {
    fn new(name: &str) -> Self {
        let src = database(&format!("{name}_src"));
        let dwh = database(&format!("{name}_dwh"));
        Env { src, dwh, mongo_db: format!("engine_it_{name}_{}", std::process::id()) }
    }

    fn run(&self, args: &[&str]) -> (i32, String) {
        let src = format!("{}/{}", server(), self.src);
        let dwh = format!("{}/{}", server(), self.dwh);
        let mongo = mongo_url();
        let env = [
            ("SOURCE_DATABASE_URL", src.as_str()),
            ("DWH_DATABASE_URL", dwh.as_str()),
            ("MONGODB_URL", mongo.as_str()),
            ("MONGODB_DATABASE", self.mongo_db.as_str()),
        ];
        let out = engine_env(&repo_dir(), args, &env);
        (out.status.code().unwrap_or(-1), text(&out.stderr))
    }
}

/// category -> total, and first_name -> total, computed from the sources.
fn source_totals(env: &Env) -> (HashMap<String, String>, HashMap<String, String>) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let categories: HashMap<String, String> = rt.block_on(async {
        use futures::TryStreamExt;
        let client = mongodb::Client::with_uri_str(mongo_url()).await.expect("mongo");
        let coll = client.database(&env.mongo_db).collection::<mongodb::bson::Document>("merchants");
        let docs: Vec<mongodb::bson::Document> =
            coll.find(mongodb::bson::Document::new()).await.expect("find").try_collect().await.expect("docs");
        docs.iter()
            .map(|d| {
                (
                    d.get_str("merchant_id").unwrap_or_default().to_string(),
                    d.get_str("category").unwrap_or("other").to_string(),
                )
            })
            .collect()
    });
    let mut by_category: HashMap<String, i64> = HashMap::new();
    for line in psql(&env.src, "SELECT merchant_id, (amount * 100)::bigint FROM transactions").lines() {
        let (m, cents) = line.split_once('|').expect("two columns");
        let cat = categories.get(m).cloned().unwrap_or_else(|| "unknown".into());
        *by_category.entry(cat).or_default() += cents.parse::<i64>().expect("cents");
    }
    let cats = by_category.into_iter().map(|(k, v)| (k, format!("{}.{:02}", v / 100, v % 100))).collect();
    let names = psql(
        &env.src,
        "SELECT c.first_name, SUM(t.amount) FROM transactions t JOIN customers c USING (customer_id) GROUP BY 1",
    )
    .lines()
    .map(|l| {
        let (a, b) = l.split_once('|').expect("two columns");
        (a.to_string(), b.to_string())
    })
    .collect();
    (cats, names)
}

fn warehouse_totals(env: &Env) -> (HashMap<String, String>, HashMap<String, String>) {
    let pairs = |sql: &str| -> HashMap<String, String> {
        psql(&env.dwh, sql)
            .lines()
            .map(|l| l.split_once('|').map(|(a, b)| (a.to_string(), b.to_string())).expect("pair"))
            .collect()
    };
    (
        pairs("SELECT m.category, SUM(f.amount) as total_sales FROM fact_transactions f JOIN dim_merchant m ON f.merchant_key = m.merchant_key GROUP BY m.category ORDER BY total_sales DESC"),
        pairs("SELECT c.first_name, SUM(f.amount) as total_spent FROM fact_transactions f JOIN dim_customer c ON f.customer_key = c.customer_key GROUP BY c.first_name ORDER BY total_spent DESC"),
    )
}

#[test]
fn seed_then_load_matches_the_sources_and_reruns_change_nothing() {
    let env = Env::new("wh");
    let (code, err) = env.run(&[
        "run",
        "pipelines/seed.yaml",
        "--var",
        "customers=300",
        "--var",
        "merchants=400",
        "--var",
        "transactions=20000",
    ]);
    assert_eq!(code, 0, "seed: {err}");
    let (code, err) = env.run(&["run", "pipelines/dwh.yaml"]);
    assert_eq!(code, 0, "dwh: {err}");

    let (src_cats, src_names) = source_totals(&env);
    let (dwh_cats, dwh_names) = warehouse_totals(&env);
    assert_eq!(dwh_cats, src_cats);
    assert_eq!(dwh_names, src_names);
    assert!(dwh_cats.contains_key("unknown"), "the seed names some merchants MongoDB lacks: {dwh_cats:?}");
    // The first load rebuilt foreign keys and indexes after its COPY: all are back.
    let kept = psql(
        &env.dwh,
        "SELECT (SELECT count(*) FROM pg_constraint WHERE conrelid = 'fact_transactions'::regclass AND contype = 'f'), \
                (SELECT count(*) FROM pg_indexes WHERE tablename = 'fact_transactions')",
    );
    assert_eq!(kept.trim(), "3|4");

    // A rerun reads the lookback window again and changes nothing.
    let before = psql(&env.dwh, "SELECT count(*), sum(amount) FROM fact_transactions");
    let (code, err) = env.run(&["run", "pipelines/dwh.yaml"]);
    assert_eq!(code, 0, "rerun: {err}");
    assert_eq!(psql(&env.dwh, "SELECT count(*), sum(amount) FROM fact_transactions"), before);

    // 100 updated source rows move exactly those rows: only they get a new
    // row version in the warehouse.
    psql(
        &env.src,
        "UPDATE transactions SET amount = amount + 1, updated_at = now() WHERE transaction_id <= 100",
    );
    let xid = psql(&env.dwh, "SELECT txid_current() % 4294967296").trim().to_string();
    let (code, err) = env.run(&["run", "pipelines/dwh.yaml"]);
    assert_eq!(code, 0, "incremental: {err}");
    let moved = psql(&env.dwh, &format!("SELECT count(*), min(transaction_id), max(transaction_id) FROM fact_transactions WHERE xmin::text::bigint > {xid}"));
    assert_eq!(moved.trim(), "100|1|100", "{err}");
    let (src_cats, _) = source_totals(&env);
    let (dwh_cats, _) = warehouse_totals(&env);
    assert_eq!(dwh_cats, src_cats);
}

#[test]
fn a_run_killed_mid_load_leaves_the_warehouse_as_it_was() {
    let env = Env::new("kill");
    let (code, err) = env.run(&[
        "run",
        "pipelines/seed.yaml",
        "--var",
        "customers=500",
        "--var",
        "merchants=200",
        "--var",
        "transactions=300000",
    ]);
    assert_eq!(code, 0, "seed: {err}");
    let (code, err) = env.run(&["run", "pipelines/dwh.yaml"]);
    assert_eq!(code, 0, "first load: {err}");
    let before = psql(&env.dwh, "SELECT count(*), sum(amount) FROM fact_transactions");
    let marks = psql(&env.dwh, "SELECT node, watermark FROM etl_state ORDER BY node");

    // Every source row changes, so the next run has all of them to load.
    psql(&env.src, "UPDATE transactions SET amount = amount + 1, updated_at = now()");
    let src = format!("{}/{}", server(), env.src);
    let dwh = format!("{}/{}", server(), env.dwh);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_engine"))
        .current_dir(repo_dir())
        .args(["run", "pipelines/dwh.yaml"])
        .env("SOURCE_DATABASE_URL", &src)
        .env("DWH_DATABASE_URL", &dwh)
        .env("MONGODB_URL", mongo_url())
        .env("MONGODB_DATABASE", &env.mongo_db)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("engine starts");
    let watch = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND (query LIKE 'COPY %' OR query LIKE 'INSERT INTO %') AND pid <> pg_backend_pid()",
        env.dwh
    );
    let started = std::time::Instant::now();
    let mut seen = false;
    while started.elapsed() < std::time::Duration::from_secs(120) {
        if psql("postgres", &watch).trim() != "0" {
            seen = true;
            break;
        }
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(seen, "never saw the load start");
    child.kill().expect("SIGKILL");
    let _ = child.wait();

    assert_eq!(
        psql(&env.dwh, "SELECT count(*), sum(amount) FROM fact_transactions"),
        before,
        "the killed run changed facts"
    );
    assert_eq!(
        psql(&env.dwh, "SELECT node, watermark FROM etl_state ORDER BY node"),
        marks,
        "the killed run moved watermarks"
    );

    let (code, err) = env.run(&["run", "pipelines/dwh.yaml"]);
    assert_eq!(code, 0, "run after the kill: {err}");
    let (src_cats, src_names) = source_totals(&env);
    let (dwh_cats, dwh_names) = warehouse_totals(&env);
    assert_eq!(dwh_cats, src_cats);
    assert_eq!(dwh_names, src_names);
}

#[test]
fn quarantined_rows_land_in_the_quarantine_table_with_their_reason() {
    let env = Env::new("quarantine");
    let (code, err) = env.run(&[
        "run",
        "pipelines/seed.yaml",
        "--var",
        "customers=50",
        "--var",
        "merchants=20",
        "--var",
        "transactions=1000",
    ]);
    assert_eq!(code, 0, "seed: {err}");
    // Three transactions from the future fail `not_in_future` (quarantine, at most 0.1% = 1 row).
    psql(
        &env.src,
        "UPDATE transactions SET created_at = now() + interval '10 days' WHERE transaction_id IN (1, 2, 3)",
    );
    let (code, err) = env.run(&["run", "pipelines/dwh.yaml"]);
    assert_eq!(code, 1, "3 rows are past max_failures, so the check fails: {err}");
    assert!(err.contains("a check failed; nothing was written"), "{err}");
    assert_eq!(psql(&env.dwh, "SELECT count(*) FROM fact_transactions").trim(), "0");
    let rejects = psql(
        &env.dwh,
        "SELECT node, check_name, reason, (row_data->>'transaction_id') FROM etl_rejects ORDER BY 4",
    );
    assert_eq!(
        rejects,
        "transactions|not_in_future|not_in_future is not true|1\ntransactions|not_in_future|not_in_future is not true|2\ntransactions|not_in_future|not_in_future is not true|3\n"
    );
    // One bad row is within max_failures: it is quarantined and the rest loads.
    psql(
        &env.src,
        "UPDATE transactions SET created_at = now() - interval '1 day' WHERE transaction_id IN (2, 3)",
    );
    let (code, err) = env.run(&["run", "pipelines/dwh.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(psql(&env.dwh, "SELECT count(*) FROM fact_transactions").trim(), "999");
    assert_eq!(psql(&env.dwh, "SELECT count(*) FROM fact_transactions WHERE transaction_id = 1").trim(), "0");
}

#[test]
fn the_mongo_to_postgres_example_runs() {
    let env = Env::new("example");
    let (code, err) = env.run(&[
        "run",
        "pipelines/seed.yaml",
        "--var",
        "customers=10",
        "--var",
        "merchants=300",
        "--var",
        "transactions=10",
    ]);
    assert_eq!(code, 0, "seed: {err}");
    let (code, err) = env.run(&["run", "examples/mongo_to_postgres.yaml"]);
    assert_eq!(code, 0, "example: {err}");
    let (code, err) = env.run(&["run", "examples/mongo_to_postgres.yaml"]);
    assert_eq!(code, 0, "rerun: {err}");
    let total = psql(
        &env.dwh,
        "SELECT sum(merchants), count(*) FILTER (WHERE category <> 'grocery') FROM merchants_per_city",
    );
    let expected = {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let client = mongodb::Client::with_uri_str(mongo_url()).await.expect("mongo");
            let coll = client.database(&env.mongo_db).collection::<mongodb::bson::Document>("merchants");
            let docs: Vec<mongodb::bson::Document> = {
                use futures::TryStreamExt;
                coll.find(mongodb::bson::Document::new())
                    .await
                    .expect("find")
                    .try_collect()
                    .await
                    .expect("docs")
            };
            docs.iter().filter(|d| d.get_str("category").ok() == Some("grocery")).count()
        })
    };
    assert_eq!(total.trim(), format!("{expected}|0"));
}
