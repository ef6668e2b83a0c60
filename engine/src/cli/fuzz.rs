//! Property tests of everything that reads outside input: the JSON decoder
//! of stream events, the pipeline spec reader, the rule file reader and the
//! PostgreSQL binary COPY decoder. Arbitrary bytes and arbitrary structured
//! values give a value or an error, never a panic, and each input is read
//! within a time bound (a reader that loops on a crafted input fails here,
//! not in production).
//!
//! The normal suite runs a few hundred cases per target. A longer run:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo test -p engine --release fuzz::
//! ```
//!
//! Failing inputs are saved under `engine/proptest-regressions/` and tried
//! first on the next run. Shrinking is off: a case that is too slow stays
//! too slow while it shrinks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use proptest::prelude::*;
use proptest::test_runner::Config;

use crate::connectors::codec::json::{Checks, Decoder, Read};
use crate::connectors::postgres::decode::{self, PgColumn};

/// Cases per target: `PROPTEST_CASES`, or 300.
fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(300);
    Config { cases, max_shrink_iters: 0, ..Config::default() }
}

/// The most one input may take (a debug build on a busy 2-core machine).
const BOUND: Duration = Duration::from_secs(2);

/// Runs `f` on one input and fails the case if it took longer than [`BOUND`].
fn bounded(what: &str, f: impl FnOnce()) -> Result<(), TestCaseError> {
    let started = Instant::now();
    f();
    let took = started.elapsed();
    prop_assert!(took <= BOUND, "{what} took {took:?}");
    Ok(())
}

fn event_schema() -> SchemaRef {
    let f = |n: &str, t: &str, null: bool| {
        Field::new(n, crate::plan::schema::arrow_type(t).expect("a type"), null)
    };
    Arc::new(Schema::new(vec![
        f("id", "int64", false),
        f("small", "int32", true),
        f("amount", "decimal(12,2)", true),
        f("wide", "decimal(38,10)", true),
        f("score", "float64", true),
        f("ok", "bool", true),
        f("day", "date", true),
        f("at", "timestamp", true),
        f("note", "string", true),
    ]))
}

/// A decoder of [`event_schema`] with every check on: size, far-future
/// times, the partition of `id`.
fn decoder() -> Decoder {
    let checks = Checks {
        max_bytes: 1 << 16,
        max_future: Some(Duration::from_secs(300)),
        clamp_future: false,
        partition: Some((0, 4, crate::connectors::redis::partition::of)),
    };
    Decoder::new(event_schema(), checks)
}

fn read() -> Read {
    Read { now_us: 1_780_000_000_000_000, partition: Some(1) }
}

/// JSON number texts, of any size of mantissa and exponent.
fn number() -> impl Strategy<Value = String> {
    proptest::string::string_regex("-?(0|00|[0-9]{1,25})(\\.[0-9]{0,25})?([eE][+-]?[0-9]{1,12})?")
        .expect("a regex")
}

/// Scalars as JSON text: numbers, strings (timestamps, dates, escapes), booleans, null.
fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        number(),
        number().prop_map(|n| format!("\"{n}\"")),
        proptest::string::string_regex("[0-9]{1,6}-[0-9]{1,2}-[0-9]{1,2}(T[0-9:.]{1,20}(Z|[+-][0-9:]{1,6})?)?")
            .expect("a regex")
            .prop_map(|t| format!("\"{t}\"")),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
        Just("true".to_string()),
        Just("false".to_string()),
        Just("null".to_string()),
    ]
}

/// JSON text: scalars, arrays and objects nested, keys mostly the schema's.
fn json_value() -> impl Strategy<Value = String> {
    scalar().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec((key(), inner), 0..8).prop_map(|kv| object(&kv)),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(vec!["id", "small", "amount", "wide", "score", "ok", "day", "at", "note"])
            .prop_map(str::to_string),
        any::<String>(),
    ]
}

fn object(kv: &[(String, String)]) -> String {
    let fields: Vec<String> =
        kv.iter().map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap_or_default())).collect();
    format!("{{{}}}", fields.join(","))
}

