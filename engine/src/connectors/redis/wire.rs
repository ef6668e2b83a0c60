//! Stream reads (XREADGROUP, XCLAIM) over a connection of their own, each
//! reply parsed as it arrives and only the source's `field` kept.
//!
//! Hand-written rather than the redis crate's connection, which reads a
//! whole reply into a `redis::Value` before anything can look at it: four
//! 40 MiB entries in one reply are then 160 MiB of the engine's memory
//! before the size check refuses them. Here a value larger than
//! `max_message_bytes` is never held: its first KiB is kept, the rest is
//! hashed (SHA-256) as it passes and dropped, so what one read holds is
//! bounded by its count times `max_message_bytes`. Other fields are
//! skipped the same way. The address, credentials and database come from
//! the crate's parsed URL (as for [`super::subscriber`]); every other
//! command still goes through the crate.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::subscriber::{open_io, Io};

/// A value as read: whole, or cut to its first [`HEAD`] bytes when longer
/// than the limit, with its length and SHA-256 (hex).
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Whole(Vec<u8>),
    Cut { head: Vec<u8>, len: usize, sha256: String },
}

/// What a cut value keeps.
pub const HEAD: usize = 1024;

/// One stream entry as read.
#[derive(Debug, Default)]
pub struct WireEntry {
    pub id: String,
    /// Deleted from the stream (trimmed) while pending.
    pub deleted: bool,
    /// The source's field, if the entry has it.
    pub value: Option<Payload>,
    /// The entry's first field names (up to [`NAMES`]), for a message when
    /// `field` is missing, and the first field's value, cut.
    pub names: Vec<String>,
    pub first: Option<Payload>,
}

/// Field names kept of an entry without the source's field.
const NAMES: usize = 8;

/// A connection for stream reads.
pub struct Wire {
    io: Box<dyn Io>,
    buf: BytesMut,
    /// The reads sent and not yet answered.
    sent: VecDeque<()>,
    field: Vec<u8>,
    max_bytes: usize,
}

