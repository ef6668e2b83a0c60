//! Connectors: one folder per system. Each owns the settings of its
//! connections, sources and sinks (`config.rs`, the spec layer's
//! [`crate::spec::connector`] traits) and implements the runtime traits here
//! for them; [`registry`] lists every connector once. Adding a system means
//! one folder and one registry entry: the traits' required methods are what
//! the compiler asks for, and nothing else matches on kinds.
//!
//! The runtime traits:
//! - [`BatchSource`]: a source of `engine run`, opened as a stream of Arrow
//!   batches (incremental sources from a stored watermark).
//! - [`StreamSource`]: a source of `engine stream`, pulled a micro-batch at a
//!   time with [`StreamSource::next`]; each [`Delivery`] carries an opaque
//!   [`Token`] that the source's [`Acker`] acknowledges once every sink has
//!   committed the batch.
//! - [`BatchSink`]: a sink of `engine run`; sinks on a connection whose
//!   system has transactions ([`Transaction`]) load together in one, with
//!   what the run records on that connection ([`Ledger`]: watermarks,
//!   quarantined rows, the run's history row).
//! - [`StreamSink`]: a sink of `engine stream`, one micro-batch at a time.
//! - [`Probe`]: what `engine validate --connect` checks.

pub mod check;
pub mod codec;
pub mod file;
pub mod generate;
pub mod http;
pub mod mongodb;
pub mod postgres;
pub mod redis;
pub mod registry;
pub mod stdout;

use std::any::Any;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::SessionContext;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::spec::model::{BatchSpec, Connection};
use crate::spec::yaml::Sp;
use crate::spec::Spec;

/// The node a connector runs for: the spec (connections, paths) and its id.
#[derive(Clone, Copy)]
pub struct Node<'a> {
    pub spec: &'a Spec,
    pub id: &'a str,
}

impl<'a> Node<'a> {
    /// The connection `name`, with its settings as the connector's type `T`.
    pub fn connection<T: 'static>(&self, name: &Sp<String>) -> Result<(&'a str, &'a T)> {
        let (key, c): (&'a String, &'a Connection) = self
            .spec
            .pipeline
            .connections
            .get_key_value(name.value())
            .ok_or_else(|| Error::Internal(format!("connection '{}' is missing", name.value())))?;
        let settings = c.settings::<T>().ok_or_else(|| {
            Error::Internal(format!("connection '{key}' is not of the type node '{}' needs", self.id))
        })?;
        Ok((key.as_str(), settings))
    }
}

/// A source of a batch run.
#[async_trait::async_trait]
pub trait BatchSource: Send + Sync {
    /// Opens the source as a stream of record batches; an incremental source
    /// reads from `watermark` (with its lookback).
    async fn open(
        &self,
        node: Node<'_>,
        ctx: &SessionContext,
        watermark: Option<&str>,
    ) -> Result<SendableRecordBatchStream>;
}

/// What acknowledges a delivered batch, opaque to everyone but its source.
pub struct Token(Option<Box<dyn Any + Send>>);

impl Token {
    /// Nothing to acknowledge (Pub/Sub, generated rows).
    pub fn none() -> Self {
        Token(None)
    }

    pub fn new<T: Any + Send>(value: T) -> Self {
        Token(Some(Box::new(value)))
    }

    /// The source's own value, if this token carries one of type `T`.
    pub fn take<T: Any>(self) -> Option<T> {
        self.0.and_then(|b| b.downcast::<T>().ok()).map(|b| *b)
    }
}

/// A micro-batch and what acknowledges it.
pub struct Delivery {
    pub batch: RecordBatch,
    pub token: Token,
    /// When the batch's first event was read.
    pub first_at: Instant,
}

/// What a stream source is opened with.
pub struct StreamArgs {
    /// The declared schema of the events.
    pub schema: SchemaRef,
    /// Turns true when the stream should stop; the source then hands over
    /// what it has and ends.
    pub shutdown: watch::Receiver<bool>,
    /// Whether the source is connected to its system (for `/health`).
    pub connected: Arc<AtomicBool>,
    /// Stop after this many events (`--max-events`), where the source can.
    pub limit: Option<u64>,
    /// The source's micro-batching (`batch:`).
    pub batch: Option<BatchSpec>,
    /// `--shard I/N`: read only the partitions `p` with `p mod N == I`.
    pub shard: Option<(u32, u32)>,
}

