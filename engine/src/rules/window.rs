//! Sliding windows per key for rules that aggregate (`window: {by, size}`).
//!
//! A stream cannot re-run a window query over all recent history for every
//! micro-batch, so each windowed rule keeps, per key, the recent events'
//! times and aggregate inputs, with running counts and sums. An event counts
//! in the windows of later events while its time is within `size` of theirs;
//! the aggregate values include the event itself, as in the batch form
//! (`RANGE BETWEEN size PRECEDING AND CURRENT ROW`). DataFusion's window
//! functions cover one query over one input; this keeps state between
//! batches, which they do not.

use std::collections::HashMap;

use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Ident, ObjectNamePart, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use std::ops::ControlFlow;

/// An aggregate of a windowed rule's `when`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    CountAll,
    Count,
    Sum,
    Avg,
    Min,
    Max,
}

/// One aggregate call: what it computes, over which argument (SQL text), and
/// how it was written (for alert reasons).
#[derive(Debug, Clone)]
pub struct Aggregate {
    pub func: Func,
    pub arg: Option<String>,
    pub text: String,
}

/// Column name standing for aggregate `i` once `when` is rewritten.
pub fn column(i: usize) -> String {
    format!("__agg_{i}")
}

/// `when` with every aggregate replaced by a column `__agg_<i>`, and the aggregates.
pub fn rewrite(when: &str) -> Result<(String, Vec<Aggregate>), String> {
    let dialect = GenericDialect {};
    let mut expr = Parser::new(&dialect)
        .try_with_sql(when)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| e.to_string())?;
    let mut v = Extract { aggs: vec![], error: None };
    let _ = expr.visit(&mut v);
    if let Some(e) = v.error {
        return Err(e);
    }
    if v.aggs.is_empty() {
        return Err("a rule with a 'window' needs an aggregate in 'when', e.g. count(*) > 5".into());
    }
    Ok((expr.to_string(), v.aggs))
}

struct Extract {
    aggs: Vec<Aggregate>,
    error: Option<String>,
}

impl VisitorMut for Extract {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let Expr::Function(f) = expr else { return ControlFlow::Continue(()) };
        let name = f.name.0.last().and_then(ObjectNamePart::as_ident).map(|i| i.value.to_lowercase());
        let func = match name.as_deref() {
            Some("count") => Func::Count,
            Some("sum") => Func::Sum,
            Some("avg") => Func::Avg,
            Some("min") => Func::Min,
            Some("max") => Func::Max,
            _ => return ControlFlow::Continue(()),
        };
        let text = f.to_string();
        let args = match &f.args {
            FunctionArguments::List(l) if l.duplicate_treatment.is_none() && l.clauses.is_empty() => &l.args,
            _ => {
                self.error = Some(format!("window aggregate '{text}' takes one plain argument"));
                return ControlFlow::Break(());
            }
        };
        let (func, arg) = match (func, args.as_slice()) {
            (Func::Count, [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)]) => (Func::CountAll, None),
            (_, [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))]) => (func, Some(e.to_string())),
            _ => {
                self.error = Some(format!(
                    "window aggregate '{text}' is not supported; use count(*), count(x), sum(x), avg(x), min(x) or max(x)"
                ));
                return ControlFlow::Break(());
            }
        };
        if f.filter.is_some() || f.over.is_some() {
            self.error = Some(format!("window aggregate '{text}' cannot have FILTER or OVER"));
            return ControlFlow::Break(());
        }
        *expr = Expr::Identifier(Ident::new(column(self.aggs.len())));
        self.aggs.push(Aggregate { func, arg, text });
        ControlFlow::Continue(())
    }
}

/// A value left out of an aggregate (its input was NULL), as stored: a
/// signalling NaN, which arithmetic never yields (it gives quiet NaNs) and
/// decoded JSON cannot hold.
const ABSENT: u64 = 0x7FF0_0000_0000_0A5E;

/// Aggregates whose running sum and count sit beside the key.
const INLINE: usize = 2;

