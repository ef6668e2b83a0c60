//! Redis: the stream source (Pub/Sub or Streams with a consumer group), the
//! sink (PUBLISH or XADD) and dead letters.
//!
//! Pub/Sub is at-most-once by nature: a message published while no consumer
//! listens, or while the engine reconnects, is gone. Streams with a consumer
//! group are at-least-once: entries are acknowledged (XACK) only after every
//! sink downstream has committed them, entries left pending by a consumer
//! that died are claimed by the others, and an entry delivered
//! `max_deliveries` times goes to the dead letter.

pub mod config;
pub mod dead_letter;
pub mod partition;
pub mod sink;
pub mod source;
pub mod subscriber;
pub mod wire;

use std::time::Duration;

use crate::error::Error;

/// An error of the redis connection `name`, never showing its password.
pub fn external(name: &str, url: &str, e: impl std::fmt::Display) -> Error {
    super::external("redis", name, url, e)
}

/// Where a redis connection goes: its name and URL, and the certificate
/// authorities a `rediss://` connection trusts (the public ones when `None`).
#[derive(Clone)]
pub struct Endpoint {
    pub name: String,
    pub url: String,
    pub ca: Option<Vec<u8>>,
}

impl Endpoint {
    /// The connection `name` of `node`'s spec, its CA file read.
    pub fn of(node: &Node<'_>, name: &str, c: &RedisConnection) -> crate::error::Result<Self> {
        let ca = match &c.tls {
            Some(tls) => {
                let path = node.spec.resolve(tls.ca_file.value());
                Some(std::fs::read(&path).map_err(|e| {
                    Error::Usage(format!(
                        "connection '{name}': cannot read tls.ca_file {}: {e}",
                        path.display()
                    ))
                })?)
            }
            None => None,
        };
        Ok(Self { name: name.to_string(), url: c.url.clone(), ca })
    }

    /// A client; a bad URL is the user's error.
    pub fn client(&self) -> crate::error::Result<redis::Client> {
        let bad = |e: redis::RedisError| {
            Error::Usage(format!("connection '{}': bad redis URL or TLS setting: {e}", self.name))
        };
        match &self.ca {
            Some(ca) => redis::Client::build_with_tls(
                self.url.as_str(),
                redis::TlsCertificates { client_tls: None, root_cert: Some(ca.clone()) },
            )
            .map_err(bad),
            None => redis::Client::open(self.url.as_str()).map_err(bad),
        }
    }

    pub fn external(&self, e: impl std::fmt::Display) -> Error {
        external(&self.name, &self.url, e)
    }
}

/// A connection whose replies may take `wait` (a blocking read) and more.
pub async fn connect(
    client: &redis::Client,
    wait: Duration,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(wait + Duration::from_secs(5)));
    client.get_multiplexed_async_connection_with_config(&config).await
}

// ------------------------------------------------------------------ runtime

use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, watch};

use super::{
    Acker, Backoff, Delivery, Node, OpenStream, OpenStreamSink, Refused, State, StateWrite, StreamArgs,
    StreamSink, StreamSource, Token, Written,
};
use crate::spec::model::BatchSpec;
use config::{RedisConnection, RedisSink, RedisSource};

/// A batch's bytes of messages, unless `batch.max_bytes` says.
const DEFAULT_BATCH_BYTES: u64 = 32 << 20;

