//! The redis sink: each row as one JSON message, PUBLISHed on a channel or
//! XADDed to a stream (field `payload`), a batch in one pipeline.

use datafusion::arrow::record_batch::RecordBatch;

use super::config::RedisSink;

/// Writes `batches` to `sink` on `conn`; returns the messages sent.
pub async fn write(
    conn: &mut redis::aio::ConnectionManager,
    sink: &RedisSink,
    batches: &[RecordBatch],
) -> Result<u64, String> {
    let rows = crate::connectors::codec::json_rows(batches)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut pipe = redis::pipe();
    for row in &rows {
        match (&sink.channel, &sink.stream) {
            (Some(ch), _) => pipe.cmd("PUBLISH").arg(ch).arg(row.as_slice()).ignore(),
            (None, Some(st)) => {
                let cmd = pipe.cmd("XADD").arg(st);
                if let Some(n) = sink.maxlen {
                    cmd.arg("MAXLEN").arg("~").arg(n);
                }
                cmd.arg("*").arg("payload").arg(row.as_slice()).ignore()
            }
            (None, None) => return Err("redis sink without 'channel' or 'stream'".into()),
        };
    }
    pipe.query_async::<()>(conn).await.map_err(|e| e.to_string())?;
    Ok(rows.len() as u64)
}
