//! Event time for windowed rules: events reach a window in the order of
//! their `window.time`, whatever order they arrived in.
//!
//! Each windowed rule with a time column holds its events back until the
//! watermark of their partition passes them: the newest time seen there,
//! less the rule's `allowed_lateness`. Held events are then released in
//! time order (ties in arrival order). A partition that goes quiet does not
//! hold events for ever: once it has received nothing for `allowed_lateness`
//! of wall-clock time, every event it holds is released. Nor does one whose
//! event time stands still (every event stamped alike, or older): once its
//! watermark has not moved for `allowed_lateness` of wall-clock time, what it
//! holds is released. A partition whose event time advances (a stream
//! catching up on a backlog, an engine slowed down) goes by its watermark
//! alone, so the counts do not depend on how fast the engine reads.
//! An event older than what its partition has already released is late: it
//! is left out of the rule's window and counted.
//!
//! The source batches whose rows are held are kept once for every rule of a
//! transform. With durable windows, the rows of each batch still held when
//! it is acknowledged are saved per partition (those already released are
//! in the window state saved with them), and each rule's release
//! mark with the window state: after a restart, the rows above the mark are
//! held again and the rest, already in the saved windows, are not counted
//! twice. Apache Flink's watermarks work the same way; a window here slides
//! per event, which DataFusion's and Arroyo's windowed aggregates do not.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, ArrayRef, Int64Array, UInt32Array};
use datafusion::arrow::compute::interleave_record_batch;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;

/// Where a row stands in event-time order: its time (µs), its batch's
/// sequence number and its row in that batch.
pub type RowKey = (i64, u64, u32);

/// Column holding each stored row's place in its batch.
const ROW: &str = "__row";

/// Rows one hold released, in time order, with each row's partition.
#[derive(Clone)]
pub struct Released {
    pub batch: RecordBatch,
    pub partitions: Arc<[u32]>,
}

/// The held rows of every windowed rule of one rules transform.
#[derive(Default)]
pub struct Held {
    slots: HashMap<u64, Slot>,
    next_slot: u64,
    rules: HashMap<String, RuleHold>,
    durable: bool,
    /// Slots not stored yet.
    unsaved: Vec<u64>,
    /// Stored rows (partition, key) no rule holds any more.
    deleted: Vec<(u32, Vec<u8>)>,
}

/// The most bytes one stored value of held rows takes: a batch's held rows
/// are split over several values past it (Redis refuses values over 512 MB
/// and a large one stalls every other client while it is written).
pub const MAX_STORED_VALUE: usize = 4 << 20;

/// A batch whose rows some rule holds.
struct Slot {
    seq: u64,
    batch: RecordBatch,
    /// Each row's place in the batch as read (a stored batch keeps only
    /// some of them); `None` when the rows are the whole batch.
    rows: Option<Vec<u32>>,
    /// Each row's partition (`None`: all in `partition`).
    partitions: Option<Arc<[u32]>>,
    partition: u32,
    /// Rows held, over every rule, per partition.
    refs: HashMap<u32, usize>,
    /// How many rules hold each row: a batch is stored with only the rows
    /// still held (the others are in the window state stored with it).
    holders: Vec<u16>,
    saved: bool,
    /// Per partition, the keys its held rows are stored under.
    keys: HashMap<u32, Vec<Vec<u8>>>,
}

impl Slot {
    fn partition(&self, row: usize) -> u32 {
        self.partitions.as_ref().map_or(self.partition, |p| p[row])
    }

    fn key(&self, t: i64, row: usize) -> RowKey {
        let orig = self.rows.as_ref().map_or(row as u32, |r| r[row]);
        (t, self.seq, orig)
    }
}

struct RuleHold {
    lateness: Duration,
    parts: HashMap<u32, Part>,
}

/// One rule's events of one partition.
struct Part {
    newest: i64,
    /// The last row released: every held row up to it has been.
    released: Option<RowKey>,
    held: BTreeMap<RowKey, (u64, u32)>,
    /// When the partition last received a row: quiet for the lateness,
    /// it lets every held row go.
    last_arrival: Option<Instant>,
    /// When its newest time last moved: still for the lateness, it lets
    /// every held row go too.
    advanced: Option<Instant>,
    changed: bool,
}

