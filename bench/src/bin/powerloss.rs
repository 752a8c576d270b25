//! `powerloss`: the CSI client inside the VM of `scripts/vm-powerloss-test.sh`.
//!
//! One process, one connection, many concurrent calls: spawning `loam ctl`
//! per call costs seconds under software emulation, and the point is to have
//! many record writes in flight (group-committed together) when the host cuts
//! the power. It retries the calls whose outcome the last cut left unknown,
//! reports the volumes and snapshots the driver lists, then either runs the
//! workload until the cut or, on the last boot, deletes everything.
//!
//! Every message is one `PL {json}` line on the serial port to the host
//! (`scripts/powerloss.py` reads them). A call is announced and the port
//! drained (tcdrain) before it is made, and acknowledged only after it
//! returned OK: the host then knows every call that may have reached the
//! driver, and never takes an unanswered call for an answered one.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hyper_util::rt::TokioIo;
use loam::csi::controller_client::ControllerClient;
use loam::csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode};
use loam::csi::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Drives the power-cut workload against a driver on a Unix socket.
#[derive(Debug, Parser)]
struct Args {
    /// The driver's socket.
    #[arg(long)]
    socket: PathBuf,
    /// Serial port (or file) the messages go to.
    #[arg(long)]
    channel: PathBuf,
    /// This boot's plan, written by the host.
    #[arg(long)]
    plan: PathBuf,
}

/// What the host asks of one boot.
#[derive(Debug, Deserialize)]
struct Plan {
    /// Boot number, part of every name so boots never collide.
    boot: u32,
    /// Run the workload until the cut; otherwise delete everything.
    workload: bool,
    /// Calls the last cut left without an answer, in the order they began.
    retry: Vec<Op>,
    /// Concurrent clients.
    workers: u32,
}

/// One call, as announced to the host and retried after a cut: volumes are
/// 1 MiB with the given StorageClass parameters, snapshots are of `source`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Op {
    CreateVolume { name: String, params: HashMap<String, String> },
    CreateSnapshot { name: String, source: String },
    DeleteSnapshot { id: String },
    DeleteVolume { id: String },
}

/// The serial port: whole lines, one writer at a time.
struct Port(Mutex<File>);

