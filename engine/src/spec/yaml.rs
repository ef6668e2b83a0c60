//! YAML with positions: parsing into a marked tree, typed extraction through
//! serde, and the conversion of serde's errors into [`Diagnostic`]s.
//!
//! Every value the later stages may complain about is read as [`Sp<T>`], which
//! remembers where it stood in the file.

use std::borrow::Cow;
use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use marked_yaml::{LoaderOptions, Node, Span, Spanned};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::suggest;
use crate::error::{Diagnostic, Diagnostics, Pos};

/// A value with the place it was written, for errors found after parsing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(transparent)]
pub struct Sp<T>(Spanned<T>);

impl<T> Sp<T> {
    pub fn new(pos: Pos, value: T) -> Self {
        let marker = marked_yaml::Marker::new(0, 0, pos.line, pos.column);
        Sp(Spanned::new(Span::new_start(marker), value))
    }

    pub fn pos(&self) -> Pos {
        span_pos(self.0.span())
    }

    pub fn value(&self) -> &T {
        &self.0
    }
}

impl<T> Deref for Sp<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: fmt::Display> fmt::Display for Sp<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.deref().fmt(f)
    }
}

impl<T: schemars::JsonSchema> schemars::JsonSchema for Sp<T> {
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(generator)
    }

    fn inline_schema() -> bool {
        T::inline_schema()
    }
}

pub fn span_pos(span: &Span) -> Pos {
    span.start().map(|m| Pos::new(m.line(), m.column())).unwrap_or(Pos::new(1, 1))
}

pub fn node_pos(node: &Node) -> Pos {
    span_pos(node.span())
}

/// Parses YAML text into a marked tree; duplicate keys are errors.
/// The text must also read the same to other YAML tools (see [`portable`]).
pub fn parse(file: &Path, text: &str) -> Result<Node, Diagnostic> {
    let options = LoaderOptions::default().error_on_duplicate_keys(true).prevent_coercion(true);
    let node = marked_yaml::parse_yaml_with_options(0, text, options).map_err(|e| load_error(file, e))?;
    if let Some((pos, message)) = split_at_comma(&node) {
        return Err(Diagnostic::error(file, pos, message));
    }
    portable(file, text, &node)?;
    Ok(node)
}

/// A value cut in two at a comma: inside `{ }` or `[ ]` a comma ends an
/// unquoted value, so `{ type: decimal(12,2) }` is `type: decimal(12` and
/// a key `2)`, in every YAML reader. Found as an opening parenthesis left
/// open, then a key (with no value) or an item that closes it.
fn split_at_comma(node: &Node) -> Option<(Pos, String)> {
    let open = |t: &str| t.matches('(').count() > t.matches(')').count();
    let closes = |t: &str| t.matches(')').count() > t.matches('(').count();
    let message = |head: &str, tail: &str| {
        format!(
            "'{head},{tail}' is read as two values: inside {{ }} or [ ], a comma ends an unquoted value (in every YAML reader); quote it: \"{head},{tail}\""
        )
    };
    match node {
        Node::Mapping(m) => {
            let entries: Vec<_> = m.iter().collect();
            for pair in entries.windows(2) {
                let ((_, v), (k, next)) = (pair[0], pair[1]);
                let empty = next.as_scalar().is_some_and(|s| s.as_str().is_empty());
                if let Some(v) = v.as_scalar() {
                    if open(v.as_str()) && closes(k.as_str()) && empty {
                        return Some((span_pos(k.span()), message(v.as_str(), k.as_str())));
                    }
                }
            }
            m.values().find_map(split_at_comma)
        }
        Node::Sequence(items) => {
            for pair in items.windows(2) {
                if let (Some(a), Some(b)) = (pair[0].as_scalar(), pair[1].as_scalar()) {
                    if open(a.as_str()) && closes(b.as_str()) {
                        return Some((span_pos(b.span()), message(a.as_str(), b.as_str())));
                    }
                }
            }
            items.iter().find_map(split_at_comma)
        }
        Node::Scalar(_) => None,
    }
}

