//! `engine schema`: the JSON Schema of pipeline files (or rule files), derived
//! from the same structs the engine reads, so it cannot drift from the code.

use crate::error::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The schema of rule files instead of pipeline files.
    #[arg(long)]
    rules: bool,
}

pub fn run(args: Args) -> Result<i32> {
    let schema = if args.rules {
        schemars::schema_for!(crate::rules::RuleFile)
    } else {
        schemars::schema_for!(crate::spec::model::Pipeline)
    };
    let text = serde_json::to_string_pretty(&schema).map_err(|e| Error::Internal(e.to_string()))?;
    println!("{text}");
    Ok(0)
}
