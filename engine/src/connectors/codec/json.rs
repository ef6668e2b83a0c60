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
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int32Builder, Int64Builder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The largest exponent a number may be written with (`1e1000`): far past
/// every column type's range, and a bound on the work one number costs.
const MAX_EXPONENT: i64 = 1000;

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

/// What a decoder checks beyond the schema's types.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// Larger messages are refused.
    pub max_bytes: usize,
    /// A timestamp this far ahead of the clock or more is refused, or, with
    /// `clamp_future`, taken as the time it was read.
    pub max_future: Option<Duration>,
    pub clamp_future: bool,
    /// The partition column (its place in the schema), the partitions, and
    /// how a key's text picks one: a message read from partition `p` must
    /// belong there.
    pub partition: Option<(usize, u32, fn(&[u8], u32) -> u32)>,
}

/// When, and from which partition, a message was read.
#[derive(Debug, Clone, Copy, Default)]
pub struct Read {
    /// The engine's clock (µs since the epoch).
    pub now_us: i64,
    pub partition: Option<u32>,
}

/// Decodes messages into rows of `schema`.
pub struct Decoder {
    schema: SchemaRef,
    names: Vec<String>,
    /// Per field: whether it takes NaN and the infinities.
    non_finite: Vec<bool>,
    builders: Vec<Builder>,
    rows: usize,
    /// Bytes of the messages taken since the last [`Decoder::finish`].
    bytes: usize,
    checks: Checks,
    /// Timestamps ahead of the clock past `max_future`, refused or clamped.
    future: u64,
}

