//! What a run did: per node rows in and out, quarantined rows and time; per
//! check the outcome with sample rows. Printed as a table at the end of a run
//! and written as JSON by `--report FILE`.

use serde::Serialize;

use crate::spec::model::{Check, Severity};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Everything ran and was written.
    Ok,
    /// A check of severity error failed; nothing was written.
    CheckFailed,
    /// The run stopped on an error.
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub pipeline: String,
    pub status: Status,
    pub seconds: f64,
    pub nodes: Vec<NodeReport>,
    pub checks: Vec<CheckOutcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A new run id: the pipeline's name and the clock.
pub fn new_run_id(pipeline: &str) -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{pipeline}-{nanos:x}")
}

impl RunReport {
    pub fn new(pipeline: &str, run_id: Option<&str>) -> Self {
        Self {
            run_id: run_id.map_or_else(|| new_run_id(pipeline), str::to_string),
            pipeline: pipeline.to_string(),
            status: Status::Ok,
            seconds: 0.0,
            nodes: vec![],
            checks: vec![],
            error: None,
        }
    }

    /// The exit status of `engine run` for this report.
    pub fn exit_code(&self) -> i32 {
        match self.status {
            Status::Ok => 0,
            Status::CheckFailed => 1,
            Status::Failed => 3,
        }
    }

    /// The summary table printed at the end of a run.
    pub fn summary(&self) -> String {
        let mut rows = vec![["node", "kind", "rows in", "rows out", "quarantined", "seconds"]
            .map(String::from)
            .to_vec()];
        for n in &self.nodes {
            rows.push(vec![
                n.node.clone(),
                n.role.clone(),
                n.rows_in.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                n.rows_out.to_string(),
                n.quarantined.to_string(),
                format!("{:.2}", n.seconds),
            ]);
        }
        let mut out = table(&rows, 2..6);
        let failed: Vec<&CheckOutcome> = self.checks.iter().filter(|c| !c.passed).collect();
        if !failed.is_empty() {
            out.push_str("\nchecks that failed:\n");
            let mut rows = vec![["node", "check", "severity", "result"].map(String::from).to_vec()];
            for c in &failed {
                let sev = match c.severity {
                    Severity::Error => "error",
                    Severity::Warn => "warn",
                };
                rows.push(vec![c.node.clone(), c.check.clone(), sev.into(), c.message.clone()]);
            }
            out.push_str(&table(&rows, 0..0));
            for c in failed.iter().filter(|c| !c.samples.is_empty()) {
                out.push_str(&format!("\nsample rows failing {} on {}:\n", c.check, c.node));
                for s in &c.samples {
                    out.push_str(&format!("  {s}\n"));
                }
            }
        }
        let status = match self.status {
            Status::Ok => "ok".to_string(),
            Status::CheckFailed => "a check failed; nothing was written".to_string(),
            Status::Failed => format!("failed: {}", self.error.clone().unwrap_or_default()),
        };
        out.push_str(&format!("\nrun {}: {status} in {:.2}s\n", self.run_id, self.seconds));
        out
    }
}

/// Aligned columns; those in `right` are right-aligned (numbers).
fn table(rows: &[Vec<String>], right: std::ops::Range<usize>) -> String {
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (n, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(
                |(i, (c, w))| {
                    if n > 0 && right.contains(&i) {
                        format!("{c:>w$}")
                    } else {
                        format!("{c:<w$}")
                    }
                },
            )
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    pub node: String,
    pub role: String,
    pub rows_in: Option<u64>,
    pub rows_out: u64,
    pub quarantined: u64,
    pub seconds: f64,
}

impl NodeReport {
    pub fn new(node: &str, role: &str, rows_in: Option<u64>, rows_out: u64) -> Self {
        Self { node: node.into(), role: role.into(), rows_in, rows_out, quarantined: 0, seconds: 0.0 }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckOutcome {
    pub node: String,
    pub check: String,
    pub kind: String,
    pub severity: Severity,
    pub passed: bool,
    pub failing_rows: u64,
    pub quarantined: u64,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub samples: Vec<serde_json::Value>,
}

impl CheckOutcome {
    pub fn new(node: &str, check: &Check) -> Self {
        Self {
            node: node.into(),
            check: check.name().into(),
            kind: check.kind().into(),
            severity: check.options().severity,
            passed: true,
            failing_rows: 0,
            quarantined: 0,
            message: String::new(),
            reason: None,
            samples: vec![],
        }
    }
}
