//! SQL as the spec layer reads it: syntax only (DataFusion's parser), with no
//! session. The node ids a query reads, whether an expression parses, and
//! DataFusion's messages shortened to one sentence about the user's names.

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

/// An identifier quoted for SQL (DataFusion and PostgreSQL alike): `"a""b"`.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A `schema.table` (or `table`) name, each part quoted.
pub fn qualified(name: &str) -> String {
    name.split('.').map(ident).collect::<Vec<_>>().join(".")
}

/// A string literal for SQL: `'it''s'`.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A DataFusion error from reading or computing data, for `what`.
pub fn df_error(what: &str, e: impl std::fmt::Display) -> crate::error::Error {
    crate::error::Error::External { system: what.to_string(), message: short(e) }
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
}
