//! The warehouse pipeline end to end on real PostgreSQL and a MongoDB-wire
//! server, at a small size: seed, load, compare with the sources, rerun,
//! incremental rerun.

use std::collections::HashMap;

use super::postgres::{database, psql, server};
use super::{engine_env, repo_dir, text};

fn mongo_url() -> String {
    std::env::var("ENGINE_TEST_MONGODB").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".to_string())
}

/// One test's databases. Each test also has its own merchants collection:
/// a MongoDB-wire server may share collections between databases (PoloDB
/// does), and tests run in parallel.
struct Env {
    src: String,
    dwh: String,
    mongo_db: String,
    merchants: String,
}

impl Env {
    fn new(name: &str) -> Self {
        let src = database(&format!("{name}_src"));
        let dwh = database(&format!("{name}_dwh"));
        let pid = std::process::id();
        Env {
            src,
            dwh,
            mongo_db: format!("engine_it_{name}_{pid}"),
            // Never a name an earlier run used: process ids come round again.
            merchants: format!("merchants_{name}_{}", super::unique()),
        }
    }

    fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SOURCE_DATABASE_URL", format!("{}/{}", server(), self.src)),
            ("DWH_DATABASE_URL", format!("{}/{}", server(), self.dwh)),
            ("MONGODB_URL", mongo_url()),
            ("MONGODB_DATABASE", self.mongo_db.clone()),
            ("MONGODB_MERCHANTS", self.merchants.clone()),
        ]
    }

    fn run(&self, args: &[&str]) -> (i32, String) {
        let vars = self.vars();
        let env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = engine_env(&repo_dir(), args, &env);
        (out.status.code().unwrap_or(-1), text(&out.stderr))
    }

    fn seed(&self, customers: u32, merchants: u32, transactions: u32) {
        let (c, m, t) = (
            format!("customers={customers}"),
            format!("merchants={merchants}"),
            format!("transactions={transactions}"),
        );
        let (code, err) = self.run(&["run", "pipelines/seed.yaml", "--var", &c, "--var", &m, "--var", &t]);
        assert_eq!(code, 0, "seed: {err}");
    }

    /// Runs the warehouse pipeline, which must succeed.
    fn load(&self, what: &str) {
        let (code, err) = self.run(&["run", "pipelines/dwh.yaml"]);
        assert_eq!(code, 0, "{what}: {err}");
    }

    /// The seed's two sample queries over the warehouse equal the sources' truth.
    fn assert_totals_match(&self) {
        let (src_cats, src_names) = source_totals(self);
        let (dwh_cats, dwh_names) = warehouse_totals(self);
        assert_eq!(dwh_cats, src_cats);
        assert_eq!(dwh_names, src_names);
    }

    /// Runs `f` on this test's merchants collection.
    fn mongo<F, T>(&self, f: impl FnOnce(mongodb::Collection<mongodb::bson::Document>) -> F) -> T
    where
        F: std::future::Future<Output = T>,
    {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let client = mongodb::Client::with_uri_str(mongo_url()).await.expect("mongo");
            f(client.database(&self.mongo_db).collection(&self.merchants)).await
        })
    }
}

