//! The `engine` command: parse the command line, run, map the outcome to the
//! documented exit status.

use std::process::ExitCode;

fn main() -> ExitCode {
    let code = engine::cli::main();
    ExitCode::from(code as u8)
}
