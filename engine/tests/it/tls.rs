//! TLS to PostgreSQL (the local cluster has `ssl = on` with its own
//! certificate) and to a Redis the test starts with `--tls-port` and a
//! certificate authority the test makes with openssl.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::postgres::{database, psql, server};
use super::stream::{event, free_port, wait_for, Setup};
use super::{engine, scratch, text};

/// The certificate the PostgreSQL server presents (a self-signed one for
/// `localhost` on Debian), as the server names it.
fn pg_cert() -> String {
    psql("postgres", "SHOW ssl_cert_file").trim().to_string()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", text(&out.stderr));
}

/// A certificate authority `ca.pem` and, signed by it, a certificate for
/// `localhost` (`server.pem`, `server.key`), in `dir`.
fn make_certs(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "2", "-keyout", "ca.key", "-out", "ca.pem"];
    ca.extend(ec);
    ca.extend(["-subj", "/CN=engine test CA", "-addext", "basicConstraints=critical,CA:TRUE"]);
    ca.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"];
    csr.extend(ec);
    openssl(dir, &csr);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n")
        .expect("ext.cnf");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-extfile",
            "ext.cnf",
        ],
    );
}

/// A Redis server of the test's own: TLS on `tls_port` (certificate for
/// `localhost` from the test's CA), and plain TCP on `port` for the test's
/// own commands. Stopped when dropped.
struct TlsRedis {
    child: Child,
    port: u16,
    tls_port: u16,
    ca: PathBuf,
}

impl TlsRedis {
    fn start(dir: &Path) -> Self {
        make_certs(dir);
        let (port, tls_port) = (free_port(), free_port());
        let child = Command::new("redis-server")
            .current_dir(dir)
            .args(["--port", &port.to_string(), "--tls-port", &tls_port.to_string()])
            .args(["--tls-cert-file", "server.pem", "--tls-key-file", "server.key"])
            .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let r = Self { child, port, tls_port, ca: dir.join("ca.pem") };
        wait_for("the TLS redis", Duration::from_secs(20), || r.client().get_connection().is_ok());
        r
    }

    /// The plain side, for the test's own commands.
    fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).expect("url")
    }

    fn url(&self) -> String {
        format!("rediss://localhost:{}", self.tls_port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A generated table loaded into `t` over `url`, and `validate --connect`.
fn spec_for(url: &str) -> String {
    format!(
        "version: 1\nname: tls\nconnections:\n  db: {{ type: postgres, url: \"{url}\" }}\nsources:\n  nums: {{ type: generate, rows: 3, columns: {{ id: n }} }}\nsinks:\n  out: {{ input: nums, connection: db, table: t, mode: append, create: true }}\n"
    )
}

#[test]
fn postgres_over_tls_with_require_verify_ca_and_verify_full() {
    let db = database("tls_pg");
    let dir = scratch("tls-pg");
    let cert = pg_cert();
    // The server's host part: `server()` is postgres://postgres@HOST:PORT.
    let port = server().rsplit(':').next().expect("port").to_string();
    let at = |host: &str, query: &str| format!("postgres://postgres@{host}:{port}/{db}?{query}");
    let mut loaded = 0;
    for (url, mode) in [
        (at("localhost", "sslmode=require"), "require"),
        (at("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={cert}")), "verify-ca"),
        (at("localhost", &format!("sslmode=verify-full&sslrootcert={cert}")), "verify-full"),
    ] {
        std::fs::write(dir.join("p.yaml"), spec_for(&url)).expect("spec");
        let out = engine(&dir, &["validate", "--connect", "p.yaml"]);
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{mode}: {stdout}{}", text(&out.stderr));
        assert!(
            stdout.contains("connection 'db': TLS (TLSv1.") && stdout.contains(&format!("sslmode={mode})")),
            "{mode}: {stdout}"
        );
        let out = engine(&dir, &["run", "p.yaml"]);
        assert_eq!(out.status.code(), Some(0), "{mode}: {}", text(&out.stderr));
        loaded += 3;
        assert_eq!(psql(&db, "SELECT count(*) FROM t").trim(), loaded.to_string(), "{mode}");
    }

    // Without TLS the report says so.
    std::fs::write(dir.join("p.yaml"), spec_for(&at("127.0.0.1", "sslmode=disable"))).expect("spec");
    let out = engine(&dir, &["validate", "--connect", "p.yaml"]);
    assert!(text(&out.stdout).contains("connection 'db': no TLS (sslmode=disable)"), "{}", text(&out.stdout));

    // verify-full checks the name: the certificate is for localhost only.
    std::fs::write(
        dir.join("p.yaml"),
        spec_for(&at("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={cert}"))),
    )
    .expect("spec");
    for cmd in [&["run", "p.yaml"][..], &["validate", "--connect", "p.yaml"]] {
        let out = engine(&dir, cmd);
        let stderr = text(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{cmd:?}");
        assert!(stderr.contains("postgres connection 'db'"), "{cmd:?}: {stderr}");
        assert!(stderr.contains("not valid for name") && stderr.contains("127.0.0.1"), "{cmd:?}: {stderr}");
    }

    // verify-ca checks the authority: a certificate from another one is refused.
    let other = scratch("tls-pg-other-ca");
    make_certs(&other);
    let wrong = at("localhost", &format!("sslmode=verify-ca&sslrootcert={}", other.join("ca.pem").display()));
    std::fs::write(dir.join("p.yaml"), spec_for(&wrong)).expect("spec");
    let out = engine(&dir, &["run", "p.yaml"]);
    let stderr = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains("certificate") && stderr.contains("UnknownIssuer"), "{stderr}");
    assert_eq!(psql(&db, "SELECT count(*) FROM t").trim(), loaded.to_string(), "nothing written");
}

