//! The stream benchmark: `engine stream` with 20 rules (2 windowed), alerts to
//! Redis and PostgreSQL, on Redis Streams and on Pub/Sub, against a bare
//! consumer measured in the same run: the same redis crate reading and
//! discarding the same messages (XREADGROUP + XACK, or SUBSCRIBE).
//!
//! Prints, per transport: events/s sustained (engine and bare, and their
//! ratio; the median of three runs; on Streams the windows are durable, their
//! state saved in Redis with every acknowledgement; Streams again with the
//! two lookup tables of `pipelines/fraud.yaml` joined, a 100,000-row
//! customer profile and 2,000 merchants, and a rule over them), end-to-end latency
//! p50/p99 at a fixed 5,000 events/s (event published -> its alert received
//! on the alerts channel), the engine's peak RSS, and what the window state
//! costs in Redis memory.
//!
//! Usage: `cargo run --release -p bench --bin stream -- [EVENTS]` (default
//! 1000000). It needs the services of `scripts/services` and a release build
//! of the engine; it uses its own Redis keys (`bench.*`) and database
//! (`bench_stream`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bench::{fail, psql, wait_with_rss, SERVER};
const STREAM: &str = "bench.tx";
const CHANNEL: &str = "bench.tx.channel";
const ALERTS: &str = "bench.alerts";
const LATENCY_RATE: u64 = 5000;
const LATENCY_SECS: u64 = 10;
const RUNS: usize = 3;

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.replace('_', "").parse().ok()).unwrap_or(1_000_000);
    let root = bench::root();
    let engine = bench::engine();
    let client = redis::Client::open(redis_url()).unwrap_or_else(|e| fail(&format!("redis: {e}")));
    let mut conn = client.get_connection().unwrap_or_else(|e| fail(&format!("redis: {e}")));
    let work = std::env::temp_dir().join(format!("bench-stream-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap_or_else(|e| fail(&format!("{}: {e}", work.display())));
    let rules = root.join("bench/stream/rules");
    let payloads: Vec<String> = (0..n).map(event).collect();
    let large = payloads.iter().filter(|p| amount_of(p) > 2000.0).count();
    println!("{n} events, {large} above $2,000; 20 rules (2 windowed, 1 shadow, 1 disabled)");

    // Redis Streams.
    reset(&mut conn);
    let started = Instant::now();
    for chunk in payloads.chunks(5000) {
        let mut pipe = redis::pipe();
        for p in chunk {
            pipe.cmd("XADD").arg(STREAM).arg("*").arg("payload").arg(p).ignore();
        }
        pipe.query::<()>(&mut conn).unwrap_or_else(|e| fail(&format!("XADD: {e}")));
    }
    println!("loaded the stream in {:.1}s", started.elapsed().as_secs_f64());
    let spec = write_spec(&work, "streams", &rules, &format!("stream: {STREAM}\n    group: fraud"), false);
    let lookup_rules = with_lookup_rule(&work, &rules);
    let spec_lookups =
        write_spec(&work, "lookups", &lookup_rules, &format!("stream: {STREAM}\n    group: fraud"), true);
    // Each throughput figure is the median of RUNS runs, bare consumer and
    // engine back to back in each: the publisher and Redis share the two
    // cores, and single runs vary by a fifth.
    let mut streams = Vec::new();
    let mut state = (0i64, 0i64, 0i64);
    let mut lookup_bytes = String::new();
    for (spec, lookups) in [(&spec, false), (&spec_lookups, true)] {
        let (mut bare, mut eng, mut rss) = (vec![], vec![], 0);
        for _ in 0..RUNS {
            for group in ["bare", "fraud"] {
                let _: redis::RedisResult<i64> =
                    redis::cmd("XGROUP").arg("DESTROY").arg(STREAM).arg(group).query(&mut conn);
            }
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(STATE).query(&mut conn);
            reset_database();
            bare.push(bare_stream_consumer(n));
            let log = work.join("lookups.log");
            let started = Instant::now();
            let child = spawn_engine_logged(
                &engine,
                spec,
                &["--max-events", &n.to_string()],
                lookups.then_some(&*log),
            );
            rss = rss.max(finish(child).1);
            eng.push(n as f64 / started.elapsed().as_secs_f64());
            check_alerts(large);
            if lookups {
                lookup_bytes = loaded_lookups(&log);
            } else {
                state = window_state(&mut conn, &engine, spec, &work);
            }
        }
        let what = if lookups { "Streams with lookups" } else { "Streams" };
        println!("{what} runs, events/s: bare {}, engine {}", list(&bare), list(&eng));
        streams.push((median(&bare), median(&eng), rss));
    }
    let [(bare_streams, engine_streams, rss_streams), (bare_lookups, engine_lookups, rss_lookups)] =
        [streams[0], streams[1]];

    // Pub/Sub.
    let limit: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("client-output-buffer-limit")
        .query(&mut conn)
        .unwrap_or_default();
    // A subscriber that falls behind a fast publisher is disconnected at
    // 32 MB of backlog by default; the throughput runs lift that limit.
    let _: redis::RedisResult<()> = redis::cmd("CONFIG")
        .arg("SET")
        .arg("client-output-buffer-limit")
        .arg("pubsub 0 0 0")
        .query(&mut conn);
    reset(&mut conn);
    let spec_ps = write_spec(&work, "pubsub", &rules, &format!("channel: {CHANNEL}"), false);
    let (mut bare, mut eng, mut rss_pubsub) = (vec![], vec![], 0);
    for _ in 0..RUNS {
        reset_database();
        bare.push(bare_subscriber(&mut conn, &payloads));
        let child = spawn_engine(&engine, &spec_ps, &["--max-events", &n.to_string()]);
        wait_subscribed(&mut conn, CHANNEL);
        let started = Instant::now();
        publish_all(&mut conn, &payloads);
        rss_pubsub = rss_pubsub.max(finish(child).1);
        eng.push(n as f64 / started.elapsed().as_secs_f64());
        check_alerts(large);
    }
    println!("Pub/Sub runs, events/s: bare {}, engine {}", list(&bare), list(&eng));
    let (bare_pubsub, engine_pubsub) = (median(&bare), median(&eng));
    if limit.len() == 2 {
        let _: redis::RedisResult<()> =
            redis::cmd("CONFIG").arg("SET").arg(&limit[0]).arg(&limit[1]).query(&mut conn);
    }

    // Latency at a fixed rate.
    reset(&mut conn);
    let (p50_s, p99_s, rss_ls) = latency(&client, &engine, &spec, false, n);
    reset(&mut conn);
    let (p50_p, p99_p, rss_lp) = latency(&client, &engine, &spec_ps, true, n);

    let rss = |k: i64| k as f64 / 1024.0;
    println!();
    println!("                                bare consumer     engine     ratio");
    println!(
        "Redis Streams events/s          {bare_streams:>13.0} {engine_streams:>10.0} {:>9.2}",
        engine_streams / bare_streams
    );
    println!(
        "Redis Pub/Sub events/s          {bare_pubsub:>13.0} {engine_pubsub:>10.0} {:>9.2}",
        engine_pubsub / bare_pubsub
    );
    println!(
        "Streams, 2 lookups joined       {bare_lookups:>13.0} {engine_lookups:>10.0} {:>9.2}",
        engine_lookups / bare_lookups
    );
    println!();
    println!("latency at {LATENCY_RATE} events/s, event published -> alert received:");
    println!("  Redis Streams                 p50 {p50_s:>6.1} ms   p99 {p99_s:>6.1} ms");
    println!("  Redis Pub/Sub                 p50 {p50_p:>6.1} ms   p99 {p99_p:>6.1} ms");
    println!();
    println!(
        "engine peak RSS                 Streams {:.0} MiB, Pub/Sub {:.0} MiB (latency runs {:.0} / {:.0} MiB)",
        rss(rss_streams),
        rss(rss_pubsub),
        rss(rss_ls),
        rss(rss_lp)
    );
    println!(
        "lookup tables                   {lookup_bytes}; peak RSS with them {:.0} MiB ({:+.0} MiB)",
        rss(rss_lookups),
        rss(rss_lookups) - rss(rss_streams)
    );
    let (keys, bytes, restore_ms) = state;
    if keys > 0 {
        println!(
            "window state in Redis            {keys} window keys, {:.1} MiB: {:.0} bytes a key, {:.1} MiB per 100,000 keys; restored in {restore_ms} ms",
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / keys as f64,
            bytes as f64 / keys as f64 * 100_000.0 / (1 << 20) as f64
        );
    }
    println!(
        "targets: Streams ratio (durable windows) >= 0.60, with 2 lookups >= 0.50; p99 < 10 ms at {LATENCY_RATE} events/s"
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// Where the engine keeps the Streams run's window state.
const STATE: &str = "{bench.tx}:windows:fraud";

/// The window keys saved after a run, as an engine started on the same
/// stream restores them; the bytes they take in Redis; and how long the
/// restore took (ms).
fn window_state(conn: &mut redis::Connection, engine: &Path, spec: &Path, work: &Path) -> (i64, i64, i64) {
    let bytes: Option<i64> =
        redis::cmd("MEMORY").arg("USAGE").arg(STATE).arg("SAMPLES").arg(0).query(conn).unwrap_or(None);
    let log = work.join("restore.log");
    finish(spawn_engine_filtered(engine, spec, &["--for", "1s"], &log, "warn,engine::stream=info"));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // "window state of N keys restored in M ms"
    let line = text
        .lines()
        .find_map(|l| l.split_once("window state of ").map(|(_, rest)| rest.to_string()))
        .unwrap_or_else(|| fail(&format!("the engine restored no window state: {text}")));
    let words: Vec<&str> = line.split_whitespace().collect();
    let number = |i: usize| words.get(i).and_then(|w| w.parse::<i64>().ok()).unwrap_or(0);
    (number(0), bytes.unwrap_or(0), number(4))
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Event `i`: deterministic, one customer in 100,000, about 4% above $2,000,
/// event times 1 ms apart.
fn event(i: u64) -> String {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let customer = next() % 100_000 + 1;
    let merchant = next() % 2000 + 1;
    let cents = if next() % 100 < 4 { 200_001 + next() % 700_000 } else { 100 + next() % 199_900 };
    let currency = ["USD", "EUR", "GBP"][(next() % 3) as usize];
    let ms = 1_795_000_000_000u64 + i;
    format!(
        r#"{{"transaction_id": {i}, "customer_id": {customer}, "merchant_id": "M{merchant:06}", "amount": {}.{:02}, "currency": "{currency}", "timestamp": "{}"}}"#,
        cents / 100,
        cents % 100,
        rfc3339(ms)
    )
}

fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms % 1000)
}

fn amount_of(payload: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
    v["amount"].as_f64().unwrap_or(0.0)
}

fn reset(conn: &mut redis::Connection) {
    let _: redis::RedisResult<()> =
        redis::cmd("DEL").arg(STREAM).arg(format!("{STREAM}.dlq")).arg(STATE).query(conn);
    reset_database();
}

/// A fresh `bench_stream` database with the warehouse's tables, and the
/// lookups of `pipelines/fraud.yaml` filled: a profile for each of the
/// 100,000 customers and 2,000 merchants.
fn reset_database() {
    psql("postgres", "DROP DATABASE IF EXISTS bench_stream WITH (FORCE)");
    psql("postgres", "CREATE DATABASE bench_stream");
    let dir = bench::root().join("migrations/dwh");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| fail(&format!("{}: {e}", dir.display())))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    for f in files {
        psql(
            "bench_stream",
            &std::fs::read_to_string(&f).unwrap_or_else(|e| fail(&format!("{}: {e}", f.display()))),
        );
    }
    psql(
        "bench_stream",
        "INSERT INTO customer_profile SELECT c, (ARRAY['US','GB','DE','FR','PT'])[1 + c % 5], 10 + c % 90, \
         50 + (c % 400), 20.0, 900.0, (ARRAY['USD','EUR','GBP','EUR,USD'])[1 + c % 4], 'grocery,travel', now() \
         FROM generate_series(1, 100000) AS c; \
         INSERT INTO dim_merchant (merchant_key, merchant_id, name, category, city, country) \
         SELECT m, 'M' || lpad(m::text, 6, '0'), 'Merchant ' || m, \
         (ARRAY['grocery','travel','electronics','dining','fuel','entertainment','health','other'])[1 + m % 8], \
         'City', (ARRAY['US','GB','DE','FR','PT'])[1 + m % 5] FROM generate_series(1, 2000) AS m",
    );
}

/// The benchmark's rules and one over the lookups' columns, in a folder.
fn with_lookup_rule(dir: &Path, rules: &Path) -> PathBuf {
    let out = dir.join("lookup-rules");
    std::fs::create_dir_all(&out).unwrap_or_else(|e| fail(&format!("{}: {e}", out.display())));
    for e in std::fs::read_dir(rules).unwrap_or_else(|e| fail(&format!("{}: {e}", rules.display()))).flatten()
    {
        let _ = std::fs::copy(e.path(), out.join(e.file_name()));
    }
    let rule = "id: far_above_profile\nseverity: high\n\
                when: merchant_category = 'electronics' AND merchant_country <> home_country AND amount > 5 * typical_amount\n";
    std::fs::write(out.join("far_above_profile.yaml"), rule).unwrap_or_else(|e| fail(&format!("rule: {e}")));
    out
}

/// `lookup=NAME rows=N bytes=B` of each lookup the engine loaded, from its log.
fn loaded_lookups(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.contains("lookup table loaded")) {
        let field = |k: &str| {
            line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{k}="))).unwrap_or("?").to_string()
        };
        let bytes: f64 = field("bytes").parse().unwrap_or(0.0);
        out.push(format!("{} {} rows {:.1} MiB", field("lookup"), field("rows"), bytes / (1 << 20) as f64));
    }
    if out.is_empty() {
        "none loaded".into()
    } else {
        out.join(", ")
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn list(xs: &[f64]) -> String {
    xs.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" / ")
}

/// `pipelines/fraud.yaml` with the benchmark's rules, stream or channel,
/// dead letter and alerts channel.
/// Without `lookups`, the rules read the events directly, as before the
/// lookups were joined.
fn write_spec(dir: &Path, name: &str, rules: &Path, source: &str, lookups: bool) -> PathBuf {
    let root = bench::root();
    let mut spec = std::fs::read_to_string(root.join("pipelines/fraud.yaml"))
        .unwrap_or_else(|e| fail(&format!("pipelines/fraud.yaml: {e}")));
    if !lookups {
        let cut = |spec: &str, from: &str, to: &str| -> String {
            let (Some(a), Some(b)) = (spec.find(from), spec.find(to)) else {
                fail(&format!("pipelines/fraud.yaml no longer has {from:?} before {to:?}"))
            };
            format!("{}{}", &spec[..a], &spec[b..])
        };
        spec = cut(&spec, "  # Lookup tables:", "transforms:");
        spec = cut(&spec, "  enriched:", "  flagged:");
        spec = spec.replace("    input: enriched\n", "    input: transactions\n");
        // The spec's tests give the lookups rows.
        let Some(tests) = spec.find("\ntests:") else { fail("pipelines/fraud.yaml no longer has its tests") };
        spec.truncate(tests + 1);
    }
    let edits = [
        ("rules: ../rules/fraud", format!("rules: \"{}\"", rules.display())),
        (
            "migrations: ../migrations/dwh",
            format!("migrations: \"{}\"", root.join("migrations/dwh").display()),
        ),
        (
            "    stream: financial_transactions\n    group: fraud\n    partitions: 4\n    partition_by: customer_id\n",
            format!("    {source}\n"),
        ),
        (
            "dead_letter: { stream: financial_transactions.dlq }",
            format!("dead_letter: {{ stream: {STREAM}.dlq }}"),
        ),
        ("channel: fraud_alerts", format!("channel: {ALERTS}")),
    ];
    for (from, to) in edits {
        if !spec.contains(from) {
            fail(&format!("pipelines/fraud.yaml no longer has {from:?}"));
        }
        spec = spec.replace(from, &to);
    }
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, spec).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
    path
}

