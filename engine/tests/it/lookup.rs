//! Lookup tables in a stream, against real Redis, PostgreSQL and the
//! MongoDB-wire server: a rule over a joined column, a change of the table
//! seen after the next refresh, a failed refresh that keeps the last good
//! table and shows on `/health`, and a table that cannot be read at start.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::postgres::{database, psql, server};
use super::stream::{free_port, group_caught_up, http_get, redis, redis_url, stop, wait_for};
use super::{scratch, text};

/// A stream of `tx` events joined to lookup `risk` (a postgres table, or
/// the given source), a rule over the joined `tier`, alerts in a table.
struct Lookups {
    dir: PathBuf,
    db: String,
    stream: String,
}

const RULE: &str = "id: risky_customer\nseverity: high\nwhen: tier = 'high'\n";

/// The events with their customer's tier, where the lookup has one.
const LEFT_JOIN: &str = "SELECT t.transaction_id, t.customer_id, t.amount, r.tier FROM tx AS t LEFT JOIN risk AS r ON t.customer_id = r.customer_id";

impl Lookups {
    fn new(name: &str, lookup: &str, sql: &str) -> Self {
        let dir = scratch(&format!("lookup-{name}"));
        let db = database(&format!("lookup_{name}"));
        let stream = format!("it.lookup.{name}.{}", super::unique());
        std::fs::create_dir_all(dir.join("rules")).expect("rules");
        std::fs::write(dir.join("rules/risky.yaml"), RULE).expect("rule");
        let spec = format!(
            r#"version: 1
name: lookups
mode: stream
connections:
  bus: {{ type: redis, url: "{{{{ env.REDIS_URL }}}}" }}
  db: {{ type: postgres, url: "{{{{ env.DB_URL }}}}" }}
  docs: {{ type: mongodb, url: "{{{{ env.MONGODB_URL | default('mongodb://127.0.0.1:27017') }}}}", database: engine_it }}
sources:
  tx:
    connection: bus
    stream: "{stream}"
    group: g
    schema:
      transaction_id: {{ type: int64, required: true }}
      customer_id: int64
      amount: float64
    batch: {{ max_rows: 50, max_wait: 20ms }}
  risk:
{lookup}
transforms:
  enriched:
    sql: {sql}
  flagged: {{ input: enriched, rules: rules, key: transaction_id }}
sinks:
  out: {{ input: flagged, connection: db, table: alerts, mode: upsert, key: [alert_id], create: true }}
"#
        );
        std::fs::write(dir.join("p.yaml"), spec).expect("spec");
        Self { dir, db, stream }
    }

    /// Lookup `risk` from the table `risk` (created empty), refreshed
    /// every `refresh`, left-joined.
    fn postgres(name: &str, refresh: &str) -> Self {
        let s = Self::new(
            name,
            &format!("    connection: db\n    table: risk\n    refresh: {refresh}"),
            LEFT_JOIN,
        );
        psql(&s.db, "CREATE TABLE risk (customer_id int8 PRIMARY KEY, tier text NOT NULL)");
        s
    }

    fn db_url(&self) -> String {
        format!("{}/{}", server(), self.db)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_engine"));
        cmd.current_dir(&self.dir)
            .args(args)
            .env_remove("ENGINE_LOG")
            .env("REDIS_URL", redis_url())
            .env("DB_URL", self.db_url());
        if let Ok(m) = std::env::var("ENGINE_TEST_MONGODB") {
            cmd.env("MONGODB_URL", m);
        }
        cmd
    }

