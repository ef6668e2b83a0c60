//! The `engine` command: parse the command line, run, map the outcome to the
//! documented exit status.

use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let code = engine::cli::main();
    ExitCode::from(code as u8)
}