fn spawn_engine(engine: &Path, spec: &Path, args: &[&str]) -> Child {
    spawn_engine_logged(engine, spec, args, None)
}

/// The engine; with `log`, its log goes there, lookups loaded at info.
fn spawn_engine_logged(engine: &Path, spec: &Path, args: &[&str], log: Option<&Path>) -> Child {
    match log {
        Some(path) => spawn_engine_filtered(engine, spec, args, path, "warn,engine::stream::lookup=info"),
        None => spawn(engine, spec, args, "warn", Stdio::inherit()),
    }
}

/// The engine, its log (at `filter`) to `log`.
fn spawn_engine_filtered(engine: &Path, spec: &Path, args: &[&str], log: &Path, filter: &str) -> Child {
    let file = std::fs::File::create(log).unwrap_or_else(|e| fail(&format!("{}: {e}", log.display())));
    spawn(engine, spec, args, filter, Stdio::from(file))
}

fn spawn(engine: &Path, spec: &Path, args: &[&str], filter: &str, stderr: Stdio) -> Child {
    Command::new(engine)
        .arg("stream")
        .arg(spec)
        .args(args)
        .env("ENGINE_LOG", filter)
        .env("REDIS_URL", redis_url())
        .env("DWH_DATABASE_URL", format!("{SERVER}/bench_stream"))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start the engine: {e}")))
}

