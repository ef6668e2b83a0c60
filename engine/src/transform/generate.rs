//! Seeded random functions for `generate` sources: `uniform(lo, hi)`,
//! `uniform_int(lo, hi)`, `chance(p)`, `pick(a, b, ...)` and `fake(kind)`.
//!
//! Users write them without arguments for the row or seed; the generate
//! source rewrites each call to `f(n, salt, ...)`, where `salt` mixes the
//! source's seed, the column and the call's place. A value is then a pure
//! function of (seed, column, call, row): the same seed gives the same rows
//! in every run, whatever the batch size.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanBuilder, Float64Array, Float64Builder, Int64Array, Int64Builder, StringArray,
    StringBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Ident, ObjectNamePart, Value, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use std::ops::ControlFlow;

use indexmap::IndexMap;

use crate::spec::yaml::Sp;

/// Generated columns: name and SQL expression over the row number `n`.
pub type Columns = IndexMap<String, Sp<String>>;

/// The functions a generate column may call without the row and salt.
pub const FUNCTIONS: &[&str] = &["uniform", "uniform_int", "chance", "pick", "fake"];

/// The kinds `fake(kind)` knows.
pub const FAKE_KINDS: &[&str] = &["first_name", "last_name", "company", "city"];

/// The SELECT that makes `rows` rows of `columns`.
pub fn sql(columns: &Columns, seed: u64, rows: u64) -> Result<String, String> {
    let last = rows as i64 - 1;
    Ok(format!(
        "{} FROM (SELECT CAST(value AS BIGINT) AS n FROM generate_series(0, {last})) AS rows",
        select(columns, seed)?
    ))
}

/// `SELECT <columns>`, for a FROM that provides the row number `n`.
pub fn select(columns: &Columns, seed: u64) -> Result<String, String> {
    let mut cols = Vec::new();
    for (i, (name, expr)) in columns.iter().enumerate() {
        let e = rewrite(expr.value(), seed, i).map_err(|e| format!("column '{name}': {e}"))?;
        cols.push(format!("{e} AS {}", crate::spec::sql::ident(name)));
    }
    Ok(format!("SELECT {}", cols.join(", ")))
}

/// Rewrites `expr` so each seeded call gets the row number and its own salt.
pub fn rewrite(expr: &str, seed: u64, column: usize) -> Result<String, String> {
    let dialect = GenericDialect {};
    let mut parsed = Parser::new(&dialect)
        .try_with_sql(expr)
        .map_err(|e| e.to_string())?
        .parse_expr()
        .map_err(|e| e.to_string())?;
    let mut v = Salter { seed, column, calls: 0 };
    let _ = parsed.visit(&mut v);
    Ok(parsed.to_string())
}

struct Salter {
    seed: u64,
    column: usize,
    calls: u64,
}

impl VisitorMut for Salter {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let Expr::Function(f) = expr else { return ControlFlow::Continue(()) };
        let name = f.name.0.last().and_then(ObjectNamePart::as_ident).map(|i| i.value.to_lowercase());
        if !name.is_some_and(|n| FUNCTIONS.contains(&n.as_str())) {
            return ControlFlow::Continue(());
        }
        self.calls += 1;
        let salt = (self.seed.wrapping_mul(1_000_003) ^ ((self.column as u64) << 32) ^ self.calls) as i64;
        let n = FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Identifier(Ident::new("n"))));
        let s =
            FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::value(Value::Number(salt.to_string(), false))));
        if let FunctionArguments::List(list) = &mut f.args {
            list.args.insert(0, s);
            list.args.insert(0, n);
        } else {
            f.args = FunctionArguments::List(datafusion::sql::sqlparser::ast::FunctionArgumentList {
                duplicate_treatment: None,
                args: vec![n, s],
                clauses: vec![],
            });
        }
        ControlFlow::Continue(())
    }
}