/// Refuses a document that other YAML tools read differently: PyYAML, the
/// yaml-language-server of editors and most others read YAML as libyaml
/// does (here through serde_norway); marked-yaml's scanner is another
/// implementation, and where the two part, the spec would not mean to its
/// editor what it means to the engine.
fn portable(file: &Path, text: &str, node: &Node) -> Result<(), Diagnostic> {
    let other: serde_norway::Value = match serde_norway::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let pos = e.location().map(|l| Pos::new(l.line(), l.column())).unwrap_or(Pos::new(1, 1));
            return Err(Diagnostic::error(file, pos, format!("other YAML tools cannot read this file: {e}")));
        }
    };
    match differs(node, &other) {
        Some((pos, message)) => Err(Diagnostic::error(file, pos, message)),
        None => Ok(()),
    }
}

/// Where `node` and libyaml's reading of it part, and what to do about it.
fn differs(node: &Node, other: &serde_norway::Value) -> Option<(Pos, String)> {
    use serde_norway::Value as V;
    let split = |n: &Node| {
        let comma = flow_scalars(n).into_iter().find(|s| s.as_str().contains(','));
        match comma {
            Some(s) => (
                span_pos(s.span()),
                format!(
                    "other YAML tools (PyYAML, editors) read '{0}' as two values: inside {{ }} or [ ], a comma ends an unquoted value; quote it: \"{0}\"",
                    s.as_str()
                ),
            ),
            None => (node_pos(n), "other YAML tools (PyYAML, editors) read this differently; quote its values".into()),
        }
    };
    match (node, other) {
        (Node::Mapping(m), V::Mapping(o)) => {
            if m.len() != o.len() {
                return Some(split(node));
            }
            for (k, v) in m.iter() {
                let found = o.iter().find(|(ok, _)| key_text(ok).as_deref() == Some(k.as_str()));
                match found {
                    Some((_, ov)) => {
                        if let Some(d) = differs(v, ov) {
                            return Some(d);
                        }
                    }
                    None => return Some(split(node)),
                }
            }
            None
        }
        (Node::Sequence(s), V::Sequence(o)) => {
            if s.len() != o.len() {
                return Some(split(node));
            }
            s.iter().zip(o).find_map(|(a, b)| differs(a, b))
        }
        (Node::Scalar(s), V::String(o)) if s.as_str() != o => Some(split(node)),
        // Numbers, booleans and nulls are typed by each reader; their text is the same.
        (Node::Scalar(_), V::String(_) | V::Number(_) | V::Bool(_) | V::Null) => None,
        _ => Some(split(node)),
    }
}

/// The scalars of a mapping or list (not nested deeper).
fn flow_scalars(node: &Node) -> Vec<&marked_yaml::types::MarkedScalarNode> {
    match node {
        Node::Mapping(m) => m.values().filter_map(Node::as_scalar).collect(),
        Node::Sequence(s) => s.iter().filter_map(Node::as_scalar).collect(),
        Node::Scalar(s) => vec![s],
    }
}

fn key_text(v: &serde_norway::Value) -> Option<String> {
    use serde_norway::Value as V;
    match v {
        V::String(s) => Some(s.clone()),
        V::Number(n) => Some(n.to_string()),
        V::Bool(b) => Some(b.to_string()),
        V::Null => Some(String::new()),
        _ => None,
    }
}

fn load_error(file: &Path, e: marked_yaml::LoadError) -> Diagnostic {
    use marked_yaml::LoadError as E;
    let (marker, message) = match &e {
        E::TopLevelMustBeMapping(m) => (Some(*m), "the file must be a YAML mapping (key: value)".to_string()),
        E::TopLevelMustBeSequence(m) => (Some(*m), "the file must be a YAML list".to_string()),
        E::UnexpectedAnchor(m) => (Some(*m), "YAML anchors are not supported".to_string()),
        E::MappingKeyMustBeScalar(m) => (Some(*m), "mapping keys must be plain strings".to_string()),
        E::UnexpectedTag(m) => (Some(*m), "YAML tags are not supported".to_string()),
        E::ScanError(m, err) => (Some(*m), format!("invalid YAML: {}", err.info())),
        E::DuplicateKey(inner) => (
            inner.key.span().start().copied(),
            format!(
                "duplicate key '{}' (first defined at line {})",
                inner.key.as_str(),
                span_pos(inner.prev_key.span()).line
            ),
        ),
    };
    let pos = marker.map(|m| Pos::new(m.line(), m.column())).unwrap_or(Pos::new(1, 1));
    Diagnostic::error(file, pos, message)
}

