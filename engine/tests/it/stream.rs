//! `engine stream` against real Redis and PostgreSQL: alerts exactly once
//! across a SIGKILL, no loss through a PostgreSQL outage, dead letters for
//! malformed messages, Pub/Sub, and rules reloaded while the stream runs.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::postgres::{database, psql, server};
use super::{repo_dir, scratch, text};

pub(super) fn redis_url() -> String {
    std::env::var("ENGINE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

pub(super) fn redis() -> redis::Connection {
    redis::Client::open(redis_url()).expect("redis url").get_connection().expect("redis runs")
}

pub(super) fn event(id: i64, customer: i64, amount: f64, currency: &str) -> String {
    format!(
        r#"{{"transaction_id": {id}, "customer_id": {customer}, "merchant_id": "M000001", "amount": {amount:.2}, "currency": "{currency}", "timestamp": "2026-11-26T10:15:02.123Z"}}"#
    )
}

pub(super) fn xadd(c: &mut redis::Connection, stream: &str, payload: &str) {
    redis::cmd("XADD").arg(stream).arg("*").arg("payload").arg(payload).query::<String>(c).expect("XADD");
}

/// `pipelines/fraud.yaml` on its own stream, group, database and rules
/// folder, with the source keys a test needs.
pub(super) struct Setup {
    pub(super) dir: PathBuf,
    pub(super) db: String,
    pub(super) stream: String,
    pub(super) spec: PathBuf,
    pub(super) redis_url: String,
    pub(super) dwh_url: String,
}

/// `text` with each `(from, to)` replaced; `from` must be there.
fn replaced(mut text: String, edits: &[(&str, String)]) -> String {
    for (from, to) in edits {
        assert!(text.contains(from), "pipelines/fraud.yaml no longer has {from:?}");
        text = text.replace(from, to);
    }
    text
}

impl Setup {
    pub(super) fn new(name: &str, source_extra: &str, dwh_url: Option<String>) -> Self {
        let dir = scratch(&format!("stream-{name}"));
        let db = database(&format!("stream_{name}"));
        let stream = format!("it.{name}.{}", std::process::id());
        let partitions: Vec<String> = (0..8).map(|p| format!("{stream}:{p}")).collect();
        let _: () = redis::cmd("DEL")
            .arg(&stream)
            .arg(format!("{stream}.dlq"))
            .arg(&partitions)
            .query(&mut redis())
            .expect("DEL");
        std::fs::create_dir_all(dir.join("rules")).expect("rules dir");
        std::fs::copy(repo_dir().join("rules/fraud/large_amount.yaml"), dir.join("rules/large_amount.yaml"))
            .expect("copy rule");
        let fraud = std::fs::read_to_string(repo_dir().join("pipelines/fraud.yaml")).expect("fraud.yaml");
        let spec = replaced(
            fraud,
            &[
                ("rules: ../rules/fraud", "rules: rules".into()),
                (
                    "migrations: ../migrations/dwh",
                    format!("migrations: \"{}\"", repo_dir().join("migrations/dwh").display()),
                ),
                (
                    "    stream: financial_transactions\n    group: fraud\n    partitions: 4\n    partition_by: customer_id\n",
                    format!("    {}\n", source_extra.replace("$STREAM", &stream)),
                ),
                (
                    "dead_letter: { stream: financial_transactions.dlq }",
                    format!("dead_letter: {{ stream: {stream}.dlq }}"),
                ),
                (
                    "batch: { max_rows: 10000, max_wait: 20ms }",
                    "batch: { max_rows: 200, max_wait: 20ms }".into(),
                ),
                ("channel: fraud_alerts", format!("channel: \"{stream}.alerts\"")),
            ],
        );
        let path = dir.join("fraud.yaml");
        std::fs::write(&path, spec).expect("write spec");
        let dwh_url = dwh_url.unwrap_or_else(|| format!("{}/{db}", server()));
        Self { dir, db, stream, spec: path, redis_url: redis_url(), dwh_url }
    }

    /// Edits the spec: each `(from, to)` replaced; `from` must be there.
    pub(super) fn edit(&self, edits: &[(&str, String)]) {
        let text = std::fs::read_to_string(&self.spec).expect("spec");
        std::fs::write(&self.spec, replaced(text, edits)).expect("write spec");
    }

    pub(super) fn start(&self, args: &[&str]) -> Child {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let run = RUNS.fetch_add(1, Ordering::SeqCst);
        let log = std::fs::File::create(self.dir.join(format!("engine-{run}.log"))).expect("log");
        Command::new(env!("CARGO_BIN_EXE_engine"))
            .current_dir(&self.dir)
            .arg("stream")
            .arg(&self.spec)
            .args(args)
            .env_remove("ENGINE_LOG")
            .env("REDIS_URL", &self.redis_url)
            .env("DWH_DATABASE_URL", &self.dwh_url)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("engine starts")
    }

    pub(super) fn alert_ids(&self) -> BTreeSet<String> {
        if psql(&self.db, "SELECT to_regclass('fraud_alerts') IS NOT NULL").trim() != "t" {
            return BTreeSet::new();
        }
        let out = psql(&self.db, "SELECT alert_id FROM fraud_alerts");
        out.lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
    }

    pub(super) fn alerts(&self) -> usize {
        let exists = psql(&self.db, "SELECT to_regclass('fraud_alerts') IS NOT NULL");
        if exists.trim() != "t" {
            return 0;
        }
        psql(&self.db, "SELECT count(*) FROM fraud_alerts").trim().parse().expect("count")
    }

    pub(super) fn pending(&self) -> i64 {
        let reply: redis::Value =
            redis::cmd("XPENDING").arg(&self.stream).arg("fraud").query(&mut redis()).expect("XPENDING");
        match reply {
            redis::Value::Array(v) => match v.first() {
                Some(redis::Value::Int(n)) => *n,
                _ => 0,
            },
            _ => 0,
        }
    }

    pub(super) fn logs(&self) -> String {
        let mut all = String::new();
        for e in std::fs::read_dir(&self.dir).expect("dir").flatten() {
            if e.file_name().to_string_lossy().ends_with(".log") {
                all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        all
    }
}

pub(super) fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(super) fn stop(mut child: Child) -> i32 {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    child.wait().expect("engine exits").code().unwrap_or(-1)
}

/// Events `first..first+n`, every 7th above 2000; returns the expected alert ids.
pub(super) fn produce(stream: &str, first: i64, n: i64) -> BTreeSet<String> {
    let mut c = redis();
    let mut expected = BTreeSet::new();
    let mut pipe = redis::pipe();
    for id in first..first + n {
        let amount = if id % 7 == 0 { 2000.01 + (id % 500) as f64 } else { 1.0 + (id % 1999) as f64 };
        if amount > 2000.0 {
            expected.insert(format!("large_amount:{id}"));
        }
        pipe.cmd("XADD").arg(stream).arg("*").arg("payload").arg(event(id, id % 50, amount, "USD")).ignore();
    }
    let _: () = pipe.query(&mut c).expect("XADD");
    expected
}

#[test]
fn producer_and_stream_alert_every_large_transaction_exactly_once() {
    let repo = repo_dir();
    let db = database("stream_demo");
    let dwh = format!("{}/{db}", server());
    let env = [("REDIS_URL", redis_url()), ("DWH_DATABASE_URL", dwh)];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let partitions: Vec<String> = (0..4).map(|p| format!("financial_transactions:{p}")).collect();
    let _: () = redis::cmd("DEL").arg(&partitions).query(&mut redis()).expect("DEL");
    let out = super::engine_env(
        &repo,
        &["stream", "pipelines/producer.yaml", "--var", "rate=2000", "--max-events", "3000"],
        &env,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mut expected = BTreeSet::new();
    let mut total = 0;
    for (p, key) in partitions.iter().enumerate() {
        let entries: Vec<(String, Vec<(String, String)>)> =
            redis::cmd("XRANGE").arg(key).arg("-").arg("+").query(&mut redis()).expect("XRANGE");
        assert!(!entries.is_empty(), "partition {p} holds events");
        total += entries.len();
        for (_, fields) in &entries {
            let v: serde_json::Value = serde_json::from_str(&fields[0].1).expect("producer writes JSON");
            let customer = v["customer_id"].as_i64().expect("customer_id").to_string();
            assert_eq!(crc32(customer.as_bytes()) % 4, p as u32, "customer {customer} in partition {p}");
            if v["amount"].as_f64().expect("amount") > 2000.0 {
                expected.insert(format!("large_amount:{}", v["transaction_id"]));
            }
        }
    }
    assert_eq!(total, 3000);
    assert!(expected.len() > 50, "about 1 in 20 is above 2000: {}", expected.len());
    let out = super::engine_env(&repo, &["stream", "pipelines/fraud.yaml", "--max-events", "3000"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ids: BTreeSet<String> =
        psql(&db, "SELECT alert_id FROM fraud_alerts").lines().map(str::to_string).collect();
    assert_eq!(ids, expected);
    let reasons = psql(&db, "SELECT count(*) FROM fraud_alerts WHERE rule_id = 'large_amount' AND reason LIKE 'amount % > 2000' AND amount > 2000");
    assert_eq!(reasons.trim(), expected.len().to_string());
}

#[test]
fn sigkill_mid_stream_then_restart_leaves_every_alert_exactly_once() {
    let s = Setup::new("kill", "stream: $STREAM\n    group: fraud\n    reclaim_after: 1s", None);
    let producer = {
        let stream = s.stream.clone();
        std::thread::spawn(move || {
            let mut expected = BTreeSet::new();
            for chunk in 0..40 {
                expected.extend(produce(&stream, chunk * 250, 250));
                std::thread::sleep(Duration::from_millis(50));
            }
            expected
        })
    };
    let first = s.start(&[]);
    wait_for("the first alerts", Duration::from_secs(60), || s.alerts() > 0);
    let mut first = first;
    first.kill().expect("SIGKILL");
    first.wait().expect("killed");
    let before = s.alerts();
    let expected = producer.join().expect("producer");
    eprintln!("killed with {before} of {} alerts written, {} entries pending", expected.len(), s.pending());
    let second = s.start(&[]);
    wait_for("every alert", Duration::from_secs(60), || s.alerts() >= expected.len() && s.pending() == 0);
    assert_eq!(stop(second), 0, "{}", s.logs());
    assert_eq!(s.alert_ids(), expected);
    let counts = psql(&s.db, "SELECT count(*) = count(DISTINCT alert_id) FROM fraud_alerts");
    assert_eq!(counts.trim(), "t");
}

/// A TCP proxy to PostgreSQL that can be cut, dropping every connection.
pub(super) struct Proxy {
    pub(super) port: u16,
    down: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub(super) fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let down = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (d, o, up) = (down.clone(), open.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if d.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&up) else { continue };
                let mut list = o.lock().expect("lock");
                list.push(client.try_clone().expect("clone"));
                list.push(server.try_clone().expect("clone"));
                pipe(client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                pipe(server, client);
            }
        });
        Self { port, down, open }
    }

    pub(super) fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for s in self.open.lock().expect("lock").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub(super) fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

#[test]
fn postgres_away_for_ten_seconds_loses_no_alert() {
    let upstream = server().trim_start_matches("postgres://").rsplit('@').next().expect("host").to_string();
    let proxy = Proxy::start(&upstream);
    let db_name = "engine_it_stream_outage";
    let dwh = format!("postgres://postgres@127.0.0.1:{}/{db_name}", proxy.port);
    let s = Setup::new("outage", "stream: $STREAM\n    group: fraud", Some(dwh));
    let engine = s.start(&[]);
    let mut expected = produce(&s.stream, 0, 500);
    wait_for("the first alerts", Duration::from_secs(60), || s.alerts() >= expected.len());
    proxy.cut();
    let cut_at = Instant::now();
    for chunk in 1..=10 {
        expected.extend(produce(&s.stream, chunk * 500, 500));
        std::thread::sleep(Duration::from_millis(900));
    }
    assert!(s.pending() > 0, "entries wait unacknowledged while PostgreSQL is away");
    std::thread::sleep(Duration::from_secs(10).saturating_sub(cut_at.elapsed()));
    proxy.restore();
    wait_for("every alert after the outage", Duration::from_secs(60), || {
        s.alerts() >= expected.len() && s.pending() == 0
    });
    assert_eq!(stop(engine), 0, "{}", s.logs());
    assert_eq!(s.alert_ids(), expected);
    assert!(s.logs().contains("retrying"), "the outage is logged: {}", s.logs());
}

#[test]
fn malformed_messages_go_to_the_dead_letter_with_their_reason() {
    let s = Setup::new("dlq", "stream: $STREAM\n    group: fraud\n    max_message_bytes: 4096", None);
    let mut c = redis();
    let good = |id: i64| event(id, 1, 2500.0, "USD");
    let bad: Vec<(String, &str)> = vec![
        ("{\"transaction_id\": 1,".into(), "bad JSON"),
        ("[1, 2, 3]".into(), "not a JSON object but an array"),
        (r#"{"transaction_id": 3, "customer_id": 1, "merchant_id": "M1", "currency": "USD", "timestamp": "2026-01-01T00:00:00Z"}"#.into(), "missing required field 'amount'"),
        (good(4).replace("\"customer_id\": 1", "\"customer_id\": \"one\""), "field 'customer_id': expected an integer"),
        (good(5).replace("\"currency\": \"USD\"", "\"currency\": null"), "field 'currency' is required but null"),
        (good(6).replace("2026-11-26T10:15:02.123Z", "yesterday"), "field 'timestamp': bad timestamp"),
        (good(7).replace("2500.00", "2500.005"), "more than 2 decimal places"),
        (good(8).replace("2500.00", "1e12"), "does not fit decimal(12,2)"),
        (good(9).replace("\"transaction_id\": 9", "\"transaction_id\": 9.5"), "field 'transaction_id': expected an integer"),
        (format!("{{\"pad\": \"{}\"}}", "x".repeat(5000)), "more than the limit of 4096"),
    ];
    for (payload, _) in &bad {
        xadd(&mut c, &s.stream, payload);
    }
    let _: String =
        redis::cmd("XADD").arg(&s.stream).arg("*").arg("body").arg("{}").query(&mut c).expect("XADD");
    xadd(&mut c, &s.stream, &good(100));
    xadd(&mut c, &s.stream, &good(101));
    let mut engine = s.start(&["--max-events", "2"]);
    let status = engine.wait().expect("engine exits");
    assert_eq!(status.code(), Some(0), "{}", s.logs());
    let letters: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("{}.dlq", s.stream))
        .arg("-")
        .arg("+")
        .query(&mut c)
        .expect("XRANGE");
    assert_eq!(letters.len(), bad.len() + 1, "{letters:?}");
    let field = |fields: &[(String, String)], name: &str| {
        fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default()
    };
    for ((payload, reason), (_, fields)) in bad.iter().zip(&letters) {
        assert_eq!(&field(fields, "payload"), payload);
        assert!(field(fields, "reason").contains(reason), "{} lacks {reason}", field(fields, "reason"));
        assert_eq!(field(fields, "source"), "transactions");
    }
    assert!(field(&letters[bad.len()].1, "reason").contains("entry has no field 'payload' (fields: body)"));
    assert_eq!(
        s.alert_ids(),
        BTreeSet::from(["large_amount:100".to_string(), "large_amount:101".to_string()])
    );
    assert_eq!(s.pending(), 0, "dead letters are acknowledged too");
}

#[test]
fn pub_sub_channel_feeds_the_rules() {
    let s = Setup::new("pubsub", "channel: $STREAM", None);
    let engine = s.start(&["--max-events", "20"]);
    let mut c = redis();
    let channel = s.stream.clone();
    wait_for("the subscription", Duration::from_secs(30), || {
        let subs: Vec<(String, i64)> =
            redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel).query(&mut redis()).expect("NUMSUB");
        subs.first().is_some_and(|(_, n)| *n > 0)
    });
    for id in 0..20 {
        let amount = if id % 4 == 0 { 3000.0 } else { 10.0 };
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(event(id, 1, amount, "GBP"))
            .query(&mut c)
            .expect("PUBLISH");
    }
    let mut engine = engine;
    let status = engine.wait().expect("engine exits");
    assert_eq!(status.code(), Some(0), "{}", s.logs());
    let want: BTreeSet<String> =
        (0..20).filter(|i| i % 4 == 0).map(|i| format!("large_amount:{i}")).collect();
    assert_eq!(s.alert_ids(), want);
}

pub(super) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

pub(super) fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

pub(super) fn write_rule(dir: &Path, file: &str, body: &str) {
    // Written beside, then renamed in: the watcher never sees half a file.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, body).expect("write rule");
    std::fs::rename(&tmp, dir.join(file)).expect("rename rule");
}

#[test]
fn rules_change_while_the_stream_runs() {
    let s = Setup::new("reload", "stream: $STREAM\n    group: fraud", None);
    let port = free_port();
    let engine = s.start(&["--metrics-addr", &format!("127.0.0.1:{port}")]);
    let rules = s.dir.join("rules");
    let mut c = redis();
    let mut next = 0i64;
    let mut send = |amount: f64, currency: &str| {
        next += 1;
        xadd(&mut c, &s.stream, &event(next, 9, amount, currency));
        next
    };
    let has = |id: &str| s.alert_ids().contains(id);
    let a = send(2500.0, "USD");
    wait_for("the first alert", Duration::from_secs(60), || has(&format!("large_amount:{a}")));

    // A new rule file: its alerts start with no restart.
    write_rule(
        &rules,
        "euro.yaml",
        "id: euro_spend\nseverity: low\nwhen: currency = 'EUR' AND amount > 100\n",
    );
    let added = Instant::now();
    let mut fired = None;
    while fired.is_none() {
        let id = send(150.0, "EUR");
        std::thread::sleep(Duration::from_millis(100));
        if has(&format!("euro_spend:{id}")) || s.alert_ids().iter().any(|a| a.starts_with("euro_spend:")) {
            fired = Some(added.elapsed());
        }
        assert!(added.elapsed() < Duration::from_secs(30), "the new rule never fired");
    }
    eprintln!("new rule fired {:?} after its file was written", fired.unwrap_or_default());

    // A broken file: refused with its place, the running rules go on.
    write_rule(&rules, "broken.yaml", "id: broken\nseverity: high\nwhen: amout > 1\n");
    wait_for("the reload error on /health", Duration::from_secs(30), || {
        http_get(port, "/health").contains("broken.yaml:3:7")
    });
    let health = http_get(port, "/health");
    assert!(
        health.contains("unknown column 'amout'") && health.contains("did you mean 'amount'"),
        "{health}"
    );
    let b = send(2600.0, "EUR");
    wait_for("alerts from the last good set", Duration::from_secs(30), || {
        has(&format!("large_amount:{b}")) && has(&format!("euro_spend:{b}"))
    });
    let metrics = http_get(port, "/metrics");
    assert!(metrics.contains("engine_rule_reload_failures_total"), "{metrics}");
    assert!(
        metrics.contains("engine_rule_hits_total{node=\"flagged\",rule=\"euro_spend\",mode=\"live\"}"),
        "{metrics}"
    );

    // Deleting files removes their rules.
    std::fs::remove_file(rules.join("broken.yaml")).expect("rm");
    std::fs::remove_file(rules.join("euro.yaml")).expect("rm");
    wait_for("the reload without euro_spend", Duration::from_secs(30), || {
        let h = http_get(port, "/health");
        h.contains("\"rules\": 1,") && h.contains("\"last_error\": null")
    });
    let d = send(2700.0, "EUR");
    wait_for("the large_amount alert", Duration::from_secs(30), || has(&format!("large_amount:{d}")));
    assert!(!has(&format!("euro_spend:{d}")), "the deleted rule no longer fires");
    assert_eq!(stop(engine), 0, "{}", s.logs());
    assert!(s.logs().contains("rules reloaded"), "{}", s.logs());
}

#[test]
fn redis_away_then_back_loses_no_alert() {
    let redis_addr = redis_url().trim_start_matches("redis://").trim_end_matches('/').to_string();
    let proxy = Proxy::start(&redis_addr);
    let mut s = Setup::new("redis_outage", "stream: $STREAM\n    group: fraud", None);
    s.redis_url = format!("redis://127.0.0.1:{}", proxy.port);
    let engine = s.start(&[]);
    let mut expected = produce(&s.stream, 0, 300);
    wait_for("the first alerts", Duration::from_secs(60), || s.alert_ids() == expected);
    proxy.cut();
    expected.extend(produce(&s.stream, 300, 300));
    std::thread::sleep(Duration::from_secs(3));
    proxy.restore();
    wait_for("every alert after the outage", Duration::from_secs(60), || {
        s.alerts() >= expected.len() && s.pending() == 0
    });
    assert_eq!(stop(engine), 0, "{}", s.logs());
    assert_eq!(s.alert_ids(), expected);
    assert!(s.logs().contains("reconnecting"), "the outage is logged: {}", s.logs());
}

#[test]
fn two_engines_in_one_group_share_the_stream() {
    let s = Setup::new("shared", "stream: $STREAM\n    group: fraud", None);
    let (a, b) = (s.start(&[]), s.start(&[]));
    let mut expected = BTreeSet::new();
    for chunk in 0..30 {
        expected.extend(produce(&s.stream, chunk * 200, 200));
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for("every alert", Duration::from_secs(60), || s.alerts() >= expected.len() && s.pending() == 0);
    assert_eq!(stop(a), 0, "{}", s.logs());
    assert_eq!(stop(b), 0, "{}", s.logs());
    assert_eq!(s.alert_ids(), expected);
    let counts: Vec<u64> = s
        .logs()
        .lines()
        .filter_map(|l| l.strip_prefix("stream stopped: "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(counts.len(), 2, "{}", s.logs());
    assert!(counts.iter().all(|n| *n > 0), "both consumers took a share: {counts:?}");
    assert_eq!(counts.iter().sum::<u64>(), 6000, "each event was read once: {counts:?}");
}

/// Entries of a dead-letter stream: (payload, reason) per letter.
pub(super) fn dead_letters(stream: &str) -> Vec<(String, String)> {
    let letters: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query(&mut redis()).expect("XRANGE");
    let field = |fields: &[(String, String)], name: &str| {
        fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default()
    };
    letters.iter().map(|(_, f)| (field(f, "payload"), field(f, "reason"))).collect()
}

/// A running engine whose warehouse refuses alerts of $9,000 or more (a
/// CHECK added once the engine has run its migrations).
pub(super) fn refusing(name: &str) -> (Setup, Child) {
    let s = Setup::new(name, "stream: $STREAM\n    group: fraud", None);
    let engine = s.start(&[]);
    let migrations = std::fs::read_dir(repo_dir().join("migrations/dwh")).expect("migrations").count();
    wait_for("the migrations", Duration::from_secs(60), || {
        psql(&s.db, "SELECT to_regclass('engine_migrations') IS NOT NULL").trim() == "t"
            && psql(&s.db, "SELECT count(*) FROM engine_migrations WHERE success").trim()
                == migrations.to_string()
    });
    psql(&s.db, "ALTER TABLE fraud_alerts ADD CONSTRAINT below_9000 CHECK (amount < 9000)");
    (s, engine)
}

/// Once every loadable alert is in and nothing is pending, the engine
/// stops cleanly with exactly those alerts loaded and each refused row in
/// the dead letter once.
fn loaded_and_refused(s: &Setup, engine: Child, loaded: &BTreeSet<String>, refused: &BTreeSet<i64>) {
    wait_for("every loadable alert, nothing pending", Duration::from_secs(60), || {
        s.alerts() >= loaded.len() && s.pending() == 0
    });
    assert_eq!(stop(engine), 0, "{}", s.logs());
    assert_eq!(&s.alert_ids(), loaded, "every other row loaded");
    assert_dead_letters(s, refused);
}

/// Events `ids` for the refused-row tests: every 97th at $9,500 (above the
/// CHECK the tests add: refused), every other 7th at $2,500 (loaded), the
/// rest small. Returns the loadable alert ids and the refused event ids.
fn refusable(ids: std::ops::Range<i64>) -> (Vec<String>, BTreeSet<String>, BTreeSet<i64>) {
    let (mut payloads, mut loaded, mut refused) = (Vec::new(), BTreeSet::new(), BTreeSet::new());
    for id in ids {
        let amount = match id {
            _ if id % 97 == 0 => 9500.0,
            _ if id % 7 == 0 => 2500.0,
            _ => 10.0,
        };
        match amount {
            a if a >= 9000.0 => refused.insert(id),
            a if a > 2000.0 => loaded.insert(format!("large_amount:{id}")),
            _ => false,
        };
        payloads.push(event(id, id % 40, amount, "USD"));
    }
    (payloads, loaded, refused)
}

pub(super) fn xadd_all(stream: &str, payloads: &[String]) {
    let mut pipe = redis::pipe();
    for p in payloads {
        pipe.cmd("XADD").arg(stream).arg("*").arg("payload").arg(p).ignore();
    }
    let _: () = pipe.query(&mut redis()).expect("XADD");
}

/// Each refused row is in the dead letter once, with the CHECK's reason.
fn assert_dead_letters(s: &Setup, refused: &BTreeSet<i64>) {
    let letters = dead_letters(&format!("{}.dlq", s.stream));
    let mut dead = BTreeSet::new();
    for (payload, reason) in &letters {
        assert!(
            reason.contains("sink 'alerts_table'")
                && reason.contains("violates check constraint \"below_9000\"")
                && reason.contains("23514"),
            "{reason}"
        );
        let row: serde_json::Value = serde_json::from_str(payload).expect("the refused row as JSON");
        assert_eq!(row["alert_id"], format!("large_amount:{}", row["transaction_id"]));
        dead.insert(row["transaction_id"].as_i64().expect("transaction_id"));
    }
    assert_eq!(&dead, refused, "each refused row once in the dead letter");
    assert_eq!(letters.len(), refused.len());
}

#[test]
fn rows_the_warehouse_refuses_go_to_the_dead_letter_and_the_rest_load() {
    let (s, engine) = refusing("refused");
    let (payloads, loaded, refused) = refusable(0..1200);
    xadd_all(&s.stream, &payloads);
    loaded_and_refused(&s, engine, &loaded, &refused);
}

/// While the warehouse is locked (a slow commit, a long migration), the
/// alerts channel still gets the alerts of the batches behind it, far more
/// than a handful; once it is free, the warehouse sink writes the batches
/// waiting for it together and catches up, each loadable alert loaded and
/// each refused row in the dead letter once.
#[test]
fn a_locked_warehouse_holds_back_neither_the_alerts_channel_nor_its_catching_up() {
    let (s, engine) = refusing("locked");
    let channel: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    {
        let (channel, name) = (channel.clone(), format!("{}.alerts", s.stream));
        std::thread::spawn(move || {
            let mut conn = redis();
            let mut sub = conn.as_pubsub();
            sub.subscribe(&name).expect("SUBSCRIBE");
            let _ = ready_tx.send(());
            while let Ok(m) = sub.get_message() {
                let payload: String = m.get_payload().unwrap_or_default();
                let v: serde_json::Value = serde_json::from_str(&payload).unwrap_or_default();
                if let Some(id) = v["alert_id"].as_str() {
                    channel.lock().expect("lock").insert(id.to_string());
                }
            }
        });
    }
    ready_rx.recv().expect("subscribed");
    let mut lock = Command::new("psql")
        .args([
            &format!("{}/{}", server(), s.db),
            "-qtA",
            "-c",
            "BEGIN; LOCK TABLE fraud_alerts IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(6); COMMIT;",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("psql runs");
    wait_for("the lock", Duration::from_secs(10), || {
        psql(&s.db, "SELECT count(*) FROM pg_locks WHERE relation = 'fraud_alerts'::regclass AND mode = 'AccessExclusiveLock' AND granted").trim() == "1"
    });
    // 40 small batches, 50 ms apart: each its own batch.
    let (payloads, loaded, refused) = refusable(0..1200);
    for group in payloads.chunks(30) {
        xadd_all(&s.stream, group);
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let during = channel.lock().expect("lock").len();
    let all = loaded.len() + refused.len();
    eprintln!("while the warehouse was locked the alerts channel got {during} of {all} alerts");
    assert!(
        lock.try_wait().expect("psql").is_none(),
        "the lock outlasted the burst; a slower machine needs a longer pg_sleep"
    );
    assert!(
        during * 2 >= all,
        "while the warehouse was locked the alerts channel got {during} of {all} alerts"
    );
    lock.wait().expect("the lock ends");
    loaded_and_refused(&s, engine, &loaded, &refused);
    assert_eq!(channel.lock().expect("lock").len(), all, "every alert on the channel");
}

#[test]
fn the_last_event_of_a_key_wins_within_a_batch() {
    let s = Setup::new("last_wins", "stream: $STREAM\n    group: fraud", None);
    let mut pipe = redis::pipe();
    for id in 0..100i64 {
        for amount in [2500.0, 3000.0 + id as f64] {
            pipe.cmd("XADD").arg(&s.stream).arg("*").arg("payload").arg(event(id, 1, amount, "USD")).ignore();
        }
    }
    let _: () = pipe.query(&mut redis()).expect("XADD");
    let mut engine = s.start(&["--max-events", "200"]);
    assert_eq!(engine.wait().expect("engine exits").code(), Some(0), "{}", s.logs());
    let wrong = psql(&s.db, "SELECT count(*) FROM fraud_alerts WHERE amount <> 3000 + transaction_id");
    assert_eq!(wrong.trim(), "0", "each alert holds its key's last event");
    assert_eq!(s.alerts(), 100);
}

/// CRC-32 (IEEE), bit by bit, as Python's `zlib.crc32`: how a producer
/// outside the engine picks an event's partition.
pub(super) fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
        }
    }
    !c
}

/// An event at `ms` milliseconds after 2026-11-26T10:00:00Z.
fn event_at(id: i64, customer: i64, amount: f64, ms: i64) -> String {
    let (s, ms) = (ms / 1000, ms % 1000);
    format!(
        r#"{{"transaction_id": {id}, "customer_id": {customer}, "merchant_id": "M000001", "amount": {amount:.2}, "currency": "USD", "timestamp": "2026-11-26T10:{:02}:{:02}.{ms:03}Z"}}"#,
        s / 60,
        s % 60
    )
}

/// A burst of events over 40 customers at irregular times: (id, customer, ms).
fn burst(n: i64, seed: u64) -> Vec<(i64, i64, i64)> {
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut ms = 0;
    (0..n)
        .map(|id| {
            ms += (next() % 40) as i64;
            (id, (next() % 40) as i64, ms)
        })
        .collect()
}

/// The velocity rule's alerts by a direct count: an event fires when its
/// customer has at least 5 events in the 3 s up to and including its time.
fn velocity_alerts(events: &[(i64, i64, i64)]) -> BTreeSet<String> {
    events
        .iter()
        .filter(|(_, c, t)| {
            events.iter().filter(|(_, c2, t2)| c2 == c && *t2 <= *t && *t2 >= t - 3000).count() >= 5
        })
        .map(|(id, _, _)| format!("velocity:{id}"))
        .collect()
}

const VELOCITY: &str = "id: velocity\nseverity: medium\nwindow: { by: [customer_id], size: 3s, time: timestamp }\nwhen: count(*) >= 5\n";

/// The velocity rule counting each event as it arrives (no lateness).
const VELOCITY_NOW: &str = "id: velocity\nseverity: medium\nwindow: { by: [customer_id], size: 3s, time: timestamp, allowed_lateness: 0s }\nwhen: count(*) >= 5\n";

/// XADDs `events` to their partitions of `stream`, placed by CRC-32 of the customer id.
fn produce_partitioned(stream: &str, partitions: u32, events: &[(i64, i64, i64)]) {
    produce_amounts(stream, partitions, events, 10.0);
}

fn produce_amounts(stream: &str, partitions: u32, events: &[(i64, i64, i64)], amount: f64) {
    let mut pipe = redis::pipe();
    for (id, customer, ms) in events {
        let p = crc32(customer.to_string().as_bytes()) % partitions;
        pipe.cmd("XADD")
            .arg(format!("{stream}:{p}"))
            .arg("*")
            .arg("payload")
            .arg(event_at(*id, *customer, amount, *ms))
            .ignore();
    }
    let _: () = pipe.query(&mut redis()).expect("XADD");
}

/// Entries pending in the group over every partition of the stream.
pub(super) fn pending_partitions(stream: &str, partitions: u32) -> i64 {
    (0..partitions)
        .map(|p| {
            let reply: redis::RedisResult<redis::Value> =
                redis::cmd("XPENDING").arg(format!("{stream}:{p}")).arg("fraud").query(&mut redis());
            match reply {
                Ok(redis::Value::Array(v)) => match v.first() {
                    Some(redis::Value::Int(n)) => *n,
                    _ => 0,
                },
                _ => 0,
            }
        })
        .sum()
}

/// Whether `group` has read every entry of `stream` and acknowledged it.
pub(super) fn group_caught_up(stream: &str, group: &str) -> bool {
    let groups: redis::RedisResult<Vec<std::collections::HashMap<String, redis::Value>>> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query(&mut redis());
    let Ok(groups) = groups else { return false };
    groups.iter().any(|g| {
        let int = |k: &str| match g.get(k) {
            Some(redis::Value::Int(n)) => Some(*n),
            _ => None,
        };
        let name = match g.get("name") {
            Some(redis::Value::BulkString(b)) => b.as_slice() == group.as_bytes(),
            Some(redis::Value::SimpleString(s)) => s == group,
            _ => false,
        };
        name && int("pending") == Some(0) && int("lag") == Some(0)
    })
}

/// Events each `stream stopped` line of the logs reports.
fn stopped_counts(logs: &str) -> Vec<u64> {
    logs.lines()
        .filter_map(|l| l.strip_prefix("stream stopped: "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

const PARTITIONED: &str =
    "stream: $STREAM\n    group: fraud\n    partitions: 6\n    partition_by: customer_id";

#[test]
fn three_shards_over_six_partitions_give_the_windowed_alerts_of_one_engine_and_of_a_direct_count() {
    let events = burst(3000, 0x9E37_79B9_7F4A_7C15);
    let expected = velocity_alerts(&events);
    assert!(expected.len() > 30 && expected.len() < 2000, "a telling burst: {} alerts", expected.len());
    let sharded = Setup::new("shards", PARTITIONED, None);
    let single = Setup::new("shards_one", PARTITIONED, None);
    for s in [&sharded, &single] {
        write_rule(&s.dir.join("rules"), "velocity.yaml", VELOCITY);
    }
    let mut shards: Vec<Child> = (0..3).map(|i| sharded.start(&["--shard", &format!("{i}/3")])).collect();
    let one = single.start(&[]);
    // The burst arrives over about 3 s; shard 1 is killed in the middle of
    // it and started again.
    let producer = {
        let (a, b) = (sharded.stream.clone(), single.stream.clone());
        let events = events.clone();
        std::thread::spawn(move || {
            for chunk in events.chunks(100) {
                produce_partitioned(&a, 6, chunk);
                produce_partitioned(&b, 6, chunk);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    wait_for("the first alerts", Duration::from_secs(60), || sharded.alerts() > 0);
    shards[1].kill().expect("SIGKILL");
    shards[1].wait().expect("killed");
    eprintln!("shard 1 killed with {} alerts written", sharded.alerts());
    std::thread::sleep(Duration::from_millis(300));
    shards[1] = sharded.start(&["--shard", "1/3"]);
    producer.join().expect("producer");
    for s in [&sharded, &single] {
        wait_for("every alert, nothing pending", Duration::from_secs(90), || {
            s.alerts() >= expected.len() && pending_partitions(&s.stream, 6) == 0
        });
    }
    for child in shards {
        assert_eq!(stop(child), 0, "{}", sharded.logs());
    }
    assert_eq!(stop(one), 0, "{}", single.logs());
    assert_eq!(single.alert_ids(), expected, "one engine agrees with the direct count");
    assert_eq!(sharded.alert_ids(), expected, "three shards, one killed, agree with the direct count");
    let counts = stopped_counts(&sharded.logs());
    assert_eq!(counts.len(), 3, "{}", sharded.logs());
    assert!(counts.iter().all(|n| *n > 0), "every shard read its partitions: {counts:?}");
    assert_eq!(stopped_counts(&single.logs()), vec![3000], "one engine read every event once");
}

#[test]
fn a_restarted_shard_keeps_its_windows_and_counts_a_redelivered_batch_once() {
    let upstream = server().trim_start_matches("postgres://").rsplit('@').next().expect("host").to_string();
    let proxy = Proxy::start(&upstream);
    let dwh = format!("postgres://postgres@127.0.0.1:{}/engine_it_stream_redelivered", proxy.port);
    let s = Setup::new("redelivered", "stream: $STREAM\n    group: fraud", Some(dwh));
    write_rule(&s.dir.join("rules"), "velocity.yaml", VELOCITY_NOW);
    let mut c = redis();
    // Three events of customer 7, committed and acknowledged.
    for id in 0..3 {
        xadd(&mut c, &s.stream, &event_at(id, 7, 10.0, id * 100));
    }
    let first = s.start(&["--shard", "0/1"]);
    wait_for("the first entries acknowledged", Duration::from_secs(60), || {
        group_caught_up(&s.stream, "fraud")
    });
    // Two more while PostgreSQL is away: read, counted in memory, never
    // committed, never acknowledged; then the engine is killed.
    proxy.cut();
    let mut pipe = redis::pipe();
    for id in 3..5 {
        pipe.cmd("XADD").arg(&s.stream).arg("*").arg("payload").arg(event_at(id, 7, 10.0, id * 100)).ignore();
    }
    let _: () = pipe.query(&mut c).expect("XADD");
    wait_for("the sink to retry", Duration::from_secs(30), || s.logs().contains("retrying"));
    let mut first = first;
    first.kill().expect("SIGKILL");
    first.wait().expect("killed");
    assert!(s.pending() > 0, "the last entries wait, unacknowledged");
    proxy.restore();
    let port = free_port();
    let second = s.start(&["--shard", "0/1", "--metrics-addr", &format!("127.0.0.1:{port}")]);
    wait_for("nothing pending", Duration::from_secs(60), || s.pending() == 0 && s.alerts() > 0);
    let metrics = http_get(port, "/metrics");
    assert!(metrics.contains("engine_window_keys{node=\"flagged\"} 1"), "one customer's window: {metrics}");
    assert_eq!(stop(second), 0, "{}", s.logs());
    // In order: the 5th event has 5 in its 3 s window, the 4th only 4. Empty
    // windows after the restart would give no alert; the two redelivered
    // events counted twice would fire on the 4th too.
    assert_eq!(s.alert_ids(), BTreeSet::from(["velocity:4".to_string()]), "{}", s.logs());
    assert!(s.logs().contains("window state of 1 keys restored"), "{}", s.logs());
}

#[test]
fn validation_refuses_a_window_not_keyed_by_the_partition_column() {
    let s = Setup::new(
        "shard_key",
        "stream: $STREAM\n    group: fraud\n    partitions: 4\n    partition_by: merchant_id",
        None,
    );
    write_rule(&s.dir.join("rules"), "velocity.yaml", VELOCITY);
    let out = Command::new(env!("CARGO_BIN_EXE_engine"))
        .current_dir(&s.dir)
        .args(["validate", "fraud.yaml"])
        .output()
        .expect("engine runs");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("rules/velocity.yaml:3:") && err.contains("rule 'velocity': its window is keyed by [customer_id], but the stream has 4 partitions by 'merchant_id'"),
        "{err}"
    );
    std::fs::remove_file(s.dir.join("rules/velocity.yaml")).expect("remove rule");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_engine"))
            .current_dir(&s.dir)
            .args(args)
            .output()
            .expect("engine runs")
    };
    let out = run(&["stream", "fraud.yaml", "--shard", "5/8"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("has 4 partitions, and shard 5 of 8 reads"), "{}", text(&out.stderr));
    let out = run(&["stream", "fraud.yaml", "--shard", "3/3"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("bad shard '3/3'"), "{}", text(&out.stderr));
}

/// Events that arrive up to 1.5 s out of time order, with the rule's
/// allowed lateness 2 s, give the alerts of the events in time order (a
/// count computed here), over a SIGKILL and a restart in the middle of the
/// burst: rows held for order when the engine died are counted once. One
/// partition's producer runs ahead of the other's (each block of 600 events
/// reaches partition 0 before partition 1), so the engine reads one
/// partition many windows of event time ahead of the other. Events
/// later than the lateness are left out of the windows and counted in a
/// metric, and stateless rules still see them.
#[test]
fn out_of_order_events_within_the_lateness_give_the_in_order_answer() {
    let events = burst(3000, 0x2545_F491_4F6C_DD1D);
    let expected = velocity_alerts(&events);
    assert!(expected.len() > 30, "a telling burst: {} alerts", expected.len());
    let mut x = 0x5DEE_CE66_D1CE_4E5Bu64;
    let mut jitter = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 1500) as i64
    };
    let mut arrival: Vec<(i64, usize)> =
        events.iter().enumerate().map(|(i, e)| (e.2 + jitter(), i)).collect();
    arrival.sort();
    let moved = arrival.iter().enumerate().filter(|(k, (_, i))| k != i).count();
    assert!(moved > events.len() / 2, "most events arrive out of order: {moved}");
    let shuffled: Vec<(i64, i64, i64)> = arrival.iter().map(|(_, i)| events[*i]).collect();
    // In order, each of these would fire: a copy of an event that fired,
    // arriving after the burst, long behind its partition's watermark.
    let late: Vec<(i64, i64, i64)> = events
        .iter()
        .filter(|(id, _, _)| expected.contains(&format!("velocity:{id}")))
        .take(10)
        .map(|(id, c, ms)| (100_000 + id, *c, *ms))
        .collect();
    let s = Setup::new(
        "late",
        "stream: $STREAM\n    group: fraud\n    partitions: 2\n    partition_by: customer_id",
        None,
    );
    write_rule(
        &s.dir.join("rules"),
        "velocity.yaml",
        "id: velocity\nseverity: medium\nwindow: { by: [customer_id], size: 3s, time: timestamp, allowed_lateness: 2s }\nwhen: count(*) >= 5\n",
    );
    let mut first = s.start(&["--shard", "0/1"]);
    let producer = {
        let stream = s.stream.clone();
        std::thread::spawn(move || {
            for block in shuffled.chunks(600) {
                for p in 0..2 {
                    let mine: Vec<(i64, i64, i64)> = block
                        .iter()
                        .filter(|e| crc32(e.1.to_string().as_bytes()) % 2 == p)
                        .copied()
                        .collect();
                    for chunk in mine.chunks(100) {
                        produce_partitioned(&stream, 2, chunk);
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
    };
    wait_for("the first alerts", Duration::from_secs(60), || s.alerts() > 0);
    first.kill().expect("SIGKILL");
    first.wait().expect("killed");
    eprintln!("killed with {} alerts written", s.alerts());
    std::thread::sleep(Duration::from_millis(300));
    let port = free_port();
    let second = s.start(&["--shard", "0/1", "--metrics-addr", &format!("127.0.0.1:{port}")]);
    producer.join().expect("producer");
    wait_for("the burst counted", Duration::from_secs(90), || {
        s.alerts() >= expected.len() && pending_partitions(&s.stream, 2) == 0
    });
    produce_amounts(&s.stream, 2, &late, 5000.0);
    let big: BTreeSet<String> = late.iter().map(|(id, _, _)| format!("large_amount:{id}")).collect();
    wait_for("the late events' stateless alerts", Duration::from_secs(60), || {
        s.alerts() >= expected.len() + big.len() && pending_partitions(&s.stream, 2) == 0
    });
    let metrics = http_get(port, "/metrics");
    assert!(
        metrics.contains("engine_late_events_total{node=\"flagged\",rule=\"velocity\"} 10"),
        "the 10 late events counted: {metrics}"
    );
    assert_eq!(stop(second), 0, "{}", s.logs());
    let want: BTreeSet<String> = expected.union(&big).cloned().collect();
    assert_eq!(s.alert_ids(), want, "{}", s.logs());
    assert!(s.logs().contains("events held for event-time order restored"), "{}", s.logs());
}

/// Before the first event, `/metrics` already lists every metric the
/// reference names, at zero: dashboards and alerts see them from the start.
#[test]
fn every_metric_shows_at_zero_before_the_first_event() {
    let s = Setup::new("metrics_zero", "stream: $STREAM\n    group: fraud", None);
    write_rule(&s.dir.join("rules"), "velocity.yaml", VELOCITY);
    let port = free_port();
    let engine = s.start(&["--metrics-addr", &format!("127.0.0.1:{port}")]);
    let mut metrics = String::new();
    wait_for("the metrics endpoint", Duration::from_secs(60), || {
        metrics = std::net::TcpStream::connect(("127.0.0.1", port))
            .map(|_| http_get(port, "/metrics"))
            .unwrap_or_default();
        metrics.contains("engine_source_connected{source=\"transactions\"} 1")
    });
    for line in [
        "engine_events_out_total{node=\"transactions\"} 0",
        "engine_events_in_total{node=\"flagged\"} 0",
        "engine_events_out_total{node=\"flagged\"} 0",
        "engine_dead_letters_total{source=\"transactions\"} 0",
        "engine_rule_hits_total{node=\"flagged\",rule=\"large_amount\",mode=\"live\"} 0",
        "engine_rule_hits_total{node=\"flagged\",rule=\"velocity\",mode=\"live\"} 0",
        "engine_late_events_total{node=\"flagged\",rule=\"velocity\"} 0",
        "engine_rule_reloads_total{node=\"flagged\"} 0",
        "engine_rule_reload_failures_total{node=\"flagged\"} 0",
        "engine_sink_retries_total{node=\"alerts_table\"} 0",
        "engine_sink_refused_total{node=\"alerts_table\"} 0",
        "engine_events_in_total{node=\"alerts_table\"} 0",
        "engine_window_keys{node=\"flagged\"} 0",
        "engine_window_held_events{node=\"flagged\"} 0",
        "engine_batch_latency_seconds",
    ] {
        assert!(metrics.contains(line), "no {line:?} in:\n{metrics}");
    }
    assert_eq!(stop(engine), 0, "{}", s.logs());
}

/// `--log-format json`: every log line is a JSON object with its time,
/// level and message, the pipeline and run id, and its fields (the node).
#[test]
fn json_logs_parse_line_by_line() {
    let s = Setup::new("json_logs", "stream: $STREAM\n    group: fraud", None);
    let expected = produce(&s.stream, 1, 50);
    let out = Command::new(env!("CARGO_BIN_EXE_engine"))
        .current_dir(&s.dir)
        .args(["stream", "fraud.yaml", "--max-events", "50", "--log-format", "json"])
        .env("REDIS_URL", &s.redis_url)
        .env("DWH_DATABASE_URL", &s.dwh_url)
        .env("ENGINE_LOG", "info")
        .output()
        .expect("engine runs");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(s.alert_ids(), expected);
    let stderr = text(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "{stderr}");
    let mut run_ids = BTreeSet::new();
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string() && l["message"].is_string(), "{l}");
        assert_eq!(l["span"]["pipeline"], "fraud", "{l}");
        run_ids.insert(l["span"]["run_id"].as_str().expect("run id").to_string());
    }
    assert_eq!(run_ids.len(), 1, "one run id: {run_ids:?}");
    assert!(lines.iter().any(|l| l["node"] == "flagged" && l["message"] == "rules loaded"), "{stderr}");
    let plain: Vec<&str> = stderr.lines().filter(|l| !l.starts_with('{')).collect();
    assert!(
        plain.iter().all(|l| l.starts_with("stream stopped: ")),
        "only the summary is not JSON: {plain:?}"
    );
}

/// Without a dead letter, refused messages are logged with their reason but
/// not their payload (personal data), unless the source says `log_payloads: true`.
#[test]
fn refused_payloads_are_logged_only_when_the_source_asks() {
    for (name, extra, shown) in [("nolog", "", false), ("log", "\n    log_payloads: true", true)] {
        let s = Setup::new(
            &format!("payloads_{name}"),
            &format!("stream: $STREAM\n    group: fraud{extra}"),
            None,
        );
        let spec = std::fs::read_to_string(&s.spec).expect("spec");
        let line = format!("    dead_letter: {{ stream: {}.dlq }}\n", s.stream);
        assert!(spec.contains(&line), "{spec}");
        std::fs::write(&s.spec, spec.replace(&line, "")).expect("spec");
        let mut c = redis();
        xadd(&mut c, &s.stream, r#"{"transaction_id": 1, "customer_name": "Jane Q. Public", "amount": "#);
        xadd(&mut c, &s.stream, &event(2, 1, 2500.0, "USD"));
        let mut engine = s.start(&["--max-events", "1"]);
        assert_eq!(engine.wait().expect("exits").code(), Some(0), "{}", s.logs());
        let logs = s.logs();
        assert!(logs.contains("message refused (no dead_letter configured): "), "{logs}");
        assert_eq!(logs.contains("Jane Q. Public"), shown, "{name}: {logs}");
        if !shown {
            assert!(logs.contains("not shown (log_payloads: true shows it)"), "{logs}");
        }
        assert_eq!(s.alert_ids(), BTreeSet::from(["large_amount:2".to_string()]));
    }
}
