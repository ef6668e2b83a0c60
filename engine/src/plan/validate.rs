//! The checks `compile` runs beyond the graph's shape: each node's settings,
//! rule sets, schemas and the columns checks and rules name, and spec tests.

use std::collections::HashMap;

use datafusion::arrow::datatypes::{DataType, SchemaRef};

use super::graph::Built;
use super::Analyzer;
use super::{schema, Problems};
use crate::error::Pos;
use crate::spec::connector::Context;
use crate::spec::model::*;
use crate::spec::rules::{self, column_hint, LoadedRule};
use crate::spec::yaml::Sp;
use crate::spec::{sql, suggest};

// ------------------------------------------------------------------ settings

/// Settings of each node that only make sense together.
pub(crate) fn nodes(p: &mut Problems) {
    let pl = &p.spec.pipeline;
    for (name, c) in &pl.connections {
        let at = p.spec.connection_pos.get(name).copied().unwrap_or(Pos::new(1, 1));
        let mut cx = Context::new(p.spec, format!("connection '{name}'"), at);
        c.settings.check(&mut cx);
        p.report(cx);
    }
    for (id, s) in &pl.sources {
        let mut cx = Context::new(p.spec, format!("source '{id}'"), p.id_pos(id));
        s.settings.check(&mut cx);
        p.report(cx);
        for (i, c) in s.checks().iter().enumerate() {
            check(p, id, i, c);
        }
    }
    for (id, t) in &pl.transforms {
        for (i, c) in t.checks().iter().enumerate() {
            check(p, id, i, c);
        }
    }
    for (id, s) in &pl.sinks {
        let mut cx = Context::new(p.spec, format!("sink '{id}'"), p.id_pos(id));
        s.settings.check(&mut cx);
        p.report(cx);
    }
    match pl.mode {
        Mode::Stream => stream_shape(p),
        Mode::Batch => batch_shape(p),
    }
    if let Some(q) = &pl.quarantine {
        connection_of(p, "quarantine", &q.connection, "postgres");
    }
    if let Some(s) = &pl.state {
        connection_of(p, "state", &s.connection, "postgres");
    }
}

/// Checks that `name` is a connection of type `want`.
fn connection_of(p: &mut Problems, what: &str, name: &Sp<String>, want: &str) {
    let mut cx = Context::new(p.spec, what.to_string(), name.pos());
    cx.connection_of(what, name, want);
    p.report(cx);
}

