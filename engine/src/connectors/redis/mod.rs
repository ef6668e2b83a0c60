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
pub mod sink;
pub mod source;
pub mod subscriber;

use std::time::Duration;

use crate::error::Error;

/// An error of the redis connection `name`, never showing its password.
pub fn external(name: &str, url: &str, e: impl std::fmt::Display) -> Error {
    super::external("redis", name, url, e)
}

/// A client for `url`; a bad URL is the user's error.
pub fn client(name: &str, url: &str) -> crate::error::Result<redis::Client> {
    redis::Client::open(url).map_err(|e| Error::Usage(format!("connection '{name}': bad redis URL: {e}")))
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

/// Entries of an XREADGROUP reply for one stream: `[[key, entries]]`, or nil.
pub fn read_reply(reply: redis::Value) -> Vec<Entry> {
    array(reply)
        .into_iter()
        .flat_map(|stream| {
            let mut parts = array(stream).into_iter();
            let _key = parts.next();
            parts.next().map(entries).unwrap_or_default()
        })
        .collect()
}

// ------------------------------------------------------------------ runtime

use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, watch};

use super::{
    Acker, Backoff, Delivery, Node, OpenStream, OpenStreamSink, StreamArgs, StreamSink, StreamSource, Token,
};
use crate::spec::model::BatchSpec;
use config::{RedisConnection, RedisSink, RedisSource};

impl RedisSource {
    fn reader_config(
        &self,
        node: Node<'_>,
        batch: Option<&BatchSpec>,
    ) -> crate::error::Result<source::Config> {
        let (name, c) = node.connection::<RedisConnection>(&self.connection)?;
        let max_rows = batch.and_then(|b| b.max_rows).unwrap_or(1000).max(1) as usize;
        let max_wait = batch.and_then(|b| b.max_wait.as_ref()).map_or(Duration::from_millis(50), |w| w.get());
        let reclaim_after = self.reclaim_after.as_ref().map_or(Duration::from_secs(30), |r| r.get());
        let consumer = self.consumer.clone().unwrap_or_else(|| {
            let host =
                std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
            let host = if host.is_empty() { "engine".to_string() } else { host };
            format!("{host}-{}", std::process::id())
        });
        Ok(source::Config {
            node: node.id.to_string(),
            connection: name.to_string(),
            url: c.url.clone(),
            channel: self.channel.clone(),
            stream: self.stream.clone(),
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
        let cfg = self.reader_config(node, args.batch.as_ref())?;
        let ack = match (&self.stream, &self.group) {
            (Some(stream), Some(group)) => {
                Some((client(&cfg.connection, &cfg.url)?, stream.clone(), group.clone()))
            }
            _ => None,
        };
        let dead = dead_letter::DeadLetters::new(node.spec, node.id, self.dead_letter.as_ref());
        let (tx, rx) = mpsc::channel::<Delivery>(4);
        let control = source::Control { shutdown: args.shutdown, connected: args.connected };
        let task = tokio::spawn(source::run(cfg, args.schema, dead, tx, control));
        Ok(Box::new(Reading { rx, task: Some(task), ack }))
    }
}

/// A redis source reading in a task of its own; micro-batches wait in a
/// short channel, so reading overlaps the transforms.
struct Reading {
    rx: mpsc::Receiver<Delivery>,
    task: Option<tokio::task::JoinHandle<crate::error::Result<()>>>,
    /// Stream, group and client to acknowledge with (streams only).
    ack: Option<(redis::Client, String, String)>,
}

#[async_trait::async_trait]
impl StreamSource for Reading {
    async fn next(&mut self) -> crate::error::Result<Option<Delivery>> {
        if let Some(d) = self.rx.recv().await {
            return Ok(Some(d));
        }
        match self.task.take() {
            Some(t) => t.await.map_err(|e| Error::Internal(format!("source task: {e}")))?.map(|()| None),
            None => Ok(None),
        }
    }

    fn acker(&self) -> crate::error::Result<Box<dyn Acker>> {
        Ok(Box::new(Xack { target: self.ack.clone(), conn: None }))
    }
}

/// Acknowledges stream entries (XACK) once their batch is committed.
struct Xack {
    target: Option<(redis::Client, String, String)>,
    conn: Option<redis::aio::MultiplexedConnection>,
}

#[async_trait::async_trait]
impl Acker for Xack {
    /// Retries while Redis is away (until shutdown: the entries then stay
    /// pending and are delivered again, which sinks absorb).
    async fn ack(&mut self, token: Token, stop: &watch::Receiver<bool>) -> Result<(), String> {
        let Some((client, stream, group)) = &self.target else { return Ok(()) };
        let ids: Vec<String> = token.take().unwrap_or_default();
        let mut backoff = Backoff::default();
        loop {
            let conn = match &mut self.conn {
                Some(c) => Ok(c),
                None => connect(client, Duration::ZERO).await.map(|c| self.conn.insert(c)),
            };
            let outcome = match conn {
                Ok(c) => source::ack(c, stream, group, &ids).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) if *stop.borrow() => return Err(format!("cannot acknowledge: {e}")),
                Err(e) => {
                    self.conn = None;
                    let wait = backoff.wait();
                    tracing::warn!("cannot acknowledge {} entries: {e}; retrying in {wait:?}", ids.len());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

impl OpenStreamSink for RedisSink {
    fn open_stream(&self, node: Node<'_>) -> crate::error::Result<Box<dyn StreamSink>> {
        let (name, c) = node.connection::<RedisConnection>(&self.connection)?;
        Ok(Box::new(Publishing {
            client: client(name, &c.url)?,
            name: name.to_string(),
            url: c.url.clone(),
            conn: None,
            sink: self.clone(),
        }))
    }
}

/// A redis sink of a stream, on one connection manager.
struct Publishing {
    client: redis::Client,
    name: String,
    url: String,
    conn: Option<redis::aio::ConnectionManager>,
    sink: RedisSink,
}

#[async_trait::async_trait]
impl StreamSink for Publishing {
    async fn write(&mut self, batches: &[RecordBatch]) -> crate::error::Result<u64> {
        let ext = |e: &dyn std::fmt::Display| external(&self.name, &self.url, e);
        let c = match &mut self.conn {
            Some(c) => c,
            None => self.conn.insert(self.client.get_connection_manager().await.map_err(|e| ext(&e))?),
        };
        sink::write(c, &self.sink, batches).await.map_err(|e| ext(&e))
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
        let e = read_reply(reply);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].0, "1-0");
        assert_eq!(e[0].1.as_ref().unwrap()[0], (b"payload".to_vec(), b"{}".to_vec()));
        assert!(e[1].1.is_none());
        assert!(read_reply(Nil).is_empty());
    }
}
