//! Redis: the stream source (Pub/Sub or Streams with a consumer group), the
//! sink (PUBLISH or XADD) and dead letters.
//!
//! Pub/Sub is at-most-once by nature: a message published while no consumer
//! listens, or while the engine reconnects, is gone. Streams with a consumer
//! group are at-least-once: entries are acknowledged (XACK) only after every
//! sink downstream has committed them, entries left pending by a consumer
//! that died are claimed by the others, and an entry delivered
//! `max_deliveries` times goes to the dead letter.

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
