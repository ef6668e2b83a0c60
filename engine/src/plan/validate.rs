//! The checks `compile` runs beyond the graph's shape: each node's settings,
//! rule sets, schemas and the columns checks and rules name, and spec tests.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::graph::Built;
use super::{schema, Problems};
use crate::error::Pos;
use crate::rules::{self, LoadedRule};
use crate::spec::model::*;
use crate::spec::suggest;
use crate::spec::yaml::Sp;
use crate::transform::sql::{self, Planner};

// ------------------------------------------------------------------ settings

/// Settings of each node that only make sense together.
pub(crate) fn nodes(p: &mut Problems) {
    let pl = &p.spec.pipeline;
    for (name, c) in &pl.connections {
        if let Connection::Postgres(PostgresConnection { migrations: Some(m), .. }) = c {
            if !p.spec.resolve(m.value()).is_dir() {
                p.error(
                    m.pos(),
                    format!("connection '{name}': migrations folder '{}' does not exist", m.value()),
                );
            }
        }
    }
    for (id, s) in &pl.sources {
        source(p, id, s);
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
        sink(p, id, s);
    }
    if pl.mode == Mode::Stream {
        stream_shape(p);
    }
    if let Some(q) = &pl.quarantine {
        connection_of(p, "quarantine", &q.connection, ConnectionType::Postgres);
    }
    if let Some(s) = &pl.state {
        connection_of(p, "state", &s.connection, ConnectionType::Postgres);
    }
}

/// Checks that `name` is a connection of type `want`.
fn connection_of(p: &mut Problems, what: &str, name: &Sp<String>, want: ConnectionType) {
    match p.spec.pipeline.connections.get(name.value()) {
        Some(c) if c.kind() == want => {}
        Some(c) => p.error(
            name.pos(),
            format!(
                "{what}: connection '{}' is of type '{}', but a '{}' connection is needed",
                name.value(),
                c.kind().name(),
                want.name()
            ),
        ),
        None => {
            let hint = suggest::hint(name.value(), p.spec.pipeline.connections.keys().map(String::as_str));
            p.error(name.pos(), format!("{what}: unknown connection '{}'{hint}", name.value()));
        }
    }
}

/// What a stream pipeline can hold: one redis or generate source, no checks,
/// sinks that take micro-batches.
fn stream_shape(p: &mut Problems) {
    let pl = &p.spec.pipeline;
    let mut problems = Vec::new();
    if pl.sources.len() > 1 {
        let first = pl.sources.keys().nth(1).cloned().unwrap_or_default();
        problems
            .push((first.clone(), format!("source '{first}': a stream pipeline reads exactly one source")));
    }
    for (id, s) in &pl.sources {
        if !matches!(s, Source::Redis(_) | Source::Generate(_)) {
            problems.push((
                id.clone(),
                format!("source '{id}': a stream reads redis or generate sources, not {}", s.kind().name()),
            ));
        }
        if !s.checks().is_empty() {
            problems.push((id.clone(), format!("source '{id}': checks run in batch pipelines; in a stream, filter with a sql transform or rules")));
        }
    }
    for (id, t) in &pl.transforms {
        if !t.checks().is_empty() {
            problems.push((id.clone(), format!("transform '{id}': checks run in batch pipelines; in a stream, filter with a sql transform or rules")));
        }
    }
    for (id, s) in &pl.sinks {
        if let Sink::Postgres(PostgresSink { mode: WriteMode::Replace, .. }) = s {
            problems.push((
                id.clone(),
                format!(
                    "sink '{id}': 'mode: replace' rewrites the whole table; a stream sink appends or upserts"
                ),
            ));
        }
        if matches!(s, Sink::File(_) | Sink::Mongodb(_)) {
            problems.push((
                id.clone(),
                format!(
                    "sink '{id}': {} sinks are for batch runs; a stream writes to redis, postgres or stdout",
                    s.kind().name()
                ),
            ));
        }
    }
    for (id, msg) in problems {
        let at = p.id_pos(&id);
        p.error(at, msg);
    }
}

fn source(p: &mut Problems, id: &str, s: &Source) {
    let what = format!("source '{id}'");
    let at = p.id_pos(id);
    let stream = p.spec.pipeline.mode == Mode::Stream;
    match s {
        Source::Postgres(x) => {
            if x.table.is_some() == x.query.is_some() {
                p.error(at, format!("{what}: give either 'table' or 'query'"));
            }
            if x.incremental.is_some() && p.spec.pipeline.state.is_none() {
                p.error(at, format!("{what}: 'incremental' needs a 'state:' section to keep watermarks in"));
            }
            if let Some(inc) = &x.incremental {
                duration(p, at, &what, "incremental.lookback", inc.lookback.as_deref());
            }
        }
        Source::Mongodb(x) => {
            if x.schema.is_empty() {
                p.error(at, format!("{what}: 'schema' needs at least one column"));
            }
        }
        Source::File(_) => {}
        Source::Redis(x) => redis_source(p, id, x, stream),
        Source::Generate(x) => generate(p, id, x, stream),
    }
    let batch = match s {
        Source::Postgres(x) => &x.batch,
        Source::Mongodb(x) => &x.batch,
        Source::File(x) => &x.batch,
        Source::Redis(x) => &x.batch,
        Source::Generate(x) => &x.batch,
    };
    if let Some(b) = batch {
        duration(p, at, &what, "batch.max_wait", b.max_wait.as_deref());
    }
}

