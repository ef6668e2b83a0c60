//! Building the DAG: one graph node per source, transform, check and sink;
//! edges from each input to its reader; cycles named in full.

use std::collections::{HashMap, HashSet};

use indexmap::IndexMap;
use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;

use super::{PlanNode, Problems, Role};
use crate::spec::model::{Check, Transform};
use crate::spec::sql;
use crate::spec::suggest;

pub(crate) struct Built {
    pub graph: DiGraph<PlanNode, ()>,
    pub nodes: HashMap<String, NodeIndex>,
    pub outputs: HashMap<String, NodeIndex>,
    /// The inputs of each transform and sink that exist.
    pub inputs: IndexMap<String, Vec<String>>,
    /// Node ids in an order where inputs come first; empty if there is a cycle.
    pub order: Vec<String>,
    /// Transforms and sinks with an input that could not be resolved.
    pub broken: HashSet<String>,
}

pub(crate) fn build(p: &mut Problems) -> Built {
    let pipeline = &p.spec.pipeline;
    let mut b = Built {
        graph: DiGraph::new(),
        nodes: HashMap::new(),
        outputs: HashMap::new(),
        inputs: IndexMap::new(),
        order: vec![],
        broken: HashSet::new(),
    };
    for (id, s) in &pipeline.sources {
        b.add(id, Role::Source, s.kind, detail(s.kind, s.settings.detail()), s.checks());
    }
    for (id, t) in &pipeline.transforms {
        let (kind, detail) = match t {
            Transform::Sql(_) => ("sql", "sql".to_string()),
            Transform::Rules(r) => ("rules", format!("rules · {}", r.rules.value())),
        };
        b.add(id, Role::Transform, kind, detail, t.checks());
    }
    for (id, s) in &pipeline.sinks {
        b.add(id, Role::Sink, s.kind, detail(s.kind, s.settings.detail()), &[]);
    }
    for (id, t) in &pipeline.transforms {
        let (inputs, complete) = transform_inputs(p, id, t);
        if !complete {
            b.broken.insert(id.clone());
        }
        b.inputs.insert(id.clone(), inputs);
    }
    for (id, s) in &pipeline.sinks {
        let inputs = resolve_input(p, &format!("sink '{id}'"), s.input());
        if inputs.is_none() {
            b.broken.insert(id.clone());
        }
        b.inputs.insert(id.clone(), inputs.into_iter().collect());
    }
    for (id, inputs) in &b.inputs {
        for input in inputs {
            b.graph.add_edge(b.outputs[input], b.nodes[id], ());
        }
    }
    relationship_edges(p, &mut b);
    report_cycles(p, &b);
    report_unused(p, &b);
    if let Ok(sorted) = toposort(&b.graph, None) {
        b.order = sorted
            .into_iter()
            .filter(|i| b.graph[*i].role != Role::Check)
            .map(|i| b.graph[i].id.clone())
            .collect();
    }
    b
}

impl Built {
    fn add(&mut self, id: &str, role: Role, kind: &str, detail: String, checks: &[Check]) {
        let node = PlanNode { id: id.to_string(), role, kind: kind.to_string(), check: None, detail };
        let idx = self.graph.add_node(node);
        self.nodes.insert(id.to_string(), idx);
        let mut last = idx;
        for (i, c) in checks.iter().enumerate() {
            let check = PlanNode {
                id: id.to_string(),
                role: Role::Check,
                kind: c.kind().to_string(),
                check: Some(i),
                detail: c.label(),
            };
            let ci = self.graph.add_node(check);
            self.graph.add_edge(last, ci, ());
            last = ci;
        }
        self.outputs.insert(id.to_string(), last);
    }
}

/// A graph label: `postgres · oltp.customers`, or the kind alone.
fn detail(kind: &str, detail: String) -> String {
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind} · {detail}")
    }
}

/// The inputs of a transform (the tables its SQL names, or its `input:`)
/// that exist, and whether that is all of them.
fn transform_inputs(p: &mut Problems, id: &str, t: &Transform) -> (Vec<String>, bool) {
    let what = format!("transform '{id}'");
    match t {
        Transform::Rules(r) => {
            let input = resolve_input(p, &what, &r.input);
            let complete = input.is_some();
            (input.into_iter().collect(), complete)
        }
        Transform::Sql(s) => {
            let tables = match sql::table_refs(s.sql.value()) {
                Ok(t) => t,
                Err(e) => {
                    p.error(s.sql.pos(), format!("{what}: SQL does not parse: {e}"));
                    return (vec![], false);
                }
            };
            let mut inputs = Vec::new();
            for table in &tables {
                let name = crate::spec::yaml::Sp::new(s.sql.pos(), table.clone());
                inputs.extend(resolve_input(p, &what, &name));
            }
            if let Some(declared) = &s.inputs {
                check_declared_inputs(p, &what, &tables, declared);
            }
            let complete = inputs.len() == tables.len();
            (inputs, complete)
        }
    }
}

