//! Lookup tables in stream SQL: a table whose contents change only on
//! refresh ([`Lookup`]), the scan that reads its current version, and the
//! join that probes it.
//!
//! DataFusion's hash join builds its hash table from one side on every
//! execution, which in a stream is every micro-batch: a 100,000-row lookup
//! would be hashed again for each batch of a few hundred events. So after
//! planning, [`rewrite`] replaces each equi-join of the events with a lookup
//! (inner, or outer on the events' side) by a [`LookupJoinExec`]: it hashes
//! the lookup side once per version of its tables and probes it with each
//! batch. Other joins of a lookup keep DataFusion's plan, which reads the
//! current version on each batch: slower, equally correct.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{ArrayRef, UInt32Builder};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, JoinType, NullEquality};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr, PhysicalExprRef};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::joins::HashJoinExec;
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    collect, DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties,
};
use futures::{StreamExt, TryStreamExt};

type DfResult<T> = datafusion::common::Result<T>;

/// One version of a lookup table: all its rows.
#[derive(Debug)]
pub struct Version {
    /// 1 for the table read at start, one more per refresh.
    pub number: u64,
    pub batch: RecordBatch,
}

/// A lookup table: the version in use, and a newer one waiting to be taken
/// into use between two batches.
#[derive(Debug)]
pub struct Lookup {
    pub name: String,
    schema: SchemaRef,
    current: Mutex<Arc<Version>>,
    offered: Mutex<Option<Arc<Version>>>,
}

impl Lookup {
    pub fn new(name: &str, first: Version) -> Self {
        Self {
            name: name.to_string(),
            schema: first.batch.schema(),
            current: Mutex::new(Arc::new(first)),
            offered: Mutex::new(None),
        }
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// A newer version, taken into use by the next [`Lookup::advance`].
    pub fn offer(&self, v: Version) {
        *self.offered.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(v));
    }

    /// Takes the offered version into use, if there is one.
    pub fn advance(&self) {
        if let Some(v) = self.offered.lock().unwrap_or_else(|e| e.into_inner()).take() {
            *self.current.lock().unwrap_or_else(|e| e.into_inner()) = v;
        }
    }

    pub fn current(&self) -> Arc<Version> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A lookup as a table of SQL queries.
#[derive(Debug)]
pub struct LookupTable(pub Arc<Lookup>);

#[async_trait::async_trait]
impl TableProvider for LookupTable {
    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(LookupScanExec::new(self.0.clone(), projection.cloned())?))
    }
}

fn properties(schema: SchemaRef, partitioning: Partitioning) -> Arc<PlanProperties> {
    Arc::new(PlanProperties::new(
        EquivalenceProperties::new(schema),
        partitioning,
        EmissionType::Incremental,
        Boundedness::Bounded,
    ))
}

/// Reads the version of a lookup in use.
#[derive(Debug)]
pub struct LookupScanExec {
    lookup: Arc<Lookup>,
    projection: Option<Vec<usize>>,
    cache: Arc<PlanProperties>,
}

impl LookupScanExec {
    fn new(lookup: Arc<Lookup>, projection: Option<Vec<usize>>) -> DfResult<Self> {
        let schema = match &projection {
            Some(p) => Arc::new(lookup.schema().project(p)?),
            None => lookup.schema(),
        };
        Ok(Self { lookup, projection, cache: properties(schema, Partitioning::UnknownPartitioning(1)) })
    }
}

impl DisplayAs for LookupScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "LookupScanExec: {}", self.lookup.name)
    }
}

impl ExecutionPlan for LookupScanExec {
    fn name(&self) -> &str {
        "LookupScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.cache
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, _partition: usize, _ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let batch = self.lookup.current().batch.clone();
        let batch = match &self.projection {
            Some(p) => batch.project(p)?,
            None => batch,
        };
        Ok(Box::pin(MemoryStream::try_new(vec![batch], self.schema(), None)?))
    }
}

/// The lookup side of a join hashed by its key: built once per version of
/// the lookups it reads.
struct Index {
    versions: Vec<u64>,
    batch: RecordBatch,
    /// Encodes the keys, of the lookup side and of the events alike.
    converter: RowConverter,
    rows: HashMap<Box<[u8]>, Vec<u32>>,
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "Index({} rows, versions {:?})", self.batch.num_rows(), self.versions)
    }
}

