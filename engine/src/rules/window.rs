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
#[derive(Default, Clone)]
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

    /// Appends the events as stored: their count, then oldest first each
    /// event's time and its `stride` aggregate inputs (see [`write_event`]).
    fn encode_into(&self, out: &mut Vec<u8>, stride: usize) {
        out.reserve(4 + self.len as usize * (1 + stride) * 8);
        out.extend_from_slice(&self.len.to_le_bytes());
        for i in 0..self.len as usize {
            let at = self.slot(i, stride);
            for v in &self.buf[at..at + 1 + stride] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }

    /// Adds stored events (times and inputs, `stride` inputs each).
    fn push_stored(&mut self, events: &[u8], stride: usize, size: i64) {
        let mut values = Vec::with_capacity(stride);
        for event in events.chunks_exact((1 + stride) * 8) {
            let t = read_event(event, &mut values);
            self.push(t, &values, size);
        }
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
#[derive(Clone)]
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
    /// Durable windows: what is stored, and what is to be.
    durable: Option<Durable>,
}

/// How durable windows are stored, per partition: a snapshot of the
/// partition's windows, then a log of the events added since, one stored
/// field per batch. A batch thus stores the events it added, however many
/// events a busy key's window holds. The snapshot is taken again once the
/// logs since it are as large as it (and at least [`SNAPSHOT_MIN`]), so
/// the stored state stays within about twice the windows' size plus that
/// minimum, and a restart replays no more. The logs a snapshot replaces are
/// removed by the batches after it, [`DROP_PER_BATCH`] at a time: a restart
/// reads only the logs of the snapshot's generation, so they are left
/// over, not state.
///
/// Stored fields, after the window's 8-byte prefix:
/// - `s`: the snapshot: its generation (8 bytes), the stride (4), then per
///   key the key (see [`write_key`]) and its events (see
///   [`KeyWindow::encode_into`]); past [`SNAPSHOT_PIECE`] bytes the keys go
///   on in more fields, `s` and the piece's place (4 bytes, big-endian),
///   each with the generation and stride;
/// - `l`, generation and number (8 bytes each, big-endian): a log: the
///   stride, then per event its key and the event (see [`write_event`]),
///   in the order they were added;
/// - `i` or `r` and a key: a key's window as stored before logs were
///   (stride, then its events); read, then removed after a snapshot.
#[derive(Clone)]
struct Durable {
    prefix: [u8; 8],
    /// Per partition (by its number).
    parts: Vec<Part>,
    snapshot_min: usize,
    snapshot_piece: usize,
    /// Changes encoded by [`Windows::encode_changes`], not taken yet.
    encoded: Vec<Stored>,
}

/// One partition's stored windows.
#[derive(Default, Clone)]
struct Part {
    /// The stored snapshot's generation: its logs carry it. `None` until
    /// this process stored or read one; the partition's first change is
    /// then a snapshot.
    generation: Option<u64>,
    /// The next log's number in this generation.
    next: u64,
    /// Bytes of the logs stored since the snapshot, and of the snapshot.
    logged: usize,
    snapshot: usize,
    /// The events added since the last changes were encoded, as logged.
    events: Vec<u8>,
    /// Stored fields the next snapshot replaces: logs of another generation,
    /// windows stored one per key.
    stale: Vec<Vec<u8>>,
    /// Stored fields a stored snapshot replaced, to be removed.
    replaced: Vec<Vec<u8>>,
    /// Pieces of the stored snapshot.
    pieces: u32,
}

/// The least a partition logs before its snapshot is taken again.
const SNAPSHOT_MIN: usize = 1 << 20;

/// The most bytes of keys one stored piece of a snapshot holds (a key's
/// window is never split): no value nears Redis's 512 MB limit, and no
/// single write stalls the server's other clients for long.
const SNAPSHOT_PIECE: usize = 16 << 20;

/// The most fields a batch removes of those a snapshot replaced.
const DROP_PER_BATCH: usize = 256;

/// A stored field and its value, or its removal (`value: None`).
#[derive(Clone)]
pub struct Stored {
    pub partition: u32,
    /// The window's prefix, then what it holds (see [`Durable`]).
    pub field: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

fn write_key(out: &mut Vec<u8>, key: Key<'_>) {
    match key {
        Key::Int(k) => {
            out.push(b'i');
            out.extend_from_slice(&k.to_le_bytes());
        }
        Key::Row(r) => {
            out.push(b'r');
            out.extend_from_slice(&(r.len() as u32).to_le_bytes());
            out.extend_from_slice(r);
        }
    }
}

/// An event as stored: its time, then its aggregate inputs (f64 bits, or
/// `ABSENT`), all little-endian.
fn write_event(out: &mut Vec<u8>, t: i64, values: &[Option<f64>]) {
    out.extend_from_slice(&t.to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.map_or(ABSENT, f64::to_bits).to_le_bytes());
    }
}

/// An event stored by [`write_event`]: its time, and its inputs into `values`.
fn read_event(event: &[u8], values: &mut Vec<Option<f64>>) -> i64 {
    let word = |j: usize| u64::from_le_bytes(event[j * 8..j * 8 + 8].try_into().unwrap_or_default());
    values.clear();
    values.extend((1..event.len() / 8).map(|j| Some(word(j)).filter(|b| *b != ABSENT).map(f64::from_bits)));
    word(0) as i64
}

/// Reads stored bytes front to back; `None` once they run short.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn key(&mut self) -> Option<Key<'a>> {
        match self.take(1)? {
            b"i" => Some(Key::Int(self.u64()? as i64)),
            b"r" => {
                let n = self.u32()? as usize;
                Some(Key::Row(self.take(n)?))
            }
            _ => None,
        }
    }

    /// The stride that starts a snapshot or a log, when it is `stride`.
    fn stride(&mut self, stride: usize) -> Option<()> {
        (self.u32()? as usize == stride).then_some(())
    }
}

