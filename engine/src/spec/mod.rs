//! The spec layer: a pipeline file read into [`model::Pipeline`], with the
//! positions later stages need for their errors.
//!
//! Reading goes: YAML text -> marked tree ([`yaml`]) -> templates rendered in
//! place ([`template`]) -> typed structs. Each node is read on its own so that
//! every broken node is reported, not only the first.

pub mod connector;
pub mod model;
pub mod redact;
pub mod rules;
pub mod sql;
pub mod suggest;
pub mod template;
pub mod values;
pub mod yaml;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::Node;

use crate::error::{Diagnostics, Error, Pos, Result};
use connector::Catalog;
use model::*;
use template::{TemplateContext, Templater};
use yaml::{keys, kind_name, node_pos, span_pos, Reader};

/// A pipeline file, read, templated and typed.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The file as the user named it.
    pub file: PathBuf,
    /// The folder relative paths in the spec are resolved against.
    pub dir: PathBuf,
    pub pipeline: Pipeline,
    /// Where each node id (source, transform, sink) was written.
    pub id_pos: HashMap<String, Pos>,
    /// Where each connection name was written.
    pub connection_pos: HashMap<String, Pos>,
    /// Where each check was written, by node id and index.
    pub check_pos: HashMap<(String, usize), Pos>,
    /// Node ids and connection names whose definition could not be read;
    /// their problems are in `diags`, and references to them are not errors.
    pub broken: HashSet<String>,
    /// Problems found while reading.
    pub diags: Diagnostics,
    /// Values that must never be printed (passwords in connection URLs).
    pub secrets: redact::Secrets,
    /// The kinds of connections, sources and sinks the spec was read against.
    pub catalog: &'static Catalog,
}

impl Spec {
    /// Resolves a path written in the spec against the spec's folder
    /// (`pipelines/../rules` becomes `rules`, as messages show it).
    pub fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            return p.to_path_buf();
        }
        let mut out = PathBuf::new();
        for c in self.dir.join(p).components() {
            match c {
                std::path::Component::ParentDir
                    if matches!(out.components().next_back(), Some(std::path::Component::Normal(_))) =>
                {
                    out.pop();
                }
                std::path::Component::CurDir => {}
                other => out.push(other),
            }
        }
        if out.as_os_str().is_empty() {
            out.push(".");
        }
        out
    }
}

/// What the loader needs besides the file.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `--var key=value` overrides.
    pub vars: Vec<(String, serde_json::Value)>,
    /// `env` for templates; the process environment and `.env` by default.
    pub context: TemplateContext,
    /// The kinds of connections, sources and sinks (`connectors::registry`).
    pub catalog: &'static Catalog,
}

impl LoadOptions {
    pub fn from_environment(vars: Vec<(String, serde_json::Value)>, catalog: &'static Catalog) -> Self {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Self { vars, context: TemplateContext::from_environment(&cwd), catalog }
    }
}

const TOP_KEYS: &[&str] = &[
    "version",
    "name",
    "description",
    "mode",
    "vars",
    "connections",
    "sources",
    "transforms",
    "sinks",
    "quarantine",
    "state",
    "tests",
];

/// The bounds of micro-batching: a batch that never ends, or of one row
/// per read, is a mistake.
fn batch_limits(b: &BatchSpec) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(n) = b.max_rows {
        if !(1..=1_000_000).contains(&n) {
            out.push(format!("'max_rows: {n}' must be between 1 and 1000000"));
        }
    }
    if let Some(w) = &b.max_wait {
        if w.get() > std::time::Duration::from_secs(60) {
            out.push(format!("'max_wait: {}' is more than 60s", humantime::format_duration(w.get())));
        }
    }
    if let Some(n) = b.max_bytes {
        if !(1024..=1 << 30).contains(&n) {
            out.push(format!("'max_bytes: {n}' must be between 1024 and 1073741824"));
        }
    }
    out
}

/// Reads a pipeline file; all problems come back together in `Error::Invalid`.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Spec> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    load_str(path, &text, opts)
}

