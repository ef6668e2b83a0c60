//! The pipeline language as Rust types: a faithful mirror of the YAML a user
//! writes, with no behaviour. `engine schema` derives the JSON Schema from these
//! same structs, so every `///` comment here is user documentation.
//!
//! Nodes of several kinds (sources, transforms, sinks, checks) are read by
//! [`super::load`], which picks the kind first and then reads the matching
//! struct, so that each kind rejects keys that belong to another.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::yaml::{Data, Sp};

/// A pipeline file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
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

/// The kinds of systems a connection can point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionType {
    Postgres,
    Mongodb,
    Redis,
}

impl ConnectionType {
    pub const NAMES: &'static [&'static str] = &["postgres", "mongodb", "redis"];

    pub fn name(self) -> &'static str {
        match self {
            ConnectionType::Postgres => "postgres",
            ConnectionType::Mongodb => "mongodb",
            ConnectionType::Redis => "redis",
        }
    }
}

/// A named endpoint; `type` selects the system.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Connection {
    Postgres(PostgresConnection),
    Mongodb(MongoConnection),
    Redis(RedisConnection),
}

impl Connection {
    pub fn kind(&self) -> ConnectionType {
        match self {
            Connection::Postgres(_) => ConnectionType::Postgres,
            Connection::Mongodb(_) => ConnectionType::Mongodb,
            Connection::Redis(_) => ConnectionType::Redis,
        }
    }

    pub fn url(&self) -> &str {
        match self {
            Connection::Postgres(c) => &c.url,
            Connection::Mongodb(c) => &c.url,
            Connection::Redis(c) => &c.url,
        }
    }
}

/// A PostgreSQL database.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresConnection {
    /// `postgres://user:password@host:port/database`.
    pub url: String,
    /// A folder of `NNN_name.sql` files applied in order, once each, before a run.
    /// Relative to the spec file.
    #[serde(default)]
    pub migrations: Option<Sp<String>>,
}

/// A MongoDB (or MongoDB-wire) server.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MongoConnection {
    /// `mongodb://host:port`.
    pub url: String,
    /// The database collections are read from and written to.
    pub database: String,
}

/// A Redis server.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisConnection {
    /// `redis://host:port`.
    pub url: String,
}

// -------------------------------------------------------------------- sources

/// The kinds of source and sink nodes; `type:` on a node, or its connection's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeType {
    Postgres,
    Mongodb,
    Redis,
    File,
    Generate,
    Stdout,
}

impl NodeType {
    pub const NAMES: &'static [&'static str] =
        &["postgres", "mongodb", "redis", "file", "generate", "stdout"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "postgres" => NodeType::Postgres,
            "mongodb" => NodeType::Mongodb,
            "redis" => NodeType::Redis,
            "file" => NodeType::File,
            "generate" => NodeType::Generate,
            "stdout" => NodeType::Stdout,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn of_connection(t: ConnectionType) -> Self {
        match t {
            ConnectionType::Postgres => NodeType::Postgres,
            ConnectionType::Mongodb => NodeType::Mongodb,
            ConnectionType::Redis => NodeType::Redis,
        }
    }
}

/// Where data comes from.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Source {
    Postgres(PostgresSource),
    Mongodb(MongoSource),
    File(FileSource),
    Redis(RedisSource),
    Generate(GenerateSource),
}

impl Source {
    pub fn checks(&self) -> &[Check] {
        match self {
            Source::Postgres(s) => &s.checks,
            Source::Mongodb(s) => &s.checks,
            Source::File(s) => &s.checks,
            Source::Redis(s) => &s.checks,
            Source::Generate(s) => &s.checks,
        }
    }

    pub fn kind(&self) -> NodeType {
        match self {
            Source::Postgres(_) => NodeType::Postgres,
            Source::Mongodb(_) => NodeType::Mongodb,
            Source::File(_) => NodeType::File,
            Source::Redis(_) => NodeType::Redis,
            Source::Generate(_) => NodeType::Generate,
        }
    }

    pub fn connection(&self) -> Option<&Sp<String>> {
        match self {
            Source::Postgres(s) => Some(&s.connection),
            Source::Mongodb(s) => Some(&s.connection),
            Source::Redis(s) => Some(&s.connection),
            Source::File(_) | Source::Generate(_) => None,
        }
    }