impl RedisSource {
    /// How the source reads: `target`, the partitions of its stream this
    /// shard owns (none for a channel).
    fn reader_config(
        &self,
        node: Node<'_>,
        batch: Option<&BatchSpec>,
        shard: Option<(u32, u32)>,
        target: Option<&AckTarget>,
    ) -> crate::error::Result<source::Config> {
        let (name, c) = node.connection::<RedisConnection>(&self.connection)?;
        let max_rows = batch.and_then(|b| b.max_rows).unwrap_or(1000).max(1) as usize;
        let max_wait = batch.and_then(|b| b.max_wait.as_ref()).map_or(Duration::from_millis(50), |w| w.get());
        let reclaim_after = self.reclaim_after.as_ref().map_or(Duration::from_secs(30), |r| r.get());
        // A shard's consumer name is the same in every run, so a restarted
        // shard takes its predecessor's pending entries back at once.
        let consumer = match (shard, &self.consumer) {
            (Some((i, _)), Some(c)) => format!("{c}-shard-{i}"),
            (Some((i, _)), None) => format!("shard-{i}"),
            (None, Some(c)) => c.clone(),
            (None, None) => {
                let host = std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_default();
                let host = if host.is_empty() { "engine".to_string() } else { host };
                format!("{host}-{}", std::process::id())
            }
        };
        Ok(source::Config {
            node: node.id.to_string(),
            endpoint: Endpoint::of(&node, name, c)?,
            channel: self.channel.clone(),
            streams: target.map(|t| t.owned.iter().map(|p| t.stream_key(*p)).collect()).unwrap_or_default(),
            group: self.group.clone().unwrap_or_default(),
            consumer,
            field: self.field.clone(),
            max_rows,
            max_wait,
            max_bytes: batch.and_then(|b| b.max_bytes).unwrap_or(DEFAULT_BATCH_BYTES) as usize,
            max_deliveries: self.max_deliveries.unwrap_or(5),
            reclaim_after,
            max_message_bytes: self.max_message_bytes.unwrap_or(config::DEFAULT_MAX_MESSAGE_BYTES) as usize,
            max_future: self.max_future.as_ref().map_or(config::DEFAULT_MAX_FUTURE, |f| f.get()),
            clamp_future: self.on_future == config::OnFuture::Clamp,
            partitions: match (target, &self.partition_by) {
                (Some(t), Some(col)) => Some((col.clone(), t.partitions, t.owned.clone())),
                _ => None,
            },
        })
    }
}

impl OpenStream for RedisSource {
    fn open_stream(&self, node: Node<'_>, args: StreamArgs) -> crate::error::Result<Box<dyn StreamSource>> {
        let target = match (&self.stream, &self.group) {
            (Some(stream), Some(group)) => {
                let partitions = self.partitions.unwrap_or(1);
                Some(AckTarget {
                    stream: stream.clone(),
                    partitions,
                    owned: partition::owned(partitions, args.shard),
                    group: group.clone(),
                })
            }
            _ => None,
        };
        let cfg = self.reader_config(node, args.batch.as_ref(), args.shard, target.as_ref())?;
        let acker = Xack {
            client: cfg.endpoint.client()?,
            target,
            dead: dead_letter::DeadLetters::new(
                node.spec,
                node.id,
                self.dead_letter.as_ref(),
                self.log_payloads,
            ),
            conn: None,
            owner: Owner { consumer: cfg.consumer.clone(), shard: args.shard, node: node.id.to_string() },
            owned_written: Default::default(),
            missing: Vec::new(),
        };
        let dead =
            dead_letter::DeadLetters::new(node.spec, node.id, self.dead_letter.as_ref(), self.log_payloads);
        let (tx, rx) = mpsc::channel::<Delivery>(4);
        let control = source::Control { shutdown: args.shutdown, connected: args.connected };
        let task = tokio::spawn(source::run(cfg, args.schema, dead, tx, control));
        Ok(Box::new(Reading { rx, task: Some(task), acker: std::sync::Mutex::new(Some(acker)) }))
    }
}

/// A redis source reading in a task of its own; micro-batches wait in a
/// short channel, so reading overlaps the transforms.
struct Reading {
    rx: mpsc::Receiver<Delivery>,
    task: Option<tokio::task::JoinHandle<crate::error::Result<()>>>,
    /// Handed to the stream once.
    acker: std::sync::Mutex<Option<Xack>>,
}

#[async_trait::async_trait]
impl StreamSource for Reading {
    async fn next(&mut self) -> crate::error::Result<Option<Delivery>> {
        if let Some(d) = self.rx.recv().await {
            return Ok(Some(d));
        }
        // Cancel-safe (the stream loop races it with a clock): the task is
        // let go only once it has finished.
        let Some(t) = self.task.as_mut() else { return Ok(None) };
        let outcome = t.await;
        self.task = None;
        outcome.map_err(|e| Error::Internal(format!("source task: {e}")))?.map(|()| None)
    }

    fn acker(&self) -> crate::error::Result<Box<dyn Acker>> {
        let taken = self.acker.lock().map_err(|_| Error::Internal("acker lock".into()))?.take();
        match taken {
            Some(a) => Ok(Box::new(a)),
            None => Err(Error::Internal("the source's acker was taken twice".into())),
        }
    }
}

