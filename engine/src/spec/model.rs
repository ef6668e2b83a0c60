//! The pipeline language as Rust types: a faithful mirror of the YAML a user
//! writes, with no behaviour. `engine schema` derives the JSON Schema from these
//! same structs, so every `///` comment here is user documentation.
//!
//! Nodes of several kinds (sources, transforms, sinks, checks) are read by
//! [`super::load`], which picks the kind first and then reads the matching
//! struct, so that each kind rejects keys that belong to another.

use std::borrow::Cow;
use std::sync::Arc;

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::connector::{ConnectionSettings, SinkSettings, SourceSettings};
use super::values::{Duration, MaxFailures, Percent};
use super::yaml::{Data, Sp};

/// A pipeline file.
#[derive(Debug, Clone, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Version of the pipeline language; only `1` exists.
    pub version: u32,
    /// Name of the pipeline: lowercase letters, digits and `_`.
    pub name: String,
    /// What the pipeline does, for people and for `engine graph`.
    #[serde(default)]
    pub description: Option<String>,
    /// `batch` runs with `engine run`; `stream` runs with `engine stream`.
    #[serde(default)]
    pub mode: Mode,
    /// Variables with their defaults, used in templates as `{{ vars.name }}`;
    /// `--var name=value` overrides them.
    #[serde(default)]
    pub vars: IndexMap<String, Data>,
    /// Named endpoints. Secrets reach them only through `{{ env.NAME }}`.
    #[serde(default)]
    pub connections: IndexMap<String, Connection>,
    /// Where data comes from, by node id.
    #[serde(default)]
    pub sources: IndexMap<String, Source>,
    /// SQL and rules transforms, by node id.
    #[serde(default)]
    pub transforms: IndexMap<String, Transform>,
    /// Where data goes, by node id.
    #[serde(default)]
    pub sinks: IndexMap<String, Sink>,
    /// Where rows failing a check with `on_fail: quarantine` go.
    #[serde(default)]
    pub quarantine: Option<Quarantine>,
    /// Where incremental watermarks are kept.
    #[serde(default)]
    pub state: Option<StateStore>,
    /// Tests run by `engine test`: given rows in, expected rows out.
    #[serde(default)]
    pub tests: Vec<SpecTest>,
}

/// How a pipeline runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Read everything, transform, check, load, exit (`engine run`).
    #[default]
    Batch,
    /// Consume events until stopped (`engine stream`).
    Stream,
}

// ---------------------------------------------------------------- connections

/// The JSON Schema of connections, sources and sinks is the union of their
/// kinds' settings, which only the registry knows: here each is a named
/// placeholder that `engine schema` fills in from the catalog.
macro_rules! placeholder_schema {
    ($t:ty, $name:literal, $doc:literal) => {
        impl JsonSchema for $t {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "description": $doc })
            }
        }
    };
}

placeholder_schema!(Connection, "Connection", "A named endpoint; `type` selects the system.");
placeholder_schema!(
    Source,
    "Source",
    "Where data comes from; `type` (or the connection's type) selects the kind."
);
placeholder_schema!(Sink, "Sink", "Where data goes; `type` (or the connection's type) selects the kind.");

/// A named endpoint; `type` selects the system. The settings belong to the
/// connector of that type (see `connectors::registry`).
#[derive(Debug, Clone)]
pub struct Connection {
    /// The `type:` name (`postgres`, `redis`, ...).
    pub kind: &'static str,
    pub settings: Arc<dyn ConnectionSettings>,
}

impl Connection {
    pub fn url(&self) -> &str {
        self.settings.url()
    }

    /// The settings as the connector's own type.
    pub fn settings<T: 'static>(&self) -> Option<&T> {
        self.settings.as_any().downcast_ref()
    }
}

// -------------------------------------------------------------------- sources

/// Where data comes from: the kind's settings and the node's checks.
#[derive(Debug, Clone)]
pub struct Source {
    /// The kind (`type:`, or the type of its connection).
    pub kind: &'static str,
    /// What this node reads, for people.
    pub description: Option<String>,
    /// Micro-batching (stream mode).
    pub batch: Option<BatchSpec>,
    /// A lookup table of a stream pipeline is read again this often.
    pub refresh: Option<Sp<crate::spec::values::Duration>>,
    /// Data-quality checks on this node's output.
    pub checks: Vec<Check>,
    pub settings: Arc<dyn SourceSettings>,
}