/// A source of a stream, pulled a micro-batch at a time.
#[async_trait::async_trait]
pub trait StreamSource: Send {
    /// The next micro-batch; `None` once the source has ended (shutdown or limit).
    async fn next(&mut self) -> Result<Option<Delivery>>;
    /// What acknowledges this source's deliveries; it runs beside `next`.
    fn acker(&self) -> Result<Box<dyn Acker>>;
}

/// Acknowledges deliveries, in order, once every sink committed them.
#[async_trait::async_trait]
pub trait Acker: Send {
    /// Acknowledges the batch of `token` and stores the window `state` it
    /// changed, both at once (a source that keeps state: [`Acker::durable`]).
    /// Retries while the system is away, until `stop`; an error leaves the
    /// batch to be delivered again, and its state unsaved.
    async fn ack(
        &mut self,
        token: Token,
        state: State,
        stop: &watch::Receiver<bool>,
    ) -> std::result::Result<(), String>;

    /// Whether window state is stored with the acknowledgements, so that a
    /// restarted stream counts every event exactly once.
    fn durable(&self) -> bool {
        false
    }

    /// The window state stored by earlier runs for what this source reads.
    async fn load_state(&mut self) -> std::result::Result<Vec<StateWrite>, String> {
        Ok(Vec::new())
    }

    /// After [`Acker::load_state`]: the partitions whose state was expected
    /// (they were read before) but missing (deleted, or evicted).
    fn missing_state(&self) -> Vec<String> {
        Vec::new()
    }

    /// Stores rows a sink refused, before the batch that carried them is
    /// acknowledged (the source's dead letter). Retries like `ack`; an error
    /// leaves the batch unacknowledged. Without a dead letter they are logged.
    async fn refuse(
        &mut self,
        rows: Vec<Refused>,
        _stop: &watch::Receiver<bool>,
    ) -> std::result::Result<(), String> {
        log_refused(&rows);
        Ok(())
    }
}

/// Logs refused rows' reasons (not their data: rows may be personal data).
pub fn log_refused(rows: &[Refused]) {
    for r in rows {
        tracing::warn!(node = %r.node, "row refused (no dead_letter configured): {}", r.reason);
    }
}

/// An acker for sources with nothing to acknowledge.
pub struct NoAck;