/// Waits for the engine; returns its exit status and peak RSS (KiB).
fn finish(child: Child) -> (i32, i64) {
    let (status, rss) = wait_with_rss(child.id() as i32);
    if status != 0 {
        fail(&format!("the engine exited with status {status}"));
    }
    (status, rss)
}

/// Every large amount has its one `large_amount` alert in PostgreSQL.
fn check_alerts(large: usize) {
    let got = psql("bench_stream", "SELECT count(*) FROM fraud_alerts WHERE rule_id = 'large_amount'");
    if got.trim() != large.to_string() {
        fail(&format!("{} large_amount alerts in fraud_alerts, expected {large}", got.trim()));
    }
}

/// XREADGROUP + XACK, discarding the entries: the most a consumer of this
/// stream can do with this client library (async, as the engine uses it) on
/// this machine.
fn bare_stream_consumer(n: u64) -> f64 {
    runtime().block_on(async {
        let client = redis::Client::open(redis_url()).unwrap_or_else(|e| fail(&format!("redis: {e}")));
        let mut conn =
            client.get_multiplexed_async_connection().await.unwrap_or_else(|e| fail(&format!("redis: {e}")));
        let _: redis::RedisResult<()> =
            redis::cmd("XGROUP").arg("CREATE").arg(STREAM).arg("bare").arg("0").query_async(&mut conn).await;
        let started = Instant::now();
        let mut read = 0u64;
        while read < n {
            let reply: redis::Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("bare")
                .arg("c1")
                .arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(1000)
                .arg("STREAMS")
                .arg(STREAM)
                .arg(">")
                .query_async(&mut conn)
                .await
                .unwrap_or_else(|e| fail(&format!("XREADGROUP: {e}")));
            let ids = entry_ids(reply);
            if ids.is_empty() {
                fail("the bare consumer found the stream empty");
            }
            read += ids.len() as u64;
            let _: i64 = redis::cmd("XACK")
                .arg(STREAM)
                .arg("bare")
                .arg(&ids)
                .query_async(&mut conn)
                .await
                .unwrap_or(0);
        }
        n as f64 / started.elapsed().as_secs_f64()
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("tokio: {e}")))
}