/// Collects diagnostics for one file while its parts are read.
pub struct Reader {
    pub file: PathBuf,
    pub diags: Diagnostics,
}

impl Reader {
    pub fn new(file: &Path) -> Self {
        Self { file: file.to_path_buf(), diags: Diagnostics::default() }
    }

    /// Records an error, one per place: a later error at the same place is
    /// a consequence of the first (a failed template read as a number, say).
    pub fn error(&mut self, pos: Pos, message: impl Into<String>) {
        if self.diags.errors().any(|d| d.pos == pos && d.file == self.file) {
            return;
        }
        self.diags.push(Diagnostic::error(&self.file, pos, message));
    }

    pub fn warning(&mut self, pos: Pos, message: impl Into<String>) {
        self.diags.push(Diagnostic::warning(&self.file, pos, message));
    }

    /// Reads `node` as `T`; on failure records the error (prefixed with `what`,
    /// e.g. `source 'customers'`) and returns `None`.
    pub fn read<T: DeserializeOwned>(&mut self, node: &Node, what: &str) -> Option<T> {
        match marked_yaml::from_node::<T>(node) {
            Ok(v) => Some(v),
            Err(e) => {
                let path = e.path().unwrap_or_default().to_string();
                let (pos, message) = describe(node, &path, e.into_inner());
                let message = if what.is_empty() { message } else { format!("{what}: {message}") };
                self.error(pos, message);
                None
            }
        }
    }
}

/// Turns a serde error from the marked tree into a position and a message in
/// the project's style (lowercase, quoted names, "did you mean").
fn describe(node: &Node, path: &str, e: marked_yaml::Error) -> (Pos, String) {
    // The error's own mark is often that of an enclosing mapping; the path
    // serde tracked leads to the value itself.
    let at = locate(node, path);
    let fallback = || {
        at.map(node_pos)
            .or_else(|| e.start_mark().map(|m| Pos::new(m.line(), m.column())))
            .unwrap_or_else(|| node_pos(node))
    };
    match &e {
        marked_yaml::Error::UnknownFieldError(field, expected, _) => {
            let pos =
                at.and_then(|n| key_pos(n, field)).or_else(|| key_pos(node, field)).unwrap_or_else(fallback);
            let hint = suggest::closest(field, expected.iter().copied());
            let message = match hint {
                Some(h) => format!("unknown key '{field}'; did you mean '{h}'?"),
                None => format!("unknown key '{field}'; expected {}", suggest::one_of(expected)),
            };
            (pos, message)
        }
        marked_yaml::Error::NotBoolean(_) => (fallback(), "expected true or false".to_string()),
        marked_yaml::Error::IntegerParseFailure(_, _) => {
            (fallback(), format!("expected a whole number, found '{}'", scalar_text(at)))
        }
        marked_yaml::Error::FloatParseFailure(_, _) => {
            (fallback(), format!("expected a number, found '{}'", scalar_text(at)))
        }
        marked_yaml::Error::Other(msg, _) => {
            let pos = match at {
                Some(Node::Mapping(m)) if msg.starts_with("missing field") => {
                    m.keys().next().map(|k| span_pos(k.span())).unwrap_or_else(fallback)
                }
                _ => fallback(),
            };
            // The language's own values (durations, rates) say what is wrong
            // with the value; the path says which key holds it.
            let message = match msg.starts_with("bad ") && !path.is_empty() && path != "." {
                true => format!("{path}: {msg}"),
                false => restyle(msg),
            };
            (pos, message)
        }
    }
}

fn scalar_text(node: Option<&Node>) -> String {
    node.and_then(Node::as_scalar).map(|s| s.as_str().to_string()).unwrap_or_default()
}