/// Reads a pipeline from text; `path` names it in errors and anchors relative paths.
///
/// Only a file that is not YAML at all fails here. Other problems are kept in
/// [`Spec::diags`], and the nodes that could not be read in [`Spec::broken`],
/// so that compiling can report the rest of the file's problems with them.
pub fn load_str(path: &Path, text: &str, opts: &LoadOptions) -> Result<Spec> {
    let mut r = Reader::new(path);
    let mut root = yaml::parse(path, text).map_err(|d| Error::Invalid(Diagnostics(vec![d])))?;
    let mut ctx = opts.context.clone();
    ctx.vars = read_vars(&mut root, &ctx, opts, &mut r);
    Templater::default().render_tree(&mut root, &ctx, &mut r);
    let mut loader = Loader { r, found: Found::default(), catalog: opts.catalog };
    let pipeline = loader.pipeline(&root, &ctx);
    let Loader { r, found, .. } = loader;
    let Some(pipeline) = pipeline else {
        return Err(Error::Invalid(r.diags));
    };
    let secrets = redact::Secrets::from_pipeline(&pipeline);
    Ok(Spec {
        file: path.to_path_buf(),
        dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        pipeline,
        id_pos: found.id_pos,
        connection_pos: found.connection_pos,
        check_pos: found.check_pos,
        broken: found.broken,
        diags: r.diags,
        secrets,
        catalog: opts.catalog,
    })
}

/// `vars:` rendered with `env` only, then overridden by `--var`.
fn read_vars(
    root: &mut Node,
    ctx: &TemplateContext,
    opts: &LoadOptions,
    r: &mut Reader,
) -> serde_json::Map<String, serde_json::Value> {
    let mut vars = serde_json::Map::new();
    if let Some(node) = root.as_mapping_mut().and_then(|m| m.get_mut("vars")) {
        if node.as_mapping().is_none() && !is_empty(node) {
            r.error(node_pos(node), format!("'vars' must be a mapping, found {}", kind_name(node)));
        } else {
            Templater::default().render_tree(node, ctx, r);
            if let serde_json::Value::Object(m) = yaml::to_json(node) {
                vars = m;
            }
        }
    }
    for (k, v) in &opts.vars {
        vars.insert(k.clone(), v.clone());
    }
    vars
}

fn is_empty(node: &Node) -> bool {
    matches!(node, Node::Scalar(s) if s.as_str().is_empty())
}

/// What the loader learns besides the typed pipeline.
#[derive(Debug, Default)]
struct Found {
    id_pos: HashMap<String, Pos>,
    connection_pos: HashMap<String, Pos>,
    check_pos: HashMap<(String, usize), Pos>,
    broken: HashSet<String>,
}

struct Loader {
    r: Reader,
    found: Found,
    catalog: &'static Catalog,
}

impl Loader {
    fn pos(&mut self) -> &mut Found {
        &mut self.found
    }

    fn pipeline(&mut self, root: &Node, ctx: &TemplateContext) -> Option<Pipeline> {
        let map = root.as_mapping()?;
        for (key, pos) in keys(root) {
            if !TOP_KEYS.contains(&key.as_str()) {
                let hint = suggest::hint(&key, TOP_KEYS.iter().copied());
                self.r.error(pos, format!("unknown key '{key}'{}", or_expected(&hint, TOP_KEYS)));
            }
        }
        let version = self.required::<u32>(map, root, "version");
        if let (Some(v), Some(node)) = (version, map.get("version")) {
            if v != 1 {
                self.r.error(node_pos(node), format!("unsupported version '{v}'; only version 1 exists"));
            }
        }
        let name = self.required::<String>(map, root, "name");
        if let (Some(n), Some(node)) = (&name, map.get("name")) {
            if !valid_name(n) {
                self.r.error(node_pos(node), format!("name '{n}' must use only a-z, 0-9 and '_'"));
            }
        }
        let description = self.optional::<String>(map, "description");
        let mode = self.optional::<Mode>(map, "mode").unwrap_or_default();
        let connections = self.entries(map, "connections", |l, id, node| l.connection(id, node));
        let sources = self.entries(map, "sources", |l, id, node| l.source(id, node, &connections));
        let transforms = self.entries(map, "transforms", |l, id, node| l.transform(id, node));
        let sinks = self.entries(map, "sinks", |l, id, node| l.sink(id, node, &connections));
        let quarantine = self.optional::<Quarantine>(map, "quarantine");
        let state = self.optional::<StateStore>(map, "state");
        let tests = self.optional::<Vec<SpecTest>>(map, "tests").unwrap_or_default();
        let vars = ctx.vars.iter().map(|(k, v)| (k.clone(), yaml::Data(v.clone()))).collect();
        Some(Pipeline {
            version: version.unwrap_or(1),
            name: name.unwrap_or_default(),
            description,
            mode,
            vars,
            connections,
            sources,
            transforms,
            sinks,
            quarantine,
            state,
            tests,
        })
    }

