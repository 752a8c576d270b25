//! Commands in docs/ run as written: the `loam ctl` walk-through of
//! docs/cli.md, then the inline volume lines of docs/volumes.md that use its
//! driver. Each block is read from the doc as tests/kind/quickstart.sh reads
//! the README's quickstart (the first ```sh block after a heading) and typed
//! into one bash, line by line, each line printed first.
//!
//! The lines run unchanged; what around them differs from a user's machine:
//! - a private `/tmp` (a tmpfs in a private mount namespace), so the doc's
//!   `/tmp/loam-demo` and `/tmp/loam-co` are the test's alone;
//! - `./target/release/loam` is a link to the `loam` cargo built for this test;
//! - `sudo` runs its command (the test is root; the machine need not have sudo),
//!   and the driver's line runs in the background instead of another shell;
//! - at the comment "Restart the driver here", the driver gets SIGINT (Ctrl-C)
//!   and starts again, and the test checks that the target is still mounted
//!   and the file written there reads back the same.
//!
//! Everything runs in its own PID and mount namespaces under `unshare
//! --kill-child`: when the test ends, fails or times out, killing unshare (by
//! its PID) kills every process of the run, and the mounts go with the
//! namespace. The run must end with no mount at the doc's paths, no volume
//! left in the root and no loop device on it.

mod common;

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the whole run may take on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(300);

/// One line of a doc: its line number and text.
type DocLine = (usize, String);

/// The ```sh blocks after the line `heading` of `doc`, up to the next heading
/// of the same level: the first is what tests/kind/quickstart.sh would read.
fn sh_blocks(doc: &str, file: &str, heading: &str) -> Vec<Vec<DocLine>> {
    let level = heading.split(' ').next().expect("a heading");
    let mut lines = doc.lines().enumerate().skip_while(|(_, l)| *l != heading);
    assert!(lines.next().is_some(), "no heading {heading:?} in {file}");
    let (mut blocks, mut block, mut fenced) = (Vec::new(), None::<Vec<DocLine>>, false);
    for (i, line) in lines {
        match &mut block {
            Some(_) if line.starts_with("```") => blocks.extend(block.take()),
            Some(block) => block.push((i + 1, line.to_owned())),
            None if line.starts_with("```sh") && !fenced => block = Some(Vec::new()),
            None if line.starts_with("```") => fenced = !fenced,
            None if !fenced && line.starts_with(&format!("{level} ")) => break,
            None => {}
        }
    }
    assert!(!blocks.is_empty(), "no ```sh block under {heading:?} in {file}");
    blocks
}

/// The word after `flag` on the first line holding `flag`.
fn arg_after<'a>(lines: &'a [DocLine], flag: &str) -> &'a str {
    lines
        .iter()
        .flat_map(|(_, l)| l.split_whitespace().skip_while(|w| *w != flag).nth(1))
        .next()
        .unwrap_or_else(|| panic!("no {flag} in {lines:?}"))
}

/// Every word after `flag` in the lines.
fn args_after(lines: &[DocLine], flag: &str) -> Vec<String> {
    lines
        .iter()
        .flat_map(|(_, l)| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.windows(2).filter(|w| w[0] == flag).map(|w| w[1].to_owned()).collect::<Vec<_>>()
        })
        .collect()
}

fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Bash that prints a doc line and runs it.
fn typed(out: &mut String, file: &str, (number, line): &DocLine) {
    out.push_str(&format!("printf '%s\\n' {}\n", quoted(&format!("+ [{file}:{number}] {line}"))));
    if !line.trim_start().starts_with('#') {
        out.push_str(line);
        out.push('\n');
    }
}

