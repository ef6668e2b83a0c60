//! Dead letters of a stream source: messages that cannot become rows, and
//! entries delivered too often, kept with the reason and the raw payload in a
//! Redis stream on the source's connection or in a PostgreSQL table.

use sqlx::PgConnection;

use super::config::DeadLetter as DeadLetterSpec;
use crate::connectors::postgres::config::PostgresConnection;
use crate::spec::Spec;

/// One refused message.
pub struct Letter {
    /// The payload, or its first [`CUT_TO`] bytes when it is longer than
    /// [`KEPT_WHOLE`].
    pub payload: Vec<u8>,
    pub reason: String,
    /// The stream entry id (streams only).
    pub entry_id: Option<String>,
    /// A cut payload's length and SHA-256 (hex).
    pub cut: Option<(usize, String)>,
}

/// Payloads up to this size are kept whole in a dead letter.
pub const KEPT_WHOLE: usize = 65_536;
/// A longer payload keeps this many bytes, with its length and hash.
pub const CUT_TO: usize = 1024;

impl Letter {
    pub fn new(payload: &[u8], reason: String, entry_id: Option<String>) -> Self {
        let cut = (payload.len() > KEPT_WHOLE).then(|| {
            use sha2::Digest;
            let hash = sha2::Sha256::digest(payload);
            (payload.len(), hash.iter().map(|b| format!("{b:02x}")).collect::<String>())
        });
        let kept = if cut.is_some() { &payload[..CUT_TO] } else { payload };
        Self { payload: kept.to_vec(), reason, entry_id, cut }
    }

    /// A letter for a payload read as it came (see [`super::wire`]): whole,
    /// or already cut with its length and hash.
    pub fn of(payload: super::wire::Payload, reason: String, entry_id: Option<String>) -> Self {
        match payload {
            super::wire::Payload::Whole(v) => Self::new(&v, reason, entry_id),
            super::wire::Payload::Cut { mut head, len, sha256 } => {
                head.truncate(CUT_TO);
                Self { payload: head, reason, entry_id, cut: Some((len, sha256)) }
            }
        }
    }
}

enum Target {
    Stream { key: String, maxlen: u64 },
    Table {
        name: String,
        url: String,
        table: String,
        conn: Option<PgConnection>,
    },
    /// No dead letter configured: the refusal is logged.
    Log,
}

/// Where a source's refused messages go.
pub struct DeadLetters {
    source: String,
    target: Target,
    /// Log lines show refused payloads (`log_payloads: true`).
    log_payloads: bool,
}

impl DeadLetters {
    pub fn new(spec: &Spec, source: &str, dl: Option<&DeadLetterSpec>, log_payloads: bool) -> Self {
        let target = match dl {
            Some(DeadLetterSpec { stream: Some(s), maxlen, .. }) => Target::Stream {
                key: s.clone(),
                maxlen: maxlen.unwrap_or(super::config::DEFAULT_DEAD_LETTER_MAXLEN),
            },
            Some(DeadLetterSpec { connection: Some(c), table: Some(t), .. }) => {
                match spec
                    .pipeline
                    .connections
                    .get(c.value())
                    .and_then(|c| c.settings::<PostgresConnection>())
                {
                    Some(pg) => Target::Table {
                        name: c.value().clone(),
                        url: pg.url.clone(),
                        table: t.clone(),
                        conn: None,
                    },
                    _ => Target::Log,
                }
            }
            _ => Target::Log,
        };
        Self { source: source.to_string(), target, log_payloads }
    }

