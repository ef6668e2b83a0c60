//! The rules transform over a table (batch runs and tests): every enabled,
//! live rule (and shadow rule, in tests and backtests) becomes one SELECT of
//! the rows it fires on, and their UNION ALL is the alert output. Windowed rules turn their aggregates into window
//! functions over the rule's key and event time.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    Expr, Ident, ObjectNamePart, OrderByExpr, OrderByOptions, VisitMut, VisitorMut, WindowFrame,
    WindowFrameBound, WindowFrameUnits, WindowSpec, WindowType,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::spec::rules::{LoadedRule, RuleMode};
use crate::spec::sql::{ident, literal};

const AGGREGATES: &[&str] = &["count", "sum", "avg", "min", "max"];

/// A stable version of a rule set: a hash of every rule file's name and text.
pub fn version(rules: &[LoadedRule]) -> String {
    let mut files: Vec<&std::path::Path> = rules.iter().map(|r| r.file.as_path()).collect();
    files.dedup();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for f in files {
        h.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        h.update(&std::fs::read(f).unwrap_or_default());
    }
    format!("{:016x}", h.digest())
}

/// The SELECT producing the alerts of `rules` over table `input`: of the
/// live rules, and of the shadow ones too with `shadow`.
pub fn batch_sql(
    input: &str,
    key: &str,
    rules: &[LoadedRule],
    columns: &[String],
    version: &str,
    shadow: bool,
) -> Result<String, String> {
    let mut parts = Vec::new();
    for lr in rules.iter().filter(|r| r.rule.enabled && (shadow || r.rule.mode == RuleMode::Live)) {
        let r = &lr.rule;
        let id = r.id.value();
        let when = match &r.window {
            None => r.when.value().clone(),
            Some(w) => {
                let time = w.time.as_ref().ok_or_else(|| {
                    format!("rule '{id}': evaluating a window over stored events needs 'window.time' (the event-time column)")
                })?;
                let size = humantime::parse_duration(w.size.value()).map_err(|e| e.to_string())?;
                windowed(r.when.value(), &w.by, time, size)?
            }
        };
        let reason = reason_sql(r.when.value(), &|w| columns.iter().any(|c| c == w).then(|| w.to_string()));
        let severity = format!("{:?}", r.severity).to_lowercase();
        let fired = format!(
            "SELECT concat({}, ':', CAST({} AS VARCHAR)) AS alert_id, {} AS rule_id, {} AS severity, {} AS rules_version, \
             {reason} AS reason, e.* FROM {} AS e",
            literal(id),
            ident(key),
            literal(id),
            literal(&severity),
            literal(version),
            ident(input)
        );
        let part = if r.window.is_some() {
            // Window functions cannot stand in WHERE: compute, then filter.
            format!(
                "SELECT * FROM ({fired_with_flag}) AS w WHERE fired",
                fired_with_flag =
                    fired.replacen(" AS reason, e.*", &format!(" AS reason, ({when}) AS fired, e.*"), 1)
            )
        } else {
            format!("{fired} WHERE ({when})")
        };
        parts.push(part);
    }
    let alert_cols = ["alert_id", "rule_id", "severity", "rules_version", "reason"];
    let event_cols: Vec<String> =
        columns.iter().filter(|c| !alert_cols.contains(&c.as_str())).map(|c| ident(c)).collect();
    let select = format!("alert_id, rule_id, severity, rules_version, reason, {}", event_cols.join(", "));
    if parts.is_empty() {
        return Ok(format!(
            "SELECT CAST(NULL AS VARCHAR) AS alert_id, CAST(NULL AS VARCHAR) AS rule_id, CAST(NULL AS VARCHAR) AS severity, \
             CAST(NULL AS VARCHAR) AS rules_version, CAST(NULL AS VARCHAR) AS reason, {} FROM {} WHERE false",
            event_cols.join(", "),
            ident(input)
        ));
    }
    Ok(parts
        .iter()
        .map(|p| format!("SELECT {select} FROM ({p}) AS r"))
        .collect::<Vec<_>>()
        .join(" UNION ALL "))
}

