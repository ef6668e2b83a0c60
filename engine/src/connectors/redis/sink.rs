//! The redis sink: each row as one JSON message, PUBLISHed on a channel or
//! XADDed to a stream (field `payload`), a batch in one pipeline. With
//! `partitions`, a row goes to its partition's stream (see [`super::partition`]).

use datafusion::arrow::record_batch::RecordBatch;

use super::config::RedisSink;

/// The partition of every row of `batches` (none when the sink has one):
/// an error names a missing `partition_by` column.
pub fn partitions(sink: &RedisSink, batches: &[RecordBatch]) -> Result<Vec<u32>, String> {
    let partitions = sink.partitions.unwrap_or(1);
    let mut parts = Vec::new();
    if let (true, Some(col)) = (partitions > 1, &sink.partition_by) {
        for b in batches {
            let i = b
                .schema()
                .index_of(col)
                .map_err(|_| format!("partition_by column '{col}' is not in its input"))?;
            parts.extend(super::partition::of_column(b.column(i), partitions)?);
        }
    }
    Ok(parts)
}

/// Writes `batches` to `sink` on `conn`, each row to its partition of
/// `parts` (from [`partitions`]); returns the messages sent.
pub async fn write(
    conn: &mut redis::aio::ConnectionManager,
    sink: &RedisSink,
    batches: &[RecordBatch],
    parts: &[u32],
) -> Result<u64, String> {
    let rows = crate::connectors::codec::json_rows(batches)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let partitions = sink.partitions.unwrap_or(1);
    let mut pipe = redis::pipe();
    for (i, row) in rows.iter().enumerate() {
        match (&sink.channel, &sink.stream) {
            (Some(ch), _) => pipe.cmd("PUBLISH").arg(ch).arg(row.as_slice()).ignore(),
            (None, Some(st)) => {
                let key = super::partition::stream_key(st, parts.get(i).copied().unwrap_or(0), partitions);
                let cmd = pipe.cmd("XADD").arg(key);
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
