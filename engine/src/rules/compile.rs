//! Compiling rules against the schema of the events they read: every `when`
//! is planned by DataFusion, so unknown columns and type errors are found when
//! the rule set is loaded, never while events flow.

use datafusion::arrow::datatypes::{DataType, SchemaRef};

use crate::error::Diagnostics;
use crate::spec::rules::{column_hint, LoadedRule};
use crate::spec::sql;
use crate::transform::sql::Planner;

/// The table name rules are planned against.
const EVENTS: &str = "__events";

/// Plans every rule against `schema`, then compiles the set as a stream runs
/// it (`key` is the event id column); problems are reported per rule.
pub async fn check_against(rules: &[LoadedRule], schema: SchemaRef, key: &str) -> Diagnostics {
    let mut diags = Diagnostics::default();
    let planner = Planner::new();
    if let Err(e) = planner.register_empty(EVENTS, schema.clone()) {
        diags.push(crate::error::Diagnostic::error(std::path::Path::new("<rules>"), Default::default(), e));
        return diags;
    }
    let columns: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    for lr in rules {
        if sql::parse_expr(lr.rule.when.value()).is_err() {
            continue; // reported when the rule was read
        }
        if let Err(msg) = check_rule(&planner, lr, &columns, &schema).await {
            let pos = lr.rule.when.pos();
            diags.push(lr.error(pos, format!("rule '{}': {msg}", lr.rule.id.value())));
        }
    }
    // Rules with problems found when they were read are not compiled again.
    let read_clean = rules.iter().all(|lr| {
        sql::parse_expr(lr.rule.when.value()).is_ok()
            && (lr.rule.window.is_none() || lr.window_size().is_some())
    });
    if read_clean && !diags.has_errors() && schema.index_of(key).is_ok() {
        if let Err(d) = super::eval::CompiledRules::build(
            &crate::transform::sql::session(crate::transform::sql::Purpose::Stream),
            rules,
            schema,
            key,
        ) {
            diags.extend(d);
        }
    }
    diags
}

async fn check_rule(
    planner: &Planner,
    lr: &LoadedRule,
    columns: &[String],
    schema: &SchemaRef,
) -> Result<(), String> {
    let when = lr.rule.when.value();
    let sql = match &lr.rule.window {
        None => format!("SELECT ({when}) AS fired FROM {EVENTS}"),
        Some(w) => {
            for key in w.by.iter().chain(w.time.iter()) {
                if !columns.contains(key) {
                    return Err(format!(
                        "window column '{key}' is not in the input{}",
                        column_hint(key, columns)
                    ));
                }
            }
            if let Some(t) = &w.time {
                let ty = schema.field_with_name(t).map(|f| f.data_type().clone()).unwrap_or(DataType::Null);
                if !matches!(ty, DataType::Timestamp(..)) {
                    return Err(format!("window time column '{t}' must be a timestamp, not {ty}"));
                }
            }
            format!("SELECT ({when}) AS fired FROM {EVENTS} GROUP BY {}", w.by.join(", "))
        }
    };
    let out = planner.output_schema(&sql).await.map_err(|e| format!("in 'when': {e}"))?;
    let ty = out.field(0).data_type();
    if ty != &DataType::Boolean {
        return Err(format!("'when' must be true or false, but it gives {ty}"));
    }
    if lr.rule.window.is_none() && planner.aggregates(&sql).await? {
        return Err("'when' uses an aggregate; aggregates need a 'window'".into());
    }
    Ok(())
}