/// The script: the driver's line, the walk-through, the inline lines, the
/// checks. Returns it with the number of doc lines it runs.
fn script(serve: &[DocLine], walk: &[DocLine], inline: &[DocLine]) -> (String, usize) {
    let [(serve_number, serve_line)] = serve else { panic!("the driver's block is one line: {serve:?}") };
    let run_driver = serve_line.strip_prefix("sudo ").expect("the driver's line starts with sudo");
    let socket = arg_after(serve, "--endpoint").strip_prefix("unix://").expect("a unix:// endpoint");
    let root = arg_after(serve, "--root");
    let file = walk
        .iter()
        .find_map(|(_, l)| l.split_once("| sudo tee ").map(|(_, f)| f.trim()))
        .expect("the walk-through writes a file with sudo tee");
    let target = arg_after(walk, "--target-path");
    let mut paths = args_after(walk, "--staging-path");
    paths.extend(args_after(walk, "--target-path"));
    paths.extend(args_after(inline, "--target-path"));
    paths.sort();
    paths.dedup();
    let restart = walk.iter().position(|(_, l)| l.starts_with("# Restart the driver here")).expect("a restart line");

    let mut s = format!(
        r#"set -euo pipefail
# Opened before the private /tmp hides it (the checkout may live under /tmp).
exec 3<"$LOAM_BIN"
mount -t tmpfs -o mode=1777,size=1g loam-docs-tmp /tmp
mkdir -p /tmp/loam-docs-cwd/target/release
cat <&3 >/tmp/loam-docs-cwd/target/release/loam
exec 3<&-
chmod 755 /tmp/loam-docs-cwd/target/release/loam
cd /tmp/loam-docs-cwd
sudo() {{ "$@"; }}
driver=
start_driver() {{
    printf '%s\n' {printed}
    {run_driver} &
    driver=$!
    for _ in $(seq 600); do
        [ -S {socket} ] && return 0
        kill -0 "$driver" 2>/dev/null || {{ echo "walkthrough: the driver exited before making {socket}"; return 1; }}
        sleep 0.1
    done
    echo "walkthrough: no socket {socket} after 60 s"
    return 1
}}
stop_driver() {{
    local rc=0
    kill -INT "$driver"
    wait "$driver" || rc=$?
    driver=
    [ "$rc" = 0 ] || {{ echo "walkthrough: the driver exited with status $rc after SIGINT"; return 1; }}
}}
trap '[ -z "$driver" ] || {{ kill -INT "$driver"; wait "$driver"; }}' EXIT
start_driver
"#,
        printed = quoted(&format!("+ [docs/cli.md:{serve_number}] {serve_line} (in the background)")),
    );
    for (i, line) in walk.iter().enumerate() {
        typed(&mut s, "docs/cli.md", line);
        if i == restart {
            s.push_str(&format!(
                r#"before=$(sha256sum <{file})
stop_driver
start_driver
grep -qF ' {target} ' /proc/self/mountinfo || {{ echo "walkthrough: {target} is not mounted after the restart"; exit 1; }}
[ "$(sha256sum <{file})" = "$before" ] || {{ echo "walkthrough: {file} changed across the restart"; exit 1; }}
echo "walkthrough: after the restart {target} is still mounted and {file} reads the same"
"#
            ));
        }
    }
    for line in inline {
        typed(&mut s, "docs/volumes.md", line);
    }
    s.push_str("stop_driver\n");
    for path in &paths {
        s.push_str(&format!(
            "! grep -qF ' {path} ' /proc/self/mountinfo || {{ echo 'walkthrough: {path} is still mounted'; exit 1; }}\n"
        ));
    }
    s.push_str(&format!(
        r#"[ -z "$(ls -A {root}/volumes)" ] || {{ echo "walkthrough: volumes left in {root}: $(ls -A {root}/volumes)"; exit 1; }}
! grep -qsF {root} /sys/block/loop*/loop/backing_file || {{ echo "walkthrough: a loop device on {root} is left"; exit 1; }}
echo "walkthrough: done, nothing left"
"#
    ));
    (s, 1 + walk.len() + inline.len())
}

/// unshare's PID, killed (which kills the whole run) and reaped on drop.
struct Run(Child);

impl Drop for Run {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[ignore = "needs root: mounts in private mount and PID namespaces (LOAM_PRIVILEGED_TESTS=1); scripts/test.sh runs it"]
#[test]
fn the_loam_ctl_walkthrough_runs_as_written() {
    assert!(common::privileged(), "run as root with LOAM_PRIVILEGED_TESTS=1");
    let read = |file: &str| {
        std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let (cli, volumes) = (read("docs/cli.md"), read("docs/volumes.md"));
    let blocks = sh_blocks(&cli, "docs/cli.md", "## Walk-through with `loam ctl`");
    let [serve, walk] = &blocks[..] else {
        panic!("the walk-through is the driver's block and the client's: {blocks:?}")
    };
    let inline = &sh_blocks(&volumes, "docs/volumes.md", "## Inline volumes")[0];
    let (script, lines) = script(serve, walk, inline);

    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("run.log");
    let out = File::create(&log).expect("log");
    let child = Command::new("unshare")
        .args(["--pid", "--kill-child", "--mount-proc", "--propagation", "private", "--", "bash", "-c", &script])
        .env("LOAM_BIN", env!("CARGO_BIN_EXE_loam"))
        .env_remove("CSI_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("start unshare");
    let mut run = Run(child);
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = run.0.try_wait().expect("wait for unshare") {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(run);
    let output = std::fs::read_to_string(&log).expect("read the log");
    let status = status.unwrap_or_else(|| panic!("the walk-through took over {TIMEOUT:?}:\n{output}"));
    assert!(status.success(), "the walk-through failed ({status}):\n{output}\nscript:\n{script}");
    // The driver's line is typed twice (the restart): doc lines are counted once.
    let typed: std::collections::BTreeSet<&str> =
        output.lines().filter(|l| l.starts_with("+ [docs/")).filter_map(|l| l.split(']').next()).collect();
    assert_eq!(typed.len(), lines, "every doc line was typed:\n{output}");
    // What the docs' comments promise: node-stats says 64.0 MiB total, for both volumes.
    let totals = output.lines().filter(|l| l.split_whitespace().take(3).eq(["BYTES", "64.0", "MiB"])).count();
    assert_eq!(totals, 2, "node-stats of both volumes:\n{output}");
    assert!(output.contains("walkthrough: after the restart"), "{output}");
    assert!(output.contains("walkthrough: done, nothing left"), "{output}");
    println!("{output}walkthrough: {lines} doc lines run as written");
}
