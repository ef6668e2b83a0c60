//! The batch benchmark: `engine run pipelines/dwh.yaml` at N transactions,
//! against the raw path for the same rows measured in the same run: `COPY
//! (SELECT ...) TO` a file from transactional_db plus `COPY ... FROM` that
//! file into an empty copy of fact_transactions. Then the nightly case: 1%
//! of the transactions change, and the incremental run that picks them up is
//! timed as a share of the full load.
//!
//! Usage: `cargo run --release -p bench --bin batch -- [TRANSACTIONS]`
//! (default 1000000). It needs the services of `scripts/services` and a
//! release build of the engine; it uses its own databases (bench_src,
//! bench_dwh) and MongoDB database (bench), never the demo's.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use bench::{fail, psql, wait_with_rss, SERVER};

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.replace('_', "").parse().ok()).unwrap_or(1_000_000);
    let root = bench::root();
    let engine = bench::engine();
    for db in ["bench_src", "bench_dwh"] {
        psql("postgres", &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
        psql("postgres", &format!("CREATE DATABASE {db}"));
    }
    let env = [
        ("SOURCE_DATABASE_URL", format!("{SERVER}/bench_src")),
        ("DWH_DATABASE_URL", format!("{SERVER}/bench_dwh")),
        ("MONGODB_URL", std::env::var("MONGODB_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into())),
        ("MONGODB_DATABASE", "bench".into()),
        ("MONGODB_MERCHANTS", "bench_merchants".into()),
    ];
    let customers = (n / 100).clamp(100, 10_000);
    println!("seeding {n} transactions, {customers} customers, 2000 merchants ...");
    let (secs, _) = run_engine(
        &engine,
        &root,
        &env,
        &[
            "run",
            "pipelines/seed.yaml",
            "--var",
            &format!("transactions={n}"),
            "--var",
            &format!("customers={customers}"),
        ],
    );
    println!("  seeded in {secs:.1}s");
    // Planner statistics, as autovacuum keeps them on a live OLTP database.
    psql("bench_src", "ANALYZE");

    // The raw path: the fact rows out of the source and into an empty copy.
    let file = std::env::temp_dir().join(format!("bench-fact-{}.copy", std::process::id()));
    let file_s = file.to_string_lossy().to_string();
    // The empty copy of fact_transactions, from the warehouse's own
    // migrations (its storage parameters included).
    psql("postgres", "DROP DATABASE IF EXISTS bench_raw WITH (FORCE)");
    psql("postgres", "CREATE DATABASE bench_raw");
    let mut migrations: Vec<PathBuf> = std::fs::read_dir(root.join("migrations/dwh"))
        .unwrap_or_else(|e| fail(&format!("migrations/dwh: {e}")))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    migrations.sort();
    for m in &migrations {
        let sql = std::fs::read_to_string(m).unwrap_or_else(|e| fail(&format!("{}: {e}", m.display())));
        psql("bench_raw", &sql);
    }
    psql("bench_raw", "CREATE TABLE fact_copy (LIKE fact_transactions INCLUDING ALL)");
    psql(
        "bench_raw",
        "DO $$ DECLARE o text; BEGIN SELECT array_to_string(reloptions, ', ') INTO o FROM pg_class \
         WHERE oid = 'fact_transactions'::regclass; IF o IS NOT NULL THEN \
         EXECUTE format('ALTER TABLE fact_copy SET (%s)', o); END IF; END $$",
    );
    let started = Instant::now();
    psql(
        "bench_src",
        &format!(
            "COPY (SELECT transaction_id, customer_id AS customer_key, 0 AS merchant_key, \
             to_char(created_at, 'YYYYMMDD')::int AS date_key, amount, currency, status, created_at \
             FROM transactions) TO '{file_s}'"
        ),
    );
    let out_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    psql("bench_raw", &format!("COPY fact_copy FROM '{file_s}'"));
    let in_secs = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&file);
    let raw = out_secs + in_secs;

    // The engine: the whole warehouse pipeline into the empty warehouse.
    let (engine_secs, rss_kib) = run_engine(&engine, &root, &env, &["run", "pipelines/dwh.yaml"]);
    let facts: u64 = psql("bench_dwh", "SELECT count(*) FROM fact_transactions").trim().parse().unwrap_or(0);
    if facts != n {
        fail(&format!("the warehouse holds {facts} facts, expected {n}"));
    }

    // The nightly case: 1% of the transactions change (every hundredth),
    // and a plain run loads them.
    let started = Instant::now();
    psql(
        "bench_src",
        "UPDATE transactions SET amount = amount + 1, updated_at = now() WHERE transaction_id % 100 = 0",
    );
    psql("bench_src", "ANALYZE transactions");
    let changed = n / 100;
    println!("  changed {changed} transactions in {:.1}s", started.elapsed().as_secs_f64());
    let xid = psql("bench_dwh", "SELECT txid_current() % 4294967296").trim().to_string();
    let (nightly_secs, nightly_rss, summary) =
        run_engine_summary(&engine, &root, &env, &["run", "pipelines/dwh.yaml"]);
    // Where the nightly run's time went: the engine's own table of nodes.
    for line in summary.lines().take_while(|l| !l.trim().is_empty()) {
        println!("    {line}");
    }
    let moved: u64 = psql(
        "bench_dwh",
        &format!("SELECT count(*) FROM fact_transactions WHERE xmin::text::bigint > {xid}"),
    )
    .trim()
    .parse()
    .unwrap_or(0);
    if moved < changed {
        fail(&format!("the incremental run rewrote {moved} facts, expected at least {changed}"));
    }

    println!();
    println!("transactions                 {n}");
    println!("raw COPY out + COPY in       {raw:.2} s  ({out_secs:.2} + {in_secs:.2})");
    println!("engine run pipelines/dwh     {engine_secs:.2} s");
    println!("engine rows/s                {:.0}", n as f64 / engine_secs);
    println!("ratio engine / raw           {:.2}  (target <= 1.5)", engine_secs / raw);
    println!("engine peak RSS              {:.0} MiB  (target < 1024)", rss_kib as f64 / 1024.0);
    println!("nightly: 1% changed          {changed} transactions, {moved} facts rewritten");
    println!(
        "nightly incremental run      {nightly_secs:.2} s  ({:.0} MiB peak RSS)",
        nightly_rss as f64 / 1024.0
    );
    println!("nightly / full load          {:.1}%  (target <= 5%)", nightly_secs / engine_secs * 100.0);
}

/// Runs the engine; returns its wall time and peak RSS (KiB).
fn run_engine(engine: &PathBuf, root: &PathBuf, env: &[(&str, String)], args: &[&str]) -> (f64, i64) {
    let (secs, rss, _) = run_engine_summary(engine, root, env, args);
    (secs, rss)
}

/// Runs the engine; returns its wall time, peak RSS (KiB) and its summary
/// table (stderr).
fn run_engine_summary(
    engine: &PathBuf,
    root: &PathBuf,
    env: &[(&str, String)],
    args: &[&str],
) -> (f64, i64, String) {
    let started = Instant::now();
    let mut cmd = Command::new(engine);
    cmd.current_dir(root).args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Reaped by wait4 below, which also reports the child's own peak memory.
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().unwrap_or_else(|e| fail(&format!("cannot start the engine: {e}")));
    let (status, rss) = wait_with_rss(child.id() as i32);
    let secs = started.elapsed().as_secs_f64();
    let mut err = String::new();
    if let Some(mut e) = child.stderr {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    if status != 0 {
        fail(&format!("engine {} failed:\n{err}", args.join(" ")));
    }
    (secs, rss, err)
}
