//! The redis stream source: reads messages, decodes them into micro-batches
//! (`batch: {max_rows, max_wait}`) and hands each batch, with the stream entry
//! ids it holds, to the executor. A partitioned stream is read as the
//! partitions' streams this shard owns, in one XREADGROUP. Refused messages
//! go to the dead letter at once. On a lost connection it reconnects with
//! backoff; the batch being filled is kept.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::SchemaRef;
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, watch};

use super::connect;
use super::dead_letter::{DeadLetters, Letter};
use super::subscriber::Subscriber;
use super::wire::{Payload, Wire, WireEntry};
use crate::connectors::codec::json::{Checks, Decoder, Read as At};
use crate::connectors::Backoff;
use crate::connectors::{Delivery, Token};

/// What to read and how.
pub struct Config {
    pub node: String,
    pub endpoint: super::Endpoint,
    pub channel: Option<String>,
    /// The Redis streams read (the partitions this shard owns); empty for a channel.
    pub streams: Vec<String>,
    pub group: String,
    pub consumer: String,
    pub field: String,
    pub max_rows: usize,
    pub max_wait: Duration,
    /// A batch goes on once its messages take this many bytes.
    pub max_bytes: usize,
    pub max_deliveries: u32,
    /// Entries pending this long with another consumer are claimed.
    pub reclaim_after: Duration,
    pub max_message_bytes: usize,
    /// Timestamps this far ahead of the clock are refused (or clamped).
    pub max_future: Duration,
    pub clamp_future: bool,
    /// The partition of each of `streams`, and the partitions in all, with
    /// the partition key column: an entry must belong where it was read.
    pub partitions: Option<(String, u32, Vec<u32>)>,
}

/// Signals between the source and the executor.
pub struct Control {
    pub shutdown: watch::Receiver<bool>,
    pub connected: Arc<AtomicBool>,
}

/// Reads until shutdown, then hands over the last partial batch and returns.
pub async fn run(
    cfg: Config,
    schema: SchemaRef,
    mut dead: DeadLetters,
    out: mpsc::Sender<Delivery>,
    mut ctl: Control,
) -> crate::error::Result<()> {
    let client = cfg.endpoint.client()?;
    let partition = cfg.partitions.as_ref().and_then(|(col, n, _)| {
        let i = schema.index_of(col).ok()?;
        Some((i, *n, super::partition::of as fn(&[u8], u32) -> u32))
    });
    let checks = Checks {
        max_bytes: cfg.max_message_bytes,
        max_future: Some(cfg.max_future),
        clamp_future: cfg.clamp_future,
        partition,
    };
    let mut r = Reader {
        cursors: vec!["-".to_string(); cfg.streams.len()],
        others: vec!["-".to_string(); cfg.streams.len()],
        own_done: false,
        decoder: Decoder::new(schema, checks),
        ids: vec![],
        first_at: None,
        cfg,
    };
    let mut backoff = Backoff::default();
    loop {
        let outcome = if r.cfg.streams.is_empty() {
            r.read_channel(&client, &mut dead, &out, &mut ctl, &mut backoff).await
        } else {
            r.read_stream(&client, &mut dead, &out, &mut ctl, &mut backoff).await
        };
        ctl.connected.store(false, Ordering::Relaxed);
        metrics::gauge!("engine_source_connected", "source" => r.cfg.node.clone()).set(0.0);
        match outcome {
            Ok(()) => break,
            Err(e) => {
                let wait = backoff.wait();
                tracing::warn!(source = %r.cfg.node, "redis: {e}; reconnecting in {wait:?}");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = ctl.shutdown.changed() => {}
                }
                if *ctl.shutdown.borrow() {
                    break;
                }
            }
        }
    }
    r.flush(&out).await;
    Ok(())
}

struct Reader {
    /// Per stream, where the pass over this consumer's own pending entries goes on.
    cursors: Vec<String>,
    /// Per stream, where the pass over other consumers' idle entries goes
    /// on: entries of a dead consumer are reached however many of this
    /// one's own come before them.
    others: Vec<String>,
    own_done: bool,
    decoder: Decoder,
    /// The entries of the batch being filled: the stream's place in
    /// `cfg.streams`, and the entry id.
    ids: Vec<(usize, String)>,
    first_at: Option<Instant>,
    cfg: Config,
}

fn up(cfg: &Config, ctl: &Control, backoff: &mut Backoff) {
    ctl.connected.store(true, Ordering::Relaxed);
    metrics::gauge!("engine_source_connected", "source" => cfg.node.clone()).set(1.0);
    backoff.reset();
}