impl Default for Part {
    fn default() -> Self {
        Self {
            newest: i64::MIN,
            released: None,
            held: BTreeMap::new(),
            last_arrival: None,
            advanced: None,
            changed: false,
        }
    }
}

/// A stored change: a hold's release mark (`rule: Some(hold)`) or a batch's
/// held rows (`rule: None`); `value: None` removes it.
pub struct HoldWrite {
    pub rule: Option<String>,
    pub partition: u32,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// A hold (of the windowed rules sharing a time column and lateness): its
/// name, its lateness and the rows' event times (µs).
pub struct Timed<'a> {
    pub rule: &'a str,
    pub lateness: Duration,
    pub times: Int64Array,
}

/// The stored key of a hold's release mark.
const MARK: &[u8] = b"w";

fn rows_key(seq: u64) -> Vec<u8> {
    [b"h".as_slice(), &seq.to_be_bytes()].concat()
}

impl Held {
    /// Keeps track of what to store, for [`Held::changes`].
    pub fn make_durable(&mut self) {
        self.durable = true;
    }

    /// Sets the rules that hold rows, keeping what the ones still there hold.
    pub fn set_rules(&mut self, rules: &[(&str, Duration)]) {
        let gone: Vec<String> =
            self.rules.keys().filter(|k| !rules.iter().any(|(r, _)| r == k)).cloned().collect();
        for g in gone {
            if let Some(h) = self.rules.remove(&g) {
                for (p, part) in h.parts {
                    for (slot, row) in part.held.into_values() {
                        self.unhold(slot, row, p);
                    }
                }
            }
        }
        for (rule, lateness) in rules {
            self.rules
                .entry(rule.to_string())
                .or_insert_with(|| RuleHold { lateness: *lateness, parts: HashMap::new() })
                .lateness = *lateness;
        }
    }

