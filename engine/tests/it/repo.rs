//! Every pipeline and example in the repository validates, as a new user
//! would run it: from the repository root, with no `.env` and no variables.

use std::fs;

use super::{engine, repo_dir, text};

fn specs(folder: &str) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(repo_dir().join(folder))
        .expect("folder exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| format!("{folder}/{}", p.file_name().unwrap_or_default().to_string_lossy()))
        .collect();
    out.sort();
    out
}

#[test]
fn pipelines_and_examples_validate() {
    let mut all = specs("pipelines");
    for required in
        ["pipelines/dwh.yaml", "pipelines/seed.yaml", "pipelines/fraud.yaml", "pipelines/producer.yaml"]
    {
        assert!(all.iter().any(|s| s == required), "{required} is missing");
    }
    all.extend(specs("examples"));
    let tmp = tempdir();
    // Copy nothing: run from a folder with no .env, naming the specs absolutely.
    let args: Vec<String> = all.iter().map(|s| repo_dir().join(s).to_string_lossy().to_string()).collect();
    let mut argv = vec!["validate"];
    argv.extend(args.iter().map(String::as_str));
    let out = engine(&tmp, &argv);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().filter(|l| l.starts_with("ok: ")).count(), all.len());
}

#[test]
fn fraud_rules_check_against_the_stream_schema() {
    let out =
        engine(&repo_dir(), &["rules", "check", "rules/fraud", "--schema-from", "pipelines/fraud.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("ok: 7 rules in 7 files"), "{}", text(&out.stdout));
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("engine-it-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn spec_tests_of_pipelines_examples_and_golden_specs_pass() {
    let mut args = vec!["test".to_string()];
    args.extend(specs("pipelines"));
    args.extend(specs("examples"));
    args.push("engine/tests/golden/ok_stream_rules.yaml".into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = engine(&repo_dir(), &argv);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.trim_end().ends_with("13 passed, 0 failed"), "{stdout}");
}

#[test]
fn a_wrong_expectation_fails_engine_test() {
    let dir = tempdir().join("wrong");
    fs::create_dir_all(&dir).expect("dir");
    fs::write(
        dir.join("t.yaml"),
        "version: 1\nname: t\nsources:\n  nums: { type: generate, rows: 3, columns: { id: n } }\ntransforms:\n  big:\n    sql: SELECT id FROM nums WHERE id > 1\nsinks:\n  out: { input: big, type: stdout }\ntests:\n  - name: wrong on purpose\n    given:\n      nums: [ { id: 1 }, { id: 2 }, { id: 3 } ]\n    expect:\n      big: { rows: [ { id: 2 } ] }\n",
    )
    .expect("write");
    let out = engine(&dir, &["test", "t.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            "FAILED: t.yaml: wrong on purpose\n    'big': expected 1 rows, got 2: [{\"id\":2}, {\"id\":3}]"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("0 passed, 1 failed"), "{stdout}");
}