impl Reader {
    /// Takes one message (of stream `s`, for an entry); a refused one becomes a dead letter.
    fn take(&mut self, id: Option<(usize, String)>, payload: &[u8], letters: &mut Vec<Letter>) {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let partition = match (&self.cfg.partitions, &id) {
            (Some((_, n, of)), Some((s, _))) if *n > 1 => of.get(*s).copied(),
            _ => None,
        };
        let taken = self.decoder.push(payload, At { now_us, partition });
        let future = self.decoder.take_future();
        if future > 0 {
            metrics::counter!("engine_future_events_total", "source" => self.cfg.node.clone()).increment(future);
        }
        match taken {
            Ok(()) => {
                self.first_at.get_or_insert_with(Instant::now);
                if let Some(id) = id {
                    self.ids.push(id);
                }
            }
            Err(reason) => letters.push(Letter::new(payload, reason, id.map(|i| i.1))),
        }
    }

    /// Takes one entry of stream `s`.
    fn take_entry(&mut self, s: usize, e: WireEntry, letters: &mut Vec<Letter>, gone: &mut Vec<String>) {
        if e.deleted {
            gone.push(e.id); // deleted from the stream (trimmed) while pending
            return;
        }
        match e.value {
            Some(Payload::Whole(v)) => self.take(Some((s, e.id)), &v, letters),
            Some(cut @ Payload::Cut { len, .. }) => {
                let reason =
                    format!("message is {len} bytes, more than the limit of {}", self.cfg.max_message_bytes);
                letters.push(Letter::of(cut, reason, Some(e.id)));
            }
            None => {
                let reason =
                    format!("entry has no field '{}' (fields: {})", self.cfg.field, e.names.join(", "));
                let payload = e.first.unwrap_or(Payload::Whole(Vec::new()));
                letters.push(Letter::of(payload, reason, Some(e.id)));
            }
        }
    }

    fn due(&self) -> bool {
        self.decoder.rows() >= self.cfg.max_rows
            || self.decoder.bytes() >= self.cfg.max_bytes
            || self.first_at.is_some_and(|t| t.elapsed() >= self.cfg.max_wait)
    }

    /// How long a read may wait for more messages.
    fn wait(&self, idle: Duration) -> Duration {
        match self.first_at {
            None => idle,
            Some(t) => self.cfg.max_wait.saturating_sub(t.elapsed()).max(Duration::from_millis(1)),
        }
    }

    async fn flush(&mut self, out: &mpsc::Sender<Delivery>) {
        let Some(first_at) = self.first_at.take() else { return };
        match self.decoder.finish() {
            Ok(batch) => {
                let token = Token::new(std::mem::take(&mut self.ids));
                let _ = out.send(Delivery { batch, token, first_at }).await;
            }
            Err(e) => tracing::error!(source = %self.cfg.node, "cannot build a batch: {e}"),
        }
    }

