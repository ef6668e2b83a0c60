//! `engine validate --connect`: every connection reachable, then every
//! source and sink its connector can probe (a postgres source readable, a
//! postgres sink's table present, or `create: true`, and able to take the
//! input where the input's schema is known offline).

use super::{registry, Node};
use crate::plan::Plan;

/// Problems found, one line each; empty when all is well.
pub async fn check(plan: &Plan) -> Vec<String> {
    let mut problems = Vec::new();
    let spec = &plan.spec;
    let pl = &spec.pipeline;
    for (name, c) in &pl.connections {
        if let Some(probe) = registry::probe_connection(c.kind, c.settings.as_ref()) {
            if let Err(e) = probe.probe(Node { spec, id: name }, None).await {
                problems.push(spec.secrets.scrub(&e.to_string()));
            }
        }
    }
    if !problems.is_empty() {
        return problems;
    }
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