/// Registers the seeded functions on a session.
pub fn register(ctx: &SessionContext) {
    for kind in [Kind::Uniform, Kind::UniformInt, Kind::Chance, Kind::Pick, Kind::Fake] {
        ctx.register_udf(ScalarUDF::from(Seeded::new(kind)));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Uniform,
    UniformInt,
    Chance,
    Pick,
    Fake,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Seeded {
    kind: Kind,
    signature: Signature,
}

impl Seeded {
    fn new(kind: Kind) -> Self {
        Self { kind, signature: Signature::variadic_any(Volatility::Immutable) }
    }
}

/// A uniform number in [0, 1) from the row and the salt.
fn unit(n: i64, salt: i64) -> f64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    bytes[8..].copy_from_slice(&salt.to_le_bytes());
    (xxhash_rust::xxh3::xxh3_64(&bytes) >> 11) as f64 / (1u64 << 53) as f64
}

fn arg_error(name: &str, what: &str) -> DataFusionError {
    DataFusionError::Plan(format!("{name}(): {what}"))
}

fn as_f64(a: &ArrayRef) -> DfResult<Float64Array> {
    Ok(cast(a, &DataType::Float64)?
        .as_any()
        .downcast_ref::<Float64Array>()
        .cloned()
        .unwrap_or_else(|| Float64Array::from(Vec::<f64>::new())))
}

fn as_i64(a: &ArrayRef) -> DfResult<Int64Array> {
    Ok(cast(a, &DataType::Int64)?
        .as_any()
        .downcast_ref::<Int64Array>()
        .cloned()
        .unwrap_or_else(|| Int64Array::from(Vec::<i64>::new())))
}

fn as_str(a: &ArrayRef) -> DfResult<StringArray> {
    Ok(cast(a, &DataType::Utf8)?
        .as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .unwrap_or_else(|| StringArray::from(Vec::<&str>::new())))
}

impl ScalarUDFImpl for Seeded {
    fn name(&self) -> &str {
        match self.kind {
            Kind::Uniform => "uniform",
            Kind::UniformInt => "uniform_int",
            Kind::Chance => "chance",
            Kind::Pick => "pick",
            Kind::Fake => "fake",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> DfResult<DataType> {
        let (min, max) = match self.kind {
            Kind::Uniform | Kind::UniformInt => (4, 4),
            Kind::Chance | Kind::Fake => (3, 3),
            Kind::Pick => (3, usize::MAX),
        };
        if args.len() < min || args.len() > max {
            let user = match self.kind {
                Kind::Uniform | Kind::UniformInt => "takes (low, high)",
                Kind::Chance => "takes (probability)",
                Kind::Fake => "takes (kind)",
                Kind::Pick => "takes one or more values",
            };
            return Err(arg_error(self.name(), &format!("{user}; it can only be used in generate sources")));
        }
        Ok(match self.kind {
            Kind::Uniform => DataType::Float64,
            Kind::UniformInt => DataType::Int64,
            Kind::Chance => DataType::Boolean,
            Kind::Pick | Kind::Fake => DataType::Utf8,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let rows = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let n = as_i64(&arrays[0])?;
        let salt = as_i64(&arrays[1])?;
        let u = |i: usize| unit(n.value(i), salt.value(i));
        let out: ArrayRef = match self.kind {
            Kind::Uniform => {
                let (lo, hi) = (as_f64(&arrays[2])?, as_f64(&arrays[3])?);
                let mut b = Float64Builder::with_capacity(rows);
                (0..rows).for_each(|i| b.append_value(lo.value(i) + u(i) * (hi.value(i) - lo.value(i))));
                Arc::new(b.finish())
            }
            Kind::UniformInt => {
                let (lo, hi) = (as_i64(&arrays[2])?, as_i64(&arrays[3])?);
                let mut b = Int64Builder::with_capacity(rows);
                for i in 0..rows {
                    let span = (hi.value(i) - lo.value(i) + 1).max(1) as f64;
                    b.append_value(lo.value(i) + (u(i) * span) as i64);
                }
                Arc::new(b.finish())
            }
            Kind::Chance => {
                let p = as_f64(&arrays[2])?;
                let mut b = BooleanBuilder::with_capacity(rows);
                (0..rows).for_each(|i| b.append_value(u(i) < p.value(i)));
                Arc::new(b.finish())
            }
            Kind::Pick => {
                let choices: Vec<StringArray> = arrays[2..].iter().map(as_str).collect::<DfResult<_>>()?;
                let mut b = StringBuilder::with_capacity(rows, rows * 8);
                for i in 0..rows {
                    let c = &choices[((u(i) * choices.len() as f64) as usize).min(choices.len() - 1)];
                    if c.is_null(i) {
                        b.append_null();
                    } else {
                        b.append_value(c.value(i));
                    }
                }
                Arc::new(b.finish())
            }
            Kind::Fake => {
                let kinds = as_str(&arrays[2])?;
                let mut b = StringBuilder::with_capacity(rows, rows * 10);
                for i in 0..rows {
                    let list = fake_list(kinds.value(i)).ok_or_else(|| {
                        arg_error(
                            "fake",
                            &format!(
                                "unknown kind '{}'; expected one of {}",
                                kinds.value(i),
                                FAKE_KINDS.join(", ")
                            ),
                        )
                    })?;
                    b.append_value(list[((u(i) * list.len() as f64) as usize).min(list.len() - 1)]);
                }
                Arc::new(b.finish())
            }
        };
        Ok(ColumnarValue::Array(out))
    }
}

fn fake_list(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "first_name" => &[
            "Ana", "Ben", "Chloe", "Daniel", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira",
            "Liam", "Maria", "Noah", "Olivia", "Pedro", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor",
            "Wen", "Yara", "Zoe", "Amir", "Beatriz", "Carlos", "Dana", "Emil",
        ],
        "last_name" => &[
            "Silva", "Smith", "Müller", "Dubois", "Rossi", "García", "Jansen", "Kowalski", "Novak", "Costa",
            "Brown", "Schmidt", "Martin", "Ferrari", "López", "de Vries", "Nowak", "Horvat", "Santos",
            "Taylor",
        ],
        "company" => &[
            "Blue Fern Grocers",
            "Northwind Travel",
            "Voltage Electronics",
            "Casa Lisboa",
            "Fuel Stop",
            "Starlight Cinema",
            "Green Cross Pharmacy",
            "Corner Market",
            "Skyline Air",
            "Byte Shop",
            "Olive & Thyme",
            "QuickGas",
            "Arcade Hall",
            "Vital Clinic",
            "General Store",
        ],
        "city" => &[
            "Lisbon",
            "London",
            "Berlin",
            "Paris",
            "Madrid",
            "Amsterdam",
            "Dublin",
            "New York",
            "Porto",
            "Munich",
            "Lyon",
            "Seville",
            "Rotterdam",
            "Cork",
            "Chicago",
        ],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_get_row_and_salt() {
        let out = rewrite("round(uniform(1, 500), 2)", 3, 1).unwrap();
        assert!(out.starts_with("round(uniform(n, "), "{out}");
        assert!(out.ends_with(", 1, 500), 2)"), "{out}");
        assert_eq!(rewrite("n + 1", 3, 1).unwrap(), "n + 1");
    }

    #[test]
    fn unit_is_deterministic_and_spread() {
        assert_eq!(unit(5, 9), unit(5, 9));
        let mean: f64 = (0..10_000).map(|i| unit(i, 42)).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