/// A partition's stored fields, gathered for [`Windows::restore`].
#[derive(Default)]
struct Saved<'a> {
    /// The snapshot's pieces: place, generation, keys.
    snapshot: Vec<(u32, u64, &'a [u8])>,
    logs: Vec<(u64, u64, &'a [u8])>,
    /// Windows stored one per key: the key (tag and bytes) and its window.
    keys: Vec<(&'a [u8], &'a [u8])>,
}

impl Windows {
    pub fn new(size: std::time::Duration) -> Self {
        Self {
            size_us: size.as_micros() as i64,
            ints: HashMap::default(),
            rows: HashMap::default(),
            newest: Vec::new(),
            swept_at: Vec::new(),
            durable: None,
        }
    }

    /// Logs the events added from now on, for [`Windows::changes`]; the
    /// stored fields start with `prefix`.
    pub fn make_durable(&mut self, prefix: [u8; 8]) {
        self.durable.get_or_insert_with(|| Durable {
            prefix,
            parts: Vec::new(),
            snapshot_min: SNAPSHOT_MIN,
            snapshot_piece: SNAPSHOT_PIECE,
            encoded: Vec::new(),
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
        if let Some(d) = &mut self.durable {
            let p = partition as usize;
            if d.parts.len() <= p {
                d.parts.resize_with(p + 1, Part::default);
            }
            let events = &mut d.parts[p].events;
            write_key(events, key);
            write_event(events, t, values);
        }
        self.push(key, partition, t, values, |w| {
            out.clear();
            out.extend(funcs.iter().enumerate().map(|(j, f)| w.value(j, values.len(), *f)));
        });
    }

    /// Adds one event to its key's window, then hands `then` the window.
    fn push<R>(
        &mut self,
        key: Key<'_>,
        partition: u32,
        t: i64,
        values: &[Option<f64>],
        then: impl FnOnce(&KeyWindow) -> R,
    ) -> R {
        self.saw(partition, t);
        let size = self.size_us;
        self.with_window(key, |w| {
            w.partition = partition;
            w.push(t, values, size);
            then(w)
        })
    }

    /// Adds a key's stored events (as [`KeyWindow::encode_into`] lays them
    /// out, without the count) to its window.
    fn push_stored(&mut self, key: Key<'_>, partition: u32, events: &[u8], stride: usize) {
        let size = self.size_us;
        let latest = self.with_window(key, |w| {
            w.partition = partition;
            w.push_stored(events, stride, size);
            w.latest()
        });
        if let Some(latest) = latest {
            self.saw(partition, latest);
        }
    }

    /// Runs `f` on `key`'s window, made when there is none. (A closure, not
    /// a returned reference: the borrow checker takes the lookup then
    /// insert only within one body.) A row key is copied only for a new
    /// window.
    fn with_window<R>(&mut self, key: Key<'_>, f: impl FnOnce(&mut KeyWindow) -> R) -> R {
        let w = match key {
            Key::Int(k) => self.ints.entry(k).or_default(),
            Key::Row(k) => match self.rows.get_mut(k) {
                Some(w) => w,
                None => self.rows.entry(k.into()).or_default(),
            },
        };
        f(w)
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
    /// follows the active keys rather than every key ever seen. (A durable
    /// window stores nothing for this: its next snapshot leaves them out,
    /// and a restart's replay forgets them again.)
    pub fn sweep(&mut self) {
        let size = self.size_us;
        if !self.newest.iter().zip(&self.swept_at).any(|(n, s)| n.saturating_sub(*s) >= size) {
            return;
        }
        let newest = &self.newest;
        let horizon = |p: u32| newest.get(p as usize).map_or(i64::MIN, |n| n.saturating_sub(size));
        let stale = |w: &KeyWindow| w.latest().is_none_or(|t| t < horizon(w.partition));
        self.ints.retain(|_, w| !stale(w));
        self.rows.retain(|_, w| !stale(w));
        self.swept_at.clone_from(&self.newest);
    }

    /// Encodes the changes so far for the next [`Windows::changes`]: each
    /// partition's events since, as a log, or a new snapshot of its windows
    /// when one is due. A rule evaluated on a thread of its own encodes
    /// there, after its batch (`stride`: the rule's aggregate count).
    pub fn encode_changes(&mut self, stride: usize) {
        let Self { durable: Some(d), ints, rows, .. } = self else { return };
        let min = d.snapshot_min;
        let due: Vec<bool> = d
            .parts
            .iter()
            .map(|p| {
                !p.events.is_empty()
                    && (p.generation.is_none() || p.logged + p.events.len() >= min.max(p.snapshot))
            })
            .collect();
        if due.contains(&true) {
            // One pass over the keys for every partition due.
            let mut snapshots: Vec<Option<Vec<Vec<u8>>>> =
                due.iter().map(|due| due.then(|| vec![Vec::new()])).collect();
            let piece = d.snapshot_piece;
            let keys = ints.iter().map(|(k, w)| (Key::Int(*k), w));
            for (key, w) in keys.chain(rows.iter().map(|(k, w)| (Key::Row(k), w))) {
                if let Some(Some(pieces)) = snapshots.get_mut(w.partition as usize) {
                    if pieces.last().is_some_and(|p| p.len() >= piece) {
                        pieces.push(Vec::new());
                    }
                    if let Some(out) = pieces.last_mut() {
                        write_key(out, key);
                        w.encode_into(out, stride);
                    }
                }
            }
            for (p, snapshot) in snapshots.into_iter().enumerate() {
                if let Some(snapshot) = snapshot {
                    d.snapshot(p as u32, stride, &snapshot);
                }
            }
        }
        for (p, part) in d.parts.iter_mut().enumerate() {
            let from = part.replaced.len().saturating_sub(DROP_PER_BATCH);
            d.encoded.extend(part.replaced.drain(from..).map(|field| Stored {
                partition: p as u32,
                field,
                value: None,
            }));
            let Some(generation) = part.generation.filter(|_| !part.events.is_empty()) else { continue };
            let mut value = Vec::with_capacity(4 + part.events.len());
            value.extend_from_slice(&(stride as u32).to_le_bytes());
            value.append(&mut part.events);
            part.logged += value.len();
            let field = log_field(&d.prefix, generation, part.next);
            part.next += 1;
            d.encoded.push(Stored { partition: p as u32, field, value: Some(value) });
        }
    }

    /// The changes since the last call, as stored: fields to set, and
    /// fields to remove (`value: None`).
    pub fn changes(&mut self, stride: usize) -> Vec<Stored> {
        self.encode_changes(stride);
        self.durable.as_mut().map(|d| std::mem::take(&mut d.encoded)).unwrap_or_default()
    }

    /// Puts back the windows stored by [`Windows::changes`]: per stored
    /// field its partition, the field after the prefix, and its value.
    /// Fields not of this window (another stride) are left out. Returns
    /// the keys restored. Call it on a durable window, before any event.
    pub fn restore<'a>(
        &mut self,
        stored: impl IntoIterator<Item = (u32, &'a [u8], &'a [u8])>,
        stride: usize,
    ) -> usize {
        let Some(prefix) = self.durable.as_ref().map(|d| d.prefix) else { return 0 };
        let mut saved: Vec<Saved<'a>> = Vec::new();
        for (p, field, value) in stored {
            if saved.len() <= p as usize {
                saved.resize_with(p as usize + 1, Saved::default);
            }
            let s = &mut saved[p as usize];
            let mut r = Reader(value);
            match field.split_first() {
                Some((b's', place)) if place.is_empty() || place.len() == 4 => {
                    let k = place.try_into().map_or(0, u32::from_be_bytes);
                    if let Some(generation) = r.u64() {
                        s.snapshot.push((k, generation, r.0));
                    }
                }
                Some((b'l', name)) if name.len() == 16 => {
                    let (g, n) = name.split_at(8);
                    let word = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or_default());
                    s.logs.push((word(g), word(n), value));
                }
                Some((b'i' | b'r', _)) => s.keys.push((field, value)),
                _ => {}
            }
        }
        for (p, s) in saved.into_iter().enumerate() {
            self.restore_partition(p as u32, s, stride, &prefix);
        }
        self.keys()
    }

    fn restore_partition(&mut self, p: u32, mut s: Saved<'_>, stride: usize, prefix: &[u8; 8]) {
        let mut part = Part::default();
        s.snapshot.sort_unstable_by_key(|(k, _, _)| *k);
        // The pieces of the first piece's generation, in order; a piece of
        // another (left by a larger snapshot before) is stale.
        let generation = s.snapshot.first().filter(|(k, _, _)| *k == 0).map(|(_, g, _)| *g);
        for (k, g, bytes) in &s.snapshot {
            let mut r = Reader(bytes);
            if Some(*g) != generation || *k != part.pieces || r.stride(stride).is_none() {
                part.stale.push(snapshot_field(prefix, *k));
                continue;
            }
            part.snapshot += 8 + bytes.len();
            part.pieces += 1;
            while let Some(key) = r.key() {
                let Some(n) = r.u32() else { break };
                let Some(events) = r.take(n as usize * (1 + stride) * 8) else { break };
                self.push_stored(key, p, events, stride);
            }
            part.generation = generation;
        }
        s.logs.sort_unstable_by_key(|(g, n, _)| (*g, *n));
        let mut values = Vec::with_capacity(stride);
        for (g, n, bytes) in s.logs {
            let mut r = Reader(bytes);
            if part.generation != Some(g) || r.stride(stride).is_none() {
                part.stale.push(log_field(prefix, g, n));
                continue;
            }
            part.logged += bytes.len();
            part.next = n + 1;
            while let Some(key) = r.key() {
                let Some(event) = r.take((1 + stride) * 8) else { break };
                let t = read_event(event, &mut values);
                self.push(key, p, t, &values, |_| ());
            }
        }
        for (field, value) in s.keys {
            part.stale.push([prefix.as_slice(), field].concat());
            let mut r = Reader(value);
            if part.generation.is_some() || r.stride(stride).is_none() {
                continue;
            }
            let Some(key) = old_key(field) else { continue };
            self.push_stored(key, p, r.0, stride);
        }
        if let Some(d) = &mut self.durable {
            if d.parts.len() <= p as usize {
                d.parts.resize_with(p as usize + 1, Part::default);
            }
            d.parts[p as usize] = part;
        }
    }

    pub fn keys(&self) -> usize {
        self.ints.len() + self.rows.len()
    }
}

impl Durable {
    /// Stores `windows` (the partition's keys, as a snapshot holds them, in
    /// pieces) as partition `p`'s new snapshot, in place of the one before
    /// and its logs.
    fn snapshot(&mut self, p: u32, stride: usize, windows: &[Vec<u8>]) {
        let prefix = self.prefix;
        let part = &mut self.parts[p as usize];
        // Changes of this partition encoded and not taken yet are in the
        // snapshot (removals excepted: they remove what is stored).
        self.encoded.retain(|s| s.partition != p || s.value.is_none());
        let mut replaced = std::mem::take(&mut part.replaced);
        replaced.append(&mut part.stale);
        if let Some(g) = part.generation {
            replaced.extend((0..part.next).map(|n| log_field(&prefix, g, n)));
        }
        // Pieces of the snapshot before past this one's last are removed.
        let pieces = windows.len().max(1) as u32;
        replaced.extend((pieces..part.pieces).map(|k| snapshot_field(&prefix, k)));
        // Never a removal of a field this snapshot writes.
        let written: Vec<Vec<u8>> = (0..pieces).map(|k| snapshot_field(&prefix, k)).collect();
        replaced.retain(|f| !written.contains(f));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        let generation = part.generation.map_or(now, |g| now.max(g + 1));
        let mut total = 0;
        for (k, keys) in windows.iter().enumerate() {
            let mut value = Vec::with_capacity(12 + keys.len());
            value.extend_from_slice(&generation.to_le_bytes());
            value.extend_from_slice(&(stride as u32).to_le_bytes());
            value.extend_from_slice(keys);
            total += value.len();
            self.encoded.push(Stored { partition: p, field: snapshot_field(&prefix, k as u32), value: Some(value) });
        }
        *part = Part { generation: Some(generation), snapshot: total, replaced, pieces, ..Part::default() };
    }
}

/// The stored field of a snapshot's piece `k` (by the window's prefix).
fn snapshot_field(prefix: &[u8; 8], k: u32) -> Vec<u8> {
    let mut field = [prefix.as_slice(), b"s"].concat();
    if k > 0 {
        field.extend_from_slice(&k.to_be_bytes());
    }
    field
}

/// The stored field of a window's log (by the window's prefix).
fn log_field(prefix: &[u8; 8], generation: u64, n: u64) -> Vec<u8> {
    let mut field = Vec::with_capacity(25);
    field.extend_from_slice(prefix);
    field.push(b'l');
    field.extend_from_slice(&generation.to_be_bytes());
    field.extend_from_slice(&n.to_be_bytes());
    field
}

/// The key of a window stored one per key: `i` and 8 bytes, or `r` and
/// Arrow's row format.
fn old_key(field: &[u8]) -> Option<Key<'_>> {
    match field.split_first()? {
        (b'i', k) => Some(Key::Int(i64::from_le_bytes(k.try_into().ok()?))),
        (b'r', k) => Some(Key::Row(k)),
        _ => None,
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
        w.add(Key::Int(1), 1, 20 * s, &[None], &f, &mut out);
        w.sweep();
        assert_eq!(w.keys(), 2, "keys 1 (at 20 s) and 2 (at 99 s)");
        w.add(Key::Int(3), 1, 30 * s, &[None], &f, &mut out);
        w.sweep();
        assert_eq!(w.keys(), 2, "partition 1 at 30 s: key 1 fell out of its window");
    }

    /// A busy key (a merchant, a card under attack) holds many events in its
    /// window: each batch stores the events it added, not the whole window
    /// again.
    #[test]
    fn a_busy_keys_window_costs_each_batch_its_new_events() {
        let f = [Func::CountAll, Func::Sum];
        let mut w = Windows::new(std::time::Duration::from_secs(3600));
        w.make_durable(*b"windows_");
        let mut out = Vec::new();
        let (batches, per_batch) = (20, 500);
        let mut stored = 0;
        for b in 0..batches {
            for i in 0..per_batch {
                let t = (b * per_batch + i) as i64 * 1000;
                w.add(Key::Int(42), 0, t, &[None, Some(1.0)], &f, &mut out);
            }
            w.sweep();
            stored += w
                .changes(f.len())
                .iter()
                .map(|c| c.field.len() + c.value.as_ref().map_or(0, Vec::len))
                .sum::<usize>();
        }
        assert_eq!(out, vec![Some(10_000.0), Some(10_000.0)]);
        // An event's time and inputs, and its key.
        let event = 8 * (1 + f.len()) + 9;
        let events = batches * per_batch;
        assert!(stored <= 3 * events * event, "{stored} bytes stored for {events} events of {event} bytes");
    }

    /// Stored fields as Redis keeps them: changes applied batch by batch.
    #[derive(Default)]
    struct Hash(std::collections::BTreeMap<(u32, Vec<u8>), Vec<u8>>);

    impl Hash {
        fn apply(&mut self, changes: Vec<Stored>) {
            for c in changes {
                assert_eq!(&c.field[..8], b"windows_");
                match c.value {
                    Some(v) => self.0.insert((c.partition, c.field), v),
                    None => self.0.remove(&(c.partition, c.field)),
                };
            }
        }

        /// A durable window restored from the fields; its keys.
        fn restore(&self, size: std::time::Duration, stride: usize) -> (Windows, usize) {
            let mut w = Windows::new(size);
            w.make_durable(*b"windows_");
            let keys = w.restore(self.0.iter().map(|((p, f), v)| (*p, &f[8..], v.as_slice())), stride);
            (w, keys)
        }

        fn bytes(&self) -> usize {
            self.0.iter().map(|((_, f), v)| f.len() + v.len()).sum()
        }
    }

    /// Durable windows, stored batch by batch as logs and snapshots (a
    /// small snapshot threshold takes many), restore at any batch to
    /// windows that go on exactly as the original: over two partitions,
    /// integer and row keys, NULL inputs, keys forgotten by sweeps.
    #[test]
    fn stored_windows_restore_to_the_same_state() {
        let f = [Func::CountAll, Func::Sum, Func::Min, Func::Max];
        let size = std::time::Duration::from_secs(20);
        let s = 1_000_000;
        let mut w = Windows::new(size);
        w.make_durable(*b"windows_");
        w.durable.as_mut().unwrap().snapshot_min = 2000;
        let mut hash = Hash::default();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut t = [0i64; 2];
        let (mut snapshots, mut largest) = (0, 0);
        let event = |next: &mut dyn FnMut() -> u64, t: &mut [i64; 2]| {
            // A key belongs to one partition, as `partition_by` makes it:
            // keys 0, 1, 4, 5, 8, 9 to partition 0, the others to 1.
            let k = next() % 12;
            let p = ((k / 2) % 2) as usize;
            t[p] += (next() % 700_000) as i64 + if next() % 50 == 0 { 30 * s } else { 0 };
            let v = (next() % 5 != 0).then(|| (next() % 100) as f64);
            (p as u32, k, t[p], [None, v, v, v.map(|v| -v)])
        };
        for batch in 0..60 {
            for _ in 0..(next() % 40) {
                let (p, k, t, v) = event(&mut next, &mut t);
                let mut out = Vec::new();
                let row = k.to_string();
                let key = if k % 2 == 0 { Key::Int(k as i64) } else { Key::Row(row.as_bytes()) };
                w.add(key, p, t, &v, &f, &mut out);
            }
            w.sweep();
            let changes = w.changes(f.len());
            snapshots += changes.iter().filter(|c| c.field[8] == b's').count();
            hash.apply(changes);
            largest = largest.max(hash.bytes());
            // Restored now, the windows answer as the original's for the
            // next events.
            let (mut back, _) = hash.restore(size, f.len());
            let (mut probe, mut t2, mut x2) = (w.clone(), t, next());
            let mut next2 = move || {
                x2 ^= x2 << 13;
                x2 ^= x2 >> 7;
                x2 ^= x2 << 17;
                x2
            };
            for _ in 0..30 {
                let (p, k, at, v) = event(&mut next2, &mut t2);
                let row = k.to_string();
                let key = if k % 2 == 0 { Key::Int(k as i64) } else { Key::Row(row.as_bytes()) };
                let (mut a, mut b) = (Vec::new(), Vec::new());
                probe.add(key, p, at, &v, &f, &mut a);
                back.add(key, p, at, &v, &f, &mut b);
                assert_eq!(a, b, "batch {batch}: key {k} of partition {p} at {at}");
            }
        }
        assert!(snapshots > 4, "snapshots taken again: {snapshots}");
        let fields = hash.0.len();
        assert!(fields < 40, "old logs are removed with each snapshot: {fields} fields");
        assert!(largest < 40_000, "stored state bounded: {largest} bytes");
    }

    /// A snapshot larger than a piece is stored in several, each within
    /// the bound, that restore to the same windows; a later, smaller
    /// snapshot removes the pieces it no longer has.
    #[test]
    fn a_large_snapshot_is_stored_in_bounded_pieces() {
        let f = [Func::CountAll, Func::Sum];
        let size = std::time::Duration::from_secs(100);
        let mut w = Windows::new(size);
        w.make_durable(*b"windows_");
        let d = w.durable.as_mut().unwrap();
        d.snapshot_piece = 500;
        d.snapshot_min = 0;
        let mut hash = Hash::default();
        let mut out = Vec::new();
        for k in 0..300i64 {
            w.add(Key::Int(k), 0, k * 1000, &[None, Some(k as f64)], &f, &mut out);
        }
        w.sweep();
        hash.apply(w.changes(f.len()));
        let pieces: Vec<usize> =
            hash.0.iter().filter(|((_, f), _)| f[8] == b's').map(|(_, v)| v.len()).collect();
        assert!(pieces.len() > 5, "{pieces:?}");
        assert!(pieces.iter().all(|n| *n <= 500 + 12 + 64), "{pieces:?}");
        let (mut back, keys) = hash.restore(size, f.len());
        assert_eq!(keys, 300);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        w.clone().add(Key::Int(7), 0, 300_000, &[None, Some(1.0)], &f, &mut a);
        back.add(Key::Int(7), 0, 300_000, &[None, Some(1.0)], &f, &mut b);
        assert_eq!(a, b);
        // Most keys age out: the next snapshot is one piece, and the others go.
        for i in 0..400i64 {
            w.add(Key::Int(1), 0, 200_000_000 + i, &[None, Some(1.0)], &f, &mut out);
            w.sweep();
            hash.apply(w.changes(f.len()));
        }
        let left = hash.0.iter().filter(|((_, f), _)| f[8] == b's').count();
        assert_eq!(left, 1, "the pieces past the new snapshot's removed");
        let (_, keys) = hash.restore(size, f.len());
        assert_eq!(keys, w.keys());
    }

    /// A snapshot does not remove the logs it replaces all in its own
    /// batch (a busy stream logs thousands between snapshots, and removing
    /// them at once held that batch's acknowledgement for tens of
    /// milliseconds): the batches after remove them a few hundred at a
    /// time, and none is left once as many batches have passed.
    #[test]
    fn a_snapshot_leaves_the_logs_it_replaces_to_the_batches_after() {
        let f = [Func::CountAll];
        let s = 1_000_000;
        let mut w = Windows::new(std::time::Duration::from_secs(4 * 3600));
        w.make_durable(*b"windows_");
        w.durable.as_mut().unwrap().snapshot_min = 100_000;
        let mut hash = Hash::default();
        let (mut out, mut most, mut snapshots) = (Vec::new(), 0, 0);
        for i in 0..12_000i64 {
            w.add(Key::Int(i % 500), 0, i * s, &[None], &f, &mut out);
            let changes = w.changes(1);
            most = most.max(changes.iter().filter(|c| c.value.is_none()).count());
            snapshots += changes.iter().filter(|c| c.field[8] == b's').count();
            hash.apply(changes);
        }
        assert!(snapshots >= 3, "snapshots taken: {snapshots}");
        assert!(most <= DROP_PER_BATCH, "{most} fields removed in one batch");
        let logs = hash.0.keys().filter(|(_, f)| f[8] == b'l').count();
        assert!(logs < 5000, "{logs} logs stored: the replaced ones are removed");
        let (mut back, _) = hash.restore(std::time::Duration::from_secs(4 * 3600), 1);
        back.add(Key::Int(7), 0, 12_000 * s, &[None], &f, &mut out);
        assert_eq!(out.last(), Some(&Some(25.0)), "key 7's 24 events and this one");
    }

    /// Logs of another generation (left by an engine whose snapshot did not
    /// store) are not replayed, and the next snapshot removes them; a
    /// window stored one field per key is read, then replaced.
    #[test]
    fn stale_logs_and_windows_stored_per_key_are_replaced_by_the_next_snapshot() {
        let f = [Func::CountAll];
        let size = std::time::Duration::from_secs(60);
        let s = 1_000_000;
        let mut hash = Hash::default();
        let mut w = Windows::new(size);
        w.make_durable(*b"windows_");
        let mut out = Vec::new();
        w.add(Key::Int(1), 0, 0, &[None], &f, &mut out);
        hash.apply(w.changes(1));
        w.add(Key::Int(1), 0, s, &[None], &f, &mut out);
        hash.apply(w.changes(1));
        // A log of another generation, and key 2's window stored alone
        // (stride 1, events at 2 s and 3 s).
        let stale = log_field(b"windows_", 7, 0);
        let mut events = Vec::new();
        write_key(&mut events, Key::Int(1));
        write_event(&mut events, 5 * s, &[None]);
        hash.0.insert((0, stale.clone()), [&1u32.to_le_bytes()[..], &events].concat());
        let old = [&b"windows_i"[..], &2i64.to_le_bytes()].concat();
        let mut window = 1u32.to_le_bytes().to_vec();
        for t in [2 * s, 3 * s] {
            write_event(&mut window, t, &[None]);
        }
        hash.0.insert((0, old.clone()), window);
        let (mut back, keys) = hash.restore(size, 1);
        assert_eq!(keys, 1, "key 1 from the snapshot and its log; key 2 is not read beside a snapshot");
        back.add(Key::Int(1), 0, 2 * s, &[None], &f, &mut out);
        assert_eq!(out, vec![Some(3.0)], "events at 0, 1 and 2 s: the stale log's is not replayed");
        back.durable.as_mut().unwrap().snapshot_min = 0;
        let changes = back.changes(1);
        let removed: Vec<&[u8]> =
            changes.iter().filter(|c| c.value.is_none()).map(|c| &c.field[..]).collect();
        assert!(removed.contains(&&stale[..]) && removed.contains(&&old[..]), "both removed");
        hash.apply(changes);
        assert_eq!(hash.0.len(), 1, "the snapshot alone");

        // Without a snapshot, a window stored per key is read.
        let mut hash = Hash::default();
        let mut window = 1u32.to_le_bytes().to_vec();
        for t in [2 * s, 3 * s] {
            write_event(&mut window, t, &[None]);
        }
        hash.0.insert((0, old.clone()), window);
        let (mut back, keys) = hash.restore(size, 1);
        assert_eq!(keys, 1);
        back.add(Key::Int(2), 0, 4 * s, &[None], &f, &mut out);
        assert_eq!(out, vec![Some(3.0)]);
        let changes = back.changes(1);
        assert!(changes.iter().any(|c| c.field == old && c.value.is_none()), "replaced by the snapshot");
        assert!(changes.iter().any(|c| c.field[8] == b's'));
    }
}
