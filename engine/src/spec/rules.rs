//! Rule files as users write them: one rule or `rules: [..]` per file, kept
//! outside the engine binary. [`load`] reads every file a rules transform
//! points at and checks them as one set without a schema: each `when` must
//! parse, ids must be unique, windows must be well formed. What rules mean
//! (compiling, evaluating, windows, reloads) is the `rules` module's.

use std::path::{Path, PathBuf};

use marked_yaml::Node;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::sql;
use super::yaml::{self, Reader, Sp};
use super::{suggest, valid_name};
use crate::error::{Diagnostic, Diagnostics, Pos};

/// How serious an alert from a rule is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleSeverity {
    Low,
    Medium,
    High,
    Critical,
}

/// Whether a rule's hits become alerts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleMode {
    /// Hits are emitted as alerts.
    #[default]
    Live,
    /// Hits are evaluated and counted, but no alert is emitted.
    Shadow,
}

/// A sliding window per key, for rules that aggregate.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// The key columns (one window per key).
    pub by: Vec<String>,
    /// The window length (`60s`, `5m`, `1h`).
    pub size: Sp<String>,
    /// The event-time column; arrival time when omitted.
    #[serde(default)]
    pub time: Option<String>,
    /// With `time`: how late an event may arrive and still count in its
    /// place (`2s`, `1m`; default 5s). Alerts of the rule wait as long.
    #[serde(default)]
    pub allowed_lateness: Option<Sp<String>>,
}

/// One rule.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique across the rule set; part of every alert.
    pub id: Sp<String>,
    /// What the rule catches.
    #[serde(default)]
    pub description: Option<String>,
    /// `low`, `medium`, `high` or `critical`.
    pub severity: RuleSeverity,
    /// A SQL boolean expression over the event's columns (with `window`:
    /// aggregates over the window, including this event).
    pub when: Sp<String>,
    /// Makes the rule aggregate over a sliding window per key.
    #[serde(default)]
    pub window: Option<Window>,
    /// `false` switches the rule off without deleting it.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `shadow` evaluates and counts the rule but emits no alert.
    #[serde(default)]
    pub mode: RuleMode,
}

/// The largest window a rule may have (7d): its state keeps every event within it.
pub const MAX_WINDOW: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The longest a rule may hold events for event-time order (1h).
pub const MAX_LATENESS: std::time::Duration = std::time::Duration::from_secs(3600);

/// How late an event may arrive when a rule does not say.
pub const DEFAULT_LATENESS: std::time::Duration = std::time::Duration::from_secs(5);

impl RuleMode {
    /// As written in rule files and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            RuleMode::Live => "live",
            RuleMode::Shadow => "shadow",
        }
    }
}

fn yes() -> bool {
    true
}

/// A file with several rules.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleList {
    /// The rules of this file.
    pub rules: Vec<Rule>,
}

/// A rule and the file it came from.
#[derive(Debug, Clone)]
pub struct LoadedRule {
    pub file: PathBuf,
    pub rule: Rule,
}

impl LoadedRule {
    pub fn error(&self, pos: Pos, message: impl Into<String>) -> Diagnostic {
        Diagnostic::error(&self.file, pos, message)
    }

    pub fn window_size(&self) -> Option<std::time::Duration> {
        let w = self.rule.window.as_ref()?;
        humantime::parse_duration(w.size.value()).ok()
    }

    /// How long a windowed rule with a time column waits for late events;
    /// `None` for a rule that counts by arrival (never out of order).
    pub fn allowed_lateness(&self) -> Option<std::time::Duration> {
        let w = self.rule.window.as_ref()?;
        w.time.as_ref()?;
        match &w.allowed_lateness {
            Some(l) => humantime::parse_duration(l.value()).ok(),
            None => Some(DEFAULT_LATENESS),
        }
    }
}

/// On a stream read in partitions, each windowed rule must key its window
/// by the partition column: every event of a key is then in one partition,
/// read by one shard, which holds the key's whole window.
pub fn check_partitioned(set: &[LoadedRule], column: &str, partitions: u32) -> Diagnostics {
    let mut d = Diagnostics::default();
    for lr in set.iter().filter(|r| r.rule.enabled) {
        let Some(w) = &lr.rule.window else { continue };
        if !w.by.iter().any(|b| b == column) {
            d.push(lr.error(
                w.size.pos(),
                format!(
                    "rule '{}': its window is keyed by [{}], but the stream has {partitions} partitions by '{column}': \
                     add '{column}' to 'by', or each shard would see only part of a key's events",
                    lr.rule.id.value(),
                    w.by.join(", ")
                ),
            ));
        }
    }
    d
}