impl Source {
    pub fn checks(&self) -> &[Check] {
        &self.checks
    }

    pub fn connection(&self) -> Option<&Sp<String>> {
        self.settings.connection()
    }

    pub fn declared_schema(&self) -> Option<&IndexMap<String, ColumnSpec>> {
        self.settings.declared_schema()
    }

    /// The settings as the connector's own type.
    pub fn settings<T: 'static>(&self) -> Option<&T> {
        self.settings.as_any().downcast_ref()
    }
}

/// Micro-batching of a source (stream mode).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    /// Emit a batch once it holds this many rows.
    #[serde(default)]
    pub max_rows: Option<u64>,
    /// Emit a batch once its first row has waited this long (`250ms`, `1s`).
    #[serde(default)]
    pub max_wait: Option<Duration>,
    /// Emit a batch once its messages reach this many bytes (default
    /// 33554432, 32 MiB): what one batch and one read hold is bounded.
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

/// Incremental reading by a monotonically increasing column.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Incremental {
    /// The cursor column (e.g. `updated_at`).
    pub column: String,
    /// Re-read this far behind the watermark, so a row committed late with
    /// an older cursor value is still read (default `10m` for time columns;
    /// `0s` turns it off).
    #[serde(default)]
    pub lookback: Option<Duration>,
}

impl Incremental {
    /// The overlap when none is written.
    pub const DEFAULT_LOOKBACK: std::time::Duration = std::time::Duration::from_secs(600);

    /// How far behind the watermark a run reads again.
    pub fn lookback(&self) -> std::time::Duration {
        self.lookback.as_ref().map_or(Self::DEFAULT_LOOKBACK, Duration::get)
    }
}

/// A column in a `schema:`: a type name, or the long form.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ColumnSpec {
    /// `string`, `bool`, `int32`, `int64`, `float64`, `decimal(p,s)`, `date`, `timestamp`.
    Type(String),
    Long(ColumnLong),
}

/// A column's long form.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ColumnLong {
    /// The column type.
    #[serde(rename = "type")]
    pub data_type: String,
    /// Rows without a value are rejected (dead letter in streams).
    #[serde(default)]
    pub required: bool,
    /// Dotted path in the document (MongoDB, JSON); defaults to the column name.
    #[serde(default)]
    pub path: Option<String>,
    /// A `float64` column that takes NaN and the infinities (the JSON
    /// strings `"NaN"`, `"Infinity"`, `"-Infinity"`, and numbers beyond
    /// float64's range); without it they are refused.
    #[serde(default)]
    pub non_finite: bool,
}

impl ColumnSpec {
    pub fn data_type(&self) -> &str {
        match self {
            ColumnSpec::Type(t) => t,
            ColumnSpec::Long(l) => &l.data_type,
        }
    }

    pub fn required(&self) -> bool {
        matches!(self, ColumnSpec::Long(l) if l.required)
    }

    pub fn non_finite(&self) -> bool {
        matches!(self, ColumnSpec::Long(l) if l.non_finite)
    }

    pub fn path<'a>(&'a self, name: &'a str) -> &'a str {
        match self {
            ColumnSpec::Long(ColumnLong { path: Some(p), .. }) => p,
            _ => name,
        }
    }
}

impl<'de> Deserialize<'de> for ColumnSpec {
    // Hand-written rather than `untagged`: serde's untagged enums buffer the
    // input and lose the YAML positions and the string-to-bool reading that
    // `required: true` needs.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ColumnSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a type name or { type, required, path, non_finite }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ColumnSpec, E> {
                Ok(ColumnSpec::Type(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ColumnSpec, A::Error> {
                use serde::de::Error;
                const KEYS: &[&str] = &["type", "required", "path", "non_finite"];
                let mut long =
                    ColumnLong { data_type: String::new(), required: false, path: None, non_finite: false };
                let mut has_type = false;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "type" => {
                            long.data_type = map.next_value()?;
                            has_type = true;
                        }
                        "required" => long.required = map.next_value()?,
                        "path" => long.path = Some(map.next_value()?),
                        "non_finite" => long.non_finite = map.next_value()?,
                        other => return Err(A::Error::unknown_field(other, KEYS)),
                    }
                }
                if !has_type {
                    return Err(A::Error::missing_field("type"));
                }
                Ok(ColumnSpec::Long(long))
            }
        }
        d.deserialize_any(V)
    }
}