/// category -> total, and first_name -> total, computed from the sources.
fn source_totals(env: &Env) -> (HashMap<String, String>, HashMap<String, String>) {
    let categories: HashMap<String, String> = env.mongo(|coll| async move {
        use futures::TryStreamExt;
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
    env.seed(300, 400, 20000);
    env.load("dwh");
    env.assert_totals_match();
    let (dwh_cats, _) = warehouse_totals(&env);
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
    env.load("rerun");
    assert_eq!(psql(&env.dwh, "SELECT count(*), sum(amount) FROM fact_transactions"), before);

    // 100 updated source rows move exactly those rows: only they get a new
    // row version in the warehouse.
    psql(
        &env.src,
        "UPDATE transactions SET amount = amount + 1, updated_at = now() WHERE transaction_id <= 100",
    );
    let xid = psql(&env.dwh, "SELECT txid_current() % 4294967296").trim().to_string();
    env.load("incremental");
    let moved = psql(&env.dwh, &format!("SELECT count(*), min(transaction_id), max(transaction_id) FROM fact_transactions WHERE xmin::text::bigint > {xid}"));
    assert_eq!(moved.trim(), "100|1|100");
    env.assert_totals_match();
}

#[test]
fn a_run_killed_mid_load_leaves_the_warehouse_as_it_was() {
    let env = Env::new("kill");
    env.seed(500, 200, 300000);
    env.load("first load");
    let before = psql(&env.dwh, "SELECT count(*), sum(amount) FROM fact_transactions");
    let marks = psql(&env.dwh, "SELECT node, watermark FROM etl_state ORDER BY node");

    // Every source row changes, so the next run has all of them to load.
    psql(&env.src, "UPDATE transactions SET amount = amount + 1, updated_at = now()");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_engine"))
        .current_dir(repo_dir())
        .args(["run", "pipelines/dwh.yaml"])
        .envs(env.vars())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("engine starts");
    let watch = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND (query LIKE 'COPY %' OR query LIKE 'INSERT INTO %fact_transactions%') AND pid <> pg_backend_pid()",
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
    // The history shows the killed run as started and never ended.
    assert_eq!(
        psql(&env.dwh, "SELECT status, finished_at IS NULL FROM etl_runs ORDER BY started_at"),
        "success|f\nrunning|t\n"
    );

    env.load("run after the kill");
    env.assert_totals_match();
}

#[test]
fn quarantined_rows_land_in_the_quarantine_table_with_their_reason() {
    let env = Env::new("quarantine");
    env.seed(50, 20, 1000);
    // Three transactions from the future fail `not_in_future` (quarantine, at most 0.1% = 1 row).
    psql(
        &env.src,
        "UPDATE transactions SET created_at = now() + interval '10 days' WHERE transaction_id IN (1, 2, 3)",
    );
    let (code, err) = env.run(&["run", "pipelines/dwh.yaml"]);
    assert_eq!(code, 1, "3 rows are past max_failures, so the check fails: {err}");
    assert!(err.contains("a check failed; nothing was written"), "{err}");
    assert_eq!(psql(&env.dwh, "SELECT count(*) FROM fact_transactions").trim(), "0");
    // Nothing written means the quarantine table too; the run's record keeps
    // the failed check with its sample rows.
    assert_eq!(psql(&env.dwh, "SELECT count(*) FROM etl_rejects").trim(), "0");
    let failed = psql(
        &env.dwh,
        "SELECT status, exit_code, c->>'check', c->>'failing_rows' \
         FROM etl_runs, jsonb_array_elements(failed_checks) AS c",
    );
    assert_eq!(failed, "check_failed|1|not_in_future|3\n");
    // One bad row is within max_failures: it is quarantined and the rest loads.
    psql(
        &env.src,
        "UPDATE transactions SET created_at = now() - interval '1 day' WHERE transaction_id IN (2, 3)",
    );
    env.load("load");
    assert_eq!(psql(&env.dwh, "SELECT count(*) FROM fact_transactions").trim(), "999");
    assert_eq!(psql(&env.dwh, "SELECT count(*) FROM fact_transactions WHERE transaction_id = 1").trim(), "0");
    let rejects =
        psql(&env.dwh, "SELECT node, check_name, reason, row_data->>'transaction_id' FROM etl_rejects");
    assert_eq!(rejects, "transactions|not_in_future|not_in_future is not true|1\n");
    let runs = psql(
        &env.dwh,
        "SELECT status, exit_code, nodes->'transactions'->>'quarantined' FROM etl_runs ORDER BY started_at",
    );
    assert_eq!(runs, "check_failed|1|3\nsuccess|0|1\n");
}

#[test]
fn the_mongo_to_postgres_example_runs() {
    let env = Env::new("example");
    env.seed(10, 300, 10);
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
            let coll = client.database(&env.mongo_db).collection::<mongodb::bson::Document>(&env.merchants);
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

#[test]
fn a_missing_merchants_collection_fails_the_run_and_loads_nothing() {
    let env = Env::new("missing");
    env.seed(20, 20, 500);
    let absent = Env { merchants: format!("{}_absent", env.merchants), ..env };
    let (code, err) = absent.run(&["run", "pipelines/dwh.yaml"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&format!("collection '{}' does not exist", absent.merchants)), "{err}");
    assert!(err.contains("source 'merchants'"), "{err}");
    assert_eq!(psql(&absent.dwh, "SELECT count(*) FROM fact_transactions").trim(), "0");
    assert_eq!(psql(&absent.dwh, "SELECT count(*) FROM etl_state").trim(), "0");
    // The failure is in the run history, with its exit code.
    let run = psql(&absent.dwh, "SELECT status, exit_code, error LIKE '%does not exist%' FROM etl_runs");
    assert_eq!(run, "failed|3|t\n");
}

#[test]
fn a_merchant_arriving_late_gets_its_sales_on_the_next_plain_run() {
    let env = Env::new("late");
    // 400 merchants in MongoDB; transactions also name M000401 and M000402.
    env.seed(100, 400, 5000);
    env.load("load");
    let late = psql(&env.src, "SELECT count(*) FROM transactions WHERE merchant_id = 'M000401'");
    assert_ne!(late.trim(), "0", "the seed names M000401");
    assert_eq!(
        psql(&env.dwh, "SELECT category, is_inferred FROM dim_merchant WHERE merchant_id = 'M000401'"),
        "unknown|t\n"
    );
    env.mongo(|c| async move {
        let doc = mongodb::bson::doc! { "merchant_id": "M000401", "name": "Late Arrival Travel", "category": "travel" };
        c.insert_one(doc).await.expect("insert");
    });
    env.load("load");
    assert_eq!(
        psql(&env.dwh, "SELECT category, is_inferred FROM dim_merchant WHERE merchant_id = 'M000401'"),
        "travel|f\n"
    );
    env.assert_totals_match();
}

#[test]
fn a_row_committed_late_inside_the_overlap_is_loaded() {
    let env = Env::new("overlap");
    env.seed(30, 20, 300);
    env.load("load");
    // A customer whose transaction committed after the run read, stamped
    // a minute before the watermark the run stored.
    let mark = psql(&env.dwh, "SELECT watermark FROM etl_state WHERE node = 'customers'");
    psql(
        &env.src,
        &format!(
            "INSERT INTO customers (customer_id, first_name, last_name, email, country, created_at, updated_at) \
             VALUES (100001, 'Late', 'Commit', 'late@example.com', 'PT', now(), \
             CAST('{}' AS timestamptz) - interval '1 minute')",
            mark.trim()
        ),
    );
    env.load("load");
    assert_eq!(psql(&env.dwh, "SELECT first_name FROM dim_customer WHERE customer_id = 100001"), "Late\n");
}

#[test]
fn a_source_that_shrinks_fails_the_volume_check_and_the_history_says_so() {
    let env = Env::new("volume");
    env.seed(40, 100, 500);
    env.load("load");
    let merchants_before = psql(&env.dwh, "SELECT count(*) FROM dim_merchant");
    // 60 of the 100 merchant documents disappear: more than the 50% allowed.
    env.mongo(|c| async move {
        for i in 1..=60 {
            let gone = mongodb::bson::doc! { "merchant_id": format!("M{i:06}") };
            assert_eq!(c.delete_one(gone).await.expect("delete").deleted_count, 1);
        }
    });
    psql(&env.src, "UPDATE transactions SET updated_at = now() WHERE transaction_id <= 10");
    let (code, err) = env.run(&["run", "pipelines/dwh.yaml"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("40 rows, 60% fewer than the last successful run (100)"), "{err}");
    assert_eq!(psql(&env.dwh, "SELECT count(*) FROM dim_merchant"), merchants_before);
    let history = psql(
        &env.dwh,
        "SELECT status, exit_code, (nodes->'merchants'->>'rows_out'), (SELECT count(*) FROM jsonb_array_elements(failed_checks) AS c WHERE c->>'severity' = 'error'), \
                spec_hash <> '', finished_at >= started_at FROM etl_runs ORDER BY started_at",
    );
    assert_eq!(history, "success|0|100|0|t|t\ncheck_failed|1|40|1|t|t\n");
}