/// The node a serde path (`a.b[2].c`) leads to.
fn locate<'a>(node: &'a Node, path: &str) -> Option<&'a Node> {
    let mut at = node;
    if path.is_empty() || path == "." {
        return Some(at);
    }
    for part in path.split('.') {
        let (key, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            at = at.as_mapping()?.get_node(key)?;
        }
        for idx in indexes.split(['[', ']']).filter(|s| !s.is_empty()) {
            at = at.as_sequence()?.get_node(idx.parse().ok()?)?;
        }
    }
    Some(at)
}

/// Where key `name` is written in `node` or the mappings below it.
fn key_pos(node: &Node, name: &str) -> Option<Pos> {
    match node {
        Node::Mapping(m) => m
            .keys()
            .find(|k| k.as_str() == name)
            .map(|k| span_pos(k.span()))
            .or_else(|| m.values().find_map(|v| key_pos(v, name))),
        Node::Sequence(s) => s.iter().find_map(|v| key_pos(v, name)),
        Node::Scalar(_) => None,
    }
}

/// serde's built-in messages use backticks and a few stock phrases; rewrite
/// them to read like the rest of the engine's errors.
fn restyle(msg: &str) -> String {
    let msg = msg.replace('`', "'");
    if let Some(rest) = msg.strip_prefix("missing field ") {
        return format!("missing required key {rest}");
    }
    if let Some(rest) = msg.strip_prefix("unknown variant ") {
        return format!("unknown value {rest}");
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return format!("expected {}, found {}", plain_expected(expected), plain_found(found));
        }
    }
    msg
}

/// serde's names for what it wanted, in the words of YAML users.
fn plain_expected(e: &str) -> &str {
    match e {
        "u8" | "u16" | "u32" | "u64" | "i32" | "i64" | "usize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a sequence" => "a list",
        "a string" => "a single value",
        e if e.starts_with("struct ") || e.starts_with("a map") => "a mapping",
        e => e,
    }
}

fn plain_found(f: &str) -> String {
    match f {
        "map" => "a mapping".to_string(),
        "sequence" => "a list".to_string(),
        f => f.replace('"', "'"),
    }
}

/// Key names of a mapping, in file order.
pub fn keys(node: &Node) -> Vec<(String, Pos)> {
    node.as_mapping()
        .map(|m| m.keys().map(|k| (k.as_str().to_string(), span_pos(k.span()))).collect())
        .unwrap_or_default()
}

/// A short name for the YAML kind of a node, for "expected a mapping, found a list".
pub fn kind_name(node: &Node) -> &'static str {
    match node {
        Node::Scalar(s) if s.as_str().is_empty() => "nothing",
        Node::Scalar(_) => "a single value",
        Node::Sequence(_) => "a list",
        Node::Mapping(_) => "a mapping",
    }
}

/// Any YAML value as JSON, typing plain scalars by the YAML 1.2 core schema
/// (`true`, `12`, `1.5`, `null`); quoted scalars stay strings.
pub fn to_json(node: &Node) -> serde_json::Value {
    use serde_json::Value;
    match node {
        Node::Scalar(s) => {
            let text = s.as_str();
            if !s.may_coerce() {
                return Value::String(text.to_string());
            }
            scalar_to_json(text)
        }
        Node::Sequence(seq) => Value::Array(seq.iter().map(to_json).collect()),
        Node::Mapping(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.as_str().to_string(), to_json(v))).collect())
        }
    }
}

pub fn scalar_to_json(text: &str) -> serde_json::Value {
    use serde_json::Value;
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return Value::from(i);
    }
    if text.chars().any(|c| c.is_ascii_digit()) && !text.contains(['x', 'X']) {
        if let Ok(f) = text.parse::<f64>() {
            if f.is_finite() {
                return Value::from(f);
            }
        }
    }
    Value::String(text.to_string())
}

/// Free-form YAML (Mongo filters, test rows, variable values) kept as JSON.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
#[serde(transparent)]
pub struct Data(pub serde_json::Value);

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The marked tree hands scalars over as strings: type them here.
        let raw = serde_json::Value::deserialize(d)?;
        Ok(Data(retype(raw)))
    }
}

fn retype(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => scalar_to_json(&s),
        Value::Array(a) => Value::Array(a.into_iter().map(retype).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, retype(v))).collect()),
        other => other,
    }
}

