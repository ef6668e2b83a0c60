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

/// A stream entry: its id and its field/value pairs (`None` when the entry
/// was deleted from the stream while pending).
pub type Entry = (String, Option<Vec<(Vec<u8>, Vec<u8>)>>);

fn owned_text(v: redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => {
            Some(String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
        }
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn bytes(v: redis::Value) -> Vec<u8> {
    match v {
        redis::Value::BulkString(b) => b,
        redis::Value::SimpleString(s) => s.into_bytes(),
        redis::Value::Int(i) => i.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

fn array(v: redis::Value) -> Vec<redis::Value> {
    match v {
        redis::Value::Array(a) | redis::Value::Set(a) => a,
        redis::Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

/// Entries of an XRANGE/XCLAIM reply: `[[id, [field, value, ...]], ...]`.
pub fn entries(reply: redis::Value) -> Vec<Entry> {
    array(reply)
        .into_iter()
        .filter_map(|e| {
            let mut parts = array(e).into_iter();
            let id = owned_text(parts.next()?)?;
            let fields = match parts.next() {
                Some(redis::Value::Nil) | None => None,
                Some(f) => {
                    let mut flat = array(f).into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                        pairs.push((bytes(k), bytes(v)));
                    }
                    Some(pairs)
                }
            };
            Some((id, fields))
        })
        .collect()
}

/// Entries of an XREADGROUP reply, per stream: `[[key, entries], ...]`, or nil.
pub fn read_reply(reply: redis::Value) -> Vec<(String, Vec<Entry>)> {
    array(reply)
        .into_iter()
        .filter_map(|stream| {
            let mut parts = array(stream).into_iter();
            let key = owned_text(parts.next()?)?;
            Some((key, parts.next().map(entries).unwrap_or_default()))
        })
        .collect()
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
            max_deliveries: self.max_deliveries.unwrap_or(5),
            reclaim_after,
            max_message_bytes: self.max_message_bytes.unwrap_or(1 << 20) as usize,
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
}

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
            let mine = || state.writes.iter().filter(move |w| w.partition == p);
            let sets: Vec<&StateWrite> = mine().filter(|w| w.value.is_some()).collect();
            for chunk in sets.chunks(1000) {
                let cmd = pipe.cmd("HSET").arg(&key);
                for w in chunk {
                    cmd.arg(w.field.as_slice()).arg(w.value.as_deref().unwrap_or_default());
                }
                cmd.ignore();
            }
            let dels: Vec<&[u8]> = mine().filter(|w| w.value.is_none()).map(|w| w.field.as_slice()).collect();
            for chunk in dels.chunks(1000) {
                pipe.cmd("HDEL").arg(&key).arg(chunk).ignore();
            }
            let ms = state.keep_for.as_millis().max(1) as u64;
            pipe.cmd("PEXPIRE").arg(&key).arg(ms).ignore();
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
                return done;
            }
        }
    }

    fn durable(&self) -> bool {
        self.target.is_some()
    }

    async fn load_state(&mut self) -> Result<Vec<StateWrite>, String> {
        let Some(target) = self.target.clone() else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for p in &target.owned {
            let c = self.connection().await?;
            let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
                .arg(target.state_key(*p))
                .query_async(c)
                .await
                .map_err(|e| format!("cannot read window state of '{}': {e}", target.stream_key(*p)))?;
            out.extend(fields.into_iter().map(|(field, value)| StateWrite {
                partition: *p,
                field,
                value: Some(value),
            }));
        }
        Ok(out)
    }

    async fn refuse(&mut self, rows: Vec<Refused>, stop: &watch::Receiver<bool>) -> Result<(), String> {
        let letters: Vec<dead_letter::Letter> = rows
            .into_iter()
            .map(|r| dead_letter::Letter {
                payload: r.row,
                reason: format!("sink '{}' refused the row: {}", r.sink, r.reason),
                entry_id: None,
            })
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

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value::{Array, BulkString, Nil};

    #[test]
    fn parses_read_replies() {
        let b = |s: &str| BulkString(s.as_bytes().to_vec());
        let reply = Array(vec![Array(vec![
            b("s"),
            Array(vec![
                Array(vec![b("1-0"), Array(vec![b("payload"), b("{}")])]),
                Array(vec![b("2-0"), Nil]),
            ]),
        ])]);
        let mut streams = read_reply(reply);
        assert_eq!(streams.len(), 1);
        let (key, e) = streams.remove(0);
        assert_eq!(key, "s");
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].0, "1-0");
        assert_eq!(e[0].1.as_ref().unwrap()[0], (b"payload".to_vec(), b"{}".to_vec()));
        assert!(e[1].1.is_none());
        assert!(read_reply(Nil).is_empty());
    }
}
