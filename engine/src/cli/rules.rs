//! `engine rules check DIR`: validates a folder (or file, or glob) of rule
//! files; with `--schema-from SPEC`, also against the events of that spec's
//! rules transform.

use std::path::PathBuf;

use super::SpecArgs;
use crate::error::{Error, Result};
use crate::spec::model::Transform;
use crate::spec::rules;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Validate rule files.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// A rule file, a folder of them, or a glob.
    #[arg(value_name = "DIR")]
    target: PathBuf,
    /// Compile the rules against the input schema of this spec's rules transform.
    #[arg(long, value_name = "SPEC")]
    schema_from: Option<PathBuf>,
    #[command(flatten)]
    spec: SpecArgs,
}

pub async fn run(cmd: Command) -> Result<i32> {
    let Command::Check(args) = cmd;
    let files = rules::files(&args.target).map_err(Error::Usage)?;
    if files.is_empty() {
        return Err(Error::Usage(format!("no rule files (*.yaml) in '{}'", args.target.display())));
    }
    let (set, mut diags) = rules::load(&files);
    if let Some(spec) = &args.schema_from {
        let plan = super::compile(spec, &args.spec.load_options()?).await?;
        let input = plan.spec.pipeline.transforms.values().find_map(|t| match t {
            Transform::Rules(r) => Some((r.input.value().clone(), r.key.value().clone())),
            Transform::Sql(_) => None,
        });
        let Some((input, key)) = input else {
            return Err(Error::Usage(format!("'{}' has no rules transform", spec.display())));
        };
        let Some(schema) = plan.schemas.get(&input) else {
            return Err(Error::Usage(format!(
                "the schema of '{input}' in '{}' is not known without connecting",
                spec.display()
            )));
        };
        diags.extend(crate::rules::compile::check_against(&set, schema.clone(), &key).await);
    }
    diags.into_result()?;
    out!("ok: {} rules in {} files\n", set.len(), files.len());
    Ok(0)
}
