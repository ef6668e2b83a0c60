//! SQL on Apache DataFusion: the one session builder every executor and the
//! planner use, planning queries against known schemas, and the
//! engine-provided functions.

use std::hash::Hasher;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Int64Builder};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::spec::sql::short;

/// What a session is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Planning against schemas, reading no data.
    Plan,
    /// A batch run: two partitions and a memory limit that makes large joins
    /// and aggregates spill to disk instead of growing without bound.
    Batch,
    /// A stream: one partition (a micro-batch is small, and plans without
    /// repartitioning can run again and again) and a `now()` read per batch.
    Stream,
}

/// The one session builder: DataFusion with the engine's functions, set up
/// for `purpose`.
pub fn session(purpose: Purpose) -> SessionContext {
    let ctx = match purpose {
        Purpose::Plan => SessionContext::new(),
        Purpose::Batch => {
            let config = SessionConfig::new().with_target_partitions(2).with_batch_size(8192);
            // A fair pool, not DataFusion's default greedy one: a query with
            // several sorts and window aggregates at once (a rules backtest)
            // shares the limit between them, where a greedy pool let one
            // take it all and another's merge fail at random.
            use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
            let pool = TrackConsumersPool::new(
                FairSpillPool::new(512 * 1024 * 1024),
                std::num::NonZeroUsize::new(5).unwrap_or(std::num::NonZeroUsize::MIN),
            );
            let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
                .with_memory_pool(Arc::new(pool))
                .build_arc()
                .unwrap_or_default();
            SessionContext::new_with_config_rt(config, runtime)
        }
        Purpose::Stream => SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1)),
    };
    register_functions(&ctx);
    super::generate::register(&ctx);
    if purpose == Purpose::Stream {
        ctx.register_udf(ScalarUDF::from(LiveNow::new()));
    }
    ctx
}

/// A DataFusion session with the engine's functions, used to plan SQL against
/// the schemas of upstream nodes without reading any data.
pub struct Planner {
    ctx: SessionContext,
}

impl Default for Planner {
    fn default() -> Self {
        Self::new()
    }
}

impl Planner {
    pub fn new() -> Self {
        Self { ctx: session(Purpose::Plan) }
    }

    /// Makes `name` a table with `schema` and no rows.
    pub fn register_empty(&self, name: &str, schema: SchemaRef) -> Result<(), String> {
        let table = MemTable::try_new(schema, vec![vec![]]).map_err(short)?;
        self.ctx.deregister_table(name).map_err(short)?;
        self.ctx.register_table(name, Arc::new(table)).map_err(short)?;
        Ok(())
    }

    /// The output schema of a query over the registered tables.
    pub async fn output_schema(&self, sql: &str) -> Result<SchemaRef, String> {
        let state = self.ctx.state();
        let plan = state.create_logical_plan(sql).await.map_err(short)?;
        Ok(Arc::new(plan.schema().as_arrow().clone()))
    }

    /// Whether the planned query aggregates (used to keep aggregates out of
    /// row-level rules and checks).
    pub async fn aggregates(&self, sql: &str) -> Result<bool, String> {
        let state = self.ctx.state();
        let plan = state.create_logical_plan(sql).await.map_err(short)?;
        let text = format!("{}", plan.display_indent());
        Ok(text.lines().any(|l| l.trim_start().starts_with("Aggregate:")))
    }
}

/// Registers every engine-provided SQL function on a session.
pub fn register_functions(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::from(SurrogateKey::new()));
}

/// `surrogate_key(col, ...)`: a stable, non-negative 63-bit key from natural-key
/// columns. The same values give the same key in every run and version: the
/// values are cast to text, each followed by the byte 0x1F (NULL has its own
/// marker), and hashed with XXH3-64. A text value that itself holds 0x1F can
/// give the key of another split of the same bytes (`'a\x1f', 'b'` and
/// `'a', '\x1fb'`); ids do not hold control characters, and the encoding
/// stays as it is because changing it would change every stored key.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SurrogateKey {
    signature: Signature,
}

impl SurrogateKey {
    pub fn new() -> Self {
        Self { signature: Signature::variadic_any(Volatility::Immutable) }
    }
}

impl Default for SurrogateKey {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalarUDFImpl for SurrogateKey {
    fn name(&self) -> &str {
        "surrogate_key"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> DfResult<DataType> {
        if args.is_empty() {
            return Err(DataFusionError::Plan("surrogate_key() needs at least one column".into()));
        }
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let rows = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let texts: Vec<ArrayRef> =
            arrays.iter().map(|a| cast(a, &DataType::Utf8)).collect::<Result<_, _>>()?;
        let texts: Vec<&datafusion::arrow::array::StringArray> = texts
            .iter()
            .map(|a| {
                a.as_any().downcast_ref().ok_or_else(|| DataFusionError::Internal("cast to Utf8".into()))
            })
            .collect::<DfResult<_>>()?;
        let mut out = Int64Builder::with_capacity(rows);
        for row in 0..rows {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            for col in &texts {
                if col.is_null(row) {
                    h.write(&[0xff, 0x00]);
                } else {
                    h.write(col.value(row).as_bytes());
                    h.write(&[0x1f]);
                }
            }
            out.append_value((h.finish() & 0x7fff_ffff_ffff_ffff) as i64);
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// `now()` read at every evaluation. DataFusion's own `now()` is fixed when a
/// query is planned, which is right for one batch query; a stream plans its
/// queries once and runs them for hours, so there the time must be read per batch.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct LiveNow {
    signature: Signature,
}

impl LiveNow {
    pub fn new() -> Self {
        Self { signature: Signature::nullary(Volatility::Volatile) }
    }
}

impl Default for LiveNow {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalarUDFImpl for LiveNow {
    fn name(&self) -> &str {
        "now"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Nanosecond, Some("+00:00".into())))
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or_default();
        Ok(ColumnarValue::Scalar(datafusion::common::ScalarValue::TimestampNanosecond(
            Some(nanos),
            Some("+00:00".into()),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn surrogate_keys_are_stable_and_positive() {
        let p = Planner::new();
        let df = p
            .ctx
            .sql("SELECT surrogate_key(42) AS a, surrogate_key(42) AS b, surrogate_key('42', NULL) AS c")
            .await
            .unwrap();
        let batches = df.collect().await.unwrap();
        let col = |i: usize| {
            batches[0]
                .column(i)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Int64Array>()
                .unwrap()
                .value(0)
        };
        assert_eq!(col(0), col(1));
        assert_ne!(col(0), col(2));
        assert!(col(0) >= 0 && col(2) >= 0);
    }
}
