//! Column types of the pipeline language and their Arrow equivalents.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use indexmap::IndexMap;

use crate::spec::model::ColumnSpec;
use crate::spec::suggest;

pub const TYPE_NAMES: &[&str] =
    &["string", "bool", "int32", "int64", "float64", "decimal(p,s)", "date", "timestamp"];

/// The Arrow type of a type name from a `schema:`.
pub fn arrow_type(name: &str) -> Result<DataType, String> {
    let t = name.trim();
    Ok(match t {
        "string" => DataType::Utf8,
        "bool" => DataType::Boolean,
        "int32" => DataType::Int32,
        "int64" => DataType::Int64,
        "float64" => DataType::Float64,
        "date" => DataType::Date32,
        "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        _ => return decimal(t).ok_or_else(|| unknown(t))?,
    })
}

fn decimal(t: &str) -> Option<Result<DataType, String>> {
    let inner = t.strip_prefix("decimal(")?.strip_suffix(')')?;
    let (p, s) = inner.split_once(',')?;
    let (p, s) = (p.trim().parse::<u8>().ok()?, s.trim().parse::<i8>().ok()?);
    if p == 0 || p > 38 || s < 0 || s as u8 > p {
        return Some(Err(format!("bad type '{t}': decimal(p,s) needs 1 <= p <= 38 and 0 <= s <= p")));
    }
    Some(Ok(DataType::Decimal128(p, s)))
}

fn unknown(t: &str) -> String {
    let hint = suggest::hint(t, TYPE_NAMES.iter().copied());
    if hint.is_empty() {
        format!("unknown type '{t}'; expected {}", suggest::one_of(TYPE_NAMES))
    } else {
        format!("unknown type '{t}'{hint}")
    }
}

/// The field metadata key of a `float64` column declared `non_finite: true`.
pub const NON_FINITE: &str = "non_finite";

/// The Arrow schema of a declared `schema:`; errors name the column.
pub fn from_declared(columns: &IndexMap<String, ColumnSpec>) -> Result<SchemaRef, Vec<String>> {
    let mut fields = Vec::new();
    let mut errors = Vec::new();
    for (name, spec) in columns {
        match arrow_type(spec.data_type()) {
            Ok(t) if spec.non_finite() && t != DataType::Float64 => {
                errors.push(format!("column '{name}': 'non_finite' applies to float64 columns only"))
            }
            Ok(t) => {
                let field = Field::new(name, t, !spec.required());
                fields.push(match spec.non_finite() {
                    true => field.with_metadata([(NON_FINITE.to_string(), "true".to_string())].into()),
                    false => field,
                });
            }
            Err(e) => errors.push(format!("column '{name}': {e}")),
        }
    }
    if errors.is_empty() {
        Ok(Arc::new(Schema::new(fields)))
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_types() {
        assert_eq!(arrow_type("decimal(12,2)").unwrap(), DataType::Decimal128(12, 2));
        assert_eq!(arrow_type("int64").unwrap(), DataType::Int64);
        assert_eq!(arrow_type("strng").unwrap_err(), "unknown type 'strng'; did you mean 'string'?");
        assert!(arrow_type("decimal(2,5)").unwrap_err().contains("0 <= s <= p"));
    }
}
