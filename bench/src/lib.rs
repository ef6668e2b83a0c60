//! Helpers shared by the benchmark programs: the engine beside them, psql,
//! and a child's peak memory.

use std::path::PathBuf;
use std::process::Command;

/// The PostgreSQL server of `scripts/services`.
pub const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The engine built beside this program (same target folder and profile).
pub fn engine() -> PathBuf {
    let engine = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("engine")))
        .unwrap_or_else(|| root().join("target/release/engine"));
    if !engine.is_file() {
        fail(&format!("{} is missing; run `cargo build --release` first", engine.display()));
    }
    engine
}

/// Waits for one child; returns its exit status and its own peak RSS (KiB).
pub fn wait_with_rss(pid: i32) -> (i32, i64) {
    // SAFETY: wait4 writes only the status and rusage it is given, for a
    // child of this process. std offers no way to read a child's peak
    // memory, hence the one unsafe call.
    #[allow(unsafe_code)]
    let (rc, status, usage) = unsafe {
        let mut status: libc::c_int = 0;
        let mut u: libc::rusage = std::mem::zeroed();
        let rc = libc::wait4(pid, &mut status, 0, &mut u);
        (rc, status, u)
    };
    if rc < 0 {
        fail("waiting for the engine failed");
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    (code, usage.ru_maxrss)
}

/// Runs SQL with psql against database `db`; exits on failure.
pub fn psql(db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([&format!("{SERVER}/{db}"), "-v", "ON_ERROR_STOP=1", "-qtA", "-c", sql])
        .output()
        .unwrap_or_else(|e| fail(&format!("psql: {e}")));
    if !out.status.success() {
        fail(&format!("psql {sql}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn fail(msg: &str) -> ! {
    eprintln!("bench: {msg}");
    std::process::exit(1)
}
