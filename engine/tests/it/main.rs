//! The engine's integration tests, one binary: golden specs, the CLI as a
//! user runs it, and the repository's own pipelines and examples.

mod cli;
mod commit_order;
mod golden;
mod hostile;
mod http;
mod layering;
mod lookup;
mod mongodb;
mod postgres;
mod repo;
mod run;
mod stream;
mod tls;
mod warehouse;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The crate folder; golden paths in messages are relative to it.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn repo_dir() -> PathBuf {
    crate_dir().parent().expect("the crate sits in the repository").to_path_buf()
}

/// Runs the `engine` binary in `dir` with a clean set of the demo's variables.
pub fn engine(dir: &Path, args: &[&str]) -> Output {
    engine_env(dir, args, &[])
}

/// Runs the `engine` binary with the demo's variables set to `env` only.
pub fn engine_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_engine"));
    cmd.current_dir(dir).args(args);
    for var in [
        "SOURCE_DATABASE_URL",
        "DWH_DATABASE_URL",
        "MONGODB_URL",
        "MONGODB_DATABASE",
        "REDIS_URL",
        "ENGINE_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("the engine binary runs")
}

/// A fresh, empty folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("engine-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A name part no other test run has used: the process id and the time.
pub fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}_{nanos:x}", std::process::id())
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