/// Acknowledges stream entries (XACK) once their batch is committed, and
/// sends rows a sink refused to the source's dead letter first. Window state
/// is stored beside each partition's stream, in a hash
/// `{<partition stream>}:windows:<group>` (the braces keep both in one
/// Redis Cluster slot), written in the same MULTI/EXEC as the XACK.
struct Xack {
    client: redis::Client,
    target: Option<AckTarget>,
    dead: dead_letter::DeadLetters,
    conn: Option<redis::aio::MultiplexedConnection>,
    /// Who writes the window state, saved in each partition's hash.
    owner: Owner,
    /// Partitions whose hash names this owner already.
    owned_written: std::collections::HashSet<u32>,
    /// Partition streams whose window state was expected but missing.
    missing: Vec<String>,
}

/// Saved beside a partition's window state (field `owner`): which
/// partition it is, and which shard and consumer wrote it.
#[derive(Clone, Default)]
struct Owner {
    consumer: String,
    shard: Option<(u32, u32)>,
    node: String,
}

/// The most bytes of window state one HSET carries.
const MAX_COMMAND_BYTES: usize = 64 << 20;

/// The field of a window state hash that names its owner (window fields
/// are 8 bytes of prefix and a key: never this).
const OWNER: &str = "owner";

/// The stream read, in partitions, and the group to acknowledge in.
#[derive(Clone)]
struct AckTarget {
    stream: String,
    partitions: u32,
    /// The partitions read, in the order of the source's streams.
    owned: Vec<u32>,
    group: String,
}

impl AckTarget {
    fn stream_key(&self, p: u32) -> String {
        partition::stream_key(&self.stream, p, self.partitions)
    }

    fn state_key(&self, p: u32) -> String {
        format!("{{{}}}:windows:{}", self.stream_key(p), self.group)
    }
}

