//! `engine run` on pipelines that need no service: files in, SQL and checks,
//! files out.

use std::fs;

use super::{engine, repo_dir, scratch, text};

/// The example copied to a scratch folder, so runs do not write into the repo.
fn example_copy(name: &str) -> std::path::PathBuf {
    let dir = scratch(name);
    fs::create_dir_all(dir.join("data")).expect("data dir");
    fs::copy(repo_dir().join("examples/orders_report.yaml"), dir.join("orders_report.yaml"))
        .expect("copy spec");
    fs::copy(repo_dir().join("examples/data/orders.csv"), dir.join("data/orders.csv")).expect("copy data");
    dir
}

#[test]
fn the_no_service_example_runs_and_writes_its_files() {
    let dir = example_copy("example");
    let report = dir.join("report.json");
    let out = engine(&dir, &["run", "orders_report.yaml", "--report", report.to_str().unwrap_or_default()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let csv = fs::read_to_string(dir.join("out/revenue_by_country.csv")).expect("csv written");
    assert_eq!(csv, "country,orders,revenue\nFR,1,410.00\nES,1,260.00\nPT,2,135.75\nGB,1,35.00\n");
    assert!(dir.join("out/revenue_by_country.parquet").is_file());
    // The preview table on stdout, the summary on stderr.
    assert!(text(&out.stdout).contains("| PT      | 2      | 135.75  |"), "{}", text(&out.stdout));
    assert!(stderr.contains("revenue_by_country"), "{stderr}");
    // The warn check on missing amounts failed but did not stop the run.
    let r: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&report).expect("report")).expect("json");
    assert_eq!(r["status"], "ok");
    let warn = r["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["kind"] == "not_null" && c["severity"] == "warn")
        .expect("warn check");
    assert_eq!(warn["passed"], false);
    assert_eq!(warn["failing_rows"], 1);
    assert_eq!(warn["samples"][0]["order_id"], 5);
    let orders =
        r["nodes"].as_array().expect("nodes").iter().find(|n| n["node"] == "orders").expect("orders");
    assert_eq!(orders["rows_out"], 8);
}

#[test]
fn a_failing_error_check_exits_1_and_writes_nothing() {
    let dir = example_copy("failing");
    let mut csv = fs::read_to_string(dir.join("data/orders.csv")).expect("csv");
    csv.push_str("3,zed,DE,1.00,paid,2026-03-05T10:00:00Z\n");
    fs::write(dir.join("data/orders.csv"), csv).expect("write");
    let out = engine(&dir, &["run", "orders_report.yaml"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("orders  unique    error     2 rows: duplicate order_id"), "{stderr}");
    assert!(stderr.contains("a check failed; nothing was written"), "{stderr}");
    assert!(!dir.join("out").exists(), "a sink wrote despite the failed check");
}

#[test]
fn dry_run_checks_everything_and_writes_nothing() {
    let dir = example_copy("dry");
    let out = engine(&dir, &["run", "orders_report.yaml", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!dir.join("out").exists());
}

#[test]
fn select_runs_a_node_and_its_inputs_only() {
    let dir = example_copy("select");
    let out = engine(&dir, &["run", "orders_report.yaml", "--select", "report_csv"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(dir.join("out/revenue_by_country.csv").is_file());
    assert!(!dir.join("out/revenue_by_country.parquet").exists());
    let out = engine(&dir, &["run", "orders_report.yaml", "--select", "report_cvs"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--select: unknown node 'report_cvs'; did you mean 'report_csv'?"));
}

#[test]
fn generate_sources_are_deterministic_for_a_seed() {
    let dir = scratch("generate");
    let spec = "version: 1\nname: g\nsources:\n  nums:\n    type: generate\n    rows: 1000\n    seed: 9\n    columns:\n      id: n\n      x: uniform_int(1, 6)\n      who: fake('first_name')\n      coin: chance(0.5)\n    checks:\n      - range: { column: x, min: 1, max: 6 }\n      - unique: id\nsinks:\n  out: { input: nums, type: file, path: out.csv, format: csv }\n";
    fs::write(dir.join("g.yaml"), spec).expect("write");
    let first = engine(&dir, &["run", "g.yaml"]);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let a = fs::read_to_string(dir.join("out.csv")).expect("out");
    assert_eq!(engine(&dir, &["run", "g.yaml"]).status.code(), Some(0));
    let b = fs::read_to_string(dir.join("out.csv")).expect("out");
    assert_eq!(a, b);
    assert_eq!(a.lines().count(), 1001);
    let sixes = a.lines().skip(1).filter(|l| l.split(',').nth(1) == Some("6")).count();
    assert!((100..250).contains(&sixes), "uniform_int(1, 6) gave {sixes} sixes in 1000 rows");
}
