//! Codecs between Arrow record batches and the bytes systems exchange:
//! [`json`] decodes JSON messages into batches by a declared schema, and the
//! functions here write batches as JSON, the one Arrow-to-JSON writer every
//! sink, report and quarantine table uses.

pub mod json;

use datafusion::arrow::json::writer::{LineDelimited, WriterBuilder};
use datafusion::arrow::record_batch::RecordBatch;

/// Rows as JSON objects, one per row; NULLs are written as `null`.
pub fn json_rows(batches: &[RecordBatch]) -> std::result::Result<Vec<Vec<u8>>, String> {
    let mut buf = Vec::new();
    let mut w = WriterBuilder::new().with_explicit_nulls(true).build::<_, LineDelimited>(&mut buf);
    for b in batches {
        w.write(b).map_err(|e| e.to_string())?;
    }
    w.finish().map_err(|e| e.to_string())?;
    drop(w);
    Ok(buf.split(|c| *c == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect())
}

/// Rows as one JSON array of objects.
pub fn json_array(batches: &[RecordBatch]) -> std::result::Result<String, String> {
    join_array(&json_rows(batches)?)
}

/// JSON objects (from [`json_rows`]) as one JSON array.
pub fn join_array(rows: &[Vec<u8>]) -> std::result::Result<String, String> {
    let mut out = Vec::with_capacity(rows.iter().map(|r| r.len() + 1).sum::<usize>() + 2);
    out.push(b'[');
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(r);
    }
    out.push(b']');
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// Rows as JSON values (reports, quarantine rows, test outputs).
pub fn json_values(batches: &[RecordBatch]) -> Result<Vec<serde_json::Value>, String> {
    json_rows(batches)?
        .iter()
        .map(|r| serde_json::from_slice(r).map_err(|e| format!("a row did not read back as JSON: {e}")))
        .collect()
}