    pub fn declared_schema(&self) -> Option<&IndexMap<String, ColumnSpec>> {
        match self {
            Source::Mongodb(s) => Some(&s.schema),
            Source::File(s) => s.schema.as_ref(),
            Source::Redis(s) => Some(&s.schema),
            Source::Postgres(_) | Source::Generate(_) => None,
        }
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
    pub max_wait: Option<String>,
}

/// Rows of a PostgreSQL table or query.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresSource {
    /// Optional; must be `postgres` when given.
    #[serde(default, rename = "type")]
    pub kind: Option<NodeType>,
    /// A connection of type `postgres`.
    pub connection: Sp<String>,
    /// The table to read (`schema.table` allowed). Either this or `query`.
    #[serde(default)]
    pub table: Option<Sp<String>>,
    /// A SELECT to run instead of reading a table.
    #[serde(default)]
    pub query: Option<Sp<String>>,
    /// Read only rows whose `column` is above the stored watermark.
    #[serde(default)]
    pub incremental: Option<Incremental>,
    /// What this node reads, for people and `engine graph`.
    #[serde(default)]
    pub description: Option<String>,
    /// Micro-batching.
    #[serde(default)]
    pub batch: Option<BatchSpec>,
    /// Data-quality checks on this node's output.
    #[serde(default)]
    pub checks: Vec<Check>,
}

/// Incremental reading by a monotonically increasing column.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Incremental {
    /// The cursor column (e.g. `updated_at`).
    pub column: String,
    /// Re-read this far behind the watermark, for late commits (`10m`).
    #[serde(default)]
    pub lookback: Option<String>,
}

/// Documents of a MongoDB collection, flattened by `schema`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MongoSource {
    /// Optional; must be `mongodb` when given.
    #[serde(default, rename = "type")]
    pub kind: Option<NodeType>,
    /// A connection of type `mongodb`.
    pub connection: Sp<String>,
    /// The collection to read.
    pub collection: String,
    /// A MongoDB query document selecting the documents.
    #[serde(default)]
    pub filter: Option<Data>,
    /// Output columns, their types and the dotted paths they come from.
    pub schema: IndexMap<String, ColumnSpec>,
    /// What this node reads, for people and `engine graph`.
    #[serde(default)]
    pub description: Option<String>,
    /// Micro-batching.
    #[serde(default)]
    pub batch: Option<BatchSpec>,
    /// Data-quality checks on this node's output.
    #[serde(default)]
    pub checks: Vec<Check>,
}

/// Formats of file sources and sinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Csv,
    Json,
    Parquet,
}

/// Rows of CSV, JSON (one object per line) or Parquet files.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    /// Must be `file`.
    #[serde(rename = "type")]
    pub kind: Option<NodeType>,
    /// A path or glob, relative to the spec file.
    pub path: Sp<String>,
    /// `csv`, `json` or `parquet`.
    pub format: FileFormat,
    /// Column types; inferred from the files when omitted.
    #[serde(default)]
    pub schema: Option<IndexMap<String, ColumnSpec>>,
    /// What this node reads, for people and `engine graph`.
    #[serde(default)]
    pub description: Option<String>,
    /// Micro-batching.
    #[serde(default)]
    pub batch: Option<BatchSpec>,
    /// Data-quality checks on this node's output.
    #[serde(default)]
    pub checks: Vec<Check>,
}

/// Where malformed stream messages go.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    /// A Redis stream on the source's connection.
    #[serde(default)]
    pub stream: Option<String>,
    /// A connection of type `postgres`, with `table`.
    #[serde(default)]
    pub connection: Option<Sp<String>>,
    /// A table on `connection`.
    #[serde(default)]
    pub table: Option<String>,
}

/// Message formats of stream sources and sinks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageFormat {
    #[default]
    Json,
}