/// The recent events of one key. Each event costs a cache miss or two (keys
/// are spread over memory), so what most events need sits beside the key:
/// the front event's time, the latest time, and the running sums and counts
/// of the first `INLINE` aggregates. `buf` holds the running sums (f64 bits)
/// and counts of any further aggregates, then a ring of events of
/// `1 + stride` slots each: the time, then the aggregate inputs. `buf` is
/// read only when an event leaves the window, and written when one enters.
#[derive(Default)]
struct KeyWindow {
    buf: Box<[u64]>,
    /// The oldest event's place in the ring, how many events it holds, and
    /// how many it has room for.
    head: u32,
    len: u32,
    cap: u32,
    counts: [u32; INLINE],
    sums: [f64; INLINE],
    /// The time of the oldest event (the ring's front), when there is one.
    oldest: i64,
    /// The latest event time the window has held since it was last empty
    /// (at least that of every event in it): a window gone stale is started
    /// afresh without reading `buf`.
    latest: i64,
    /// Where a durable window is stored.
    partition: u32,
}

/// Slots of `buf` before the ring.
fn header(stride: usize) -> usize {
    2 * stride.saturating_sub(INLINE)
}

impl KeyWindow {
    /// Where event `i` (0 = oldest) starts.
    fn slot(&self, i: usize, stride: usize) -> usize {
        let mut at = self.head as usize + i;
        if at >= self.cap as usize {
            at -= self.cap as usize;
        }
        header(stride) + at * (1 + stride)
    }

    /// Adds `v` (or takes it away, `sign` -1) to aggregate `j`'s running sum and count.
    fn account(&mut self, j: usize, stride: usize, v: f64, sign: i8) {
        if j < INLINE {
            if sign > 0 {
                self.sums[j] += v;
                self.counts[j] += 1;
            } else {
                self.sums[j] -= v;
                self.counts[j] -= 1;
            }
        } else {
            let (sum, count) = (j - INLINE, stride - INLINE + j - INLINE);
            let old = f64::from_bits(self.buf[sum]);
            self.buf[sum] = if sign > 0 { old + v } else { old - v }.to_bits();
            self.buf[count] = if sign > 0 { self.buf[count] + 1 } else { self.buf[count] - 1 };
        }
    }

    fn count(&self, j: usize, stride: usize) -> u64 {
        if j < INLINE {
            u64::from(self.counts[j])
        } else {
            self.buf.get(stride - INLINE + j - INLINE).copied().unwrap_or(0)
        }
    }

    fn sum(&self, j: usize) -> f64 {
        if j < INLINE {
            self.sums[j]
        } else {
            self.buf.get(j - INLINE).map_or(0.0, |b| f64::from_bits(*b))
        }
    }

    fn push(&mut self, t: i64, values: &[Option<f64>], size: i64) {
        let stride = values.len();
        if self.len > 0 && self.latest < t - size {
            // Every event is out of the window: start afresh.
            self.buf[..header(stride)].fill(0);
            self.sums = [0.0; INLINE];
            self.counts = [0; INLINE];
            self.head = 0;
            self.len = 0;
        }
        if self.len == 0 {
            self.latest = t;
        }
        self.latest = self.latest.max(t);
        while self.len > 0 && self.oldest < t - size {
            let at = self.slot(0, stride);
            for j in 0..stride {
                let v = self.buf[at + 1 + j];
                if v != ABSENT {
                    self.account(j, stride, f64::from_bits(v), -1);
                }
            }
            self.head = if self.head + 1 == self.cap { 0 } else { self.head + 1 };
            self.len -= 1;
            if self.len > 0 {
                self.oldest = self.buf[self.slot(0, stride)] as i64;
            }
        }
        if self.len == self.cap {
            self.grow(stride);
        }
        if self.len == 0 {
            self.oldest = t;
        }
        let at = self.slot(self.len as usize, stride);
        self.buf[at] = t as u64;
        for (j, v) in values.iter().enumerate() {
            self.buf[at + 1 + j] = match v {
                Some(v) => {
                    self.account(j, stride, *v, 1);
                    v.to_bits()
                }
                None => ABSENT,
            };
        }
        self.len += 1;
    }

