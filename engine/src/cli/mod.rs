//! The `engine` command line: one module per command, each a thin layer over
//! the library. Exit statuses: 0 ok, 1 a check or test failed, 2 invalid input
//! (spec, rule file, flag), 3 a runtime failure.

/// Writes to standard output like `print!`. A closed pipe (`engine schema |
/// head`) ends the process quietly with status 0, as other command-line
/// tools do; `print!` would panic with a backtrace.
macro_rules! out {
    ($($t:tt)*) => { $crate::cli::write_out(format_args!($($t)*)) };
}

#[cfg(test)]
mod fuzz;
mod graph;
mod rules;
mod run;
mod schema;
mod stream;
mod test;
mod validate;

use std::path::Path;

use clap::{Parser, Subcommand};

use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::spec::{self, template, LoadOptions};

#[derive(Debug, Parser)]
#[command(name = "engine", version, about = "A declarative data pipeline engine", long_about = None)]
#[command(
    after_help = "Exit status: 0 ok, 1 a check or test failed, 2 invalid spec/rules/flags, 3 runtime failure."
)]
pub struct Cli {
    /// Log lines as text, or as JSON objects one per line (timestamp,
    /// level, message, fields such as node, and the pipeline and run id).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The span every log line of a run carries: its pipeline and run id.
pub fn run_span(pipeline: &str, run_id: &str) -> tracing::Span {
    tracing::info_span!("run", pipeline = %pipeline, run_id = %run_id)
}

pub use crate::run::report::new_run_id;

#[derive(Debug, Subcommand)]
enum Command {
    /// Parse, template and compile specs: the DAG, every SQL and rule.
    Validate(validate::Args),
    /// Print a spec's DAG as Mermaid or DOT.
    Graph(graph::Args),
    /// Run a batch pipeline once.
    Run(run::Args),
    /// Run a stream pipeline until SIGINT/SIGTERM (or a limit).
    Stream(stream::Args),
    /// Run the tests of specs in memory (no connection, no sink).
    Test(test::Args),
    /// Print the JSON Schema of the pipeline language (for editors).
    Schema(schema::Args),
    /// Work with rule files.
    Rules {
        #[command(subcommand)]
        command: rules::Command,
    },
}

/// Flags shared by commands that read a spec.
#[derive(Debug, Clone, clap::Args)]
pub struct SpecArgs {
    /// Override a variable of the spec's `vars:` (repeatable).
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
}

impl SpecArgs {
    pub fn load_options(&self) -> Result<LoadOptions> {
        let vars = template::parse_var_flags(&self.vars).map_err(Error::Usage)?;
        Ok(LoadOptions::from_environment(vars, crate::connectors::registry::catalog()))
    }
}

/// Reads and compiles one spec, printing its warnings.
pub async fn compile(path: &Path, opts: &LoadOptions) -> Result<Plan> {
    let spec = spec::load(path, opts)?;
    let plan = crate::rules::analyze::compile(spec).await?;
    for w in plan.warnings.warnings() {
        eprintln!("{w}");
    }
    Ok(plan)
}

/// [`compile`], for a command that runs pipelines of one `mode`.
pub async fn compile_for(path: &Path, opts: &LoadOptions, mode: crate::spec::model::Mode) -> Result<Plan> {
    use crate::spec::model::Mode;
    let plan = compile(path, opts).await?;
    let hint = match plan.spec.pipeline.mode {
        m if m == mode => return Ok(plan),
        Mode::Stream => "a stream pipeline; run it with `engine stream`",
        Mode::Batch => "a batch pipeline; run it with `engine run` (or set 'mode: stream')",
    };
    Err(Error::Usage(format!("'{}' is {hint}", path.display())))
}

/// Runs the command line; returns the exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    init_logging(matches!(cli.command, Command::Stream(_)), cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 3;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // Every error path ends here: the secrets of the specs loaded
            // are masked however the message was made.
            eprintln!("{}", crate::spec::redact::scrub(&render_error(&e)));
            e.exit_code()
        }
    }
}

fn render_error(e: &Error) -> String {
    match e {
        Error::Invalid(d) => d.to_string(),
        other => format!("error: {other}"),
    }
}

async fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Validate(a) => validate::run(a).await,
        Command::Graph(a) => graph::run(a).await,
        Command::Run(a) => run::run(a).await,
        Command::Stream(a) => stream::run(a).await,
        Command::Schema(a) => schema::run(a),
        Command::Test(a) => test::run(a).await,
        Command::Rules { command } => rules::run(command).await,
    }
}

/// Logs go to stderr; `ENGINE_LOG` sets the filter. A stream logs its
/// progress, reloads and retries by default.
fn init_logging(stream: bool, format: LogFormat) {
    let default = if stream { "warn,engine=info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ENGINE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| crate::spec::redact::ScrubbedStderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        // For log collectors: the event's fields at the top level, the
        // run's (pipeline, run_id) under "span".
        LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
        }
    };
}

/// What [`out!`] writes with.
pub fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}
