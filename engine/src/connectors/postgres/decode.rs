//! Decoding PostgreSQL's binary COPY format into Arrow record batches.
//!
//! Hand-written because no maintained crate turns `COPY ... TO STDOUT (FORMAT
//! binary)` into Arrow; the format is small and documented (header, then per
//! row a field count and length-prefixed fields in each type's binary send
//! format). Reading COPY instead of row-by-row queries is what makes the
//! postgres source fast.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use datafusion::arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder, Float64Builder,
    Int16Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;

/// A result column: its name, type oid and type modifier.
#[derive(Debug, Clone)]
pub struct PgColumn {
    pub name: String,
    pub oid: u32,
    pub typmod: i32,
    pub type_name: String,
}

/// Days and microseconds between 1970-01-01 and PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The Arrow type a column is read as.
pub fn arrow_type(c: &PgColumn) -> Result<DataType, String> {
    Ok(match c.oid {
        16 => DataType::Boolean,
        21 => DataType::Int16,
        23 => DataType::Int32,
        20 => DataType::Int64,
        700 => DataType::Float32,
        701 => DataType::Float64,
        1700 => {
            let (p, s) = numeric_precision(c.typmod);
            DataType::Decimal128(p, s)
        }
        25 | 1043 | 1042 | 19 | 114 | 3802 | 2950 => DataType::Utf8,
        1082 => DataType::Date32,
        1114 => DataType::Timestamp(TimeUnit::Microsecond, None),
        1184 => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        _ => {
            return Err(format!(
                "column '{}' has type {}, which the engine does not read; cast it in a query (e.g. {}::text)",
                c.name, c.type_name, c.name
            ))
        }
    })
}

/// The type oid of `numeric`.
pub const NUMERIC_OID: u32 = 1700;

/// numeric(p,s) from its type modifier; unconstrained numeric as (38, 10).
fn numeric_precision(typmod: i32) -> (u8, i8) {
    if typmod < 4 {
        return (38, 10);
    }
    let t = typmod - 4;
    let p = ((t >> 16) & 0xffff) as u8;
    let s = (t & 0xffff) as i8;
    (p.clamp(1, 38), s)
}

pub fn schema(columns: &[PgColumn]) -> Result<SchemaRef, String> {
    let fields: Result<Vec<Field>, String> =
        columns.iter().map(|c| arrow_type(c).map(|t| Field::new(&c.name, t, true))).collect();
    Ok(Arc::new(Schema::new(fields?)))
}

enum Col {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Decimal(Decimal128Builder, u8, i8),
    Text(StringBuilder, TextKind),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
}

#[derive(Clone, Copy, PartialEq)]
enum TextKind {
    Plain,
    /// char(n): trailing blanks are padding.
    Padded,
    /// jsonb: a version byte, then the text.
    Jsonb,
    Uuid,
}

/// Turns COPY binary data into record batches of up to `batch_rows` rows.
pub struct Decoder {
    schema: SchemaRef,
    oids: Vec<u32>,
    cols: Vec<Col>,
    rows: usize,
    batch_rows: usize,
    buf: BytesMut,
    header_done: bool,
    finished: bool,
}

fn err(msg: impl Into<String>) -> String {
    format!("COPY data: {}", msg.into())
}

