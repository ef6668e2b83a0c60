//! `engine validate SPEC...`: every spec read, templated and compiled; all
//! problems of all files reported, exit 2 if any.

use std::path::PathBuf;

use super::SpecArgs;
use crate::error::{Diagnostics, Error, Result};
use crate::plan::{Plan, Role};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Pipeline files.
    #[arg(required = true, value_name = "SPEC")]
    specs: Vec<PathBuf>,
    /// Also connect: every connection reachable, postgres sources readable,
    /// sink tables present and able to take their input.
    #[arg(long)]
    connect: bool,
    #[command(flatten)]
    spec: SpecArgs,
}

pub async fn run(args: Args) -> Result<i32> {
    let opts = args.spec.load_options()?;
    let mut all = Diagnostics::default();
    let mut failed = 0;
    for path in &args.specs {
        match super::compile(path, &opts).await {
            Ok(plan) => {
                let found = if args.connect {
                    crate::connectors::check::check(&plan).await
                } else {
                    Default::default()
                };
                let problems = found.problems;
                if problems.is_empty() {
                    let connected = if args.connect { ", connections ok" } else { "" };
                    out!("ok: {} ({}{connected})\n", path.display(), summary(&plan));
                    for note in found.notes {
                        out!("  {note}\n");
                    }
                } else {
                    failed += 1;
                    for p in problems {
                        eprintln!("{}: {p}", path.display());
                    }
                }
            }
            Err(Error::Invalid(d)) => {
                failed += 1;
                all.extend(d);
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
            }
        }
    }
    if !all.0.is_empty() {
        eprintln!("{all}");
    }
    Ok(if failed > 0 { 2 } else { 0 })
}

fn summary(plan: &Plan) -> String {
    let count = |r: Role| plan.graph.node_weights().filter(|n| n.role == r).count();
    let rules: usize = plan.rules.values().map(Vec::len).sum();
    let mut s = format!(
        "{} sources, {} transforms, {} checks, {} sinks",
        count(Role::Source),
        count(Role::Transform),
        count(Role::Check),
        count(Role::Sink)
    );
    if rules > 0 {
        s.push_str(&format!(", {rules} rules"));
    }
    s
}
