//! The settings of the http sink and their checks.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::connector::{Context, SinkSettings};
use crate::spec::values::Duration;
use crate::spec::yaml::Sp;

/// The HTTP method of each request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    #[default]
    Post,
    Put,
}

/// What one request carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// A JSON array of the batch's rows.
    #[default]
    Batch,
    /// One JSON object: one request per row.
    Row,
}

/// Sends rows as JSON to an HTTP endpoint (a webhook: chat, paging, case
/// management). A 5xx answer or a connection error is retried with backoff;
/// a 4xx answer means the endpoint refuses those rows: they go to
/// `dead_letter` with the status and the answer, and the rest goes on.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSink {
    /// The upstream node.
    pub input: Sp<String>,
    /// `http://host:port/path`. Secrets in it come through `{{ env.NAME }}`.
    pub url: Sp<String>,
    /// `POST` (default) or `PUT`.
    #[serde(default)]
    pub method: Method,
    /// `batch`: one request per micro-batch (a JSON array); `row`: one per row.
    #[serde(default)]
    pub per: Per,
    /// Headers of every request, e.g. `Authorization: "Bearer {{ env.TOKEN }}"`.
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// How long one request may take (default `10s`).
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Attempts after the first for a 5xx answer or a connection error in a
    /// batch run (default 5); a stream retries until the endpoint is back.
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// A file (JSON lines, relative to the spec) for requests the endpoint
    /// refused with a 4xx answer: status, answer and rows. Without it they are
    /// logged and counted.
    #[serde(default)]
    pub dead_letter: Option<Sp<String>>,
}

crate::spec::connector::settings!(HttpSink);

/// The endpoint as messages and graphs show it: its host only, since a
/// webhook's path often carries its secret (`/hooks/T0/B0/secret`).
pub fn host(url: &str) -> String {
    let url = crate::spec::redact::redact_url(url);
    url.split("://").nth(1).and_then(|r| r.split('/').next()).unwrap_or(&url).to_string()
}

impl SinkSettings for HttpSink {
    fn input(&self) -> &Sp<String> {
        &self.input
    }

    fn connection(&self) -> Option<&Sp<String>> {
        None
    }

    fn detail(&self) -> String {
        let host = host(self.url.value());
        let method = match self.method {
            Method::Post => "POST",
            Method::Put => "PUT",
        };
        format!("{method} {host}")
    }

    fn check(&self, cx: &mut Context) {
        match reqwest::Url::parse(self.url.value()) {
            Ok(u) if u.scheme() == "http" => {}
            Ok(u) => cx.error(
                self.url.pos(),
                format!("url: scheme '{}' is not supported; the http sink speaks plain 'http'", u.scheme()),
            ),
            Err(e) => cx.error(self.url.pos(), format!("url: bad URL: {e}")),
        }
        for name in self.headers.keys() {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                cx.error_here(format!("headers: '{name}' is not a valid header name"));
            }
        }
    }
}