impl Port {
    fn send(&self, kind: &str, fields: Value, drained: bool) -> anyhow::Result<()> {
        let mut message = json!({ "kind": kind });
        if let (Some(all), Value::Object(fields)) = (message.as_object_mut(), fields) {
            all.extend(fields);
        }
        let line = format!("PL {message}\n");
        let mut port = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        port.write_all(line.as_bytes()).context("writing to the host")?;
        // tcdrain returns once the UART has sent every byte, so the line is in
        // the host's file whatever happens to this machine next. On a plain
        // file (a trial run outside the VM) there is nothing to drain.
        // SAFETY: the descriptor is open for as long as `port` is borrowed.
        if drained && unsafe { libc::isatty(port.as_raw_fd()) } == 1 {
            // SAFETY: as above.
            if unsafe { libc::tcdrain(port.as_raw_fd()) } != 0 {
                return Err(std::io::Error::last_os_error()).context("draining the port to the host");
            }
        }
        Ok(())
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan: Plan = serde_json::from_slice(&std::fs::read(&args.plan).context("reading the plan")?)?;
    let port = File::options().create(true).append(true).open(&args.channel).context("opening the port to the host")?;
    let port = Arc::new(Port(Mutex::new(port)));
    let client = connect(args.socket).await?;
    for op in &plan.retry {
        let answer = match call(&client, op).await {
            Ok(id) => json!({ "op": op, "id": id }),
            Err(status) => json!({ "op": op, "error": status.to_string() }),
        };
        port.send("retried", answer, false)?;
    }
    let (volumes, snapshots) = listing(&client).await?;
    port.send("state", json!({ "volumes": volumes, "snapshots": snapshots }), true)?;
    if plan.workload {
        port.send("workload", json!({}), true)?;
        let workers: Vec<_> =
            (0..plan.workers).map(|w| tokio::spawn(worker(client.clone(), port.clone(), plan.boot, w))).collect();
        // The host cuts the machine while these run; a worker ends only on a
        // failed call, which it has reported.
        for worker in workers {
            worker.await??;
        }
        return port.send("workload-ended", json!({}), true);
    }
    // The last boot: snapshots first, as a user would; volumes after.
    for id in snapshots {
        call(&client, &Op::DeleteSnapshot { id }).await?;
    }
    for id in volumes {
        call(&client, &Op::DeleteVolume { id }).await?;
    }
    let (volumes, snapshots) = listing(&client).await?;
    port.send("emptied", json!({ "volumes": volumes, "snapshots": snapshots }), true)
}

/// One client's endless sequence: a volume and its snapshot per round; two
/// rounds in three are deleted again in the next round, the third stays.
/// Even workers make directory volumes, odd ones thin loop volumes.
async fn worker(client: ControllerClient<Channel>, port: Arc<Port>, boot: u32, w: u32) -> anyhow::Result<()> {
    let params: HashMap<String, String> = if w.is_multiple_of(2) {
        [("backend", "dir")].map(|(k, v)| (k.into(), v.into())).into()
    } else {
        [("backend", "loop"), ("provisioning", "thin")].map(|(k, v)| (k.into(), v.into())).into()
    };
    let mut previous: Option<(u32, String, String)> = None;
    for i in 0.. {
        let name = format!("b{boot}-w{w}-{i}");
        let create = Op::CreateVolume { name: name.clone(), params: params.clone() };
        let Some(volume) = step(&client, &port, create).await? else { return Ok(()) };
        let snap = Op::CreateSnapshot { name: format!("{name}-snap"), source: volume.clone() };
        let Some(snapshot) = step(&client, &port, snap).await? else { return Ok(()) };
        if let Some((j, volume, snapshot)) = previous.take()
            && !j.is_multiple_of(3)
        {
            for op in [Op::DeleteSnapshot { id: snapshot }, Op::DeleteVolume { id: volume }] {
                if step(&client, &port, op).await?.is_none() {
                    return Ok(());
                }
            }
        }
        previous = Some((i, volume, snapshot));
    }
    Ok(())
}

/// Announces `op`, makes the call, acknowledges it; the new object's id (empty
/// for a deletion), or None when the call failed.
async fn step(client: &ControllerClient<Channel>, port: &Port, op: Op) -> anyhow::Result<Option<String>> {
    port.send("begin", json!({ "op": op }), true)?;
    match call(client, &op).await {
        Ok(id) => {
            port.send("ack", json!({ "op": op, "id": id }), false)?;
            Ok(Some(id))
        }
        Err(status) => {
            port.send("error", json!({ "op": op, "error": status.to_string() }), true)?;
            Ok(None)
        }
    }
}

/// Makes one call; the id of what it created, empty for a deletion.
async fn call(client: &ControllerClient<Channel>, op: &Op) -> Result<String, tonic::Status> {
    let mut client = client.clone();
    Ok(match op.clone() {
        Op::CreateVolume { name, params } => {
            let request = CreateVolumeRequest {
                name,
                capacity_range: Some(CapacityRange { required_bytes: 1 << 20, limit_bytes: 0 }),
                volume_capabilities: vec![VolumeCapability {
                    access_mode: Some(AccessMode { mode: access_mode::Mode::SingleNodeWriter as i32 }),
                    access_type: Some(AccessType::Mount(MountVolume::default())),
                }],
                parameters: params,
                ..Default::default()
            };
            client.create_volume(request).await?.into_inner().volume.map(|v| v.volume_id).unwrap_or_default()
        }
        Op::CreateSnapshot { name, source } => {
            let request = CreateSnapshotRequest { source_volume_id: source, name, ..Default::default() };
            client.create_snapshot(request).await?.into_inner().snapshot.map(|s| s.snapshot_id).unwrap_or_default()
        }
        Op::DeleteSnapshot { id } => {
            client.delete_snapshot(DeleteSnapshotRequest { snapshot_id: id, ..Default::default() }).await?;
            String::new()
        }
        Op::DeleteVolume { id } => {
            client.delete_volume(DeleteVolumeRequest { volume_id: id, ..Default::default() }).await?;
            String::new()
        }
    })
}

/// Every volume id and snapshot id the driver lists, page by page.
async fn listing(client: &ControllerClient<Channel>) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let mut client = client.clone();
    let (mut volumes, mut snapshots, mut token) = (Vec::new(), Vec::new(), String::new());
    loop {
        let page = client
            .list_volumes(ListVolumesRequest { max_entries: 0, starting_token: token })
            .await
            .context("ListVolumes")?
            .into_inner();
        volumes.extend(page.entries.into_iter().filter_map(|e| e.volume).map(|v| v.volume_id));
        token = page.next_token;
        if token.is_empty() {
            break;
        }
    }
    loop {
        let page = client
            .list_snapshots(ListSnapshotsRequest { starting_token: token, ..Default::default() })
            .await
            .context("ListSnapshots")?
            .into_inner();
        snapshots.extend(page.entries.into_iter().filter_map(|e| e.snapshot).map(|s| s.snapshot_id));
        token = page.next_token;
        if token.is_empty() {
            break;
        }
    }
    volumes.sort();
    snapshots.sort();
    Ok((volumes, snapshots))
}

/// A Controller client over the driver's Unix socket.
async fn connect(socket: PathBuf) -> anyhow::Result<ControllerClient<Channel>> {
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_timeout(Duration::from_secs(30))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .context("connecting to the driver")?;
    Ok(ControllerClient::new(channel))
}
