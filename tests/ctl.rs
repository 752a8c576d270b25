//! `loam ctl` as scripts run it: its output piped into a reader that may stop
//! reading early (`loam ctl --json list-volumes | head -1`).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::Harness;

/// Runs `loam ctl --endpoint <socket> <args>` with stdout (or, with
/// `close_stderr`, stderr) a pipe whose reader has already gone away.
async fn ctl_into_closed_pipe(socket: &Path, args: &[&str], close_stderr: bool) -> Output {
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    let mut command = Command::new(env!("CARGO_BIN_EXE_loam"));
    command.arg("ctl").arg(format!("--endpoint=unix://{}", socket.display())).args(args).stdin(Stdio::null());
    if close_stderr {
        command.stdout(Stdio::piped()).stderr(Stdio::from(writer));
    } else {
        command.stdout(Stdio::from(writer)).stderr(Stdio::piped());
    }
    tokio::task::spawn_blocking(move || command.output().expect("run loam ctl")).await.expect("ctl thread")
}

/// Ends like `cat` or `grep` whose reader went away: killed by SIGPIPE, and
/// nothing on stderr (no panic, no backtrace).
fn assert_quiet_pipe_death(output: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{what}: {:?}, stderr: {stderr}", output.status);
    assert!(stderr.is_empty(), "{what}: stderr: {stderr}");
}

#[tokio::test]
async fn output_into_a_closed_pipe_ends_quietly() {
    let mut h = Harness::start().await;
    h.create("pvc-piped", 1 << 20).await;
    let socket = h.dir.path().join("csi.sock");
    for args in [&["--json", "list-volumes"][..], &["list-volumes"], &["--json", "info"], &["info"]] {
        let output = ctl_into_closed_pipe(&socket, args, false).await;
        assert_quiet_pipe_death(&output, &args.join(" "));
    }
}

#[tokio::test]
async fn an_error_into_a_closed_pipe_still_exits_with_status_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = ctl_into_closed_pipe(&dir.path().join("absent.sock"), &["info"], true).await;
    assert_eq!(output.status.code(), Some(1), "{:?}", output.status);
}
