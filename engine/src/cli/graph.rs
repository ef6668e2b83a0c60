//! `engine graph SPEC`: the compiled DAG as Mermaid or DOT on stdout.

use std::path::PathBuf;

use super::SpecArgs;
use crate::error::Result;
use crate::plan::render::{render, GraphFormat};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The pipeline file.
    #[arg(value_name = "SPEC")]
    spec_file: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "mermaid")]
    format: GraphFormat,
    #[command(flatten)]
    spec: SpecArgs,
}

pub async fn run(args: Args) -> Result<i32> {
    let plan = super::compile(&args.spec_file, &args.spec.load_options()?).await?;
    out!("{}", render(&plan, args.format));
    Ok(0)
}