    /// Stores `letters`; on error nothing may be acknowledged.
    pub async fn write(
        &mut self,
        redis: &mut redis::aio::MultiplexedConnection,
        letters: &[Letter],
    ) -> Result<(), String> {
        if letters.is_empty() {
            return Ok(());
        }
        let at = now_rfc3339();
        match &mut self.target {
            Target::Stream { key, maxlen } => {
                let mut pipe = redis::pipe();
                for l in letters {
                    let cmd = pipe.cmd("XADD");
                    // Exact trimming: the stream never holds more than `maxlen`.
                    cmd.arg(key.as_str()).arg("MAXLEN").arg(*maxlen).arg("*");
                    if let Some((len, hash)) = &l.cut {
                        cmd.arg("payload_bytes").arg(*len).arg("payload_sha256").arg(hash);
                    }
                    cmd.arg("payload")
                        .arg(l.payload.as_slice())
                        .arg("reason")
                        .arg(&l.reason)
                        .arg("source")
                        .arg(&self.source)
                        .arg("entry_id")
                        .arg(l.entry_id.as_deref().unwrap_or(""))
                        .arg("at")
                        .arg(&at)
                        .ignore();
                }
                pipe.query_async::<()>(redis)
                    .await
                    .map_err(|e| format!("dead letter stream '{key}': {e}"))?;
            }
            Target::Table { name, url, table, conn } => {
                let c = match conn {
                    Some(c) => c,
                    None => {
                        let mut c = crate::connectors::postgres::connect(name, url)
                            .await
                            .map_err(|e| e.to_string())?;
                        create_table(&mut c, table)
                            .await
                            .map_err(|e| format!("dead letter table '{table}': {e}"))?;
                        conn.insert(c)
                    }
                };
                if let Err(e) = insert(c, table, &self.source, letters).await {
                    *conn = None;
                    return Err(format!("dead letter table '{table}': {e}"));
                }
            }
            Target::Log => {
                for l in letters {
                    let payload = if self.log_payloads {
                        format!(
                            "payload: {}",
                            String::from_utf8_lossy(&l.payload[..l.payload.len().min(200)])
                        )
                    } else {
                        format!(
                            "payload of {} bytes not shown (log_payloads: true shows it)",
                            l.payload.len()
                        )
                    };
                    tracing::warn!(
                        source = %self.source,
                        "message refused (no dead_letter configured): {}; {payload}",
                        l.reason,
                    );
                }
            }
        }
        metrics::counter!("engine_dead_letters_total", "source" => self.source.clone())
            .increment(letters.len() as u64);
        for l in letters {
            tracing::info!(source = %self.source, "dead letter: {}", l.reason);
        }
        Ok(())
    }
}

fn now_rfc3339() -> String {
    let us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default();
    datafusion::arrow::temporal_conversions::timestamp_us_to_datetime(us)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_default()
}

async fn create_table(conn: &mut PgConnection, table: &str) -> Result<(), sqlx::Error> {
    let table = crate::spec::sql::qualified(table);
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {table} (id bigserial PRIMARY KEY, source text NOT NULL, reason text NOT NULL, \
         payload text NOT NULL, entry_id text, received_at timestamptz NOT NULL DEFAULT now(), \
         payload_bytes bigint, payload_sha256 text)"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await?;
    // Tables made before payloads were cut lack the last two columns.
    let sql = format!(
        "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS payload_bytes bigint, \
         ADD COLUMN IF NOT EXISTS payload_sha256 text"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(conn).await.map(|_| ())
}

/// Text PostgreSQL takes: a NUL byte (which a `text` value cannot hold) becomes U+FFFD.
fn pg_text(s: &str) -> String {
    s.replace('\0', "\u{fffd}")
}

async fn insert(
    conn: &mut PgConnection,
    table: &str,
    source: &str,
    letters: &[Letter],
) -> Result<(), sqlx::Error> {
    let reasons: Vec<String> = letters.iter().map(|l| pg_text(&l.reason)).collect();
    let payloads: Vec<String> = letters.iter().map(|l| pg_text(&String::from_utf8_lossy(&l.payload))).collect();
    let ids: Vec<Option<String>> = letters.iter().map(|l| l.entry_id.as_deref().map(pg_text)).collect();
    let lens: Vec<Option<i64>> = letters.iter().map(|l| l.cut.as_ref().map(|c| c.0 as i64)).collect();
    let hashes: Vec<Option<&str>> = letters.iter().map(|l| l.cut.as_ref().map(|c| c.1.as_str())).collect();
    let sql = format!(
        "INSERT INTO {} (source, reason, payload, entry_id, payload_bytes, payload_sha256) \
         SELECT $1, r, p, i, n, h FROM unnest($2::text[], $3::text[], $4::text[], $5::int8[], $6::text[]) AS x(r, p, i, n, h)",
        crate::spec::sql::qualified(table)
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(pg_text(source))
        .bind(&reasons)
        .bind(&payloads)
        .bind(&ids)
        .bind(&lens)
        .bind(&hashes)
        .execute(conn)
        .await
        .map(|_| ())
}