    /// Twice the room, the ring laid out oldest first.
    fn grow(&mut self, stride: usize) {
        let cap = (self.cap * 2).max(2);
        let head = header(stride);
        let mut buf = vec![0u64; head + cap as usize * (1 + stride)].into_boxed_slice();
        if let Some(h) = self.buf.get(..head) {
            buf[..head].copy_from_slice(h);
        }
        for i in 0..self.len as usize {
            let from = self.slot(i, stride);
            let to = head + i * (1 + stride);
            buf[to..to + 1 + stride].copy_from_slice(&self.buf[from..from + 1 + stride]);
        }
        self.buf = buf;
        self.head = 0;
        self.cap = cap;
    }

    /// The events, oldest first, as stored: per event its time, then its
    /// `stride` aggregate inputs (f64 bits, or `ABSENT`), all little-endian.
    fn encode(&self, stride: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.len as usize * (1 + stride) * 8);
        out.extend_from_slice(&(stride as u32).to_le_bytes());
        for i in 0..self.len as usize {
            let at = self.slot(i, stride);
            for v in &self.buf[at..at + 1 + stride] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// A window from [`KeyWindow::encode`]'s bytes; `None` when they are not
    /// of this stride (a window whose aggregates changed).
    fn decode(bytes: &[u8], stride: usize, size: i64) -> Option<KeyWindow> {
        let (head, rest) = bytes.split_at_checked(4)?;
        if u32::from_le_bytes(head.try_into().ok()?) as usize != stride
            || rest.len() % ((1 + stride) * 8) != 0
        {
            return None;
        }
        let mut w = KeyWindow::default();
        let mut values = Vec::with_capacity(stride);
        for event in rest.chunks_exact((1 + stride) * 8) {
            let word = |j: usize| u64::from_le_bytes(event[j * 8..j * 8 + 8].try_into().unwrap_or_default());
            values.clear();
            values.extend((1..=stride).map(|j| Some(word(j)).filter(|b| *b != ABSENT).map(f64::from_bits)));
            w.push(word(0) as i64, &values, size);
        }
        Some(w)
    }

    /// The latest event time in the window, or later; `None` when empty.
    fn latest(&self) -> Option<i64> {
        (self.len > 0).then_some(self.latest)
    }

    fn value(&self, j: usize, stride: usize, func: Func) -> Option<f64> {
        let n = self.count(j, stride);
        let column = || {
            (0..self.len as usize)
                .map(move |i| self.buf[self.slot(i, stride) + 1 + j])
                .filter(|v| *v != ABSENT)
                .map(f64::from_bits)
        };
        match func {
            Func::CountAll => Some(f64::from(self.len)),
            Func::Count => Some(n as f64),
            Func::Sum if n > 0 => Some(self.sum(j)),
            Func::Avg if n > 0 => Some(self.sum(j) / n as f64),
            Func::Min => column().reduce(f64::min),
            Func::Max => column().reduce(f64::max),
            _ => None,
        }
    }
}

/// The key of a window: one integer column (the common case, kept without
/// allocating), or the key columns in Arrow's row format.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    Int(i64),
    Row(&'a [u8]),
}

// std's SipHash: keys come from events, which anyone upstream may shape.
type Map<K> = HashMap<K, KeyWindow>;

/// The windows of one rule, per key.
pub struct Windows {
    size_us: i64,
    ints: Map<i64>,
    rows: Map<Box<[u8]>>,
    /// Per partition (by its number), the newest event time added, and
    /// that time at its last sweep: each partition's keys age by its own
    /// time, so one partition read ahead of another does not age the
    /// other's windows.
    newest: Vec<i64>,
    swept_at: Vec<i64>,
    /// Durable windows: the keys changed (or forgotten) since the last
    /// [`Windows::changes`], each with its partition.
    changed: Option<Changed>,
}

struct Changed {
    /// What the stored fields start with (naming the window).
    prefix: [u8; 8],
    ints: HashMap<i64, u32>,
    rows: HashMap<Box<[u8]>, u32>,
    /// Changes encoded by [`Windows::encode_changes`], not taken yet, and
    /// in how many passes (after the first, a key may come twice).
    encoded: Vec<Stored>,
    passes: usize,
}

/// A key's window as stored, or its removal (`value: None`).
pub struct Stored {
    pub partition: u32,
    /// The window's prefix, then the key: `i` and 8 bytes (an integer
    /// key), or `r` and Arrow's row format.
    pub field: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

fn stored_field(prefix: &[u8; 8], key: Key<'_>) -> Vec<u8> {
    let (tag, bytes) = match &key {
        Key::Int(k) => (b'i', &k.to_le_bytes()[..]),
        Key::Row(r) => (b'r', *r),
    };
    let mut field = Vec::with_capacity(9 + bytes.len());
    field.extend_from_slice(prefix);
    field.push(tag);
    field.extend_from_slice(bytes);
    field
}

impl Windows {
    pub fn new(size: std::time::Duration) -> Self {
        Self {
            size_us: size.as_micros() as i64,
            ints: HashMap::default(),
            rows: HashMap::default(),
            newest: Vec::new(),
            swept_at: Vec::new(),
            changed: None,
        }
    }

