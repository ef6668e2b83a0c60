//! `engine test SPEC...`: runs the `tests:` of each spec in memory. Exit 0
//! all passed, 1 a test failed, 2 a spec is invalid.

use std::path::PathBuf;

use super::SpecArgs;
use crate::error::Result;
use crate::run::spec_test;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Pipeline files.
    #[arg(required = true, value_name = "SPEC")]
    specs: Vec<PathBuf>,
    #[command(flatten)]
    spec: SpecArgs,
}

pub async fn run(args: Args) -> Result<i32> {
    let opts = args.spec.load_options()?;
    let (mut passed, mut failed) = (0, 0);
    for path in &args.specs {
        let plan = super::compile(path, &opts).await?;
        if plan.spec.pipeline.tests.is_empty() {
            println!("{}: no tests", path.display());
        }
        for r in spec_test::run_all(&plan).await {
            if r.failures.is_empty() {
                passed += 1;
                println!("ok: {}: {}", path.display(), r.name);
            } else {
                failed += 1;
                println!("FAILED: {}: {}", path.display(), r.name);
                for f in &r.failures {
                    println!("    {f}");
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed > 0 { 1 } else { 0 })
}