// ----------------------------------------------------------------- transforms

/// A SQL or rules transform, chosen by the key it carries.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Transform {
    Sql(SqlTransform),
    Rules(RulesTransform),
}

impl Transform {
    pub fn checks(&self) -> &[Check] {
        match self {
            Transform::Sql(t) => &t.checks,
            Transform::Rules(t) => &t.checks,
        }
    }
}

/// DataFusion SQL over upstream node ids used as table names.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlTransform {
    /// One SELECT (CTEs allowed). Its inputs are the node ids it names as tables.
    pub sql: Sp<String>,
    /// Optional list of inputs; must agree with the tables the SQL reads.
    #[serde(default)]
    pub inputs: Option<Vec<Sp<String>>>,
    /// What this node computes, for people and `engine graph`.
    #[serde(default)]
    pub description: Option<String>,
    /// Data-quality checks on this node's output.
    #[serde(default)]
    pub checks: Vec<Check>,
}

/// Evaluates rule files over each input row; one output row per rule that fired.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RulesTransform {
    /// The upstream node.
    pub input: Sp<String>,
    /// A rule file, a folder of them, or a glob; relative to the spec file.
    pub rules: Sp<String>,
    /// The event id column, part of each alert's stable `alert_id`.
    pub key: Sp<String>,
    /// Reload rule files when they change (default: true in stream mode).
    #[serde(default)]
    pub reload: Option<bool>,
    /// Batch runs: evaluate the rules in `mode: shadow` too, their rows in
    /// the output like the live ones' (a backtest). `engine test` always does.
    #[serde(default)]
    pub shadow: Option<bool>,
    /// What this node decides, for people and `engine graph`.
    #[serde(default)]
    pub description: Option<String>,
    /// Data-quality checks on this node's output.
    #[serde(default)]
    pub checks: Vec<Check>,
}

// --------------------------------------------------------------------- checks

/// What a failing check does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The run stops before any sink writes (exit status 1).
    #[default]
    Error,
    /// Reported; rows flow on unchanged.
    Warn,
}

/// What happens to the rows that fail a check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnFail {
    /// The check fails by `severity`.
    #[default]
    Fail,
    /// Failing rows go to the `quarantine` table; the check fails only past `max_failures`.
    Quarantine,
}

/// One or several column names.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Columns {
    One(String),
    Many(Vec<String>),
}

impl Columns {
    pub fn names(&self) -> Vec<&str> {
        match self {
            Columns::One(c) => vec![c.as_str()],
            Columns::Many(cs) => cs.iter().map(String::as_str).collect(),
        }
    }
}

/// Declares a check's long-form struct with the options every check shares.
macro_rules! check_struct {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $ty,)*
            /// `error` (default) stops the run; `warn` only reports.
            #[serde(default)]
            pub severity: Severity,
            /// `quarantine` moves failing rows to the quarantine table.
            #[serde(default)]
            pub on_fail: OnFail,
            /// With `on_fail: quarantine`: how many failing rows are tolerated,
            /// as a count (`10`) or a share of the rows (`"0.5%"`).
            #[serde(default)]
            pub max_failures: Option<MaxFailures>,
            /// A name for reports; defaults to the check's kind.
            #[serde(default)]
            pub name: Option<String>,
        }
    };
}