    /// Keeps track of changed keys, for [`Windows::changes`]; their stored
    /// fields start with `prefix`.
    pub fn make_durable(&mut self, prefix: [u8; 8]) {
        self.changed.get_or_insert_with(|| Changed {
            prefix,
            ints: HashMap::new(),
            rows: HashMap::new(),
            encoded: Vec::new(),
            passes: 0,
        });
    }

    /// Adds one event to its key's window; `out` gets the aggregates over
    /// that window, this event included (`values` holds their inputs).
    /// `partition` is where a durable key's window is stored.
    pub fn add(
        &mut self,
        key: Key<'_>,
        partition: u32,
        t: i64,
        values: &[Option<f64>],
        funcs: &[Func],
        out: &mut Vec<Option<f64>>,
    ) {
        if let Some(c) = &mut self.changed {
            match key {
                Key::Int(k) => {
                    c.ints.insert(k, partition);
                }
                Key::Row(k) if !c.rows.contains_key(k) => {
                    c.rows.insert(k.into(), partition);
                }
                Key::Row(_) => {}
            }
        }
        let w = match key {
            Key::Int(k) => self.ints.entry(k).or_default(),
            Key::Row(k) => match self.rows.get_mut(k) {
                Some(w) => w,
                None => self.rows.entry(k.into()).or_default(),
            },
        };
        w.partition = partition;
        w.push(t, values, self.size_us);
        out.clear();
        out.extend(funcs.iter().enumerate().map(|(j, f)| w.value(j, values.len(), *f)));
        self.saw(partition, t);
    }

    fn saw(&mut self, partition: u32, t: i64) {
        let p = partition as usize;
        if self.newest.len() <= p {
            self.newest.resize(p + 1, i64::MIN);
            self.swept_at.resize(p + 1, i64::MIN);
        }
        self.newest[p] = self.newest[p].max(t);
    }

    /// Forgets keys whose every event is older than the window, so state
    /// follows the active keys rather than every key ever seen.
    pub fn sweep(&mut self) {
        let size = self.size_us;
        if !self.newest.iter().zip(&self.swept_at).any(|(n, s)| n.saturating_sub(*s) >= size) {
            return;
        }
        let newest = &self.newest;
        let horizon = |p: u32| newest.get(p as usize).map_or(i64::MIN, |n| n.saturating_sub(size));
        let stale = |w: &KeyWindow| w.latest().is_none_or(|t| t < horizon(w.partition));
        if let Some(c) = &mut self.changed {
            for (k, w) in self.ints.iter().filter(|(_, w)| stale(w)) {
                c.ints.insert(*k, w.partition);
            }
            for (k, w) in self.rows.iter().filter(|(_, w)| stale(w)) {
                c.rows.insert(k.clone(), w.partition);
            }
        }
        self.ints.retain(|_, w| !stale(w));
        self.rows.retain(|_, w| !stale(w));
        self.swept_at.clone_from(&self.newest);
    }

