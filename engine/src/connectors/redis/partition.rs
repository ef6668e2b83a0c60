//! Partitioned streams: partition `p` of a stream `s` with `P` partitions is
//! the Redis stream `s:p` (with `P = 1`, `s` itself). An event's partition is
//! CRC-32 (IEEE, as Python's `zlib.crc32`) of its key's text, integers in
//! decimal, modulo `P`, so any producer can place events the way the engine
//! reads them; a NULL key counts as the empty text (partition 0).

use datafusion::arrow::array::{Array, ArrayRef, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;

/// The Redis stream holding partition `p`.
pub fn stream_key(stream: &str, p: u32, partitions: u32) -> String {
    if partitions <= 1 {
        stream.to_string()
    } else {
        format!("{stream}:{p}")
    }
}

/// The partition of a key's text.
pub fn of(text: &[u8], partitions: u32) -> u32 {
    crc32fast::hash(text) % partitions.max(1)
}

/// The partition of every row, from its key column.
pub fn of_column(column: &ArrayRef, partitions: u32) -> Result<Vec<u32>, String> {
    let text = cast(column, &DataType::Utf8).map_err(|e| format!("partition key as text: {e}"))?;
    let text = text.as_any().downcast_ref::<StringArray>().ok_or("partition key as text")?;
    Ok((0..text.len())
        .map(|i| if text.is_null(i) { of(b"", partitions) } else { of(text.value(i).as_bytes(), partitions) })
        .collect())
}

/// The partitions shard `index` of `shards` reads: those with `p mod shards == index`.
pub fn owned(partitions: u32, shard: Option<(u32, u32)>) -> Vec<u32> {
    match shard {
        None => (0..partitions).collect(),
        Some((index, shards)) => (0..partitions).filter(|p| p % shards == index).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use std::sync::Arc;

    /// Values from Python: `zlib.crc32(str(k).encode()) % 6`.
    #[test]
    fn partitions_match_python_zlib_crc32() {
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926, "the IEEE check value");
        let keys: ArrayRef = Arc::new(Int64Array::from(vec![Some(1), Some(42), Some(10_000), None]));
        assert_eq!(of_column(&keys, 6).unwrap(), vec![5, 2, 3, 0]);
        assert_eq!(stream_key("tx", 3, 6), "tx:3");
        assert_eq!(stream_key("tx", 0, 1), "tx");
        assert_eq!(owned(6, Some((1, 3))), vec![1, 4]);
        assert_eq!(owned(3, None), vec![0, 1, 2]);
    }
}