    fn start(&self, port: u16) -> Child {
        let log = std::fs::File::create(self.dir.join("engine.log")).expect("log");
        self.command(&["stream", "p.yaml", "--metrics-addr", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("engine starts")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("engine.log")).unwrap_or_default()
    }

    /// Events `ids`, customer `id % 3 + 1`.
    fn send(&self, ids: std::ops::Range<i64>) {
        let mut pipe = redis::pipe();
        for id in ids {
            let payload =
                format!(r#"{{"transaction_id": {id}, "customer_id": {}, "amount": 10.0}}"#, id % 3 + 1);
            pipe.cmd("XADD").arg(&self.stream).arg("*").arg("payload").arg(payload).ignore();
        }
        let _: () = pipe.query(&mut redis()).expect("XADD");
    }

    fn alerts(&self) -> BTreeSet<String> {
        if psql(&self.db, "SELECT to_regclass('alerts') IS NOT NULL").trim() != "t" {
            return BTreeSet::new();
        }
        psql(&self.db, "SELECT alert_id FROM alerts")
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Starts the engine; once it has read its lookup, sends events 0..30,
    /// of which customer 1's must alert. Its metrics port and the alerts.
    fn start_with_customer_1_risky(&self) -> (Child, u16, BTreeSet<String>) {
        let port = free_port();
        let engine = self.start(port);
        wait_for("the stream", Duration::from_secs(60), || lookup_version(port) >= 1);
        self.send(0..30);
        let want = expected(0..30, &[1]);
        self.wait_alerts(&want);
        (engine, port, want)
    }

    fn wait_alerts(&self, want: &BTreeSet<String>) {
        wait_for("the alerts", Duration::from_secs(60), || self.alerts().len() >= want.len());
        assert_eq!(&self.alerts(), want, "{}", self.log());
    }
}

/// A stream's table sink is ready before its first row: its table is
/// checked (here created) while the stream starts, so the first alert does
/// not wait for the connection and the check (about 100 ms, with every
/// batch behind it waiting too).
#[test]
fn a_table_sink_is_ready_before_its_first_alert() {
    let s = Lookups::postgres("ready", "1m");
    let port = free_port();
    let engine = s.start(port);
    wait_for("the stream", Duration::from_secs(60), || lookup_version(port) >= 1);
    // Events that alert on nothing: no row reaches the sink.
    s.send(0..10);
    wait_for("the events read", Duration::from_secs(60), || group_caught_up(&s.stream, "g"));
    let table = psql(&s.db, "SELECT to_regclass('alerts') IS NOT NULL");
    assert_eq!(stop(engine), 0, "{}", s.log());
    assert_eq!(table.trim(), "t", "the alerts table is created before any alert: {}", s.log());
    assert!(s.alerts().is_empty(), "no alert: {:?}", s.alerts());
}

/// Alert ids of the events in `ids` whose customer is in `risky`.
fn expected(ids: std::ops::Range<i64>, risky: &[i64]) -> BTreeSet<String> {
    ids.filter(|id| risky.contains(&(id % 3 + 1))).map(|id| format!("risky_customer:{id}")).collect()
}

fn health(port: u16) -> serde_json::Value {
    let raw = http_get(port, "/health");
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

fn lookup_version(port: u16) -> u64 {
    health(port)["lookups"]["risk"]["version"].as_u64().unwrap_or(0)
}

#[test]
fn a_postgres_lookup_feeds_a_rule_and_its_changes_show_after_the_refresh() {
    let s = Lookups::postgres("postgres", "1s");
    psql(&s.db, "INSERT INTO risk VALUES (1, 'high'), (2, 'low')");
    // Version 1: customer 1 is high-risk; customer 3 has no row (left join).
    let (engine, port, mut want) = s.start_with_customer_1_risky();

    assert!(
        s.log().contains("node=enriched lookup_joins=1"),
        "the join hashes the lookup per version: {}",
        s.log()
    );

    // A change is in use once the next refresh took it.
    psql(&s.db, "UPDATE risk SET tier = 'high' WHERE customer_id = 2");
    let before = lookup_version(port);
    wait_for("a refresh", Duration::from_secs(30), || lookup_version(port) > before);
    s.send(30..60);
    want.extend(expected(30..60, &[1, 2]));
    s.wait_alerts(&want);

    // A refresh that fails keeps the last good table, and says so.
    psql(&s.db, "ALTER TABLE risk RENAME TO risk_gone");
    wait_for("a failed refresh on /health", Duration::from_secs(30), || {
        health(port)["lookups"]["risk"]["last_error"].is_string()
    });
    let h = health(port);
    assert_eq!(h["status"], "lookup refresh failed", "{h}");
    assert!(h["lookups"]["risk"]["last_error"].as_str().unwrap_or_default().contains("risk"), "{h}");
    let metrics = http_get(port, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("engine_lookup_refresh_failures_total{lookup=\"risk\"}")
                && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(metrics.contains("engine_lookup_rows{lookup=\"risk\"} 2"), "{metrics}");
    s.send(60..90);
    want.extend(expected(60..90, &[1, 2]));
    s.wait_alerts(&want);

    // Back again: the next refresh succeeds and clears the error.
    psql(&s.db, "ALTER TABLE risk_gone RENAME TO risk; UPDATE risk SET tier = 'low'");
    wait_for("a good refresh", Duration::from_secs(30), || health(port)["status"] == "ok");
    s.send(90..120);
    s.wait_alerts(&want);
    assert_eq!(stop(engine), 0, "{}", s.log());
    assert_eq!(s.alerts(), want, "no alert for customers whose tier went back to low");
}

#[test]
fn a_mongodb_lookup_feeds_a_rule_the_same_way() {
    let coll = format!("it_lookup_{}", super::unique());
    let s = Lookups::new(
        "mongodb",
        &format!(
            "    connection: docs\n    collection: {coll}\n    refresh: 1s\n    schema:\n      customer_id: {{ type: int64, required: true }}\n      tier: {{ type: string, path: risk.tier }}"
        ),
        "SELECT t.transaction_id, t.customer_id, t.amount, r.tier FROM tx AS t JOIN risk AS r ON t.customer_id = r.customer_id",
    );
    let mongo = std::env::var("ENGINE_TEST_MONGODB").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into());
    let insert = |docs: Vec<mongodb::bson::Document>| {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let client = mongodb::Client::with_uri_str(&mongo).await.expect("mongo");
            client.database("engine_it").collection(&coll).insert_many(docs).await.expect("insert");
        });
    };
    use mongodb::bson::doc;
    insert(vec![
        doc! { "customer_id": 1_i64, "risk": { "tier": "high" } },
        doc! { "customer_id": 2_i64, "risk": { "tier": "low" } },
    ]);
    let (engine, port, mut want) = s.start_with_customer_1_risky();

    insert(vec![doc! { "customer_id": 3_i64, "risk": { "tier": "high" } }]);
    let before = lookup_version(port);
    wait_for("a refresh", Duration::from_secs(30), || lookup_version(port) > before);
    s.send(30..60);
    want.extend(expected(30..60, &[1, 3]));
    s.wait_alerts(&want);
    assert_eq!(stop(engine), 0, "{}", s.log());
    assert_eq!(s.alerts(), want);
}

#[test]
fn a_lookup_that_cannot_be_read_at_start_is_an_error_with_its_place() {
    let s =
        Lookups::new("missing", "    connection: db\n    table: no_such_table\n    refresh: 1m", LEFT_JOIN);
    let out = s.command(&["stream", "p.yaml", "--max-events", "1"]).output().expect("engine runs");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("lookup table 'risk' (") && stderr.contains("p.yaml:18:3)"), "{stderr}");
    assert!(stderr.contains("no_such_table"), "{stderr}");
}
