//! The settings of redis connections, sources and sinks, and their checks
//! that need no connection.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::connector::{ConnectionSettings, Context, SinkSettings, SourceSettings};
use crate::spec::model::ColumnSpec;
use crate::spec::values::Duration;
use crate::spec::yaml::Sp;

/// A Redis server.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisConnection {
    /// `redis://[user:password@]host:port[/db]`; `rediss://` for TLS.
    pub url: String,
    /// TLS settings of a `rediss://` URL.
    #[serde(default)]
    pub tls: Option<RedisTls>,
}

/// How a `rediss://` connection checks the server's certificate.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisTls {
    /// A PEM file of the certificate authorities to trust instead of the
    /// public ones (a private CA or a self-signed server). Relative to the
    /// spec file.
    pub ca_file: Sp<String>,
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
    /// With `stream`: the dead-letter stream is trimmed to this many
    /// entries, the oldest going first (default 100000).
    #[serde(default)]
    pub maxlen: Option<u64>,
}

/// The largest message a source takes when it does not say.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 65_536;

/// How far ahead of the engine's clock an event may be stamped, unless the
/// source says.
pub const DEFAULT_MAX_FUTURE: std::time::Duration = std::time::Duration::from_secs(300);

/// The entries a dead-letter stream keeps when its source does not say.
pub const DEFAULT_DEAD_LETTER_MAXLEN: u64 = 100_000;

/// What happens to an event stamped further ahead of the engine's clock
/// than `max_future`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFuture {
    /// Refused, to the dead letter: it moves no watermark.
    #[default]
    DeadLetter,
    /// Taken as stamped when it was read.
    Clamp,
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
    /// Partitions of the stream (default 1): partition `p` is the Redis
    /// stream `<stream>:<p>`; with 1, the plain `<stream>`.
    #[serde(default)]
    pub partitions: Option<u32>,
    /// The column whose value picks an event's partition: CRC-32 of its
    /// text (integers in decimal) modulo `partitions`.
    #[serde(default)]
    pub partition_by: Option<String>,
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
    pub reclaim_after: Option<Duration>,
    /// Larger messages go to the dead letter, cut to their first KiB with
    /// their length and SHA-256 (default 65536). They are never read whole.
    #[serde(default)]
    pub max_message_bytes: Option<u64>,
    /// An event stamped this far ahead of the engine's clock or more
    /// (default `5m`) goes to the dead letter, or is clamped (`on_future`):
    /// one far-future timestamp must not move a watermark.
    #[serde(default)]
    pub max_future: Option<Duration>,
    /// `dead_letter` (default) or `clamp`: an event from the future is
    /// taken as stamped when it was read.
    #[serde(default)]
    pub on_future: OnFuture,
    /// Without a `dead_letter`, refused messages are logged with their
    /// reason; `true` logs their payload too (transactions are personal
    /// data, so by default it is left out).
    #[serde(default)]
    pub log_payloads: bool,
}

fn default_payload_field() -> String {
    "payload".to_string()
}

/// Publishes rows as JSON on a Redis channel or appends them to a stream.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisSink {
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
    /// Trim the stream to about this many entries (each partition's).
    #[serde(default)]
    pub maxlen: Option<u64>,
    /// Partitions of the stream (default 1): a row goes to the Redis stream
    /// `<stream>:<p>`, `p` picked by `partition_by`, as a source reads them.
    #[serde(default)]
    pub partitions: Option<u32>,
    /// The column whose value picks a row's partition: CRC-32 of its text
    /// (integers in decimal) modulo `partitions`.
    #[serde(default)]
    pub partition_by: Option<String>,
    /// Message format.
    #[serde(default)]
    pub format: MessageFormat,
}

crate::spec::connector::settings!(RedisConnection, RedisSource, RedisSink);

impl ConnectionSettings for RedisConnection {
    fn url(&self) -> &str {
        &self.url
    }

    fn check(&self, cx: &mut Context) {
        if let Some(tls) = &self.tls {
            if !self.url.starts_with("rediss://") {
                cx.error(tls.ca_file.pos(), "'tls' applies to a 'rediss://' URL (Redis over TLS)");
            }
            let path = cx.spec.resolve(tls.ca_file.value());
            if !path.is_file() {
                cx.error(tls.ca_file.pos(), format!("'tls.ca_file' {} is not a file", path.display()));
            }
        }
    }
}

impl SourceSettings for RedisSource {
    fn connection(&self) -> Option<&Sp<String>> {
        Some(&self.connection)
    }

    fn declared_schema(&self) -> Option<&IndexMap<String, ColumnSpec>> {
        Some(&self.schema)
    }

