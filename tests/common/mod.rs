//! A real Loam server on a temporary socket, driven through the generated
//! CSI clients, and cleaned up (mounts included) even when a test fails.

#![allow(dead_code, unused_macros)] // Each test binary uses a different part of the harness.

pub mod quota_fs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use loam::config::{Config, QuotaMode};
use loam::csi;
use loam::csi::controller_client::ControllerClient;
use loam::csi::group_controller_client::GroupControllerClient;
use loam::csi::identity_client::IdentityClient;
use loam::csi::node_client::NodeClient;
use loam::driver::Driver;
use loam::kernel::fake::FakeQuota;
use loam::kernel::{FakeKernel, HostKernel, Kernel};
use loam::kernel::{loopdev, mountinfo};
use loam::server::Services;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

/// The node id every test server uses.
pub const NODE: &str = "test-node";

/// A byte count as CSI carries it (signed 64 bits).
pub fn bytes(n: u64) -> i64 {
    i64::try_from(n).expect("a test size fits in i64")
}

/// Whether real mounts may be made: root in a private mount namespace, as
/// the README's test command runs the suite.
pub fn privileged() -> bool {
    std::env::var("LOAM_PRIVILEGED_TESTS").is_ok_and(|v| v == "1")
}

/// A running server and clients connected to it.
pub struct Harness {
    /// Temporary directory holding the root, the socket and CO paths.
    pub dir: tempfile::TempDir,
    /// Identity client.
    pub identity: IdentityClient<Channel>,
    /// Controller client.
    pub controller: ControllerClient<Channel>,
    /// GroupController client.
    pub group: GroupControllerClient<Channel>,
    /// Node client.
    pub node: NodeClient<Channel>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    real_mounts: bool,
    quota: QuotaMode,
}

impl Harness {
    /// Starts a server with real mounts when privileged, a fake otherwise.
    pub async fn start() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        Harness::start_in(dir, privileged(), 0, QuotaMode::Auto).await
    }

    /// Starts a server whose root is `dir/root` (already prepared, e.g. a
    /// mounted test filesystem) with the given quota mode.
    pub async fn start_with_quota(dir: tempfile::TempDir, quota: QuotaMode) -> Harness {
        Harness::start_in(dir, privileged(), 0, quota).await
    }

    /// Starts a server with a limit on attached volumes.
    pub async fn start_with_limit(max_volumes_per_node: u32) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        Harness::start_in(dir, privileged(), max_volumes_per_node, QuotaMode::Auto).await
    }

    async fn start_in(dir: tempfile::TempDir, real_mounts: bool, max: u32, quota: QuotaMode) -> Harness {
        let root = dir.path().canonicalize().expect("canonical").join("root");
        let socket = dir.path().join("csi.sock");
        let config =
            Config { driver_name: "loam.csi.dev".into(), node_id: NODE.into(), root, max_volumes_per_node: max, quota };
        // Unprivileged, the fake still reports what the host's filesystem
        // can enforce, so quota messages are the operator's real ones.
        let kernel: Arc<dyn Kernel> =
            if real_mounts { Arc::new(HostKernel) } else { Arc::new(FakeKernel::with_quota(FakeQuota::Host)) };
        let driver = Arc::new(Driver::open(config, kernel).expect("open driver"));
        let listener = bind_after_restart(&socket).await;
        let (tx, rx) = oneshot::channel();
        let server = tokio::spawn(async move {
            loam::server::run(listener, Services::All(driver), async {
                let _ = rx.await;
            })
            .await
            .expect("server");
        });
        let channel = connect(&socket).await;
        Harness {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            group: GroupControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
            dir,
            shutdown: Some(tx),
            server: Some(server),
            real_mounts,
            quota,
        }
    }

    /// Stops the server (draining it) and starts a new one on the same root,
    /// as a node agent restart would.
    pub async fn restart(mut self) -> Harness {
        self.stop_server().await;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        let (real, quota) = (self.real_mounts, self.quota);
        // The old harness must not unmount the new one's mounts.
        self.real_mounts = false;
        drop(self);
        Harness::start_in(dir, real, 0, quota).await
    }

    async fn stop_server(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task");
        }
    }

    /// The driver's root.
    pub fn root(&self) -> PathBuf {
        self.dir.path().canonicalize().expect("canonical").join("root")
    }

    /// A CO-side path (staging or target) in the test's directory.
    pub fn co_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("co").join(name)
    }

    /// Creates a volume of `bytes` called `name`; returns its id.
    pub async fn create(&mut self, name: &str, bytes: i64) -> String {
        let resp = self.controller.create_volume(create_request(name, bytes)).await.expect("create volume");
        resp.into_inner().volume.expect("volume").volume_id
    }

    /// Takes a snapshot of `source` called `name`.
    pub async fn snapshot(&mut self, source: &str, name: &str) -> Result<csi::Snapshot, tonic::Status> {
        let request =
            csi::CreateSnapshotRequest { source_volume_id: source.into(), name: name.into(), ..Default::default() };
        Ok(self.controller.create_snapshot(request).await?.into_inner().snapshot.expect("snapshot"))
    }

    /// Snapshots `sources` together as the group snapshot called `name`.
    pub async fn group_snapshot(
        &mut self,
        name: &str,
        sources: &[&str],
    ) -> Result<csi::VolumeGroupSnapshot, tonic::Status> {
        let request = csi::CreateVolumeGroupSnapshotRequest {
            name: name.into(),
            source_volume_ids: sources.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let response = self.group.create_volume_group_snapshot(request).await?.into_inner();
        Ok(response.group_snapshot.expect("group snapshot"))
    }

    /// Creates a volume from a full request; returns the volume.
    pub async fn create_volume(&mut self, request: csi::CreateVolumeRequest) -> Result<csi::Volume, tonic::Status> {
        Ok(self.controller.create_volume(request).await?.into_inner().volume.expect("volume"))
    }

    /// Stages `id` at `staging` as a filesystem volume.
    pub async fn stage(&mut self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.stage_as(id, staging, mount_capability(Access::Writer)).await
    }

    /// Stages `id` at `staging` with `capability`.
    pub async fn stage_as(
        &mut self,
        id: &str,
        staging: &Path,
        capability: csi::VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: path_str(staging),
                volume_capability: Some(capability),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    /// Publishes filesystem volume `id` from `staging` at `target`.
    pub async fn publish(
        &mut self,
        id: &str,
        staging: &Path,
        target: &Path,
        mode: Access,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.publish_as(id, staging, target, mount_capability(mode), readonly).await
    }

    /// Publishes `id` from `staging` at `target` with `capability`.
    pub async fn publish_as(
        &mut self,
        id: &str,
        staging: &Path,
        target: &Path,
        capability: csi::VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: path_str(staging),
                target_path: path_str(target),
                volume_capability: Some(capability),
                readonly,
                ..Default::default()
            })
            .await
            .map(drop)
    }

    /// Unpublishes `id` from `target`.
    pub async fn unpublish(&mut self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: path_str(target),
            })
            .await
            .map(drop)
    }

    /// Unstages `id` from `staging`.
    pub async fn unstage(&mut self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: path_str(staging),
            })
            .await
            .map(drop)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if self.real_mounts {
            unmount_under(self.dir.path());
        }
    }
}