/// The lookup side of a join and its index, shared by every copy of the
/// join a plan reset makes, so the index outlives batches.
#[derive(Debug)]
struct LookupSide {
    /// A plan over lookup scans only, run once per version.
    build: Arc<dyn ExecutionPlan>,
    lookups: Vec<Arc<Lookup>>,
    keys: Vec<PhysicalExprRef>,
    index: tokio::sync::Mutex<Option<Arc<Index>>>,
    /// How many times the index was built (once per version).
    builds: AtomicU64,
}

impl LookupSide {
    /// The index of the lookup versions in use, built again when one changed.
    async fn index(&self, ctx: Arc<TaskContext>) -> DfResult<Arc<Index>> {
        let versions: Vec<u64> = self.lookups.iter().map(|l| l.current().number).collect();
        let mut slot = self.index.lock().await;
        if let Some(i) = slot.as_ref().filter(|i| i.versions == versions) {
            return Ok(i.clone());
        }
        let plan = datafusion::physical_plan::execution_plan::reset_plan_states(self.build.clone())?;
        let batches = collect(plan, ctx).await?;
        let batch = datafusion::arrow::compute::concat_batches(&self.build.schema(), &batches)?;
        let columns = key_columns(&self.keys, &batch)?;
        let fields = columns.iter().map(|c| SortField::new(c.data_type().clone())).collect();
        let converter = RowConverter::new(fields)?;
        let converted = converter.convert_columns(&columns)?;
        let mut rows: HashMap<Box<[u8]>, Vec<u32>> = HashMap::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            if columns.iter().any(|c| c.is_null(i)) {
                continue; // a null key matches nothing
            }
            rows.entry(converted.row(i).as_ref().into()).or_default().push(i as u32);
        }
        let built = Arc::new(Index { versions, batch, converter, rows });
        self.builds.fetch_add(1, Ordering::Relaxed);
        *slot = Some(built.clone());
        Ok(built)
    }
}

/// An equi-join of the events (`probe`) with a lookup side hashed once per
/// version. The output is the hash join's it replaces (see [`Joiner`]).
#[derive(Debug)]
pub struct LookupJoinExec {
    probe: Arc<dyn ExecutionPlan>,
    join: Arc<Joiner>,
    side: Arc<LookupSide>,
    cache: Arc<PlanProperties>,
}

impl DisplayAs for LookupJoinExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let names: Vec<&str> = self.side.lookups.iter().map(|l| l.name.as_str()).collect();
        write!(f, "LookupJoinExec: lookups={names:?}, keep_unmatched={}", self.join.keep_unmatched)
    }
}

impl ExecutionPlan for LookupJoinExec {
    fn name(&self) -> &str {
        "LookupJoinExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.cache
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.probe]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        for e in &self.join.probe_keys {
            if f(e)? == TreeNodeRecursion::Stop {
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let probe =
            children.pop().ok_or_else(|| DataFusionError::Internal("LookupJoinExec: no input".into()))?;
        Ok(Arc::new(Self {
            probe,
            join: self.join.clone(),
            side: self.side.clone(),
            cache: self.cache.clone(),
        }))
    }

    fn execute(&self, partition: usize, ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let probe = self.probe.execute(partition, ctx.clone())?;
        let (join, side) = (self.join.clone(), self.side.clone());
        let joined = async move {
            let index = side.index(ctx).await?;
            Ok::<_, DataFusionError>(probe.map(move |b| join.join(&b?, &index)))
        };
        let out = futures::stream::once(joined).try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.schema(), out)))
    }
}

fn key_columns(keys: &[PhysicalExprRef], batch: &RecordBatch) -> DfResult<Vec<ArrayRef>> {
    keys.iter().map(|k| k.evaluate(batch)?.into_array(batch.num_rows())).collect()
}

/// How one batch of events is joined with an index: the columns of the
/// hash join's left then right input, rows of the events without a match
/// kept (with nulls) when `keep_unmatched`, then the join's projection.
#[derive(Debug)]
struct Joiner {
    probe_keys: Vec<PhysicalExprRef>,
    keep_unmatched: bool,
    probe_is_left: bool,
    join_schema: SchemaRef,
    projection: Option<Vec<usize>>,
}

