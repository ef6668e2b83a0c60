//! Input chosen to hurt the stream, injected through Redis into a running
//! engine, each outcome counted here: numbers that would take seconds to
//! read, rules and SQL that fail on one event, timestamps from the far
//! future or that never advance, oversized entries, events in the wrong
//! partition, idle connections to the metrics port, a dead consumer's
//! entries behind the engine's own, and a warehouse locked under a flood
//! of large events.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use super::postgres::{psql, server};
use super::stream::{
    crc32, event, free_port, group_caught_up, http_get, redis, redis_url, refusing, stop, wait_for, write_rule,
    xadd, xadd_all, Proxy, Setup,
};
use super::{scratch, text};

/// A running engine, killed if the test ends without stopping it.
struct Running(Option<Child>);

impl Running {
    fn new(child: Child) -> Self {
        Self(Some(child))
    }

    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM, then its exit status.
    fn stop(mut self) -> i32 {
        self.0.take().map_or(-1, stop)
    }

    /// SIGKILL.
    fn kill(mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A transaction event stamped `ts` (RFC 3339).
fn event_ts(id: i64, customer: i64, amount: f64, ts: &str) -> String {
    format!(
        r#"{{"transaction_id": {id}, "customer_id": {customer}, "merchant_id": "M000001", "amount": {amount:.2}, "currency": "USD", "timestamp": "{ts}"}}"#
    )
}

/// The time `ago` before now, in RFC 3339.
fn ts_ago(ago: Duration) -> String {
    humantime::format_rfc3339_millis(SystemTime::now() - ago).to_string()
}

/// A transaction event with more fields (raw JSON, e.g. `"score": 1e400`).
fn event_with(id: i64, customer: i64, amount: f64, extra: &str) -> String {
    let e = event(id, customer, amount, "USD");
    format!("{}, {extra}}}", e.trim_end_matches('}'))
}

/// Every entry of a dead-letter stream, as its fields.
fn letters(stream: &str) -> Vec<HashMap<String, Vec<u8>>> {
    let entries: Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)> =
        redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query(&mut redis()).expect("XRANGE");
    entries
        .into_iter()
        .map(|(_, f)| f.into_iter().map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v)).collect())
        .collect()
}

fn field(letter: &HashMap<String, Vec<u8>>, name: &str) -> String {
    letter.get(name).map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default()
}

fn dlq(s: &Setup) -> String {
    format!("{}.dlq", s.stream)
}

fn group_exists(stream: &str) -> bool {
    let groups: redis::RedisResult<redis::Value> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query(&mut redis());
    matches!(groups, Ok(redis::Value::Array(g)) if !g.is_empty())
}