    /// Encodes the keys changed so far, for the next [`Windows::changes`]:
    /// a rule evaluated on a thread of its own encodes there, after its
    /// batch (`stride`: the rule's aggregate count).
    pub fn encode_changes(&mut self, stride: usize) {
        let Self { changed: Some(c), ints, rows, .. } = self else { return };
        if c.ints.is_empty() && c.rows.is_empty() {
            return;
        }
        c.passes += 1;
        c.encoded.reserve(c.ints.len() + c.rows.len());
        for (k, partition) in c.ints.drain() {
            let value = ints.get(&k).map(|w| w.encode(stride));
            c.encoded.push(Stored { partition, field: stored_field(&c.prefix, Key::Int(k)), value });
        }
        for (k, partition) in c.rows.drain() {
            let value = rows.get(&k).map(|w| w.encode(stride));
            c.encoded.push(Stored { partition, field: stored_field(&c.prefix, Key::Row(&k)), value });
        }
    }

    /// The keys changed since the last call, as stored; a key no longer
    /// held is a removal.
    pub fn changes(&mut self, stride: usize) -> Vec<Stored> {
        self.encode_changes(stride);
        let Some(c) = &mut self.changed else { return Vec::new() };
        let mut out = std::mem::take(&mut c.encoded);
        if std::mem::take(&mut c.passes) > 1 {
            // A key encoded in several passes: the last one stands.
            let mut seen = std::collections::HashSet::new();
            out.reverse();
            out.retain(|s| seen.insert(s.field.clone()));
        }
        out
    }

    /// Puts back a key's window saved by [`Windows::changes`]; false when
    /// the bytes are not a window of this rule.
    pub fn restore(&mut self, partition: u32, key: &[u8], value: &[u8], stride: usize) -> bool {
        let Some(mut w) = KeyWindow::decode(value, stride, self.size_us) else { return false };
        w.partition = partition;
        let Some(latest) = w.latest() else { return true };
        self.saw(partition, latest);
        match key.split_first() {
            Some((b'i', k)) => match <[u8; 8]>::try_from(k) {
                Ok(k) => self.ints.insert(i64::from_le_bytes(k), w).is_none(),
                Err(_) => false,
            },
            Some((b'r', k)) => self.rows.insert(k.into(), w).is_none(),
            _ => false,
        }
    }

