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
///
/// The peak is the child's `VmHWM` after its exec, read every 10 ms until it
/// exits. (`wait4`'s `ru_maxrss` would also count the moment between fork
/// and exec, when the child still shares this process's memory: the
/// benchmark's own data.)
pub fn wait_with_rss(pid: i32) -> (i32, i64) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0i64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok());
            peak = peak.max(hwm.unwrap_or(0));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        peak
    });
    // SAFETY: wait4 writes only the status it is given, for a child of this
    // process; std's wait needs the Child, which callers keep elsewhere.
    #[allow(unsafe_code)]
    let (rc, status) = unsafe {
        let mut status: libc::c_int = 0;
        let rc = libc::wait4(pid, &mut status, 0, std::ptr::null_mut());
        (rc, status)
    };
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    if rc < 0 {
        fail("waiting for the engine failed");
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    (code, peak)
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
