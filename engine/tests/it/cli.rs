//! The CLI as a user runs it: graphs, exit statuses, variables, `.env`,
//! secrets and the JSON Schema.

use std::fs;

use super::{engine, repo_dir, scratch, text};

#[test]
fn graph_of_the_warehouse_pipeline_in_mermaid_and_dot() {
    let out = engine(&repo_dir(), &["graph", "pipelines/dwh.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let m = text(&out.stdout);
    assert!(m.starts_with("flowchart LR\n"), "{m}");
    assert!(m.contains("  customers[(\"customers<br/>postgres · oltp.customers\")]"), "{m}");
    assert!(m.contains("  merchants[(\"merchants<br/>mongodb · docs.merchants\")]"), "{m}");
    assert!(m.contains("  customers__check_2{{\"check: unique(customer_id)\"}}"), "{m}");
    assert!(m.contains("  fact_transactions_out[/\"fact_transactions_out<br/>postgres · dwh.fact_transactions (upsert)\"/]"), "{m}");
    // fact_transactions reads the checked transactions; dim_merchant reads
    // them too, for the merchants MongoDB does not know yet.
    assert!(m.contains("  transactions__check_5 --> fact_transactions\n"), "{m}");
    assert!(m.contains("  transactions__check_5 --> dim_merchant\n"), "{m}");
    assert!(m.contains("  merchants__check_4 --> dim_merchant\n"), "{m}");
    assert!(m.contains("  merchants__check_4{{\"check: volume(-50%, +..)\"}}"), "{m}");

    let out = engine(&repo_dir(), &["graph", "pipelines/dwh.yaml", "--format", "dot"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let d = text(&out.stdout);
    assert!(d.starts_with("digraph \"dwh\" {"), "{d}");
    assert!(d.contains("\"customers\" [shape=cylinder"), "{d}");
    assert!(d.contains("\"transactions__check_5\" -> \"fact_transactions\";"), "{d}");
    assert!(d.contains("\"dim_customer\" -> \"dim_customer__check_1\";"), "{d}");
}

#[test]
fn exit_statuses_for_bad_input() {
    let out = engine(&repo_dir(), &["validate", "pipelines/nope.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("'pipelines/nope.yaml': No such file"), "{}", text(&out.stderr));

    let out = engine(&repo_dir(), &["validate", "--bogus", "pipelines/dwh.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unexpected argument '--bogus'"), "{}", text(&out.stderr));

    let out = engine(&repo_dir(), &["validate", "pipelines/dwh.yaml", "--var", "novalue"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stderr).trim(), "error: --var 'novalue': expected key=value");

    let out = engine(&repo_dir(), &["graph", "pipelines/dwh.yaml", "--format", "png"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn vars_from_flags_and_env_from_dotenv() {
    let dir = scratch("vars");
    fs::write(
        dir.join("p.yaml"),
        "version: 1\nname: p\nvars: { rows: 10 }\nsources:\n  nums:\n    type: generate\n    rows: \"{{ vars.rows }}\"\n    columns: { id: n, tag: \"'{{ env.ENGINE_DOTENV_PROBE }}'\" }\nsinks:\n  out: { input: nums, type: stdout }\n",
    )
    .expect("write");
    let out = engine(&dir, &["validate", "p.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("p.yaml:8:28: environment variable 'ENGINE_DOTENV_PROBE' is not set"),
        "{}",
        text(&out.stderr)
    );

    fs::write(dir.join(".env"), "ENGINE_DOTENV_PROBE=from-dotenv\n").expect("write");
    let out = engine(&dir, &["validate", "p.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let out = engine(&dir, &["validate", "p.yaml", "--var", "rows=many"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("p.yaml:7:11: source 'nums': expected a whole number"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn secrets_never_printed() {
    let dir = scratch("secrets");
    fs::write(dir.join(".env"), "ENGINE_SECRET_PROBE=hunter2-xyzzy\n").expect("write");
    fs::write(
        dir.join("s.yaml"),
        "version: 1\nname: s\ndescription: \"uses {{ env.ENGINE_SECRET_PROBE }}\"\nconnections:\n  db: { type: postgres, url: \"postgres://app:{{ env.ENGINE_SECRET_PROBE }}@127.0.0.1/x\" }\nsources:\n  t: { connection: db, table: t }\nsinks:\n  out: { input: t, type: stdout }\n",
    )
    .expect("write");
    for args in [&["graph", "s.yaml"][..], &["graph", "s.yaml", "--format", "dot"], &["validate", "s.yaml"]] {
        let out = engine(&dir, args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let all = text(&out.stdout) + &text(&out.stderr);
        assert!(!all.contains("hunter2"), "{args:?} printed the secret: {all}");
    }
    let graph = text(&engine(&dir, &["graph", "s.yaml"]).stdout);
    assert!(graph.contains("%% s: uses ***"), "{graph}");
}

#[test]
fn json_schema_comes_from_the_structs() {
    let out = engine(&repo_dir(), &["schema"]);
    assert_eq!(out.status.code(), Some(0));
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let props = &schema["properties"];
    for key in
        ["version", "name", "connections", "sources", "transforms", "sinks", "quarantine", "state", "tests"]
    {
        assert!(props.get(key).is_some(), "no '{key}' in the schema");
    }
    assert_eq!(props["version"]["description"], "Version of the pipeline language; only `1` exists.");
    let out = engine(&repo_dir(), &["schema", "--rules"]);
    assert!(text(&out.stdout).contains("A SQL boolean expression over the event's columns"));
}

#[test]
fn rules_check_reports_every_broken_file() {
    let crate_dir = super::crate_dir();
    let out = engine(&crate_dir, &["rules", "check", "tests/golden/rules_bad"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("tests/golden/rules_bad/broken.yaml:4:7: rule 'broken': bad 'when' expression:"),
        "{err}"
    );
    let out = engine(&crate_dir, &["rules", "check", "tests/golden/rules_late"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "tests/golden/rules_late/lateness.yaml:5:63: rule 'by_arrival': 'allowed_lateness' needs 'time'"
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "tests/golden/rules_late/lateness.yaml:9:80: rule 'bad_lateness': bad allowed_lateness 'soon'"
        ),
        "{err}"
    );
    let out = engine(&crate_dir, &["rules", "check", "tests/golden/rules_ok"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "ok: 3 rules in 2 files");
}

/// Every command, with a password in each URL form (user info, query
/// string, percent-encoded, read by `file()`), in every connection: the
/// password is in no output, no log line (debug, text and JSON) and no
/// report, although every connection fails and is reported.
#[test]
fn passwords_are_in_no_output_log_or_report() {
    let dir = super::scratch("secrets");
    std::fs::write(dir.join("pg_secret"), "Zx9file\n").expect("secret file");
    let secret_file = dir.join("pg_secret").display().to_string();
    let pg_file = format!("postgres://app:{{{{ file('{secret_file}') }}}}@127.0.0.1:1/db");
    let forms = [
        ("user info", "postgres://app:Zx9userinfo@127.0.0.1:1/db".to_string()),
        ("query string", "postgres://app@127.0.0.1:1/db?sslmode=disable&password=Zx9query".to_string()),
        ("percent-encoded", "postgres://app:Zx9%25pct%40x@127.0.0.1:1/db".to_string()),
    ];
    // file(): the URL is the template itself, in a copy of the spec.
    let dwh = std::fs::read_to_string(repo_dir().join("pipelines/dwh.yaml")).expect("dwh.yaml");
    let templated = dwh
        .replace(
            "{{ env.SOURCE_DATABASE_URL | default('postgres://postgres@127.0.0.1:5432/transactional_db') }}",
            &pg_file,
        )
        .replace(
            "migrations: ../migrations/dwh",
            &format!("migrations: \"{}\"", repo_dir().join("migrations/dwh").display()),
        );
    assert!(templated.contains("file('"), "pipelines/dwh.yaml changed its oltp url");
    std::fs::write(dir.join("dwh_file.yaml"), templated).expect("spec");
    let report = dir.join("report.json");
    let mut runs = 0;
    for (form, url) in forms
        .iter()
        .map(|(f, u)| (*f, u.clone()))
        .chain([("file()", "postgres://app:Zx9env@127.0.0.1:1/db".to_string())])
    {
        let env = [
            ("SOURCE_DATABASE_URL", url.as_str()),
            ("DWH_DATABASE_URL", url.as_str()),
            (
                "MONGODB_URL",
                "mongodb://app:Zx9mongo@127.0.0.1:1/?serverSelectionTimeoutMS=300&connectTimeoutMS=300",
            ),
            ("REDIS_URL", "redis://:Zx9redis@127.0.0.1:1"),
            ("ENGINE_LOG", "debug"),
        ];
        let dwh = if form == "file()" {
            dir.join("dwh_file.yaml").display().to_string()
        } else {
            repo_dir().join("pipelines/dwh.yaml").display().to_string()
        };
        let fraud = repo_dir().join("pipelines/fraud.yaml").display().to_string();
        let report_arg = report.display().to_string();
        let commands: Vec<Vec<&str>> = vec![
            vec!["validate", &dwh, "--connect"],
            vec!["validate", &fraud, "--connect"],
            vec!["graph", &dwh],
            vec!["run", &dwh, "--report", &report_arg],
            vec!["run", &dwh, "--log-format", "json"],
            vec!["stream", &fraud, "--for", "2s"],
            vec!["stream", &fraud, "--for", "2s", "--log-format", "json"],
        ];
        for args in commands {
            let _ = std::fs::remove_file(&report);
            let out = super::engine_env(&dir, &args, &env);
            runs += 1;
            let all = format!(
                "{}{}{}",
                text(&out.stdout),
                text(&out.stderr),
                std::fs::read_to_string(&report).unwrap_or_default()
            );
            assert!(!all.contains("Zx9"), "{form}: `engine {}` shows a password:\n{all}", args.join(" "));
            if args[0] != "graph" {
                assert_ne!(
                    out.status.code(),
                    Some(0),
                    "{form}: `engine {}` reached nothing:\n{all}",
                    args.join(" ")
                );
                assert!(
                    all.contains("***") || all.contains("127.0.0.1:1"),
                    "{form}: the failure is reported:\n{all}"
                );
            }
        }
    }
    assert_eq!(runs, 28);
}

/// What an editor with `engine schema` shows: every spec and rule file of
/// the repository (pipelines, examples, golden `ok_*` specs, rule files) is
/// valid against the schema, checked by a JSON Schema validator.
#[test]
fn every_spec_and_rule_file_is_valid_against_engine_schema() {
    let schema = |args: &[&str]| -> serde_json::Value {
        let out = engine(&repo_dir(), args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("the schema is JSON")
    };
    let pipelines = jsonschema::validator_for(&schema(&["schema"])).expect("a valid JSON Schema");
    let rules = jsonschema::validator_for(&schema(&["schema", "--rules"])).expect("a valid JSON Schema");
    let mut files: Vec<(std::path::PathBuf, bool)> = Vec::new();
    for (dir, is_rules) in [
        ("pipelines", false),
        ("examples", false),
        ("engine/tests/golden", false),
        ("rules/fraud", true),
        ("bench/stream/rules", true),
        ("engine/tests/golden/rules_ok", true),
    ] {
        for e in fs::read_dir(repo_dir().join(dir)).expect("dir").flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.ends_with(".yaml")
                && (is_rules || dir != "engine/tests/golden" || name.starts_with("ok_"))
            {
                files.push((e.path(), is_rules));
            }
        }
    }
    assert!(files.len() >= 30, "{} files", files.len());
    let mut problems = Vec::new();
    for (path, is_rules) in &files {
        let doc: serde_json::Value =
            serde_norway::from_str(&fs::read_to_string(path).expect("read")).expect("YAML");
        let v = if *is_rules { &rules } else { &pipelines };
        for e in v.iter_errors(&doc) {
            problems.push(format!("{}: {} at {}", path.display(), e, e.instance_path));
        }
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    // And it still refuses what the engine refuses.
    for bad in [
        "version: 1\nname: x\nsources:\n  a: { type: generate, rows: ten, columns: { id: n } }\n",
        "version: 1\nname: x\nsources:\n  a: { type: generate, rows: 3, columns: { id: n }, checks: [ { unique: 5 } ] }\n",
        "version: 1\nname: x\nsources:\n  a: { type: generate, rows: 3, colums: { id: n } }\n",
    ] {
        let doc: serde_json::Value = serde_norway::from_str(bad).expect("YAML");
        assert!(!pipelines.is_valid(&doc), "the schema takes:\n{bad}");
    }
}

/// `engine schema | head`: a reader that stops early ends the output
/// quietly, as command-line tools do, not with a panic.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_engine"))
        .arg("schema")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("engine runs");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("engine exits");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}