    /// Rows held, over every rule.
    pub fn len(&self) -> usize {
        self.rules.values().flat_map(|r| r.parts.values()).map(|p| p.held.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes in a batch read as number `seq`: each rule holds its rows, but
    /// those older than its partition has released (returned per rule: late).
    pub fn admit(
        &mut self,
        seq: u64,
        batch: &RecordBatch,
        partitions: Option<&[u32]>,
        timed: &[Timed<'_>],
        now: Instant,
    ) -> Vec<usize> {
        let id = self.next_slot;
        let slot = Slot {
            seq,
            batch: batch.clone(),
            rows: None,
            partitions: partitions.map(Arc::from),
            partition: 0,
            refs: HashMap::new(),
            holders: vec![0; batch.num_rows()],
            saved: false,
            keys: HashMap::new(),
        };
        let late = self.hold_rows(id, slot, timed, now, |_, _| true);
        if self.slots.contains_key(&id) && self.durable {
            self.unsaved.push(id);
        }
        late
    }

    /// Holds the rows of `slot` for each rule (`keep`: whether a rule's
    /// row is still to be counted) and keeps the slot if any is held.
    fn hold_rows(
        &mut self,
        id: u64,
        mut slot: Slot,
        timed: &[Timed<'_>],
        now: Instant,
        keep: impl Fn(&Part, RowKey) -> bool,
    ) -> Vec<usize> {
        let mut late = vec![0; timed.len()];
        for (k, t) in timed.iter().enumerate() {
            let Some(rule) = self.rules.get_mut(t.rule) else { continue };
            for row in 0..slot.batch.num_rows() {
                let p = slot.partition(row);
                let part = rule.parts.entry(p).or_default();
                part.last_arrival = Some(now);
                // An event without a time counts as the newest of its partition.
                let time = if t.times.is_valid(row) { t.times.value(row) } else { part.newest.max(0) };
                let key = slot.key(time, row);
                if !keep(part, key) {
                    continue;
                }
                if part.released.is_some_and(|r| time < r.0) {
                    late[k] += 1;
                    continue;
                }
                if time > part.newest || part.advanced.is_none() {
                    part.newest = part.newest.max(time);
                    part.advanced = Some(now);
                }
                part.held.insert(key, (id, row as u32));
                *slot.refs.entry(p).or_default() += 1;
                slot.holders[row] += 1;
            }
        }
        if !slot.refs.is_empty() {
            self.next_slot += 1;
            self.slots.insert(id, slot);
        }
        late
    }

    /// The rows `rule` may count now, in time order: those its partitions'
    /// watermarks passed, every row of a partition quiet for its lateness of
    /// wall-clock time, or, with `all`, every row it holds.
    pub fn release(&mut self, rule: &str, all: bool, now: Instant) -> Result<Option<Released>, String> {
        let Some(hold) = self.rules.get_mut(rule) else { return Ok(None) };
        let lateness_us = hold.lateness.as_micros() as i64;
        let mut out: Vec<(RowKey, u64, u32, u32)> = Vec::new();
        for (p, part) in hold.parts.iter_mut() {
            let quiet = part.last_arrival.is_some_and(|at| now.duration_since(at) >= hold.lateness);
            let still = part.advanced.is_some_and(|at| now.duration_since(at) >= hold.lateness);
            let cutoff = if all || quiet || still { i64::MAX } else { part.newest.saturating_sub(lateness_us) };
            while let Some(entry) = part.held.first_entry() {
                if entry.key().0 > cutoff {
                    break;
                }
                let (key, (slot, row)) = entry.remove_entry();
                part.released = Some(key);
                part.changed = true;
                out.push((key, slot, row, *p));
            }
        }
        if out.is_empty() {
            return Ok(None);
        }
        out.sort_unstable_by_key(|r| r.0);
        // Events that arrived in order come out as long runs of one batch:
        // slices of those (no copy, or one copy to join them), rather than
        // a gather row by row.
        let mut runs: Vec<(u64, usize, usize)> = Vec::new();
        for r in &out {
            match runs.last_mut() {
                Some(run) if run.0 == r.1 && run.1 + run.2 == r.2 as usize => run.2 += 1,
                _ => runs.push((r.1, r.2 as usize, 1)),
            }
        }
        let slot = |s: &u64| self.slots.get(s).map(|s| &s.batch).ok_or("a held row's batch is gone");
        let batch = if runs.len() * 16 <= out.len() {
            let parts = runs
                .iter()
                .map(|(s, at, len)| Ok(slot(s)?.slice(*at, *len)))
                .collect::<Result<Vec<_>, String>>()?;
            match parts.as_slice() {
                [one] => one.clone(),
                _ => datafusion::arrow::compute::concat_batches(&parts[0].schema(), &parts)
                    .map_err(|e| e.to_string())?,
            }
        } else {
            let mut order: Vec<u64> = out.iter().map(|r| r.1).collect();
            order.sort_unstable();
            order.dedup();
            let batches = order.iter().map(slot).collect::<Result<Vec<_>, _>>()?;
            let indices: Vec<(usize, usize)> =
                out.iter().map(|r| (order.binary_search(&r.1).unwrap_or_default(), r.2 as usize)).collect();
            interleave_record_batch(&batches, &indices).map_err(|e| e.to_string())?
        };
        let partitions: Vec<u32> = out.iter().map(|r| r.3).collect();
        let partitions = Arc::from(partitions);
        for (_, slot, row, p) in &out {
            self.unhold(*slot, *row, *p);
        }
        Ok(Some(Released { batch, partitions }))
    }

    /// One rule no longer holds `row` of `slot` (of partition `p`).
    fn unhold(&mut self, slot: u64, row: u32, p: u32) {
        let Some(s) = self.slots.get_mut(&slot) else { return };
        if let Some(h) = s.holders.get_mut(row as usize) {
            *h = h.saturating_sub(1);
        }
        let Some(n) = s.refs.get_mut(&p) else { return };
        *n -= 1;
        if *n == 0 {
            s.refs.remove(&p);
            if s.saved {
                let keys = s.keys.remove(&p).unwrap_or_else(|| vec![rows_key(s.seq)]);
                self.deleted.extend(keys.into_iter().map(|k| (p, k)));
            }
            if s.refs.is_empty() {
                self.slots.remove(&slot);
            }
        }
    }

    /// What changed since the last call, as stored: the new batches' held
    /// rows per partition, the rows no rule holds any more, the rules'
    /// release marks.
    pub fn changes(&mut self) -> Result<Vec<HoldWrite>, String> {
        let mut out = Vec::new();
        for (p, key) in self.deleted.drain(..) {
            out.push(HoldWrite { rule: None, partition: p, key, value: None });
        }
        for id in std::mem::take(&mut self.unsaved) {
            let Some(slot) = self.slots.get_mut(&id) else { continue };
            slot.saved = true;
            let parts: Vec<u32> = slot.refs.keys().copied().collect();
            for p in parts {
                let rows: Vec<u32> = (0..slot.batch.num_rows() as u32)
                    .filter(|r| slot.holders[*r as usize] > 0 && slot.partition(*r as usize) == p)
                    .collect();
                let values = encode_split(&slot.batch, &rows)?;
                let keys: Vec<Vec<u8>> = (0..values.len() as u32).map(|k| chunk_key(slot.seq, k)).collect();
                for (key, value) in keys.iter().zip(values) {
                    out.push(HoldWrite { rule: None, partition: p, key: key.clone(), value: Some(value) });
                }
                slot.keys.insert(p, keys);
            }
        }
        for (rule, hold) in self.rules.iter_mut() {
            for (p, part) in hold.parts.iter_mut().filter(|(_, part)| part.changed) {
                part.changed = false;
                let Some((t, seq, row)) = part.released else { continue };
                let value = [t.to_le_bytes().as_slice(), &seq.to_le_bytes(), &row.to_le_bytes()].concat();
                out.push(HoldWrite {
                    rule: Some(rule.clone()),
                    partition: *p,
                    key: MARK.to_vec(),
                    value: Some(value),
                });
            }
        }
        Ok(out)
    }

    /// Puts back a rule's release mark stored by [`Held::changes`]; false
    /// when `key` is not one.
    pub fn restore_mark(&mut self, rule: &str, partition: u32, key: &[u8], value: &[u8]) -> bool {
        if key != MARK || value.len() != 20 {
            return false;
        }
        let Some(hold) = self.rules.get_mut(rule) else { return false };
        let t = i64::from_le_bytes(value[..8].try_into().unwrap_or_default());
        let seq = u64::from_le_bytes(value[8..16].try_into().unwrap_or_default());
        let row = u32::from_le_bytes(value[16..].try_into().unwrap_or_default());
        let part = hold.parts.entry(partition).or_default();
        part.released = Some((t, seq, row));
        part.newest = part.newest.max(t.saturating_add(hold.lateness.as_micros() as i64));
        true
    }

    /// The sequence number of stored held rows, from their key (`h`, the
    /// number, and for a batch's second value on, the value's place).
    pub fn stored_rows(key: &[u8]) -> Option<u64> {
        let (b'h', rest) = key.split_first()? else { return None };
        if rest.len() != 8 && rest.len() != 12 {
            return None;
        }
        Some(u64::from_be_bytes(rest[..8].try_into().ok()?))
    }

    /// Puts back held rows stored by [`Held::changes`] (after every mark):
    /// each rule holds again the rows after its mark. `times` gives each
    /// rule's event times of the decoded batch.
    pub fn restore_rows<'t>(
        &mut self,
        partition: u32,
        key: &[u8],
        seq: u64,
        value: &[u8],
        times: impl Fn(&RecordBatch) -> Result<Vec<Timed<'t>>, String>,
        now: Instant,
    ) -> Result<usize, String> {
        let (batch, rows) = decode(value)?;
        let timed = times(&batch)?;
        let holders = vec![0; rows.len()];
        let id = self.next_slot;
        let slot = Slot {
            seq,
            batch,
            rows: Some(rows),
            partitions: None,
            partition,
            refs: HashMap::new(),
            holders,
            saved: true,
            keys: HashMap::from([(partition, vec![key.to_vec()])]),
        };
        self.hold_rows(id, slot, &timed, now, |part, key| part.released.is_none_or(|r| key > r));
        let held = self.slots.get(&id).map_or(0, |s| s.refs.values().sum());
        if held == 0 {
            // Everything in it was counted before the restart.
            self.deleted.push((partition, key.to_vec()));
        }
        Ok(held)
    }
}

/// The key of a batch's `k`th stored value of held rows.
fn chunk_key(seq: u64, k: u32) -> Vec<u8> {
    let mut key = rows_key(seq);
    if k > 0 {
        key.extend_from_slice(&k.to_be_bytes());
    }
    key
}

/// `rows` of `batch` as values of at most about [`MAX_STORED_VALUE`] bytes
/// each (a single row larger than that is a value of its own).
fn encode_split(batch: &RecordBatch, rows: &[u32]) -> Result<Vec<Vec<u8>>, String> {
    let whole = encode(batch, rows)?;
    if whole.len() <= MAX_STORED_VALUE || rows.len() <= 1 {
        return Ok(vec![whole]);
    }
    let mut out = Vec::new();
    let mut todo = vec![rows];
    let mut pieces = whole.len().div_ceil(MAX_STORED_VALUE).max(2);
    while let Some(part) = todo.pop() {
        if pieces > 1 {
            // Rows take about the same room each: split evenly, then check.
            for chunk in part.chunks(part.len().div_ceil(pieces)).rev() {
                todo.push(chunk);
            }
            pieces = 1;
            continue;
        }
        let value = encode(batch, part)?;
        if value.len() > MAX_STORED_VALUE && part.len() > 1 {
            let (a, b) = part.split_at(part.len() / 2);
            todo.push(b);
            todo.push(a);
        } else {
            out.push(value);
        }
    }
    Ok(out)
}

/// `rows` of `batch` with their places, in Arrow's IPC stream format.
fn encode(batch: &RecordBatch, rows: &[u32]) -> Result<Vec<u8>, String> {
    let err = |e: datafusion::arrow::error::ArrowError| e.to_string();
    let picked = datafusion::arrow::compute::take_record_batch(batch, &UInt32Array::from(rows.to_vec()))
        .map_err(err)?;
    let mut fields: Vec<Field> = batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(ROW, DataType::UInt32, false));
    let mut cols: Vec<ArrayRef> = picked.columns().to_vec();
    cols.push(Arc::new(UInt32Array::from(rows.to_vec())));
    let stored = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(err)?;
    let mut out = Vec::new();
    let mut w =
        datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, &stored.schema()).map_err(err)?;
    w.write(&stored).map_err(err)?;
    w.finish().map_err(err)?;
    drop(w);
    Ok(out)
}

fn decode(bytes: &[u8]) -> Result<(RecordBatch, Vec<u32>), String> {
    let err = |e: datafusion::arrow::error::ArrowError| format!("stored held rows: {e}");
    let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(bytes, None).map_err(err)?;
    let batches = reader.collect::<Result<Vec<_>, _>>().map_err(err)?;
    let [stored] = batches.as_slice() else { return Err("stored held rows: not one batch".into()) };
    let at = stored.schema().index_of(ROW).map_err(err)?;
    let rows = stored.column(at).as_any().downcast_ref::<UInt32Array>().ok_or("stored held rows: places")?;
    let rows = rows.values().to_vec();
    let mut batch = stored.clone();
    batch.remove_column(at);
    Ok((batch, rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;

    fn batch(ids: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(ids.to_vec()))]).unwrap()
    }

