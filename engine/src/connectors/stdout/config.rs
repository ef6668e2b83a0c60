//! The settings of the stdout sink.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::connector::{Context, SinkSettings};
use crate::spec::yaml::Sp;

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
    /// The upstream node.
    pub input: Sp<String>,
    /// `table` or `json` (one object per line).
    #[serde(default)]
    pub format: StdoutFormat,
}

crate::spec::connector::settings!(StdoutSink);

impl SinkSettings for StdoutSink {
    fn input(&self) -> &Sp<String> {
        &self.input
    }

    fn connection(&self) -> Option<&Sp<String>> {
        None
    }

    fn detail(&self) -> String {
        String::new()
    }

    fn check(&self, _cx: &mut Context) {}
}
