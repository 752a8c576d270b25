//! The crash-point harness: the real `loam serve` (built with the
//! `failpoints` feature) on a temporary root, driven through random
//! sequences of every kind of operation and killed with SIGKILL part-way:
//! at a fault point inside the code (`LOAM_FAILPOINT`, see
//! `src/failpoint.rs`), after a random delay, or while its mkfs runs; alone
//! or with its whole process group (mkfs dies too, as a container's children
//! do). After every kill the driver must start again, the operation whose
//! outcome was unknown must converge when retried, and then: no staged
//! filesystem is frozen, no path is mounted twice, every byte written and
//! fsynced through a publication reads back. At the end everything is
//! deleted and nothing may be left: no loop device on the root's images, no
//! mount, no file under the root, no record.
//!
//! Copies between nodes (issue 15) run on two `loam serve --mode node` agents,
//! each with its own root and TLS agent endpoint, the harness calling
//! `Copies.CreateVolumeFrom` on the target as the controller does: each kind of
//! volume, from a volume (in use or not) and from a snapshot, the target killed
//! at its fault point or while it waits for or receives the stream, the source
//! at its fault points or while it cuts or streams, then restarted. The retry
//! must converge to the source's bytes; a killed target shows no volume of the
//! copy and, restarted, holds nothing of it before any retry (its start-up
//! removes what the copy left); a retry while a copy runs is ABORTED; after each copy both roots are
//! back to empty (no receive storage, cut, note of a cut or record).
//!
//! Needs root in a private mount namespace:
//!
//! ```text
//! LOAM_PRIVILEGED_TESTS=1 unshare --mount --propagation private -- \
//!     cargo test --locked -p loam --features failpoints --test crash -- --include-ignored
//! ```
//!
//! Snapshots kept off node run on the same two agents: the harness makes each
//! as the controller does (`Copies.CutSnapshot`, `Copies.CopySnapshot`,
//! `Copies.CutSnapshot` with the copy held), killing the snapshot's node at
//! its fault points or while it sends, the copy's node at its fault point or
//! while it receives; the three steps are retried from the start until the
//! snapshot is ready, its copy must hold the snapshot's bytes, and a killed
//! copy's node holds nothing of an unrecorded copy once restarted.
//!
//! `LOAM_CRASH_SEED` picks the seed (CI's default is fixed) and
//! `LOAM_CRASH_POINTS` how many kills the random run makes (default 200);
//! e.g. `LOAM_CRASH_SEED=7 LOAM_CRASH_POINTS=2000` for a longer run;
//! `LOAM_CRASH_COPIES` how many copies between nodes (default 24),
//! `LOAM_CRASH_SNAPSHOT_COPIES` how many snapshots kept off node (12). The
//! targeted tests below replay the crashes fault injection found (issue 12,
//! items 1 to 3) deterministically.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Access, block_capability, mount_capability};
use hyper_util::rt::TokioIo;
use loam::api::copies_client::CopiesClient;
use loam::api::{CopySnapshotRequest, CreateVolumeFromRequest, CutSnapshotRequest};
use loam::auth::{SendToken, Token};
use loam::csi;
use loam::csi::controller_client::ControllerClient;
use loam::csi::group_controller_client::GroupControllerClient;
use loam::csi::identity_client::IdentityClient;
use loam::csi::node_client::NodeClient;
use loam::ids::{Kind, ObjectId, SnapshotId};
use loam::kernel::{blockfs, loopdev, mountinfo};
use loam::routing::agents::{Agents, Timeouts};
use loam::routing::discovery::Discovery;
use loam::routing::router::Router;
use loam::tls::{self, Role};
use tokio::net::UnixStream;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

const MIB: i64 = 1 << 20;
/// Longest any one call may take before the driver counts as hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a write to a staged filesystem may take before it counts as frozen.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times one operation is retried across restarts before the run fails.
const MAX_RETRIES: u32 = 25;
/// Bytes written through a publication at a time by the single-node runs.
const WRITE_BYTES: usize = 4096;

/// Every fault point in the code; each must still be there (checked below).
const FAILPOINTS: &[&str] = &[
    "loop.create.building",
    "volume.created",
    "volume.deleted",
    "volume.expanded",
    "volume.modified",
    "loop.stage.attached",
    "loop.mkfs.started",
    "loop.mkfs.done",
    "ext4.resized",
    "loop.stage.mounting",
    "stage.mounted",
    "unstage.unmounted",
    "publish.bound",
    "unpublish.unmounted",
    "snapshot.frozen",
    "snapshot.cut",
    "snapshot.deleted",
    "group.intent",
    "group.frozen",
    "group.cut",
    "inline.created",
];

/// The fault points of copies between nodes, armed by the copy run only: a
/// driver serving everything on one socket never copies to another node.
const COPY_FAILPOINTS: &[&str] = &["volume.received", "export.intent", "export.cut"];

/// The fault points of snapshots kept off node (`Copies.CutSnapshot` on the
/// snapshot's node, `Copies.CopySnapshot` on its copy's), armed by the run
/// of those only. `snapshot.cut` and `snapshot.frozen`, on the way of every
/// cut, are armed there too.
const SNAPSHOT_COPY_FAILPOINTS: &[&str] = &["snapshot.awaiting", "snapshot.copy.received"];

/// The agent token of the copy run's node agents.
const TOKEN: &str = "crash-harness-agent-token-0123456789";

/// What one export sends per second: a copy of a few MiB then lasts long
/// enough to be killed mid-stream, and retried while it runs.
const COPY_BANDWIDTH: &str = "32Mi";

// ----- The driver process -----

/// A channel whose calls carry the agent token.
type Authed = InterceptedService<Channel, SendToken>;

/// Connected CSI clients. Controller and GroupController are on the socket of
/// a driver that serves everything, on the agent endpoint (mutual TLS, then
/// the token, which the socket ignores) of a node agent.
#[derive(Clone)]
struct Clients {
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Authed>,
    group: GroupControllerClient<Authed>,
    node: NodeClient<Channel>,
    /// A node agent's endpoint, as the controller reaches it.
    agent: Option<(SocketAddr, Channel)>,
}

impl Clients {
    /// Copies, as the controller calls them on a node agent.
    fn copies(&self) -> CopiesClient<Authed> {
        let (_, channel) = self.agent.clone().expect("copies are served by node agents");
        CopiesClient::with_interceptor(channel, send_token())
    }

    /// The node agent's endpoint address.
    fn address(&self) -> SocketAddr {
        self.agent.as_ref().expect("a node agent").0
    }
}

fn send_token() -> SendToken {
    SendToken::new(&Token::parse(TOKEN).expect("a valid token"))
}

/// How a kill is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// The driver alone (its children, such as mkfs, run on).
    Alone,
    /// Its whole process group.
    Group,
}

/// Why the driver did not come up.
#[derive(Debug)]
enum NoStart {
    /// Its armed fault point killed it during start-up.
    Killed,
    /// It failed: the reason and its log.
    Failed(String),
}

/// How the driver serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Serving {
    /// `--mode all`: everything on its socket, as on a single machine.
    All,
    /// `--mode node`, as deploy/ runs it: Identity and Node on the socket,
    /// its Controller and Copies on a TCP agent endpoint holding the token.
    Agent,
}

/// The `loam serve` process under test, in a process group of its own, and
/// everything it works in. Dropping it kills the driver and removes every
/// mount, loop device and file it left, whatever the test's outcome.
struct Node {
    dir: tempfile::TempDir,
    id: String,
    serving: Serving,
    child: Option<Child>,
    starts: u32,
    /// The directories of the empty root the first start made: all a root
    /// may hold once everything is deleted.
    skeleton: Option<BTreeSet<PathBuf>>,
}

impl Node {
    fn new() -> Node {
        Node::serving("crash-node", Serving::All)
    }

