//! Live rules: a file watcher (`notify`) on a rules transform's files. On a
//! change the whole set is read and compiled again; a good set replaces the
//! running one, a bad one is refused with every file:line and reason while the
//! last good set keeps running. Outcomes are logged, counted and kept in a
//! [`Status`] for the health endpoint.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use notify::Watcher;
use tokio::sync::{mpsc, watch};

use super::eval::CompiledRules;
use crate::error::{Error, Result};

/// What a running rule set is, and how its last reload went.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub version: String,
    pub rules: usize,
    pub reloads: u64,
    pub failures: u64,
    /// The last reload's refusal (every problem, each with file:line:col), until a good reload.
    pub last_error: Option<String>,
    /// Per rule, the events it failed on (a division by zero, a failed
    /// cast): those go to the dead letter and the rule stays loaded.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub errors: std::collections::BTreeMap<String, EventErrors>,
    /// When a rule last failed on an event.
    #[serde(skip)]
    pub last_event_error: Option<std::time::Instant>,
}

/// How often a rule failed on events, and the last time.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EventErrors {
    pub count: u64,
    pub last_error: String,
    /// RFC 3339, UTC.
    pub last_at: String,
}

impl Status {
    /// Counts an event rule `rule` failed on.
    pub fn event_error(&mut self, rule: &str, message: &str) {
        let e = self.errors.entry(rule.to_string()).or_default();
        e.count += 1;
        e.last_error = message.to_string();
        e.last_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        self.last_event_error = Some(std::time::Instant::now());
    }

    /// Whether a rule failed on an event in the last minute.
    pub fn failing_on_events(&self) -> bool {
        self.last_event_error.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(60))
    }
}

/// Where a rules transform reads its rules, and what they compile against.
#[derive(Clone)]
pub struct Source {
    pub node: String,
    pub target: PathBuf,
    pub schema: SchemaRef,
    pub key: String,
    /// A stream read in partitions: their number and the partition column,
    /// which every window's `by` must hold.
    pub partitioned: Option<(u32, String)>,
}

impl Source {
    /// Reads and compiles the rule files as they are now.
    pub async fn load(&self) -> std::result::Result<CompiledRules, String> {
        let files = crate::spec::rules::files(&self.target)?;
        let (set, mut diags) = crate::spec::rules::load(&files);
        if let Some((partitions, column)) = &self.partitioned {
            diags.extend(crate::spec::rules::check_partitioned(&set, column, *partitions));
        }
        if !diags.has_errors() {
            diags.extend(super::compile::check_against(&set, self.schema.clone(), &self.key).await);
        }
        if diags.has_errors() {
            return Err(errors(&diags));
        }
        CompiledRules::build(
            &crate::transform::sql::session(crate::transform::sql::Purpose::Stream),
            &set,
            self.schema.clone(),
            &self.key,
        )
        .map_err(|d| errors(&d))
    }
}

/// Every error, one `file:line:col: message` a line.
fn errors(d: &crate::error::Diagnostics) -> String {
    d.errors().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")
}

/// A running watcher; dropping it stops watching.
pub struct Watching {
    _watcher: notify::RecommendedWatcher,
    pub rules: watch::Receiver<Arc<CompiledRules>>,
    pub status: Arc<Mutex<Status>>,
}

/// Starts watching `source`'s files; `first` is the set loaded at start.
pub fn start(source: Source, first: Arc<CompiledRules>) -> Result<Watching> {
    let status = Arc::new(Mutex::new(Status {
        version: first.version.clone(),
        rules: first.total,
        ..Default::default()
    }));
    let (tx_rules, rx_rules) = watch::channel(first);
    let (tx_event, rx_event) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx_event.try_send(());
        }
    })
    .map_err(|e| Error::Usage(format!("cannot watch rule files: {e}")))?;
    let (dir, mode) = watch_root(&source.target);
    watcher
        .watch(&dir, mode)
        .map_err(|e| Error::Usage(format!("cannot watch '{}' for rule changes: {e}", dir.display())))?;
    tokio::spawn(reload_loop(source, rx_event, tx_rules, status.clone()));
    Ok(Watching { _watcher: watcher, rules: rx_rules, status })
}

/// The folder to watch: the rules folder itself, a file's folder, or the
/// fixed part of a glob (recursively, as the glob may reach below it).
fn watch_root(target: &Path) -> (PathBuf, notify::RecursiveMode) {
    let text = target.to_string_lossy();
    if text.contains(['*', '?', '[']) {
        let fixed: PathBuf = target
            .components()
            .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
            .collect();
        return (fixed, notify::RecursiveMode::Recursive);
    }
    if target.is_dir() {
        return (target.to_path_buf(), notify::RecursiveMode::NonRecursive);
    }
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    (parent.to_path_buf(), notify::RecursiveMode::NonRecursive)
}

async fn reload_loop(
    source: Source,
    mut events: mpsc::Receiver<()>,
    rules: watch::Sender<Arc<CompiledRules>>,
    status: Arc<Mutex<Status>>,
) {
    while events.recv().await.is_some() {
        // Editors write a file in several steps; let them finish.
        tokio::time::sleep(Duration::from_millis(150)).await;
        while events.try_recv().is_ok() {}
        let outcome = source.load().await;
        let mut st = status.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(set) if set.version == st.version && st.last_error.is_none() => {}
            Ok(set) => {
                st.reloads += 1;
                st.last_error = None;
                st.version = set.version.clone();
                st.rules = set.total;
                metrics::counter!("engine_rule_reloads_total", "node" => source.node.clone()).increment(1);
                tracing::info!(node = %source.node, version = %set.version, rules = set.total, "rules reloaded");
                let _ = rules.send(Arc::new(set));
            }
            Err(e) => {
                st.failures += 1;
                st.last_error = Some(e.clone());
                metrics::counter!("engine_rule_reload_failures_total", "node" => source.node.clone())
                    .increment(1);
                tracing::warn!(node = %source.node, "rules not reloaded; the last good set keeps running:\n{e}");
            }
        }
    }
}
