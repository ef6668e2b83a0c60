//! A Pub/Sub subscription read in place: each message's payload goes from
//! the socket buffer straight to the decoder.
//!
//! Hand-written rather than the redis crate's async `PubSub`, which parses
//! every message with its general RESP parser into an owned `Msg` and queues
//! it on an unbounded channel: about 0.8 µs a message, more than decoding and
//! all the rules together, and an engine that falls behind keeps the backlog
//! in its own memory. A subscribed connection receives one shape of reply
//! (arrays of a kind, a channel and a payload), which this reads without
//! copying; a backlog stays in Redis, under its `client-output-buffer-limit`.
//! The address and credentials come from the redis crate's parsed URL, and
//! every other command still goes through the crate. `rediss://` goes over
//! rustls (the crate's own TLS is not reachable from outside it), trusting
//! the connection's CA file or else the public authorities, as the crate does.

use std::ops::Range;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use redis::ConnectionAddr;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A socket to the server of `info`: TCP, TLS (trusting the PEM
/// certificates `ca` if given, else the public authorities) or Unix.
pub(super) async fn open_io(info: &redis::ConnectionInfo, ca: Option<&[u8]>) -> Result<Box<dyn Io>, String> {
    Ok(match info.addr() {
        ConnectionAddr::Tcp(host, port) => Box::new(tcp(host, *port).await?),
        ConnectionAddr::TcpTls { host, port, insecure, .. } => {
            if *insecure {
                return Err("this connection checks the server's certificate: remove \
                     '#insecure' from the URL, or give the CA in 'tls.ca_file'"
                    .into());
            }
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("'{host}' is not a TLS server name: {e}"))?;
            let stream = tcp(host, *port).await?;
            let tls = tokio_rustls::TlsConnector::from(tls_config(ca)?);
            let stream = tokio::time::timeout(Duration::from_secs(5), tls.connect(name, stream))
                .await
                .map_err(|_| format!("TLS handshake with {host}:{port} timed out"))?
                .map_err(|e| format!("TLS handshake with {host}:{port}: {e}"))?;
            Box::new(stream)
        }
        #[cfg(unix)]
        ConnectionAddr::Unix(path) => Box::new(
            tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?,
        ),
        other => return Err(format!("connecting over {other} is not supported")),
    })
}

/// A connection subscribed to one channel.
pub struct Subscriber {
    io: Box<dyn Io>,
    buf: BytesMut,
}

/// One RESP reply of a subscribed connection: an array of at most 4 scalars.
#[derive(Debug)]
struct Frame {
    items: [Range<usize>; 4],
    len: usize,
    /// Bytes the reply takes in the buffer.
    size: usize,
}

impl Subscriber {
    /// Connects as `client` would, authenticates, and subscribes to
    /// `channel`; over TLS, trusting the PEM certificates `ca` if given.
    pub async fn connect(client: &redis::Client, ca: Option<&[u8]>, channel: &str) -> Result<Self, String> {
        let info = client.get_connection_info();
        let io = open_io(info, ca).await?;
        let mut sub = Self { io, buf: BytesMut::with_capacity(1 << 16) };
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            let mut auth = vec!["AUTH"];
            auth.extend(settings.username());
            auth.push(password);
            sub.send(&auth).await?;
            sub.reply().await.map_err(|e| format!("AUTH: {e}"))?;
        }
        sub.send(&["SUBSCRIBE", channel]).await?;
        loop {
            let frame = sub.reply().await?;
            let kind = sub.item(&frame, 0).to_vec();
            sub.buf.advance(frame.size);
            if kind == b"subscribe" {
                return Ok(sub);
            }
        }
    }

    /// Reads what the socket has (waiting for at least one byte).
    pub async fn fill(&mut self) -> Result<(), String> {
        self.buf.reserve(1 << 16);
        match self.io.read_buf(&mut self.buf).await {
            Ok(0) => Err("connection closed by redis (it also closes subscribers that fall behind \
                 its client-output-buffer-limit for pubsub; messages queued for them are lost)"
                .into()),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Reads what the socket has right now, without waiting: whether
    /// anything came. (Polling `read_buf` once and dropping it when pending
    /// loses nothing: it writes to the buffer only when ready.)
    pub fn try_fill(&mut self) -> Result<bool, String> {
        use futures::FutureExt;
        self.buf.reserve(1 << 16);
        match self.io.read_buf(&mut self.buf).now_or_never() {
            None => Ok(false),
            Some(Ok(0)) => Err("connection closed by redis".into()),
            Some(Ok(_)) => Ok(true),
            Some(Err(e)) => Err(e.to_string()),
        }
    }

    /// Hands the payload of each complete message in the buffer to `take`,
    /// until `take` returns false or no complete message is left.
    pub fn drain(&mut self, mut take: impl FnMut(&[u8]) -> bool) -> Result<(), String> {
        let mut used = 0;
        let mut more = true;
        while more {
            let Some(frame) = parse(&self.buf[used..])? else { break };
            let at = |i: usize| {
                let r = frame.items[i].clone();
                &self.buf[used + r.start..used + r.end]
            };
            match (at(0), frame.len) {
                (b"message", 3) => more = take(at(2)),
                (b"pmessage", 4) => more = take(at(3)),
                _ => {} // (un)subscribe confirmations, pong
            }
            used += frame.size;
        }
        self.buf.advance(used);
        Ok(())
    }

    async fn send(&mut self, args: &[&str]) -> Result<(), String> {
        let mut cmd = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            cmd.extend_from_slice(a.as_bytes());
            cmd.extend_from_slice(b"\r\n");
        }
        self.io.write_all(&cmd).await.map_err(|e| e.to_string())
    }

    /// The next reply, read whole (left in the buffer).
    async fn reply(&mut self) -> Result<Frame, String> {
        loop {
            if let Some(f) = parse(&self.buf)? {
                return Ok(f);
            }
            tokio::time::timeout(Duration::from_secs(5), self.fill())
                .await
                .map_err(|_| "no reply from redis".to_string())??;
        }
    }

    fn item(&self, f: &Frame, i: usize) -> &[u8] {
        &self.buf[f.items[i].clone()]
    }
}