    pub fn keys(&self) -> usize {
        self.ints.len() + self.rows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_become_columns() {
        let (w, aggs) = rewrite("count(*) > 5 AND sum(amount) >= 1000").unwrap();
        assert_eq!(w, "__agg_0 > 5 AND __agg_1 >= 1000");
        assert_eq!(aggs[0].func, Func::CountAll);
        assert_eq!(aggs[1].arg.as_deref(), Some("amount"));
        assert_eq!(aggs[1].text, "sum(amount)");
        assert!(rewrite("amount > 5").unwrap_err().contains("needs an aggregate"));
        assert!(rewrite("count(DISTINCT x) > 1").unwrap_err().contains("one plain argument"));
    }

    /// The windows against a direct count over every earlier event, with
    /// rings that grow, wrap around and empty (one event at a time or all
    /// at once), and NULL inputs.
    #[test]
    fn windows_agree_with_a_direct_count() {
        use Func::*;
        // Sums beside the key, and sums in the state's buffer.
        for f in [&[Sum, Avg, Min][..], &[CountAll, Count, Sum, Avg, Min, Max]] {
            agree(f);
        }
    }

    fn agree(f: &[Func]) {
        let size = 50;
        let mut w = Windows::new(std::time::Duration::from_micros(size as u64));
        let mut seen: Vec<(i64, i64, Option<f64>)> = Vec::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut t, mut out) = (0i64, Vec::new());
        for _ in 0..5000 {
            // Now and then a gap longer than the window, which empties it.
            t += if next() % 40 == 0 { 3 * size } else { (next() % 7) as i64 };
            let key = (next() % 5) as i64;
            let v = (next() % 4 != 0).then(|| (next() % 1000) as f64 - 300.0);
            seen.push((key, t, v));
            w.add(Key::Int(key), 0, t, &vec![v; f.len()], f, &mut out);
            let live: Vec<Option<f64>> =
                seen.iter().filter(|(k, at, _)| *k == key && *at >= t - size).map(|e| e.2).collect();
            let vals: Vec<f64> = live.iter().flatten().copied().collect();
            let n = vals.len() as f64;
            let sum: f64 = vals.iter().sum();
            let want: Vec<Option<f64>> = f
                .iter()
                .map(|func| match func {
                    Func::CountAll => Some(live.len() as f64),
                    Func::Count => Some(n),
                    Func::Sum => (n > 0.0).then_some(sum),
                    Func::Avg => (n > 0.0).then_some(sum / n),
                    Func::Min => vals.iter().copied().reduce(f64::min),
                    Func::Max => vals.iter().copied().reduce(f64::max),
                })
                .collect();
            assert_eq!(out, want, "{f:?}: key {key} at {t}");
            w.sweep();
        }
        assert!(w.keys() <= 5);
    }

    #[test]
    fn windows_slide_per_key() {
        let mut w = Windows::new(std::time::Duration::from_secs(60));
        let f = [Func::CountAll, Func::Sum, Func::Max];
        let s = 1_000_000;
        let mut out = Vec::new();
        let mut add = |w: &mut Windows, key: &[u8], t: i64, v: f64| {
            w.add(Key::Row(key), 0, t, &[None, Some(v), Some(v)], &f, &mut out);
            out.clone()
        };
        assert_eq!(add(&mut w, b"a", 0, 1.0), vec![Some(1.0), Some(1.0), Some(1.0)]);
        assert_eq!(add(&mut w, b"b", 10 * s, 5.0)[0], Some(1.0));
        assert_eq!(add(&mut w, b"a", 30 * s, 2.0), vec![Some(2.0), Some(3.0), Some(2.0)]);
        assert_eq!(add(&mut w, b"a", 61 * s, 4.0), vec![Some(2.0), Some(6.0), Some(4.0)]);
        add(&mut w, b"a", 75 * s, 1.0);
        w.sweep();
        assert_eq!(w.keys(), 1, "key b fell out of every window");
    }

    /// Partitions keep their own time: one far ahead of another (an engine
    /// reading one partition's backlog before the other's) does not make
    /// the other's keys fall out of their windows.
    #[test]
    fn a_partition_ahead_does_not_age_another_partitions_keys() {
        let mut w = Windows::new(std::time::Duration::from_secs(3));
        w.make_durable(*b"windows_");
        let f = [Func::CountAll];
        let s = 1_000_000;
        let mut out = Vec::new();
        w.add(Key::Int(1), 1, 10 * s, &[None], &f, &mut out);
        w.add(Key::Int(1), 1, 11 * s, &[None], &f, &mut out);
        for t in 0..100 {
            w.add(Key::Int(2), 0, t * s, &[None], &f, &mut out);
            w.sweep();
        }
        w.add(Key::Int(1), 1, 12 * s, &[None], &f, &mut out);
        assert_eq!(out, vec![Some(3.0)], "partition 1 is at 12 s: its events at 10 and 11 s count");
        assert!(
            w.changes(f.len()).iter().all(|c| c.value.is_some()),
            "nothing stored is removed while its partition's window still holds it"
        );
        w.add(Key::Int(1), 1, 20 * s, &[None], &f, &mut out);
        w.sweep();
        assert_eq!(w.keys(), 2, "keys 1 (at 20 s) and 2 (at 99 s)");
        w.add(Key::Int(3), 1, 30 * s, &[None], &f, &mut out);
        w.sweep();
        assert_eq!(w.keys(), 2, "partition 1 at 30 s: key 1 fell out of its window");
    }