/// Events from Redis Pub/Sub (`channel`) or a Redis Stream (`stream` + `group`).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisSource {
    /// Optional; must be `redis` when given.
    #[serde(default, rename = "type")]
    pub kind: Option<NodeType>,
    /// A connection of type `redis`.
    pub connection: Sp<String>,
    /// A Pub/Sub channel (at-most-once). Either this or `stream`.
    #[serde(default)]
    pub channel: Option<String>,
    /// A Redis Stream (at-least-once with `group`).
    #[serde(default)]
    pub stream: Option<String>,
    /// The consumer group (streams).
    #[serde(default)]
    pub group: Option<String>,
    /// This process's consumer name in the group; defaults to host and pid.
    #[serde(default)]
    pub consumer: Option<String>,
    /// The stream entry field holding the message.
    #[serde(default = "default_payload_field")]
    pub field: String,
    /// Message format.
    #[serde(default)]
    pub format: MessageFormat,
    /// Columns of the decoded events.
    pub schema: IndexMap<String, ColumnSpec>,
    /// Where malformed messages and entries past `max_deliveries` go.
    #[serde(default)]
    pub dead_letter: Option<DeadLetter>,
    /// Deliveries of one stream entry before it goes to the dead letter (default 5).
    #[serde(default)]
    pub max_deliveries: Option<u32>,
    /// Entries another consumer has left pending this long are claimed (default `30s`).
    #[serde(default)]
    pub reclaim_after: Option<String>,
    /// Larger messages go to the dead letter (default 1048576).
    #[serde(default)]
    pub max_message_bytes: Option<u64>,
    /// What this node reads, for people and `engine graph`.
    #[serde(default)]
    pub description: Option<String>,
    /// Micro-batching.
    #[serde(default)]
    pub batch: Option<BatchSpec>,
    /// Data-quality checks on this node's output.
    #[serde(default)]
    pub checks: Vec<Check>,
}

fn default_payload_field() -> String {
    "payload".to_string()
}

/// Synthetic rows: `rows` of them (batch) or `rate` per second (stream).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateSource {
    /// Must be `generate`.
    #[serde(rename = "type")]
    pub kind: Option<NodeType>,
    /// How many rows (batch mode).
    #[serde(default)]
    pub rows: Option<u64>,
    /// Rows per second (stream mode), e.g. `5000/s`.
    #[serde(default)]
    pub rate: Option<Sp<String>>,
    /// The same seed gives the same rows.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Output columns as SQL expressions over the row number `n`.
    pub columns: IndexMap<String, Sp<String>>,
    /// What this node makes, for people and `engine graph`.
    #[serde(default)]
    pub description: Option<String>,
    /// Micro-batching.
    #[serde(default)]
    pub batch: Option<BatchSpec>,
    /// Data-quality checks on this node's output.
    #[serde(default)]
    pub checks: Vec<Check>,
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
                f.write_str("a type name or { type, required, path }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ColumnSpec, E> {
                Ok(ColumnSpec::Type(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ColumnSpec, A::Error> {
                use serde::de::Error;
                const KEYS: &[&str] = &["type", "required", "path"];
                let mut long = ColumnLong { data_type: String::new(), required: false, path: None };
                let mut has_type = false;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "type" => {
                            long.data_type = map.next_value()?;
                            has_type = true;
                        }
                        "required" => long.required = map.next_value()?,
                        "path" => long.path = Some(map.next_value()?),
                        tail if is_split_decimal(&long.data_type, tail) => {
                            // `{ type: decimal(12,2) }` is split by YAML at the
                            // comma of a flow mapping into `decimal(12` and a
                            // key `2)`; put the type back together.
                            let _: serde::de::IgnoredAny = map.next_value()?;
                            long.data_type = format!("{},{tail}", long.data_type);
                        }
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

fn is_split_decimal(head: &str, tail: &str) -> bool {
    head.starts_with("decimal(")
        && !head.ends_with(')')
        && tail
            .strip_suffix(')')
            .is_some_and(|d| !d.is_empty() && d.trim().chars().all(|c| c.is_ascii_digit()))
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
            pub max_failures: Option<String>,
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
        max_age: String,
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
            Check::RowCount(_) | Check::Expression(_) => vec![],
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
                        max_failures: c.max_failures.as_deref(),
                        name: c.name.as_deref(),
                    },)*
                }
            };
        }
        opts!(NotNull, Unique, AcceptedValues, Range, Relationships, RowCount, Expression, Freshness)
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
    pub max_failures: Option<&'a str>,
    pub name: Option<&'a str>,
}

// ---------------------------------------------------------------------- sinks

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

/// Where data goes.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Sink {
    Postgres(PostgresSink),
    Mongodb(MongoSink),
    Redis(RedisSink),
    File(FileSink),
    Stdout(StdoutSink),
}

impl Sink {
    pub fn input(&self) -> &Sp<String> {
        match self {
            Sink::Postgres(s) => &s.input,
            Sink::Mongodb(s) => &s.input,
            Sink::Redis(s) => &s.input,
            Sink::File(s) => &s.input,
            Sink::Stdout(s) => &s.input,
        }
    }