/// An event: an object of the schema's keys (some repeated or left out)
/// with any values.
fn event() -> impl Strategy<Value = String> {
    proptest::collection::vec((key(), prop_oneof![scalar(), json_value()]), 0..12).prop_map(|kv| object(&kv))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_json_decoder_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        bounded("decoding arbitrary bytes", || {
            let mut d = decoder();
            let _ = d.push(&bytes, read());
            d.finish().expect("the rows taken make a batch");
        })?;
    }

    #[test]
    fn the_json_decoder_takes_any_event(text in event()) {
        let shown: String = text.chars().take(200).collect();
        bounded(&format!("decoding {shown}"), || {
            let mut d = decoder();
            let taken = d.push(text.as_bytes(), read()).is_ok();
            let batch = d.finish().expect("the rows taken make a batch");
            assert_eq!(batch.num_rows(), usize::from(taken));
        })?;
    }

    #[test]
    fn the_spec_reader_takes_any_text(text in spec_text()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        bounded("reading and compiling a spec", || {
            let opts = crate::spec::LoadOptions::from_environment(vec![], crate::connectors::registry::catalog());
            // Beside the repository's specs, so that their relative paths resolve.
            let path = repo().join("pipelines/fuzz.yaml");
            if let Ok(spec) = crate::spec::load_str(&path, &text, &opts) {
                let _ = runtime.block_on(crate::rules::analyze::compile(spec));
            }
        })?;
    }

    #[test]
    fn the_rule_reader_takes_any_text(text in rule_text()) {
        let dir = tempfile::tempdir().expect("a folder");
        let file = dir.path().join("rule.yaml");
        std::fs::write(&file, &text).expect("a rule file");
        bounded("reading a rule file", || {
            let _ = crate::spec::rules::load(&[file.clone()]);
        })?;
    }

    #[test]
    fn the_copy_decoder_takes_any_bytes(
        tail in proptest::collection::vec(any::<u8>(), 0..600),
        cut in 0usize..64,
    ) {
        let mut data = b"PGCOPY\n\xff\r\n\0".to_vec();
        data.extend_from_slice(&[0; 8]);
        data.extend_from_slice(&tail);
        bounded("decoding COPY data", || {
            let Ok(mut d) = decode::Decoder::new(&copy_columns(), 4) else { return };
            // In two pieces, as the bytes come off the connection.
            let at = cut.min(data.len());
            if d.push(&data[..at]).is_ok() && d.push(&data[at..]).is_ok() {
                let _ = d.finish();
            }
        })?;
    }

    #[test]
    fn the_numeric_decoder_takes_any_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
        p in 1u8..=38,
        s in 0i8..=20,
    ) {
        bounded("decoding a numeric", || {
            let _ = decode::numeric(&bytes, p, s.min(p as i8));
        })?;
    }
}

/// A column of every type the COPY decoder reads.
fn copy_columns() -> Vec<PgColumn> {
    let c = |name: &str, oid: u32, typmod: i32, type_name: &str| PgColumn {
        name: name.into(),
        oid,
        typmod,
        type_name: type_name.into(),
    };
    vec![
        c("b", 16, -1, "boolean"),
        c("i2", 21, -1, "smallint"),
        c("i4", 23, -1, "integer"),
        c("i8", 20, -1, "bigint"),
        c("f4", 700, -1, "real"),
        c("f8", 701, -1, "double precision"),
        c("n", 1700, ((12 << 16) | 2) + 4, "numeric(12,2)"),
        c("nu", 1700, -1, "numeric"),
        c("t", 25, -1, "text"),
        c("ch", 1042, 7, "character(3)"),
        c("j", 3802, -1, "jsonb"),
        c("u", 2950, -1, "uuid"),
        c("d", 1082, -1, "date"),
        c("ts", 1114, -1, "timestamp"),
        c("tz", 1184, -1, "timestamp with time zone"),
    ]
}

/// Pipeline specs: the repository's own, with bytes changed, cut or added.
fn spec_text() -> impl Strategy<Value = String> {
    let specs: Vec<String> = ["pipelines/dwh.yaml", "pipelines/fraud.yaml", "examples/orders_report.yaml"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(repo().join(p)).ok())
        .collect();
    mutated(specs)
}

/// Rule files: the repository's own, with bytes changed, cut or added.
fn rule_text() -> impl Strategy<Value = String> {
    let rules: Vec<String> = std::fs::read_dir(repo().join("rules/fraud"))
        .map(|d| d.flatten().filter_map(|e| std::fs::read_to_string(e.path()).ok()).collect())
        .unwrap_or_default();
    mutated(rules)
}

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One of `texts` with a few edits (a byte replaced, a span cut, YAML-ish
/// text inserted), or arbitrary text.
fn mutated(texts: Vec<String>) -> BoxedStrategy<String> {
    let texts = if texts.is_empty() { vec![String::new()] } else { texts };
    let insert = prop_oneof![
        any::<String>(),
        Just(": ".to_string()),
        Just("\n  - ".to_string()),
        Just("{{ ".to_string()),
        Just("}}".to_string()),
        Just("[".to_string()),
        Just("{".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        Just("!!binary ".to_string()),
        Just("'".to_string()),
        Just("\"".to_string()),
        Just("\t".to_string()),
        number(),
    ];
    let edit = (any::<prop::sample::Index>(), 0usize..40, insert);
    let edited = (proptest::sample::select(texts), proptest::collection::vec(edit, 1..6)).prop_map(|(text, edits)| {
        let mut bytes = text.into_bytes();
        for (at, cut, insert) in edits {
            let i = at.index(bytes.len() + 1);
            let end = (i + cut).min(bytes.len());
            bytes.splice(i..end, insert.into_bytes());
        }
        String::from_utf8_lossy(&bytes).into_owned()
    });
    prop_oneof![4 => edited, 1 => any::<String>()].boxed()
}