    fn required<T: serde::de::DeserializeOwned>(
        &mut self,
        map: &MarkedMappingNode,
        root: &Node,
        key: &str,
    ) -> Option<T> {
        match map.get(key) {
            Some(node) => self.r.read(node, ""),
            None => {
                self.r.error(node_pos(root), format!("missing required key '{key}'"));
                None
            }
        }
    }

    fn optional<T: serde::de::DeserializeOwned>(&mut self, map: &MarkedMappingNode, key: &str) -> Option<T> {
        let node = map.get(key)?;
        if is_empty(node) {
            return None;
        }
        self.r.read(node, key)
    }

    /// Reads each entry of a `sources:`-like section with `read`.
    fn entries<T>(
        &mut self,
        map: &MarkedMappingNode,
        section: &str,
        mut read: impl FnMut(&mut Self, &str, &Node) -> Option<T>,
    ) -> IndexMap<String, T> {
        let mut out = IndexMap::new();
        let Some(node) = map.get(section) else { return out };
        if is_empty(node) {
            return out;
        }
        let Some(entries) = node.as_mapping() else {
            self.r.error(
                node_pos(node),
                format!("'{section}' must be a mapping of id: definition, found {}", kind_name(node)),
            );
            return out;
        };
        for (key, value) in entries.iter() {
            let id = key.as_str();
            let pos = span_pos(key.span());
            if section != "connections" {
                if !valid_name(id) {
                    self.r.error(
                        pos,
                        format!("node id '{id}' must use only a-z, 0-9 and '_' and not start with a digit"),
                    );
                }
                if let Some(prev) = self.pos().id_pos.insert(id.to_string(), pos) {
                    self.r.error(pos, format!("duplicate node id '{id}' (first defined at line {}); ids are unique across sources, transforms and sinks", prev.line));
                    continue;
                }
            } else {
                self.pos().connection_pos.insert(id.to_string(), pos);
            }
            if value.as_mapping().is_none() {
                let what = &section[..section.len() - 1];
                self.r.error(
                    node_pos(value),
                    format!("{what} '{id}': expected a mapping, found {}", kind_name(value)),
                );
                self.found.broken.insert(id.to_string());
                continue;
            }
            match read(self, id, value) {
                Some(v) => {
                    out.insert(id.to_string(), v);
                }
                None => {
                    self.found.broken.insert(id.to_string());
                }
            }
        }
        out
    }

    fn connection(&mut self, id: &str, node: &Node) -> Option<Connection> {
        let what = format!("connection '{id}'");
        let names: Vec<&str> = self.catalog.connections.iter().map(|k| k.name).collect();
        let name = self.kind_key(node, &what, &names)?;
        let kind = self.catalog.connection(&name)?;
        let body = without(node, &["type"]);
        Some(Connection { kind: kind.name, settings: (kind.read)(&body, &mut self.r, &what)? })
    }

    /// The value of a required `type:` key, checked against `names`.
    fn kind_key(&mut self, node: &Node, what: &str, names: &[&str]) -> Option<String> {
        let map = node.as_mapping()?;
        let Some(t) = map.get_scalar("type") else {
            self.r.error(
                node_pos(node),
                format!("{what}: missing required key 'type'; expected {}", suggest::one_of(names)),
            );
            return None;
        };
        self.check_kind(t, what, names)
    }

    fn check_kind(&mut self, t: &MarkedScalarNode, what: &str, names: &[&str]) -> Option<String> {
        let value = t.as_str();
        if names.contains(&value) {
            return Some(value.to_string());
        }
        let hint = suggest::hint(value, names.iter().copied());
        self.r.error(
            span_pos(t.span()),
            format!("{what}: unknown type '{value}'{}", or_expected(&hint, names)),
        );
        None
    }