    fn serving(id: &str, serving: Serving) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        if serving == Serving::Agent {
            fs::write(dir.path().join("token"), TOKEN).expect("token file");
        }
        Node { dir, id: id.to_owned(), serving, child: None, starts: 0, skeleton: None }
    }

    fn base(&self) -> PathBuf {
        self.dir.path().canonicalize().expect("canonical")
    }

    fn root(&self) -> PathBuf {
        self.base().join("root")
    }

    fn socket(&self) -> PathBuf {
        self.base().join("csi.sock")
    }

    fn co(&self, name: &str) -> PathBuf {
        self.base().join("co").join(name)
    }

    /// Starts the driver, armed with `failpoint` when given, and waits until
    /// it answers.
    async fn start(&mut self, failpoint: Option<&str>) -> Result<Clients, NoStart> {
        assert!(self.child.is_none(), "the driver is already running");
        self.starts += 1;
        let log = File::create(self.base().join(format!("driver-{}.log", self.starts))).expect("log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_loam"));
        command
            .arg("serve")
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket().display()))
            .args(["--node-id", &self.id, "--quota", "off"])
            .arg("--root")
            .arg(self.root())
            .env("LOAM_LOG", "warn")
            .env_remove("LOAM_FAILPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        if self.serving == Serving::Agent {
            command
                .args(["--mode", "node", "--agent-listen", "127.0.0.1:0", "--copy-bandwidth", COPY_BANDWIDTH])
                .arg("--agent-token-file")
                .arg(self.base().join("token"))
                // The port the endpoint got is logged at info.
                .env("LOAM_LOG", "warn,loam=info");
        }
        if let Some(point) = failpoint {
            command.env("LOAM_FAILPOINT", point);
        }
        self.child = Some(command.spawn().expect("spawning loam serve"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("wait")) {
                use std::os::unix::process::ExitStatusExt;
                self.child = None;
                // Only a fault point kills it (a start-up repair has them too).
                if failpoint.is_some() && status.signal() == Some(libc::SIGKILL) {
                    return Err(NoStart::Killed);
                }
                return Err(NoStart::Failed(format!("the driver exited at start-up ({status}): {}", self.log_tail())));
            }
            if let Ok(clients) = self.connect().await {
                let mut identity = clients.identity.clone();
                if identity.probe(csi::ProbeRequest {}).await.is_ok() {
                    // The root is empty at a run's first start.
                    if self.skeleton.is_none() {
                        self.skeleton = Some(directories(&self.root()));
                    }
                    return Ok(clients);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(NoStart::Failed(format!("the driver did not answer within 30 s: {}", self.log_tail())))
    }

    fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| i32::try_from(c.id()).expect("a pid fits in i32"))
    }

    /// Whether the driver died; a death not by SIGKILL fails the test.
    fn dead(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else { return true };
        match child.try_wait().expect("wait") {
            None => false,
            Some(status) => {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(status.signal(), Some(libc::SIGKILL), "the driver died by itself: {}", self.log_tail());
                self.child = None;
                true
            }
        }
    }

    /// Whether the driver died, judged after giving the kernel a moment to
    /// reap it: a dying driver's answers are transport errors, which can
    /// come first.
    async fn died(&mut self) -> bool {
        for _ in 0..20 {
            if self.dead() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Kills the driver (and its group) and reaps it.
    fn kill(&mut self, reach: Reach) {
        if let Some(mut child) = self.child.take() {
            let pid = i32::try_from(child.id()).expect("a pid fits in i32");
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(if reach == Reach::Group { -pid } else { pid }, libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    /// Stops the driver for good: its whole group, so no mkfs outlives it.
    fn stop(&mut self) {
        self.kill(Reach::Group);
    }

    fn log(&self) -> String {
        fs::read_to_string(self.base().join(format!("driver-{}.log", self.starts))).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        log.lines().rev().take(16).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Clients of the running driver: on its socket, and on its agent
    /// endpoint once it logged where that listens.
    async fn connect(&self) -> Result<Clients, String> {
        let socket = unix_channel(&self.socket()).await.map_err(|e| e.to_string())?;
        let (control, agent) = match self.serving {
            Serving::All => (socket.clone(), None),
            Serving::Agent => {
                let log = self.log();
                let addr: SocketAddr = log
                    .lines()
                    .find_map(|line| line.contains("agent endpoint listening").then(|| line.split_once("addr=")))
                    .flatten()
                    .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
                    .ok_or("the agent endpoint is not listening yet")?;
                let config = tls::client_config(&Token::parse(TOKEN).expect("token"), Role::Controller)
                    .map_err(|e| e.to_string())?;
                let channel = Endpoint::from_shared(format!("http://{addr}"))
                    .expect("endpoint")
                    .connect_with_connector(tls::Connector::new(config))
                    .await
                    .map_err(|e| e.to_string())?;
                (channel.clone(), Some((addr, channel)))
            }
        };
        Ok(Clients {
            identity: IdentityClient::new(socket.clone()),
            controller: ControllerClient::with_interceptor(control.clone(), send_token()),
            group: GroupControllerClient::with_interceptor(control, send_token()),
            node: NodeClient::new(socket),
            agent,
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        let base = self.base();
        // Thaw first: unmounting a frozen filesystem would hang.
        let ours = |p: &Path| p.starts_with(&base);
        let mut mounts: Vec<PathBuf> =
            mountinfo::read().unwrap_or_default().into_iter().map(|m| m.mount_point).filter(|p| ours(p)).collect();
        for mount in &mounts {
            let _ = blockfs::thaw(mount);
        }
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for mount in mounts {
            let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
        }
        for device in loopdev::list().unwrap_or_default() {
            if device.backing_file.starts_with(&base) {
                let _ = loopdev::detach(&device.device);
            }
        }
    }
}

async fn unix_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_owned();
    Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
}

// ----- What the harness believes exists -----

/// The kinds of volume the run makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Dir,
    LoopThickExt4,
    LoopThinExt4,
    LoopThinXfs,
    Block,
}

const FLAVORS: &[Flavor] =
    &[Flavor::Dir, Flavor::LoopThickExt4, Flavor::LoopThinExt4, Flavor::LoopThinXfs, Flavor::Block];

impl Flavor {
    fn parameters(self) -> HashMap<String, String> {
        let pairs: &[(&str, &str)] = match self {
            Flavor::Dir => &[],
            Flavor::LoopThickExt4 => &[("backend", "loop")],
            Flavor::LoopThinExt4 | Flavor::Block => &[("backend", "loop"), ("provisioning", "thin")],
            Flavor::LoopThinXfs => &[("backend", "loop"), ("provisioning", "thin"), ("fsType", "xfs")],
        };
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn bytes(self) -> i64 {
        match self {
            Flavor::Dir | Flavor::Block => 16 * MIB,
            Flavor::LoopThickExt4 => 32 * MIB,
            Flavor::LoopThinExt4 => 64 * MIB,
            Flavor::LoopThinXfs => 300 * MIB,
        }
    }

    fn capability(self) -> csi::VolumeCapability {
        if self == Flavor::Block { block_capability() } else { mount_capability(Access::Writer) }
    }

    fn loop_filesystem(self) -> bool {
        matches!(self, Flavor::LoopThickExt4 | Flavor::LoopThinExt4 | Flavor::LoopThinXfs)
    }

    fn thin_loop(self) -> bool {
        matches!(self, Flavor::LoopThinExt4 | Flavor::LoopThinXfs | Flavor::Block)
    }
}

#[derive(Debug, Clone)]
struct Volume {
    name: String,
    id: String,
    flavor: Flavor,
    bytes: i64,
    staged: bool,
    published: bool,
    /// Bytes written and fsynced through a publication, which must last.
    data: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct Snapshot {
    id: String,
    flavor: Flavor,
    bytes: i64,
}

#[derive(Debug, Default)]
struct Model {
    volumes: BTreeMap<usize, Volume>,
    snapshots: Vec<Snapshot>,
    groups: Vec<String>,
    /// Inline volumes published: the kubelet's volume id and their flavor.
    inline: Vec<(String, Flavor)>,
}

const SLOTS: usize = 5;

/// Where a new volume's content comes from.
#[derive(Debug, Clone)]
enum Source {
    Volume(String),
    Snapshot(String),
}

/// One step of a run: a CSI call (or two, for expansion) the CO would retry
/// with the same arguments until it gets an answer.
#[derive(Debug, Clone)]
enum Op {
    Create { slot: usize, name: String, flavor: Flavor, bytes: i64, source: Option<Source> },
    Delete { slot: usize },
    Stage { slot: usize },
    Unstage { slot: usize },
    Publish { slot: usize },
    Unpublish { slot: usize },
    Snapshot { name: String, slot: usize },
    DeleteSnapshot { index: usize },
    Group { name: String, slots: Vec<usize> },
    DeleteGroup { index: usize },
    Expand { slot: usize, bytes: i64 },
    Modify { slot: usize },
    InlinePublish { id: String, flavor: Flavor },
    InlineUnpublish { index: usize },
}

/// What a call returned that the model needs.
enum Made {
    Nothing,
    Volume(String),
    Snapshot(String),
    Group(String),
}

/// The CreateVolume the CO sends for a new volume.
fn create_request(name: &str, flavor: Flavor, bytes: i64, source: Option<&Source>) -> csi::CreateVolumeRequest {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let source = source.map(|s| csi::VolumeContentSource {
        r#type: Some(match s {
            Source::Volume(id) => Type::Volume(VolumeSource { volume_id: id.clone() }),
            Source::Snapshot(id) => Type::Snapshot(SnapshotSource { snapshot_id: id.clone() }),
        }),
    });
    csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![flavor.capability()],
        parameters: flavor.parameters(),
        volume_content_source: source,
        ..Default::default()
    }
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_owned()
}

impl Op {
    /// Makes the call; the same op always sends the same requests.
    async fn call(&self, c: &mut Clients, m: &Model, node: &Node) -> Result<Made, tonic::Status> {
        let vol = |slot: &usize| m.volumes.get(slot).expect("the model has the volume").clone();
        let staging = |v: &Volume| node.co(&format!("stage-{}", v.name));
        let target = |v: &Volume| node.co(&format!("pub-{}", v.name));
        match self {
            Op::Create { name, flavor, bytes, source, .. } => {
                let request = create_request(name, *flavor, *bytes, source.as_ref());
                let volume = c.controller.create_volume(request).await?.into_inner().volume.expect("volume");
                Ok(Made::Volume(volume.volume_id))
            }
            Op::Delete { slot } => {
                let request = csi::DeleteVolumeRequest { volume_id: vol(slot).id, ..Default::default() };
                c.controller.delete_volume(request).await.map(|_| Made::Nothing)
            }
            Op::Stage { slot } => {
                let v = vol(slot);
                let request = csi::NodeStageVolumeRequest {
                    volume_id: v.id.clone(),
                    staging_target_path: path_str(&staging(&v)),
                    volume_capability: Some(v.flavor.capability()),
                    ..Default::default()
                };
                c.node.node_stage_volume(request).await.map(|_| Made::Nothing)
            }
            Op::Unstage { slot } => {
                let v = vol(slot);
                let request = csi::NodeUnstageVolumeRequest {
                    volume_id: v.id.clone(),
                    staging_target_path: path_str(&staging(&v)),
                };
                c.node.node_unstage_volume(request).await.map(|_| Made::Nothing)
            }
            Op::Publish { slot } => {
                let v = vol(slot);
                let request = csi::NodePublishVolumeRequest {
                    volume_id: v.id.clone(),
                    staging_target_path: path_str(&staging(&v)),
                    target_path: path_str(&target(&v)),
                    volume_capability: Some(v.flavor.capability()),
                    ..Default::default()
                };
                c.node.node_publish_volume(request).await.map(|_| Made::Nothing)
            }
            Op::Unpublish { slot } => {
                let v = vol(slot);
                let request =
                    csi::NodeUnpublishVolumeRequest { volume_id: v.id.clone(), target_path: path_str(&target(&v)) };
                c.node.node_unpublish_volume(request).await.map(|_| Made::Nothing)
            }
            Op::Snapshot { name, slot } => {
                let request = csi::CreateSnapshotRequest {
                    source_volume_id: vol(slot).id,
                    name: name.clone(),
                    ..Default::default()
                };
                let snapshot = c.controller.create_snapshot(request).await?.into_inner().snapshot.expect("snapshot");
                Ok(Made::Snapshot(snapshot.snapshot_id))
            }
            Op::DeleteSnapshot { index } => {
                let request =
                    csi::DeleteSnapshotRequest { snapshot_id: m.snapshots[*index].id.clone(), ..Default::default() };
                c.controller.delete_snapshot(request).await.map(|_| Made::Nothing)
            }
            Op::Group { name, slots } => {
                let request = csi::CreateVolumeGroupSnapshotRequest {
                    name: name.clone(),
                    source_volume_ids: slots.iter().map(|s| vol(s).id).collect(),
                    ..Default::default()
                };
                let response = c.group.create_volume_group_snapshot(request).await?.into_inner();
                Ok(Made::Group(response.group_snapshot.expect("group").group_snapshot_id))
            }
            Op::DeleteGroup { index } => {
                let request = csi::DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: m.groups[*index].clone(),
                    ..Default::default()
                };
                c.group.delete_volume_group_snapshot(request).await.map(|_| Made::Nothing)
            }
            Op::Expand { slot, bytes } => {
                let v = vol(slot);
                let range = csi::CapacityRange { required_bytes: *bytes, limit_bytes: 0 };
                let request = csi::ControllerExpandVolumeRequest {
                    volume_id: v.id.clone(),
                    capacity_range: Some(range),
                    volume_capability: Some(v.flavor.capability()),
                    ..Default::default()
                };
                let grown = c.controller.controller_expand_volume(request).await?.into_inner();
                if grown.node_expansion_required && v.staged && v.flavor.loop_filesystem() {
                    let request = csi::NodeExpandVolumeRequest {
                        volume_id: v.id.clone(),
                        volume_path: path_str(&staging(&v)),
                        capacity_range: Some(range),
                        staging_target_path: path_str(&staging(&v)),
                        volume_capability: Some(v.flavor.capability()),
                        ..Default::default()
                    };
                    c.node.node_expand_volume(request).await?;
                }
                Ok(Made::Nothing)
            }
            Op::Modify { slot } => {
                let request = csi::ControllerModifyVolumeRequest {
                    volume_id: vol(slot).id,
                    mutable_parameters: [("provisioning".to_owned(), "thick".to_owned())].into(),
                    ..Default::default()
                };
                c.controller.controller_modify_volume(request).await.map(|_| Made::Nothing)
            }
            Op::InlinePublish { id, flavor } => {
                let mut context: HashMap<String, String> =
                    [("csi.storage.k8s.io/ephemeral".to_owned(), "true".to_owned())].into();
                context.extend(flavor.parameters());
                context.insert("size".into(), "16Mi".into());
                let request = csi::NodePublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: path_str(&node.co(&format!("inline-{id}"))),
                    volume_capability: Some(mount_capability(Access::Writer)),
                    volume_context: context,
                    ..Default::default()
                };
                c.node.node_publish_volume(request).await.map(|_| Made::Nothing)
            }
            Op::InlineUnpublish { index } => {
                let id = &m.inline[*index].0;
                let request = csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: path_str(&node.co(&format!("inline-{id}"))),
                };
                c.node.node_unpublish_volume(request).await.map(|_| Made::Nothing)
            }
        }
    }

    /// Records a converged call in the model.
    fn apply(&self, m: &mut Model, made: Made) {
        match (self, made) {
            (Op::Create { slot, name, flavor, bytes, .. }, Made::Volume(id)) => {
                let volume = Volume {
                    name: name.clone(),
                    id,
                    flavor: *flavor,
                    bytes: *bytes,
                    staged: false,
                    published: false,
                    data: None,
                };
                m.volumes.insert(*slot, volume);
            }
            (Op::Delete { slot }, _) => drop(m.volumes.remove(slot)),
            (Op::Stage { slot }, _) => m.volumes.get_mut(slot).expect("volume").staged = true,
            (Op::Unstage { slot }, _) => m.volumes.get_mut(slot).expect("volume").staged = false,
            (Op::Publish { slot }, _) => m.volumes.get_mut(slot).expect("volume").published = true,
            (Op::Unpublish { slot }, _) => m.volumes.get_mut(slot).expect("volume").published = false,
            (Op::Snapshot { slot, .. }, Made::Snapshot(id)) => {
                let v = &m.volumes[slot];
                m.snapshots.push(Snapshot { id, flavor: v.flavor, bytes: v.bytes });
            }
            (Op::DeleteSnapshot { index }, _) => drop(m.snapshots.remove(*index)),
            (Op::Group { .. }, Made::Group(id)) => m.groups.push(id),
            (Op::DeleteGroup { index }, _) => drop(m.groups.remove(*index)),
            (Op::Expand { slot, bytes }, _) => m.volumes.get_mut(slot).expect("volume").bytes = *bytes,
            (Op::Modify { .. }, _) => {}
            (Op::InlinePublish { id, flavor }, _) => m.inline.push((id.clone(), *flavor)),
            (Op::InlineUnpublish { index }, _) => drop(m.inline.remove(*index)),
            (op, _) => panic!("{op:?} returned something else than it makes"),
        }
    }

    /// Whether `status` is an answer the README documents for this call in
    /// this environment: growing a mounted ext4 filesystem without
    /// CAP_SYS_RESOURCE is refused, and done at the next stage instead.
    fn documented_refusal(&self, status: &tonic::Status) -> bool {
        matches!(self, Op::Expand { .. })
            && status.code() == Code::FailedPrecondition
            && status.message().contains("CAP_SYS_RESOURCE")
    }

    /// Whether a filesystem may be formatted during this call.
    fn may_format(&self, m: &Model) -> bool {
        match self {
            Op::Stage { slot } => m.volumes[slot].flavor.loop_filesystem(),
            Op::InlinePublish { flavor, .. } => flavor.loop_filesystem(),
            _ => false,
        }
    }
}

// ----- Randomness -----

/// splitmix64: small, seedable, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).expect("usize fits in u64")).expect("below n, a usize")
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() { None } else { Some(&items[self.below(items.len())]) }
    }
}

