//! Queries over micro-batches (SQL transforms in a stream, generated rows):
//! each query is planned once, over tables whose scan reads "the current
//! micro-batch" from a slot, and the same physical plan then runs for every
//! batch.

use std::sync::{Arc, Mutex};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{collect, ExecutionPlan};
use datafusion::prelude::SessionContext;

use super::lookup::{rewrite, Lookup, LookupTable};
use crate::error::Result;
use crate::spec::sql::df_error;

/// The batches an input table holds while one micro-batch runs.
#[derive(Debug, Default, Clone)]
pub struct Slot(Arc<Mutex<Vec<RecordBatch>>>);

impl Slot {
    pub fn set(&self, batches: Vec<RecordBatch>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = batches;
    }
}

#[derive(Debug)]
struct SlotPartition {
    schema: SchemaRef,
    slot: Slot,
}

impl PartitionStream for SlotPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batches = self.slot.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match MemoryStream::try_new(batches, self.schema.clone(), None) {
            Ok(s) => Box::pin(s),
            Err(e) => Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                self.schema.clone(),
                futures::stream::once(async move { Err(e) }),
            )),
        }
    }
}

/// A SQL transform planned once.
pub struct SqlOp {
    pub id: String,
    plan: Arc<dyn ExecutionPlan>,
    /// (input node id, its slot)
    pub inputs: Vec<(String, Slot)>,
    task: Arc<TaskContext>,
}

impl SqlOp {
    /// Plans `sql` over `inputs` (node id and schema).
    pub async fn plan(
        ctx: &SessionContext,
        id: &str,
        sql: &str,
        inputs: &[(String, SchemaRef)],
    ) -> Result<Self> {
        Self::plan_with(ctx, id, sql, inputs, &[]).await
    }

    /// Plans `sql` over `inputs` fed a micro-batch at a time and over
    /// lookup tables, whose joins hash the lookup once per version.
    pub async fn plan_with(
        ctx: &SessionContext,
        id: &str,
        sql: &str,
        inputs: &[(String, SchemaRef)],
        lookups: &[Arc<Lookup>],
    ) -> Result<Self> {
        let what = format!("transform '{id}'");
        for lookup in lookups {
            let _ = ctx.deregister_table(lookup.name.as_str());
            ctx.register_table(lookup.name.as_str(), Arc::new(LookupTable(lookup.clone())))
                .map_err(|e| df_error(&what, e))?;
        }
        let mut slots = Vec::new();
        for (name, schema) in inputs {
            let slot = Slot::default();
            let part = Arc::new(SlotPartition { schema: schema.clone(), slot: slot.clone() });
            let table =
                StreamingTable::try_new(schema.clone(), vec![part]).map_err(|e| df_error(&what, e))?;
            let _ = ctx.deregister_table(name.as_str());
            ctx.register_table(name.as_str(), Arc::new(table)).map_err(|e| df_error(&what, e))?;
            slots.push((name.clone(), slot));
        }
        let df = ctx.sql(sql).await.map_err(|e| df_error(&what, e))?;
        let plan = df.create_physical_plan().await.map_err(|e| df_error(&what, e))?;
        let plan = if lookups.is_empty() { plan } else { rewrite(plan).map_err(|e| df_error(&what, e))? };
        Ok(Self { id: id.to_string(), plan, inputs: slots, task: ctx.task_ctx() })
    }

    pub fn schema(&self) -> SchemaRef {
        self.plan.schema()
    }

    /// The physical plan, as planned once.
    pub fn physical(&self) -> Arc<dyn ExecutionPlan> {
        self.plan.clone()
    }

    /// Runs the plan over what the slots hold now.
    pub async fn run(&self) -> Result<Vec<RecordBatch>> {
        let what = format!("transform '{}'", self.id);
        let plan = reset_plan_states(self.plan.clone()).map_err(|e| df_error(&what, e))?;
        collect(plan, self.task.clone()).await.map_err(|e| df_error(&what, e))
    }
}