#[async_trait::async_trait]
impl Acker for Xack {
    /// Retries while Redis is away (until shutdown: the entries then stay
    /// pending and are delivered again, which sinks absorb).
    async fn ack(&mut self, token: Token, state: State, stop: &watch::Receiver<bool>) -> Result<(), String> {
        let Some(target) = &self.target else { return Ok(()) };
        let ids: Vec<(usize, String)> = token.take().unwrap_or_default();
        if ids.is_empty() && state.writes.is_empty() {
            return Ok(());
        }
        let mut per_stream: Vec<Vec<String>> = vec![Vec::new(); target.owned.len()];
        for (s, id) in ids {
            if let Some(v) = per_stream.get_mut(s) {
                v.push(id);
            }
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut touched: Vec<u32> = state.writes.iter().map(|w| w.partition).collect();
        touched.sort_unstable();
        touched.dedup();
        // Per partition, one HSET and one HDEL with many fields each (in
        // chunks): far fewer commands than one per key.
        for p in touched {
            let key = target.state_key(p);
            if !self.owned_written.contains(&p) {
                let owner = serde_json::json!({
                    "partition": p,
                    "partitions": target.partitions,
                    "stream": target.stream_key(p),
                    "group": target.group,
                    "consumer": self.owner.consumer,
                    "shard": self.owner.shard.map(|(i, n)| format!("{i}/{n}")),
                    "source": self.owner.node,
                    "written_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
                });
                pipe.cmd("HSET").arg(&key).arg(OWNER).arg(owner.to_string()).ignore();
            }
            let mine = || state.writes.iter().filter(move |w| w.partition == p);
            let sets: Vec<&StateWrite> = mine().filter(|w| w.value.is_some()).collect();
            // At most 1000 fields or 64 MiB a command: Redis takes a
            // command's arguments into memory whole before it runs it.
            let mut rest = sets.as_slice();
            while !rest.is_empty() {
                let mut bytes = 0;
                let n = rest
                    .iter()
                    .take(1000)
                    .take_while(|w| {
                        bytes += w.field.len() + w.value.as_ref().map_or(0, Vec::len);
                        bytes <= MAX_COMMAND_BYTES
                    })
                    .count()
                    .max(1);
                let cmd = pipe.cmd("HSET").arg(&key);
                for w in &rest[..n] {
                    cmd.arg(w.field.as_slice()).arg(w.value.as_deref().unwrap_or_default());
                }
                cmd.ignore();
                rest = &rest[n..];
            }
            let dels: Vec<&[u8]> = mine().filter(|w| w.value.is_none()).map(|w| w.field.as_slice()).collect();
            for chunk in dels.chunks(1000) {
                pipe.cmd("HDEL").arg(&key).arg(chunk).ignore();
            }
        }
        for (p, ids) in target.owned.iter().zip(&per_stream) {
            for chunk in ids.chunks(10_000) {
                pipe.cmd("XACK").arg(target.stream_key(*p)).arg(&target.group).arg(chunk).ignore();
            }
        }
        let what = format!("acknowledge {} entries", per_stream.iter().map(Vec::len).sum::<usize>());
        let mut backoff = Backoff::default();
        loop {
            let outcome = match self.connection().await {
                Ok(c) => pipe.query_async::<()>(c).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            if let Some(done) = self.settle(outcome, &what, &mut backoff, stop).await {
                if done.is_ok() {
                    self.owned_written.extend(state.writes.iter().map(|w| w.partition));
                }
                return done;
            }
        }
    }

    fn missing_state(&self) -> Vec<String> {
        self.missing.clone()
    }

    fn durable(&self) -> bool {
        self.target.is_some()
    }

    async fn load_state(&mut self) -> Result<Vec<StateWrite>, String> {
        let Some(target) = self.target.clone() else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        let c = self.connection().await?;
        if let Eviction::Unsafe(policy) = eviction(c).await {
            tracing::warn!("{}", unsafe_eviction(&target.stream, &policy));
        }
        for p in &target.owned {
            let c = self.connection().await?;
            let key = target.state_key(*p);
            let stream = target.stream_key(*p);
            // State saved by versions that set an expiry keeps none.
            let _: redis::RedisResult<i64> = redis::cmd("PERSIST").arg(&key).query_async(&mut *c).await;
            let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut *c)
                .await
                .map_err(|e| format!("cannot read window state of '{stream}': {e}"))?;
            if fields.is_empty() && group_has_read(c, &stream, &target.group).await {
                self.missing.push(stream.clone());
            }
            for (field, value) in fields {
                if field == OWNER.as_bytes() {
                    let owner: serde_json::Value = serde_json::from_slice(&value).unwrap_or_default();
                    if owner["partition"].as_u64().is_some_and(|o| o != u64::from(*p)) {
                        tracing::warn!(
                            "the window state of '{stream}' says it is partition {}, not {p}: it is left out",
                            owner["partition"]
                        );
                        out.retain(|w: &StateWrite| w.partition != *p);
                        break;
                    }
                    continue;
                }
                out.push(StateWrite { partition: *p, field, value: Some(value) });
            }
        }
        Ok(out)
    }

    async fn refuse(&mut self, rows: Vec<Refused>, stop: &watch::Receiver<bool>) -> Result<(), String> {
        let letters: Vec<dead_letter::Letter> = rows
            .into_iter()
            .map(|r| dead_letter::Letter::new(&r.row, r.reason, None))
            .collect();
        let what = format!("store {} refused rows", letters.len());
        let mut backoff = Backoff::default();
        loop {
            let outcome = match self.connection().await {
                Ok(c) => {
                    let mut c = c.clone();
                    self.dead.write(&mut c, &letters).await
                }
                Err(e) => Err(e),
            };
            if let Some(done) = self.settle(outcome, &what, &mut backoff, stop).await {
                return done;
            }
        }
    }
}

impl Xack {
    /// One attempt's outcome: done (`Some`), or, while Redis is away and
    /// no shutdown came, a wait with backoff before the next (`None`).
    async fn settle(
        &mut self,
        outcome: Result<(), String>,
        what: &str,
        backoff: &mut Backoff,
        stop: &watch::Receiver<bool>,
    ) -> Option<Result<(), String>> {
        match outcome {
            Ok(()) => Some(Ok(())),
            Err(e) if *stop.borrow() => Some(Err(format!("cannot {what}: {e}"))),
            Err(e) => {
                self.conn = None;
                let wait = backoff.wait();
                tracing::warn!("cannot {what}: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                None
            }
        }
    }

    async fn connection(&mut self) -> Result<&mut redis::aio::MultiplexedConnection, String> {
        if self.conn.is_none() {
            self.conn = Some(connect(&self.client, Duration::ZERO).await.map_err(|e| e.to_string())?);
        }
        self.conn.as_mut().ok_or_else(|| "no connection".to_string())
    }
}

#[async_trait::async_trait]
impl super::Probe for RedisConnection {
    /// PING, and whether the connection uses TLS.
    async fn probe(
        &self,
        node: Node<'_>,
        _input: Option<datafusion::arrow::datatypes::SchemaRef>,
    ) -> crate::error::Result<Option<String>> {
        let endpoint = Endpoint::of(&node, node.id, self)?;
        let client = endpoint.client()?;
        let mut conn = connect(&client, Duration::ZERO).await.map_err(|e| endpoint.external(e))?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await.map_err(|e| endpoint.external(e))?;
        Ok(Some(match (&client.get_connection_info().addr(), &self.tls) {
            (redis::ConnectionAddr::TcpTls { .. }, Some(_)) => "TLS (CA from tls.ca_file)".to_string(),
            (redis::ConnectionAddr::TcpTls { .. }, None) => "TLS".to_string(),
            _ => "no TLS".to_string(),
        }))
    }
}

/// Whether `group` has read entries of `stream` before: then a partition's
/// window state was saved, unless no windowed rule ever counted there.
async fn group_has_read(conn: &mut redis::aio::MultiplexedConnection, stream: &str, group: &str) -> bool {
    let reply: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(conn).await;
    reply.is_ok_and(|r| {
        r.groups.iter().any(|g| g.name == group && g.last_delivered_id != "0-0" && g.entries_read.unwrap_or(1) > 0)
    })
}

#[async_trait::async_trait]
impl super::Probe for RedisSource {
    /// A source reading a stream in a group keeps window state in Redis:
    /// a server that may evict any key could drop it.
    async fn probe(
        &self,
        node: Node<'_>,
        _input: Option<datafusion::arrow::datatypes::SchemaRef>,
    ) -> crate::error::Result<Option<String>> {
        if self.stream.is_none() || self.group.is_none() {
            return Ok(None);
        }
        let (name, c) = node.connection::<RedisConnection>(&self.connection)?;
        let endpoint = Endpoint::of(&node, name, c)?;
        let mut conn = connect(&endpoint.client()?, Duration::ZERO).await.map_err(|e| endpoint.external(e))?;
        match eviction(&mut conn).await {
            Eviction::Unsafe(policy) => Err(Error::Usage(unsafe_eviction(name, &policy))),
            _ => Ok(None),
        }
    }
}

/// What a Redis server's `maxmemory-policy` means for window state.
enum Eviction {
    /// `noeviction` or `volatile-*`: the engine's keys have no expiry, so they stay.
    Safe,
    /// `allkeys-*`: any key may go when memory runs short.
    Unsafe(String),
    /// CONFIG is refused (a managed Redis): unknown.
    Unknown,
}

async fn eviction(conn: &mut redis::aio::MultiplexedConnection) -> Eviction {
    let reply: redis::RedisResult<Vec<String>> =
        redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy").query_async(conn).await;
    match reply.ok().and_then(|r| r.get(1).cloned()) {
        Some(p) if p.starts_with("allkeys-") => Eviction::Unsafe(p),
        Some(_) => Eviction::Safe,
        None => Eviction::Unknown,
    }
}

fn unsafe_eviction(connection: &str, policy: &str) -> String {
    format!(
        "connection '{connection}': the server runs with maxmemory-policy {policy}, which may evict the \
         window state this source keeps there (windows would restart empty); run it with noeviction \
         (or a volatile-* policy: the engine's keys never expire)"
    )
}

impl OpenStreamSink for RedisSink {
    fn open_stream(&self, node: Node<'_>) -> crate::error::Result<Box<dyn StreamSink>> {
        let (name, c) = node.connection::<RedisConnection>(&self.connection)?;
        let endpoint = Endpoint::of(&node, name, c)?;
        Ok(Box::new(Publishing {
            id: node.id.to_string(),
            client: endpoint.client()?,
            endpoint,
            conn: None,
            sink: self.clone(),
        }))
    }
}

/// A redis sink of a stream, on one connection manager.
struct Publishing {
    id: String,
    client: redis::Client,
    endpoint: Endpoint,
    conn: Option<redis::aio::ConnectionManager>,
    sink: RedisSink,
}

#[async_trait::async_trait]
impl StreamSink for Publishing {
    async fn write(&mut self, batches: &[RecordBatch]) -> crate::error::Result<Written> {
        let ext = |e: &dyn std::fmt::Display| self.endpoint.external(e);
        // A missing partition column is the spec's problem, not an outage.
        let parts = sink::partitions(&self.sink, batches)
            .map_err(|e| Error::Usage(format!("sink '{}': {e}", self.id)))?;
        let c = match &mut self.conn {
            Some(c) => c,
            None => self.conn.insert(self.client.get_connection_manager().await.map_err(|e| ext(&e))?),
        };
        sink::write(c, &self.sink, batches, &parts).await.map(Written::all).map_err(|e| ext(&e))
    }
}