/// A metric's value on `/metrics`, by its name and labels as printed.
fn metric(port: u16, series: &str) -> Option<f64> {
    let body = http_get(port, "/metrics");
    body.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// A process's peak resident memory (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    kib * 1024
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The velocity rule over a minute, holding events a second for order.
const VELOCITY_1S: &str = "id: velocity\nseverity: medium\nwindow: { by: [customer_id], size: 60s, time: timestamp, allowed_lateness: 1s }\nwhen: count(*) > 5\n";

#[test]
fn zeros_with_absurd_exponents_are_refused_at_once_and_the_next_alert_is_prompt() {
    let s = Setup::new("exponent", "stream: $STREAM\n    group: fraud", None);
    let engine = Running::new(s.start(&[]));
    wait_for("the consumer group", Duration::from_secs(60), || group_exists(&s.stream));
    // 27 bytes each: a valid JSON number, zero, that a digit-by-digit
    // decimal reader would shift two billion times.
    let bad: Vec<String> = (1..=50)
        .map(|id| event(id, 1, 0.0, "USD").replace("\"amount\": 0.00", "\"amount\": 0e2000000000"))
        .collect();
    xadd_all(&s.stream, &bad);
    xadd(&mut redis(), &s.stream, &event(51, 2, 2500.0, "USD"));
    let sent = Instant::now();
    wait_for("the $2,500 alert behind fifty of them", Duration::from_secs(20), || {
        s.alert_ids().contains("large_amount:51")
    });
    eprintln!("the alert came {:?} after the fifty", sent.elapsed());
    let dead = letters(&dlq(&s));
    assert_eq!(dead.len(), 50, "each refused");
    for l in &dead {
        let reason = field(l, "reason");
        assert!(reason.contains("field 'amount'") && reason.contains("exponent"), "{reason}");
    }
    assert_eq!(s.alert_ids(), BTreeSet::from(["large_amount:51".to_string()]));
    assert_eq!(engine.stop(), 0, "{}", s.logs());
}

#[test]
fn a_rule_that_fails_on_an_event_dead_letters_that_event_and_the_stream_goes_on() {
    let s = Setup::new("rule_error", "stream: $STREAM\n    group: fraud", None);
    write_rule(&s.dir.join("rules"), "ratio.yaml", "id: ratio\nseverity: low\nwhen: amount / customer_id > 100\n");
    let port = free_port();
    let engine = Running::new(s.start(&["--metrics-addr", &format!("127.0.0.1:{port}")]));
    // Customer 0: the division fails on this event only; the others are innocent.
    xadd_all(&s.stream, &[event(1, 0, 3000.0, "USD"), event(2, 5, 2500.0, "USD"), event(3, 5, 10.0, "USD")]);
    let want: BTreeSet<String> =
        ["large_amount:1", "large_amount:2", "ratio:2"].iter().map(|s| s.to_string()).collect();
    wait_for("the batch's alerts", Duration::from_secs(60), || s.alert_ids() == want);
    let dead = letters(&dlq(&s));
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = field(&dead[0], "reason");
    assert!(
        reason.contains("rule 'ratio'") && reason.to_lowercase().contains("divide by zero"),
        "{reason}"
    );
    let row: serde_json::Value = serde_json::from_str(&field(&dead[0], "payload")).expect("the event as JSON");
    assert_eq!(row["transaction_id"], 1);
    // The rule stays loaded; /health and the metrics show its errors.
    let health = http_get(port, "/health");
    assert!(health.contains("\"ratio\"") && health.to_lowercase().contains("divide by zero"), "{health}");
    assert_eq!(metric(port, "engine_rule_errors_total{node=\"flagged\",rule=\"ratio\"}"), Some(1.0));
    xadd_all(&s.stream, &[event(4, 0, 2600.0, "USD"), event(5, 6, 1200.0, "USD")]);
    wait_for("the alerts after the error", Duration::from_secs(30), || {
        let ids = s.alert_ids();
        ids.contains("large_amount:4") && ids.contains("ratio:5")
    });
    assert_eq!(letters(&dlq(&s)).len(), 2);
    assert_eq!(engine.stop(), 0, "{}", s.logs());
}

#[test]
fn a_sql_transform_that_fails_on_an_event_dead_letters_that_event_and_the_rest_go_on() {
    let s = Setup::new("sql_error", "stream: $STREAM\n    group: fraud", None);
    s.edit(&[(
        "             t.timestamp, t.status,\n",
        "             t.timestamp, t.status, 100 / (t.customer_id - 13) AS inverse,\n".into(),
    )]);
    let port = free_port();
    let engine = Running::new(s.start(&["--metrics-addr", &format!("127.0.0.1:{port}")]));
    xadd_all(&s.stream, &[event(1, 13, 2500.0, "USD"), event(2, 5, 2500.0, "USD"), event(3, 6, 2700.0, "USD")]);
    let want: BTreeSet<String> = ["large_amount:2", "large_amount:3"].iter().map(|s| s.to_string()).collect();
    wait_for("the alerts of the other events", Duration::from_secs(60), || s.alert_ids() == want);
    let dead = letters(&dlq(&s));
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = field(&dead[0], "reason");
    assert!(
        reason.contains("transform 'enriched'") && reason.to_lowercase().contains("divide by zero"),
        "{reason}"
    );
    let row: serde_json::Value = serde_json::from_str(&field(&dead[0], "payload")).expect("the row as JSON");
    assert_eq!(row["transaction_id"], 1);
    assert_eq!(metric(port, "engine_transform_errors_total{node=\"enriched\"}"), Some(1.0));
    assert_eq!(engine.stop(), 0, "{}", s.logs());
}

#[test]
fn one_far_future_timestamp_does_not_blind_the_velocity_rule() {
    let s = Setup::new("future", "stream: $STREAM\n    group: fraud", None);
    write_rule(&s.dir.join("rules"), "velocity.yaml", VELOCITY_1S);
    let port = free_port();
    let engine = Running::new(s.start(&["--metrics-addr", &format!("127.0.0.1:{port}")]));
    xadd(&mut redis(), &s.stream, &event_ts(1, 7, 10.0, "2200-01-01T00:00:00Z"));
    wait_for("the far-future event refused", Duration::from_secs(30), || letters(&dlq(&s)).len() == 1);
    let reason = field(&letters(&dlq(&s))[0], "reason");
    assert!(reason.contains("field 'timestamp'") && reason.contains("ahead of the engine's clock"), "{reason}");
    // Six transactions of one customer within seconds, stamped now.
    let burst: Vec<String> = (2..=7)
        .map(|id| event_ts(id, 8, 10.0, &ts_ago(Duration::from_millis(3000 - 400 * (id as u64 - 2)))))
        .collect();
    xadd_all(&s.stream, &burst);
    wait_for("velocity on the sixth", Duration::from_secs(30), || s.alert_ids().contains("velocity:7"));
    assert_eq!(metric(port, "engine_future_events_total{source=\"transactions\"}"), Some(1.0));
    assert_eq!(engine.stop(), 0, "{}", s.logs());
}

#[test]
fn an_event_from_the_future_is_clamped_to_the_engine_clock_when_the_source_says_so() {
    let s = Setup::new("future_clamp", "stream: $STREAM\n    group: fraud\n    on_future: clamp", None);
    write_rule(&s.dir.join("rules"), "velocity.yaml", VELOCITY_1S);
    let port = free_port();
    let engine = Running::new(s.start(&["--metrics-addr", &format!("127.0.0.1:{port}")]));
    // The first of six is stamped 2200: counted as read, now, after the
    // others (stamped before they were sent), so it is the sixth.
    let mut events = vec![event_ts(1, 8, 10.0, "2200-01-01T00:00:00Z")];
    events.extend((2..=6).map(|id| event_ts(id, 8, 10.0, &ts_ago(Duration::from_millis(10)))));
    xadd_all(&s.stream, &events);
    wait_for("velocity on the clamped one", Duration::from_secs(30), || s.alert_ids().contains("velocity:1"));
    assert!(letters(&dlq(&s)).is_empty(), "clamped, not refused");
    assert_eq!(metric(port, "engine_future_events_total{source=\"transactions\"}"), Some(1.0));
    assert_eq!(engine.stop(), 0, "{}", s.logs());
}

#[test]
fn events_whose_time_never_advances_are_counted_while_more_keep_arriving() {
    let s = Setup::new("stalled", "stream: $STREAM\n    group: fraud", None);
    write_rule(&s.dir.join("rules"), "velocity.yaml", VELOCITY_1S);
    let engine = Running::new(s.start(&[]));
    let t = ts_ago(Duration::from_secs(30));
    let six: Vec<String> = (1..=6).map(|id| event_ts(id, 8, 10.0, &t)).collect();
    xadd_all(&s.stream, &six);
    // The partition keeps receiving events, all of the same time: its
    // watermark never moves, and it is never quiet.
    let mut c = redis();
    let started = Instant::now();
    let mut id = 100;
    while !s.alert_ids().contains("velocity:6") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the held events were never counted while events kept arriving: {}",
            s.logs()
        );
        id += 1;
        xadd(&mut c, &s.stream, &event_ts(id, 9, 10.0, &t));
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("counted {:?} after the six, with {} more arriving", started.elapsed(), id - 100);
    assert_eq!(engine.stop(), 0, "{}", s.logs());
}

