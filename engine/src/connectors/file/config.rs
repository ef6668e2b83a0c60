//! The settings of file sources and sinks.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::connector::{Context, SinkSettings, SourceSettings};
use crate::spec::model::ColumnSpec;
use crate::spec::yaml::Sp;

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
    /// A path or glob, relative to the spec file.
    pub path: Sp<String>,
    /// `csv`, `json` or `parquet`.
    pub format: FileFormat,
    /// Column types; inferred from the files when omitted.
    #[serde(default)]
    pub schema: Option<IndexMap<String, ColumnSpec>>,
}

/// Writes a CSV, JSON or Parquet file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSink {
    /// The upstream node.
    pub input: Sp<String>,
    /// The file to write, relative to the spec file.
    pub path: Sp<String>,
    /// `csv`, `json` or `parquet`.
    pub format: FileFormat,
}

crate::spec::connector::settings!(FileSource, FileSink);

impl SourceSettings for FileSource {
    fn connection(&self) -> Option<&Sp<String>> {
        None
    }

    fn declared_schema(&self) -> Option<&IndexMap<String, ColumnSpec>> {
        self.schema.as_ref()
    }

    fn detail(&self) -> String {
        self.path.value().clone()
    }

    fn check(&self, _cx: &mut Context) {}
}

impl SinkSettings for FileSink {
    fn input(&self) -> &Sp<String> {
        &self.input
    }

    fn connection(&self) -> Option<&Sp<String>> {
        None
    }

    fn detail(&self) -> String {
        self.path.value().clone()
    }

    fn check(&self, _cx: &mut Context) {}
}