check_struct!(
    /// The columns are never NULL.
    NotNullCheck {
        /// One column or a list.
        columns: Columns,
    }
);
check_struct!(
    /// The columns (together) never repeat.
    UniqueCheck {
        /// One column or a list.
        columns: Columns,
    }
);
check_struct!(
    /// The column only holds the listed values.
    AcceptedValuesCheck {
        /// The column.
        column: String,
        /// The accepted values.
        values: Vec<Data>,
    }
);
check_struct!(
    /// The column lies within `min` and `max` (inclusive).
    RangeCheck {
        /// The column.
        column: String,
        /// Lowest accepted value.
        #[serde(default)]
        min: Option<f64>,
        /// Highest accepted value.
        #[serde(default)]
        max: Option<f64>,
    }
);
check_struct!(
    /// Every value of `column` exists in `to` (`node.column`).
    RelationshipsCheck {
        /// The referencing column.
        column: String,
        /// The referenced `node.column`.
        to: Sp<String>,
    }
);
check_struct!(
    /// The number of rows lies within `min` and `max`.
    RowCountCheck {
        /// Fewest rows accepted.
        #[serde(default)]
        min: Option<u64>,
        /// Most rows accepted.
        #[serde(default)]
        max: Option<u64>,
    }
);
check_struct!(
    /// The number of rows is close to the last successful run's (read from
    /// the run history on the `state:` connection): at most `max_drop` fewer
    /// and at most `max_growth` more.
    VolumeCheck {
        /// The largest accepted drop (`50%`).
        #[serde(default)]
        max_drop: Option<Percent>,
        /// The largest accepted growth (`200%`).
        #[serde(default)]
        max_growth: Option<Percent>,
    }
);
check_struct!(
    /// A SQL boolean expression holds for every row.
    ExpressionCheck {
        /// The expression, over the node's columns.
        sql: Sp<String>,
    }
);
check_struct!(
    /// The newest value of a timestamp column is recent enough.
    FreshnessCheck {
        /// A timestamp column.
        column: String,
        /// How old the newest row may be (`1d`, `6h`).
        max_age: Duration,
    }
);

/// A check in short form (`unique: id`) or long form (`unique: { columns: id, severity: warn }`).
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ShortOr<T> {
    Columns(Columns),
    Long(T),
}

/// One data-quality check: a mapping with exactly one key, the check's kind.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    NotNull(NotNullCheck),
    Unique(UniqueCheck),
    AcceptedValues(AcceptedValuesCheck),
    Range(RangeCheck),
    Relationships(RelationshipsCheck),
    RowCount(RowCountCheck),
    Expression(ExpressionCheck),
    Freshness(FreshnessCheck),
    Volume(VolumeCheck),
}

impl<'de> Deserialize<'de> for Check {
    // Checks are read by `spec::load`, which needs the YAML node to accept the
    // short forms with positions; a plain serde read is not supported.
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom("checks are read by the spec loader"))
    }
}

impl Check {
    pub const KINDS: &'static [&'static str] = &[
        "not_null",
        "unique",
        "accepted_values",
        "range",
        "relationships",
        "row_count",
        "expression",
        "freshness",
        "volume",
    ];

    /// The check's kind as written in YAML.
    pub fn kind(&self) -> &'static str {
        let i = match self {
            Check::NotNull(_) => 0,
            Check::Unique(_) => 1,
            Check::AcceptedValues(_) => 2,
            Check::Range(_) => 3,
            Check::Relationships(_) => 4,
            Check::RowCount(_) => 5,
            Check::Expression(_) => 6,
            Check::Freshness(_) => 7,
            Check::Volume(_) => 8,
        };
        Self::KINDS[i]
    }

    /// The columns of the checked node this check reads.
    pub fn columns(&self) -> Vec<&str> {
        match self {
            Check::NotNull(c) => c.columns.names(),
            Check::Unique(c) => c.columns.names(),
            Check::AcceptedValues(c) => vec![&c.column],
            Check::Range(c) => vec![&c.column],
            Check::Relationships(c) => vec![&c.column],
            Check::Freshness(c) => vec![&c.column],
            Check::RowCount(_) | Check::Expression(_) | Check::Volume(_) => vec![],
        }
    }

    /// `unique(customer_id)`, for graphs and reports.
    pub fn label(&self) -> String {
        let cols = self.columns();
        match self {
            Check::RowCount(c) => match (c.min, c.max) {
                (Some(a), Some(b)) => format!("row_count({a}..{b})"),
                (Some(a), None) => format!("row_count(>= {a})"),
                (None, Some(b)) => format!("row_count(<= {b})"),
                (None, None) => "row_count".to_string(),
            },
            Check::Expression(c) => {
                c.name.clone().unwrap_or_else(|| format!("expression({})", c.sql.value()))
            }
            Check::Relationships(c) => format!("relationships({} -> {})", c.column, c.to.value()),
            Check::Volume(c) => {
                let bound = |p: &Option<Percent>| p.as_ref().map_or("..".to_string(), |p| p.to_string());
                format!("volume(-{}, +{})", bound(&c.max_drop), bound(&c.max_growth))
            }
            _ => format!("{}({})", self.kind(), cols.join(", ")),
        }
    }

    /// The options every check shares.
    pub fn options(&self) -> CheckOptions<'_> {
        macro_rules! opts {
            ($($v:ident),*) => {
                match self {
                    $(Check::$v(c) => CheckOptions {
                        severity: c.severity,
                        on_fail: c.on_fail,
                        max_failures: c.max_failures,
                        name: c.name.as_deref(),
                    },)*
                }
            };
        }
        opts!(NotNull, Unique, AcceptedValues, Range, Relationships, RowCount, Expression, Freshness, Volume)
    }

    /// The name reports use: `name:`, else the kind.
    pub fn name(&self) -> &str {
        self.options().name.unwrap_or(self.kind())
    }
}