/// `Setup`'s fraud pipeline with its redis connection on the TLS server
/// (`tls.ca_file` the test's CA) and its warehouse over verify-full.
fn tls_setup(name: &str, source: &str, r: &TlsRedis) -> Setup {
    let db = format!("engine_it_stream_{name}");
    let dwh = format!(
        "postgres://postgres@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}",
        server().rsplit(':').next().expect("port"),
        pg_cert()
    );
    let mut s = Setup::new(name, source, Some(dwh));
    s.redis_url = r.url();
    let spec = std::fs::read_to_string(&s.spec).expect("spec");
    let url = "    url: \"{{ env.REDIS_URL | default('redis://127.0.0.1:6379') }}\"\n";
    assert!(spec.contains(url), "pipelines/fraud.yaml no longer has {url:?}");
    let spec = spec.replace(url, &format!("{url}    tls: {{ ca_file: \"{}\" }}\n", r.ca.display()));
    std::fs::write(&s.spec, spec).expect("spec");
    s
}

/// `engine validate --connect` of the setup's spec, with its variables.
fn validate(s: &Setup) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_engine"))
        .current_dir(&s.dir)
        .args(["validate", "--connect", "fraud.yaml"])
        .env("REDIS_URL", &s.redis_url)
        .env("DWH_DATABASE_URL", &s.dwh_url)
        .output()
        .expect("engine runs")
}

/// The alerts the sink publishes on `channel`, read on the plain side
/// until `n` came.
fn alerts_published(r: &TlsRedis, channel: String, n: usize) -> std::thread::JoinHandle<BTreeSet<String>> {
    let mut conn = r.client().get_connection().expect("plain side");
    std::thread::spawn(move || {
        let mut sub = conn.as_pubsub();
        sub.subscribe(&channel).expect("SUBSCRIBE");
        sub.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        let mut ids = BTreeSet::new();
        while ids.len() < n {
            let Ok(msg) = sub.get_message() else { break };
            let payload: String = msg.get_payload().expect("payload");
            let v: serde_json::Value = serde_json::from_str(&payload).expect("an alert is JSON");
            ids.insert(v["alert_id"].as_str().expect("alert_id").to_string());
        }
        ids
    })
}

#[test]
fn streams_and_pub_sub_over_rediss_feed_the_rules_and_the_sinks() {
    let r = TlsRedis::start(&scratch("tls-redis"));
    let mut plain = r.client().get_connection().expect("plain side");
    for (name, source) in
        [("tls_streams", "stream: $STREAM\n    group: fraud"), ("tls_pubsub", "channel: $STREAM")]
    {
        let s = tls_setup(name, source, &r);
        let want: BTreeSet<String> =
            (0..20).filter(|i| i % 4 == 0).map(|i| format!("large_amount:{i}")).collect();
        let published = alerts_published(&r, format!("{}.alerts", s.stream), want.len());
        let mut engine = s.start(&["--max-events", "20"]);
        if source.starts_with("channel") {
            wait_for("the subscription", Duration::from_secs(30), || {
                let subs: Vec<(String, i64)> =
                    redis::cmd("PUBSUB").arg("NUMSUB").arg(&s.stream).query(&mut plain).expect("NUMSUB");
                subs.first().is_some_and(|(_, n)| *n > 0)
            });
        }
        for id in 0..20 {
            let payload = event(id, 1, if id % 4 == 0 { 3000.0 } else { 10.0 }, "GBP");
            if source.starts_with("channel") {
                let _: i64 =
                    redis::cmd("PUBLISH").arg(&s.stream).arg(payload).query(&mut plain).expect("PUBLISH");
            } else {
                let _: String = redis::cmd("XADD")
                    .arg(&s.stream)
                    .arg("*")
                    .arg("payload")
                    .arg(payload)
                    .query(&mut plain)
                    .expect("XADD");
            }
        }
        let status = engine.wait().expect("engine exits");
        assert_eq!(status.code(), Some(0), "{name}: {}", s.logs());
        assert_eq!(s.alert_ids(), want, "{name}: alerts in the warehouse (over verify-full)");
        assert_eq!(published.join().expect("subscriber"), want, "{name}: alerts published over rediss://");

        // (After the run: its migrations made the warehouse's tables.)
        let out = validate(&s);
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{name}: {stdout}{}", text(&out.stderr));
        assert!(stdout.contains("connection 'bus': TLS (CA from tls.ca_file)"), "{name}: {stdout}");
        assert!(stdout.contains("connection 'dwh': TLS (TLSv1.3, sslmode=verify-full)"), "{name}: {stdout}");
    }

    // Without the CA file the server's certificate is from an unknown authority.
    let s = tls_setup("tls_noca", "stream: $STREAM\n    group: fraud", &r);
    let spec = std::fs::read_to_string(&s.spec).expect("spec");
    let spec: String = spec.lines().filter(|l| !l.contains("ca_file")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&s.spec, spec).expect("spec");
    let out = validate(&s);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("redis connection 'bus'") && stderr.contains("UnknownIssuer"), "{stderr}");
}
