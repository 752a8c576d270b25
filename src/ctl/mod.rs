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

use std::io::{self, Write};
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
    let out = if args.json { serde_json::to_string_pretty(&doc)? + "\n" } else { text };
    let mut stdout = io::stdout().lock();
    match stdout.write_all(out.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => die_of_closed_pipe(),
        written => Ok(written?),
    }
}

/// Ends the process as `cat` or `grep` end when their reader has gone away
/// (`loam ctl --json list-volumes | head -1`): killed by SIGPIPE, silently.
/// Rust ignores SIGPIPE, so a write into a closed pipe fails with EPIPE
/// instead; the default action is restored only here, at the end, because
/// the gRPC connection must never die of it.
fn die_of_closed_pipe() -> ! {
    use nix::sys::signal::{SigHandler, Signal, raise, signal};
    // SAFETY: installs the default disposition, no handler code runs.
    if unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.is_ok() {
        let _ = raise(Signal::SIGPIPE);
    }
    // The shell's status for a death by SIGPIPE, if the signal did not end us.
    std::process::exit(128 + Signal::SIGPIPE as i32)
}
