//! The settings of the generate source and their checks.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::connector::{Context, SourceSettings};
use crate::spec::model::Mode;
use crate::spec::sql;
use crate::spec::values::Rate;
use crate::spec::yaml::Sp;

/// Synthetic rows: `rows` of them (batch) or `rate` per second (stream).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateSource {
    /// How many rows (batch mode).
    #[serde(default)]
    pub rows: Option<u64>,
    /// Rows per second (stream mode), e.g. `5000/s`.
    #[serde(default)]
    pub rate: Option<Rate>,
    /// The same seed gives the same rows.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Output columns as SQL expressions over the row number `n`.
    pub columns: IndexMap<String, Sp<String>>,
}

crate::spec::connector::settings!(GenerateSource);

impl SourceSettings for GenerateSource {
    fn connection(&self) -> Option<&Sp<String>> {
        None
    }

    fn schema_query(&self) -> Option<Result<String, String>> {
        Some(crate::transform::generate::sql(&self.columns, self.seed.unwrap_or(0), 1))
    }

    fn detail(&self) -> String {
        match (&self.rows, &self.rate) {
            (_, Some(rate)) => rate.to_string(),
            (Some(rows), _) => format!("{rows} rows"),
            _ => String::new(),
        }
    }

    fn check(&self, cx: &mut Context) {
        match (cx.mode() == Mode::Stream, self.rows.is_some(), &self.rate) {
            (false, true, None) => {}
            (false, _, _) => cx.error_here("in batch mode a generate source takes 'rows' (and no 'rate')"),
            (true, false, Some(_)) => {}
            (true, _, _) => cx.error_here("in stream mode a generate source takes 'rate' (and no 'rows')"),
        }
        if self.columns.is_empty() {
            cx.error_here("'columns' needs at least one column");
        }
        for (col, expr) in &self.columns {
            if let Err(e) = sql::parse_expr(expr.value()) {
                cx.error(expr.pos(), format!("column '{col}': bad SQL expression: {e}"));
            }
        }
    }
}
