//! JSON messages into Arrow micro-batches by a declared schema.
//!
//! Each message is checked on its own: a malformed one (not JSON, not an
//! object, a missing or null required field, a value of the wrong type or out
//! of range, too large) is refused with a reason naming the field, and the
//! rows already taken are untouched. arrow-json's decoder works a batch at a
//! time and cannot say which message of a batch was bad, which a dead letter
//! needs; hence this per-message decoder over serde_json values.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int32Builder, Int64Builder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use serde_json::Value;

/// One decoded value, held until the whole message has decoded.
enum Cell {
    Null,
    Str(String),
    Bool(bool),
    Int(i64),
    Float(f64),
    Dec(i128),
    Date(i32),
    Ts(i64),
}

enum Builder {
    Str(StringBuilder),
    Bool(BooleanBuilder),
    I32(Int32Builder),
    I64(Int64Builder),
    F64(Float64Builder),
    Dec(Decimal128Builder),
    Date(Date32Builder),
    Ts(TimestampMicrosecondBuilder),
}

/// Decodes messages into rows of `schema`.
pub struct Decoder {
    schema: SchemaRef,
    builders: Vec<Builder>,
    rows: usize,
    max_bytes: usize,
}

impl Decoder {
    pub fn new(schema: SchemaRef, max_bytes: usize) -> Self {
        let builders = schema.fields().iter().map(|f| builder(f.data_type())).collect();
        Self { schema, builders, rows: 0, max_bytes }
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Rows taken since the last [`Decoder::finish`].
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Takes one message as a row, or says why it cannot.
    pub fn push(&mut self, raw: &[u8]) -> Result<(), String> {
        if raw.len() > self.max_bytes {
            return Err(format!("message is {} bytes, more than the limit of {}", raw.len(), self.max_bytes));
        }
        let obj: serde_json::Map<String, Value> = match serde_json::from_slice::<Value>(raw) {
            Ok(Value::Object(m)) => m,
            Ok(other) => return Err(format!("message is not a JSON object but {}", kind(&other))),
            Err(e) => return Err(format!("bad JSON: {e}")),
        };
        let mut cells = Vec::with_capacity(self.builders.len());
        for field in self.schema.fields() {
            let name = field.name();
            let cell = match obj.get(name) {
                None | Some(Value::Null) if field.is_nullable() => Cell::Null,
                None => return Err(format!("missing required field '{name}'")),
                Some(Value::Null) => return Err(format!("field '{name}' is required but null")),
                Some(v) => cell(v, field.data_type()).map_err(|e| format!("field '{name}': {e}"))?,
            };
            cells.push(cell);
        }
        for (b, c) in self.builders.iter_mut().zip(cells) {
            append(b, c);
        }
        self.rows += 1;
        Ok(())
    }

    /// The rows taken so far as one batch; the decoder starts empty again.
    pub fn finish(&mut self) -> Result<RecordBatch, String> {
        let arrays: Vec<ArrayRef> = self.builders.iter_mut().map(finish).collect();
        self.rows = 0;
        RecordBatch::try_new(self.schema.clone(), arrays).map_err(|e| e.to_string())
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn builder(t: &DataType) -> Builder {
    match t {
        DataType::Boolean => Builder::Bool(BooleanBuilder::new()),
        DataType::Int32 => Builder::I32(Int32Builder::new()),
        DataType::Int64 => Builder::I64(Int64Builder::new()),
        DataType::Float64 => Builder::F64(Float64Builder::new()),
        DataType::Decimal128(p, s) => {
            Builder::Dec(Decimal128Builder::new().with_data_type(DataType::Decimal128(*p, *s)))
        }
        DataType::Date32 => Builder::Date(Date32Builder::new()),
        DataType::Timestamp(_, tz) => {
            Builder::Ts(TimestampMicrosecondBuilder::new().with_timezone_opt(tz.clone()))
        }
        _ => Builder::Str(StringBuilder::new()),
    }
}

fn cell(v: &Value, t: &DataType) -> Result<Cell, String> {
    let wrong = |want: &str| format!("expected {want}, got {} {}", kind(v), short(v));
    Ok(match t {
        DataType::Boolean => Cell::Bool(v.as_bool().ok_or_else(|| wrong("true or false"))?),
        DataType::Int32 => {
            let i = v.as_i64().ok_or_else(|| wrong("an integer"))?;
            i32::try_from(i).map_err(|_| format!("{i} does not fit int32"))?;
            Cell::Int(i)
        }
        DataType::Int64 => Cell::Int(v.as_i64().ok_or_else(|| wrong("an integer"))?),
        DataType::Float64 => Cell::Float(v.as_f64().ok_or_else(|| wrong("a number"))?),
        DataType::Decimal128(p, s) => {
            Cell::Dec(decimal(v, *p, *s).ok_or_else(|| wrong("a decimal number"))??)
        }
        DataType::Date32 => {
            let s = v.as_str().ok_or_else(|| wrong("a date string (YYYY-MM-DD)"))?;
            let nanos = string_to_timestamp_nanos(&format!("{s}T00:00:00Z"))
                .map_err(|_| format!("bad date {}; write YYYY-MM-DD", short(v)))?;
            Cell::Date((nanos.div_euclid(86_400_000_000_000)) as i32)
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            let s = v.as_str().ok_or_else(|| wrong("an RFC 3339 timestamp string"))?;
            let nanos = string_to_timestamp_nanos(s)
                .map_err(|_| format!("bad timestamp {}; write e.g. 2026-11-26T10:15:02Z", short(v)))?;
            Cell::Ts(nanos.div_euclid(1000))
        }
        _ => Cell::Str(v.as_str().ok_or_else(|| wrong("a string"))?.to_string()),
    })
}

/// A JSON number (or numeric string) as a decimal of scale `s`: `None` when
/// it is neither; an error when it has more decimals than `s` or more digits
/// than `p`, because rounding would change the amount.
fn decimal(v: &Value, p: u8, s: i8) -> Option<Result<i128, String>> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(t) => t.trim().to_string(),
        _ => return None,
    };
    let f: f64 = text.parse().ok()?;
    if !f.is_finite() {
        return None;
    }
    let scaled = f * 10f64.powi(s as i32);
    let rounded = scaled.round();
    if (scaled - rounded).abs() > 1e-6 * rounded.abs().max(1.0) {
        return Some(Err(format!("{text} has more than {s} decimal places")));
    }
    let limit = 10f64.powi(p as i32);
    if rounded.abs() >= limit {
        return Some(Err(format!("{text} does not fit decimal({p},{s})")));
    }
    Some(Ok(rounded as i128))
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}...", &s[..s.char_indices().nth(37).map(|(i, _)| i).unwrap_or(s.len())])
    } else {
        s
    }
}