impl Decoder {
    pub fn new(columns: &[PgColumn], batch_rows: usize) -> Result<Self, String> {
        let schema = schema(columns)?;
        let mut d = Decoder {
            schema,
            oids: columns.iter().map(|c| c.oid).collect(),
            cols: vec![],
            rows: 0,
            batch_rows,
            buf: BytesMut::new(),
            header_done: false,
            finished: false,
        };
        d.cols = d.builders();
        Ok(d)
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn builders(&self) -> Vec<Col> {
        let n = self.batch_rows;
        self.schema
            .fields()
            .iter()
            .zip(&self.oids)
            .map(|(f, oid)| match f.data_type() {
                DataType::Boolean => Col::Bool(BooleanBuilder::with_capacity(n)),
                DataType::Int16 => Col::I16(Int16Builder::with_capacity(n)),
                DataType::Int32 => Col::I32(Int32Builder::with_capacity(n)),
                DataType::Int64 => Col::I64(Int64Builder::with_capacity(n)),
                DataType::Float32 => Col::F32(Float32Builder::with_capacity(n)),
                DataType::Float64 => Col::F64(Float64Builder::with_capacity(n)),
                DataType::Decimal128(p, s) => Col::Decimal(
                    Decimal128Builder::with_capacity(n).with_data_type(DataType::Decimal128(*p, *s)),
                    *p,
                    *s,
                ),
                DataType::Date32 => Col::Date(Date32Builder::with_capacity(n)),
                DataType::Timestamp(_, tz) => Col::Timestamp(
                    TimestampMicrosecondBuilder::with_capacity(n).with_timezone_opt(tz.clone()),
                ),
                _ => {
                    let kind = match oid {
                        1042 => TextKind::Padded,
                        3802 => TextKind::Jsonb,
                        2950 => TextKind::Uuid,
                        _ => TextKind::Plain,
                    };
                    Col::Text(StringBuilder::with_capacity(n, n * 16), kind)
                }
            })
            .collect()
    }

    /// Adds COPY bytes; returns the batches they completed.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<RecordBatch>, String> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        if !self.header_done {
            if self.buf.len() < 19 {
                return Ok(out);
            }
            if &self.buf[..11] != b"PGCOPY\n\xff\r\n\0" {
                return Err(err("not binary COPY output"));
            }
            let ext = u32::from_be_bytes([self.buf[15], self.buf[16], self.buf[17], self.buf[18]]) as usize;
            if self.buf.len() < 19 + ext {
                return Ok(out);
            }
            self.buf.advance(19 + ext);
            self.header_done = true;
        }
        while !self.finished {
            match self.row_len()? {
                None => break,
                Some(len) => {
                    let row = self.buf.split_to(len);
                    self.decode_row(&row)?;
                    if self.rows >= self.batch_rows {
                        out.push(self.flush()?);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The byte length of the next complete row in the buffer, if there is one.
    fn row_len(&mut self) -> Result<Option<usize>, String> {
        if self.buf.len() < 2 {
            return Ok(None);
        }
        let fields = i16::from_be_bytes([self.buf[0], self.buf[1]]);
        if fields == -1 {
            self.finished = true;
            self.buf.advance(2);
            return Ok(None);
        }
        if fields as usize != self.cols.len() {
            return Err(err(format!("a row has {fields} fields, expected {}", self.cols.len())));
        }
        let mut at = 2;
        for _ in 0..fields {
            if self.buf.len() < at + 4 {
                return Ok(None);
            }
            let len =
                i32::from_be_bytes([self.buf[at], self.buf[at + 1], self.buf[at + 2], self.buf[at + 3]]);
            at += 4 + len.max(0) as usize;
        }
        Ok((self.buf.len() >= at).then_some(at))
    }

    fn decode_row(&mut self, row: &[u8]) -> Result<(), String> {
        let mut at = 2;
        for i in 0..self.cols.len() {
            let len = i32::from_be_bytes([row[at], row[at + 1], row[at + 2], row[at + 3]]);
            at += 4;
            let value = if len < 0 {
                None
            } else {
                let v = &row[at..at + len as usize];
                at += len as usize;
                Some(v)
            };
            let name = self.schema.field(i).name().clone();
            append(&mut self.cols[i], value).map_err(|e| err(format!("column '{name}': {e}")))?;
        }
        self.rows += 1;
        Ok(())
    }

    /// The rows decoded so far as a batch.
    pub fn flush(&mut self) -> Result<RecordBatch, String> {
        let fresh = self.builders();
        let cols = std::mem::replace(&mut self.cols, fresh);
        let arrays: Vec<ArrayRef> = cols.into_iter().map(finish).collect();
        self.rows = 0;
        RecordBatch::try_new(self.schema.clone(), arrays).map_err(|e| err(e.to_string()))
    }

    pub fn pending_rows(&self) -> usize {
        self.rows
    }

    /// Ends the input: the rows still pending, if any. Output that stopped
    /// short of the end-of-data marker was cut off, which is an error, never
    /// a shorter table.
    pub fn finish(&mut self) -> Result<Option<RecordBatch>, String> {
        if !self.finished {
            return Err(err(format!(
                "the COPY output ended before its end-of-data marker ({} bytes of a row pending)",
                self.buf.len()
            )));
        }
        if self.rows == 0 {
            return Ok(None);
        }
        self.flush().map(Some)
    }
}

fn be<const N: usize>(v: &[u8]) -> Result<[u8; N], String> {
    v.try_into().map_err(|_| format!("expected {N} bytes, got {}", v.len()))
}

fn append(col: &mut Col, v: Option<&[u8]>) -> Result<(), String> {
    let Some(v) = v else {
        match col {
            Col::Bool(b) => b.append_null(),
            Col::I16(b) => b.append_null(),
            Col::I32(b) => b.append_null(),
            Col::I64(b) => b.append_null(),
            Col::F32(b) => b.append_null(),
            Col::F64(b) => b.append_null(),
            Col::Decimal(b, _, _) => b.append_null(),
            Col::Text(b, _) => b.append_null(),
            Col::Date(b) => b.append_null(),
            Col::Timestamp(b) => b.append_null(),
        }
        return Ok(());
    };
    match col {
        Col::Bool(b) => b.append_value(v.first().is_some_and(|x| *x != 0)),
        Col::I16(b) => b.append_value(i16::from_be_bytes(be(v)?)),
        Col::I32(b) => b.append_value(i32::from_be_bytes(be(v)?)),
        Col::I64(b) => b.append_value(i64::from_be_bytes(be(v)?)),
        Col::F32(b) => b.append_value(f32::from_be_bytes(be(v)?)),
        Col::F64(b) => b.append_value(f64::from_be_bytes(be(v)?)),
        Col::Decimal(b, p, s) => b.append_value(numeric(v, *p, *s)?),
        Col::Date(b) => b.append_value(i32::from_be_bytes(be(v)?).saturating_add(PG_EPOCH_DAYS)),
        Col::Timestamp(b) => b.append_value(i64::from_be_bytes(be(v)?).saturating_add(PG_EPOCH_MICROS)),
        Col::Text(b, kind) => {
            let text = match kind {
                TextKind::Jsonb => v.get(1..).unwrap_or_default(),
                _ => v,
            };
            if *kind == TextKind::Uuid {
                b.append_value(uuid(v)?);
            } else {
                let s = std::str::from_utf8(text).map_err(|e| e.to_string())?;
                b.append_value(if *kind == TextKind::Padded { s.trim_end_matches(' ') } else { s });
            }
        }
    }
    Ok(())
}

fn uuid(v: &[u8]) -> Result<String, String> {
    let h: String = v.iter().map(|b| format!("{b:02x}")).collect();
    if h.len() != 32 {
        return Err("a uuid is 16 bytes".into());
    }
    Ok(format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]))
}

/// A numeric in PostgreSQL's binary form (base-10000 digits) as an i128 at
/// scale `s`, checked against precision `p`.
pub fn numeric(v: &[u8], p: u8, s: i8) -> Result<i128, String> {
    if v.len() < 8 {
        return Err("a numeric is at least 8 bytes".into());
    }
    let ndigits = i16::from_be_bytes([v[0], v[1]]) as i32;
    let weight = i16::from_be_bytes([v[2], v[3]]) as i32;
    let sign = u16::from_be_bytes([v[4], v[5]]);
    if sign == 0xC000 {
        return Err("NaN does not fit a decimal column".into());
    }
    if sign == 0xD000 || sign == 0xF000 {
        return Err("infinity does not fit a decimal column".into());
    }
    if ndigits < 0 || v.len() < 8 + 2 * ndigits as usize {
        return Err("truncated numeric".into());
    }
    let mut acc: i128 = 0;
    let overflow = || format!("value does not fit decimal({p},{s})");
    for i in 0..ndigits as usize {
        let d = i16::from_be_bytes([v[8 + 2 * i], v[9 + 2 * i]]) as i128;
        acc = acc.checked_mul(10_000).and_then(|a| a.checked_add(d)).ok_or_else(overflow)?;
    }
    // acc * 10000^(weight - ndigits + 1) * 10^s
    let exp10 = 4 * (weight - ndigits + 1) + s as i32;
    if exp10 >= 0 {
        acc = acc.checked_mul(10i128.checked_pow(exp10 as u32).ok_or_else(overflow)?).ok_or_else(overflow)?;
    } else {
        // More places than the column is read at: an error, not a
        // rounding (an unconstrained numeric is read at 10 places).
        let places = || {
            format!(
                "{} has more than {s} decimal places; declare the column as decimal(p,s) in the source's schema to read it exactly",
                numeric_text(v)
            )
        };
        match 10i128.checked_pow((-exp10) as u32) {
            Some(div) if acc % div == 0 => acc /= div,
            Some(_) => return Err(places()),
            None if acc == 0 => {}
            None => return Err(places()),
        }
    }
    if acc >= 10i128.pow(p as u32) {
        return Err(overflow());
    }
    Ok(if sign == 0x4000 { -acc } else { acc })
}

/// A numeric in PostgreSQL's binary form as decimal text, for messages
/// (its first 40 digits).
fn numeric_text(v: &[u8]) -> String {
    let ndigits = i16::from_be_bytes([v[0], v[1]]).max(0) as usize;
    let weight = i16::from_be_bytes([v[2], v[3]]) as i64;
    let sign = if u16::from_be_bytes([v[4], v[5]]) == 0x4000 { "-" } else { "" };
    let digit = |i: i64| -> u16 {
        if i < 0 || i as usize >= ndigits || 9 + 2 * i as usize >= v.len() {
            0
        } else {
            u16::from_be_bytes([v[8 + 2 * i as usize], v[9 + 2 * i as usize]])
        }
    };
    let mut int = String::new();
    for i in 0..=weight.clamp(-1, 10) {
        let d = digit(i);
        if int.is_empty() {
            if d != 0 || i == weight {
                int = d.to_string();
            }
        } else {
            int.push_str(&format!("{d:04}"));
        }
    }
    if int.is_empty() {
        int.push('0');
    }
    let mut frac = String::new();
    for i in (weight + 1).max(0)..(ndigits as i64).min(weight + 12) {
        frac.push_str(&format!("{:04}", digit(i)));
    }
    if weight < -1 {
        frac = "0000".repeat(((-weight - 1) as usize).min(10)) + &frac;
    }
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

fn finish(col: Col) -> ArrayRef {
    match col {
        Col::Bool(mut b) => Arc::new(b.finish()),
        Col::I16(mut b) => Arc::new(b.finish()),
        Col::I32(mut b) => Arc::new(b.finish()),
        Col::I64(mut b) => Arc::new(b.finish()),
        Col::F32(mut b) => Arc::new(b.finish()),
        Col::F64(mut b) => Arc::new(b.finish()),
        Col::Decimal(mut b, _, _) => Arc::new(b.finish()),
        Col::Text(mut b, _) => Arc::new(b.finish()),
        Col::Date(mut b) => Arc::new(b.finish()),
        Col::Timestamp(mut b) => ArrayBuilder::finish(&mut b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [ndigits as u16, weight as u16, sign, dscale] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    /// More places than the column is read at is an error naming the value.
    #[test]
    fn a_numeric_is_never_rounded() {
        let v = num(4, -1, 0, 14, &[1234, 5678, 9012, 3400]);
        let e = numeric(&v, 38, 10).unwrap_err();
        assert!(e.contains("0.12345678901234 has more than 10 decimal places"), "{e}");
        assert_eq!(numeric(&v, 30, 14).unwrap(), 12_345_678_901_234);
        assert_eq!(numeric_text(&num(2, 1, 0x4000, 1, &[12, 3400])), "-123400");
        assert!(numeric(&num(-3, 0, 0, 0, &[]), 12, 2).is_err());
    }

    #[test]
    fn numerics_decode_at_the_column_scale() {
        // 2450.00 = digits [2450], weight 0
        assert_eq!(numeric(&num(1, 0, 0, 2, &[2450]), 12, 2).unwrap(), 245_000);
        // 12345.67 = [1, 2345, 6700], weight 1
        assert_eq!(numeric(&num(3, 1, 0, 2, &[1, 2345, 6700]), 12, 2).unwrap(), 1_234_567);
        // -0.05 = [500], weight -1
        assert_eq!(numeric(&num(1, -1, 0x4000, 2, &[500]), 12, 2).unwrap(), -5);
        // 0
        assert_eq!(numeric(&num(0, 0, 0, 2, &[]), 12, 2).unwrap(), 0);
        assert!(numeric(&num(1, 2, 0, 0, &[1]), 4, 0).is_err());
    }

    /// Binary COPY of one int8 column: the header, rows, and the trailer when `end`.
    fn copy_bytes(values: &[i64], end: bool) -> Vec<u8> {
        let mut v = b"PGCOPY\n\xff\r\n\0".to_vec();
        v.extend_from_slice(&[0; 8]);
        for x in values {
            v.extend_from_slice(&1i16.to_be_bytes());
            v.extend_from_slice(&8i32.to_be_bytes());
            v.extend_from_slice(&x.to_be_bytes());
        }
        if end {
            v.extend_from_slice(&(-1i16).to_be_bytes());
        }
        v
    }

    #[test]
    fn output_cut_off_before_the_end_marker_is_an_error() {
        let cols = [PgColumn { name: "id".into(), oid: 20, typmod: -1, type_name: "bigint".into() }];
        let mut whole = Decoder::new(&cols, 100).unwrap();
        assert!(whole.push(&copy_bytes(&[1, 2, 3], true)).unwrap().is_empty());
        assert_eq!(whole.finish().unwrap().map(|b| b.num_rows()), Some(3));

        let mut cut = Decoder::new(&cols, 100).unwrap();
        cut.push(&copy_bytes(&[1, 2, 3], false)).unwrap();
        let e = cut.finish().unwrap_err();
        assert!(e.contains("ended before its end-of-data marker"), "{e}");
    }
}