impl Decoder {
    pub fn new(schema: SchemaRef, checks: Checks) -> Self {
        let builders = schema.fields().iter().map(|f| builder(f.data_type())).collect();
        let names = schema.fields().iter().map(|f| f.name().clone()).collect();
        let non_finite = schema
            .fields()
            .iter()
            .map(|f| f.metadata().get(crate::plan::schema::NON_FINITE).is_some_and(|v| v == "true"))
            .collect();
        Self { schema, names, non_finite, builders, rows: 0, bytes: 0, checks, future: 0 }
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Rows taken since the last [`Decoder::finish`].
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of the messages taken since the last [`Decoder::finish`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many timestamps ahead of the clock were met (refused or
    /// clamped) since the last call.
    pub fn take_future(&mut self) -> u64 {
        std::mem::take(&mut self.future)
    }

    /// Takes one message as a row, or says why it cannot. The work is
    /// bounded by the message's size, whatever it holds.
    pub fn push(&mut self, raw: &[u8], at: Read) -> Result<(), String> {
        if raw.len() > self.checks.max_bytes {
            return Err(format!("message is {} bytes, more than the limit of {}", raw.len(), self.checks.max_bytes));
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
        let limit = self.checks.max_future.map(|d| at.now_us.saturating_add(d.as_micros() as i64));
        let mut cells = Vec::with_capacity(self.builders.len());
        for (i, (field, slot)) in self.schema.fields().iter().zip(slots).enumerate() {
            let name = field.name();
            let cell = match slot.map(RawValue::get) {
                None | Some("null") if field.is_nullable() => Cell::Null,
                None => return Err(format!("missing required field '{name}'")),
                Some("null") => return Err(format!("field '{name}' is required but null")),
                Some(text) => cell(text, field.data_type(), self.non_finite[i])
                    .map_err(|e| format!("field '{name}': {e}"))?,
            };
            let cell = match (cell, limit) {
                (Cell::Ts(us), Some(limit)) if us >= limit => {
                    self.future += 1;
                    if !self.checks.clamp_future {
                        let ahead = Duration::from_micros(us.saturating_sub(at.now_us).max(0) as u64);
                        let max = self.checks.max_future.unwrap_or_default();
                        return Err(format!(
                            "field '{name}': {} is {} ahead of the engine's clock, more than max_future ({})",
                            short(slot.map(RawValue::get).unwrap_or_default()),
                            coarse(ahead),
                            humantime::format_duration(max)
                        ));
                    }
                    Cell::Ts(at.now_us)
                }
                (cell, _) => cell,
            };
            cells.push(cell);
        }
        if let (Some((col, partitions, of)), Some(p)) = (self.checks.partition, at.partition) {
            let text: Option<Cow<[u8]>> = match &cells[col] {
                Cell::Int(i) => Some(Cow::Owned(i.to_string().into_bytes())),
                Cell::Str(s) => Some(Cow::Borrowed(s.as_bytes())),
                Cell::Null => Some(Cow::Borrowed(b"")),
                _ => None,
            };
            if let Some(text) = text {
                let belongs = of(&text, partitions);
                if belongs != p {
                    return Err(format!(
                        "{} {} belongs in partition {belongs} of {partitions}, but it was read from partition {p}",
                        self.names[col],
                        String::from_utf8_lossy(&text)
                    ));
                }
            }
        }
        for (b, c) in self.builders.iter_mut().zip(cells) {
            append(b, c);
        }
        self.rows += 1;
        self.bytes += raw.len();
        Ok(())
    }

    /// The rows taken so far as one batch; the decoder starts empty again.
    pub fn finish(&mut self) -> Result<RecordBatch, String> {
        let arrays: Vec<ArrayRef> = self.builders.iter_mut().map(finish).collect();
        self.rows = 0;
        self.bytes = 0;
        RecordBatch::try_new(self.schema.clone(), arrays).map_err(|e| e.to_string())
    }
}

/// A duration to its largest unit: `173 years`, `3 days`, `2h`, `42s`.
fn coarse(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s >= 365 * 86_400 => format!("{} years", s / (365 * 86_400)),
        s if s >= 86_400 => format!("{} days", s / 86_400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The raw JSON of each declared field of one object. A key given twice
/// is refused: readers disagree on which of the two counts.
struct Fields<'n> {
    names: &'n [String],
}

impl<'de> DeserializeSeed<'de> for Fields<'_> {
    type Value = Vec<Option<&'de RawValue>>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

/// Keys of other fields kept in a list up to this many, then in a set.
const FEW_KEYS: usize = 16;

impl<'de> Visitor<'de> for Fields<'_> {
    type Value = Vec<Option<&'de RawValue>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut slots = vec![None; self.names.len()];
        let mut others: Vec<Cow<'de, str>> = Vec::new();
        let mut many: Option<HashSet<Cow<'de, str>>> = None;
        let duplicate = |key: &str| A::Error::custom(format!("duplicate key '{}'", short(key)));
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match self.names.iter().position(|n| *n == key) {
                Some(i) if slots[i].is_some() => return Err(duplicate(&key)),
                Some(i) => slots[i] = Some(map.next_value::<&'de RawValue>()?),
                None => {
                    match &mut many {
                        Some(set) if set.contains(&key) => return Err(duplicate(&key)),
                        Some(set) => {
                            set.insert(key);
                        }
                        None if others.contains(&key) => return Err(duplicate(&key)),
                        None => {
                            others.push(key);
                            if others.len() > FEW_KEYS {
                                many = Some(others.drain(..).collect());
                            }
                        }
                    }
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

fn cell<'a>(text: &'a str, t: &DataType, non_finite: bool) -> Result<Cell<'a>, String> {
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
        DataType::Float64 => Cell::Float(float(text, non_finite).ok_or_else(|| wrong("a number"))??),
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

/// A float64 from a JSON number, or, where the column takes them, NaN and
/// the infinities; `None` when it is neither.
fn float(text: &str, non_finite: bool) -> Option<Result<f64, String>> {
    let named = match string(text).as_deref() {
        Some("NaN") => Some(f64::NAN),
        Some("Infinity") => Some(f64::INFINITY),
        Some("-Infinity") => Some(f64::NEG_INFINITY),
        _ => None,
    };
    if let Some(v) = named {
        return Some(match non_finite {
            true => Ok(v),
            false => Err(format!("{text} is not a finite number; declare the column with 'non_finite: true' to take it")),
        });
    }
    if !is_number(text) {
        return None;
    }
    let v = text.parse::<f64>().ok()?;
    Some(match v.is_finite() || non_finite {
        true => Ok(v),
        false => Err(format!("{} is out of float64's range", short(text))),
    })
}

/// A decimal number's text (`-12.5`, `2450.00`, `1e3`) exactly as a decimal
/// of scale `s`: `None` when it is not a number; an error when it has more
/// decimal places than `s` or more digits than `p`, since rounding would
/// change an amount, or an exponent past [`MAX_EXPONENT`]. The work is
/// bounded by the text's length, not by the value of its exponent.
fn decimal(text: &str, p: u8, s: i8) -> Option<Result<i128, String>> {
    let (neg, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => {
            let e = &rest[i + 1..];
            let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // More digits than any sane exponent: refused, not parsed.
            match e.parse::<i64>() {
                Ok(x) if x.abs() <= MAX_EXPONENT => (&rest[..i], x),
                _ => {
                    return Some(Err(format!(
                        "{} has an exponent beyond ±{MAX_EXPONENT}",
                        short(text)
                    )))
                }
            }
        }
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let too_big = || Some(Err(format!("{} does not fit decimal({p},{s})", short(text))));
    // The digits without leading zeros; value = digits * 10^(exp - frac.len()).
    let all: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
    let Some(first) = all.iter().position(|d| *d != 0) else { return Some(Ok(0)) };
    let mut digits = &all[first..];
    // Wanted: value * 10^s = digits * 10^shift.
    let mut shift = exp + i64::from(s) - frac.len() as i64;
    while shift < 0 {
        let Some((last, head)) = digits.split_last() else {
            return Some(Err(format!("{} has more than {s} decimal places", short(text))));
        };
        if *last != 0 {
            return Some(Err(format!("{} has more than {s} decimal places", short(text))));
        }
        digits = head;
        shift += 1;
    }
    if digits.len() as i64 + shift > i64::from(p) {
        return too_big();
    }
    let mut v: i128 = 0;
    for d in digits.iter().copied().chain(std::iter::repeat_n(0, shift as usize)) {
        v = match v.checked_mul(10).and_then(|v| v.checked_add(d as i128)) {
            Some(v) => v,
            None => return too_big(),
        };
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
        Decoder::new(Arc::new(schema), Checks { max_bytes: 200, ..Checks::default() })
    }

    fn at() -> Read {
        Read::default()
    }

    #[test]
    fn good_messages_make_rows() {
        let mut d = decoder();
        d.push(br#"{"id": 1, "amount": 2450.00, "at": "2026-11-26T10:15:02.123Z", "extra": true}"#, at()).unwrap();
        d.push(br#"{"id": 2, "amount": "12.5", "at": "2026-11-26T10:15:03Z", "note": "x"}"#, at()).unwrap();
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
        assert_eq!(decimal("0.00e5", 12, 2), Some(Ok(0)));
        assert_eq!(decimal("000123.40", 12, 2), Some(Ok(12340)));
        assert_eq!(decimal("1234567890.12", 12, 2), Some(Ok(123456789012)));
        assert!(decimal("12345678901.00", 12, 2).unwrap().unwrap_err().contains("does not fit"));
        assert_eq!(decimal("25e-1", 12, 2), Some(Ok(250)));
        assert!(decimal("1e-3", 12, 2).unwrap().unwrap_err().contains("more than 2 decimal places"));
    }

    /// A number's exponent costs nothing however large: past ±1000 it is
    /// refused at once, zero or not (a digit-by-digit reader would shift
    /// `0e2000000000` two billion times).
    #[test]
    fn absurd_exponents_are_refused_at_once() {
        let started = std::time::Instant::now();
        for text in ["0e2000000000", "1e2000000000", "0e-2000000000", "5e99999999999999999999", "1e1001"] {
            let e = decimal(text, 38, 10).unwrap().unwrap_err();
            assert!(e.contains("exponent beyond"), "{text}: {e}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(decimal("0e1000", 12, 2), Some(Ok(0)));
        assert!(decimal("1e1000", 12, 2).unwrap().unwrap_err().contains("does not fit"));
        assert_eq!(decimal("1e", 12, 2), None);
    }

    /// Floats beyond float64's range, NaN and the infinities are refused
    /// unless the column takes them; a key given twice is refused.
    #[test]
    fn non_finite_floats_and_duplicate_keys() {
        let plain = Field::new("x", DataType::Float64, true);
        let allows = Field::new("y", DataType::Float64, true)
            .with_metadata([(crate::plan::schema::NON_FINITE.to_string(), "true".to_string())].into());
        let schema = Arc::new(Schema::new(vec![plain, allows]));
        let mut d = Decoder::new(schema, Checks { max_bytes: 1000, ..Checks::default() });
        let err = |d: &mut Decoder, raw: &str| d.push(raw.as_bytes(), at()).unwrap_err();
        assert!(err(&mut d, r#"{"x": 1e400}"#).contains("out of float64's range"));
        assert!(err(&mut d, r#"{"x": "NaN"}"#).contains("non_finite: true"));
        assert!(err(&mut d, r#"{"x": 1, "x": 2}"#).contains("duplicate key 'x'"));
        assert!(err(&mut d, r#"{"z": 1, "y": 2, "z": 3}"#).contains("duplicate key 'z'"));
        let many: Vec<String> = (0..40).map(|i| format!("\"k{i}\": {i}")).collect();
        let raw = format!("{{{}, \"k7\": 0}}", many.join(", "));
        assert!(err(&mut d, &raw).contains("duplicate key 'k7'"));
        d.push(br#"{"x": 1.5, "y": "-Infinity"}"#, at()).unwrap();
        d.push(br#"{"y": 1e400}"#, at()).unwrap();
        let b = d.finish().unwrap();
        let y = b.column(1).as_any().downcast_ref::<datafusion::arrow::array::Float64Array>().unwrap();
        assert_eq!((y.value(0), y.value(1)), (f64::NEG_INFINITY, f64::INFINITY));
    }

    /// A timestamp past `max_future` is refused, or taken as the time it
    /// was read; an event whose key belongs in another partition is refused.
    #[test]
    fn far_future_timestamps_and_misrouted_keys() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("at", arrow_type("timestamp").unwrap(), false),
        ]));
        let now = 1_780_000_000_000_000i64; // 2026-05-28
        let checks = Checks {
            max_bytes: 1000,
            max_future: Some(std::time::Duration::from_secs(300)),
            clamp_future: false,
            partition: Some((0, 4, |text, p| text.len() as u32 % p)),
        };
        let mut d = Decoder::new(schema.clone(), checks.clone());
        let read = Read { now_us: now, partition: Some(2) };
        let e = d.push(br#"{"k": 10, "at": "2200-01-01T00:00:00Z"}"#, read).unwrap_err();
        assert!(e.contains("173 years ahead of the engine's clock, more than max_future (5m)"), "{e}");
        assert_eq!(d.take_future(), 1);
        d.push(br#"{"k": 10, "at": "2026-05-28T20:30:00Z"}"#, read).unwrap();
        let e = d.push(br#"{"k": 100, "at": "2026-05-28T20:30:00Z"}"#, read).unwrap_err();
        assert_eq!(e, "k 100 belongs in partition 3 of 4, but it was read from partition 2");
        let mut clamped = Decoder::new(schema, Checks { clamp_future: true, ..checks });
        clamped.push(br#"{"k": 10, "at": "2200-01-01T00:00:00Z"}"#, read).unwrap();
        assert_eq!(clamped.take_future(), 1);
        let b = clamped.finish().unwrap();
        let t = b.column(1).as_any().downcast_ref::<datafusion::arrow::array::TimestampMicrosecondArray>().unwrap();
        assert_eq!(t.value(0), now);
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
            let err = d.push(raw, at()).unwrap_err();
            assert!(err.contains(want), "{err} lacks {want}");
        }
        assert_eq!(d.rows(), 0);
        assert_eq!(d.finish().unwrap().num_rows(), 0);
    }
}