/// The options every check shares, borrowed from a [`Check`].
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions<'a> {
    pub severity: Severity,
    pub on_fail: OnFail,
    pub max_failures: Option<MaxFailures>,
    pub name: Option<&'a str>,
}

// ---------------------------------------------------------------------- sinks

/// Where data goes: the kind's settings.
#[derive(Debug, Clone)]
pub struct Sink {
    /// The kind (`type:`, or the type of its connection).
    pub kind: &'static str,
    /// What this node writes, for people.
    pub description: Option<String>,
    pub settings: Arc<dyn SinkSettings>,
}

impl Sink {
    pub fn input(&self) -> &Sp<String> {
        self.settings.input()
    }

    pub fn connection(&self) -> Option<&Sp<String>> {
        self.settings.connection()
    }

    /// The settings as the connector's own type.
    pub fn settings<T: 'static>(&self) -> Option<&T> {
        self.settings.as_any().downcast_ref()
    }
}

/// How a sink writes into an existing table or collection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// Add the rows.
    #[default]
    Append,
    /// Replace all rows with this run's rows.
    Replace,
    /// Insert new keys, update existing ones (needs `key`).
    Upsert,
}

// ---------------------------------------------------------- quarantine, state

/// The table quarantined rows go to.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Quarantine {
    /// A connection of type `postgres`.
    pub connection: Sp<String>,
    /// The table.
    pub table: String,
}

/// Where watermarks of incremental sources are kept.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateStore {
    /// A connection of type `postgres`.
    pub connection: Sp<String>,
    /// The watermarks' table; created by the engine's migrations.
    #[serde(default = "default_state_table")]
    pub table: String,
    /// The run history: one row per `engine run`; created by the engine
    /// when it is missing.
    #[serde(default = "default_runs_table")]
    pub runs: String,
}

fn default_state_table() -> String {
    "etl_state".to_string()
}

fn default_runs_table() -> String {
    "etl_runs".to_string()
}

// ---------------------------------------------------------------------- tests

/// A test run by `engine test`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpecTest {
    /// What the test shows.
    pub name: String,
    /// Rows that replace the named sources.
    pub given: IndexMap<Sp<String>, Vec<Data>>,
    /// Expected outputs of the named nodes.
    pub expect: IndexMap<Sp<String>, Expectation>,
}

/// What a node is expected to output.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    /// Expected rows; only the listed columns are compared, in any order.
    #[serde(default)]
    pub rows: Option<Vec<Data>>,
    /// Expected number of rows.
    #[serde(default)]
    pub count: Option<u64>,
    /// The node's check of this kind (or name) is expected to fail.
    #[serde(default)]
    pub fails_check: Option<String>,
}