fn entry_ids(reply: redis::Value) -> Vec<Vec<u8>> {
    let arr = |v: redis::Value| match v {
        redis::Value::Array(a) => a,
        _ => vec![],
    };
    let mut out = Vec::new();
    for stream in arr(reply) {
        for entries in arr(stream).into_iter().skip(1) {
            for e in arr(entries) {
                if let Some(redis::Value::BulkString(id)) = arr(e).into_iter().next() {
                    out.push(id);
                }
            }
        }
    }
    out
}

fn publish_all(conn: &mut redis::Connection, payloads: &[String]) {
    for chunk in payloads.chunks(1000) {
        let mut pipe = redis::pipe();
        for p in chunk {
            pipe.cmd("PUBLISH").arg(CHANNEL).arg(p).ignore();
        }
        pipe.query::<()>(conn).unwrap_or_else(|e| fail(&format!("PUBLISH: {e}")));
    }
}

/// Waits until the engine reads the stream, as a Pub/Sub run waits for its
/// subscription: adds one event (not timed) and waits for the engine to
/// have read and acknowledged it (its first batch done).
fn wait_reading(conn: &mut redis::Connection, id: u64) {
    let entry: String = redis::cmd("XADD")
        .arg(STREAM)
        .arg("*")
        .arg("payload")
        .arg(event(id))
        .query(conn)
        .unwrap_or_else(|e| fail(&format!("XADD: {e}")));
    let started = Instant::now();
    loop {
        let groups: Vec<HashMap<String, redis::Value>> =
            redis::cmd("XINFO").arg("GROUPS").arg(STREAM).query(conn).unwrap_or_default();
        let text = |v: Option<&redis::Value>| redis::from_redis_value::<String>(v?.clone()).ok();
        let done = groups.iter().any(|g| {
            text(g.get("name")).as_deref() == Some("fraud")
                && text(g.get("last-delivered-id")).as_deref() == Some(entry.as_str())
                && text(g.get("pending")).as_deref() == Some("0")
        });
        if done {
            return;
        }
        if started.elapsed() > Duration::from_secs(30) {
            fail(&format!("no engine read {STREAM} in group fraud"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_subscribed(conn: &mut redis::Connection, channel: &str) {
    let started = Instant::now();
    loop {
        let subs: Vec<(String, i64)> =
            redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query(conn).unwrap_or_default();
        if subs.first().is_some_and(|(_, n)| *n > 0) {
            return;
        }
        if started.elapsed() > Duration::from_secs(30) {
            fail(&format!("nobody subscribed to {channel}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SUBSCRIBE and count the messages, discarding them (the async PubSub of
/// the redis crate, as the engine reads it).
fn bare_subscriber(conn: &mut redis::Connection, payloads: &[String]) -> f64 {
    let n = payloads.len();
    let rt = runtime();
    let (tx, rx) = mpsc::channel();
    let reader = rt.spawn(async move {
        use futures::StreamExt;
        let client = redis::Client::open(redis_url()).unwrap_or_else(|e| fail(&format!("redis: {e}")));
        let mut ps = client.get_async_pubsub().await.unwrap_or_else(|e| fail(&format!("redis: {e}")));
        ps.subscribe(CHANNEL).await.unwrap_or_else(|e| fail(&format!("SUBSCRIBE: {e}")));
        let _ = tx.send(());
        let mut messages = ps.on_message();
        let mut got = 0;
        while got < n {
            match messages.next().await {
                Some(m) => {
                    std::hint::black_box(m.get_payload_bytes());
                    got += 1;
                }
                None => fail("the subscription ended"),
            }
        }
    });
    let _ = rx.recv();
    wait_subscribed(conn, CHANNEL);
    let started = Instant::now();
    publish_all(conn, payloads);
    let _ = rt.block_on(reader);
    n as f64 / started.elapsed().as_secs_f64()
}

/// Runs the engine with no limit, publishes at LATENCY_RATE for
/// LATENCY_SECS, and times each event to its first alert on the alerts
/// channel. Returns p50 and p99 in ms, and the engine's peak RSS.
fn latency(
    client: &redis::Client,
    engine: &Path,
    spec: &Path,
    pubsub: bool,
    first_id: u64,
) -> (f64, f64, i64) {
    let mut conn = client.get_connection().unwrap_or_else(|e| fail(&format!("redis: {e}")));
    let mut sub = client.get_connection().unwrap_or_else(|e| fail(&format!("redis: {e}")));
    let (tx, rx) = mpsc::channel::<(u64, Instant)>();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut ps = sub.as_pubsub();
        ps.subscribe(ALERTS).unwrap_or_else(|e| fail(&format!("SUBSCRIBE: {e}")));
        let _ = ready_tx.send(());
        while let Ok(m) = ps.get_message() {
            let payload: String = m.get_payload().unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&payload).unwrap_or_default();
            if let Some(id) = v["transaction_id"].as_u64() {
                if tx.send((id, Instant::now())).is_err() {
                    break;
                }
            }
        }
    });
    let _ = ready_rx.recv();
    let child = spawn_engine(engine, spec, &[]);
    if pubsub {
        wait_subscribed(&mut conn, CHANNEL);
    } else {
        wait_reading(&mut conn, first_id + 999_999);
    }
    let total = LATENCY_RATE * LATENCY_SECS;
    let mut sent: HashMap<u64, Instant> = HashMap::with_capacity(total as usize);
    let started = Instant::now();
    for k in 0..total {
        let due = started + Duration::from_secs_f64(k as f64 / LATENCY_RATE as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let id = first_id + 1_000_000 + k;
        let payload = event(id);
        let cmd = if pubsub {
            redis::cmd("PUBLISH").arg(CHANNEL).arg(&payload).query::<i64>(&mut conn).map(|_| ())
        } else {
            redis::cmd("XADD")
                .arg(STREAM)
                .arg("*")
                .arg("payload")
                .arg(&payload)
                .query::<String>(&mut conn)
                .map(|_| ())
        };
        cmd.unwrap_or_else(|e| fail(&format!("publish: {e}")));
        sent.insert(id, Instant::now());
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let (_, rss) = finish(child);
    // (latency ms, seconds into the run it was published)
    let mut timed: Vec<(f64, f64)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while let Ok((id, at)) = rx.try_recv() {
        if let Some(s) = sent.get(&id) {
            if seen.insert(id) {
                timed.push((
                    at.duration_since(*s).as_secs_f64() * 1000.0,
                    s.duration_since(started).as_secs_f64(),
                ));
            }
        }
    }
    if timed.is_empty() {
        fail("no alerts arrived in the latency run");
    }
    timed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let lat: Vec<f64> = timed.iter().map(|t| t.0).collect();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let (max, when) = timed[timed.len() - 1];
    println!(
        "{}: published at {rate:.0} events/s, {} alerted events timed, slowest {max:.1} ms (published at {when:.2} s)",
        if pubsub { "Pub/Sub" } else { "Streams" },
        lat.len()
    );
    let _ = std::io::stdout().flush();
    (pct(0.50), pct(0.99), rss)
}
