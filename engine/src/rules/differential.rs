//! One rule semantics: the same rule files over the same events, through the
//! stream evaluator ([`super::eval`], micro-batch by micro-batch, windows
//! carried between batches) and through the batch SQL ([`super::batch`],
//! window functions over the whole table), give the same alerts, and both
//! equal a direct count written here without either.
//!
//! Events of one key have distinct times and arrive in time order (the
//! stream's contract); windows include events at exactly `size` before.

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::arrow::array::{Array, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;

use super::batch::{batch_sql, version};
use super::eval::{CompiledRules, RuleState, Step};
use crate::spec::rules::{files, load, LoadedRule};
use crate::transform::sql::{session, Purpose};

#[derive(Clone)]
struct Event {
    id: i64,
    customer: i64,
    amount: f64,
    at_us: i64,
}

/// A fixed pseudo-random sequence (xorshift): the test is the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Events in time order: steps of 1 to 400 ms, so several fall in a
/// sub-second window and some gaps are longer than it.
fn events(n: usize) -> Vec<Event> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut at_us = 1_700_000_000_000_000i64;
    (0..n)
        .map(|i| {
            at_us += 1_000 * (1 + rng.below(400) as i64) + rng.below(1_000) as i64;
            Event {
                id: i as i64 + 1,
                customer: 1 + rng.below(5) as i64,
                amount: (rng.below(100_000) as f64) / 100.0,
                at_us,
            }
        })
        .collect()
}

/// Transactions as the rule tests see them.
pub(super) fn schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("transaction_id", DataType::Int64, false),
        Field::new("customer_id", DataType::Int64, false),
        Field::new("amount", DataType::Float64, false),
        Field::new("timestamp", ts, false),
    ]))
}

fn batch(events: &[Event]) -> RecordBatch {
    let ids: Int64Array = events.iter().map(|e| e.id).collect();
    let customers: Int64Array = events.iter().map(|e| e.customer).collect();
    let amounts: Float64Array = events.iter().map(|e| e.amount).collect();
    let times = TimestampMicrosecondArray::from(events.iter().map(|e| e.at_us).collect::<Vec<_>>())
        .with_timezone("UTC");
    RecordBatch::try_new(
        schema(),
        vec![Arc::new(ids), Arc::new(customers), Arc::new(amounts), Arc::new(times)],
    )
    .expect("a batch of the schema")
}

/// The rule files of the test: stateless, windowed (sub-second and not),
/// shadow and disabled.
const RULES: &[(&str, &str)] = &[
    ("large.yaml", "id: large\nseverity: high\nwhen: amount > 900\n"),
    (
        "burst.yaml",
        "id: burst\nseverity: medium\nwindow: { by: [customer_id], size: 750ms, time: timestamp }\nwhen: count(*) >= 3\n",
    ),
    (
        "spend.yaml",
        "id: spend\nseverity: low\nwindow: { by: [customer_id], size: 2500ms, time: timestamp }\nwhen: sum(amount) > 1500 AND max(amount) > 700\n",
    ),
    (
        "small_avg.yaml",
        "id: small_avg\nseverity: low\nwindow: { by: [customer_id], size: 1s, time: timestamp }\nwhen: count(*) >= 3 AND avg(amount) < 400 AND min(amount) < 50\n",
    ),
    ("quiet.yaml", "id: quiet\nseverity: low\nmode: shadow\nwhen: amount < 10\n"),
    ("off.yaml", "id: off\nseverity: low\nenabled: false\nwhen: amount > 0\n"),
];

fn rule_set() -> (tempfile::TempDir, Vec<LoadedRule>) {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, body) in RULES {
        std::fs::write(dir.path().join(name), body).expect("rule file");
    }
    let (set, diags) = load(&files(dir.path()).expect("rule files"));
    assert!(!diags.has_errors(), "{diags}");
    (dir, set)
}

fn alert_ids(batches: &[RecordBatch]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for b in batches {
        let col = b.column(b.schema().index_of("alert_id").expect("alert_id"));
        let col = datafusion::arrow::compute::cast(col, &DataType::Utf8).expect("ids as text");
        let ids = col.as_any().downcast_ref::<StringArray>().expect("text ids");
        out.extend((0..ids.len()).map(|i| ids.value(i).to_string()));
    }
    out
}

/// The stream evaluator, fed micro-batches of `size` events.
fn through_the_stream(set: &[LoadedRule], events: &[Event], size: usize) -> BTreeSet<String> {
    through_partitions(set, events, size, 1)
}

/// The stream evaluator over `partitions` partitions (an event's is its
/// customer modulo `partitions`), fed micro-batches of `size` events.
fn through_partitions(
    set: &[LoadedRule],
    events: &[Event],
    size: usize,
    partitions: u32,
) -> BTreeSet<String> {
    let ctx = session(Purpose::Stream);
    let rules = CompiledRules::build(&ctx, set, schema(), "transaction_id").expect("rules compile");
    let mut state = rules.state(RuleState::default());
    let mut out = Vec::new();
    for (seq, chunk) in events.chunks(size).enumerate() {
        let parts: Vec<u32> = chunk.iter().map(|e| (e.customer % i64::from(partitions)) as u32).collect();
        let alerts = rules
            .evaluate(&batch(chunk), &mut state, 0, Some(&parts), Step::at(seq as u64))
            .expect("evaluates")
            .alerts;
        out.push(alerts);
    }
    // The end of the stream releases what the windows still hold.
    let last = Step { flush: true, ..Step::at(u64::MAX) };
    let alerts = rules.evaluate(&batch(&[]), &mut state, 0, None, last).expect("evaluates").alerts;
    out.push(alerts);
    alert_ids(&out)
}