impl Wire {
    /// Connects as `client` would: TLS, AUTH, SELECT of the URL's database.
    pub async fn connect(
        client: &redis::Client,
        ca: Option<&[u8]>,
        field: &str,
        max_bytes: usize,
    ) -> Result<Self, String> {
        let info = client.get_connection_info();
        let io = open_io(info, ca).await?;
        let mut w = Self {
            io,
            buf: BytesMut::with_capacity(1 << 16),
            sent: VecDeque::new(),
            field: field.as_bytes().to_vec(),
            max_bytes,
        };
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            let mut auth = vec!["AUTH".to_string()];
            auth.extend(settings.username().map(str::to_string));
            auth.push(password.to_string());
            w.command(&auth).await?;
            w.simple().await.map_err(|e| format!("AUTH: {e}"))?;
        }
        if settings.db() != 0 {
            w.command(&["SELECT".to_string(), settings.db().to_string()]).await?;
            w.simple().await.map_err(|e| format!("SELECT: {e}"))?;
        }
        Ok(w)
    }

    /// Sends a command whose reply is a read's (XREADGROUP, XCLAIM); the
    /// replies come back in order, by [`Wire::entries`].
    pub async fn send(&mut self, args: &[String]) -> Result<(), String> {
        self.command(args).await?;
        self.sent.push_back(());
        Ok(())
    }

    /// Reads sent and not yet answered.
    pub fn pending(&self) -> usize {
        self.sent.len()
    }

    async fn command(&mut self, args: &[String]) -> Result<(), String> {
        let mut cmd = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            cmd.extend_from_slice(a.as_bytes());
            cmd.extend_from_slice(b"\r\n");
        }
        self.io.write_all(&cmd).await.map_err(|e| e.to_string())
    }

    /// The reply of the oldest read sent, per stream key (XREADGROUP) or
    /// under one empty key (XCLAIM: `stream` is false). `wait`: how long
    /// the read may block in Redis; a reply later than that by 5 s is an
    /// outage.
    pub async fn entries(&mut self, stream: bool, wait: Duration) -> Result<Vec<(String, Vec<WireEntry>)>, String> {
        let deadline = tokio::time::Instant::now() + wait + Duration::from_secs(5);
        let read = async {
            let out = if stream { self.read_reply().await? } else { vec![(String::new(), self.entry_list().await?)] };
            Ok::<_, String>(out)
        };
        let out = tokio::time::timeout_at(deadline, read).await.map_err(|_| "no reply from redis".to_string())??;
        self.sent.pop_front();
        Ok(out)
    }

    async fn read_reply(&mut self) -> Result<Vec<(String, Vec<WireEntry>)>, String> {
        let n = match self.header().await? {
            Header::Array(n) if n < 0 => return Ok(vec![]),
            Header::Array(n) => n as usize,
            other => return Err(format!("unexpected reply to a stream read: {other:?}")),
        };
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            self.expect_array(2).await?;
            let key = self.text().await?;
            out.push((key, self.entry_list().await?));
        }
        Ok(out)
    }

    async fn entry_list(&mut self) -> Result<Vec<WireEntry>, String> {
        let n = match self.header().await? {
            Header::Array(n) if n < 0 => return Ok(vec![]),
            Header::Array(n) => n as usize,
            other => return Err(format!("unexpected reply to a stream read: {other:?}")),
        };
        let mut out = Vec::with_capacity(n.min(10_000));
        for _ in 0..n {
            out.push(self.entry().await?);
        }
        Ok(out)
    }

    async fn entry(&mut self) -> Result<WireEntry, String> {
        let mut e = WireEntry::default();
        // An entry is [id, fields]; XCLAIM of an entry trimmed meanwhile
        // gives nil for it, or nil fields.
        match self.header().await? {
            Header::Array(2) => {}
            Header::Array(_) | Header::Bulk(-1) => {
                e.deleted = true;
                return Ok(e);
            }
            other => return Err(format!("unexpected stream entry: {other:?}")),
        }
        e.id = self.text().await?;
        let n = match self.header().await? {
            Header::Array(n) if n >= 0 => n as usize / 2,
            _ => {
                e.deleted = true;
                return Ok(e);
            }
        };
        for i in 0..n {
            let name = self.bulk(256).await?;
            let name = match name {
                Payload::Whole(b) => b,
                Payload::Cut { head, .. } => head,
            };
            if e.value.is_none() && name == self.field {
                e.value = Some(self.bulk(self.max_bytes).await?);
            } else if i == 0 {
                e.first = Some(self.bulk(HEAD).await?);
            } else {
                self.bulk(0).await?;
            }
            if e.names.len() < NAMES {
                e.names.push(String::from_utf8_lossy(&name).into_owned());
            }
        }
        Ok(e)
    }

    async fn expect_array(&mut self, n: i64) -> Result<(), String> {
        match self.header().await? {
            Header::Array(m) if m == n => Ok(()),
            other => Err(format!("unexpected reply to a stream read: {other:?}")),
        }
    }

    async fn text(&mut self) -> Result<String, String> {
        match self.bulk(4096).await? {
            Payload::Whole(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Payload::Cut { .. } => Err("a stream key or entry id over 4 KiB".into()),
        }
    }

    /// A simple reply (`+OK`), or the error it is.
    async fn simple(&mut self) -> Result<(), String> {
        match self.header().await? {
            Header::Simple(_) => Ok(()),
            other => Err(format!("unexpected reply: {other:?}")),
        }
    }

    /// More bytes from the socket.
    async fn fill(&mut self) -> Result<(), String> {
        self.buf.reserve(1 << 16);
        match self.io.read_buf(&mut self.buf).await {
            Ok(0) => Err("connection closed by redis".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A reply's type and its number (or text), from one CRLF-ended line.
    async fn header(&mut self) -> Result<Header, String> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(end + 2);
                let text = String::from_utf8_lossy(&line[1..end]).into_owned();
                let number = || text.parse::<i64>().map_err(|_| format!("bad reply line {text:?}"));
                return match line[0] {
                    b'*' => Ok(Header::Array(number()?)),
                    b'$' => Ok(Header::Bulk(number()?)),
                    b':' => Ok(Header::Int(number()?)),
                    b'+' => Ok(Header::Simple(text)),
                    b'-' => Err(text),
                    other => Err(format!("unexpected reply type {:?}", other as char)),
                };
            }
            if self.buf.len() > 64 << 10 {
                return Err("a reply line over 64 KiB".into());
            }
            self.fill().await?;
        }
    }

    /// A bulk string: whole when at most `keep` bytes, else cut to its first
    /// [`HEAD`] bytes (`keep` 0: nothing kept) with its length and hash.
    /// Never holds more than `keep` (or [`HEAD`]) bytes of it at once.
    async fn bulk(&mut self, keep: usize) -> Result<Payload, String> {
        let n = match self.header().await? {
            Header::Bulk(n) if n < 0 => return Ok(Payload::Whole(Vec::new())),
            Header::Bulk(n) => n as usize,
            Header::Int(i) => return Ok(Payload::Whole(i.to_string().into_bytes())),
            Header::Simple(s) => return Ok(Payload::Whole(s.into_bytes())),
            other => return Err(format!("unexpected reply: {other:?}")),
        };
        let out = if n <= keep {
            while self.buf.len() < n {
                self.fill().await?;
            }
            Payload::Whole(self.buf.split_to(n).to_vec())
        } else {
            let head_len = if keep == 0 { 0 } else { HEAD.min(n) };
            let mut head = Vec::with_capacity(head_len);
            let mut hash = sha2::Sha256::new();
            let mut left = n;
            while left > 0 {
                if self.buf.is_empty() {
                    self.fill().await?;
                }
                let take = left.min(self.buf.len());
                let chunk = &self.buf[..take];
                if head.len() < head_len {
                    head.extend_from_slice(&chunk[..take.min(head_len - head.len())]);
                }
                hash.update(chunk);
                self.buf.advance(take);
                left -= take;
            }
            let sha256 = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
            Payload::Cut { head, len: n, sha256 }
        };
        while self.buf.len() < 2 {
            self.fill().await?;
        }
        if &self.buf[..2] != b"\r\n" {
            return Err("a bulk string not ended by CRLF".into());
        }
        self.buf.advance(2);
        Ok(out)
    }
}

