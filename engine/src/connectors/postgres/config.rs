//! The settings of postgres connections, sources and sinks, as users write
//! them (see `docs/reference.md`), and their checks that need no connection.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::connector::{ConnectionSettings, Context, SinkSettings, SourceSettings};
use crate::spec::model::{ColumnSpec, Incremental, Mode, WriteMode};
use crate::spec::yaml::Sp;

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

/// Rows of a PostgreSQL table or query.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresSource {
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
    /// The columns, as declared (optional): each is read by name and cast to
    /// its type, so SQL over the source is planned without connecting (a
    /// stream's lookup tables). Without it, the columns are the table's.
    #[serde(default)]
    pub schema: Option<IndexMap<String, ColumnSpec>>,
}

/// Bulk load into a PostgreSQL table.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresSink {
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
}

crate::spec::connector::settings!(PostgresConnection, PostgresSource, PostgresSink);

impl ConnectionSettings for PostgresConnection {
    fn url(&self) -> &str {
        &self.url
    }

    fn check(&self, cx: &mut Context) {
        if let Some(m) = &self.migrations {
            if !cx.spec.resolve(m.value()).is_dir() {
                cx.error(m.pos(), format!("migrations folder '{}' does not exist", m.value()));
            }
        }
    }
}

impl SourceSettings for PostgresSource {
    fn connection(&self) -> Option<&Sp<String>> {
        Some(&self.connection)
    }

    fn declared_schema(&self) -> Option<&IndexMap<String, ColumnSpec>> {
        self.schema.as_ref()
    }

    fn incremental(&self) -> Option<&Incremental> {
        self.incremental.as_ref()
    }

    fn detail(&self) -> String {
        let what = self.table.as_ref().map(|t| t.value().clone()).unwrap_or_else(|| "query".into());
        format!("{}.{what}", self.connection.value())
    }

    fn check(&self, cx: &mut Context) {
        if self.table.is_some() == self.query.is_some() {
            cx.error_here("give either 'table' or 'query'");
        }
        if self.incremental.is_some() && cx.spec.pipeline.state.is_none() {
            cx.error_here("'incremental' needs a 'state:' section to keep watermarks in");
        }
    }
}

impl SinkSettings for PostgresSink {
    fn input(&self) -> &Sp<String> {
        &self.input
    }

    fn connection(&self) -> Option<&Sp<String>> {
        Some(&self.connection)
    }

    fn detail(&self) -> String {
        format!("{}.{} ({:?})", self.connection.value(), self.table, self.mode).to_lowercase()
    }

    fn check(&self, cx: &mut Context) {
        cx.write_mode(self.mode, self.key.as_deref());
        if cx.mode() == Mode::Stream && self.mode == WriteMode::Replace {
            cx.error_here("'mode: replace' rewrites the whole table; a stream sink appends or upserts");
        }
    }
}
