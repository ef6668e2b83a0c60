//! The check vocabulary as SQL over a node's materialized output.
//!
//! A row-level check (not_null, accepted_values, range, relationships,
//! expression, unique) becomes a predicate that is true for failing rows, so
//! the same SQL counts failures, samples them and, with `on_fail: quarantine`,
//! splits the output into passing and quarantined rows. Table-level checks
//! (row_count, freshness) become one aggregate query.

use crate::spec::model::*;
use crate::spec::sql::ident;
use crate::spec::yaml::Data;

/// How a check is evaluated.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckSql {
    /// Rows of `table` for which this predicate is true fail.
    Rows { predicate: String, reason: String },
    /// Rows whose `key` repeats (NULL keys aside). Found by an aggregate,
    /// which spills to disk, rather than a join against the whole table.
    Unique { key: String, not_null: String, reason: String },
    /// One aggregate query returning a single value, compared in Rust.
    RowCount { min: Option<u64>, max: Option<u64> },
    /// The newest value of a column must be at most `max_age_secs` old.
    Freshness { column: String, max_age_secs: u64 },
    /// The row count against the last successful run's, in percent.
    Volume { max_drop: Option<f64>, max_growth: Option<f64> },
}

/// A YAML value as a SQL literal.
pub fn literal(v: &Data) -> String {
    match &v.0 {
        serde_json::Value::Null => "NULL".to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => crate::spec::sql::literal(s),
        other => crate::spec::sql::literal(&other.to_string()),
    }
}

/// The SQL of `check` over its node (the table named after the node id).
pub fn compile(check: &Check) -> CheckSql {
    let rows = |predicate: String, reason: String| CheckSql::Rows { predicate, reason };
    match check {
        Check::NotNull(c) => {
            let cols = c.columns.names();
            let pred = cols.iter().map(|c| format!("{} IS NULL", ident(c))).collect::<Vec<_>>().join(" OR ");
            rows(pred, format!("NULL in {}", cols.join(", ")))
        }
        Check::AcceptedValues(c) => {
            let values = c.values.iter().map(literal).collect::<Vec<_>>().join(", ");
            let col = ident(&c.column);
            rows(
                format!("{col} IS NOT NULL AND {col} NOT IN ({values})"),
                format!("{} not in the accepted values", c.column),
            )
        }
        Check::Range(c) => {
            let col = ident(&c.column);
            let mut parts = Vec::new();
            if let Some(min) = c.min {
                parts.push(format!("{col} < {min}"));
            }
            if let Some(max) = c.max {
                parts.push(format!("{col} > {max}"));
            }
            let bounds = format!("[{}, {}]", fmt_opt(c.min), fmt_opt(c.max));
            rows(format!("COALESCE({}, false)", parts.join(" OR ")), format!("{} outside {bounds}", c.column))
        }
        Check::Expression(c) => {
            let name = c.name.clone().unwrap_or_else(|| c.sql.value().clone());
            rows(format!("({}) IS NOT TRUE", c.sql.value()), format!("{name} is not true"))
        }
        Check::Relationships(c) => {
            let (node, col) = c.to.value().split_once('.').unwrap_or((c.to.value(), ""));
            let me = ident(&c.column);
            rows(
                format!(
                    "{me} IS NOT NULL AND {me} NOT IN (SELECT {} FROM {} WHERE {} IS NOT NULL)",
                    ident(col),
                    ident(node),
                    ident(col)
                ),
                format!("{} not found in {}", c.column, c.to.value()),
            )
        }
        Check::Unique(c) => {
            let cols = c.columns.names();
            let not_null =
                cols.iter().map(|c| format!("{} IS NOT NULL", ident(c))).collect::<Vec<_>>().join(" AND ");
            CheckSql::Unique {
                key: key_expr(&cols),
                not_null,
                reason: format!("duplicate {}", cols.join(", ")),
            }
        }
        Check::RowCount(c) => CheckSql::RowCount { min: c.min, max: c.max },
        Check::Volume(c) => CheckSql::Volume {
            max_drop: c.max_drop.as_ref().map(|p| p.get()),
            max_growth: c.max_growth.as_ref().map(|p| p.get()),
        },
        Check::Freshness(c) => {
            CheckSql::Freshness { column: c.column.clone(), max_age_secs: c.max_age.get().as_secs() }
        }
    }
}

/// One column as itself; several as one stable key (their surrogate key).
fn key_expr(cols: &[&str]) -> String {
    match cols {
        [one] => ident(one),
        many => format!("surrogate_key({})", many.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ")),
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "..".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::model::Columns;

    #[test]
    fn row_checks_are_predicates() {
        let c = Check::NotNull(NotNullCheck {
            columns: Columns::Many(vec!["a".into(), "b".into()]),
            severity: Severity::Error,
            on_fail: OnFail::Fail,
            max_failures: None,
            name: None,
        });
        assert_eq!(
            compile(&c),
            CheckSql::Rows {
                predicate: "\"a\" IS NULL OR \"b\" IS NULL".into(),
                reason: "NULL in a, b".into()
            }
        );
    }
}