/// Detaches every mount under `dir`, deepest first, then every loop device
/// backed by a file under it, so a failed test leaves nothing behind.
fn unmount_under(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else { return };
    for entry in mountinfo::read().unwrap_or_default().iter().rev().filter(|m| m.mount_point.starts_with(&dir)) {
        let _ = nix::mount::umount2(&entry.mount_point, nix::mount::MntFlags::MNT_DETACH);
    }
    for device in loopdev::list().unwrap_or_default() {
        if device.backing_file.starts_with(&dir) {
            let _ = loopdev::detach(&device.device);
        }
    }
}

/// Binds the socket, waiting out a stopped server's listener that a process
/// forked by a concurrent test (mkfs, losetup) still holds until its exec.
async fn bind_after_restart(socket: &Path) -> tokio::net::UnixListener {
    for _ in 0..40 {
        match loam::server::bind(socket) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            other => return other.expect("bind"),
        }
    }
    loam::server::bind(socket).expect("bind")
}

/// Connects a channel to the server's Unix socket.
pub async fn connect(socket: &Path) -> Channel {
    let socket = socket.to_owned();
    Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .expect("connect")
}

/// The access modes tests use.
#[derive(Debug, Clone, Copy)]
pub enum Access {
    /// SINGLE_NODE_WRITER
    Writer,
    /// SINGLE_NODE_READER_ONLY
    ReaderOnly,
    /// SINGLE_NODE_SINGLE_WRITER
    SingleWriter,
}

/// A filesystem capability with the given access mode.
pub fn mount_capability(mode: Access) -> csi::VolumeCapability {
    use csi::volume_capability::access_mode::Mode;
    let mode = match mode {
        Access::Writer => Mode::SingleNodeWriter,
        Access::ReaderOnly => Mode::SingleNodeReaderOnly,
        Access::SingleWriter => Mode::SingleNodeSingleWriter,
    };
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
    }
}

/// A raw block capability.
pub fn block_capability() -> csi::VolumeCapability {
    use csi::volume_capability::access_mode::Mode;
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(csi::volume_capability::AccessType::Block(Default::default())),
    }
}

/// A CreateVolume request for a filesystem volume.
pub fn create_request(name: &str, bytes: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![mount_capability(Access::Writer)],
        ..Default::default()
    }
}

/// `request` with its content restored from `snapshot_id`.
pub fn from_snapshot(mut request: csi::CreateVolumeRequest, snapshot_id: &str) -> csi::CreateVolumeRequest {
    use csi::volume_content_source::{SnapshotSource, Type};
    request.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource { snapshot_id: snapshot_id.into() })),
    });
    request
}

/// A path as the string CSI carries.
pub fn path_str(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_owned()
}
