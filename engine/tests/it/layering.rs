//! The engine's layers import only downward. Each top-level module of
//! `src/` has a rank; a `crate::x` path in a module may name only modules of
//! a lower rank (or its own). Modules of one rank (`run` and `stream`) do not
//! use each other. The test reads every path that starts with `crate::`, in
//! `use` lines and inline, so a new upward import fails here with its file
//! and line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::crate_dir;

/// Bottom to top. `error` is the vocabulary every layer speaks.
const LAYERS: &[(&str, u8)] = &[
    ("error", 0),
    ("spec", 1),
    ("plan", 2),
    ("transform", 3),
    ("rules", 4),
    ("connectors", 5),
    ("run", 6),
    ("stream", 6),
    ("cli", 7),
];

fn rank(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/rules/eval.rs` -> `rules`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component").as_os_str().to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The modules named by `crate::` paths in code (comments already left out),
/// grouped ones (`crate::{a::X, b}`) included.
fn named_modules(code: &str) -> Vec<String> {
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::` or `other_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        out.push(ident(&group[j..]));
                        start = false;
                    }
                    _ => {}
                }
            }
            continue;
        }
        let name = ident(rest);
        if !name.is_empty() {
            out.push(name);
        }
    }
    out.retain(|n| !n.is_empty() && n != "self");
    out
}

/// A file's text without `//` comments, lines kept so that byte offsets
/// map back to line numbers.
fn code_lines(text: &str) -> Vec<&str> {
    text.lines().map(|l| l.split("//").next().unwrap_or_default()).collect()
}

/// Every import of one module by another: (from, to) -> first `file:line`.
fn imports() -> BTreeMap<(String, String), String> {
    let src = crate_dir().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut out = BTreeMap::new();
    for file in files {
        let from = module_of(&src, &file);
        let text = std::fs::read_to_string(&file).expect("readable source");
        let lines = code_lines(&text);
        for (n, line) in lines.iter().enumerate() {
            // A grouped import may run over several lines: read on to its `}`.
            let mut code = line.to_string();
            if line.contains("crate::{") {
                for more in lines.iter().skip(n + 1) {
                    if code.contains('}') {
                        break;
                    }
                    code.push_str(more);
                }
            }
            for to in named_modules(&code) {
                if to != from {
                    let at =
                        format!("{}:{}", file.strip_prefix(crate_dir()).unwrap_or(&file).display(), n + 1);
                    out.entry((from.clone(), to)).or_insert(at);
                }
            }
        }
    }
    out
}

#[test]
fn no_module_imports_a_layer_above_its_own() {
    let mut climbing = Vec::new();
    for ((from, to), at) in imports() {
        let (Some(a), Some(b)) = (rank(&from), rank(&to)) else {
            // lib.rs and main.rs sit above every layer; a module not in the
            // table must be given a rank before anything may use it.
            if rank(&from).is_some() {
                climbing.push(format!("{at}: '{from}' uses '{to}', which has no layer in LAYERS"));
            }
            continue;
        };
        if b >= a {
            climbing.push(format!("{at}: '{from}' (layer {a}) uses '{to}' (layer {b})"));
        }
    }
    assert!(climbing.is_empty(), "imports that climb or cross:\n{}", climbing.join("\n"));
}

#[test]
fn every_module_has_a_layer() {
    let src = crate_dir().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut missing: Vec<String> = files
        .iter()
        .map(|f| module_of(&src, f))
        .filter(|m| m != "lib" && m != "main" && rank(m).is_none())
        .collect();
    missing.sort();
    missing.dedup();
    assert!(missing.is_empty(), "modules with no layer: {missing:?}");
}

#[test]
fn the_scan_sees_inline_paths_and_skips_comments() {
    assert_eq!(named_modules("    let x = crate::stream::session();"), vec!["stream"]);
    assert_eq!(named_modules("use crate::{error::Error, spec::{a, b}, run};"), vec!["error", "spec", "run"]);
    assert_eq!(code_lines("let a = 1; // crate::run is mentioned"), vec!["let a = 1; "]);
    assert_eq!(named_modules("$crate::x and other_crate::y"), Vec::<String>::new());
}
