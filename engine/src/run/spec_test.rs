//! `engine test`: the `tests:` of a spec. Each test replaces the named
//! sources with its rows, runs the nodes it looks at in memory (no
//! connection opened, no sink written) and compares their outputs.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::json::ReaderBuilder;
use datafusion::arrow::record_batch::RecordBatch;
use serde_json::Value;

use super::{run_collect, RunOptions};
use crate::connectors::codec::json_values;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::spec::model::SpecTest;

/// The outcome of one test.
#[derive(Debug)]
pub struct TestResult {
    pub name: String,
    /// Empty when the test passed.
    pub failures: Vec<String>,
}

pub async fn run_all(plan: &Plan) -> Vec<TestResult> {
    let mut out = Vec::new();
    for t in &plan.spec.pipeline.tests {
        let failures = match run_one(plan, t).await {
            Ok(f) => f,
            Err(e) => vec![plan.spec.secrets.scrub(&e.to_string())],
        };
        out.push(TestResult { name: t.name.clone(), failures });
    }
    out
}

async fn run_one(plan: &Plan, t: &SpecTest) -> Result<Vec<String>> {
    let mut given = HashMap::new();
    for (source, rows) in &t.given {
        let rows: Vec<Value> = rows.iter().map(|r| r.0.clone()).collect();
        let schema = plan.schemas.get(source.value()).cloned();
        let batch = to_batch(&rows, schema)
            .map_err(|e| Error::Usage(format!("test '{}': given '{}': {e}", t.name, source.value())))?;
        given.insert(source.value().clone(), batch);
    }
    let nodes: Vec<String> = t.expect.keys().map(|k| k.value().clone()).collect();
    let opts = RunOptions {
        select: nodes.clone(),
        dry_run: true,
        full_refresh: false,
        progress: false,
        given: Some(given),
        run_id: None,
    };
    let (report, outputs) = run_collect(plan, &opts, &nodes).await;
    let outputs = outputs?;
    let mut failures = Vec::new();
    for (node, e) in &t.expect {
        let node = node.value();
        let rows = match outputs.get(node) {
            Some(b) => {
                json_values(b).map_err(|e| Error::Internal(format!("test '{}': '{node}': {e}", t.name)))?
            }
            None => vec![],
        };
        if let Some(n) = e.count {
            if rows.len() as u64 != n {
                failures.push(format!("'{node}': expected {n} rows, got {}", rows.len()));
            }
        }
        if let Some(expected) = &e.rows {
            let expected: Vec<Value> = expected.iter().map(|r| r.0.clone()).collect();
            if let Some(f) = compare(&expected, &rows) {
                failures.push(format!("'{node}': {f}"));
            }
        }
        if let Some(check) = &e.fails_check {
            let failed = report
                .checks
                .iter()
                .any(|c| c.node == *node && (c.check == *check || c.kind == *check) && !c.passed);
            if !failed {
                failures.push(format!("'{node}': expected check '{check}' to fail, but it passed"));
            }
        }
    }
    Ok(failures)
}

/// Rows as a batch: with the source's schema when known, else inferred
/// (strings that are all RFC 3339 times become timestamps).
fn to_batch(rows: &[Value], schema: Option<SchemaRef>) -> std::result::Result<RecordBatch, String> {
    let schema = match schema {
        Some(s) => s,
        None => infer(rows)?,
    };
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let reader = ReaderBuilder::new(schema.clone())
        .build(Cursor::new(text.into_bytes()))
        .map_err(|e| e.to_string())?;
    let batches: Vec<RecordBatch> =
        reader.collect::<std::result::Result<_, _>>().map_err(|e| e.to_string())?;
    datafusion::arrow::compute::concat_batches(&schema, &batches).map_err(|e| e.to_string())
}

fn infer(rows: &[Value]) -> std::result::Result<SchemaRef, String> {
    let inferred =
        datafusion::arrow::json::reader::infer_json_schema_from_iterator(rows.iter().map(|r| Ok(r.clone())))
            .map_err(|e| e.to_string())?;
    let fields: Vec<Field> = inferred
        .fields()
        .iter()
        .map(|f| {
            let all_times = f.data_type() == &DataType::Utf8
                && rows
                    .iter()
                    .filter_map(|r| r.get(f.name()))
                    .all(|v| v.as_str().is_some_and(looks_like_time));
            if all_times {
                Field::new(f.name(), DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true)
            } else {
                f.as_ref().clone()
            }
        })
        .collect();
    Ok(Arc::new(Schema::new(fields)))
}

fn looks_like_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 19 && b[4] == b'-' && b[7] == b'-' && (b[10] == b'T' || b[10] == b' ') && b[13] == b':'
}

/// Whether `actual` holds exactly the expected rows, comparing only the
/// columns each expected row lists, in any order.
fn compare(expected: &[Value], actual: &[Value]) -> Option<String> {
    if expected.len() != actual.len() {
        return Some(format!("expected {} rows, got {}: {}", expected.len(), actual.len(), show(actual)));
    }
    let mut used = vec![false; actual.len()];
    for e in expected {
        let hit = actual.iter().enumerate().position(|(i, a)| !used[i] && row_matches(e, a));
        match hit {
            Some(i) => used[i] = true,
            None => return Some(format!("no row matches {e}; got {}", show(actual))),
        }
    }
    None
}

fn show(rows: &[Value]) -> String {
    let shown: Vec<String> = rows.iter().take(10).map(Value::to_string).collect();
    format!("[{}]", shown.join(", "))
}

fn row_matches(expected: &Value, actual: &Value) -> bool {
    let Some(e) = expected.as_object() else { return false };
    e.iter().all(|(k, v)| value_matches(v, actual.get(k).unwrap_or(&Value::Null)))
}

fn value_matches(e: &Value, a: &Value) -> bool {
    match (e, a) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            (x - y).abs() <= 1e-9 * x.abs().max(1.0)
        }
        (Value::Number(x), Value::String(s)) | (Value::String(s), Value::Number(x)) => s
            .parse::<f64>()
            .ok()
            .zip(x.as_f64())
            .is_some_and(|(s, x)| (s - x).abs() <= 1e-9 * x.abs().max(1.0)),
        (Value::String(x), Value::String(y)) => x == y || (looks_like_time(x) && same_time(x, y)),
        (x, y) => x == y,
    }
}

/// `2026-01-01T00:00:00Z` and `2026-01-01T00:00:00.000Z` name the same time.
fn same_time(x: &str, y: &str) -> bool {
    let norm = |s: &str| {
        s.trim_end_matches('Z').trim_end_matches("+00:00").trim_end_matches(".000").replace(' ', "T")
    };
    norm(x) == norm(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compares_listed_columns_in_any_order() {
        let actual = vec![json!({"id": 2, "x": "b", "y": 1}), json!({"id": 1, "x": "a", "y": 2.50})];
        assert_eq!(compare(&[json!({"id": 1, "y": 2.5}), json!({"id": 2})], &actual), None);
        assert!(compare(&[json!({"id": 1})], &actual).is_some());
        assert!(compare(&[json!({"id": 1, "x": "b"}), json!({"id": 2})], &actual).is_some());
    }
}
