//! The generate source: rows computed from SQL expressions over the row
//! number `n`, with seeded random functions (see `transform::generate`):
//! `rows` of them in a batch run, `rate` per second in a stream.

pub mod config;

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::Int64Array;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::SessionContext;
use tokio::sync::{mpsc, watch};

use super::{Acker, Delivery, NoAck, Node, OpenStream, StreamArgs, StreamSource, Token};
use crate::error::{Error, Result};
use crate::spec::sql::df_error;
use crate::transform::generate::{select, sql};
use crate::transform::prepared::SqlOp;
use config::GenerateSource;

pub async fn open(ctx: &SessionContext, g: &GenerateSource) -> Result<SendableRecordBatchStream> {
    let query = sql(&g.columns, g.seed.unwrap_or(0), g.rows.unwrap_or(0)).map_err(Error::Usage)?;
    let df = ctx.sql(&query).await.map_err(|e| df_error("generate", e))?;
    df.execute_stream().await.map_err(|e| df_error("generate", e))
}

#[async_trait::async_trait]
impl super::BatchSource for GenerateSource {
    async fn open(
        &self,
        _node: Node<'_>,
        ctx: &SessionContext,
        _watermark: Option<&str>,
    ) -> Result<SendableRecordBatchStream> {
        open(ctx, self).await
    }
}

impl OpenStream for GenerateSource {
    fn open_stream(&self, _node: Node<'_>, args: StreamArgs) -> Result<Box<dyn StreamSource>> {
        args.connected.store(true, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(4);
        let max_rows = args.batch.as_ref().and_then(|b| b.max_rows).unwrap_or(1000).max(1);
        let task = tokio::spawn(generate(self.clone(), args.schema, tx, args.shutdown, args.limit, max_rows));
        Ok(Box::new(Generated { rx, task: Some(task) }))
    }
}

/// Generated rows at a rate, made by a task of their own.
struct Generated {
    rx: mpsc::Receiver<RecordBatch>,
    task: Option<tokio::task::JoinHandle<Result<()>>>,
}

#[async_trait::async_trait]
impl StreamSource for Generated {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        if let Some(batch) = self.rx.recv().await {
            return Ok(Some(Delivery { batch, token: Token::none(), first_at: Instant::now() }));
        }
        // Cancel-safe (the stream loop races it with a clock): the task is
        // let go only once it has finished.
        let Some(t) = self.task.as_mut() else { return Ok(None) };
        let outcome = t.await;
        self.task = None;
        outcome.map_err(|e| Error::Internal(format!("generate task: {e}")))?.map(|()| None)
    }

    fn acker(&self) -> Result<Box<dyn Acker>> {
        Ok(Box::new(NoAck))
    }
}

/// Rows `n = 0, 1, ...` made by the source's SELECT (planned once) over a
/// slot holding the next row numbers, at the source's rate; exactly `limit`
/// rows when given.
async fn generate(
    g: GenerateSource,
    schema: SchemaRef,
    out: mpsc::Sender<RecordBatch>,
    mut stop: watch::Receiver<bool>,
    limit: Option<u64>,
    max_rows: u64,
) -> Result<()> {
    let rate = g
        .rate
        .as_ref()
        .map(|r| r.per_second())
        .ok_or_else(|| Error::Usage("generate source needs a 'rate' in stream mode".into()))?;
    let n_schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let ctx = crate::transform::sql::session(crate::transform::sql::Purpose::Stream);
    let query = format!("{} FROM __rows", select(&g.columns, g.seed.unwrap_or(0)).map_err(Error::Usage)?);
    let op = SqlOp::plan(&ctx, "generate", &query, &[("__rows".to_string(), n_schema.clone())]).await?;
    let started = Instant::now();
    let mut made: u64 = 0;
    let tick = Duration::from_millis(10);
    loop {
        if *stop.borrow() || limit.is_some_and(|l| made >= l) {
            return Ok(());
        }
        let due = ((started.elapsed().as_secs_f64() * rate) as u64)
            .saturating_sub(made)
            .min(max_rows * 10)
            .min(limit.map_or(u64::MAX, |l| l - made));
        if due == 0 {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let n: Int64Array = (made as i64..(made + due) as i64).collect();
        let rows = RecordBatch::try_new(n_schema.clone(), vec![Arc::new(n)])
            .map_err(|e| Error::Internal(e.to_string()))?;
        op.inputs[0].1.set(vec![rows]);
        let batches = op.run().await?;
        let batch = concat_batches(&schema, &batches)
            .or_else(|_| concat_batches(&op.schema(), &batches))
            .map_err(|e| Error::Internal(e.to_string()))?;
        made += due;
        if out.send(batch).await.is_err() {
            return Ok(());
        }
    }
}
