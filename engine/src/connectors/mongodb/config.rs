//! The settings of mongodb connections, sources and sinks, and their checks
//! that need no connection.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::connector::{ConnectionSettings, Context, SinkSettings, SourceSettings};
use crate::spec::model::{ColumnSpec, WriteMode};
use crate::spec::yaml::{Data, Sp};

/// A MongoDB (or MongoDB-wire) server.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MongoConnection {
    /// `mongodb://host:port`.
    pub url: String,
    /// The database collections are read from and written to.
    pub database: String,
}

/// Documents of a MongoDB collection, flattened by `schema`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MongoSource {
    /// A connection of type `mongodb`.
    pub connection: Sp<String>,
    /// The collection to read.
    pub collection: String,
    /// A MongoDB query document selecting the documents.
    #[serde(default)]
    pub filter: Option<Data>,
    /// Output columns, their types and the dotted paths they come from.
    pub schema: IndexMap<String, ColumnSpec>,
}

/// Writes documents into a MongoDB collection.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MongoSink {
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
}

crate::spec::connector::settings!(MongoConnection, MongoSource, MongoSink);

impl ConnectionSettings for MongoConnection {
    fn url(&self) -> &str {
        &self.url
    }
}

impl SourceSettings for MongoSource {
    fn connection(&self) -> Option<&Sp<String>> {
        Some(&self.connection)
    }

    fn declared_schema(&self) -> Option<&IndexMap<String, ColumnSpec>> {
        Some(&self.schema)
    }

    fn detail(&self) -> String {
        format!("{}.{}", self.connection.value(), self.collection)
    }

    fn check(&self, cx: &mut Context) {
        if self.schema.is_empty() {
            cx.error_here("'schema' needs at least one column");
        }
    }
}

impl SinkSettings for MongoSink {
    fn input(&self) -> &Sp<String> {
        &self.input
    }

    fn connection(&self) -> Option<&Sp<String>> {
        Some(&self.connection)
    }

    fn detail(&self) -> String {
        format!("{}.{} ({:?})", self.connection.value(), self.collection, self.mode).to_lowercase()
    }

    fn check(&self, cx: &mut Context) {
        cx.write_mode(self.mode, self.key.as_deref());
    }
}
