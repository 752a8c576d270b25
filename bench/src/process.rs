//! The driver under test as a child process: start-up time and memory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use loam::csi::ProbeRequest;

use crate::client::{Clients, connect, request};

/// A running driver and the clients connected to it.
pub struct Driver {
    child: Child,
    /// Clients of its CSI services.
    pub clients: Clients,
    /// From spawn to the first Probe that answered ready.
    pub startup: Duration,
}

impl Driver {
    /// Spawns `command` (logging to `log`) and waits until it answers Probe
    /// as ready on `socket`.
    pub async fn start(command: &[String], socket: &Path, log: &Path) -> anyhow::Result<Driver> {
        let (program, args) = command.split_first().context("empty driver command")?;
        let log = File::options().create(true).append(true).open(log).with_context(|| log.display().to_string())?;
        let begun = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let deadline = begun + Duration::from_secs(120);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("{program} exited during start-up: {status}");
            }
            if let Some(clients) = ready(socket).await {
                return Ok(Driver { child, clients, startup: begun.elapsed() });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("{program} did not answer Probe within 120 s");
            }
            // Polling this often adds at most a millisecond to the measured start-up.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The driver's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its memory now, from `/proc/<pid>/status`.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        Memory::of(self.pid())
    }

    /// Stops it with SIGTERM (SIGKILL after 30 s) and waits for it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(libc::pid_t::try_from(self.child.id())?, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                bail!("driver ignored SIGTERM for 30 s; killed");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

/// Connects and probes once; the clients when the driver said it is ready.
async fn ready(socket: &Path) -> Option<Clients> {
    let mut clients = connect(socket).await.ok()?;
    let probe = clients.identity.probe(request(ProbeRequest {})).await.ok()?;
    probe.into_inner().ready.is_none_or(|r| r).then_some(clients)
}

/// Resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Memory {
    /// VmRSS: resident now.
    pub rss_kib: u64,
    /// VmHWM: the most it was ever resident.
    pub peak_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> anyhow::Result<Memory> {
        let path = PathBuf::from(format!("/proc/{pid}/status"));
        let status = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status.lines().find_map(|l| l.strip_prefix(name)).with_context(|| format!("no {name}"))?;
            Ok(line.trim().trim_end_matches("kB").trim().parse()?)
        };
        Ok(Memory { rss_kib: field("VmRSS:")?, peak_kib: field("VmHWM:")? })
    }
}