impl schemars::JsonSchema for Data {
    fn schema_name() -> Cow<'static, str> {
        "Data".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "description": "Any YAML value." })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Demo {
        table: Sp<String>,
        rows: Option<u64>,
    }

    #[test]
    fn spans_and_unknown_keys() {
        let file = Path::new("t.yaml");
        let node = parse(file, "table: x\nrows: 3\n").unwrap();
        let mut r = Reader::new(file);
        let d: Demo = r.read(&node, "").unwrap();
        assert_eq!(d.table.pos(), Pos::new(1, 8));
        let node = parse(file, "table: x\ntabel: y\n").unwrap();
        assert!(r.read::<Demo>(&node, "source 'a'").is_none());
        assert_eq!(
            r.diags.0[0].to_string(),
            "t.yaml:2:1: source 'a': unknown key 'tabel'; did you mean 'table'?"
        );
    }

    #[test]
    fn core_schema_typing() {
        let file = Path::new("t.yaml");
        let node = parse(file, "a: 12\nb: '12'\nc: 1.5\nd: true\ne: x\n").unwrap();
        let v = to_json(&node);
        assert_eq!(v["a"], serde_json::json!(12));
        assert_eq!(v["b"], serde_json::json!("12"));
        assert_eq!(v["c"], serde_json::json!(1.5));
        assert_eq!(v["d"], serde_json::json!(true));
        assert_eq!(v["e"], serde_json::json!("x"));
    }

    /// Every spec and rule file of the repository reads the same to libyaml
    /// (PyYAML, editors) as to the engine: `parse` compares the two.
    #[test]
    fn every_spec_and_rule_file_of_the_repo_reads_the_same_to_libyaml() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo");
        let mut files = Vec::new();
        for dir in [
            "pipelines",
            "examples",
            "rules/fraud",
            "bench/stream/rules",
            "engine/tests/golden",
            "engine/tests/golden/rules_ok",
        ] {
            for e in std::fs::read_dir(root.join(dir)).expect("dir").flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let golden_error = dir == "engine/tests/golden" && !name.starts_with("ok_");
                if name.ends_with(".yaml") && !golden_error {
                    files.push(e.path());
                }
            }
        }
        assert!(files.len() >= 30, "{} files", files.len());
        for f in files {
            let text = std::fs::read_to_string(&f).expect("read");
            if let Err(d) = parse(&f, &text) {
                panic!("{d}");
            }
        }
    }

    /// A value cut at a comma inside `{ }` or `[ ]` is refused at its place
    /// with the quoted form; a document libyaml reads otherwise is refused.
    #[test]
    fn values_cut_at_a_comma_and_other_readings_are_refused() {
        let f = Path::new("x.yaml");
        let err = parse(f, "a:\n  b: { type: decimal(12,2), required: true }\n").unwrap_err().to_string();
        assert_eq!(
            err,
            "x.yaml:2:25: 'decimal(12,2)' is read as two values: inside { } or [ ], a comma ends an unquoted value (in every YAML reader); quote it: \"decimal(12,2)\""
        );
        let err = parse(f, "a: [round(x,2), y]\n").unwrap_err().to_string();
        assert!(err.starts_with("x.yaml:1:13: 'round(x,2)' is read as two values"), "{err}");
        assert!(
            parse(f, "a: { type: \"decimal(12,2)\" }\nb: decimal(12,2)\n").is_ok(),
            "quoted, or in block style"
        );
        let options = LoaderOptions::default().prevent_coercion(true);
        let node = marked_yaml::parse_yaml_with_options(0, "a: { b: x, c: [1, 2] }\n", options).unwrap();
        for other in ["a: { b: y, c: [1, 2] }", "a: { b: x, c: [1] }", "a: { b: x, d: [1, 2] }", "a: [x]"] {
            let v: serde_norway::Value = serde_norway::from_str(other).unwrap();
            assert!(differs(&node, &v).is_some(), "{other}");
        }
        let same: serde_norway::Value = serde_norway::from_str("a: { b: x, c: [1, 2] }").unwrap();
        assert!(differs(&node, &same).is_none());
    }
}
