//! `engine stream SPEC`: runs a stream pipeline until SIGINT/SIGTERM,
//! `--max-events` or `--for`. Exit status 0 after a clean stop, 2 invalid,
//! 3 runtime failure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::SpecArgs;
use crate::error::Result;
use crate::spec::model::Mode;
use crate::stream::{self, StreamOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The pipeline file.
    #[arg(value_name = "SPEC")]
    spec_file: PathBuf,
    /// Serve Prometheus metrics at /metrics and health at /health here (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Stop once this many events have been processed.
    #[arg(long, value_name = "N")]
    max_events: Option<u64>,
    /// Stop after this long (e.g. 30s, 10m).
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Read only the partitions p of the source with p mod N == I (e.g. 0/3).
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    shard: Option<(u32, u32)>,
    #[command(flatten)]
    spec: SpecArgs,
}

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("bad duration '{s}' ({e}); write e.g. 30s, 10m"))
}

/// `I/N` with `I < N`.
fn parse_shard(s: &str) -> std::result::Result<(u32, u32), String> {
    let bad = || format!("bad shard '{s}'; write I/N with 0 <= I < N, e.g. 0/3");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (u32, u32) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

pub async fn run(args: Args) -> Result<i32> {
    let plan = super::compile_for(&args.spec_file, &args.spec.load_options()?, Mode::Stream).await?;
    let opts = StreamOptions {
        metrics_addr: args.metrics_addr,
        max_events: args.max_events,
        duration: args.duration,
        shard: args.shard,
    };
    let span = super::run_span(&plan.spec.pipeline.name, &super::new_run_id(&plan.spec.pipeline.name));
    let summary = tracing::Instrument::instrument(stream::run(&plan, opts), span).await?;
    let written: Vec<String> = summary.written.iter().map(|(s, n)| format!("{s}: {n} rows")).collect();
    eprintln!(
        "stream stopped: {} events in {} batches{}{}{}",
        summary.events,
        summary.batches,
        if written.is_empty() { String::new() } else { format!("; {}", written.join(", ")) },
        if summary.refused > 0 {
            format!("; {} rows refused by sinks (in the dead letter)", summary.refused)
        } else {
            String::new()
        },
        if summary.unfinished > 0 {
            "; the last batch was not committed and will be delivered again"
        } else {
            ""
        }
    );
    Ok(0)
}
