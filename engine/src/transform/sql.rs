//! SQL on Apache DataFusion: reading the tables a query names, planning
//! queries against known schemas, and the engine-provided functions.

use std::hash::Hasher;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Int64Builder};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::{DFParser, Statement};
use datafusion::sql::sqlparser::dialect::GenericDialect;

/// The node ids a query reads: its table references, minus its own CTEs.
/// A `schema.table` reference is returned as written, for the caller to reject.
pub fn table_refs(sql: &str) -> Result<Vec<String>, String> {
    let mut statements = DFParser::parse_sql_with_dialect(sql, &GenericDialect {}).map_err(short)?;
    let statement = match (statements.pop_front(), statements.is_empty()) {
        (Some(s), true) => s,
        (None, _) => return Err("the SQL is empty".into()),
        (Some(_), false) => return Err("expected one SQL statement, found several".into()),
    };
    if !matches!(&statement, Statement::Statement(s) if matches!(**s, datafusion::sql::sqlparser::ast::Statement::Query(_)))
    {
        return Err("expected a SELECT query".into());
    }
    let (tables, _ctes) =
        datafusion::sql::resolve::resolve_table_references(&statement, true).map_err(short)?;
    let mut names: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Checks that `expr` parses as one SQL expression.
pub fn parse_expr(expr: &str) -> Result<(), String> {
    use datafusion::sql::sqlparser::parser::Parser;
    let dialect = GenericDialect {};
    let mut parser = Parser::new(&dialect).try_with_sql(expr).map_err(short)?;
    parser.parse_expr().map_err(short)?;
    match parser.peek_token().token {
        datafusion::sql::sqlparser::tokenizer::Token::EOF => Ok(()),
        t => Err(format!("unexpected '{t}' after the expression")),
    }
}

/// A DataFusion session with the engine's functions, used to plan SQL against
/// the schemas of upstream nodes without reading any data.
pub struct Planner {
    ctx: SessionContext,
}

impl Default for Planner {
    fn default() -> Self {
        Self::new()
    }
}

impl Planner {
    pub fn new() -> Self {
        let ctx = SessionContext::new();
        register_functions(&ctx);
        super::generate::register(&ctx);
        Self { ctx }
    }

    /// Makes `name` a table with `schema` and no rows.
    pub fn register_empty(&self, name: &str, schema: SchemaRef) -> Result<(), String> {
        let table = MemTable::try_new(schema, vec![vec![]]).map_err(short)?;
        self.ctx.deregister_table(name).map_err(short)?;
        self.ctx.register_table(name, Arc::new(table)).map_err(short)?;
        Ok(())
    }

    /// The output schema of a query over the registered tables.
    pub async fn output_schema(&self, sql: &str) -> Result<SchemaRef, String> {
        let state = self.ctx.state();
        let plan = state.create_logical_plan(sql).await.map_err(short)?;
        Ok(Arc::new(plan.schema().as_arrow().clone()))
    }

    /// Whether the planned query aggregates (used to keep aggregates out of
    /// row-level rules and checks).
    pub async fn aggregates(&self, sql: &str) -> Result<bool, String> {
        let state = self.ctx.state();
        let plan = state.create_logical_plan(sql).await.map_err(short)?;
        let text = format!("{}", plan.display_indent());
        Ok(text.lines().any(|l| l.trim_start().starts_with("Aggregate:")))
    }
}

/// DataFusion's messages carry a kind prefix ("Error during planning: ",
/// "SQL error: ParserError(...)") and name columns with their table; users
/// need one sentence about their own names.
pub fn short(e: impl std::fmt::Display) -> String {
    let full = e.to_string();
    let mut out = full.lines().next().unwrap_or_default().trim().to_string();
    out = out.split(" caused by").next().unwrap_or_default().to_string();
    let prefixes = [
        "Error during planning: ",
        "SQL error: ",
        "Schema error: ",
        "Arrow error: ",
        "This feature is not implemented: ",
        "sql parser error: ",
    ];
    loop {
        let before = out.clone();
        for p in prefixes {
            if let Some(rest) = out.strip_prefix(p) {
                out = rest.to_string();
            }
        }
        if let Some(inner) = out.strip_prefix("ParserError(\"").and_then(|r| r.strip_suffix("\")")) {
            out = inner.replace("\\\"", "\"");
        }
        if out == before {
            break;
        }
    }
    if let Some(rest) = out.strip_prefix("No field named ") {
        return unknown_column(rest);
    }
    if let Some(rest) = out.strip_prefix("table '").and_then(|r| r.strip_suffix("' not found")) {
        return format!("unknown table '{}'", rest.rsplit('.').next().unwrap_or(rest));
    }
    out
}

/// `amount. Did you mean '__events.amout'?` -> `unknown column 'amount'; did you mean 'amout'?`
fn unknown_column(rest: &str) -> String {
    let (name, hint) = match rest.split_once(". Did you mean '") {
        Some((n, h)) => (n, h.strip_suffix("'?").map(|h| h.rsplit('.').next().unwrap_or(h))),
        None => (rest.trim_end_matches('.'), None),
    };
    let name = name.rsplit('.').next().unwrap_or(name).trim_matches('"');
    match hint {
        Some(h) => format!("unknown column '{name}'; did you mean '{h}'?"),
        None => format!("unknown column '{name}'"),
    }
}

/// Registers every engine-provided SQL function on a session.
pub fn register_functions(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::from(SurrogateKey::new()));
}