    /// Changes encoded in several passes before they are taken: each key
    /// comes once, as it was last.
    #[test]
    fn a_key_encoded_twice_is_stored_as_last_encoded() {
        let f = [Func::CountAll];
        let s = 1_000_000;
        let mut w = Windows::new(std::time::Duration::from_secs(60));
        w.make_durable(*b"windows_");
        let mut out = Vec::new();
        w.add(Key::Int(1), 0, 0, &[None], &f, &mut out);
        w.add(Key::Int(2), 0, 0, &[None], &f, &mut out);
        w.encode_changes(f.len());
        w.add(Key::Int(1), 0, s, &[None], &f, &mut out);
        let changes = w.changes(f.len());
        assert_eq!(changes.len(), 2, "keys 1 and 2 once each");
        let one = changes.iter().find(|c| c.field[9..] == 1i64.to_le_bytes()).unwrap();
        let mut back = Windows::new(std::time::Duration::from_secs(60));
        back.restore(0, &one.field[8..], one.value.as_deref().unwrap(), f.len());
        back.add(Key::Int(1), 0, 2 * s, &[None], &f, &mut out);
        assert_eq!(out, vec![Some(3.0)], "the second encoding, with both events, stands");
    }

    /// Durable windows: the changed keys come back as stored, and a window
    /// restored from them goes on as the original does; forgotten keys
    /// come back as removals.
    #[test]
    fn stored_windows_restore_to_the_same_state() {
        let f = [Func::CountAll, Func::Sum, Func::Min, Func::Max];
        let s = 1_000_000;
        let mut w = Windows::new(std::time::Duration::from_secs(60));
        w.make_durable(*b"windows_");
        let mut out = Vec::new();
        for (i, t) in [0, 10, 20, 30].iter().enumerate() {
            let v = [None, Some(i as f64), (i != 2).then_some(i as f64), Some(-(i as f64))];
            w.add(Key::Int(7), 3, t * s, &v, &f, &mut out);
            w.add(Key::Row(b"ab"), 1, t * s, &v, &f, &mut out);
        }
        let changes = w.changes(f.len());
        assert_eq!(changes.len(), 2);
        assert!(w.changes(f.len()).is_empty(), "taken once");
        let mut back = Windows::new(std::time::Duration::from_secs(60));
        for c in &changes {
            assert_eq!(&c.field[..8], b"windows_");
            assert!(back.restore(c.partition, &c.field[8..], c.value.as_deref().unwrap(), f.len()));
            assert_eq!(c.partition, if c.field[8] == b'i' { 3 } else { 1 });
        }
        assert!(
            !back.restore(0, b"i\0\0\0\0\0\0\0\x01", &changes[0].value.clone().unwrap(), 2),
            "another stride"
        );
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let v = [None, Some(5.0), Some(5.0), Some(5.0)];
        w.add(Key::Int(7), 3, 65 * s, &v, &f, &mut a);
        back.add(Key::Int(7), 3, 65 * s, &v, &f, &mut b);
        assert_eq!(a, b);
        assert_eq!(a, vec![Some(4.0), Some(11.0), Some(1.0), Some(5.0)], "events at 10, 20, 30, 65 s");
        w.changes(f.len());
        w.add(Key::Int(8), 3, 200 * s, &v, &f, &mut a);
        w.add(Key::Row(b"cd"), 1, 200 * s, &v, &f, &mut a);
        w.sweep();
        let mut removed: Vec<(Vec<u8>, bool)> =
            w.changes(f.len()).into_iter().map(|c| (c.field, c.value.is_some())).collect();
        removed.sort();
        assert_eq!(removed.len(), 4, "keys 7 and ab forgotten, 8 and cd added");
        assert!(removed.iter().filter(|(_, kept)| !kept).count() == 2);
    }
}