/// The files a `rules:` value names: a file, every `.yaml`/`.yml` file in a
/// folder (not recursive), or a glob. Sorted, so the rule set is stable.
pub fn files(target: &Path) -> Result<Vec<PathBuf>, String> {
    let text = target.to_string_lossy();
    let mut out = if text.contains(['*', '?', '[']) {
        glob::glob(&text).map_err(|e| format!("bad glob '{text}': {e}"))?.flatten().collect()
    } else if target.is_dir() {
        std::fs::read_dir(target)
            .map_err(|e| format!("cannot read folder '{text}': {e}"))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect()
    } else if target.is_file() {
        vec![target.to_path_buf()]
    } else {
        return Err(format!("no rule file or folder at '{text}'"));
    };
    out.sort();
    Ok(out)
}

/// Reads and checks every rule in `files` as one set.
pub fn load(files: &[PathBuf]) -> (Vec<LoadedRule>, Diagnostics) {
    let mut rules = Vec::new();
    let mut diags = Diagnostics::default();
    for file in files {
        let (r, d) = load_file(file);
        rules.extend(r);
        diags.extend(d);
    }
    check_set(&rules, &mut diags);
    (rules, diags)
}

fn load_file(file: &Path) -> (Vec<LoadedRule>, Diagnostics) {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            return (
                vec![],
                Diagnostics(vec![Diagnostic::error(
                    file,
                    Pos::new(1, 1),
                    format!("cannot read rule file: {e}"),
                )]),
            )
        }
    };
    let node = match yaml::parse(file, &text) {
        Ok(n) => n,
        Err(d) => return (vec![], Diagnostics(vec![d])),
    };
    let mut r = Reader::new(file);
    let rules = read_rules(&node, &mut r);
    let loaded = rules.into_iter().map(|rule| LoadedRule { file: file.to_path_buf(), rule }).collect();
    (loaded, r.diags)
}

fn read_rules(node: &Node, r: &mut Reader) -> Vec<Rule> {
    let is_list = node.as_mapping().is_some_and(|m| m.contains_key("rules"));
    let rules = if is_list {
        r.read::<RuleList>(node, "").map(|l| l.rules).unwrap_or_default()
    } else {
        r.read::<Rule>(node, "rule").into_iter().collect()
    };
    for rule in &rules {
        check_rule(rule, r);
    }
    rules
}

/// Checks of one rule that need no schema.
fn check_rule(rule: &Rule, r: &mut Reader) {
    let id = rule.id.value();
    if !valid_name(id) {
        r.error(rule.id.pos(), format!("rule id '{id}' must use only a-z, 0-9 and '_'"));
    }
    if let Err(e) = sql::parse_expr(rule.when.value()) {
        r.error(rule.when.pos(), format!("rule '{id}': bad 'when' expression: {}", sql::short(e)));
    }
    if let Some(w) = &rule.window {
        match humantime::parse_duration(w.size.value()) {
            Err(_) => r.error(
                w.size.pos(),
                format!("rule '{id}': bad window size '{}'; write e.g. 60s, 5m, 1h", w.size.value()),
            ),
            Ok(size) if size > MAX_WINDOW => r.error(
                w.size.pos(),
                format!(
                    "rule '{id}': window size {} is more than 7d, the largest window (a window keeps every event within it)",
                    w.size.value()
                ),
            ),
            Ok(size) if size.is_zero() => {
                r.error(w.size.pos(), format!("rule '{id}': window size {} is empty", w.size.value()))
            }
            Ok(_) => {}
        }
        if w.by.is_empty() {
            r.error(w.size.pos(), format!("rule '{id}': 'window.by' needs at least one key column"));
        }
        if let Some(l) = &w.allowed_lateness {
            let lateness = humantime::parse_duration(l.value());
            if lateness.is_err() {
                r.error(
                    l.pos(),
                    format!("rule '{id}': bad allowed_lateness '{}'; write e.g. 0s, 2s, 1m", l.value()),
                );
            } else if lateness.as_ref().is_ok_and(|l| *l > MAX_LATENESS) {
                r.error(
                    l.pos(),
                    format!(
                        "rule '{id}': allowed_lateness {} is more than 1h, the longest events are held for order",
                        l.value()
                    ),
                );
            } else if w.time.is_none() {
                r.error(
                    l.pos(),
                    format!(
                        "rule '{id}': 'allowed_lateness' needs 'time': a window without it counts events by arrival, never late"
                    ),
                );
            }
        }
    }
}

/// Checks across files: ids are unique in the set.
fn check_set(rules: &[LoadedRule], diags: &mut Diagnostics) {
    let mut seen: std::collections::HashMap<&str, &LoadedRule> = Default::default();
    for lr in rules {
        let id = lr.rule.id.value().as_str();
        if let Some(first) = seen.insert(id, lr) {
            diags.push(lr.error(
                lr.rule.id.pos(),
                format!(
                    "duplicate rule id '{id}' (also in {}:{})",
                    first.file.display(),
                    first.rule.id.pos().line
                ),
            ));
        }
    }
}

/// A "did you mean" over the columns of a schema.
pub fn column_hint(name: &str, columns: &[String]) -> String {
    suggest::hint(name, columns.iter().map(String::as_str))
}

/// A rule file: one rule, or `rules: [..]` (used for the JSON Schema).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum RuleFile {
    One(Rule),
    Many(RuleList),
}