/// A random legal next step for the model, or a harness-side write (None).
fn next_op(rng: &mut Rng, m: &Model, serial: &mut u32) -> Option<Op> {
    *serial += 1;
    let name = |what: &str| format!("{what}-{serial}");
    let slot = rng.below(SLOTS);
    let Some(v) = m.volumes.get(&slot) else {
        if rng.chance(20) && m.inline.len() < 2 {
            let flavor = if rng.chance(50) { Flavor::Dir } else { Flavor::LoopThinExt4 };
            return Some(Op::InlinePublish { id: format!("csi-{serial:08x}"), flavor });
        }
        // A clone or a restore now and then, of something of the same kind.
        let flavor = *rng.pick(FLAVORS).expect("flavors");
        let source = match rng.below(4) {
            0 => m.volumes.values().rfind(|o| o.flavor == flavor).map(|o| (Source::Volume(o.id.clone()), o.bytes)),
            1 => m.snapshots.iter().rfind(|s| s.flavor == flavor).map(|s| (Source::Snapshot(s.id.clone()), s.bytes)),
            _ => None,
        };
        let bytes = source.as_ref().map_or(flavor.bytes(), |(_, bytes)| *bytes);
        return Some(Op::Create { slot, name: name("vol"), flavor, bytes, source: source.map(|(s, _)| s) });
    };
    // Snapshots and growth are bounded, so a long run stays within a few
    // GiB of the machine's disk.
    if m.snapshots.len() > 6 {
        return Some(Op::DeleteSnapshot { index: rng.below(m.snapshots.len()) });
    }
    if m.groups.len() > 3 {
        return Some(Op::DeleteGroup { index: rng.below(m.groups.len()) });
    }
    let choice = rng.below(10);
    Some(match (v.staged, v.published, choice) {
        (_, _, 0) if !m.snapshots.is_empty() && rng.chance(50) => {
            Op::DeleteSnapshot { index: rng.below(m.snapshots.len()) }
        }
        (_, _, 0) if !m.groups.is_empty() => Op::DeleteGroup { index: rng.below(m.groups.len()) },
        (_, _, 1) if !m.inline.is_empty() => Op::InlineUnpublish { index: rng.below(m.inline.len()) },
        (_, _, 2) => Op::Snapshot { name: name("snap"), slot },
        (_, _, 3) => {
            // Members a group can hold still at once: loop filesystems
            // (frozen if staged) and volumes nothing uses.
            let slots: Vec<usize> = m
                .volumes
                .iter()
                .filter(|(_, o)| o.flavor.loop_filesystem() || !o.staged)
                .map(|(s, _)| *s)
                .take(1 + rng.below(3))
                .collect();
            if slots.is_empty() {
                return Some(Op::Snapshot { name: name("snap"), slot });
            }
            Op::Group { name: name("group"), slots }
        }
        (_, _, 4) if v.bytes < v.flavor.bytes() + 64 * MIB => Op::Expand { slot, bytes: v.bytes + 16 * MIB },
        (_, _, 5) if v.flavor.thin_loop() => Op::Modify { slot },
        (_, true, 6) => return None,
        (false, false, 6..=7) => Op::Stage { slot },
        (false, false, _) => Op::Delete { slot },
        (true, false, 6..=7) => Op::Publish { slot },
        (true, false, _) => Op::Unstage { slot },
        (true, true, 6..=7) if v.data.is_none() => return None,
        (true, true, _) => Op::Unpublish { slot },
        (false, true, _) => unreachable!("published but not staged"),
    })
}

// ----- The run -----

/// A kill of the driver during one call.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// After this many milliseconds.
    Timed(u64, Reach),
    /// This many milliseconds after a mkfs of the driver's shows up.
    DuringMkfs(u64, Reach),
}

/// How one call went.
enum Attempt {
    /// It answered.
    Answered(Made),
    /// It answered, and the kill planned for it came just after.
    AnsweredThenKilled(Made),
    /// The driver died before answering: the outcome is unknown.
    Died,
    /// It answered with an error.
    Failed(tonic::Status),
}

/// Counts for the summary line.
#[derive(Debug, Default)]
struct Tally {
    ops: u32,
    failpoint_kills: u32,
    timed_kills: u32,
    mkfs_kills: u32,
    alone: u32,
    group: u32,
    retries: u32,
    converged_after_kill: u32,
    failpoints_hit: BTreeMap<String, u32>,
}

struct Run {
    node: Node,
    clients: Clients,
    /// The fault points its restarts arm at random.
    points: &'static [&'static str],
    rng: Rng,
    model: Model,
    tally: Tally,
    /// The fault point the running driver is armed with.
    armed: Option<String>,
    /// The latest steps, shown when the run fails.
    trail: std::collections::VecDeque<String>,
}

impl Drop for Run {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the run's last steps:\n{}", Vec::from(self.trail.clone()).join("\n"));
        }
    }
}

impl Run {
    async fn start(seed: u64) -> Run {
        Run::on(Node::new(), FAILPOINTS, seed).await
    }