/// The batch SQL over the whole table.
async fn through_batch_sql(set: &[LoadedRule], events: &[Event]) -> BTreeSet<String> {
    let ctx = session(Purpose::Batch);
    let table = MemTable::try_new(schema(), vec![vec![batch(events)]]).expect("table");
    ctx.register_table("events", Arc::new(table)).expect("registered");
    let columns: Vec<String> = schema().fields().iter().map(|f| f.name().clone()).collect();
    let sql =
        batch_sql("events", "transaction_id", set, &columns, &version(set), false).expect("rules as SQL");
    let batches = ctx.sql(&sql).await.expect("plans").collect().await.expect("runs");
    alert_ids(&batches)
}

/// The alerts counted directly: for each event, the earlier events of its
/// customer no more than `size` before it, and the rule over them.
fn counted(events: &[Event]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let window = |e: &Event, size_us: i64| -> Vec<f64> {
        events
            .iter()
            .filter(|o| o.customer == e.customer && o.at_us <= e.at_us && o.at_us >= e.at_us - size_us)
            .map(|o| o.amount)
            .collect()
    };
    for e in events {
        if e.amount > 900.0 {
            out.insert(format!("large:{}", e.id));
        }
        if window(e, 750_000).len() >= 3 {
            out.insert(format!("burst:{}", e.id));
        }
        let w = window(e, 2_500_000);
        let (sum, max) = (w.iter().sum::<f64>(), w.iter().cloned().fold(f64::MIN, f64::max));
        if sum > 1500.0 && max > 700.0 {
            out.insert(format!("spend:{}", e.id));
        }
        let w = window(e, 1_000_000);
        let avg = w.iter().sum::<f64>() / w.len() as f64;
        let min = w.iter().cloned().fold(f64::MAX, f64::min);
        if w.len() >= 3 && avg < 400.0 && min < 50.0 {
            out.insert(format!("small_avg:{}", e.id));
        }
    }
    out
}

#[tokio::test]
async fn stream_and_batch_evaluators_give_the_same_alerts_as_a_direct_count() {
    let (_dir, set) = rule_set();
    let events = events(3_000);
    let expected = counted(&events);
    for rule in ["large", "burst", "spend", "small_avg"] {
        let n = expected.iter().filter(|a| a.starts_with(&format!("{rule}:"))).count();
        assert!(n >= 5, "the data should make rule '{rule}' fire a few times, not {n}");
        assert!(
            n < events.len() / 2,
            "rule '{rule}' fires on {n} of {} events: that proves little",
            events.len()
        );
    }
    let batch = through_batch_sql(&set, &events).await;
    assert_eq!(batch, expected, "batch SQL differs from the direct count");
    for size in [1, 137, 1_000] {
        let stream = through_the_stream(&set, &events, size);
        assert_eq!(stream, expected, "the stream in batches of {size} differs from the direct count");
    }
}

/// Events that arrive out of time order, each up to 3 s behind its place
/// (within the default allowed lateness, 5 s), give the alerts of the
/// events in order: windows count them by their time.
#[test]
fn events_out_of_order_within_the_lateness_give_the_in_order_alerts() {
    let (_dir, set) = rule_set();
    let events = events(3_000);
    let expected = counted(&events);
    let mut rng = Rng(0x5DEE_CE66_D1CE_4E5B);
    let mut arrival: Vec<(i64, usize)> =
        events.iter().enumerate().map(|(i, e)| (e.at_us + rng.below(3_000_000) as i64, i)).collect();
    arrival.sort();
    let moved = arrival.iter().enumerate().filter(|(k, (_, i))| k != i).count();
    assert!(moved > events.len() / 2, "most events arrive out of order: {moved}");
    let shuffled: Vec<Event> = arrival.iter().map(|(_, i)| events[*i].clone()).collect();
    for size in [1, 137, 1_000] {
        let stream = through_the_stream(&set, &shuffled, size);
        assert_eq!(stream, expected, "out of order in batches of {size}: not the in-order alerts");
    }
}

/// Partitions read unevenly (an engine taking one partition's backlog
/// before the other's, so one runs minutes of event time ahead) give the
/// alerts of the events in order: each partition's windows go by its own
/// time.
#[test]
fn partitions_read_unevenly_give_the_in_order_alerts() {
    let (_dir, set) = rule_set();
    let events = events(3_000);
    let expected = counted(&events);
    let mut arrival = Vec::with_capacity(events.len());
    for block in events.chunks(600) {
        for p in [0, 1] {
            arrival.extend(block.iter().filter(|e| e.customer % 2 == p).cloned());
        }
    }
    for size in [137, 1_000] {
        let stream = through_partitions(&set, &arrival, size, 2);
        let missing: Vec<&String> = expected.difference(&stream).collect();
        let extra: Vec<&String> = stream.difference(&expected).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "partitions read unevenly in batches of {size}: {} of {} alerts missing {missing:?}, {} extra {extra:?}",
            missing.len(),
            expected.len(),
            extra.len()
        );
    }
}