#[async_trait::async_trait]
impl Acker for NoAck {
    async fn ack(
        &mut self,
        _: Token,
        _: State,
        _: &watch::Receiver<bool>,
    ) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// The window state a batch changed, stored with its acknowledgement.
#[derive(Debug, Default)]
pub struct State {
    pub writes: Vec<StateWrite>,
}

/// One key's window in a partition's state, or its removal (`value: None`).
#[derive(Debug, Clone)]
pub struct StateWrite {
    pub partition: u32,
    pub field: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Opens a stream source from its settings.
pub trait OpenStream: Send + Sync {
    fn open_stream(&self, node: Node<'_>, args: StreamArgs) -> Result<Box<dyn StreamSource>>;
}

/// One sink's input in a batch run.
pub struct Load {
    pub id: String,
    pub input: SendableRecordBatchStream,
}

/// A watermark stored with a run's loads.
pub struct Watermark {
    pub table: String,
    pub pipeline: String,
    pub node: String,
    pub value: String,
}

/// Rows one check moved out of the flow, for the quarantine table.
pub struct Rejects {
    pub table: String,
    pub run_id: String,
    pub node: String,
    pub check: String,
    pub reason: String,
    pub rows: Vec<serde_json::Value>,
}

/// How a run ended, for its row in the run history.
pub struct RunRecord {
    pub table: String,
    pub run_id: String,
    /// `success`, `check_failed` or `failed`.
    pub status: &'static str,
    pub exit_code: i32,
    /// Per node: role, rows in, rows out, quarantined.
    pub nodes: serde_json::Value,
    /// The checks that failed, with their samples.
    pub failed_checks: serde_json::Value,
    pub error: Option<String>,
}

/// What a run records on a connection, committed in the same transaction as
/// that connection's loads.
#[derive(Default)]
pub struct Ledger {
    pub watermarks: Vec<Watermark>,
    pub rejects: Vec<Rejects>,
    pub run: Option<RunRecord>,
}

/// A sink of a batch run.
#[async_trait::async_trait]
pub trait BatchSink: Send + Sync {
    /// The connection whose one transaction this sink's load joins, with
    /// every other sink on it and the run's watermarks when they are kept
    /// there (see [`Transaction`]); `None`: the sink loads alone.
    fn transaction(&self) -> Option<&Sp<String>> {
        None
    }
    /// Writes a sink that loads alone; returns the rows written.
    async fn write(&self, node: Node<'_>, input: SendableRecordBatchStream) -> Result<u64>;
}

/// A connection whose system commits several sinks' loads and what the run
/// records there in one transaction.
#[async_trait::async_trait]
pub trait Transaction: Send + Sync {
    /// Loads every sink of `loads` (sinks of this connection, in order) and
    /// writes `ledger`, all or nothing; returns the rows per sink.
    async fn load(&self, spec: &Spec, name: &str, loads: Vec<Load>, ledger: &Ledger) -> Result<Vec<u64>>;
}

/// A sink of a stream: each micro-batch is written and committed before the
/// source acknowledges it.
#[async_trait::async_trait]
pub trait StreamSink: Send {
    /// Writes and commits `batches` (never empty). `Error::External` means
    /// the system is away and the same batch is tried again (a sink that
    /// committed part of it goes on from there); anything else stops the
    /// stream. Rows the system refuses for their data are returned, not
    /// retried: they go to the source's dead letter.
    async fn write(&mut self, batches: &[RecordBatch]) -> Result<Written>;

    /// Gets ready for rows of `schema` (connects, checks the table) before
    /// the first write, so that the first rows do not wait for it. A
    /// failure is left for the first write to meet and report.
    async fn open(&mut self, _schema: &SchemaRef) -> Result<()> {
        Ok(())
    }
}

/// What a stream sink did with a batch.
#[derive(Debug, Default)]
pub struct Written {
    /// Rows committed.
    pub rows: u64,
    /// Rows refused for their data, each with the system's reason.
    pub refused: Vec<Refused>,
}

impl Written {
    pub fn all(rows: u64) -> Self {
        Self { rows, refused: Vec::new() }
    }
}

/// A row refused for its data: by a sink's system (a CHECK, NOT NULL or
/// foreign-key violation, a value out of range), or by a transform that
/// failed on it (a rule dividing by zero): retrying cannot help.
#[derive(Debug, Clone)]
pub struct Refused {
    /// The refusing node's id.
    pub node: String,
    /// The row as a JSON object.
    pub row: Vec<u8>,
    /// Why, naming the node: `sink 'x' refused the row: ...`.
    pub reason: String,
}

/// Opens a stream sink from its settings.
pub trait OpenStreamSink: Send + Sync {
    fn open_stream(&self, node: Node<'_>) -> Result<Box<dyn StreamSink>>;
}

/// `engine validate --connect`: reaches the system and checks what can be
/// checked there (tables exist, columns fit `input`). `Ok(Some(note))` is
/// worth telling about a working one (a connection's TLS).
#[async_trait::async_trait]
pub trait Probe: Send + Sync {
    async fn probe(&self, node: Node<'_>, input: Option<SchemaRef>) -> Result<Option<String>>;
}

/// Exponential backoff between reconnection attempts: 100 ms doubling to 5 s.
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(100))
    }
}

impl Backoff {
    pub fn wait(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        d
    }

    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

/// An error of connection `name` to a `system` (postgres, mongodb, redis):
/// it names the connection and shows its URL and message without the password.
pub fn external(system: &str, name: &str, url: &str, e: impl std::fmt::Display) -> Error {
    let mut msg = e.to_string();
    for secret in crate::spec::redact::url_secrets(url) {
        msg = msg.replace(&secret, "***");
    }
    let url = crate::spec::redact::redact_url(url);
    Error::External { system: format!("{system} connection '{name}' ({url})"), message: msg }
}
