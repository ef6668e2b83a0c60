//! The DAG as text: Mermaid (for Markdown and GitHub) or Graphviz DOT.

use petgraph::visit::EdgeRef;

use super::{Plan, PlanNode, Role};

/// Output formats of `engine graph`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    Mermaid,
    Dot,
}

pub fn render(plan: &Plan, format: GraphFormat) -> String {
    let text = match format {
        GraphFormat::Mermaid => mermaid(plan),
        GraphFormat::Dot => dot(plan),
    };
    plan.spec.secrets.scrub(&text)
}

fn title(n: &PlanNode) -> String {
    match n.role {
        Role::Check => format!("check: {}", n.detail),
        _ => format!("{}\n{}", n.id, n.detail),
    }
}

fn mermaid(plan: &Plan) -> String {
    let mut out = String::from("flowchart LR\n");
    if let Some(d) = &plan.spec.pipeline.description {
        out.push_str(&format!("  %% {}: {}\n", plan.spec.pipeline.name, d.trim().replace('\n', " ")));
    }
    for i in plan.graph.node_indices() {
        let n = &plan.graph[i];
        let label = title(n).replace('"', "#quot;").replace('\n', "<br/>");
        let shape = match n.role {
            Role::Source => format!("[(\"{label}\")]"),
            Role::Transform => format!("[\"{label}\"]"),
            Role::Check => format!("{{{{\"{label}\"}}}}"),
            Role::Sink => format!("[/\"{label}\"/]"),
        };
        out.push_str(&format!("  {}{shape}\n", n.key()));
    }
    for e in plan.graph.edge_references() {
        out.push_str(&format!("  {} --> {}\n", plan.graph[e.source()].key(), plan.graph[e.target()].key()));
    }
    out.push_str("  classDef source fill:#dbeafe,stroke:#1d4ed8\n");
    out.push_str("  classDef transform fill:#ede9fe,stroke:#6d28d9\n");
    out.push_str("  classDef check fill:#fef3c7,stroke:#b45309\n");
    out.push_str("  classDef sink fill:#dcfce7,stroke:#15803d\n");
    for (role, class) in [
        (Role::Source, "source"),
        (Role::Transform, "transform"),
        (Role::Check, "check"),
        (Role::Sink, "sink"),
    ] {
        let keys: Vec<String> =
            plan.graph.node_weights().filter(|n| n.role == role).map(PlanNode::key).collect();
        if !keys.is_empty() {
            out.push_str(&format!("  class {} {class}\n", keys.join(",")));
        }
    }
    out
}

fn dot(plan: &Plan) -> String {
    let mut out = format!(
        "digraph \"{}\" {{\n  rankdir=LR;\n  node [fontname=\"Helvetica\", style=filled];\n",
        plan.spec.pipeline.name
    );
    for i in plan.graph.node_indices() {
        let n = &plan.graph[i];
        let (shape, color) = match n.role {
            Role::Source => ("cylinder", "#dbeafe"),
            Role::Transform => ("box", "#ede9fe"),
            Role::Check => ("hexagon", "#fef3c7"),
            Role::Sink => ("parallelogram", "#dcfce7"),
        };
        let label = title(n).replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        out.push_str(&format!(
            "  \"{}\" [shape={shape}, fillcolor=\"{color}\", label=\"{label}\"];\n",
            n.key()
        ));
    }
    for e in plan.graph.edge_references() {
        out.push_str(&format!(
            "  \"{}\" -> \"{}\";\n",
            plan.graph[e.source()].key(),
            plan.graph[e.target()].key()
        ));
    }
    out.push_str("}\n");
    out
}