async fn tcp(host: &str, port: u16) -> Result<tokio::net::TcpStream, String> {
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect((host, port)))
        .await
        .map_err(|_| format!("connecting to {host}:{port} timed out"))?
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(stream)
}

/// A rustls client trusting the PEM certificates `ca`, or the public
/// authorities (webpki-roots) without them.
fn tls_config(ca: Option<&[u8]>) -> Result<std::sync::Arc<tokio_rustls::rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(pem) => {
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("tls.ca_file: {e}"))?;
                roots.add(cert).map_err(|e| format!("tls.ca_file: {e}"))?;
            }
            if roots.is_empty() {
                return Err("tls.ca_file holds no PEM certificate".into());
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// The CRLF-ended line at `at`, without its CRLF, and where the next begins.
fn line(buf: &[u8], at: usize) -> Option<(Range<usize>, usize)> {
    let end = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
    Some((at..end, end + 2))
}

fn number(buf: &[u8], r: Range<usize>) -> Result<i64, String> {
    std::str::from_utf8(&buf[r.clone()])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad length in reply: {:?}", String::from_utf8_lossy(&buf[r])))
}

/// One reply at the start of `buf`, or `None` when it has not all arrived.
/// A scalar reply counts as a one-item array; an error reply is an error.
fn parse(buf: &[u8]) -> Result<Option<Frame>, String> {
    let mut f = Frame { items: Default::default(), len: 0, size: 0 };
    let Some(&first) = buf.first() else { return Ok(None) };
    let (count, mut at) = if first == b'*' {
        let Some((r, next)) = line(buf, 1) else { return Ok(None) };
        let n = number(buf, r)?;
        if !(0..=4).contains(&n) {
            return Err(format!("unexpected reply of {n} items on a subscribed connection"));
        }
        (n as usize, next)
    } else {
        (1, 0)
    };
    for i in 0..count {
        let Some(&kind) = buf.get(at) else { return Ok(None) };
        let Some((r, next)) = line(buf, at + 1) else { return Ok(None) };
        f.items[i] = match kind {
            b'$' => {
                let n = number(buf, r)?;
                if n < 0 {
                    at = next;
                    0..0
                } else {
                    let end = next + n as usize;
                    if buf.len() < end + 2 {
                        return Ok(None);
                    }
                    at = end + 2;
                    next..end
                }
            }
            b'+' | b':' => {
                at = next;
                r
            }
            b'-' => return Err(String::from_utf8_lossy(&buf[r]).into_owned()),
            other => {
                return Err(format!("unexpected reply type {:?} on a subscribed connection", other as char))
            }
        };
    }
    f.len = count;
    f.size = at;
    Ok(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(buf: &[u8]) -> (Vec<Vec<u8>>, usize) {
        let mut out = Vec::new();
        let mut used = 0;
        while let Some(f) = parse(&buf[used..]).unwrap() {
            let item = |i: usize| buf[used + f.items[i].start..used + f.items[i].end].to_vec();
            if item(0) == b"message" {
                out.push(item(2));
            }
            used += f.size;
        }
        (out, used)
    }

    #[test]
    fn messages_are_read_whole_or_not_at_all() {
        let wire = b"*3\r\n$9\r\nsubscribe\r\n$2\r\ntx\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$2\r\ntx\r\n$11\r\n{\"a\":\r\n 12}\r\n*3\r\n$7\r\nmessage\r\n$2\r\ntx\r\n$0\r\n\r\n";
        let (all, used) = payloads(wire);
        assert_eq!(all, vec![b"{\"a\":\r\n 12}".to_vec(), b"".to_vec()]);
        assert_eq!(used, wire.len());
        for cut in 0..wire.len() {
            let (some, used) = payloads(&wire[..cut]);
            assert!(some.len() <= 2 && used <= cut, "cut at {cut}");
            assert_eq!(some, all[..some.len()].to_vec(), "cut at {cut}");
        }
        assert!(parse(b"-NOAUTH Authentication required.\r\n").unwrap_err().contains("NOAUTH"));
        assert!(parse(b"*9\r\n").is_err());
    }
}