    /// A run of `node`, whose restarts arm `points`.
    async fn on(mut node: Node, points: &'static [&'static str], seed: u64) -> Run {
        fs::create_dir_all(node.co("")).expect("co dir");
        let clients = node.start(None).await.expect("the driver starts on an empty root");
        let (model, tally, trail) = (Model::default(), Tally::default(), Default::default());
        Run { node, clients, points, rng: Rng(seed), model, tally, armed: None, trail }
    }

    /// Restarts the driver after a kill, sometimes armed with a random
    /// fault point; panics when it does not come up.
    async fn restart(&mut self, arm: bool) {
        self.node.stop();
        loop {
            self.armed = None;
            if arm && self.rng.chance(60) {
                let point = self.rng.pick(self.points).expect("failpoints");
                let hit = 1 + self.rng.below(2);
                let group = if self.rng.chance(50) { "+group" } else { "" };
                self.armed = Some(format!("{point}@{hit}{group}"));
            }
            let armed = self.armed.clone();
            self.note(format!("restart, armed {armed:?}"));
            match self.node.start(armed.as_deref()).await {
                Ok(clients) => {
                    self.clients = clients;
                    return;
                }
                // Killed while repairing what the last kill left: again.
                Err(NoStart::Killed) => self.count_failpoint(),
                Err(NoStart::Failed(why)) => panic!("after a kill, {why}"),
            }
        }
    }

    fn note(&mut self, step: String) {
        if self.trail.len() == 80 {
            self.trail.pop_front();
        }
        self.trail.push_back(step);
    }

    /// Runs `op`, killing the driver as `kill` says.
    async fn attempt(&mut self, op: &Op, kill: Option<Kill>) -> Attempt {
        self.note(format!("{op:?}, kill {kill:?}, armed {:?}", self.armed));
        let pid = self.node.pid().expect("running");
        let killer = kill.map(|kill| tokio::spawn(killer(pid, kill)));
        let mut clients = self.clients.clone();
        let answer = tokio::time::timeout(CALL_TIMEOUT, op.call(&mut clients, &self.model, &self.node))
            .await
            .unwrap_or_else(|_| panic!("{op:?} hung for {CALL_TIMEOUT:?}: {}", self.node.log_tail()));
        let fired = match killer {
            Some(task) => {
                task.abort();
                task.await.unwrap_or(None)
            }
            None => None,
        };
        if let Some(reach) = fired {
            self.count_kill(reach, kill);
        }
        match answer {
            // Killed right after it answered: the answer stands.
            Ok(made) if fired.is_some() => Attempt::AnsweredThenKilled(made),
            Ok(made) => Attempt::Answered(made),
            Err(status) => {
                if self.node.died().await {
                    if fired.is_none() {
                        self.count_failpoint();
                    }
                    return Attempt::Died;
                }
                Attempt::Failed(status)
            }
        }
    }

    fn count_kill(&mut self, reach: Reach, kill: Option<Kill>) {
        match kill {
            Some(Kill::Timed(..)) => self.tally.timed_kills += 1,
            Some(Kill::DuringMkfs(..)) => self.tally.mkfs_kills += 1,
            None => {}
        }
        match reach {
            Reach::Alone => self.tally.alone += 1,
            Reach::Group => self.tally.group += 1,
        }
    }

    fn count_failpoint(&mut self) {
        let armed = self.armed.take().expect("a driver that died by itself was armed with a fault point");
        self.tally.failpoint_kills += 1;
        if armed.ends_with("+group") {
            self.tally.group += 1
        } else {
            self.tally.alone += 1
        }
        let name = armed.split(['@', '+']).next().expect("name").to_owned();
        *self.tally.failpoints_hit.entry(name).or_default() += 1;
    }

    /// Runs `op` to convergence: after every kill the driver restarts and
    /// the same call is made again; once it answers, the checks run.
    async fn converge(&mut self, op: &Op, mut kill: Option<Kill>) {
        self.tally.ops += 1;
        let mut killed = false;
        for _ in 0..MAX_RETRIES {
            let attempt = self.attempt(op, kill.take()).await;
            self.note(format!(
                "  -> {}",
                match &attempt {
                    Attempt::Answered(_) => "answered".to_owned(),
                    Attempt::AnsweredThenKilled(_) => "answered, then killed".to_owned(),
                    Attempt::Died => "died".to_owned(),
                    Attempt::Failed(status) => format!("{:?}", status.code()),
                }
            ));
            match attempt {
                Attempt::Answered(made) => {
                    op.apply(&mut self.model, made);
                    if killed {
                        self.tally.converged_after_kill += 1;
                        self.check().await;
                    }
                    return;
                }
                Attempt::AnsweredThenKilled(made) => {
                    op.apply(&mut self.model, made);
                    self.restart(true).await;
                    self.check().await;
                    return;
                }
                Attempt::Died => {
                    killed = true;
                    self.tally.retries += 1;
                    self.restart(true).await;
                }
                Attempt::Failed(status) if op.documented_refusal(&status) => {
                    op.apply(&mut self.model, Made::Nothing);
                    return;
                }
                Attempt::Failed(status) if status.code() == Code::Aborted => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Attempt::Failed(status) => panic!(
                    "{op:?} {}answered {:?}: {}\n{}{}",
                    if killed { "retried after a kill " } else { "" },
                    status.code(),
                    status.message(),
                    self.node.log_tail(),
                    self.diagnose(op)
                ),
            }
        }
        panic!("{op:?} did not converge in {MAX_RETRIES} attempts");
    }

    /// What a failed stage's image holds, for the failure message.
    fn diagnose(&self, op: &Op) -> String {
        let Op::Stage { slot } = op else { return String::new() };
        if !self.model.volumes[slot].flavor.loop_filesystem() {
            return String::new();
        }
        let checked = Command::new("e2fsck").args(["-f", "-n"]).arg(self.image(*slot)).output();
        checked.map_or_else(
            |e| format!("\ne2fsck: {e}"),
            |out| format!("\ne2fsck -f -n of its image:\n{}", String::from_utf8_lossy(&out.stdout)),
        )
    }

    /// What must hold after every restart.
    async fn check(&mut self) {
        // Nothing frozen: a write to every staged loop filesystem completes.
        for v in self.model.volumes.values().filter(|v| v.staged && v.flavor.loop_filesystem()) {
            let probe = self.node.co(&format!("stage-{}", v.name)).join(".crash-probe");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let written = File::create(&probe).and_then(|mut f| f.write_all(b"probe").and_then(|()| f.sync_all()));
                let _ = tx.send(written.and_then(|()| fs::remove_file(&probe)));
            });
            match rx.recv_timeout(WRITE_TIMEOUT) {
                Ok(written) => written.unwrap_or_else(|e| panic!("writing to staged volume {}: {e}", v.name)),
                Err(_) => panic!("staged volume {} is frozen: a write did not complete in {WRITE_TIMEOUT:?}", v.name),
            }
        }
        // Nothing mounted twice.
        let base = self.node.base();
        let mut seen = BTreeMap::<PathBuf, u32>::new();
        for mount in mountinfo::read().expect("mountinfo") {
            if mount.mount_point.starts_with(&base) {
                *seen.entry(mount.mount_point).or_default() += 1;
            }
        }
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "mounted more than once: {twice:?}");
        // Every fsynced byte is still there.
        for v in self.model.volumes.values().filter(|v| v.published) {
            if let Some(data) = &v.data {
                let target = self.node.co(&format!("pub-{}", v.name));
                match read_data(&target, v.flavor, data.len()) {
                    Ok(read) if read == *data => {}
                    Ok(_) => panic!("volume {} ({:?}): its fsynced data changed", v.name, v.flavor),
                    Err(e) => panic!(
                        "volume {} ({:?}): its fsynced data cannot be read at {}: {e}\nmounts there: {:?}\n{}",
                        v.name,
                        v.flavor,
                        target.display(),
                        mountinfo::read()
                            .expect("mountinfo")
                            .iter()
                            .filter(|m| m.mount_point == target)
                            .collect::<Vec<_>>(),
                        self.node.log_tail()
                    ),
                }
            }
        }
    }

    /// Writes and fsyncs `len` fresh bytes through a publication: a random
    /// stamp mixed with each 8-byte word's place, so data moved within the
    /// volume does not read back the same.
    fn write(&mut self, slot: usize, len: usize) {
        let stamp = self.rng.next();
        let data: Vec<u8> = (0..len as u64 / 8).flat_map(|word| (stamp ^ word).to_le_bytes()).collect();
        let v = self.model.volumes.get_mut(&slot).expect("volume");
        let target = self.node.co(&format!("pub-{}", v.name));
        write_data(&target, v.flavor, &data).unwrap_or_else(|e| panic!("writing to {}: {e}", target.display()));
        v.data = Some(data);
    }

    /// A random kill for the next call, or none.
    fn plan_kill(&mut self, op: &Op) -> Option<Kill> {
        let reach = if self.rng.chance(50) { Reach::Group } else { Reach::Alone };
        if op.may_format(&self.model) && self.rng.chance(50) {
            return Some(Kill::DuringMkfs(self.rng.next() % 40, reach));
        }
        if self.rng.chance(35) {
            return Some(Kill::Timed(self.rng.next() % 150, reach));
        }
        None
    }

    fn kills(&self) -> u32 {
        self.tally.failpoint_kills + self.tally.timed_kills + self.tally.mkfs_kills
    }

    /// Removes everything through the driver, then checks nothing is left.
    async fn tear_down(&mut self) {
        self.restart(false).await;
        self.delete_everything().await;
        self.node.stop();
        assert_nothing_left(&self.node);
    }

    /// Unpublishes, unstages and deletes everything the model holds.
    async fn delete_everything(&mut self) {
        for index in (0..self.model.inline.len()).rev() {
            self.converge(&Op::InlineUnpublish { index }, None).await;
        }
        for index in (0..self.model.groups.len()).rev() {
            self.converge(&Op::DeleteGroup { index }, None).await;
        }
        for index in (0..self.model.snapshots.len()).rev() {
            self.converge(&Op::DeleteSnapshot { index }, None).await;
        }
        let slots: Vec<usize> = self.model.volumes.keys().copied().collect();
        for slot in slots {
            let v = self.model.volumes[&slot].clone();
            if v.published {
                self.converge(&Op::Unpublish { slot }, None).await;
            }
            if v.staged {
                self.converge(&Op::Unstage { slot }, None).await;
            }
            self.converge(&Op::Delete { slot }, None).await;
        }
    }
}

/// Kills `pid` (or its group) as `kill` says; returns how, if it did.
async fn killer(pid: i32, kill: Kill) -> Option<Reach> {
    let (after, reach) = match kill {
        Kill::Timed(ms, reach) => (ms, reach),
        Kill::DuringMkfs(ms, reach) => {
            loop {
                if mkfs_running(pid) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (ms, reach)
        }
    };
    tokio::time::sleep(Duration::from_millis(after)).await;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(if reach == Reach::Group { -pid } else { pid }, libc::SIGKILL) };
    Some(reach)
}

/// Whether a mkfs runs in the process group `pgid`.
fn mkfs_running(pgid: i32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else { return false };
    entries.flatten().any(|entry| {
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { return false };
        // pid (comm) state ppid pgrp ...
        let Some((comm, rest)) = stat.split_once(") ") else { return false };
        let group = rest.split_whitespace().nth(2).and_then(|g| g.parse::<i32>().ok());
        comm.contains("(mkfs") && group == Some(pgid)
    })
}

fn write_data(target: &Path, flavor: Flavor, data: &[u8]) -> std::io::Result<()> {
    if flavor == Flavor::Block {
        let device = OpenOptions::new().write(true).open(target)?;
        device.write_all_at(data, 0)?;
        return device.sync_all();
    }
    let mut file = File::create(target.join("data"))?;
    file.write_all(data)?;
    file.sync_all()
}

fn read_data(target: &Path, flavor: Flavor, len: usize) -> std::io::Result<Vec<u8>> {
    if flavor == Flavor::Block {
        let mut data = vec![0; len];
        File::open(target)?.read_exact_at(&mut data, 0)?;
        return Ok(data);
    }
    fs::read(target.join("data"))
}

/// What is left of `node` that a deleted volume, snapshot or copy should
/// have taken with it: loop devices on the root's images, mounts under the
/// test's directory, and under the root every file (records, images, a
/// copy's receive storage, an export's cut and its note) and every directory
/// an empty root does not have, but for the containers directly under the
/// root (some, such as ephemeral/, are made when first needed).
fn leftovers(node: &Node) -> Vec<String> {
    let base = node.base();
    let mut left: Vec<String> = loopdev::list()
        .expect("loop devices")
        .into_iter()
        .filter(|d| d.backing_file.starts_with(&base))
        .map(|d| format!("loop device {} on {}", d.device.display(), d.backing_file.display()))
        .collect();
    let mounts = mountinfo::read().expect("mountinfo").into_iter().filter(|m| m.mount_point.starts_with(&base));
    left.extend(mounts.map(|m| format!("mount at {}", m.mount_point.display())));
    let skeleton = node.skeleton.as_ref().expect("the driver started once");
    let root = node.root();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("listing the root").flatten() {
            let path = entry.path();
            if !entry.file_type().expect("file type").is_dir() {
                left.push(format!("file {}", path.display()));
            } else if skeleton.contains(&path) || dir == root {
                dirs.push(path);
            } else {
                left.push(format!("directory {}", path.display()));
            }
        }
    }
    left
}

/// Every directory under `root`.
fn directories(root: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("listing the root").flatten() {
            if entry.file_type().expect("file type").is_dir() {
                found.insert(entry.path());
                dirs.push(entry.path());
            }
        }
    }
    found
}

fn assert_nothing_left(node: &Node) {
    let left = leftovers(node);
    assert!(left.is_empty(), "left on node {} after everything was deleted: {left:#?}", node.id);
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text.parse().unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the real driver making real mounts in a private mount namespace"]
async fn random_operations_killed_at_random_points_converge_and_leave_nothing() {
    let seed = env_number("LOAM_CRASH_SEED", 12);
    let points = u32::try_from(env_number("LOAM_CRASH_POINTS", 200)).expect("LOAM_CRASH_POINTS fits in u32");
    let started = Instant::now();
    let mut run = Run::start(seed).await;
    let mut serial = 0;
    while run.kills() < points {
        let Some(op) = next_op(&mut run.rng, &run.model, &mut serial) else {
            let published: Vec<usize> =
                run.model.volumes.iter().filter(|(_, v)| v.published).map(|(s, _)| *s).collect();
            if let Some(slot) = run.rng.pick(&published).copied() {
                run.write(slot, WRITE_BYTES);
            }
            continue;
        };
        let kill = run.plan_kill(&op);
        run.converge(&op, kill).await;
        // A driver whose fault point was not reached for a while is
        // restarted, so every point gets its turn.
        if run.armed.is_some() && run.rng.chance(10) {
            run.restart(true).await;
            run.check().await;
        } else if run.armed.is_none() && run.rng.chance(15) {
            run.restart(true).await;
        }
    }
    run.tear_down().await;
    let t = &run.tally;
    println!(
        "crash harness: seed {seed}, {} kill points in {} operations ({} s): {} at fault points, {} timed, {} during \
         mkfs; {} of the driver alone, {} of its process group; {} retries; {} operations converged after a kill, \
         0 failed; fault points hit: {:?}",
        run.kills(),
        t.ops,
        started.elapsed().as_secs(),
        t.failpoint_kills,
        t.timed_kills,
        t.mkfs_kills,
        t.alone,
        t.group,
        t.retries,
        t.converged_after_kill,
        t.failpoints_hit
    );
}

#[test]
fn every_fault_point_the_harness_arms_is_in_the_code() {
    let mut source = String::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(dir).expect("src").flatten() {
            if entry.file_type().expect("type").is_dir() {
                dirs.push(entry.path());
            } else {
                source.push_str(&fs::read_to_string(entry.path()).expect("read"));
            }
        }
    }
    let armed: BTreeSet<&str> = FAILPOINTS
        .iter()
        .chain(COPY_FAILPOINTS)
        .chain(SNAPSHOT_COPY_FAILPOINTS)
        .chain(GROUP_FAILPOINTS)
        .copied()
        .collect();
    for point in &armed {
        assert!(source.contains(&format!("failpoint!(\"{point}\")")), "fault point {point} is not in src/");
    }
    let placed = source.matches("crate::failpoint!(\"").count();
    assert_eq!(placed, armed.len(), "src/ has fault points the harness never arms");
}

