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

/// The recent events of one key.
#[derive(Default)]
struct KeyWindow {
    /// (event time in µs, aggregate inputs)
    events: VecDeque<(i64, Vec<Option<f64>>)>,
    sums: Vec<f64>,
    counts: Vec<i64>,
}

impl KeyWindow {
    fn push(&mut self, t: i64, values: Vec<Option<f64>>, size: i64) {
        if self.sums.len() < values.len() {
            self.sums.resize(values.len(), 0.0);
            self.counts.resize(values.len(), 0);
        }
        for (j, v) in values.iter().enumerate() {
            if let Some(v) = v {
                self.sums[j] += v;
                self.counts[j] += 1;
            }
        }
        self.events.push_back((t, values));
        while self.events.front().is_some_and(|(ft, _)| *ft < t - size) {
            if let Some((_, old)) = self.events.pop_front() {
                for (j, v) in old.iter().enumerate() {
                    if let Some(v) = v {
                        self.sums[j] -= v;
                        self.counts[j] -= 1;
                    }
                }
            }
        }
    }

    fn value(&self, j: usize, func: Func) -> Option<f64> {
        let n = self.counts.get(j).copied().unwrap_or(0);
        match func {
            Func::CountAll => Some(self.events.len() as f64),
            Func::Count => Some(n as f64),
            Func::Sum if n > 0 => Some(self.sums[j]),
            Func::Avg if n > 0 => Some(self.sums[j] / n as f64),
            Func::Min => self.events.iter().filter_map(|(_, v)| v[j]).reduce(f64::min),
            Func::Max => self.events.iter().filter_map(|(_, v)| v[j]).reduce(f64::max),
            _ => None,
        }
    }
}

/// The windows of one rule, per key.
pub struct Windows {
    size_us: i64,
    keys: HashMap<Box<[u8]>, KeyWindow>,
    newest: i64,
    swept_at: i64,
}

impl Windows {
    pub fn new(size: std::time::Duration) -> Self {
        Self { size_us: size.as_micros() as i64, keys: HashMap::new(), newest: i64::MIN, swept_at: 0 }
    }

    /// Adds one event to its key's window; returns the aggregates over that
    /// window, this event included.
    pub fn add(&mut self, key: &[u8], t: i64, values: Vec<Option<f64>>, funcs: &[Func]) -> Vec<Option<f64>> {
        let w = match self.keys.get_mut(key) {
            Some(w) => w,
            None => self.keys.entry(key.into()).or_default(),
        };
        w.push(t, values, self.size_us);
        let out = funcs.iter().enumerate().map(|(j, f)| w.value(j, *f)).collect();
        self.newest = self.newest.max(t);
        out
    }

    /// Forgets keys whose every event is older than the window, so state
    /// follows the active keys rather than every key ever seen.
    pub fn sweep(&mut self) {
        if self.newest - self.swept_at < self.size_us {
            return;
        }
        let horizon = self.newest - self.size_us;
        self.keys.retain(|_, w| w.events.back().is_some_and(|(t, _)| *t >= horizon));
        self.swept_at = self.newest;
    }

    pub fn keys(&self) -> usize {
        self.keys.len()
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
        assert_eq!(
            w.add(b"a", 0, vec![None, Some(1.0), Some(1.0)], &f),
            vec![Some(1.0), Some(1.0), Some(1.0)]
        );
        assert_eq!(w.add(b"b", 10 * s, vec![None, Some(5.0), Some(5.0)], &f)[0], Some(1.0));
        assert_eq!(
            w.add(b"a", 30 * s, vec![None, Some(2.0), Some(2.0)], &f),
            vec![Some(2.0), Some(3.0), Some(2.0)]
        );
        assert_eq!(
            w.add(b"a", 61 * s, vec![None, Some(4.0), Some(4.0)], &f),
            vec![Some(2.0), Some(6.0), Some(4.0)]
        );
        w.add(b"a", 75 * s, vec![None, Some(1.0), Some(1.0)], &f);
        w.sweep();
        assert_eq!(w.keys(), 1, "key b fell out of every window");
    }
}
