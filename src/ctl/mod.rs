//! `loam ctl`: a command-line CSI client for people and scripts.
//!
//! Each subcommand issues one CSI RPC (`info` and `capabilities` issue two) against a
//! plugin endpoint and prints the result as readable text or, with `--json`, as one JSON
//! document on stdout. A failed RPC becomes an error reading `<GRPC_CODE>: <message>`,
//! which `main` prints as `error: ...` before exiting with status 1.
//!
//! # Layout
//!
//! - [`args`]: the command line (clap types, option groups and what they turn into).
//! - [`connect`](mod@connect): reaching the plugin (channel, per-call timeout; endpoints are read by
//!   [`loam::endpoint`]) and the error a failed RPC becomes.
//! - [`calls`]: what each subcommand sends and how its response becomes output, one function per
//!   subcommand, grouped by CSI service.
//! - [`output`]: the readable text and the JSON documents.

mod args;
mod calls;
mod connect;
mod output;

use std::time::Duration;

use anyhow::Result;

pub use args::CtlArgs;
use connect::{Ctl, connect};
use loam::endpoint::Endpoint;

/// Runs one `loam ctl` subcommand and prints its result on stdout.
pub async fn run(args: CtlArgs) -> Result<()> {
    let timeout = Duration::from_secs(args.timeout);
    let channel = connect(Endpoint::parse(&args.endpoint).map_err(anyhow::Error::msg)?, timeout)?;
    let (doc, text) = Ctl { channel, timeout }.execute(args.command).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{text}");
    }
    Ok(())
}