impl Joiner {
    fn join(&self, batch: &RecordBatch, index: &Index) -> DfResult<RecordBatch> {
        let columns = key_columns(&self.probe_keys, batch)?;
        let converted = index.converter.convert_columns(&columns)?;
        let mut probe_at = UInt32Builder::with_capacity(batch.num_rows());
        let mut build_at = UInt32Builder::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let found = if columns.iter().any(|c| c.is_null(i)) {
                None
            } else {
                index.rows.get(converted.row(i).as_ref())
            };
            match found {
                Some(matches) => {
                    for &j in matches {
                        probe_at.append_value(i as u32);
                        build_at.append_value(j);
                    }
                }
                None if self.keep_unmatched => {
                    probe_at.append_value(i as u32);
                    build_at.append_null();
                }
                None => {}
            }
        }
        let (probe_at, build_at) = (probe_at.finish(), build_at.finish());
        let probe_cols = batch.columns().iter().map(|c| take(c, &probe_at, None));
        let build_cols = index.batch.columns().iter().map(|c| take(c, &build_at, None));
        let columns: Vec<ArrayRef> = if self.probe_is_left {
            probe_cols.chain(build_cols).collect::<Result<_, _>>()?
        } else {
            build_cols.chain(probe_cols).collect::<Result<_, _>>()?
        };
        let joined = RecordBatch::try_new(self.join_schema.clone(), columns)?;
        Ok(match &self.projection {
            Some(p) => joined.project(p)?,
            None => joined,
        })
    }
}

/// The lookups a plan reads, when it reads nothing else (every leaf is a
/// lookup scan).
fn only_lookups(plan: &Arc<dyn ExecutionPlan>) -> Option<Vec<Arc<Lookup>>> {
    let mut found = Vec::new();
    let mut other = false;
    let _ = plan.apply(|node| {
        if let Some(scan) = node.downcast_ref::<LookupScanExec>() {
            found.push(scan.lookup.clone());
        } else if node.children().is_empty() {
            other = true;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    (!other && !found.is_empty()).then_some(found)
}

/// Replaces each hash join of the events with lookups by a
/// [`LookupJoinExec`] (see the module's documentation).
pub fn rewrite(plan: Arc<dyn ExecutionPlan>) -> DfResult<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        let Some(hj) = node.downcast_ref::<HashJoinExec>() else { return Ok(Transformed::no(node)) };
        if hj.filter().is_some() || hj.null_equality() != NullEquality::NullEqualsNothing {
            return Ok(Transformed::no(node));
        }
        let (left, right) = (hj.left(), hj.right());
        let (probe_is_left, lookups) = match (only_lookups(left), only_lookups(right)) {
            (None, Some(l)) => (true, l),
            (Some(l), None) => (false, l),
            _ => return Ok(Transformed::no(node)),
        };
        let keep_unmatched = match (hj.join_type(), probe_is_left) {
            (JoinType::Inner, _) => false,
            (JoinType::Left, true) | (JoinType::Right, false) => true,
            _ => return Ok(Transformed::no(node)),
        };
        let (left_keys, right_keys): (Vec<_>, Vec<_>) = hj.on().iter().cloned().unzip();
        let (probe, build, probe_keys, build_keys) = if probe_is_left {
            (left.clone(), right.clone(), left_keys, right_keys)
        } else {
            (right.clone(), left.clone(), right_keys, left_keys)
        };
        let schema = hj.schema();
        let partitioning = Partitioning::UnknownPartitioning(probe.output_partitioning().partition_count());
        let join = Joiner {
            probe_keys,
            keep_unmatched,
            probe_is_left,
            join_schema: hj.join_schema().clone(),
            projection: hj.projection.as_ref().map(|p| p.to_vec()),
        };
        let side = LookupSide {
            build,
            lookups,
            keys: build_keys,
            index: Default::default(),
            builds: AtomicU64::new(0),
        };
        Ok(Transformed::yes(Arc::new(LookupJoinExec {
            probe,
            join: Arc::new(join),
            side: Arc::new(side),
            cache: properties(schema, partitioning),
        }) as Arc<dyn ExecutionPlan>))
    })
    .map(|t| t.data)
}

