//! What rules mean. Rule files are read by [`crate::spec::rules`]; here
//! [`compile`] plans each rule against the input's schema, [`eval`] is the set
//! compiled once for a stream, [`window`] the per-key state of windowed rules,
//! [`hold`] the event-time order they count events in,
//! [`batch`] the same rules as SQL over a table (batch runs, tests and
//! backtests), [`analyze`] what compiling a pipeline needs from SQL and rules,
//! and [`watch`] reloads a running stream's rules when their files change.

pub mod analyze;
pub mod batch;
pub mod compile;
pub mod eval;
pub mod hold;
pub mod watch;
pub mod window;

#[cfg(test)]
mod differential;

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

/// A rules transform's output: the event's columns and the alert's.
pub fn alert_schema(input: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Field> = vec![
        Field::new("alert_id", DataType::Utf8, false),
        Field::new("rule_id", DataType::Utf8, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("rules_version", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
    ];
    let taken: Vec<String> = fields.iter().map(|f| f.name().clone()).collect();
    fields.extend(input.fields().iter().filter(|f| !taken.contains(f.name())).map(|f| f.as_ref().clone()));
    Arc::new(Schema::new(fields))
}