/// `amount > 2000` -> SQL for `'amount ' || amount || ' > 2000'`: the rule's
/// text with each column followed by its value. `label` says which words are
/// columns, and how to write them (an aggregate's column shows its call).
pub fn reason_sql(when: &str, label: &dyn Fn(&str) -> Option<String>) -> String {
    let dialect = GenericDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, when).tokenize() else { return literal(when) };
    let mut pieces: Vec<String> = Vec::new();
    let mut text = String::new();
    for t in tokens {
        match &t {
            Token::Word(w) if w.quote_style.is_none() && label(&w.value).is_some() => {
                text.push_str(&label(&w.value).unwrap_or_default());
                text.push(' ');
                pieces.push(literal(&text));
                text.clear();
                let col = ident(&w.value);
                pieces.push(format!("CASE WHEN {col} IS NULL THEN 'NULL' ELSE CAST({col} AS VARCHAR) END"));
            }
            other => text.push_str(&other.to_string()),
        }
    }
    if !text.is_empty() {
        pieces.push(literal(&text));
    }
    format!("concat({})", pieces.join(", "))
}

/// `when` with each aggregate made a window function over the rule's window.
/// The frame is the window's size to the microsecond, as the stream keeps it.
fn windowed(when: &str, by: &[String], time: &str, size: std::time::Duration) -> Result<String, String> {
    let micros = size.as_micros();
    let dialect = GenericDialect {};
    let mut expr = Parser::new(&dialect)
        .try_with_sql(when)
        .map_err(|e| e.to_string())?
        .parse_expr()
        .map_err(|e| e.to_string())?;
    let spec = WindowSpec {
        window_name: None,
        partition_by: by.iter().map(|c| Expr::Identifier(Ident::with_quote('"', c))).collect(),
        order_by: vec![OrderByExpr {
            expr: Expr::Identifier(Ident::with_quote('"', time)),
            options: OrderByOptions { asc: Some(true), nulls_first: None },
            with_fill: None,
        }],
        window_frame: Some(WindowFrame {
            units: WindowFrameUnits::Range,
            start_bound: WindowFrameBound::Preceding(Some(Box::new(
                Parser::new(&dialect)
                    .try_with_sql(&format!("INTERVAL '{micros} microseconds'"))
                    .and_then(|mut p| p.parse_expr())
                    .map_err(|e| e.to_string())?,
            ))),
            end_bound: Some(WindowFrameBound::CurrentRow),
        }),
    };
    let mut v = Over { spec };
    let _ = expr.visit(&mut v);
    Ok(expr.to_string())
}

struct Over {
    spec: WindowSpec,
}

impl VisitorMut for Over {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            let name = f.name.0.last().and_then(ObjectNamePart::as_ident).map(|i| i.value.to_lowercase());
            if name.is_some_and(|n| AGGREGATES.contains(&n.as_str())) && f.over.is_none() {
                f.over = Some(WindowType::WindowSpec(self.spec.clone()));
            }
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_show_the_values() {
        let r = reason_sql("amount > 2000", &|w| (w == "amount").then(|| w.to_string()));
        assert_eq!(
            r,
            "concat('amount ', CASE WHEN \"amount\" IS NULL THEN 'NULL' ELSE CAST(\"amount\" AS VARCHAR) END, ' > 2000')"
        );
    }

    #[test]
    fn aggregates_become_window_functions() {
        let w = windowed(
            "count(*) > 5",
            &["customer_id".into()],
            "timestamp",
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        assert!(w.starts_with("count(*) OVER (PARTITION BY \"customer_id\" ORDER BY \"timestamp\" ASC RANGE BETWEEN INTERVAL"), "{w}");
    }
}