/// How many lookup indexes the joins of `plan` built so far, and how many
/// joins were made lookup joins.
pub fn index_builds(plan: &Arc<dyn ExecutionPlan>) -> (usize, u64) {
    let (mut joins, mut builds) = (0, 0);
    let _ = plan.apply(|node| {
        if let Some(j) = node.downcast_ref::<LookupJoinExec>() {
            joins += 1;
            builds += j.side.builds.load(Ordering::Relaxed);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    (joins, builds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::prepared::SqlOp;
    use crate::transform::sql::{session, Purpose};
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::util::pretty::pretty_format_batches;

    fn events(rows: &[(i64, Option<i64>)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("customer_id", DataType::Int64, true),
        ]));
        let ids = Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
        let customers = Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
        RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(customers)]).unwrap()
    }

    fn risk(rows: &[(i64, &str)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("customer_id", DataType::Int64, false),
            Field::new("tier", DataType::Utf8, false),
        ]));
        let ids = Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
        let tiers = StringArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
        RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(tiers)]).unwrap()
    }

    /// The same query by DataFusion alone, over plain in-memory tables.
    async fn oracle(sql: &str, events: &RecordBatch, risk: &RecordBatch) -> String {
        let ctx = datafusion::prelude::SessionContext::new();
        ctx.register_batch("events", events.clone()).unwrap();
        ctx.register_batch("risk", risk.clone()).unwrap();
        let out = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        show(&out)
    }

    /// The rows, as a table; nothing for no rows.
    fn show(batches: &[RecordBatch]) -> String {
        let rows: Vec<RecordBatch> = batches.iter().filter(|b| b.num_rows() > 0).cloned().collect();
        if rows.is_empty() {
            return String::new();
        }
        pretty_format_batches(&rows).unwrap().to_string()
    }

    #[tokio::test]
    async fn lookup_joins_hash_each_version_once_and_answer_as_datafusion_does() {
        let ctx = session(Purpose::Stream);
        for sql in [
            "SELECT e.id, e.customer_id, r.tier FROM events AS e LEFT JOIN risk AS r ON r.customer_id = e.customer_id ORDER BY e.id, r.tier",
            "SELECT r.tier, e.id FROM events AS e JOIN risk AS r ON e.customer_id = r.customer_id ORDER BY e.id, r.tier",
            "SELECT e.id, r.tier FROM risk AS r RIGHT JOIN events AS e ON r.customer_id = e.customer_id ORDER BY e.id, r.tier",
        ] {
            let first = risk(&[(1, "high"), (2, "low"), (2, "watch"), (4, "low")]);
            let lookup = Arc::new(Lookup::new("risk", Version { number: 1, batch: first.clone() }));
            let schema = events(&[]).schema();
            let op = SqlOp::plan_with(&ctx, "t", sql, &[("events".into(), schema)], std::slice::from_ref(&lookup))
                .await
                .unwrap();
            assert_eq!(index_builds(&op.physical()).0, 1, "{sql}: the join is a lookup join");
            let batches = [
                events(&[(1, Some(1)), (2, Some(2)), (3, Some(3)), (4, None)]),
                events(&[(5, Some(2)), (6, Some(4))]),
                events(&[]),
            ];
            for b in &batches {
                op.inputs[0].1.set(vec![b.clone()]);
                let got = show(&op.run().await.unwrap());
                assert_eq!(got, oracle(sql, b, &first).await, "{sql}");
            }
            assert_eq!(index_builds(&op.physical()).1, 1, "{sql}: hashed once for three batches");

            let second = risk(&[(3, "high")]);
            lookup.offer(Version { number: 2, batch: second.clone() });
            op.inputs[0].1.set(vec![batches[0].clone()]);
            let got = show(&op.run().await.unwrap());
            assert_eq!(got, oracle(sql, &batches[0], &first).await, "{sql}: an offered version waits");
            lookup.advance();
            for b in &batches {
                op.inputs[0].1.set(vec![b.clone()]);
                let got = show(&op.run().await.unwrap());
                assert_eq!(got, oracle(sql, b, &second).await, "{sql}: version 2");
            }
            assert_eq!(index_builds(&op.physical()).1, 2, "{sql}: hashed again once for the new version");
        }
    }
}