    /// The kind of a source or sink: its `type:`, else its connection's type
    /// (`kinds` are the names and connection types of the section's kinds).
    fn node_kind(
        &mut self,
        node: &Node,
        what: &str,
        kinds: &[(&'static str, Option<&'static str>)],
        connections: &IndexMap<String, Connection>,
    ) -> Option<&'static str> {
        let map = node.as_mapping()?;
        let names: Vec<&str> = kinds.iter().map(|(n, _)| *n).collect();
        let declared = match map.get_scalar("type") {
            Some(t) => {
                let name = self.check_kind(t, what, &names)?;
                Some(kinds.iter().find(|(n, _)| *n == name)?)
            }
            None => None,
        };
        let Some(conn) = map.get_scalar("connection") else {
            if declared.is_none() {
                self.r.error(
                    node_pos(node),
                    format!("{what}: needs a 'connection' or a 'type' ({})", suggest::one_of(&names)),
                );
            }
            return declared.map(|(n, _)| *n);
        };
        let name = conn.as_str();
        let Some(c) = connections.get(name) else {
            if self.found.broken.contains(name) {
                return None; // the connection itself is broken and already reported
            }
            let hint = suggest::hint(name, connections.keys().map(String::as_str));
            self.r.error(span_pos(conn.span()), format!("{what}: unknown connection '{name}'{hint}"));
            return None;
        };
        if let Some((d, through)) = declared {
            if *through != Some(c.kind) {
                let message = match through {
                    Some(_) => {
                        format!("{what}: 'type: {d}' disagrees with connection '{name}' of type '{}'", c.kind)
                    }
                    None => format!("{what}: '{d}' takes no 'connection'"),
                };
                self.r.error(span_pos(conn.span()), message);
                return None;
            }
            return Some(d);
        }
        match kinds.iter().find(|(_, through)| *through == Some(c.kind)) {
            Some((n, _)) => Some(n),
            None => {
                self.r.error(
                    span_pos(conn.span()),
                    format!("{what}: connection '{name}' is of type '{}', which has no such node; give a 'type' ({})", c.kind, suggest::one_of(&names)),
                );
                None
            }
        }
    }

    fn source(
        &mut self,
        id: &str,
        node: &Node,
        connections: &IndexMap<String, Connection>,
    ) -> Option<Source> {
        let what = format!("source '{id}'");
        let kinds: Vec<_> = self.catalog.sources.iter().map(|k| (k.name, k.connection)).collect();
        let name = self.node_kind(node, &what, &kinds, connections)?;
        let kind = self.catalog.source(name)?;
        let checks = self.checks(id, node);
        let (description, batch) = self.common(node, &what);
        let refresh = node.as_mapping().and_then(|m| self.optional(m, "refresh"));
        let body = without(node, &["type", "checks", "description", "batch", "refresh"]);
        let settings = (kind.read)(&body, &mut self.r, &what)?;
        Some(Source { kind: kind.name, description, batch, refresh, checks, settings })
    }

    /// The keys every source takes: `description` and `batch`.
    fn common(&mut self, node: &Node, what: &str) -> (Option<String>, Option<BatchSpec>) {
        let Some(map) = node.as_mapping() else { return (None, None) };
        let description = self.optional::<String>(map, "description");
        let node = map.get("batch").filter(|b| !is_empty(b));
        let batch: Option<BatchSpec> = node.and_then(|b| self.r.read(b, &format!("{what}: batch")));
        if let (Some(b), Some(n)) = (&batch, node) {
            for problem in batch_limits(b) {
                self.r.error(node_pos(n), format!("{what}: batch: {problem}"));
            }
        }
        (description, batch)
    }

    fn transform(&mut self, id: &str, node: &Node) -> Option<Transform> {
        let what = format!("transform '{id}'");
        let map = node.as_mapping()?;
        let checks = self.checks(id, node);
        let body = without(node, &["checks"]);
        match (map.contains_key("sql"), map.contains_key("rules")) {
            (true, false) => {
                let mut t: SqlTransform = self.r.read(&body, &what)?;
                t.checks = checks;
                Some(Transform::Sql(t))
            }
            (false, true) => {
                let mut t: RulesTransform = self.r.read(&body, &what)?;
                t.checks = checks;
                Some(Transform::Rules(t))
            }
            (true, true) => {
                self.r.error(
                    node_pos(node),
                    format!("{what}: has both 'sql' and 'rules'; a transform is one or the other"),
                );
                None
            }
            (false, false) => {
                self.r.error(
                    node_pos(node),
                    format!("{what}: needs 'sql' (a SQL transform) or 'rules' (a rules transform)"),
                );
                None
            }
        }
    }

    fn sink(&mut self, id: &str, node: &Node, connections: &IndexMap<String, Connection>) -> Option<Sink> {
        let what = format!("sink '{id}'");
        let kinds: Vec<_> = self.catalog.sinks.iter().map(|k| (k.name, k.connection)).collect();
        let name = self.node_kind(node, &what, &kinds, connections)?;
        if let Some(checks) = node.as_mapping().and_then(|m| m.get_node("checks")) {
            self.r.error(
                node_pos(checks),
                format!("{what}: sinks take no checks; put them on '{}'s input", id),
            );
        }
        let kind = self.catalog.sink(name)?;
        let description = node.as_mapping().and_then(|m| self.optional::<String>(m, "description"));
        let body = without(node, &["type", "checks", "description"]);
        Some(Sink { kind: kind.name, description, settings: (kind.read)(&body, &mut self.r, &what)? })
    }

    /// Reads `checks:` of node `id`: a list of one-key mappings.
    fn checks(&mut self, id: &str, node: &Node) -> Vec<Check> {
        let Some(list) = node.as_mapping().and_then(|m| m.get_node("checks")) else { return vec![] };
        if is_empty(list) {
            return vec![];
        }
        let Some(items) = list.as_sequence() else {
            self.r
                .error(node_pos(list), format!("'{id}': 'checks' must be a list, found {}", kind_name(list)));
            return vec![];
        };
        let mut out = Vec::new();
        for item in items.iter() {
            if let Some(check) = self.check(id, item) {
                let index = out.len();
                self.pos().check_pos.insert((id.to_string(), index), node_pos(item));
                out.push(check);
            }
        }
        out
    }

    fn check(&mut self, id: &str, item: &Node) -> Option<Check> {
        let what = format!("check on '{id}'");
        let map = match item.as_mapping() {
            Some(m) if m.len() == 1 => m,
            _ => {
                self.r.error(
                    node_pos(item),
                    format!(
                        "{what}: each check is a mapping with one key, its kind ({})",
                        suggest::one_of(Check::KINDS)
                    ),
                );
                return None;
            }
        };
        let (key, value) = map.iter().next()?;
        let kind = key.as_str();
        let what = format!("check '{kind}' on '{id}'");
        let short = matches!(value, Node::Scalar(_) | Node::Sequence(_));
        let body = if short && matches!(kind, "not_null" | "unique") {
            wrap(value, "columns")
        } else {
            value.clone()
        };
        Some(match kind {
            "not_null" => Check::NotNull(self.r.read(&body, &what)?),
            "unique" => Check::Unique(self.r.read(&body, &what)?),
            "accepted_values" => Check::AcceptedValues(self.r.read(&body, &what)?),
            "range" => Check::Range(self.r.read(&body, &what)?),
            "relationships" => Check::Relationships(self.r.read(&body, &what)?),
            "row_count" => Check::RowCount(self.r.read(&body, &what)?),
            "expression" => Check::Expression(self.r.read(&body, &what)?),
            "freshness" => Check::Freshness(self.r.read(&body, &what)?),
            "volume" => Check::Volume(self.r.read(&body, &what)?),
            _ => {
                let hint = suggest::hint(kind, Check::KINDS.iter().copied());
                self.r.error(
                    span_pos(key.span()),
                    format!("check on '{id}': unknown check '{kind}'{}", or_expected(&hint, Check::KINDS)),
                );
                return None;
            }
        })
    }
}

/// `"; did you mean 'x'?"`, or the list of valid choices when nothing is close.
fn or_expected(hint: &str, names: &[&str]) -> String {
    if hint.is_empty() {
        format!("; expected {}", suggest::one_of(names))
    } else {
        hint.to_string()
    }
}

/// A copy of a mapping node without some keys.
fn without(node: &Node, drop: &[&str]) -> Node {
    match node.as_mapping() {
        Some(m) => {
            let mut m = m.clone();
            for k in drop {
                m.remove(*k);
            }
            Node::Mapping(m)
        }
        None => node.clone(),
    }
}

/// `value` as the single entry `{ key: value }`, keeping its position.
fn wrap(value: &Node, key: &str) -> Node {
    let span = *value.span();
    let mut m = MarkedMappingNode::new_empty(span);
    m.insert(MarkedScalarNode::new(span, key), value.clone());
    Node::Mapping(m)
}

/// Names of pipelines and node ids: usable unquoted in SQL.
pub fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