    fn detail(&self) -> String {
        let what = self.stream.as_ref().or(self.channel.as_ref()).cloned().unwrap_or_default();
        format!("{}.{what}", self.connection.value())
    }

    fn partitions(&self) -> Option<(u32, Option<&str>)> {
        self.stream.as_ref()?;
        Some((self.partitions.unwrap_or(1), self.partition_by.as_deref()))
    }

    fn check(&self, cx: &mut Context) {
        check_partitions(cx, self.stream.is_some(), self.partitions, self.partition_by.as_deref());
        if let Some(col) = &self.partition_by {
            match self.schema.get(col) {
                None => {
                    let cols: Vec<String> = self.schema.keys().cloned().collect();
                    let hint = crate::spec::rules::column_hint(col, &cols);
                    cx.error_here(format!("'partition_by' column '{col}' is not in the schema{hint}"));
                }
                Some(c) if !matches!(c.data_type().trim(), "string" | "int32" | "int64") => cx.error_here(format!(
                    "'partition_by' column '{col}' is {}: a partition key is a string or an integer column",
                    c.data_type()
                )),
                Some(_) => {}
            }
        }
        if self.max_message_bytes == Some(0) {
            cx.error_here("'max_message_bytes' must be at least 1");
        }
        if let Some(f) = &self.max_future {
            if f.get() < std::time::Duration::from_secs(1) || f.get() > MAX_FUTURE {
                cx.error_here(format!(
                    "'max_future: {}' must be between 1s and {}",
                    humantime::format_duration(f.get()),
                    humantime::format_duration(MAX_FUTURE)
                ));
            }
        }
        match (&self.channel, &self.stream) {
            (Some(_), Some(_)) | (None, None) => {
                cx.error_here("give either 'channel' (Pub/Sub) or 'stream' (Redis Streams)")
            }
            (Some(_), None) if self.group.is_some() => {
                cx.error_here("'group' applies to 'stream', not to 'channel'")
            }
            (None, Some(_)) if self.group.is_none() => cx.error_here("'stream' needs a consumer 'group'"),
            _ => {}
        }
        if let Some(dl) = &self.dead_letter {
            if dl.maxlen.is_some() && dl.stream.is_none() {
                cx.error_here("'dead_letter.maxlen' applies to a dead-letter 'stream'");
            }
            if dl.maxlen == Some(0) {
                cx.error_here("'dead_letter.maxlen' must be at least 1");
            }
            match (&dl.stream, &dl.connection, &dl.table) {
                (Some(_), None, None) => {}
                (None, Some(c), Some(_)) => {
                    let what = format!("{} dead_letter", cx.what);
                    cx.connection_of(&what, c, "postgres");
                }
                _ => cx.error_here("'dead_letter' takes either 'stream' or 'connection' with 'table'"),
            }
        }
    }
}

impl SinkSettings for RedisSink {
    fn input(&self) -> &Sp<String> {
        &self.input
    }

    fn connection(&self) -> Option<&Sp<String>> {
        Some(&self.connection)
    }

    fn detail(&self) -> String {
        let what = self.stream.as_ref().or(self.channel.as_ref()).cloned().unwrap_or_default();
        format!("{}.{what}", self.connection.value())
    }

    fn check(&self, cx: &mut Context) {
        if self.channel.is_some() == self.stream.is_some() {
            cx.error_here("give either 'channel' (PUBLISH) or 'stream' (XADD)");
        }
        check_partitions(cx, self.stream.is_some(), self.partitions, self.partition_by.as_deref());
    }
}

/// The most `max_future` may be: further ahead, an event would hold its
/// windows' counts back for longer than anyone waits for an alert.
const MAX_FUTURE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The most partitions a stream may have: one per Redis Cluster hash slot.
const MAX_PARTITIONS: u32 = 16_384;

/// `partitions` and `partition_by`, which go together and with `stream`.
fn check_partitions(cx: &mut Context, stream: bool, partitions: Option<u32>, by: Option<&str>) {
    match partitions {
        None => {}
        Some(_) if !stream => cx.error_here("'partitions' applies to 'stream', not to 'channel'"),
        Some(0) => cx.error_here("'partitions' must be at least 1"),
        Some(p) if p > MAX_PARTITIONS => cx.error_here(format!(
            "'partitions: {p}' is more than {MAX_PARTITIONS}, the hash slots of a Redis Cluster: partitions beyond them share slots and spread nothing further"
        )),
        Some(p) if p > 1 && by.is_none() => cx.error_here(format!(
            "'partitions: {p}' needs 'partition_by', the column whose value picks an event's partition"
        )),
        Some(_) => {}
    }
}