fn redis_source(p: &mut Problems, id: &str, x: &RedisSource, stream: bool) {
    let what = format!("source '{id}'");
    let at = p.id_pos(id);
    if !stream {
        p.error(at, format!("{what}: redis sources run in stream mode; set 'mode: stream'"));
    }
    match (&x.channel, &x.stream) {
        (Some(_), Some(_)) | (None, None) => {
            p.error(at, format!("{what}: give either 'channel' (Pub/Sub) or 'stream' (Redis Streams)"))
        }
        (Some(_), None) if x.group.is_some() => {
            p.error(at, format!("{what}: 'group' applies to 'stream', not to 'channel'"))
        }
        (None, Some(_)) if x.group.is_none() => {
            p.error(at, format!("{what}: 'stream' needs a consumer 'group'"))
        }
        _ => {}
    }
    if let Some(dl) = &x.dead_letter {
        match (&dl.stream, &dl.connection, &dl.table) {
            (Some(_), None, None) => {}
            (None, Some(c), Some(_)) => {
                connection_of(p, &format!("{what} dead_letter"), c, ConnectionType::Postgres)
            }
            _ => p.error(
                at,
                format!("{what}: 'dead_letter' takes either 'stream' or 'connection' with 'table'"),
            ),
        }
    }
}

fn generate(p: &mut Problems, id: &str, x: &GenerateSource, stream: bool) {
    let what = format!("source '{id}'");
    let at = p.id_pos(id);
    match (stream, x.rows.is_some(), &x.rate) {
        (false, true, None) => {}
        (false, _, _) => {
            p.error(at, format!("{what}: in batch mode a generate source takes 'rows' (and no 'rate')"))
        }
        (true, false, Some(rate)) => {
            if parse_rate(rate.value()).is_none() {
                p.error(
                    rate.pos(),
                    format!("{what}: bad rate '{}'; write events per second, e.g. 5000/s", rate.value()),
                );
            }
        }
        (true, _, _) => {
            p.error(at, format!("{what}: in stream mode a generate source takes 'rate' (and no 'rows')"))
        }
    }
    if x.columns.is_empty() {
        p.error(at, format!("{what}: 'columns' needs at least one column"));
    }
    for (col, expr) in &x.columns {
        if let Err(e) = sql::parse_expr(expr.value()) {
            p.error(expr.pos(), format!("{what}: column '{col}': bad SQL expression: {e}"));
        }
    }
}

/// `5000/s` (also `/m`, `/h`) as events per second.
pub fn parse_rate(rate: &str) -> Option<f64> {
    let (n, unit) = rate.trim().split_once('/')?;
    let n: f64 = n.trim().replace('_', "").parse().ok()?;
    let per = match unit.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    (n > 0.0).then_some(n / per)
}

fn duration(p: &mut Problems, at: Pos, what: &str, key: &str, value: Option<&str>) {
    if let Some(v) = value {
        if humantime::parse_duration(v).is_err() {
            p.error(at, format!("{what}: {key}: bad duration '{v}'; write e.g. 500ms, 30s, 10m, 1d"));
        }
    }
}

