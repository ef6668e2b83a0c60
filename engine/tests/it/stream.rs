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

fn redis_url() -> String {
    std::env::var("ENGINE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

fn redis() -> redis::Connection {
    redis::Client::open(redis_url()).expect("redis url").get_connection().expect("redis runs")
}

fn event(id: i64, customer: i64, amount: f64, currency: &str) -> String {
    format!(
        r#"{{"transaction_id": {id}, "customer_id": {customer}, "merchant_id": "M000001", "amount": {amount:.2}, "currency": "{currency}", "timestamp": "2026-11-26T10:15:02.123Z"}}"#
    )
}

fn xadd(c: &mut redis::Connection, stream: &str, payload: &str) {
    redis::cmd("XADD").arg(stream).arg("*").arg("payload").arg(payload).query::<String>(c).expect("XADD");
}

/// `pipelines/fraud.yaml` on its own stream, group, database and rules
/// folder, with the source keys a test needs.
struct Setup {
    dir: PathBuf,
    db: String,
    stream: String,
    spec: PathBuf,
    redis_url: String,
    dwh_url: String,
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
    fn new(name: &str, source_extra: &str, dwh_url: Option<String>) -> Self {
        let dir = scratch(&format!("stream-{name}"));
        let db = database(&format!("stream_{name}"));
        let stream = format!("it.{name}.{}", std::process::id());
        let _: () =
            redis::cmd("DEL").arg(&stream).arg(format!("{stream}.dlq")).query(&mut redis()).expect("DEL");
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
                    "    stream: financial_transactions\n    group: fraud\n",
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

    fn start(&self, args: &[&str]) -> Child {
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

    fn alert_ids(&self) -> BTreeSet<String> {
        if psql(&self.db, "SELECT to_regclass('fraud_alerts') IS NOT NULL").trim() != "t" {
            return BTreeSet::new();
        }
        let out = psql(&self.db, "SELECT alert_id FROM fraud_alerts");
        out.lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
    }

    fn alerts(&self) -> usize {
        let exists = psql(&self.db, "SELECT to_regclass('fraud_alerts') IS NOT NULL");
        if exists.trim() != "t" {
            return 0;
        }
        psql(&self.db, "SELECT count(*) FROM fraud_alerts").trim().parse().expect("count")
    }

    fn pending(&self) -> i64 {
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

    fn logs(&self) -> String {
        let mut all = String::new();
        for e in std::fs::read_dir(&self.dir).expect("dir").flatten() {
            if e.file_name().to_string_lossy().ends_with(".log") {
                all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        all
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(mut child: Child) -> i32 {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    child.wait().expect("engine exits").code().unwrap_or(-1)
}

/// Events `first..first+n`, every 7th above 2000; returns the expected alert ids.
fn produce(stream: &str, first: i64, n: i64) -> BTreeSet<String> {
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
    let _: () = redis::cmd("DEL").arg("financial_transactions").query(&mut redis()).expect("DEL");
    let out = super::engine_env(
        &repo,
        &["stream", "pipelines/producer.yaml", "--var", "rate=2000", "--max-events", "3000"],
        &env,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("financial_transactions")
        .arg("-")
        .arg("+")
        .query(&mut redis())
        .expect("XRANGE");
    assert_eq!(entries.len(), 3000);
    let mut expected = BTreeSet::new();
    for (_, fields) in &entries {
        let v: serde_json::Value = serde_json::from_str(&fields[0].1).expect("producer writes JSON");
        if v["amount"].as_f64().expect("amount") > 2000.0 {
            expected.insert(format!("large_amount:{}", v["transaction_id"]));
        }
    }
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
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: &str) -> Self {
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

    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for s in self.open.lock().expect("lock").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn write_rule(dir: &Path, file: &str, body: &str) {
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