    fn ids(r: &Option<Released>) -> Vec<i64> {
        r.as_ref().map_or(vec![], |r| {
            r.batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec()
        })
    }

    fn timed(times: &[i64]) -> Vec<Timed<'static>> {
        vec![Timed {
            rule: "r",
            lateness: Duration::from_micros(10),
            times: Int64Array::from(times.to_vec()),
        }]
    }

    /// Rows come out in time order once the watermark passes them; a row
    /// older than what was released is late; a quiet partition lets its
    /// rows go after the lateness of wall-clock time.
    #[test]
    fn rows_are_released_in_time_order_behind_the_watermark() {
        let mut h = Held::default();
        h.set_rules(&[("r", Duration::from_micros(10))]);
        let now = Instant::now();
        // ids are the times: arrival order 5, 3, 9, 1.
        assert_eq!(h.admit(1, &batch(&[5, 3, 9, 1]), None, &timed(&[5, 3, 9, 1]), now), vec![0]);
        assert!(h.release("r", false, now).unwrap().is_none(), "newest 9 less 10 passes nothing");
        assert_eq!(h.admit(2, &batch(&[14, 2]), None, &timed(&[14, 2]), now), vec![0]);
        assert_eq!(ids(&h.release("r", false, now).unwrap()), vec![1, 2, 3]);
        assert_eq!(h.admit(3, &batch(&[0, 4, 20]), None, &timed(&[0, 4, 20]), now), vec![1], "0 is late");
        assert_eq!(ids(&h.release("r", false, now).unwrap()), vec![4, 5, 9]);
        assert_eq!(h.len(), 2);
        let later = now + Duration::from_micros(10);
        assert_eq!(ids(&h.release("r", false, later).unwrap()), vec![14, 20], "held long enough");
        assert!(h.is_empty());
        assert!(h.slots.is_empty(), "no batch kept once nothing is held");
    }

    /// A partition that keeps receiving rows is not quiet, however long its
    /// rows wait (an engine behind a backlog): only its watermark releases
    /// them, in the order a fast engine would count them.
    #[test]
    fn a_partition_still_receiving_rows_goes_by_its_watermark_alone() {
        let mut h = Held::default();
        h.set_rules(&[("r", Duration::from_micros(10))]);
        let now = Instant::now();
        let later = now + Duration::from_micros(6);
        assert_eq!(h.admit(1, &batch(&[5, 9]), None, &timed(&[5, 9]), now), vec![0]);
        // The partition is busy: 7 and 8 arrive, older than 9, and must
        // count before it.
        assert_eq!(h.admit(2, &batch(&[8, 7]), None, &timed(&[8, 7]), later), vec![0]);
        assert!(h.release("r", false, later).unwrap().is_none(), "newest 9 less 10 passes nothing");
        let after = later + Duration::from_micros(6);
        assert_eq!(h.admit(3, &batch(&[18]), None, &timed(&[18]), after), vec![0]);
        assert_eq!(ids(&h.release("r", false, after).unwrap()), vec![5, 7, 8]);
        let quiet = after + Duration::from_micros(10);
        assert_eq!(ids(&h.release("r", false, quiet).unwrap()), vec![9, 18], "quiet: all go");
        assert!(h.is_empty());
    }

    /// A partition receiving events whose time stands still lets them go
    /// once its watermark has not moved for the lateness.
    #[test]
    fn a_partition_whose_event_time_stands_still_lets_its_rows_go() {
        let mut h = Held::default();
        h.set_rules(&[("r", Duration::from_micros(10))]);
        let now = Instant::now();
        h.admit(1, &batch(&[5, 5]), None, &timed(&[5, 5]), now);
        for k in 1..4u64 {
            let at = now + Duration::from_micros(3 * k);
            h.admit(1 + k, &batch(&[5]), None, &timed(&[5]), at);
            assert!(h.release("r", false, at).unwrap().is_none(), "busy, and the time moved lately");
        }
        let still = now + Duration::from_micros(11);
        h.admit(9, &batch(&[4]), None, &timed(&[4]), still);
        assert_eq!(ids(&h.release("r", false, still).unwrap()).len(), 6, "every row, though rows keep coming");
        assert!(h.is_empty());
    }

    /// Held rows larger than one stored value are split over several, each
    /// under the limit, that decode back to every row.
    #[test]
    fn large_held_rows_are_stored_in_bounded_values() {
        let text: Vec<String> = (0..2000).map(|i| format!("{i:08}").repeat(600)).collect();
        let schema = Arc::new(Schema::new(vec![Field::new("t", DataType::Utf8, false)]));
        let b = RecordBatch::try_new(
            schema,
            vec![Arc::new(datafusion::arrow::array::StringArray::from(text.clone()))],
        )
        .unwrap();
        let rows: Vec<u32> = (0..2000).collect();
        let values = encode_split(&b, &rows).unwrap();
        assert!(values.len() >= 3, "{} values", values.len());
        let mut back = Vec::new();
        for v in &values {
            assert!(v.len() <= MAX_STORED_VALUE, "{} bytes", v.len());
            back.extend(decode(v).unwrap().1);
        }
        assert_eq!(back, rows);
        assert_eq!(Held::stored_rows(&chunk_key(7, 2)), Some(7));
        assert_eq!(Held::stored_rows(&chunk_key(7, 0)), Some(7));
    }

    /// A batch is stored with only the rows some rule still holds: the rows
    /// released before it is stored are in the window state saved with it.
    #[test]
    fn a_batch_is_stored_with_only_the_rows_still_held() {
        let mut h = Held::default();
        h.make_durable();
        h.set_rules(&[("r", Duration::from_micros(10)), ("s", Duration::from_micros(10))]);
        let now = Instant::now();
        let t = [1, 2, 30, 3, 25];
        let timed = |times: &[i64]| {
            Vec::from(["r", "s"].map(|rule| Timed {
                rule,
                lateness: Duration::from_micros(10),
                times: Int64Array::from(times.to_vec()),
            }))
        };
        h.admit(1, &batch(&t), None, &timed(&t), now);
        assert_eq!(ids(&h.release("r", false, now).unwrap()), vec![1, 2, 3], "up to 30 - 10");
        let stored = h.changes().unwrap();
        let rows: Vec<&HoldWrite> = stored.iter().filter(|w| w.rule.is_none()).collect();
        assert_eq!(rows.len(), 1);
        let (kept, places) = decode(rows[0].value.as_deref().unwrap()).unwrap();
        let kept: Vec<i64> = kept.column(0).as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec();
        assert_eq!(kept, vec![1, 2, 30, 3, 25], "rule s holds every row");
        assert_eq!(places, vec![0, 1, 2, 3, 4]);

        let t = [40, 41, 70, 42, 65];
        h.admit(2, &batch(&t), None, &timed(&t), now);
        assert_eq!(ids(&h.release("r", false, now).unwrap()), vec![25, 30, 40, 41, 42], "up to 70 - 10");
        assert_eq!(ids(&h.release("s", false, now).unwrap()), vec![1, 2, 3, 25, 30, 40, 41, 42]);
        let stored = h.changes().unwrap();
        let rows: Vec<&HoldWrite> = stored.iter().filter(|w| w.rule.is_none() && w.value.is_some()).collect();
        assert_eq!(rows.len(), 1);
        let (kept, places) = decode(rows[0].value.as_deref().unwrap()).unwrap();
        let kept: Vec<i64> = kept.column(0).as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec();
        assert_eq!(kept, vec![70, 65], "rows 0, 1 and 3 were counted by both rules");
        assert_eq!(places, vec![2, 4]);
    }

    /// Stored rows and marks restore what was held and nothing counted:
    /// rows at or before the mark are not held again.
    #[test]
    fn stored_rows_and_marks_hold_again_only_what_was_not_counted() {
        let mut h = Held::default();
        h.make_durable();
        h.set_rules(&[("r", Duration::from_micros(10))]);
        let now = Instant::now();
        h.admit(7, &batch(&[1, 5, 3, 12]), Some(&[0, 1, 0, 1]), &timed(&[1, 5, 3, 12]), now);
        let first = h.changes().unwrap();
        assert_eq!(first.iter().filter(|w| w.rule.is_none()).count(), 2, "rows of both partitions stored");
        h.admit(8, &batch(&[16]), Some(&[1]), &timed(&[16]), now);
        assert_eq!(ids(&h.release("r", false, now).unwrap()), vec![5], "partition 1 up to 16 - 10");
        let second = h.changes().unwrap();
        let mut back = Held::default();
        back.set_rules(&[("r", Duration::from_micros(10))]);
        for w in first.iter().chain(&second).filter(|w| w.rule.is_some()) {
            assert!(back.restore_mark("r", w.partition, &w.key, w.value.as_deref().unwrap()));
        }
        let mut restored = 0;
        let mut stored: Vec<&HoldWrite> = first.iter().chain(&second).filter(|w| w.rule.is_none()).collect();
        stored.retain(|w| w.value.is_some());
        for w in stored {
            let seq = Held::stored_rows(&w.key).unwrap();
            restored += back
                .restore_rows(
                    w.partition,
                    &w.key,
                    seq,
                    w.value.as_deref().unwrap(),
                    |b| {
                        let t = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap().clone();
                        Ok(vec![Timed { rule: "r", lateness: Duration::from_micros(10), times: t }])
                    },
                    now,
                )
                .unwrap();
        }
        assert_eq!(restored, 4, "1 and 3 (partition 0), 12 and 16 (partition 1); 5 was counted");
        assert_eq!(ids(&back.release("r", true, now).unwrap()), vec![1, 3, 12, 16]);
    }
}