/// `a, b or c`.
fn or_list(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Whether `s` is a lookup table of a stream pipeline: a source with
/// `refresh`, or of a kind that does not stream. The stream reads its one
/// other source, the events; lookups are read whole, at start and on refresh.
pub(crate) fn is_lookup(spec: &crate::spec::Spec, s: &Source) -> bool {
    spec.pipeline.mode == Mode::Stream
        && (s.refresh.is_some() || !spec.catalog.source(s.kind).is_some_and(|k| k.modes.stream))
}

/// What a stream pipeline can hold: one event source of a kind that
/// streams, lookup tables of kinds read in batch, no checks, sinks that take
/// micro-batches.
fn stream_shape(p: &mut Problems) {
    let pl = &p.spec.pipeline;
    let catalog = p.spec.catalog;
    let streaming_sources: Vec<&str> =
        catalog.sources.iter().filter(|k| k.modes.stream).map(|k| k.name).collect();
    let lookup_sources: Vec<&str> =
        catalog.sources.iter().filter(|k| k.modes.batch).map(|k| k.name).collect();
    let streaming_sinks: Vec<&str> =
        catalog.sinks.iter().filter(|k| k.modes.stream).map(|k| k.name).collect();
    let mut problems = Vec::new();
    let events: Vec<&String> =
        pl.sources.iter().filter(|(_, s)| !is_lookup(p.spec, s)).map(|(id, _)| id).collect();
    match events.as_slice() {
        [_] => {}
        [] => {
            if let Some(first) = pl.sources.keys().next() {
                problems.push((
                    first.clone(),
                    format!(
                        "source '{first}': a stream pipeline reads one event source ({}); its other sources are lookup tables",
                        or_list(&streaming_sources)
                    ),
                ));
            }
        }
        [_, second, ..] => problems.push((
            (*second).clone(),
            format!(
                "source '{second}': a stream pipeline reads exactly one event source; give the others 'refresh' to make them lookup tables"
            ),
        )),
    }
    for (id, s) in &pl.sources {
        if is_lookup(p.spec, s) {
            if !catalog.source(s.kind).is_some_and(|k| k.modes.batch) {
                problems.push((
                    id.clone(),
                    format!(
                        "source '{id}': a lookup table ('refresh') is read whole, from {} sources, not {}",
                        or_list(&lookup_sources),
                        s.kind
                    ),
                ));
            }
            if s.settings.incremental().is_some() {
                problems.push((
                    id.clone(),
                    format!(
                        "source '{id}': a lookup table is read whole on each refresh; remove 'incremental'"
                    ),
                ));
            }
        }
        if !s.checks().is_empty() {
            problems.push((id.clone(), format!("source '{id}': checks run in batch pipelines; in a stream, filter with a sql transform or rules")));
        }
    }
    for (id, t) in &pl.transforms {
        if !t.checks().is_empty() {
            problems.push((id.clone(), format!("transform '{id}': checks run in batch pipelines; in a stream, filter with a sql transform or rules")));
        }
        if matches!(t, Transform::Rules(r) if r.shadow == Some(true)) {
            problems.push((id.clone(), format!("transform '{id}': 'shadow: true' applies to batch runs (backtests); a stream counts its shadow rules in engine_rule_hits_total")));
        }
    }
    for (id, s) in &pl.sinks {
        if !catalog.sink(s.kind).is_some_and(|k| k.modes.stream) {
            problems.push((
                id.clone(),
                format!(
                    "sink '{id}': {} sinks are for batch runs; a stream writes to {}",
                    s.kind,
                    or_list(&streaming_sinks)
                ),
            ));
        }
    }
    for (id, msg) in problems {
        let at = p.id_pos(&id);
        p.error(at, msg);
    }
}

/// Sources and sinks of a batch pipeline are kinds that run in batch.
fn batch_shape(p: &mut Problems) {
    let pl = &p.spec.pipeline;
    let catalog = p.spec.catalog;
    let mut problems = Vec::new();
    for (id, s) in &pl.sources {
        if !catalog.source(s.kind).is_some_and(|k| k.modes.batch) {
            problems.push((
                id.clone(),
                format!("source '{id}': {} sources run in stream mode; set 'mode: stream'", s.kind),
            ));
        }
        if s.refresh.is_some() {
            problems.push((
                id.clone(),
                format!("source '{id}': 'refresh' applies to lookup tables of stream pipelines; a batch run reads every source once"),
            ));
        }
    }
    for (id, s) in &pl.sinks {
        if !catalog.sink(s.kind).is_some_and(|k| k.modes.batch) {
            problems.push((
                id.clone(),
                format!("sink '{id}': {} sinks run in stream mode; set 'mode: stream'", s.kind),
            ));
        }
    }
    for (id, msg) in problems {
        let at = p.id_pos(&id);
        p.error(at, msg);
    }
}

fn check(p: &mut Problems, id: &str, index: usize, c: &Check) {
    let at = p.spec.check_pos.get(&(id.to_string(), index)).copied().unwrap_or_else(|| p.id_pos(id));
    let what = format!("check '{}' on '{id}'", c.kind());
    let max_failures = c.options().max_failures;
    if c.options().on_fail == OnFail::Quarantine {
        if p.spec.pipeline.quarantine.is_none() {
            p.error(at, format!("{what}: 'on_fail: quarantine' needs a 'quarantine:' section"));
        }
        if matches!(c, Check::RowCount(_) | Check::Freshness(_) | Check::Volume(_)) {
            p.error(
                at,
                format!("{what}: a '{}' check is about the whole table and cannot quarantine rows", c.kind()),
            );
        }
    } else if max_failures.is_some() {
        p.error(at, format!("{what}: 'max_failures' applies only with 'on_fail: quarantine'"));
    }
    match c {
        Check::Range(x) if x.min.is_none() && x.max.is_none() => {
            p.error(at, format!("{what}: give 'min', 'max' or both"))
        }
        Check::Range(RangeCheck { min: Some(a), max: Some(b), .. }) if a > b => {
            p.error(at, format!("{what}: 'min' {a} is above 'max' {b}"))
        }
        Check::RowCount(x) if x.min.is_none() && x.max.is_none() => {
            p.error(at, format!("{what}: give 'min', 'max' or both"))
        }
        Check::RowCount(RowCountCheck { min: Some(a), max: Some(b), .. }) if a > b => {
            p.error(at, format!("{what}: 'min' {a} is above 'max' {b}"))
        }
        Check::Volume(x) if x.max_drop.is_none() && x.max_growth.is_none() => {
            p.error(at, format!("{what}: give 'max_drop', 'max_growth' or both"))
        }
        Check::Volume(_) if p.spec.pipeline.state.is_none() => p.error(
            at,
            format!("{what}: a volume check compares with the run history, which needs a 'state:' section"),
        ),
        Check::AcceptedValues(x) if x.values.is_empty() => p.error(at, format!("{what}: 'values' is empty")),
        Check::Expression(x) => {
            if let Err(e) = sql::parse_expr(x.sql.value()) {
                p.error(x.sql.pos(), format!("{what}: bad SQL expression: {e}"));
            }
        }
        Check::Relationships(x) => relationship_target(p, &what, &x.to),
        _ => {}
    }
}

fn relationship_target(p: &mut Problems, what: &str, to: &Sp<String>) {
    let Some((node, _col)) = to.value().split_once('.') else {
        p.error(to.pos(), format!("{what}: 'to' must be 'node.column', not '{}'", to.value()));
        return;
    };
    let pl = &p.spec.pipeline;
    if !pl.sources.contains_key(node) && !pl.transforms.contains_key(node) && !p.spec.broken.contains(node) {
        let ids = pl.sources.keys().chain(pl.transforms.keys()).map(String::as_str);
        let hint = suggest::hint(node, ids);
        p.error(to.pos(), format!("{what}: unknown node '{node}' in 'to'{hint}"));
    }
}

// --------------------------------------------------------------------- rules

/// Loads the rule set of every rules transform.
pub(crate) async fn rules(p: &mut Problems<'_>, _b: &Built) -> HashMap<String, Vec<LoadedRule>> {
    let mut out = HashMap::new();
    for (id, t) in &p.spec.pipeline.transforms {
        let Transform::Rules(r) = t else { continue };
        let target = p.spec.resolve(r.rules.value());
        let files = match rules::files(&target) {
            Ok(f) if f.is_empty() => {
                p.error(
                    r.rules.pos(),
                    format!("transform '{id}': no rule files (*.yaml) in '{}'", r.rules.value()),
                );
                continue;
            }
            Ok(f) => f,
            Err(e) => {
                p.error(r.rules.pos(), format!("transform '{id}': {e}"));
                continue;
            }
        };
        let (set, diags) = rules::load(&files);
        p.diags.extend(diags);
        if let Some((partitions, column)) = partitioned(p.spec) {
            p.diags.extend(rules::check_partitioned(&set, &column, partitions));
        }
        out.insert(id.clone(), set);
    }
    out
}

/// A stream read in several partitions: their number and the partition column.
pub(crate) fn partitioned(spec: &crate::spec::Spec) -> Option<(u32, String)> {
    if spec.pipeline.mode != crate::spec::model::Mode::Stream {
        return None;
    }
    spec.pipeline.sources.values().find_map(|s| match s.settings.partitions() {
        Some((p, Some(col))) if p > 1 => Some((p, col.to_string())),
        _ => None,
    })
}

// ------------------------------------------------------------------- schemas

/// Output schemas known offline, and the columns checks and rules name.
pub(crate) async fn schemas(
    p: &mut Problems<'_>,
    a: &dyn Analyzer,
    b: &Built,
    rules: &HashMap<String, Vec<LoadedRule>>,
) -> HashMap<String, SchemaRef> {
    let mut known: HashMap<String, SchemaRef> = HashMap::new();
    for id in &b.order {
        let schema = node_schema(p, a, b, rules, &known, id).await;
        if let Some(s) = schema {
            check_columns(p, a, id, &s).await;
            known.insert(id.clone(), s);
        }
    }
    relationship_columns(p, &known);
    known
}

async fn node_schema(
    p: &mut Problems<'_>,
    a: &dyn Analyzer,
    b: &Built,
    rules: &HashMap<String, Vec<LoadedRule>>,
    known: &HashMap<String, SchemaRef>,
    id: &str,
) -> Option<SchemaRef> {
    let pl = &p.spec.pipeline;
    if let Some(query) = pl.sources.get(id).and_then(|s| s.settings.schema_query()) {
        return generated_schema(p, a, id, query).await;
    }
    if let Some(s) = pl.sources.get(id) {
        let declared = s.declared_schema()?;
        return match schema::from_declared(declared) {
            Ok(s) => Some(s),
            Err(errors) => {
                let at = p.id_pos(id);
                for e in errors {
                    p.error(at, format!("source '{id}': {e}"));
                }
                None
            }
        };
    }
    if b.broken.contains(id) {
        return None;
    }
    let inputs = b.inputs.get(id)?;
    let input_schemas: Option<Vec<(String, SchemaRef)>> =
        inputs.iter().map(|i| known.get(i).map(|s| (i.clone(), s.clone()))).collect();
    let input_schemas = input_schemas?;
    match pl.transforms.get(id)? {
        Transform::Sql(t) => match a.sql_schema(&input_schemas, t.sql.value()).await {
            Ok(s) => Some(s),
            Err(e) => {
                p.error(t.sql.pos(), format!("transform '{id}': {e}"));
                None
            }
        },
        Transform::Rules(t) => {
            let (_, input) = input_schemas.first()?;
            if input.field_with_name(t.key.value()).is_err() {
                let cols: Vec<String> = input.fields().iter().map(|f| f.name().clone()).collect();
                let hint = column_hint(t.key.value(), &cols);
                p.error(
                    t.key.pos(),
                    format!(
                        "transform '{id}': key column '{}' is not in '{}'{hint}",
                        t.key.value(),
                        t.input.value()
                    ),
                );
            }
            if let Some(set) = rules.get(id) {
                let diags = a.check_rules(set, input.clone(), t.key.value()).await;
                p.diags.extend(diags);
            }
            Some(a.alert_schema(input))
        }
    }
}

/// The columns of a source computed by SQL (generate), planned offline.
async fn generated_schema(
    p: &mut Problems<'_>,
    a: &dyn Analyzer,
    id: &str,
    query: Result<String, String>,
) -> Option<SchemaRef> {
    // A query that cannot be written was reported by the settings checks.
    match a.sql_schema(&[], &query.ok()?).await {
        Ok(s) => Some(s),
        Err(e) => {
            p.error(p.id_pos(id), format!("source '{id}': {e}"));
            None
        }
    }
}

/// The columns a node's checks name exist in its schema; expressions plan.
async fn check_columns(p: &mut Problems<'_>, a: &dyn Analyzer, id: &str, schema: &SchemaRef) {
    let pl = &p.spec.pipeline;
    let checks: Vec<Check> = match (pl.sources.get(id), pl.transforms.get(id)) {
        (Some(s), _) => s.checks().to_vec(),
        (_, Some(t)) => t.checks().to_vec(),
        _ => return,
    };
    let cols: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    for (i, c) in checks.iter().enumerate() {
        let at = p.spec.check_pos.get(&(id.to_string(), i)).copied().unwrap_or_else(|| p.id_pos(id));
        for col in c.columns() {
            if !cols.iter().any(|c| c == col) {
                let hint = column_hint(col, &cols);
                p.error(
                    at,
                    format!(
                        "check '{}' on '{id}': column '{col}' is not in the output of '{id}'{hint}",
                        c.kind()
                    ),
                );
            }
        }
        if let Check::Expression(x) = c {
            let inputs = [(id.to_string(), schema.clone())];
            let result = a.sql_schema(&inputs, &format!("SELECT ({}) AS ok FROM {id}", x.sql.value())).await;
            match result {
                Ok(s) if s.field(0).data_type() == &DataType::Boolean => {}
                Ok(s) => p.error(
                    x.sql.pos(),
                    format!(
                        "check 'expression' on '{id}': must be true or false, but it gives {}",
                        s.field(0).data_type()
                    ),
                ),
                Err(e) => p.error(x.sql.pos(), format!("check 'expression' on '{id}': {e}")),
            }
        }
    }
}

fn relationship_columns(p: &mut Problems, known: &HashMap<String, SchemaRef>) {
    let pl = &p.spec.pipeline;
    let mut targets = Vec::new();
    for c in
        pl.sources.values().flat_map(|s| s.checks()).chain(pl.transforms.values().flat_map(|t| t.checks()))
    {
        if let Check::Relationships(x) = c {
            targets.push(x.to.clone());
        }
    }
    for to in targets {
        let Some((node, col)) = to.value().split_once('.') else { continue };
        if let Some(s) = known.get(node) {
            if s.field_with_name(col).is_err() {
                let cols: Vec<String> = s.fields().iter().map(|f| f.name().clone()).collect();
                let hint = column_hint(col, &cols);
                p.error(
                    to.pos(),
                    format!("check 'relationships': column '{col}' is not in the output of '{node}'{hint}"),
                );
            }
        }
    }
}

// --------------------------------------------------------------------- tests

/// Spec tests name real sources and nodes.
pub(crate) fn tests(p: &mut Problems) {
    let pl = &p.spec.pipeline;
    let mut errors = Vec::new();
    for t in &pl.tests {
        for name in t.given.keys() {
            if !pl.sources.contains_key(name.value()) && !p.spec.broken.contains(name.value()) {
                let hint = suggest::hint(name.value(), pl.sources.keys().map(String::as_str));
                errors.push((
                    name.pos(),
                    format!(
                        "test '{}': 'given' names '{}', which is not a source{hint}",
                        t.name,
                        name.value()
                    ),
                ));
            }
        }
        for (name, e) in &t.expect {
            let checks = match (pl.sources.get(name.value()), pl.transforms.get(name.value())) {
                (Some(s), _) => s.checks(),
                (_, Some(t)) => t.checks(),
                _ if p.spec.broken.contains(name.value()) => continue,
                _ => {
                    let ids = pl.sources.keys().chain(pl.transforms.keys()).map(String::as_str);
                    let hint = suggest::hint(name.value(), ids);
                    errors.push((
                        name.pos(),
                        format!(
                            "test '{}': 'expect' names '{}', which is not a source or transform{hint}",
                            t.name,
                            name.value()
                        ),
                    ));
                    continue;
                }
            };
            if e.rows.is_none() && e.count.is_none() && e.fails_check.is_none() {
                errors.push((
                    name.pos(),
                    format!(
                        "test '{}': expect '{}' needs 'rows', 'count' or 'fails_check'",
                        t.name,
                        name.value()
                    ),
                ));
            }
            if let Some(f) = &e.fails_check {
                let names: Vec<String> =
                    checks.iter().flat_map(|c| [c.kind().to_string(), c.name().to_string()]).collect();
                if !names.contains(f) {
                    let hint = column_hint(f, &names);
                    errors.push((
                        name.pos(),
                        format!("test '{}': '{}' has no check '{f}'{hint}", t.name, name.value()),
                    ));
                }
            }
        }
    }
    for (pos, msg) in errors {
        p.error(pos, msg);
    }
}