#[derive(Debug)]
enum Header {
    Array(i64),
    Bulk(i64),
    Int(i64),
    Simple(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wire over an in-memory pipe fed `bytes` in pieces of `step`.
    async fn read(bytes: Vec<u8>, step: usize, field: &str, max: usize) -> Vec<(String, Vec<WireEntry>)> {
        let (client, mut server) = tokio::io::duplex(64);
        let feed = tokio::spawn(async move {
            for chunk in bytes.chunks(step.max(1)) {
                if server.write_all(chunk).await.is_err() {
                    break;
                }
            }
            server
        });
        let mut w = Wire {
            io: Box::new(client),
            buf: BytesMut::new(),
            sent: VecDeque::from([()]),
            field: field.as_bytes().to_vec(),
            max_bytes: max,
        };
        let out = w.entries(true, Duration::from_secs(5)).await.expect("a reply");
        drop(feed);
        out
    }

    fn bulk(b: &[u8]) -> Vec<u8> {
        [format!("${}\r\n", b.len()).as_bytes(), b, b"\r\n"].concat()
    }

    #[tokio::test]
    async fn a_reply_is_read_as_it_comes_and_large_values_are_cut_with_their_hash() {
        let big = vec![b'x'; 5000];
        let mut wire = b"*1\r\n*2\r\n".to_vec();
        wire.extend(bulk(b"tx"));
        wire.extend(b"*3\r\n");
        for (id, fields) in [
            ("1-0", vec![(&b"payload"[..], &b"{\"a\":1}"[..])]),
            ("2-0", vec![(&b"other"[..], &b"v"[..]), (&b"payload"[..], big.as_slice())]),
            ("3-0", vec![(&b"nope"[..], &b"first value"[..])]),
        ] {
            wire.extend(b"*2\r\n");
            wire.extend(bulk(id.as_bytes()));
            wire.extend(format!("*{}\r\n", fields.len() * 2).as_bytes());
            for (k, v) in fields {
                wire.extend(bulk(k));
                wire.extend(bulk(v));
            }
        }
        for step in [1, 7, 4096] {
            let out = read(wire.clone(), step, "payload", 1000).await;
            let (key, entries) = &out[0];
            assert_eq!(key, "tx");
            assert_eq!(entries[0].value, Some(Payload::Whole(b"{\"a\":1}".to_vec())));
            let sha: String = sha2::Sha256::digest(&big).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(entries[1].value, Some(Payload::Cut { head: big[..HEAD].to_vec(), len: 5000, sha256: sha }));
            assert_eq!(entries[2].value, None);
            assert_eq!(entries[2].names, vec!["nope".to_string()]);
            assert_eq!(entries[2].first, Some(Payload::Whole(b"first value".to_vec())));
        }
        assert!(read(b"*-1\r\n".to_vec(), 1, "payload", 10).await.is_empty());
        // An entry deleted while pending: its fields are nil.
        let out = read(b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n2-0\r\n*-1\r\n".to_vec(), 3, "payload", 10).await;
        assert!(out[0].1[0].deleted && out[0].1[0].id == "2-0");
    }
}
