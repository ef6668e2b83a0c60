//! The plan: a validated DAG (petgraph) of source, transform, check and sink
//! nodes, the only thing executors accept.
//!
//! [`compile`] runs every check over a [`Spec`] and returns all problems at
//! once. Edges of SQL transforms come from the tables their SQL names; checks
//! sit between a node and everything downstream of it; schemas are carried
//! along wherever they are known offline (declared source schemas, SQL planned
//! over them), so columns named by checks and rules are checked too.

mod graph;
pub mod render;
pub mod schema;
pub(crate) mod validate;

use std::collections::HashMap;

use datafusion::arrow::datatypes::SchemaRef;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::error::{Diagnostic, Diagnostics, Pos, Result};
use crate::spec::rules::LoadedRule;
use crate::spec::Spec;

/// What compiling needs from the layers above the plan, which know what SQL
/// and rules mean: queries planned by DataFusion with the engine's functions,
/// and rule sets compiled against the schema of their events. The plan only
/// asks; `rules::analyze::Analyzer` answers for the engine.
#[async_trait::async_trait]
pub trait Analyzer: Sync {
    /// The output schema of `sql` over empty tables with the given schemas.
    async fn sql_schema(
        &self,
        inputs: &[(String, SchemaRef)],
        sql: &str,
    ) -> std::result::Result<SchemaRef, String>;
    /// The problems of a rule set over events of `input` whose id column is `key`.
    async fn check_rules(&self, rules: &[LoadedRule], input: SchemaRef, key: &str) -> Diagnostics;
    /// The output of a rules transform over `input`.
    fn alert_schema(&self, input: &SchemaRef) -> SchemaRef;
}

/// What a node of the DAG is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Transform,
    Check,
    Sink,
}

/// A node of the DAG.
#[derive(Debug, Clone)]
pub struct PlanNode {
    /// The node id; for checks, the id of the node they check.
    pub id: String,
    pub role: Role,
    /// `postgres`, `sql`, `rules`, `unique`, ...
    pub kind: String,
    /// For checks: the index in the node's `checks:`.
    pub check: Option<usize>,
    /// A one-line description for graphs: `postgres · oltp.customers`.
    pub detail: String,
}

impl PlanNode {
    /// A name unique in the graph, usable as a Mermaid or DOT id.
    pub fn key(&self) -> String {
        match self.check {
            Some(i) => format!("{}__check_{}", self.id, i + 1),
            None => self.id.clone(),
        }
    }
}

/// A compiled pipeline.
#[derive(Debug)]
pub struct Plan {
    pub spec: Spec,
    pub graph: DiGraph<PlanNode, ()>,
    /// The graph node holding a node id's own work (source, transform or sink).
    pub nodes: HashMap<String, NodeIndex>,
    /// Where downstream nodes read a node id's output: its last check, or itself.
    pub outputs: HashMap<String, NodeIndex>,
    /// Output schemas known without connecting, by node id.
    pub schemas: HashMap<String, SchemaRef>,
    /// The rule set of each rules transform.
    pub rules: HashMap<String, Vec<LoadedRule>>,
    /// Warnings (errors stop compilation).
    pub warnings: Diagnostics,
}

impl Plan {
    /// Node ids, inputs first (a node's checks do not repeat its id).
    pub fn order(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        let mut order = Vec::new();
        for i in petgraph::algo::toposort(&self.graph, None).unwrap_or_default() {
            let id = &self.graph[i].id;
            if seen.insert(id.clone()) {
                order.push(id.clone());
            }
        }
        order
    }
}

/// Collects problems during compilation.
pub(crate) struct Problems<'a> {
    pub spec: &'a Spec,
    pub diags: Diagnostics,
}

impl<'a> Problems<'a> {
    pub fn error(&mut self, pos: Pos, msg: impl Into<String>) {
        let msg = self.spec.secrets.scrub(&msg.into());
        self.diags.push(Diagnostic::error(&self.spec.file, pos, msg));
    }

    pub fn warning(&mut self, pos: Pos, msg: impl Into<String>) {
        let msg = self.spec.secrets.scrub(&msg.into());
        self.diags.push(Diagnostic::warning(&self.spec.file, pos, msg));
    }

    /// Moves what a connector's checks found into the problems.
    pub fn report(&mut self, cx: crate::spec::connector::Context) {
        for (pos, msg) in cx.errors {
            self.error(pos, msg);
        }
    }

    /// Where node `id` was declared.
    pub fn id_pos(&self, id: &str) -> Pos {
        self.spec.id_pos.get(id).copied().unwrap_or(Pos::new(1, 1))
    }
}

/// Builds and checks the DAG of a spec; every problem is reported at once.
/// `analyzer` plans the SQL and rules it holds (see [`Analyzer`]).
pub async fn compile(spec: Spec, analyzer: &dyn Analyzer) -> Result<Plan> {
    let mut p = Problems { spec: &spec, diags: spec.diags.clone() };
    validate::nodes(&mut p);
    let built = graph::build(&mut p);
    let rules = validate::rules(&mut p, &built).await;
    let schemas = validate::schemas(&mut p, analyzer, &built, &rules).await;
    validate::tests(&mut p);
    let diags = std::mem::take(&mut p.diags);
    let warnings = diags.into_result()?;
    let graph::Built { graph, nodes, outputs, .. } = built;
    Ok(Plan { spec, graph, nodes, outputs, schemas, rules, warnings })
}