    pub fn kind(&self) -> NodeType {
        match self {
            Sink::Postgres(_) => NodeType::Postgres,
            Sink::Mongodb(_) => NodeType::Mongodb,
            Sink::Redis(_) => NodeType::Redis,
            Sink::File(_) => NodeType::File,
            Sink::Stdout(_) => NodeType::Stdout,
        }
    }

    pub fn connection(&self) -> Option<&Sp<String>> {
        match self {
            Sink::Postgres(s) => Some(&s.connection),
            Sink::Mongodb(s) => Some(&s.connection),
            Sink::Redis(s) => Some(&s.connection),
            Sink::File(_) | Sink::Stdout(_) => None,
        }
    }
}

/// Bulk load into a PostgreSQL table.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresSink {
    /// Optional; must be `postgres` when given.
    #[serde(default, rename = "type")]
    pub kind: Option<NodeType>,
    /// The upstream node.
    pub input: Sp<String>,
    /// A connection of type `postgres`.
    pub connection: Sp<String>,
    /// The target table (`schema.table` allowed).
    pub table: String,
    /// `append`, `replace` or `upsert`.
    #[serde(default)]
    pub mode: WriteMode,
    /// Key columns for `upsert`.
    #[serde(default)]
    pub key: Option<Vec<String>>,
    /// Create the table from the input's schema when it does not exist.
    #[serde(default)]
    pub create: bool,
    /// What this node writes, for people and `engine graph`.
    #[serde(default)]
    pub description: Option<String>,
}

/// Writes documents into a MongoDB collection.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MongoSink {
    /// Optional; must be `mongodb` when given.
    #[serde(default, rename = "type")]
    pub kind: Option<NodeType>,
    /// The upstream node.
    pub input: Sp<String>,
    /// A connection of type `mongodb`.
    pub connection: Sp<String>,
    /// The target collection.
    pub collection: String,
    /// `append`, `replace` or `upsert`.
    #[serde(default)]
    pub mode: WriteMode,
    /// Key fields for `upsert`.
    #[serde(default)]
    pub key: Option<Vec<String>>,
    /// What this node writes, for people and `engine graph`.
    #[serde(default)]
    pub description: Option<String>,
}

/// Publishes rows as JSON on a Redis channel or appends them to a stream.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisSink {
    /// Optional; must be `redis` when given.
    #[serde(default, rename = "type")]
    pub kind: Option<NodeType>,
    /// The upstream node.
    pub input: Sp<String>,
    /// A connection of type `redis`.
    pub connection: Sp<String>,
    /// PUBLISH to this channel. Either this or `stream`.
    #[serde(default)]
    pub channel: Option<String>,
    /// XADD to this stream, message in field `payload`.
    #[serde(default)]
    pub stream: Option<String>,
    /// Trim the stream to about this many entries.
    #[serde(default)]
    pub maxlen: Option<u64>,
    /// Message format.
    #[serde(default)]
    pub format: MessageFormat,
    /// What this node writes, for people and `engine graph`.
    #[serde(default)]
    pub description: Option<String>,
}

/// Writes a CSV, JSON or Parquet file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSink {
    /// Must be `file`.
    #[serde(rename = "type")]
    pub kind: Option<NodeType>,
    /// The upstream node.
    pub input: Sp<String>,
    /// The file to write, relative to the spec file.
    pub path: Sp<String>,
    /// `csv`, `json` or `parquet`.
    pub format: FileFormat,
    /// What this node writes, for people and `engine graph`.
    #[serde(default)]
    pub description: Option<String>,
}

/// How stdout prints rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StdoutFormat {
    #[default]
    Table,
    Json,
}

/// Prints rows to standard output.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdoutSink {
    /// Must be `stdout`.
    #[serde(rename = "type")]
    pub kind: Option<NodeType>,
    /// The upstream node.
    pub input: Sp<String>,
    /// `table` or `json` (one object per line).
    #[serde(default)]
    pub format: StdoutFormat,
    /// What this node shows, for people and `engine graph`.
    #[serde(default)]
    pub description: Option<String>,
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
    /// The table; created by the engine's migrations.
    #[serde(default = "default_state_table")]
    pub table: String,
}

fn default_state_table() -> String {
    "etl_state".to_string()
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
