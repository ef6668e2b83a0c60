//! JSON messages into Arrow micro-batches by a declared schema.
//!
//! Each message is checked on its own: a malformed one (not JSON, not an
//! object, a missing or null required field, a value of the wrong type or out
//! of range, too large) is refused with a reason naming the field, and the
//! rows already taken are untouched. arrow-json's decoder works a batch at a
//! time and cannot say which message of a batch was bad, which a dead letter
//! needs; hence this per-message decoder. It reads each object's fields as
//! raw JSON slices (serde_json's `RawValue`, no tree built), so decimals are
//! taken exactly from their text.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int32Builder, Int64Builder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// One decoded value, held until the whole message has decoded.
enum Cell<'a> {
    Null,
    Str(Cow<'a, str>),
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
    names: Vec<String>,
    builders: Vec<Builder>,
    rows: usize,
    max_bytes: usize,
}

impl Decoder {
    pub fn new(schema: SchemaRef, max_bytes: usize) -> Self {
        let builders = schema.fields().iter().map(|f| builder(f.data_type())).collect();
        let names = schema.fields().iter().map(|f| f.name().clone()).collect();
        Self { schema, names, builders, rows: 0, max_bytes }
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
        if raw.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(match serde_json::from_slice::<serde_json::Value>(raw) {
                Ok(v) => format!("message is not a JSON object but {}", kind(&v.to_string())),
                Err(e) => format!("bad JSON: {e}"),
            });
        }
        let mut de = serde_json::Deserializer::from_slice(raw);
        let slots =
            Fields { names: &self.names }.deserialize(&mut de).map_err(|e| format!("bad JSON: {e}"))?;
        de.end().map_err(|e| format!("bad JSON: {e}"))?;
        let mut cells = Vec::with_capacity(self.builders.len());
        for (field, slot) in self.schema.fields().iter().zip(slots) {
            let name = field.name();
            let cell = match slot.map(RawValue::get) {
                None | Some("null") if field.is_nullable() => Cell::Null,
                None => return Err(format!("missing required field '{name}'")),
                Some("null") => return Err(format!("field '{name}' is required but null")),
                Some(text) => cell(text, field.data_type()).map_err(|e| format!("field '{name}': {e}"))?,
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

/// The raw JSON of each declared field of one object (the last of repeated keys).
struct Fields<'n> {
    names: &'n [String],
}

impl<'de> DeserializeSeed<'de> for Fields<'_> {
    type Value = Vec<Option<&'de RawValue>>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Fields<'_> {
    type Value = Vec<Option<&'de RawValue>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut slots = vec![None; self.names.len()];
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match self.names.iter().position(|n| *n == key) {
                Some(i) => slots[i] = Some(map.next_value::<&'de RawValue>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(slots)
    }
}

/// What kind of JSON value `text` is, for messages.
fn kind(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        Some(b'n') => "null",
        _ => "a number",
    }
}

fn is_number(text: &str) -> bool {
    kind(text) == "a number"
}

/// The content of a JSON string, borrowed when it has no escapes.
fn string(text: &str) -> Option<Cow<'_, str>> {
    if !text.starts_with('"') {
        return None;
    }
    match serde_json::from_str::<&str>(text) {
        Ok(s) => Some(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(text).ok().map(Cow::Owned),
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

fn cell<'a>(text: &'a str, t: &DataType) -> Result<Cell<'a>, String> {
    let wrong = |want: &str| format!("expected {want}, got {} {}", kind(text), short(text));
    let int = || text.parse::<i64>().map_err(|_| wrong("an integer"));
    Ok(match t {
        DataType::Boolean => match text {
            "true" => Cell::Bool(true),
            "false" => Cell::Bool(false),
            _ => return Err(wrong("true or false")),
        },
        DataType::Int32 => {
            let i = int()?;
            i32::try_from(i).map_err(|_| format!("{i} does not fit int32"))?;
            Cell::Int(i)
        }
        DataType::Int64 => Cell::Int(int()?),
        DataType::Float64 if is_number(text) => Cell::Float(text.parse().map_err(|_| wrong("a number"))?),
        DataType::Float64 => return Err(wrong("a number")),
        DataType::Decimal128(p, s) => {
            let digits = match string(text) {
                Some(s) => s,
                None if is_number(text) => Cow::Borrowed(text),
                None => return Err(wrong("a decimal number")),
            };
            Cell::Dec(decimal(digits.trim(), *p, *s).ok_or_else(|| wrong("a decimal number"))??)
        }
        DataType::Date32 => {
            let s = string(text).ok_or_else(|| wrong("a date string (YYYY-MM-DD)"))?;
            let nanos = string_to_timestamp_nanos(&format!("{s}T00:00:00Z"))
                .map_err(|_| format!("bad date {}; write YYYY-MM-DD", short(text)))?;
            Cell::Date((nanos.div_euclid(86_400_000_000_000)) as i32)
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            let s = string(text).ok_or_else(|| wrong("an RFC 3339 timestamp string"))?;
            let nanos = string_to_timestamp_nanos(&s)
                .map_err(|_| format!("bad timestamp {}; write e.g. 2026-11-26T10:15:02Z", short(text)))?;
            Cell::Ts(nanos.div_euclid(1000))
        }
        _ => Cell::Str(string(text).ok_or_else(|| wrong("a string"))?),
    })
}

/// A decimal number's text (`-12.5`, `2450.00`, `1e3`) exactly as a decimal
/// of scale `s`: `None` when it is not a number; an error when it has more
/// decimal places than `s` or more digits than `p`, since rounding would
/// change an amount.
fn decimal(text: &str, p: u8, s: i8) -> Option<Result<i128, String>> {
    let (neg, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i32>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let too_big = || Some(Err(format!("{text} does not fit decimal({p},{s})")));
    let mut digits: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
    // value = digits * 10^(exp - frac.len()); wanted: value * 10^s
    let mut shift = exp + s as i32 - frac.len() as i32;
    while shift < 0 {
        if digits.pop()? != 0 {
            return Some(Err(format!("{text} has more than {s} decimal places")));
        }
        shift += 1;
    }
    let mut v: i128 = 0;
    for d in digits.into_iter().chain(std::iter::repeat_n(0, shift as usize)) {
        v = match v.checked_mul(10).and_then(|v| v.checked_add(d as i128)) {
            Some(v) => v,
            None => return too_big(),
        };
    }
    if v >= 10i128.pow(p as u32) {
        return too_big();
    }
    Some(Ok(if neg { -v } else { v }))
}

fn short(text: &str) -> String {
    if text.len() > 40 {
        format!("{}...", &text[..text.char_indices().nth(37).map(|(i, _)| i).unwrap_or(text.len())])
    } else {
        text.to_string()
    }
}

fn append(b: &mut Builder, c: Cell<'_>) {
    match (b, c) {
        (Builder::Str(b), Cell::Str(v)) => b.append_value(v.as_ref()),
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
    fn decimals_are_exact() {
        assert_eq!(decimal("2450.00", 12, 2), Some(Ok(245000)));
        assert_eq!(decimal("-0.5", 12, 2), Some(Ok(-50)));
        assert_eq!(decimal("1e3", 12, 2), Some(Ok(100000)));
        assert_eq!(decimal("12.340", 12, 2), Some(Ok(1234)));
        assert!(decimal("12.345", 12, 2).unwrap().unwrap_err().contains("more than 2 decimal places"));
        assert!(decimal("1e10", 12, 2).unwrap().unwrap_err().contains("does not fit"));
        assert_eq!(decimal("abc", 12, 2), None);
        assert_eq!(decimal("", 12, 2), None);
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