#[test]
fn windows_and_lateness_beyond_their_bounds_are_refused_with_their_place() {
    let dir = scratch("rule-bounds");
    std::fs::create_dir_all(dir.join("rules")).expect("dir");
    std::fs::write(
        dir.join("rules/huge.yaml"),
        "id: huge\nseverity: low\nwindow: { by: [customer_id], size: 100y, time: timestamp }\nwhen: count(*) > 5\n",
    )
    .expect("rule");
    std::fs::write(
        dir.join("rules/slow.yaml"),
        "id: slow\nseverity: low\nwindow: { by: [customer_id], size: 60s, time: timestamp, allowed_lateness: 3650d }\nwhen: count(*) > 5\n",
    )
    .expect("rule");
    let out = super::engine(&dir, &["rules", "check", "rules"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("rules/huge.yaml:3:") && err.contains("window size 100y is more than 7d"), "{err}");
    assert!(
        err.contains("rules/slow.yaml:3:") && err.contains("allowed_lateness 3650d is more than 1h"),
        "{err}"
    );
}

#[test]
fn a_large_batch_of_held_events_is_saved_in_bounded_values_and_restored() {
    let s = Setup::new("held_big", "stream: $STREAM\n    group: fraud", None);
    s.edit(&[("batch: { max_rows: 200, max_wait: 20ms }", "batch: { max_rows: 10000, max_wait: 2s }".into())]);
    write_rule(
        &s.dir.join("rules"),
        "velocity.yaml",
        "id: velocity\nseverity: medium\nwindow: { by: [customer_id], size: 60s, time: timestamp, allowed_lateness: 1m }\nwhen: count(*) > 5000\n",
    );
    // 10,000 events of about 1.2 KB, all read before the minute is up: one
    // batch of about 12 MB held for event-time order.
    let pad = "M".repeat(1000);
    let ts = ts_ago(Duration::ZERO);
    let payloads: Vec<String> =
        (0..10_000).map(|id| event_ts(id, id % 100, 10.0, &ts).replace("M000001", &pad)).collect();
    xadd_all(&s.stream, &payloads);
    let engine = Running::new(s.start(&[]));
    wait_for("every entry acknowledged", Duration::from_secs(60), || group_caught_up(&s.stream, "fraud"));
    engine.kill();
    let key = format!("{{{}}}:windows:fraud", s.stream);
    let fields: Vec<Vec<u8>> = redis::cmd("HKEYS").arg(&key).query(&mut redis()).expect("HKEYS");
    let held: Vec<usize> = fields
        .iter()
        .filter(|f| f.get(8) == Some(&b'h'))
        .map(|f| redis::cmd("HSTRLEN").arg(&key).arg(f).query(&mut redis()).expect("HSTRLEN"))
        .collect();
    assert!(held.len() >= 2, "the held rows are split over several values: {held:?}");
    assert!(held.iter().all(|n| *n <= 4 << 20), "each value at most 4 MiB: {held:?}");
    assert!(held.iter().sum::<usize>() > 10_000_000, "all of them saved: {held:?}");
    let port = free_port();
    let again = Running::new(s.start(&["--metrics-addr", &format!("127.0.0.1:{port}")]));
    wait_for("the held events restored", Duration::from_secs(60), || {
        s.logs().contains("10000 events held for event-time order restored")
    });
    wait_for("the gauge", Duration::from_secs(30), || {
        metric(port, "engine_window_held_events{node=\"flagged\"}") == Some(10_000.0)
    });
    assert_eq!(again.stop(), 0, "{}", s.logs());
}

#[test]
fn oversized_entries_are_read_without_holding_them_and_dead_lettered_cut_with_length_and_hash() {
    use sha2::Digest;
    let s = Setup::new("oversized", "stream: $STREAM\n    group: fraud", None);
    let engine = Running::new(s.start(&[]));
    wait_for("the consumer group", Duration::from_secs(60), || group_exists(&s.stream));
    std::thread::sleep(Duration::from_secs(1));
    let before = peak_rss(engine.pid());
    let big = format!("{{\"transaction_id\": 1, \"pad\": \"{}\"}}", "x".repeat(40 << 20));
    let mut c = redis();
    for _ in 0..4 {
        xadd(&mut c, &s.stream, &big);
    }
    xadd(&mut c, &s.stream, &event(2, 3, 2500.0, "USD"));
    wait_for("the alert behind them", Duration::from_secs(60), || s.alert_ids().contains("large_amount:2"));
    let grew = peak_rss(engine.pid()).saturating_sub(before);
    let dead = letters(&dlq(&s));
    let _: () = redis::cmd("DEL").arg(&s.stream).arg(dlq(&s)).query(&mut c).expect("DEL");
    assert!(grew < 64 << 20, "four entries of 40 MiB raised the engine's peak memory by {} MiB", grew >> 20);
    assert_eq!(dead.len(), 4);
    let sha = format!("{:x}", sha2::Sha256::digest(big.as_bytes()));
    for l in &dead {
        assert!(field(l, "reason").contains("more than the limit of 65536"), "{}", field(l, "reason"));
        assert_eq!(l.get("payload").map(Vec::len), Some(1024), "cut to its first KiB");
        assert_eq!(field(l, "payload_bytes"), big.len().to_string());
        assert_eq!(field(l, "payload_sha256"), sha);
    }
    assert_eq!(engine.stop(), 0, "{}", s.logs());
}

#[test]
fn a_dead_letter_stream_keeps_its_maxlen() {
    let s = Setup::new("dlq_maxlen", "stream: $STREAM\n    group: fraud", None);
    s.edit(&[(
        &format!("dead_letter: {{ stream: {} }}", dlq(&s)),
        format!("dead_letter: {{ stream: {}, maxlen: 5 }}", dlq(&s)),
    )]);
    let bad: Vec<String> = (1..=20).map(|i| format!("{{not json {i}")).collect();
    xadd_all(&s.stream, &bad);
    xadd(&mut redis(), &s.stream, &event(100, 1, 2500.0, "USD"));
    let mut engine = s.start(&["--max-events", "1"]);
    assert_eq!(engine.wait().expect("exits").code(), Some(0), "{}", s.logs());
    let dead = letters(&dlq(&s));
    let payloads: Vec<String> = dead.iter().map(|l| field(l, "payload")).collect();
    assert_eq!(payloads, bad[15..].to_vec(), "the newest five kept");
    assert_eq!(s.alert_ids(), BTreeSet::from(["large_amount:100".to_string()]));
}

#[test]
fn a_locked_warehouse_under_large_events_holds_back_the_reads_by_bytes() {
    let (s, engine) = refusing("queue_bytes");
    let engine = Running::new(engine);
    let mut lock = Command::new("psql")
        .args([
            &format!("{}/{}", server(), s.db),
            "-qtA",
            "-c",
            "BEGIN; LOCK TABLE fraud_alerts IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(15); COMMIT;",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("psql runs");
    wait_for("the lock", Duration::from_secs(10), || {
        psql(&s.db, "SELECT count(*) FROM pg_locks WHERE relation = 'fraud_alerts'::regclass AND mode = 'AccessExclusiveLock' AND granted").trim() == "1"
    });
    // 6,000 alerts of events of 32 KiB each: about 190 MiB of events, and
    // copies of them in the transforms' outputs, waiting for one sink.
    let pad = "M".repeat(32 << 10);
    let payloads: Vec<String> =
        (0..6000).map(|id| event(id, id % 50, 2500.0, "USD").replace("M000001", &pad)).collect();
    for chunk in payloads.chunks(500) {
        xadd_all(&s.stream, chunk);
    }
    std::thread::sleep(Duration::from_secs(4));
    let unread = group_lag(&s.stream);
    eprintln!("{unread} of 6000 entries not read while the warehouse was locked");
    assert!(lock.try_wait().expect("psql").is_none(), "the lock outlasted the burst");
    assert!(unread > 1000, "the engine stopped reading at its byte bound: {unread} entries not read");
    lock.wait().expect("the lock ends");
    wait_for("every alert", Duration::from_secs(120), || s.alerts() >= 6000 && s.pending() == 0);
    let _: () = redis::cmd("DEL").arg(&s.stream).query(&mut redis()).expect("DEL");
    assert_eq!(engine.stop(), 0, "{}", s.logs());
    assert_eq!(s.alerts(), 6000);
}

/// Entries of `stream` the group `fraud` has not been delivered yet.
fn group_lag(stream: &str) -> i64 {
    let groups: Vec<HashMap<String, redis::Value>> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query(&mut redis()).expect("XINFO");
    groups
        .iter()
        .find_map(|g| match g.get("lag") {
            Some(redis::Value::Int(n)) => Some(*n),
            _ => None,
        })
        .unwrap_or(-1)
}

#[test]
fn an_event_in_the_wrong_partition_is_dead_lettered_and_touches_no_other_partitions_state() {
    let s = Setup::new(
        "misrouted",
        "stream: $STREAM\n    group: fraud\n    partitions: 2\n    partition_by: customer_id",
        None,
    );
    write_rule(&s.dir.join("rules"), "velocity.yaml", VELOCITY_1S);
    let of = |c: i64| crc32(c.to_string().as_bytes()) % 2;
    let (c0, c1) = ((1..).find(|c| of(*c) == 0).unwrap_or(0), (1..).find(|c| of(*c) == 1).unwrap_or(0));
    let engine = Running::new(s.start(&["--shard", "1/2"]));
    let part1 = format!("{}:1", s.stream);
    let mut c = redis();
    // A producer that hashes differently: customer c0 belongs in partition 0.
    xadd(&mut c, &part1, &event_ts(1, c0, 2500.0, &ts_ago(Duration::ZERO)));
    xadd(&mut c, &part1, &event_ts(2, c1, 2600.0, &ts_ago(Duration::ZERO)));
    wait_for("the alert of the event in its place", Duration::from_secs(60), || {
        s.alert_ids().contains("large_amount:2")
    });
    wait_for("partition 1 acknowledged", Duration::from_secs(30), || group_caught_up(&part1, "fraud"));
    let dead = letters(&dlq(&s));
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = field(&dead[0], "reason");
    assert!(
        reason.contains(&format!("customer_id {c0} belongs in partition 0")) && reason.contains("partition 1"),
        "{reason}"
    );
    assert!(!s.alert_ids().contains("large_amount:1"));
    let exists = |p: u32| -> i64 {
        redis::cmd("EXISTS").arg(format!("{{{}:{p}}}:windows:fraud", s.stream)).query(&mut redis()).expect("EXISTS")
    };
    assert_eq!(exists(0), 0, "shard 1 wrote nothing of partition 0");
    assert_eq!(exists(1), 1);
    assert_eq!(engine.stop(), 0, "{}", s.logs());
}

#[test]
fn window_state_never_expires_names_its_owner_and_is_missed_loudly() {
    let s = Setup::new(
        "owner",
        "stream: $STREAM\n    group: fraud\n    partitions: 2\n    partition_by: customer_id",
        None,
    );
    write_rule(
        &s.dir.join("rules"),
        "velocity.yaml",
        "id: velocity\nseverity: medium\nwindow: { by: [customer_id], size: 3s, time: timestamp, allowed_lateness: 0s }\nwhen: count(*) >= 5\n",
    );
    // Two customers in each partition.
    let of = |c: i64| crc32(c.to_string().as_bytes()) % 2;
    let mut customers: Vec<i64> = (1..).filter(|c| of(*c) == 0).take(2).collect();
    customers.extend((1..).filter(|c| of(*c) == 1).take(2));
    let mut c = redis();
    for id in 0..20 {
        let customer = customers[id as usize % 4];
        xadd(&mut c, &format!("{}:{}", s.stream, of(customer)), &event(id, customer, 10.0, "USD"));
    }
    let mut engine = s.start(&["--max-events", "20"]);
    assert_eq!(engine.wait().expect("exits").code(), Some(0), "{}", s.logs());
    let key = |p: u32| format!("{{{}:{p}}}:windows:fraud", s.stream);
    for p in 0..2 {
        let ttl: i64 = redis::cmd("TTL").arg(key(p)).query(&mut c).expect("TTL");
        assert_eq!(ttl, -1, "partition {p}'s window state has no expiry");
        let owner: String = redis::cmd("HGET").arg(key(p)).arg("owner").query(&mut c).expect("HGET");
        let owner: serde_json::Value = serde_json::from_str(&owner).expect("owner as JSON");
        assert_eq!(owner["partition"], p, "{owner}");
        assert_eq!(owner["stream"], format!("{}:{p}", s.stream), "{owner}");
        assert!(owner["consumer"].is_string() && owner["written_at"].is_string(), "{owner}");
    }
    // Evicted or deleted: the next start says so, loudly, and counts it.
    let _: () = redis::cmd("DEL").arg(key(0)).query(&mut c).expect("DEL");
    let port = free_port();
    let again = Running::new(s.start(&["--metrics-addr", &format!("127.0.0.1:{port}")]));
    wait_for("the missing state reported", Duration::from_secs(60), || {
        metric(port, "engine_window_state_missing_total{source=\"transactions\"}") == Some(1.0)
    });
    let logs = s.logs();
    assert!(logs.contains("WARN") && logs.contains(&format!("window state of '{}:0' is missing", s.stream)), "{logs}");
    assert_eq!(again.stop(), 0, "{}", s.logs());
}

#[test]
fn validate_connect_refuses_a_redis_that_may_evict_window_state() {
    let dir = scratch("evicting-redis");
    let port = free_port();
    let mut server = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--maxmemory-policy", "allkeys-lru", "--dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server runs");
    wait_for("the private redis", Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok());
    let spec = "version: 1\nname: evict\nmode: stream\nconnections:\n  bus: { type: redis, url: \"{{ env.REDIS_URL }}\" }\nsources:\n  events: { connection: bus, stream: evict_events, group: g, schema: { id: int64 } }\nsinks:\n  out: { input: events, type: stdout }\n";
    std::fs::write(dir.join("evict.yaml"), spec).expect("spec");
    let url = format!("redis://127.0.0.1:{port}");
    let out = super::engine_env(&dir, &["validate", "--connect", "evict.yaml"], &[("REDIS_URL", &url)]);
    let err = text(&out.stderr);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("maxmemory-policy allkeys-lru") && err.contains("noeviction"), "{err}");
}

#[test]
fn idle_connections_to_the_metrics_port_are_closed_and_do_not_stall_the_stream() {
    let redis_addr = redis_url().trim_start_matches("redis://").trim_end_matches('/').to_string();
    let proxy = Proxy::start(&redis_addr);
    let mut s = Setup::new("idle_http", "stream: $STREAM\n    group: fraud", None);
    s.redis_url = format!("redis://127.0.0.1:{}", proxy.port);
    let port = free_port();
    let engine = Running::new(s.start(&["--metrics-addr", &format!("127.0.0.1:{port}")]));
    wait_for("the metrics endpoint", Duration::from_secs(60), || http_get(port, "/health").contains("200 OK"));
    let fds_before = open_fds(engine.pid());
    let idle: Vec<TcpStream> =
        (0..300).map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect")).collect();
    proxy.cut();
    let expected = super::stream::produce(&s.stream, 0, 200);
    std::thread::sleep(Duration::from_secs(2));
    proxy.restore();
    wait_for("every alert after Redis came back", Duration::from_secs(60), || s.alert_ids() == expected);
    wait_for("the idle connections closed", Duration::from_secs(30), || {
        open_fds(engine.pid()) < fds_before + 20
    });
    let closed = idle
        .into_iter()
        .filter(|mut c| {
            let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
            matches!(c.read(&mut [0u8; 64]), Ok(0) | Err(_))
        })
        .count();
    assert_eq!(closed, 300, "every idle connection closed by the engine");
    assert!(http_get(port, "/health").starts_with("HTTP/1.1 200"), "health answers");
    assert_eq!(engine.stop(), 0, "{}", s.logs());
}

#[test]
fn numbers_beyond_their_type_and_duplicate_keys_are_refused_and_non_finite_floats_only_where_allowed() {
    let s = Setup::new("numbers", "stream: $STREAM\n    group: fraud", None);
    s.edit(&[(
        "      status: string\n",
        "      status: string\n      score: float64\n      ratio: { type: float64, non_finite: true }\n".into(),
    )]);
    let duplicate = event(2, 1, 10.0, "USD").replace("\"currency\"", "\"amount\": 5000, \"currency\"");
    let events = [
        event_with(1, 1, 2500.0, "\"score\": 1e400"),
        duplicate,
        event_with(3, 1, 2500.0, "\"ratio\": \"NaN\""),
        event_with(4, 1, 2500.0, "\"ratio\": -1e400"),
        event_with(5, 1, 2500.0, "\"score\": \"Infinity\""),
        event(6, 1, 2600.0, "USD"),
    ];
    xadd_all(&s.stream, &events);
    let mut engine = s.start(&["--max-events", "3"]);
    assert_eq!(engine.wait().expect("exits").code(), Some(0), "{}", s.logs());
    let want: BTreeSet<String> =
        ["large_amount:3", "large_amount:4", "large_amount:6"].iter().map(|s| s.to_string()).collect();
    assert_eq!(s.alert_ids(), want);
    let reasons: Vec<String> = letters(&dlq(&s)).iter().map(|l| field(l, "reason")).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("field 'score'") && reasons[0].contains("out of float64's range"), "{reasons:?}");
    assert!(reasons[1].contains("duplicate key 'amount'"), "{reasons:?}");
    assert!(reasons[2].contains("field 'score'") && reasons[2].contains("non_finite"), "{reasons:?}");
}

#[test]
fn a_nul_in_a_field_name_reaches_a_table_dead_letter_and_the_stream_goes_on() {
    let s = Setup::new("nul_field", "stream: $STREAM\n    group: fraud", None);
    s.edit(&[(
        &format!("dead_letter: {{ stream: {} }}", dlq(&s)),
        "dead_letter: { connection: dwh, table: stream_dead_letters }".into(),
    )]);
    let mut c = redis();
    let _: String = redis::cmd("XADD").arg(&s.stream).arg("*").arg(&b"pay\0load"[..]).arg("{}").query(&mut c).expect("XADD");
    xadd(&mut c, &s.stream, &event(7, 1, 2500.0, "USD"));
    let engine = Running::new(s.start(&[]));
    wait_for("the alert after it, nothing pending", Duration::from_secs(60), || {
        s.alert_ids().contains("large_amount:7") && s.pending() == 0
    });
    let reason = psql(&s.db, "SELECT reason FROM stream_dead_letters");
    assert!(reason.contains("entry has no field 'payload'") && reason.contains("pay"), "{reason}");
    assert_eq!(engine.stop(), 0, "{}", s.logs());
}

#[test]
fn a_dead_consumers_entries_are_claimed_behind_a_thousand_of_the_engines_own() {
    let s = Setup::new("starved", "stream: $STREAM\n    group: fraud\n    consumer: me\n    reclaim_after: 1s", None);
    // A first run makes the group and the warehouse's tables.
    let first = s.start(&[]);
    wait_for("the group and the tables", Duration::from_secs(60), || {
        group_exists(&s.stream) && psql(&s.db, "SELECT to_regclass('fraud_alerts') IS NOT NULL").trim() == "t"
    });
    assert_eq!(stop(first), 0, "{}", s.logs());
    let expected = super::stream::produce(&s.stream, 0, 1510);
    let mut c = redis();
    // The engine's consumer holds 1,500 entries; a consumer that died holds the next 10.
    for (consumer, count) in [("me", 1500), ("ghost", 10)] {
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("fraud")
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(&s.stream)
            .arg(">")
            .query(&mut c)
            .expect("XREADGROUP");
    }
    // While the warehouse is locked, the engine's own entries stay pending.
    let mut lock = Command::new("psql")
        .args([
            &format!("{}/{}", server(), s.db),
            "-qtA",
            "-c",
            "BEGIN; LOCK TABLE fraud_alerts IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(15); COMMIT;",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("psql runs");
    wait_for("the lock", Duration::from_secs(10), || {
        psql(&s.db, "SELECT count(*) FROM pg_locks WHERE relation = 'fraud_alerts'::regclass AND mode = 'AccessExclusiveLock' AND granted").trim() == "1"
    });
    let engine = Running::new(s.start(&[]));
    let ghost_pending = || -> usize {
        let p: Vec<redis::Value> = redis::cmd("XPENDING")
            .arg(&s.stream)
            .arg("fraud")
            .arg("-")
            .arg("+")
            .arg(100)
            .arg("ghost")
            .query(&mut redis())
            .expect("XPENDING");
        p.len()
    };
    wait_for("the dead consumer's entries claimed", Duration::from_secs(10), || ghost_pending() == 0);
    assert!(lock.try_wait().expect("psql").is_none(), "claimed while the engine's own entries were pending");
    lock.wait().expect("the lock ends");
    wait_for("every alert", Duration::from_secs(60), || s.alert_ids() == expected && s.pending() == 0);
    assert_eq!(engine.stop(), 0, "{}", s.logs());
}
