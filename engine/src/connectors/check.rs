//! `engine validate --connect`: every connection reachable, then every
//! source and sink its connector can probe (a postgres source readable, a
//! postgres sink's table present, or `create: true`, and able to take the
//! input where the input's schema is known offline).

use super::{registry, Node};
use crate::plan::Plan;

/// What was found: problems, one line each (none when all is well), and
/// a note per reachable connection (whether it uses TLS).
#[derive(Debug, Default)]
pub struct Found {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

pub async fn check(plan: &Plan) -> Found {
    let mut found = Found::default();
    let spec = &plan.spec;
    let pl = &spec.pipeline;
    for (name, c) in &pl.connections {
        if let Some(probe) = registry::probe_connection(c.kind, c.settings.as_ref()) {
            match probe.probe(Node { spec, id: name }, None).await {
                Ok(Some(note)) => found.notes.push(format!("connection '{name}': {note}")),
                Ok(None) => {}
                Err(e) => found.problems.push(spec.secrets.scrub(&e.to_string())),
            }
        }
    }
    if !found.problems.is_empty() {
        return found;
    }
    found.problems = probe_nodes(plan).await;
    found
}

/// Every source and sink its connector can probe.
async fn probe_nodes(plan: &Plan) -> Vec<String> {
    let mut problems = Vec::new();
    let spec = &plan.spec;
    let pl = &spec.pipeline;
    for (id, s) in &pl.sources {
        if let Some(probe) = registry::probe_source(s.kind, s.settings.as_ref()) {
            if let Err(e) = probe.probe(Node { spec, id }, None).await {
                problems.push(format!("source '{id}': {}", spec.secrets.scrub(&e.to_string())));
            }
        }
    }
    for (id, s) in &pl.sinks {
        if let Some(probe) = registry::probe_sink(s.kind, s.settings.as_ref()) {
            let input = plan.schemas.get(s.input().value()).cloned();
            if let Err(e) = probe.probe(Node { spec, id }, input).await {
                problems.push(spec.secrets.scrub(&e.to_string()));
            }
        }
    }
    problems
}