fn sink(p: &mut Problems, id: &str, s: &Sink) {
    let what = format!("sink '{id}'");
    let at = p.id_pos(id);
    let (mode, key) = match s {
        Sink::Postgres(x) => (x.mode, &x.key),
        Sink::Mongodb(x) => (x.mode, &x.key),
        Sink::Redis(x) => {
            if x.channel.is_some() == x.stream.is_some() {
                p.error(at, format!("{what}: give either 'channel' (PUBLISH) or 'stream' (XADD)"));
            }
            return;
        }
        Sink::File(_) | Sink::Stdout(_) => return,
    };
    let has_key = key.as_ref().is_some_and(|k| !k.is_empty());
    match (mode, has_key) {
        (WriteMode::Upsert, false) => {
            p.error(at, format!("{what}: 'mode: upsert' needs 'key' (the key columns)"))
        }
        (WriteMode::Append | WriteMode::Replace, true) => {
            p.error(at, format!("{what}: 'key' applies only to 'mode: upsert'"))
        }
        _ => {}
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
        if matches!(c, Check::RowCount(_) | Check::Freshness(_)) {
            p.error(
                at,
                format!("{what}: a '{}' check is about the whole table and cannot quarantine rows", c.kind()),
            );
        }
    } else if max_failures.is_some() {
        p.error(at, format!("{what}: 'max_failures' applies only with 'on_fail: quarantine'"));
    }
    if let Some(m) = max_failures {
        if parse_max_failures(m).is_none() {
            p.error(at, format!("{what}: bad max_failures '{m}'; write a count (10) or a share (\"0.5%\")"));
        }
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
        Check::Freshness(x) => duration(p, at, &what, "max_age", Some(&x.max_age)),
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

/// A count, or a percentage of the rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxFailures {
    Count(u64),
    Percent(f64),
}

pub fn parse_max_failures(s: &str) -> Option<MaxFailures> {
    let s = s.trim();
    match s.strip_suffix('%') {
        Some(pct) => {
            pct.trim().parse::<f64>().ok().filter(|v| (0.0..=100.0).contains(v)).map(MaxFailures::Percent)
        }
        None => s.parse::<u64>().ok().map(MaxFailures::Count),
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
        out.insert(id.clone(), set);
    }
    out
}

// ------------------------------------------------------------------- schemas

/// Output schemas known offline, and the columns checks and rules name.
pub(crate) async fn schemas(
    p: &mut Problems<'_>,
    b: &Built,
    rules: &HashMap<String, Vec<LoadedRule>>,
) -> HashMap<String, SchemaRef> {
    let mut known: HashMap<String, SchemaRef> = HashMap::new();
    for id in &b.order {
        let schema = node_schema(p, b, rules, &known, id).await;
        if let Some(s) = schema {
            check_columns(p, id, &s).await;
            known.insert(id.clone(), s);
        }
    }
    relationship_columns(p, &known);
    known
}

async fn node_schema(
    p: &mut Problems<'_>,
    b: &Built,
    rules: &HashMap<String, Vec<LoadedRule>>,
    known: &HashMap<String, SchemaRef>,
    id: &str,
) -> Option<SchemaRef> {
    let pl = &p.spec.pipeline;
    if let Some(Source::Generate(g)) = pl.sources.get(id) {
        return generated_schema(p, id, g).await;
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
        Transform::Sql(t) => {
            let planner = Planner::new();
            for (name, s) in &input_schemas {
                if let Err(e) = planner.register_empty(name, s.clone()) {
                    p.error(t.sql.pos(), format!("transform '{id}': {e}"));
                    return None;
                }
            }
            match planner.output_schema(t.sql.value()).await {
                Ok(s) => Some(s),
                Err(e) => {
                    p.error(t.sql.pos(), format!("transform '{id}': {e}"));
                    None
                }
            }
        }
        Transform::Rules(t) => {
            let (_, input) = input_schemas.first()?;
            if input.field_with_name(t.key.value()).is_err() {
                let cols: Vec<String> = input.fields().iter().map(|f| f.name().clone()).collect();
                let hint = rules::column_hint(t.key.value(), &cols);
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
                let diags = rules::compile::check_against(set, input.clone(), t.key.value()).await;
                p.diags.extend(diags);
            }
            Some(alert_schema(input))
        }
    }
}

/// The columns of a generate source, planned from its expressions.
async fn generated_schema(p: &mut Problems<'_>, id: &str, g: &GenerateSource) -> Option<SchemaRef> {
    let sql = crate::connectors::generate::sql(g, 1).ok()?;
    match Planner::new().output_schema(&sql).await {
        Ok(s) => Some(s),
        Err(e) => {
            p.error(p.id_pos(id), format!("source '{id}': {e}"));
            None
        }
    }
}

/// A rules transform's output: the event's columns and the alert's.
pub fn alert_schema(input: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Field> = vec![
        Field::new("alert_id", DataType::Utf8, false),
        Field::new("rule_id", DataType::Utf8, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("rules_version", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
    ];
    let taken: Vec<String> = fields.iter().map(|f| f.name().clone()).collect();
    fields.extend(input.fields().iter().filter(|f| !taken.contains(f.name())).map(|f| f.as_ref().clone()));
    Arc::new(Schema::new(fields))
}

/// The columns a node's checks name exist in its schema; expressions plan.
async fn check_columns(p: &mut Problems<'_>, id: &str, schema: &SchemaRef) {
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
                let hint = rules::column_hint(col, &cols);
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
            let planner = Planner::new();
            let result = match planner.register_empty(id, schema.clone()) {
                Ok(()) => planner.output_schema(&format!("SELECT ({}) AS ok FROM {id}", x.sql.value())).await,
                Err(e) => Err(e),
            };
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
                let hint = rules::column_hint(col, &cols);
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
                    let hint = rules::column_hint(f, &names);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates_and_failures() {
        assert_eq!(parse_rate("5000/s"), Some(5000.0));
        assert_eq!(parse_rate("60/m"), Some(1.0));
        assert_eq!(parse_rate("fast"), None);
        assert_eq!(parse_max_failures("10"), Some(MaxFailures::Count(10)));
        assert_eq!(parse_max_failures("0.5%"), Some(MaxFailures::Percent(0.5)));
        assert_eq!(parse_max_failures("lots"), None);
    }
}