fn append(b: &mut Builder, c: Cell) {
    match (b, c) {
        (Builder::Str(b), Cell::Str(v)) => b.append_value(v),
        (Builder::Bool(b), Cell::Bool(v)) => b.append_value(v),
        (Builder::I32(b), Cell::Int(v)) => b.append_value(v as i32),
        (Builder::I64(b), Cell::Int(v)) => b.append_value(v),
        (Builder::F64(b), Cell::Float(v)) => b.append_value(v),
        (Builder::Dec(b), Cell::Dec(v)) => b.append_value(v),
        (Builder::Date(b), Cell::Date(v)) => b.append_value(v),
        (Builder::Ts(b), Cell::Ts(v)) => b.append_value(v),
        (b, _) => append_null(b),
    }
}

fn append_null(b: &mut Builder) {
    match b {
        Builder::Str(b) => b.append_null(),
        Builder::Bool(b) => b.append_null(),
        Builder::I32(b) => b.append_null(),
        Builder::I64(b) => b.append_null(),
        Builder::F64(b) => b.append_null(),
        Builder::Dec(b) => b.append_null(),
        Builder::Date(b) => b.append_null(),
        Builder::Ts(b) => b.append_null(),
    }
}

fn finish(b: &mut Builder) -> ArrayRef {
    match b {
        Builder::Str(b) => Arc::new(b.finish()),
        Builder::Bool(b) => Arc::new(b.finish()),
        Builder::I32(b) => Arc::new(b.finish()),
        Builder::I64(b) => Arc::new(b.finish()),
        Builder::F64(b) => Arc::new(b.finish()),
        Builder::Dec(b) => Arc::new(b.finish()),
        Builder::Date(b) => Arc::new(b.finish()),
        Builder::Ts(b) => Arc::new(b.finish()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::schema::arrow_type;
    use datafusion::arrow::datatypes::{Field, Schema};

    fn decoder() -> Decoder {
        let f = |n: &str, t: &str, null: bool| Field::new(n, arrow_type(t).unwrap(), null);
        let schema = Schema::new(vec![
            f("id", "int64", false),
            f("amount", "decimal(12,2)", false),
            f("at", "timestamp", false),
            f("note", "string", true),
        ]);
        Decoder::new(Arc::new(schema), 200)
    }

    #[test]
    fn good_messages_make_rows() {
        let mut d = decoder();
        d.push(br#"{"id": 1, "amount": 2450.00, "at": "2026-11-26T10:15:02.123Z", "extra": true}"#).unwrap();
        d.push(br#"{"id": 2, "amount": "12.5", "at": "2026-11-26T10:15:03Z", "note": "x"}"#).unwrap();
        let b = d.finish().unwrap();
        assert_eq!(b.num_rows(), 2);
        let amounts =
            b.column(1).as_any().downcast_ref::<datafusion::arrow::array::Decimal128Array>().unwrap();
        assert_eq!(amounts.value(0), 245000);
        assert_eq!(amounts.value(1), 1250);
    }

    #[test]
    fn each_malformed_message_has_a_reason() {
        let mut d = decoder();
        let cases: &[(&[u8], &str)] = &[
            (b"{\"id\": 1,", "bad JSON"),
            (b"[1, 2]", "not a JSON object but an array"),
            (br#"{"id": 1, "at": "2026-11-26T10:15:02Z"}"#, "missing required field 'amount'"),
            (br#"{"id": "x", "amount": 1, "at": "2026-11-26T10:15:02Z"}"#, "field 'id': expected an integer"),
            (
                br#"{"id": null, "amount": 1, "at": "2026-11-26T10:15:02Z"}"#,
                "field 'id' is required but null",
            ),
            (br#"{"id": 1, "amount": 1, "at": "yesterday"}"#, "field 'at': bad timestamp"),
            (br#"{"id": 1, "amount": 1.234, "at": "2026-11-26T10:15:02Z"}"#, "more than 2 decimal places"),
            (br#"{"id": 1, "amount": 1e12, "at": "2026-11-26T10:15:02Z"}"#, "does not fit decimal(12,2)"),
            (br#"{"id": 1.5, "amount": 1, "at": "2026-11-26T10:15:02Z"}"#, "expected an integer"),
            (&[b' '; 300], "more than the limit of 200"),
        ];
        for (raw, want) in cases {
            let err = d.push(raw).unwrap_err();
            assert!(err.contains(want), "{err} lacks {want}");
        }
        assert_eq!(d.rows(), 0);
        assert_eq!(d.finish().unwrap().num_rows(), 0);
    }
}