fn check_declared_inputs(
    p: &mut Problems,
    what: &str,
    tables: &[String],
    declared: &[crate::spec::yaml::Sp<String>],
) {
    let declared_names: HashSet<&str> = declared.iter().map(|d| d.value().as_str()).collect();
    for d in declared {
        if !tables.contains(d.value()) {
            p.error(d.pos(), format!("{what}: 'inputs' lists '{}' but the SQL does not read it", d.value()));
        }
    }
    for t in tables {
        if !declared_names.contains(t.as_str()) {
            let pos = declared.first().map(|d| d.pos()).unwrap_or_default();
            p.error(pos, format!("{what}: the SQL reads '{t}' but 'inputs' does not list it"));
        }
    }
}

/// Checks that `name` is a node whose output can be read.
fn resolve_input(p: &mut Problems, what: &str, name: &crate::spec::yaml::Sp<String>) -> Option<String> {
    let pipeline = &p.spec.pipeline;
    let n = name.value().as_str();
    if pipeline.sources.contains_key(n) || pipeline.transforms.contains_key(n) {
        return Some(n.to_string());
    }
    if p.spec.broken.contains(n) {
        return None; // its own definition is broken, and reported
    }
    if pipeline.sinks.contains_key(n) {
        p.error(name.pos(), format!("{what}: input '{n}' is a sink; sinks have no output to read"));
        return None;
    }
    let ids = pipeline.sources.keys().chain(pipeline.transforms.keys()).chain(p.spec.broken.iter());
    let hint = suggest::hint(n, ids.map(String::as_str));
    p.error(name.pos(), format!("{what}: unknown input '{n}'{hint}"));
    None
}

/// A relationships check reads the node it points at, so that node is
/// computed first: an edge from it to the check.
fn relationship_edges(p: &Problems, b: &mut Built) {
    let pl = &p.spec.pipeline;
    let checked = pl
        .sources
        .iter()
        .map(|(id, s)| (id, s.checks()))
        .chain(pl.transforms.iter().map(|(id, t)| (id, t.checks())));
    let mut edges = Vec::new();
    for (id, checks) in checked {
        for (i, c) in checks.iter().enumerate() {
            let Check::Relationships(r) = c else { continue };
            let Some((target, _)) = r.to.value().split_once('.') else { continue };
            let check =
                b.graph.node_indices().find(|n| b.graph[*n].id == *id && b.graph[*n].check == Some(i));
            if let (Some(check), Some(&from)) = (check, b.outputs.get(target)) {
                edges.push((from, check));
            }
        }
    }
    for (from, to) in edges {
        b.graph.add_edge(from, to, ());
    }
}

/// Every cycle, as `a -> b -> a`, at the first node's declaration.
fn report_cycles(p: &mut Problems, b: &Built) {
    for scc in tarjan_scc(&b.graph) {
        let looped = scc.len() > 1 || b.graph.contains_edge(scc[0], scc[0]);
        if !looped {
            continue;
        }
        let members: HashSet<NodeIndex> = scc.iter().copied().collect();
        let start = *scc.iter().min_by_key(|i| p.id_pos(&b.graph[**i].id)).unwrap_or(&scc[0]);
        let path = cycle_path(b, start, &members);
        let mut names: Vec<&str> = Vec::new();
        for i in path.iter().chain(std::iter::once(&start)) {
            let id = b.graph[*i].id.as_str();
            if names.last() != Some(&id) {
                names.push(id);
            }
        }
        let first = names[0];
        p.error(p.id_pos(first), format!("cycle: {}", names.join(" -> ")));
    }
}

/// A path from `start` back to it inside one strongly connected component.
fn cycle_path(b: &Built, start: NodeIndex, members: &HashSet<NodeIndex>) -> Vec<NodeIndex> {
    let mut path = vec![start];
    let mut seen = HashSet::from([start]);
    fn dfs(
        b: &Built,
        at: NodeIndex,
        start: NodeIndex,
        members: &HashSet<NodeIndex>,
        path: &mut Vec<NodeIndex>,
        seen: &mut HashSet<NodeIndex>,
    ) -> bool {
        let mut next: Vec<NodeIndex> =
            b.graph.edges(at).map(|e| e.target()).filter(|t| members.contains(t)).collect();
        next.sort();
        for n in next {
            if n == start {
                return true;
            }
            if seen.insert(n) {
                path.push(n);
                if dfs(b, n, start, members, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    dfs(b, start, start, members, &mut path, &mut seen);
    path
}

/// A source nothing reads is a warning: it would be read for nothing.
fn report_unused(p: &mut Problems, b: &Built) {
    let read: HashSet<&String> = b.inputs.values().flatten().collect();
    let mut unused: Vec<&String> = p.spec.pipeline.sources.keys().filter(|id| !read.contains(id)).collect();
    unused.sort_by_key(|id| p.id_pos(id));
    for id in unused {
        p.warning(p.id_pos(id), format!("source '{id}' is not read by any transform or sink"));
    }
}
