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

use std::collections::{HashMap, VecDeque};

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

/// The recent events of one key: their times, and their aggregate inputs
/// laid out flat (`stride` values an event), with running sums and counts.
#[derive(Default)]
struct KeyWindow {
    times: VecDeque<i64>,
    values: VecDeque<Option<f64>>,
    sums: Vec<f64>,
    counts: Vec<i64>,
}

impl KeyWindow {
    fn push(&mut self, t: i64, values: &[Option<f64>], size: i64) {
        let stride = values.len();
        if self.sums.len() < stride {
            self.sums.resize(stride, 0.0);
            self.counts.resize(stride, 0);
        }
        for (j, v) in values.iter().enumerate() {
            if let Some(v) = v {
                self.sums[j] += v;
                self.counts[j] += 1;
            }
        }
        self.times.push_back(t);
        self.values.extend(values.iter().copied());
        while self.times.front().is_some_and(|ft| *ft < t - size) {
            self.times.pop_front();
            for j in 0..stride {
                if let Some(Some(v)) = self.values.pop_front() {
                    self.sums[j] -= v;
                    self.counts[j] -= 1;
                }
            }
        }
    }

    fn value(&self, j: usize, stride: usize, func: Func) -> Option<f64> {
        let n = self.counts.get(j).copied().unwrap_or(0);
        let column = || self.values.iter().skip(j).step_by(stride.max(1)).filter_map(|v| *v);
        match func {
            Func::CountAll => Some(self.times.len() as f64),
            Func::Count => Some(n as f64),
            Func::Sum if n > 0 => Some(self.sums[j]),
            Func::Avg if n > 0 => Some(self.sums[j] / n as f64),
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
    newest: i64,
    swept_at: i64,
}

impl Windows {
    pub fn new(size: std::time::Duration) -> Self {
        Self {
            size_us: size.as_micros() as i64,
            ints: HashMap::default(),
            rows: HashMap::default(),
            newest: i64::MIN,
            swept_at: 0,
        }
    }

    /// Adds one event to its key's window; `out` gets the aggregates over
    /// that window, this event included (`values` holds their inputs).
    pub fn add(
        &mut self,
        key: Key<'_>,
        t: i64,
        values: &[Option<f64>],
        funcs: &[Func],
        out: &mut Vec<Option<f64>>,
    ) {
        let w = match key {
            Key::Int(k) => self.ints.entry(k).or_default(),
            Key::Row(k) => match self.rows.get_mut(k) {
                Some(w) => w,
                None => self.rows.entry(k.into()).or_default(),
            },
        };
        w.push(t, values, self.size_us);
        out.clear();
        out.extend(funcs.iter().enumerate().map(|(j, f)| w.value(j, values.len(), *f)));
        self.newest = self.newest.max(t);
    }

    /// Forgets keys whose every event is older than the window, so state
    /// follows the active keys rather than every key ever seen.
    pub fn sweep(&mut self) {
        if self.newest - self.swept_at < self.size_us {
            return;
        }
        let horizon = self.newest - self.size_us;
        self.ints.retain(|_, w| w.times.back().is_some_and(|t| *t >= horizon));
        self.rows.retain(|_, w| w.times.back().is_some_and(|t| *t >= horizon));
        self.swept_at = self.newest;
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

    #[test]
    fn windows_slide_per_key() {
        let mut w = Windows::new(std::time::Duration::from_secs(60));
        let f = [Func::CountAll, Func::Sum, Func::Max];
        let s = 1_000_000;
        let mut out = Vec::new();
        let mut add = |w: &mut Windows, key: &[u8], t: i64, v: f64| {
            w.add(Key::Row(key), t, &[None, Some(v), Some(v)], &f, &mut out);
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
}