    async fn read_stream(
        &mut self,
        client: &redis::Client,
        dead: &mut DeadLetters,
        out: &mpsc::Sender<Delivery>,
        ctl: &mut Control,
        backoff: &mut Backoff,
    ) -> Result<(), String> {
        let mut conn = connect(client, Duration::from_secs(1)).await.map_err(|e| e.to_string())?;
        for stream in &self.cfg.streams {
            create_group(&mut conn, stream, &self.cfg.group).await?;
        }
        // Reads and claims go over a connection of their own, parsed as
        // they arrive (see `wire`).
        let ca = self.cfg.endpoint.ca.clone();
        // Values up to what a dead letter keeps whole are read whole (the
        // decoder refuses those over `max_message_bytes`); longer ones cut.
        let keep = self.cfg.max_message_bytes.max(super::dead_letter::KEPT_WHOLE);
        let mut wire = Wire::connect(client, ca.as_deref(), &self.cfg.field, keep).await?;
        up(&self.cfg, ctl, backoff);
        let mut reclaim_at = Instant::now();
        // Own pending entries are looked at once per process: after a
        // reconnect, those are the batches in flight.
        let mut own_pending = !self.own_done;
        // A read sent before the last reply was decoded: its count and wait.
        let mut inflight: Option<(usize, Duration)> = None;
        loop {
            if *ctl.shutdown.borrow() {
                return Ok(());
            }
            if inflight.is_none() && Instant::now() >= reclaim_at {
                let mut more = false;
                for s in 0..self.cfg.streams.len() {
                    let mut letters = Vec::new();
                    let mut gone = Vec::new();
                    let (seen, claimed) = self.reclaim(&mut conn, &mut wire, s, own_pending, &mut letters).await?;
                    more |= seen >= 1000;
                    for e in claimed {
                        self.take_entry(s, e, &mut letters, &mut gone);
                        if self.decoder.rows() >= self.cfg.max_rows || self.decoder.bytes() >= self.cfg.max_bytes {
                            self.flush(out).await;
                        }
                    }
                    self.refuse(&mut conn, s, dead, letters, gone).await?;
                }
                if !more {
                    own_pending = false;
                    self.own_done = true;
                    reclaim_at =
                        Instant::now() + (self.cfg.reclaim_after / 2).max(Duration::from_millis(500));
                }
            }
            let (count, block) = match inflight.take() {
                Some(sent) => sent,
                None => self.read(&mut wire, self.decoder.rows()).await?,
            };
            let streams = tokio::select! {
                r = wire.entries(true, block) => r?,
                _ = ctl.shutdown.changed() => continue,
            };
            let received: usize = streams.iter().map(|(_, e)| e.len()).sum();
            // A full reply: more is likely waiting (a backlog, a burst). The
            // next read goes out now, so that Redis prepares it while this
            // one is decoded. A reply short of what was asked leaves the
            // streams empty: the next read waits for the batch to go on.
            if received >= count && !*ctl.shutdown.borrow() && Instant::now() < reclaim_at {
                inflight = Some(self.read(&mut wire, self.decoder.rows() + received).await?);
            }
            for (key, entries) in streams {
                let Some(s) = self.cfg.streams.iter().position(|k| *k == key) else { continue };
                let mut letters = Vec::new();
                let mut gone = Vec::new();
                for e in entries {
                    self.take_entry(s, e, &mut letters, &mut gone);
                }
                self.refuse(&mut conn, s, dead, letters, gone).await?;
            }
            // Fewer entries than asked for: the streams hold nothing more
            // now, so the batch goes on at once rather than at `max_wait`,
            // unless the stages after are still busy with earlier ones (then
            // it grows meanwhile). Under load reads come back full and
            // batches stay large.
            let idle = out.capacity() == out.max_capacity();
            if self.due() || (received < count && idle) {
                self.flush(out).await;
            }
        }
    }

