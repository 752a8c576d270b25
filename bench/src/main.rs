//! `loam-bench`: runs the CSI scenarios against one driver (`run`), and turns
//! the results of a whole benchmark into tables and a chart (`report`).
//!
//! Numbers are reported, never judged: nothing here fails on a slow result.

mod chart;
mod client;
mod fio;
mod process;
mod report;
mod scenarios;
mod stats;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::process::{Driver, Memory};
use crate::scenarios::{Measurement, VolumeSpec};

#[derive(Debug, Parser)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a driver, run every control-path scenario against it, print JSON.
    Run(RunArgs),
    /// Summarise a benchmark's results into BENCHMARKS.md tables and a chart.
    Report(report::ReportArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Name of the driver in the results (e.g. loam, hostpath).
    #[arg(long)]
    driver: String,
    /// Repetition number, recorded with the results.
    #[arg(long, default_value_t = 1)]
    rep: u32,
    /// Unix socket the driver command listens on.
    #[arg(long)]
    socket: PathBuf,
    /// File the driver's output is appended to.
    #[arg(long)]
    log: PathBuf,
    /// Directory for staging and target paths.
    #[arg(long)]
    work: PathBuf,
    /// Pre-existing volume counts to measure Create+Delete at, ascending.
    #[arg(long, value_delimiter = ',', default_value = "0,1000,10000")]
    existing: Vec<usize>,
    /// Concurrencies to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    concurrency: Vec<usize>,
    /// Create+Delete pairs per measurement.
    #[arg(long, default_value_t = 1000)]
    cycles: usize,
    /// Volumes staged and published in the node scenario.
    #[arg(long, default_value_t = 200)]
    node_volumes: usize,
    /// Snapshot create+delete pairs.
    #[arg(long, default_value_t = 100)]
    snapshots: usize,
    /// Capacity of every volume, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    bytes: i64,
    /// StorageClass parameter KEY=VALUE for every volume (repeatable).
    #[arg(long = "param", value_parser = parse_kv)]
    params: Vec<(String, String)>,
    /// The driver command line, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Everything one `run` measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunResult {
    /// Driver name.
    pub driver: String,
    /// Repetition number.
    pub rep: u32,
    /// Milliseconds from spawn to the first ready Probe, on an empty root.
    pub startup_ms: f64,
    /// The same, restarted over every pre-created volume.
    pub startup_full_ms: f64,
    /// Volumes that existed at that restart.
    pub full_volumes: usize,
    /// Memory one second after the first start-up.
    pub idle: Memory,
    /// Memory one second after the restart over every volume.
    pub idle_full: Memory,
    /// The most memory either process ever had resident, in KiB.
    pub peak_kib: u64,
    /// The listing of every volume, at the most volumes (absent from
    /// results written before it was measured).
    #[serde(default)]
    pub listing: scenarios::Listing,
    /// Memory one second after that listing.
    #[serde(default)]
    pub after_listing: Memory,
    /// Seconds taken to pre-create each level of volumes (on 16 workers).
    pub precreate_s: Vec<(usize, f64)>,
    /// Every scenario measurement.
    pub measurements: Vec<Measurement>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.into(), v.into())).ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => {
            let result = run(args).await?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
        Command::Report(args) => report::report(&args),
    }
}

/// Settling time before reading idle memory, so start-up allocations are done.
const SETTLE: Duration = Duration::from_secs(1);

async fn run(args: RunArgs) -> anyhow::Result<RunResult> {
    let spec = VolumeSpec { bytes: args.bytes, parameters: args.params.iter().cloned().collect::<HashMap<_, _>>() };
    let tag = format!("r{}", args.rep);
    let driver = Driver::start(&args.command, &args.socket, &args.log).await?;
    let startup_ms = driver.startup.as_secs_f64() * 1e3;
    tokio::time::sleep(SETTLE).await;
    let idle = driver.memory()?;
    let c = &driver.clients;
    let mut measurements = Vec::new();
    eprintln!("[{}] started in {startup_ms:.1} ms; idle RSS {} KiB", args.driver, idle.rss_kib);

    measurements.push(scenarios::snapshot(c, &spec, &tag, args.snapshots).await.context("snapshot scenario")?);

    let node_ids = scenarios::create_named(c, &spec, &format!("bench-node-{tag}"), args.node_volumes).await?;
    for &conc in &args.concurrency {
        let m = scenarios::node_cycle(c, &node_ids, &args.work, 0, conc).await.context("node scenario")?;
        eprintln!("[{}] node cycle x{conc}: {:.0}/s", args.driver, m.cycles_per_s);
        measurements.push(m);
    }
    scenarios::delete_all(c, &node_ids).await?;

    let mut precreate_s = Vec::new();
    let mut have = 0;
    for &level in &args.existing {
        if level > have {
            let took = scenarios::precreate(c, &spec, have, level).await?;
            eprintln!("[{}] pre-created {} volumes in {:.1} s", args.driver, level - have, took.as_secs_f64());
            precreate_s.push((level, took.as_secs_f64()));
            have = level;
        }
        for &conc in &args.concurrency {
            let m = scenarios::create_delete(c, &spec, &tag, level, conc, args.cycles).await?;
            eprintln!("[{}] create+delete x{conc} over {level}: {:.0}/s", args.driver, m.cycles_per_s);
            measurements.push(m);
        }
    }
    // The whole listing last, at the most volumes: what a CO's resync costs,
    // and whether the driver gives the memory back afterwards.
    let listing = scenarios::list_all(c).await?;
    eprintln!(
        "[{}] listed {} volumes in {} calls, {:.0} ms, largest response {} KiB",
        args.driver,
        listing.entries,
        listing.calls,
        listing.ms,
        listing.largest_response_bytes / 1024
    );
    tokio::time::sleep(SETTLE).await;
    let after_listing = driver.memory()?;
    let busy_peak = after_listing.peak_kib;
    driver.stop()?;

    let driver = Driver::start(&args.command, &args.socket, &args.log).await?;
    let startup_full_ms = driver.startup.as_secs_f64() * 1e3;
    tokio::time::sleep(SETTLE).await;
    let idle_full = driver.memory()?;
    eprintln!("[{}] restarted over {have} volumes in {startup_full_ms:.1} ms", args.driver);
    driver.stop()?;

    Ok(RunResult {
        driver: args.driver,
        rep: args.rep,
        startup_ms,
        startup_full_ms,
        full_volumes: have,
        idle,
        idle_full,
        peak_kib: busy_peak.max(idle_full.peak_kib),
        listing,
        after_listing,
        precreate_s,
        measurements,
    })
}
