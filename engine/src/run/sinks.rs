//! The sinks of a batch run, once every check passed, in an order that
//! cannot lose rows:
//!
//! 1. sinks that load alone (files, MongoDB, HTTP), each on its own;
//! 2. each connection with transactions: its sinks in one transaction, in
//!    the order they are declared, with the quarantined rows when the
//!    quarantine table is there;
//! 3. the state's connection last: its sinks, the watermarks and the run's
//!    history row in one transaction.
//!
//! So a watermark moves only once every sink its rows feed has committed; a
//! failure before that leaves the rows for the next run (an upsert takes
//! them again without doubling them).

use std::time::Instant;

use datafusion::execution::SendableRecordBatchStream;

use super::report::NodeReport;
use super::Executor;
use crate::connectors::{self, registry, Ledger, Node};
use crate::error::{Error, Result};
use crate::spec::sql::ident;

impl Executor<'_> {
    /// A stream of a node's current output.
    async fn output(&self, id: &str, node: &str) -> Result<SendableRecordBatchStream> {
        self.stream(&format!("sink '{id}'"), &format!("SELECT * FROM {}", ident(node))).await
    }

    /// Writes every selected sink, in the order above.
    pub(super) async fn write_sinks(&mut self) -> Result<()> {
        let plan = self.plan;
        let pipeline = &plan.spec.pipeline;
        let mut groups: indexmap::IndexMap<String, Vec<&String>> = indexmap::IndexMap::new();
        let mut alone = Vec::new();
        for (id, sink) in pipeline.sinks.iter().filter(|(id, _)| self.selected.contains(*id)) {
            let Some(writer) = registry::batch_sink(sink.kind, sink.settings.as_ref()) else {
                return Err(Error::Usage(format!(
                    "sink '{id}': {} sinks run with `engine stream`",
                    sink.kind
                )));
            };
            match writer.transaction() {
                Some(conn) => groups.entry(conn.value().clone()).or_default().push(id),
                None => alone.push((id, writer)),
            }
        }
        let state_conn = pipeline.state.as_ref().map(|s| s.connection.value().clone());
        let quarantine_conn = pipeline.quarantine.as_ref().map(|q| q.connection.value().clone());
        if let Some(q) = &quarantine_conn {
            if !self.rejects.is_empty() {
                groups.entry(q.clone()).or_default();
            }
        }
        if let Some(sc) = &state_conn {
            let members = groups.shift_remove(sc).unwrap_or_default();
            if !members.is_empty() || !self.watermarks.is_empty() || self.history {
                groups.insert(sc.clone(), members);
            }
        }

        for (id, writer) in alone {
            let started = Instant::now();
            let input = pipeline.sinks[id].input().value();
            let stream = self.output(id, input).await?;
            let rows = if self.opts.dry_run {
                0
            } else {
                writer.write(Node { spec: &plan.spec, id }, stream).await?
            };
            self.sink_report(id, input, rows, started.elapsed().as_secs_f64());
        }

        for (name, members) in groups {
            let started = Instant::now();
            let Some(conn) = pipeline.connections.get(&name) else {
                return Err(Error::Internal(format!("connection '{name}' is missing")));
            };
            let Some(tx) = registry::transaction(conn.kind, conn.settings.as_ref()) else {
                return Err(Error::Internal(format!("connection '{name}' has no transactions")));
            };
            let mut loads = Vec::new();
            for id in &members {
                let input = pipeline.sinks[*id].input().value();
                loads.push(connectors::Load { id: id.to_string(), input: self.output(id, input).await? });
            }
            let mut ledger = Ledger::default();
            if quarantine_conn.as_deref() == Some(name.as_str()) {
                ledger.rejects = std::mem::take(&mut self.rejects);
            }
            let is_state = state_conn.as_deref() == Some(name.as_str());
            if is_state {
                ledger.watermarks = self.watermark_rows();
                // This transaction loads every row of its sinks' inputs.
                let loaded: Vec<(String, u64)> = members
                    .iter()
                    .map(|id| {
                        (id.to_string(), self.rows_out(pipeline.sinks[*id].input().value()).unwrap_or(0))
                    })
                    .collect();
                ledger.run = self.success_record(&loaded)?;
            }
            let bar = self.progress(&format!("loading {} sinks into '{name}'", members.len()));
            let written = if self.opts.dry_run {
                vec![0; members.len()]
            } else {
                tx.load(&plan.spec, &name, loads, &ledger).await?
            };
            if ledger.run.is_some() {
                // The run's success committed with the loads.
                self.history = false;
            }
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let seconds = started.elapsed().as_secs_f64() / members.len().max(1) as f64;
            for (id, rows) in members.iter().zip(written) {
                self.sink_report(id, pipeline.sinks[*id].input().value(), rows, seconds);
            }
        }
        Ok(())
    }

    fn sink_report(&mut self, id: &str, input: &str, rows: u64, seconds: f64) {
        let rows_in = self.rows_out(input);
        let mut node = NodeReport::new(id, "sink", rows_in, rows);
        node.seconds = seconds;
        self.report.nodes.push(node);
    }
}