// ----- The crashes fault injection found, replayed -----

impl Run {
    /// Restarts the driver armed with the fault point `point`.
    async fn arm(&mut self, point: &str) {
        self.node.stop();
        self.armed = Some(point.to_owned());
        self.clients = self.node.start(Some(point)).await.expect("the driver starts");
    }

    /// Makes `op`, which must reach the armed fault point and die there.
    async fn die_in(&mut self, op: &Op) {
        assert!(matches!(self.attempt(op, None).await, Attempt::Died), "{op:?} did not reach {:?}", self.armed);
    }

    /// A new volume of `flavor` in `slot`, staged and published when asked.
    async fn volume(&mut self, slot: usize, flavor: Flavor, staged: bool, published: bool) {
        let create = Op::Create { slot, name: format!("vol-{slot}"), flavor, bytes: flavor.bytes(), source: None };
        self.converge(&create, None).await;
        if staged {
            self.converge(&Op::Stage { slot }, None).await;
        }
        if published {
            self.converge(&Op::Publish { slot }, None).await;
            self.write(slot, WRITE_BYTES);
        }
    }

    fn image(&self, slot: usize) -> PathBuf {
        let id = &self.model.volumes[&slot].id;
        self.node.root().join("volumes").join(format!("{}.img", id.split('@').next().expect("key")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the real driver making real mounts in a private mount namespace"]
async fn a_driver_killed_while_a_snapshot_holds_the_filesystem_frozen_thaws_it_at_start() {
    let mut run = Run::start(1).await;
    run.volume(0, Flavor::LoopThickExt4, true, true).await;
    run.volume(1, Flavor::LoopThinXfs, true, false).await;
    let snapshot = Op::Snapshot { name: "snap".into(), slot: 0 };
    run.arm("snapshot.frozen").await;
    run.die_in(&snapshot).await;
    run.restart(false).await;
    // Writes to the frozen filesystem would hang here.
    run.check().await;
    run.converge(&snapshot, None).await;

    let group = Op::Group { name: "group".into(), slots: vec![0, 1] };
    run.arm("group.frozen+group").await;
    run.die_in(&group).await;
    run.restart(false).await;
    run.check().await;
    run.converge(&group, None).await;
    run.check().await;
    run.tear_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the real driver making real mounts in a private mount namespace"]
async fn a_driver_killed_between_a_stage_mount_and_its_record_starts_and_the_retry_adopts_the_mount() {
    let mut run = Run::start(2).await;
    run.volume(0, Flavor::LoopThinExt4, false, false).await;
    run.volume(1, Flavor::Dir, true, true).await;
    let stage = Op::Stage { slot: 0 };
    run.arm("stage.mounted").await;
    run.die_in(&stage).await;
    // The node must serve its other volumes, and this one once retried.
    run.restart(false).await;
    run.check().await;
    run.converge(&stage, None).await;
    run.converge(&Op::Publish { slot: 0 }, None).await;
    run.write(0, WRITE_BYTES);
    run.check().await;
    run.tear_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the real driver making real mounts in a private mount namespace"]
async fn a_format_cut_short_is_done_again_but_data_loam_did_not_write_is_never_formatted() {
    let mut run = Run::start(3).await;
    for (slot, flavor) in [(0, Flavor::LoopThickExt4), (1, Flavor::LoopThinXfs)] {
        run.volume(slot, flavor, false, false).await;
        let stage = Op::Stage { slot };
        run.arm("loop.mkfs.started+group").await;
        run.die_in(&stage).await;
        // What mkfs had written when it died with the driver: part of the
        // first MiB, which is then neither blank nor a filesystem.
        let torn: Vec<u8> = (0..64u32 << 10).map(|i| u8::try_from(i % 251).expect("below 251") | 1).collect();
        let image = OpenOptions::new().write(true).open(run.image(slot)).expect("image");
        image.write_all_at(&torn, 0).expect("tear the image");
        image.sync_all().expect("sync");
        run.restart(false).await;
        run.converge(&stage, None).await;
        run.converge(&Op::Publish { slot }, None).await;
        run.write(slot, WRITE_BYTES);
        run.check().await;
    }

    // The same bytes in an image whose format Loam never started.
    run.volume(2, Flavor::LoopThinExt4, false, false).await;
    let image = OpenOptions::new().write(true).open(run.image(2)).expect("image");
    image.write_all_at(b"someone else's data", 4096).expect("write");
    image.sync_all().expect("sync");
    let mut clients = run.clients.clone();
    let refused = Op::Stage { slot: 2 }.call(&mut clients, &run.model, &run.node).await.err().expect("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("refusing to format"), "{refused:?}");
    run.tear_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the real driver making real mounts in a private mount namespace"]
async fn an_offline_resize_cut_short_is_repaired_and_growth_repeats() {
    let mut run = Run::start(4).await;
    run.volume(0, Flavor::LoopThinExt4, true, true).await;
    for grown in [80, 96, 112] {
        // Grown while staged: the filesystem grows offline at the next stage
        // (or online, where the driver has CAP_SYS_RESOURCE).
        run.converge(&Op::Expand { slot: 0, bytes: grown * MIB }, None).await;
        run.converge(&Op::Unpublish { slot: 0 }, None).await;
        run.converge(&Op::Unstage { slot: 0 }, None).await;
        let stage = Op::Stage { slot: 0 };
        if grown == 80 {
            run.arm("ext4.resized+group").await;
            if !matches!(run.attempt(&stage, None).await, Attempt::Died) {
                // Grown online already: nothing left to resize offline.
                run.restart(false).await;
            }
            run.restart(false).await;
        }
        run.converge(&stage, None).await;
        run.converge(&Op::Publish { slot: 0 }, None).await;
        run.check().await;
    }
    run.tear_down().await;
}

// ----- Copies between nodes -----

/// A kill during a copy between nodes.
#[derive(Debug, Clone, Copy)]
enum CopyKill {
    /// The target, armed with this fault point.
    TargetAt(&'static str),
    /// The target, this many milliseconds after its receive storage appears.
    Receiving(u64),
    /// The target, this many milliseconds after the note of the source's
    /// cut appears: while it waits for the cut and its stream.
    Waiting(u64),
    /// The source, armed with this fault point.
    SourceAt(&'static str),
    /// The source, this many milliseconds after the note of its cut appears:
    /// while the cut is made or streamed.
    Cutting(u64),
    /// The source, this many milliseconds after the target's receive
    /// storage appears: while it streams.
    Sending(u64),
}

impl CopyKill {
    /// The fault point it arms, and on which of `copy`'s nodes.
    fn armed(self, copy: &NodeCopy) -> Option<(&'static str, usize)> {
        match self {
            CopyKill::TargetAt(point) => Some((point, copy.to)),
            CopyKill::SourceAt(point) => Some((point, copy.from)),
            CopyKill::Receiving(_) | CopyKill::Waiting(_) | CopyKill::Cutting(_) | CopyKill::Sending(_) => None,
        }
    }
}

/// The kills the copy run cycles through, one per copy; `None` is the copy
/// retried while it runs.
const COPY_KILLS: usize = 7;

/// A new volume on node `to` filled from a volume or snapshot of node
/// `from`: what the controller asks of `to` when the topology rules out
/// the source's node.
#[derive(Debug, Clone)]
struct NodeCopy {
    name: String,
    flavor: Flavor,
    bytes: i64,
    source: Source,
    from: usize,
    to: usize,
}

/// Counts for the copy run's summary line.
#[derive(Debug, Default)]
struct CopyTally {
    copies: u32,
    from_snapshots: u32,
    target_kills: u32,
    source_kills: u32,
    retries: u32,
    converged_after_kill: u32,
    /// Targets killed after the copy's record, before their answer.
    recorded_before_kill: u32,
    aborted_while_running: u32,
}

/// Two node agents as deploy/ runs them (each its own root, socket and agent
/// endpoint, one token), and the harness as the controller between them.
struct Pair {
    runs: [Run; 2],
    rng: Rng,
    tally: CopyTally,
    /// How many fault-point kills of a source were planned, to take each
    /// point in turn.
    source_points: usize,
}

impl Pair {
    /// After one try of `what` (whose receiving node is `to`): counts the
    /// nodes that `died`, each killed by its armed fault point unless it was
    /// the one `fired` at, checks that the `armed` fault point was reached
    /// (unless the other node died first, at a point a restart armed it
    /// with), and restarts and checks every dead node.
    async fn bury(
        &mut self,
        died: [bool; 2],
        fired: Option<usize>,
        armed: Option<(&str, usize)>,
        to: usize,
        what: &str,
    ) {
        for (side, run) in self.runs.iter_mut().enumerate().filter(|(side, _)| died[*side]) {
            run.note("  -> died".to_owned());
            if fired != Some(side) {
                run.count_failpoint();
            }
            if side == to { self.tally.target_kills += 1 } else { self.tally.source_kills += 1 }
        }
        if let Some((point, side)) = armed {
            assert!(died[side] || died[1 - side], "{what} did not reach the fault point {point} it was armed with");
        }
        for side in [to, 1 - to] {
            if died[side] {
                self.runs[side].restart(true).await;
                self.runs[side].check().await;
            }
        }
    }

    /// Tears both agents down; the fault points they hit, summed.
    async fn tear_down(&mut self) -> BTreeMap<String, u32> {
        let mut hit = BTreeMap::new();
        for run in &mut self.runs {
            run.tear_down().await;
            for (point, n) in &run.tally.failpoints_hit {
                *hit.entry(point.clone()).or_default() += n;
            }
        }
        hit
    }
    /// Two agents whose restarts arm `points` at random.
    async fn start(seed: u64, points: &'static [&'static str]) -> Pair {
        let a = Run::on(Node::serving("copy-a", Serving::Agent), points, seed).await;
        let b = Run::on(Node::serving("copy-b", Serving::Agent), points, seed.rotate_left(32)).await;
        Pair { runs: [a, b], rng: Rng(seed.rotate_left(16)), tally: CopyTally::default(), source_points: 0 }
    }

    /// One copy: a source with data on one node, copied to the other under
    /// the round's kill, read back byte for byte, then everything deleted
    /// and nothing left on either node.
    async fn round(&mut self, round: usize) {
        let flavor = FLAVORS[round % FLAVORS.len()];
        let from = self.rng.below(2);
        let to = 1 - from;
        // A volume in use is cut at one instant only where its filesystem
        // can be frozen: on this root (no reflinks), a staged loop filesystem.
        let in_use = flavor.loop_filesystem() && self.rng.chance(50);
        let (kill, from_snapshot) = self.plan(round, flavor);
        // A few MiB, so the copy lasts beyond a timed kill's aim; more for
        // the copy retried while it runs, which the retry must not outlast.
        let len = if kill.is_none() { 12 << 20 } else { (1 + self.rng.below(3)) << 20 };

        let src = &mut self.runs[from];
        let name = format!("source-{round}");
        src.converge(&Op::Create { slot: 0, name, flavor, bytes: flavor.bytes(), source: None }, None).await;
        src.converge(&Op::Stage { slot: 0 }, None).await;
        src.converge(&Op::Publish { slot: 0 }, None).await;
        src.write(0, len);
        let expected = src.model.volumes[&0].data.clone().expect("written");
        let source = if from_snapshot {
            self.tally.from_snapshots += 1;
            src.converge(&Op::Snapshot { name: format!("snapshot-{round}"), slot: 0 }, None).await;
            // The copy is of the snapshot, not of what the volume holds since.
            src.write(0, len);
            Source::Snapshot(src.model.snapshots.last().expect("snapshot").id.clone())
        } else {
            Source::Volume(src.model.volumes[&0].id.clone())
        };
        if !in_use {
            src.converge(&Op::Unpublish { slot: 0 }, None).await;
            src.converge(&Op::Unstage { slot: 0 }, None).await;
        }

        let copy = NodeCopy { name: format!("copy-{round}"), flavor, bytes: flavor.bytes(), source, from, to };
        match kill {
            None => self.copy_retried_while_running(&copy).await,
            Some(kill) => self.copy(&copy, kill).await,
        }

        let dst = &mut self.runs[to];
        dst.converge(&Op::Stage { slot: 0 }, None).await;
        dst.converge(&Op::Publish { slot: 0 }, None).await;
        let target = dst.node.co(&format!("pub-{}", copy.name));
        let read = read_data(&target, flavor, expected.len())
            .unwrap_or_else(|e| panic!("{copy:?}: reading the copy at {}: {e}", target.display()));
        assert!(read == expected, "{copy:?}: the copy does not hold what its source held");

        for run in &mut self.runs {
            run.delete_everything().await;
        }
        self.settle().await;
    }

    /// The round's kill, and whether it copies a snapshot: each kind of
    /// kill in turn, so every run of a few rounds has them all; a cut, and
    /// the source's fault points, exist only when a volume is copied.
    fn plan(&mut self, round: usize, flavor: Flavor) -> (Option<CopyKill>, bool) {
        let from_snapshot = self.rng.chance(40);
        let kill = match round % COPY_KILLS {
            0 => return (None, from_snapshot),
            1 => CopyKill::TargetAt("volume.received"),
            2 => CopyKill::Receiving(self.rng.next() % 200),
            3 => {
                // Where a loop volume's cut is made, between freeze and thaw.
                let frozen = flavor != Flavor::Dir;
                let points: Vec<&'static str> = COPY_FAILPOINTS
                    .iter()
                    .copied()
                    .filter(|p| p.starts_with("export."))
                    .chain(frozen.then_some("snapshot.frozen"))
                    .collect();
                self.source_points += 1;
                return (Some(CopyKill::SourceAt(points[self.source_points % points.len()])), false);
            }
            4 => return (Some(CopyKill::Cutting(self.rng.next() % 100)), false),
            5 => return (Some(CopyKill::Waiting(self.rng.next() % 100)), false),
            _ => CopyKill::Sending(self.rng.next() % 200),
        };
        (Some(kill), from_snapshot)
    }

    /// The request the controller sends the target for `copy`, naming
    /// where the source's agent listens now.
    fn request(&self, copy: &NodeCopy) -> CreateVolumeFromRequest {
        let mut request = create_request(&copy.name, copy.flavor, copy.bytes, Some(&copy.source));
        let node = [(loam::config::TOPOLOGY_NODE_KEY.to_owned(), self.runs[copy.to].node.id.clone())].into();
        request.accessibility_requirements =
            Some(csi::TopologyRequirement { requisite: vec![csi::Topology { segments: node }], preferred: vec![] });
        let source_address = self.runs[copy.from].clients.address().to_string();
        CreateVolumeFromRequest { request: Some(request), source_address, source_node: String::new() }
    }

    /// Makes `copy` as the controller does, killing a node as `kill` says,
    /// until it converges: after a kill the node restarts (sometimes armed
    /// again) and the same request goes out again. A kill of the source
    /// must be answered ABORTED, which the CO retries; after a kill of the
    /// target, nothing of the copy may look like a finished volume.
    async fn copy(&mut self, copy: &NodeCopy, kill: CopyKill) {
        self.tally.copies += 1;
        let mut kill = Some(kill);
        let mut killed = false;
        for _ in 0..MAX_RETRIES {
            let planned = kill.take();
            let armed = planned.and_then(|kill| kill.armed(copy));
            if let Some((point, side)) = armed {
                self.runs[side].arm(point).await;
            }
            for run in &mut self.runs {
                run.note(format!("{copy:?}, kill {planned:?}, armed {:?}", run.armed));
            }
            let killer = planned.and_then(|kill| self.killer(copy, kill));
            let mut copies = self.runs[copy.to].clients.copies();
            let answer = tokio::time::timeout(CALL_TIMEOUT, copies.create_volume_from(self.request(copy)))
                .await
                .unwrap_or_else(|_| panic!("{copy:?} hung for {CALL_TIMEOUT:?}"));
            let fired = match killer {
                Some(task) => {
                    task.abort();
                    task.await.ok()
                }
                None => None,
            };
            let died = self.deaths(copy, answer.is_err() || fired.is_some()).await;
            self.bury(died, fired, armed, copy.to, &format!("{copy:?}")).await;
            match answer {
                Ok(made) => {
                    self.made(copy, made.into_inner());
                    if killed {
                        self.tally.converged_after_kill += 1;
                    }
                    return;
                }
                Err(_) if died[copy.to] => {
                    killed = true;
                    self.tally.retries += 1;
                    // At a fault point the copy was verified at most, never
                    // recorded; a timed kill may have come just after the
                    // record, which the answer did not outlive.
                    let recorded = fired == Some(copy.to);
                    if self.assert_no_unfinished_volume(copy, recorded).await {
                        self.tally.recorded_before_kill += 1;
                    } else {
                        // Its restart removed what the copy left, whether the
                        // CO retries or not: the target held nothing else.
                        assert_nothing_left(&self.runs[copy.to].node);
                    }
                }
                Err(status) if died[copy.from] => {
                    killed = true;
                    self.tally.retries += 1;
                    assert_eq!(status.code(), Code::Aborted, "{copy:?} whose source died: {status:?}");
                }
                Err(status) if status.code() == Code::Aborted => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!(
                    "{copy:?} {}answered {:?}: {}\ntarget's log:\n{}\nsource's log:\n{}",
                    if killed { "retried after a kill " } else { "" },
                    status.code(),
                    status.message(),
                    self.runs[copy.to].node.log_tail(),
                    self.runs[copy.from].node.log_tail()
                ),
            }
        }
        panic!("{copy:?} did not converge in {MAX_RETRIES} attempts");
    }

    /// Which of the copy's nodes died; `patient` when one may be dying.
    async fn deaths(&mut self, copy: &NodeCopy, patient: bool) -> [bool; 2] {
        let mut died = [false; 2];
        for side in [copy.to, copy.from] {
            let run = &mut self.runs[side];
            // The other node's death is seen at once once one is known.
            died[side] = if patient && !died.contains(&true) { run.node.died().await } else { run.node.dead() };
        }
        died
    }

    /// Starts the timed kill `kill` is, if it is one; the task answers the
    /// node it killed.
    fn killer(&self, copy: &NodeCopy, kill: CopyKill) -> Option<tokio::task::JoinHandle<usize>> {
        let receiving = self.runs[copy.to].node.root().join("volumes");
        let exports = self.runs[copy.from].node.root().join("exports");
        let (victim, after, started): (usize, u64, Box<dyn Fn() -> bool + Send>) = match kill {
            CopyKill::Receiving(ms) => (copy.to, ms, Box::new(move || receive_storage(&receiving))),
            CopyKill::Waiting(ms) => (copy.to, ms, Box::new(move || cut_noted(&exports))),
            CopyKill::Sending(ms) => (copy.from, ms, Box::new(move || receive_storage(&receiving))),
            CopyKill::Cutting(ms) => (copy.from, ms, Box::new(move || cut_noted(&exports))),
            CopyKill::TargetAt(_) | CopyKill::SourceAt(_) => return None,
        };
        Some(self.kill_when(victim, after, started))
    }

    /// Kills node `victim` with its process group `after` ms after `started`
    /// holds; the task answers the node it killed.
    fn kill_when(
        &self,
        victim: usize,
        after: u64,
        started: Box<dyn Fn() -> bool + Send>,
    ) -> tokio::task::JoinHandle<usize> {
        let pid = self.runs[victim].node.pid().expect("running");
        tokio::spawn(async move {
            while !started() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(after)).await;
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            victim
        })
    }

    /// After the target died during `copy` and started again: neither
    /// ListVolumes nor ControllerGetVolume (which the controller asks to find
    /// where a retried CreateVolume's volume is) shows a volume of the copy,
    /// unless it may have been `recorded` before the kill: then both show it,
    /// healthy, and the retry answers it (its bytes are checked after).
    /// Answers whether it was recorded.
    async fn assert_no_unfinished_volume(&mut self, copy: &NodeCopy, recorded: bool) -> bool {
        let dst = &mut self.runs[copy.to];
        let id = ObjectId::for_name(Kind::Volume, &copy.name, &dst.node.id).to_string();
        let listed = dst.clients.controller.list_volumes(csi::ListVolumesRequest::default()).await.expect("listing");
        let listed = listed.into_inner().entries.iter().any(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == id));
        let ask = csi::ControllerGetVolumeRequest { volume_id: id.clone() };
        match dst.clients.controller.controller_get_volume(ask).await {
            Err(status) if status.code() == Code::NotFound => {
                assert!(!listed, "{copy:?} after its target died: listed as {id}, but not found");
                false
            }
            Ok(found) => {
                assert!(recorded, "{copy:?} killed before its record: found as {id}");
                assert!(listed, "{copy:?} after its target died: found as {id}, but not listed");
                let condition = found.into_inner().status.and_then(|s| s.volume_condition);
                assert!(condition.as_ref().is_some_and(|c| !c.abnormal), "{copy:?} recorded as {id}: {condition:?}");
                true
            }
            Err(status) => panic!("{copy:?} after its target died: {status:?}"),
        }
    }

    /// Makes `copy` while the CO, its call timed out, sends the same request
    /// again: the retry is ABORTED with how far the copy got, and the copy
    /// goes on.
    async fn copy_retried_while_running(&mut self, copy: &NodeCopy) {
        self.tally.copies += 1;
        // No fault point may cut this copy short.
        for run in &mut self.runs {
            if run.armed.is_some() {
                run.restart(false).await;
            }
        }
        let request = self.request(copy);
        let mut first = self.runs[copy.to].clients.copies();
        let running = tokio::spawn({
            let request = request.clone();
            async move { first.create_volume_from(request).await }
        });
        let receiving = self.runs[copy.to].node.root().join("volumes");
        let deadline = Instant::now() + CALL_TIMEOUT;
        while !receive_storage(&receiving) {
            assert!(!running.is_finished(), "{copy:?} ended before it received anything: {:?}", running.await);
            assert!(Instant::now() < deadline, "{copy:?} never started receiving");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let again = self.runs[copy.to].clients.copies().create_volume_from(request).await;
        let status = again.expect_err("a retry while the copy runs");
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        assert!(status.message().contains("being copied from"), "{}", status.message());
        self.tally.aborted_while_running += 1;
        let made = tokio::time::timeout(CALL_TIMEOUT, running).await.expect("the copy ends").expect("joined");
        self.made(copy, made.unwrap_or_else(|e| panic!("{copy:?}: {e:?}")).into_inner());
    }

    /// Records the volume `copy` made in its target's model.
    fn made(&mut self, copy: &NodeCopy, made: csi::CreateVolumeResponse) {
        let create = Op::Create {
            slot: 0,
            name: copy.name.clone(),
            flavor: copy.flavor,
            bytes: copy.bytes,
            source: Some(copy.source.clone()),
        };
        create.apply(&mut self.runs[copy.to].model, Made::Volume(made.volume.expect("volume").volume_id));
    }

    /// Waits until both nodes hold nothing (a source removes its cut once
    /// the stream ends, just after the target answered), failing after 10 s.
    async fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for run in &self.runs {
            while !leftovers(&run.node).is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_nothing_left(&run.node);
        }
    }
}

/// Whether a cut for a copy is noted in `exports`: it is being made or sent.
fn cut_noted(exports: &Path) -> bool {
    fs::read_dir(exports).is_ok_and(|mut entries| entries.next().is_some())
}

/// Whether a copy is being received under `volumes`: the temporary name a
/// volume's storage is filled under.
fn receive_storage(volumes: &Path) -> bool {
    let Ok(entries) = fs::read_dir(volumes) else { return false };
    entries.flatten().any(|e| e.file_name().to_str().is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the real driver making real mounts in a private mount namespace"]
async fn copies_between_nodes_killed_on_either_side_converge_verified_and_leave_nothing() {
    let seed = env_number("LOAM_CRASH_SEED", 12);
    let rounds = usize::try_from(env_number("LOAM_CRASH_COPIES", 24)).expect("LOAM_CRASH_COPIES fits in usize");
    let started = Instant::now();
    let mut pair = Pair::start(seed, COPY_FAILPOINTS).await;
    for round in 0..rounds {
        pair.round(round).await;
    }
    let hit = pair.tear_down().await;
    let t = &pair.tally;
    println!(
        "crash harness, copies between nodes: seed {seed}, {} copies ({} from snapshots, {} s): {} kills of the \
         target ({} just after its record), {} of the source; {} retries; {} copies converged after a kill, {} \
         retries while running answered ABORTED, 0 failed; fault points hit: {hit:?}",
        t.copies,
        t.from_snapshots,
        started.elapsed().as_secs(),
        t.target_kills,
        t.recorded_before_kill,
        t.source_kills,
        t.retries,
        t.converged_after_kill,
        t.aborted_while_running,
    );
}

// ----- Snapshots kept off node -----

/// A kill while a snapshot kept off node is made.
#[derive(Debug, Clone, Copy)]
enum SnapshotKill {
    /// The snapshot's node, armed with this fault point.
    SourceAt(&'static str),
    /// The copy's node, armed with this fault point.
    CopyAt(&'static str),
    /// The copy's node, this many milliseconds after it noted the copy:
    /// while it receives it.
    Receiving(u64),
    /// The snapshot's node, this many milliseconds after the copy's node
    /// noted the copy: while it sends it.
    Sending(u64),
}

/// How many kinds of round the run cycles through (one without a kill).
const SNAPSHOT_KILLS: usize = 7;

/// A snapshot kept off node: cut on node `from` of volume `volume`, its
/// copy on node `to`.
#[derive(Debug, Clone)]
struct OffNode {
    name: String,
    flavor: Flavor,
    volume: String,
    from: usize,
    to: usize,
}

/// Where one try of the controller's three steps got.
struct Tried {
    /// The ready snapshot, or the status that ended the try.
    answer: Result<csi::Snapshot, tonic::Status>,
    /// Whether the copy's node answered CopySnapshot: its copy is recorded.
    copied: bool,
}

/// Whether a copy of a snapshot is noted on the node whose root is `root`:
/// it is being received (or was, and a crash left it).
fn snapshot_copy_noted(root: &Path) -> bool {
    fs::read_dir(root.join("snapshot-copies")).is_ok_and(|mut entries| entries.next().is_some())
}

/// What a node stores of snapshot `key`: an image, or a directory's files
/// by path.
fn snapshot_content(root: &Path, key: &str) -> BTreeMap<PathBuf, Vec<u8>> {
    let snapshots = root.join("snapshots");
    let image = snapshots.join(format!("{key}.img"));
    if image.exists() {
        return [(PathBuf::from("image"), fs::read(&image).expect("image"))].into();
    }
    let top = snapshots.join(key);
    let mut found = BTreeMap::new();
    let mut dirs = vec![top.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
            let path = entry.path();
            let relative = path.strip_prefix(&top).expect("under the snapshot").to_owned();
            if entry.file_type().expect("type").is_dir() {
                found.insert(relative, Vec::new());
                dirs.push(path);
            } else {
                found.insert(relative, fs::read(&path).expect("file"));
            }
        }
    }
    found
}

impl Pair {
    /// One snapshot kept off node: a volume with data on one node, the
    /// snapshot made as the controller makes it under the round's kill, its
    /// copy compared with it, then everything deleted and nothing left.
    async fn snapshot_round(&mut self, round: usize) {
        let flavor = FLAVORS[round % FLAVORS.len()];
        let from = self.rng.below(2);
        let to = 1 - from;
        let (kill, in_use) = self.snapshot_plan(round, flavor);
        let len = (1 + self.rng.below(3)) << 20;

        let src = &mut self.runs[from];
        let name = format!("protected-{round}");
        src.converge(&Op::Create { slot: 0, name, flavor, bytes: flavor.bytes(), source: None }, None).await;
        src.converge(&Op::Stage { slot: 0 }, None).await;
        src.converge(&Op::Publish { slot: 0 }, None).await;
        src.write(0, len);
        if !in_use {
            src.converge(&Op::Unpublish { slot: 0 }, None).await;
            src.converge(&Op::Unstage { slot: 0 }, None).await;
        }
        let volume = src.model.volumes[&0].id.clone();
        let snap = OffNode { name: format!("snapshot-{round}"), flavor, volume, from, to };
        let snapshot = self.protect(&snap, kill).await;

        let id = SnapshotId::parse(&snapshot.snapshot_id)
            .unwrap_or_else(|| panic!("{snap:?}: snapshot id {}", snapshot.snapshot_id));
        let (node, copy_node) = (&self.runs[from].node.id, &self.runs[to].node.id);
        assert!(id.node == *node && id.copy.as_ref() == Some(copy_node), "{snap:?}: {}", snapshot.snapshot_id);
        let key = id.key.to_string();
        let original = snapshot_content(&self.runs[from].node.root(), &key);
        let copy = snapshot_content(&self.runs[to].node.root(), &key);
        assert!(!original.is_empty(), "{snap:?}: the snapshot holds something");
        assert!(original == copy, "{snap:?}: the copy does not hold what the snapshot holds");

        // The copy first, as the controller deletes them; the snapshot itself
        // with everything else on its node.
        let delete = csi::DeleteSnapshotRequest { snapshot_id: snapshot.snapshot_id.clone(), ..Default::default() };
        self.runs[to].clients.controller.delete_snapshot(delete).await.expect("deleting the copy");
        let (flavor, bytes) = (snap.flavor, snap.flavor.bytes());
        self.runs[from].model.snapshots.push(Snapshot { id: snapshot.snapshot_id, flavor, bytes });
        for run in &mut self.runs {
            run.delete_everything().await;
        }
        self.settle().await;
    }

    /// The round's kill, each kind in turn, and whether the volume is in use
    /// (staged) while it is cut: a staged loop filesystem is frozen around
    /// the cut, so the kill at `snapshot.frozen` needs one.
    fn snapshot_plan(&mut self, round: usize, flavor: Flavor) -> (Option<SnapshotKill>, bool) {
        let in_use = flavor.loop_filesystem() && self.rng.chance(50);
        let kill = match round % SNAPSHOT_KILLS {
            0 => None,
            1 => Some(SnapshotKill::SourceAt("snapshot.cut")),
            2 if flavor.loop_filesystem() => return (Some(SnapshotKill::SourceAt("snapshot.frozen")), true),
            2 => Some(SnapshotKill::SourceAt("snapshot.cut")),
            3 => Some(SnapshotKill::SourceAt("snapshot.awaiting")),
            4 => Some(SnapshotKill::CopyAt("snapshot.copy.received")),
            5 => Some(SnapshotKill::Receiving(self.rng.next() % 100)),
            _ => Some(SnapshotKill::Sending(self.rng.next() % 100)),
        };
        (kill, in_use)
    }

    /// CreateSnapshot with `protection: off-node` as the controller makes it
    /// (`Copies.CutSnapshot` on the snapshot's node naming the copy's, then
    /// `Copies.CopySnapshot` there, then `Copies.CutSnapshot` again telling
    /// it the copy is held), killing a node as `kill` says, retried from the
    /// start until it answers a ready snapshot. A killed copy's node, its
    /// copy not recorded, holds nothing once it has started again, before
    /// any retry.
    async fn protect(&mut self, snap: &OffNode, kill: Option<SnapshotKill>) -> csi::Snapshot {
        self.tally.copies += 1;
        let mut kill = kill;
        let mut killed = false;
        for _ in 0..MAX_RETRIES {
            let planned = kill.take();
            let armed = match planned {
                Some(SnapshotKill::SourceAt(point)) => Some((point, snap.from)),
                Some(SnapshotKill::CopyAt(point)) => Some((point, snap.to)),
                _ => None,
            };
            if let Some((point, side)) = armed {
                self.runs[side].arm(point).await;
            }
            for run in &mut self.runs {
                run.note(format!("{snap:?}, kill {planned:?}, armed {:?}", run.armed));
            }
            let noted = self.runs[snap.to].node.root();
            let noted: Box<dyn Fn() -> bool + Send> = Box::new(move || snapshot_copy_noted(&noted));
            let killer = match planned {
                Some(SnapshotKill::Receiving(ms)) => Some(self.kill_when(snap.to, ms, noted)),
                Some(SnapshotKill::Sending(ms)) => Some(self.kill_when(snap.from, ms, noted)),
                _ => None,
            };
            let tried = tokio::time::timeout(CALL_TIMEOUT * 3, self.try_protect(snap))
                .await
                .unwrap_or_else(|_| panic!("{snap:?} hung"));
            let fired = match killer {
                Some(task) => {
                    task.abort();
                    task.await.ok()
                }
                None => None,
            };
            let died = self.snapshot_deaths(snap, tried.answer.is_err() || fired.is_some()).await;
            self.bury(died, fired, armed, snap.to, &format!("{snap:?}")).await;
            if died[snap.to] && !tried.copied {
                // Killed before its answer: at the fault point the copy was
                // never recorded; a timed kill may have come just after.
                let records = self.runs[snap.to].node.root().join("meta/snapshots");
                let recorded = fs::read_dir(&records).is_ok_and(|mut e| e.next().is_some());
                assert!(!(recorded && fired != Some(snap.to)), "{snap:?}: recorded before its fault point");
                if recorded {
                    self.tally.recorded_before_kill += 1;
                } else {
                    assert_nothing_left(&self.runs[snap.to].node);
                }
            }
            match tried.answer {
                Ok(snapshot) => {
                    assert!(snapshot.ready_to_use, "{snap:?}: {snapshot:?}");
                    if killed {
                        self.tally.converged_after_kill += 1;
                    }
                    return snapshot;
                }
                Err(_) if died.contains(&true) => {
                    killed = true;
                    self.tally.retries += 1;
                }
                Err(status) if status.code() == Code::Aborted => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!(
                    "{snap:?} {}answered {:?}: {}\nsnapshot node's log:\n{}\ncopy node's log:\n{}",
                    if killed { "retried after a kill " } else { "" },
                    status.code(),
                    status.message(),
                    self.runs[snap.from].node.log_tail(),
                    self.runs[snap.to].node.log_tail()
                ),
            }
        }
        panic!("{snap:?} did not converge in {MAX_RETRIES} attempts");
    }

    /// One try of the controller's three steps.
    async fn try_protect(&self, snap: &OffNode) -> Tried {
        let request = csi::CreateSnapshotRequest {
            name: snap.name.clone(),
            source_volume_id: snap.volume.clone(),
            parameters: [("protection".to_owned(), "off-node".to_owned())].into(),
            ..Default::default()
        };
        let copy_nodes = vec![self.runs[snap.to].node.id.clone()];
        let cut = CutSnapshotRequest { request: Some(request.clone()), copy_nodes, ..Default::default() };
        let snapshot = match self.runs[snap.from].clients.copies().cut_snapshot(cut).await {
            Ok(answer) => answer.into_inner().snapshot.expect("a snapshot"),
            Err(status) => return Tried { answer: Err(status), copied: false },
        };
        if snapshot.ready_to_use {
            return Tried { answer: Ok(snapshot), copied: true };
        }
        let source_address = self.runs[snap.from].clients.address().to_string();
        let copy = CopySnapshotRequest { snapshot: Some(snapshot), name: snap.name.clone(), source_address };
        if let Err(status) = self.runs[snap.to].clients.copies().copy_snapshot(copy).await {
            return Tried { answer: Err(status), copied: false };
        }
        let confirm = CutSnapshotRequest { request: Some(request), copy_held: true, ..Default::default() };
        let answer = self.runs[snap.from].clients.copies().cut_snapshot(confirm).await;
        Tried { answer: answer.map(|a| a.into_inner().snapshot.expect("a snapshot")), copied: true }
    }

    /// Which of the snapshot's nodes died; `patient` when one may be dying.
    async fn snapshot_deaths(&mut self, snap: &OffNode, patient: bool) -> [bool; 2] {
        let mut died = [false; 2];
        for side in [snap.to, snap.from] {
            let run = &mut self.runs[side];
            died[side] = if patient && !died.contains(&true) { run.node.died().await } else { run.node.dead() };
        }
        died
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the real driver making real mounts in a private mount namespace"]
async fn snapshots_kept_off_node_killed_on_either_side_converge_and_leave_nothing() {
    let seed = env_number("LOAM_CRASH_SEED", 12);
    let rounds = usize::try_from(env_number("LOAM_CRASH_SNAPSHOT_COPIES", 12)).expect("fits in usize");
    let started = Instant::now();
    let mut pair = Pair::start(seed, SNAPSHOT_COPY_FAILPOINTS).await;
    for round in 0..rounds {
        pair.snapshot_round(round).await;
    }
    let hit = pair.tear_down().await;
    let t = &pair.tally;
    println!(
        "crash harness, snapshots kept off node: seed {seed}, {} snapshots ({} s): {} kills of the copy's node ({} \
         just after its record), {} of the snapshot's; {} retries; {} converged after a kill, 0 failed; fault \
         points hit: {hit:?}",
        t.copies,
        started.elapsed().as_secs(),
        t.target_kills,
        t.recorded_before_kill,
        t.source_kills,
        t.retries,
        t.converged_after_kill,
    );
}

// ----- Group snapshots across nodes -----

/// The fault points of a group snapshot cut across nodes (each node's part
/// of it), armed by the group run only.
const GROUP_FAILPOINTS: &[&str] = &["group.part.frozen", "group.part.intent", "group.part.cut", "group.part.recorded"];

/// The agents' endpoints as the harness's controller finds them, set again
/// after every restart (a restarted agent listens on a new port).
#[derive(Debug, Default)]
struct Endpoints(std::sync::Mutex<Vec<SocketAddr>>);

impl Discovery for Endpoints {
    fn addresses(&self) -> Pin<Box<dyn Future<Output = Vec<SocketAddr>> + Send + '_>> {
        let addresses = self.0.lock().expect("endpoints").clone();
        Box::pin(async move { addresses })
    }
}

/// The controller's code, in the harness, over the pair's agents.
struct Coordinator {
    router: Router,
    endpoints: Arc<Endpoints>,
}

impl Coordinator {
    fn new() -> Coordinator {
        let endpoints = Arc::new(Endpoints::default());
        let token = Token::parse(TOKEN).expect("a valid token");
        let tls = tls::client_config(&token, Role::Controller).expect("the controller's certificate");
        let timeouts =
            Timeouts { connect: Duration::from_secs(5), call: CALL_TIMEOUT, refresh: Duration::from_secs(3600) };
        let agents = Agents::new("loam.csi.dev".into(), endpoints.clone(), &token, tls, timeouts);
        Coordinator { router: Router::new(Arc::new(agents), None), endpoints }
    }

    fn find(&self, runs: &[Run; 2]) {
        *self.endpoints.0.lock().expect("endpoints") = runs.iter().map(|r| r.clients.address()).collect();
    }
}

impl Pair {
    /// One group snapshot of a volume on each node, cut by the controller's
    /// code under the round's kill and retried until it is made; each member
    /// restored on its node and read back, then the group and everything
    /// else deleted and nothing left on either node.
    async fn group_round(&mut self, round: usize, coordinator: &Coordinator) {
        let flavor = FLAVORS[round % FLAVORS.len()];
        // Staged loop filesystems are frozen for the cut; other volumes in
        // use are cut as copies on this root, which a group refuses.
        let in_use = flavor.loop_filesystem() && self.rng.chance(50);
        let len = (1 + self.rng.below(2)) << 20;
        let mut sources = Vec::new();
        let mut expected = Vec::new();
        for run in &mut self.runs {
            let name = format!("member-{round}");
            run.converge(&Op::Create { slot: 0, name, flavor, bytes: flavor.bytes(), source: None }, None).await;
            run.converge(&Op::Stage { slot: 0 }, None).await;
            run.converge(&Op::Publish { slot: 0 }, None).await;
            run.write(0, len);
            if !in_use {
                run.converge(&Op::Unpublish { slot: 0 }, None).await;
                run.converge(&Op::Unstage { slot: 0 }, None).await;
            }
            sources.push(run.model.volumes[&0].id.clone());
            expected.push(run.model.volumes[&0].data.clone().expect("written"));
        }
        let kill = match round % (GROUP_FAILPOINTS.len() + 1) {
            0 => None,
            i => Some((GROUP_FAILPOINTS[i - 1], self.rng.below(2))),
        };
        let name = format!("group-{round}");
        let group = self.cut_group(coordinator, &name, &sources, kill, in_use).await;

        assert!(group.ready_to_use, "{name}: {group:?}");
        assert!(group.group_snapshot_id.ends_with(&format!("@{}", self.runs[0].node.id)), "{group:?}");
        assert_eq!(group.snapshots.len(), 2, "{name}: {group:?}");
        for (side, member) in group.snapshots.iter().enumerate() {
            let run = &mut self.runs[side];
            assert!(member.snapshot_id.ends_with(&format!("@{}", run.node.id)), "{name}: {member:?}");
            let restore = Op::Create {
                slot: 1,
                name: format!("restored-{round}"),
                flavor,
                bytes: flavor.bytes(),
                source: Some(Source::Snapshot(member.snapshot_id.clone())),
            };
            run.converge(&restore, None).await;
            run.converge(&Op::Stage { slot: 1 }, None).await;
            run.converge(&Op::Publish { slot: 1 }, None).await;
            let target = run.node.co(&format!("pub-restored-{round}"));
            let read = read_data(&target, flavor, expected[side].len())
                .unwrap_or_else(|e| panic!("{name}: reading member {side} at {}: {e}", target.display()));
            assert!(read == expected[side], "{name}: member {side} does not hold what its volume held at the cut");
        }

        coordinator.find(&self.runs);
        let delete = csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            ..Default::default()
        };
        coordinator.router.delete_group(delete).await.unwrap_or_else(|e| panic!("{name}: deleting: {e}"));
        for run in &mut self.runs {
            run.delete_everything().await;
        }
        self.settle().await;
    }

    /// CreateVolumeGroupSnapshot through the controller's code, a node
    /// killed at `kill`'s fault point on the first try, retried until the
    /// group is made. After every failed try nothing stays frozen on either
    /// node, and a restarted node repairs what its kill left.
    async fn cut_group(
        &mut self,
        coordinator: &Coordinator,
        name: &str,
        sources: &[String],
        kill: Option<(&'static str, usize)>,
        in_use: bool,
    ) -> csi::VolumeGroupSnapshot {
        self.tally.copies += 1;
        let mut kill = kill;
        let mut killed = false;
        let nodes: Vec<String> = self.runs.iter().map(|r| r.node.id.clone()).collect();
        for _ in 0..MAX_RETRIES {
            let armed = kill.take();
            if let Some((point, side)) = armed {
                self.runs[side].arm(point).await;
            }
            for run in &mut self.runs {
                run.note(format!("{name} of {sources:?} (in use {in_use}), armed {:?}", run.armed));
            }
            coordinator.find(&self.runs);
            let request = csi::CreateVolumeGroupSnapshotRequest {
                name: name.to_owned(),
                source_volume_ids: sources.to_vec(),
                ..Default::default()
            };
            let tried =
                tokio::time::timeout(CALL_TIMEOUT * 3, coordinator.router.create_group_across(request, nodes.clone()))
                    .await
                    .unwrap_or_else(|_| panic!("{name} hung"));
            let mut died = [false; 2];
            for side in 0..2 {
                let run = &mut self.runs[side];
                died[side] =
                    if tried.is_err() && !died.contains(&true) { run.node.died().await } else { run.node.dead() };
            }
            self.bury(died, None, armed, 1, name).await;
            // The node that lived thawed when the cut ended.
            for run in &mut self.runs {
                run.check().await;
            }
            match tried {
                Ok(made) => {
                    if killed {
                        self.tally.converged_after_kill += 1;
                    }
                    return made.group_snapshot.expect("a group snapshot");
                }
                Err(_) if died.contains(&true) => {
                    killed = true;
                    self.tally.retries += 1;
                }
                Err(e) if e.code() == Code::Aborted || e.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!(
                    "{name} {}answered {:?}: {e}\ncoordinator's log:\n{}\nother node's log:\n{}",
                    if killed { "retried after a kill " } else { "" },
                    e.code(),
                    self.runs[0].node.log_tail(),
                    self.runs[1].node.log_tail()
                ),
            }
        }
        panic!("{name} did not converge in {MAX_RETRIES} attempts");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the real driver making real mounts in a private mount namespace"]
async fn group_snapshots_across_nodes_killed_on_either_node_converge_restore_and_leave_nothing() {
    let seed = env_number("LOAM_CRASH_SEED", 12);
    let rounds = usize::try_from(env_number("LOAM_CRASH_GROUPS", 10)).expect("fits in usize");
    let started = Instant::now();
    let mut pair = Pair::start(seed, GROUP_FAILPOINTS).await;
    let coordinator = Coordinator::new();
    for round in 0..rounds {
        pair.group_round(round, &coordinator).await;
    }
    let hit = pair.tear_down().await;
    let t = &pair.tally;
    println!(
        "crash harness, group snapshots across nodes: seed {seed}, {} groups ({} s): {} kills of the coordinator, {} \
         of the other node; {} retries; {} converged after a kill, 0 failed; fault points hit: {hit:?}",
        t.copies,
        started.elapsed().as_secs(),
        t.source_kills,
        t.target_kills,
        t.retries,
        t.converged_after_kill,
    );
}
