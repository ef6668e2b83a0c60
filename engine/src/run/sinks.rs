//! The sinks of a batch run, once every check passed. Sinks that share a
//! transaction (all postgres sinks of one connection) load together in it,
//! with the run's watermarks when the state is kept on that connection, in
//! the order they are declared; the others load one by one.

use std::time::Instant;

use datafusion::execution::SendableRecordBatchStream;

use super::report::NodeReport;
use super::Executor;
use crate::connectors::{self, registry, Node};
use crate::error::{Error, Result};
use crate::spec::sql::ident;

impl Executor<'_> {
    /// A stream of a node's current output.
    async fn output(&self, id: &str, node: &str) -> Result<SendableRecordBatchStream> {
        self.stream(&format!("sink '{id}'"), &format!("SELECT * FROM {}", ident(node))).await
    }

    /// Writes every selected sink. Sinks that share a transaction (all
    /// postgres sinks of one connection) load together in it, with the run's
    /// watermarks when the state is kept on that connection; the others load
    /// one by one.
    pub(super) async fn write_sinks(&mut self) -> Result<()> {
        let pipeline = &self.plan.spec.pipeline;
        // Declaration order: on one connection, sinks load in the order they
        // are written, so a table is loaded before the tables referencing it.
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
        if let Some(sc) = &state_conn {
            if !self.watermarks.is_empty() && !groups.contains_key(sc) {
                groups.insert(sc.clone(), vec![]);
            }
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
            let marks =
                if state_conn.as_deref() == Some(name.as_str()) { self.watermark_rows() } else { vec![] };
            let bar = self.progress(&format!("loading {} sinks into '{name}'", members.len()));
            let written = if self.opts.dry_run {
                vec![0; members.len()]
            } else {
                tx.load(&self.plan.spec, &name, loads, &marks).await?
            };
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let seconds = started.elapsed().as_secs_f64() / members.len().max(1) as f64;
            for (id, rows) in members.iter().zip(written) {
                self.sink_report(id, pipeline.sinks[*id].input().value(), rows, seconds);
            }
        }
        for (id, writer) in alone {
            let started = Instant::now();
            let input = pipeline.sinks[id].input().value();
            let stream = self.output(id, input).await?;
            let rows = if self.opts.dry_run {
                0
            } else {
                writer.write(Node { spec: &self.plan.spec, id }, stream).await?
            };
            self.sink_report(id, input, rows, started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn sink_report(&mut self, id: &str, input: &str, rows: u64, seconds: f64) {
        let rows_in = self.report.nodes.iter().find(|n| n.node == input).map(|n| n.rows_out);
        let mut node = NodeReport::new(id, "sink", rows_in, rows);
        node.seconds = seconds;
        self.report.nodes.push(node);
    }
}