/// `surrogate_key(col, ...)`: a stable, non-negative 63-bit key from natural-key
/// columns. The same values give the same key in every run and version: the
/// values are cast to text, joined with a separator that cannot occur in them
/// (NULL has its own marker) and hashed with XXH3-64.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SurrogateKey {
    signature: Signature,
}

impl SurrogateKey {
    pub fn new() -> Self {
        Self { signature: Signature::variadic_any(Volatility::Immutable) }
    }
}

impl Default for SurrogateKey {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalarUDFImpl for SurrogateKey {
    fn name(&self) -> &str {
        "surrogate_key"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> DfResult<DataType> {
        if args.is_empty() {
            return Err(DataFusionError::Plan("surrogate_key() needs at least one column".into()));
        }
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let rows = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let texts: Vec<ArrayRef> =
            arrays.iter().map(|a| cast(a, &DataType::Utf8)).collect::<Result<_, _>>()?;
        let texts: Vec<&datafusion::arrow::array::StringArray> = texts
            .iter()
            .map(|a| {
                a.as_any().downcast_ref().ok_or_else(|| DataFusionError::Internal("cast to Utf8".into()))
            })
            .collect::<DfResult<_>>()?;
        let mut out = Int64Builder::with_capacity(rows);
        for row in 0..rows {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            for col in &texts {
                if col.is_null(row) {
                    h.write(&[0xff, 0x00]);
                } else {
                    h.write(col.value(row).as_bytes());
                    h.write(&[0x1f]);
                }
            }
            out.append_value((h.finish() & 0x7fff_ffff_ffff_ffff) as i64);
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// `now()` read at every evaluation. DataFusion's own `now()` is fixed when a
/// query is planned, which is right for one batch query; a stream plans its
/// queries once and runs them for hours, so there the time must be read per batch.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct LiveNow {
    signature: Signature,
}

impl LiveNow {
    pub fn new() -> Self {
        Self { signature: Signature::nullary(Volatility::Volatile) }
    }
}

impl Default for LiveNow {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalarUDFImpl for LiveNow {
    fn name(&self) -> &str {
        "now"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Nanosecond, Some("+00:00".into())))
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or_default();
        Ok(ColumnarValue::Scalar(datafusion::common::ScalarValue::TimestampNanosecond(
            Some(nanos),
            Some("+00:00".into()),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tables_not_ctes() {
        let t = table_refs("WITH big AS (SELECT * FROM txns WHERE amount > 1) SELECT * FROM big JOIN customers c USING (customer_id)").unwrap();
        assert_eq!(t, vec!["customers", "txns"]);
        assert!(table_refs("SELEC 1").unwrap_err().contains("Expected"));
        assert_eq!(table_refs("DELETE FROM x").unwrap_err(), "expected a SELECT query");
    }

    #[test]
    fn checks_expressions() {
        assert!(parse_expr("amount > 2000").is_ok());
        assert!(parse_expr("amount >").is_err());
        assert!(parse_expr("amount > 1 )").is_err());
    }

    #[tokio::test]
    async fn surrogate_keys_are_stable_and_positive() {
        let p = Planner::new();
        let df = p
            .ctx
            .sql("SELECT surrogate_key(42) AS a, surrogate_key(42) AS b, surrogate_key('42', NULL) AS c")
            .await
            .unwrap();
        let batches = df.collect().await.unwrap();
        let col = |i: usize| {
            batches[0]
                .column(i)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Int64Array>()
                .unwrap()
                .value(0)
        };
        assert_eq!(col(0), col(1));
        assert_ne!(col(0), col(2));
        assert!(col(0) >= 0 && col(2) >= 0);
    }
}
