//! Golden specs in `tests/golden/`:
//! - `error_*.yaml` start with `# error: ...` lines: exactly the errors
//!   `engine validate` must print, in order (`$FILE` stands for the file).
//! - `ok_*.yaml` must validate; their Mermaid graph is kept in `ok_*.mmd`
//!   (`UPDATE_GOLDEN=1` rewrites those).

use std::fs;
use std::path::PathBuf;

use super::{crate_dir, engine, text};

fn golden(prefix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(crate_dir().join("tests/golden"))
        .expect("tests/golden exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with(prefix) && name.ends_with(".yaml")
        })
        .collect();
    files.sort();
    files
}

#[test]
fn error_specs_print_exactly_their_errors() {
    let files = golden("error_");
    assert!(files.len() >= 15, "expected at least 15 error specs, found {}", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(crate_dir()).expect("inside the crate");
        let rel_str = rel.to_string_lossy().to_string();
        let source = fs::read_to_string(path).expect("readable");
        let expected: Vec<String> = source
            .lines()
            .take_while(|l| l.starts_with("# error: "))
            .map(|l| l["# error: ".len()..].replace("$FILE", &rel_str))
            .collect();
        assert!(!expected.is_empty(), "{rel_str}: the first line must be '# error: <message>'");
        let out = engine(&crate_dir(), &["validate", &rel_str]);
        let stderr = text(&out.stderr);
        let got: Vec<String> = stderr
            .lines()
            .filter(|l| !l.ends_with(" error") && !l.ends_with(" errors") && !l.contains(": warning: "))
            .map(str::to_string)
            .collect();
        if out.status.code() != Some(2) || got != expected {
            failures.push(format!(
                "{rel_str}: exit {:?}\n  expected:\n    {}\n  got:\n    {}",
                out.status.code(),
                expected.join("\n    "),
                got.join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn ok_specs_validate_and_keep_their_graph() {
    let files = golden("ok_");
    assert!(!files.is_empty());
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for path in &files {
        let rel = path.strip_prefix(crate_dir()).expect("inside the crate").to_string_lossy().to_string();
        let out = engine(&crate_dir(), &["validate", &rel]);
        assert_eq!(out.status.code(), Some(0), "{rel}: {}", text(&out.stderr));
        let graph = engine(&crate_dir(), &["graph", &rel]);
        assert_eq!(graph.status.code(), Some(0), "{rel}: {}", text(&graph.stderr));
        let snapshot = path.with_extension("mmd");
        let got = text(&graph.stdout);
        if update {
            fs::write(&snapshot, &got).expect("writable");
        }
        let want = fs::read_to_string(&snapshot)
            .unwrap_or_else(|_| panic!("{}: missing; run with UPDATE_GOLDEN=1", snapshot.display()));
        assert_eq!(got, want, "{rel}: graph differs from {}", snapshot.display());
    }
}
