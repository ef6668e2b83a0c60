//! `engine run SPEC`: one batch run, a summary table at the end, optionally a
//! JSON report. Exit status 0 ok, 1 a check failed, 2 invalid, 3 runtime failure.

use std::io::IsTerminal;
use std::path::PathBuf;

use super::SpecArgs;
use crate::error::{Error, Result};
use crate::run::{self, RunOptions};
use crate::spec::model::Mode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The pipeline file.
    #[arg(value_name = "SPEC")]
    spec_file: PathBuf,
    /// Run only this node and what it reads from (repeatable).
    #[arg(long, value_name = "NODE")]
    select: Vec<String>,
    /// Compute and check everything, write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Ignore stored watermarks: incremental sources read everything again.
    #[arg(long)]
    full_refresh: bool,
    /// Write a JSON run report here.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    #[command(flatten)]
    spec: SpecArgs,
}

pub async fn run(args: Args) -> Result<i32> {
    let plan = super::compile_for(&args.spec_file, &args.spec.load_options()?, Mode::Batch).await?;
    let opts = RunOptions {
        select: args.select,
        dry_run: args.dry_run,
        full_refresh: args.full_refresh,
        progress: std::io::stderr().is_terminal(),
        given: None,
        run_id: Some(super::new_run_id(&plan.spec.pipeline.name)),
    };
    let span = super::run_span(&plan.spec.pipeline.name, opts.run_id.as_deref().unwrap_or_default());
    let (report, outcome) = tracing::Instrument::instrument(run::run(&plan, &opts), span).await;
    if !report.nodes.is_empty() || outcome.is_ok() {
        eprint!("{}", report.summary());
    }
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(path, json).map_err(|e| Error::io(path, e))?;
    }
    outcome?;
    Ok(report.exit_code())
}