    /// Sends an XREADGROUP for the batch being filled, which holds `filled`
    /// rows (a full one: for the next batch); returns its count and how
    /// long it may block. It waits for new entries until the batch is due,
    /// or up to 500 ms for a batch not started.
    async fn read(&self, wire: &mut Wire, filled: usize) -> Result<(usize, Duration), String> {
        let (count, block) = match self.cfg.max_rows.checked_sub(filled) {
            Some(0) | None => (self.cfg.max_rows, Duration::from_millis(500)),
            Some(n) if filled == 0 => (n, self.wait(Duration::from_millis(500))),
            // Rows taken but maybe not yet decoded (a read sent before
            // its batch's first row was): up to `max_wait` from now.
            Some(n) => (n, self.wait(self.cfg.max_wait)),
        };
        let block = Duration::from_millis(block.as_millis().max(1) as u64);
        let mut args: Vec<String> = ["XREADGROUP", "GROUP", &self.cfg.group, &self.cfg.consumer, "COUNT"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(count.to_string());
        args.push("BLOCK".into());
        args.push(block.as_millis().to_string());
        args.push("STREAMS".into());
        args.extend(self.cfg.streams.iter().cloned());
        args.extend(self.cfg.streams.iter().map(|_| ">".to_string()));
        wire.send(&args).await?;
        Ok((count, block))
    }

    /// Stores the dead letters of stream `s` and acknowledges them, with
    /// the entries `gone` from it.
    async fn refuse(
        &mut self,
        conn: &mut MultiplexedConnection,
        s: usize,
        dead: &mut DeadLetters,
        letters: Vec<Letter>,
        mut gone: Vec<String>,
    ) -> Result<(), String> {
        if letters.is_empty() && gone.is_empty() {
            return Ok(());
        }
        dead.write(conn, &letters).await?;
        gone.extend(letters.into_iter().filter_map(|l| l.entry_id));
        ack(conn, &self.cfg.streams[s], &self.cfg.group, &gone).await.map_err(|e| e.to_string())
    }

    async fn read_channel(
        &mut self,
        client: &redis::Client,
        dead: &mut DeadLetters,
        out: &mpsc::Sender<Delivery>,
        ctl: &mut Control,
        backoff: &mut Backoff,
    ) -> Result<(), String> {
        let channel = self.cfg.channel.clone().unwrap_or_default();
        let mut sub = Subscriber::connect(client, self.cfg.endpoint.ca.as_deref(), &channel).await?;
        // Dead letters go out on a second connection: a subscribed one takes no other commands.
        let mut conn = connect(client, Duration::from_secs(1)).await.map_err(|e| e.to_string())?;
        up(&self.cfg, ctl, backoff);
        loop {
            if *ctl.shutdown.borrow() {
                return Ok(());
            }
            let mut letters = Vec::new();
            // Up to a full batch of what has arrived; the clock is read after.
            sub.drain(|payload| {
                self.take(None, payload, &mut letters);
                self.decoder.rows() < self.cfg.max_rows
            })?;
            dead.write(&mut conn, &letters).await?;
            if self.decoder.rows() < self.cfg.max_rows && sub.try_fill()? {
                continue; // more has arrived: into this batch
            }
            // Nothing more buffered (or a full batch): the batch goes on now,
            // unless the stages after are busy (then at `max_wait`).
            if self.due() || (self.first_at.is_some() && out.capacity() == out.max_capacity()) {
                self.flush(out).await;
                continue;
            }
            let wait = self.wait(Duration::from_millis(500));
            tokio::select! {
                read = tokio::time::timeout(wait, sub.fill()) => {
                    if let Ok(Err(e)) = read {
                        return Err(format!("subscription to '{channel}': {e}"));
                    }
                }
                _ = ctl.shutdown.changed() => {}
            }
        }
    }

    /// Claims pending entries: this consumer's own (left by an earlier run
    /// under the same name), or other consumers' entries idle past
    /// `reclaim_after`. Entries already delivered `max_deliveries` times
    /// become dead letters instead. Returns how many pending entries were
    /// looked at, and the claimed entries to process.
    async fn reclaim(
        &mut self,
        conn: &mut MultiplexedConnection,
        wire: &mut Wire,
        s: usize,
        own: bool,
        letters: &mut Vec<Letter>,
    ) -> Result<(usize, Vec<WireEntry>), String> {
        let stream = self.cfg.streams[s].clone();
        let idle = if own { 0 } else { self.cfg.reclaim_after.as_millis() as u64 };
        let mut cmd = redis::cmd("XPENDING");
        let start = if own { self.cursors[s].clone() } else { self.others[s].clone() };
        cmd.arg(&stream).arg(&self.cfg.group).arg("IDLE").arg(idle).arg(start).arg("+").arg(1000);
        if own {
            cmd.arg(&self.cfg.consumer);
        }
        let pending: Vec<(String, String, u64, u64)> =
            cmd.query_async(&mut *conn).await.map_err(|e| e.to_string())?;
        match (own, pending.last()) {
            (true, Some(last)) => self.cursors[s] = format!("({}", last.0),
            // A full page: the next pass goes on after it; a short one
            // reached the end, and the next starts over.
            (false, Some(last)) if pending.len() >= 1000 => self.others[s] = format!("({}", last.0),
            (false, _) => self.others[s] = "-".to_string(),
            (true, None) => {}
        }
        let chosen: Vec<&(String, String, u64, u64)> =
            pending.iter().filter(|p| own || p.1 != self.cfg.consumer).collect();
        if chosen.is_empty() {
            return Ok((pending.len(), vec![]));
        }
        let mut args: Vec<String> =
            vec!["XCLAIM".into(), stream.clone(), self.cfg.group.clone(), self.cfg.consumer.clone(), idle.to_string()];
        args.extend(chosen.iter().map(|p| p.0.clone()));
        wire.send(&args).await?;
        let claimed = wire.entries(false, Duration::ZERO).await?.pop().map(|(_, e)| e).unwrap_or_default();
        let mut take = Vec::new();
        for e in claimed {
            let deliveries = chosen.iter().find(|p| p.0 == e.id).map_or(0, |p| p.3);
            if deliveries >= u64::from(self.cfg.max_deliveries) && !e.deleted {
                let reason = format!("not acknowledged after {deliveries} deliveries");
                let payload = e.value.or(e.first).unwrap_or(Payload::Whole(Vec::new()));
                letters.push(Letter::of(payload, reason, Some(e.id)));
            } else {
                take.push(e);
            }
        }
        if !take.is_empty() {
            tracing::info!(source = %self.cfg.node, "claimed {} pending entries", take.len());
        }
        Ok((pending.len(), take))
    }
}

async fn create_group(conn: &mut MultiplexedConnection, stream: &str, group: &str) -> Result<(), String> {
    let r: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match r {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other.map_err(|e| format!("cannot create consumer group '{group}' on '{stream}': {e}")),
    }
}

/// Acknowledges entries of `stream` in `group`.
pub async fn ack(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    ids: &[String],
) -> redis::RedisResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    for chunk in ids.chunks(10_000) {
        redis::cmd("XACK").arg(stream).arg(group).arg(chunk).query_async::<i64>(&mut *conn).await?;
    }
    Ok(())
}
