//! The split deployment: node agents on loopback TCP ports and a routing
//! controller on a Unix socket, all in-process, driven through gRPC.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{connect, create_request, mount_capability};
use loam::api::cut_step::Step;
use loam::api::groups_client::GroupsClient;
use loam::api::{CutNow, CutStep, PrepareStep, RecordNow};
use loam::auth::{SendToken, Token};
use loam::config::{Config, QuotaMode, TOPOLOGY_NODE_KEY};
use loam::csi;
use loam::csi::controller_client::ControllerClient;
use loam::csi::group_controller_client::GroupControllerClient;
use loam::csi::identity_client::IdentityClient;
use loam::csi::node_client::NodeClient;
use loam::driver::Driver;
use loam::ids::{Key, Kind};
use loam::kernel::FakeKernel;
use loam::routing::agents::{Agents, Timeouts};
use loam::routing::cluster::{GoneNodes, NodeRegistry};
use loam::routing::discovery::Discovery;
use loam::server::limits::{Admitted, Limits};
use loam::server::{CopySettings, Services};
use loam::tls::{self, Role};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const MIB: i64 = 1 << 20;
const TOKEN: &str = "routing-test-token-0123456789";

/// Agent addresses the test moves around, as DNS would for a headless Service.
#[derive(Debug, Default)]
struct Addresses(Mutex<Vec<SocketAddr>>);

impl Addresses {
    fn set(&self, addrs: Vec<SocketAddr>) {
        *self.0.lock().unwrap() = addrs;
    }
}

impl Discovery for Addresses {
    fn addresses(&self) -> Pin<Box<dyn Future<Output = Vec<SocketAddr>> + Send + '_>> {
        let addrs = self.0.lock().unwrap().clone();
        Box::pin(async move { addrs })
    }
}

/// Which nodes the cluster still has, as the test says: all of them unless
/// told otherwise.
#[derive(Debug, Default)]
struct Nodes(Mutex<BTreeSet<String>>);

impl Nodes {
    fn delete(&self, node: &str) {
        self.0.lock().unwrap().insert(node.to_owned());
    }
}

impl NodeRegistry for Nodes {
    fn exists<'a>(&'a self, node: &'a str) -> Pin<Box<dyn Future<Output = Option<bool>> + Send + 'a>> {
        let deleted = self.0.lock().unwrap().contains(node);
        Box::pin(async move { Some(!deleted) })
    }
}

/// A running server task and the way to stop it.
struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().map(|tx| tx.send(()));
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|tx| tx.send(()));
    }
}

/// One node agent: its root stays across restarts.
struct Agent {
    dir: tempfile::TempDir,
    node: String,
    addr: SocketAddr,
    running: Option<Running>,
    small: bool,
}

impl Agent {
    /// Starts an agent; a `small` one has its root on an 8 MiB tmpfs
    /// (privileged runs only).
    async fn start(node: &str, small: bool) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        if small {
            let root = dir.path().join("root");
            std::fs::create_dir(&root).unwrap();
            nix::mount::mount(Some("tmpfs"), &root, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=8m"))
                .expect("mount tmpfs");
        }
        let mut agent = Agent { dir, node: node.into(), addr: "127.0.0.1:0".parse().unwrap(), running: None, small };
        agent.restart().await;
        agent
    }

    /// (Re)starts the agent on a fresh port over the same root.
    async fn restart(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
        let config = Config {
            driver_name: "loam.csi.dev".into(),
            node_id: self.node.clone(),
            root: self.dir.path().canonicalize().unwrap().join("root"),
            max_volumes_per_node: 0,
            quota: QuotaMode::Auto,
        };
        let driver = Arc::new(Driver::open(config, Arc::new(FakeKernel::new())).expect("open driver"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind agent");
        self.addr = listener.local_addr().unwrap();
        let token = Token::parse(TOKEN).unwrap();
        let tls = (tls::server_config(&token, Role::Agent).unwrap(), tls::client_config(&token, Role::Peer).unwrap());
        let copies = CopySettings::default();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let incoming = Admitted::new(listener, Limits::default());
            loam::server::run_agent(incoming, driver, token, tls, copies, async {
                let _ = rx.await;
            })
            .await
            .expect("agent");
        });
        self.running = Some(Running { stop: Some(tx), task: Some(task) });
    }

    async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.small {
            let _ = nix::mount::umount2(&self.dir.path().join("root"), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Two agents (node-a, node-b) and a controller routing to them.
struct Split {
    agents: Vec<Agent>,
    addresses: Arc<Addresses>,
    nodes: Arc<Nodes>,
    controller: ControllerClient<Channel>,
    group: GroupControllerClient<Channel>,
    identity: IdentityClient<Channel>,
    _socket_dir: tempfile::TempDir,
    _running: Running,
}

impl Split {
    async fn start() -> Split {
        Split::start_with_small(None).await
    }

    /// Starts node-a and node-b, `small` of them on a tiny filesystem.
    async fn start_with_small(small: Option<&str>) -> Split {
        Split::start_nodes(&["node-a", "node-b"], small).await
    }

    /// Starts an agent for each of `nodes`, `small` of them on a tiny filesystem.
    async fn start_nodes(nodes: &[&str], small: Option<&str>) -> Split {
        let mut agents = Vec::new();
        for node in nodes {
            agents.push(Agent::start(node, small == Some(*node)).await);
        }
        let addresses = Arc::new(Addresses::default());
        addresses.set(agents.iter().map(|a| a.addr).collect());
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("controller.sock");
        let timeouts = Timeouts {
            connect: Duration::from_secs(2),
            call: Duration::from_secs(10),
            refresh: Duration::from_secs(30),
        };
        let routed = controller_agents(addresses.clone(), TOKEN, timeouts);
        let nodes = Arc::new(Nodes::default());
        let gone_nodes = Some(Arc::new(GoneNodes::new(nodes.clone(), Duration::ZERO)));
        let services =
            Services::Controller { driver_name: "loam.csi.dev".into(), agents: Arc::new(routed), gone_nodes };
        let listener = loam::server::bind(&socket).expect("bind");
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            loam::server::run(listener, services, async {
                let _ = rx.await;
            })
            .await
            .expect("controller");
        });
        let channel = connect(&socket).await;
        Split {
            agents,
            addresses,
            nodes,
            controller: ControllerClient::new(channel.clone()),
            group: GroupControllerClient::new(channel.clone()),
            identity: IdentityClient::new(channel),
            _socket_dir: dir,
            _running: Running { stop: Some(tx), task: Some(task) },
        }
    }

    async fn create_on(&mut self, name: &str, node: &str) -> Result<csi::Volume, tonic::Status> {
        let mut req = create_request(name, MIB);
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![on("node-a"), on("node-b"), on(node)],
            preferred: vec![on(node)],
        });
        Ok(self.controller.create_volume(req).await?.into_inner().volume.expect("volume"))
    }

    async fn volume_ids(&mut self, max_entries: i32) -> Vec<String> {
        let (mut ids, mut token) = (Vec::new(), String::new());
        loop {
            let page = self
                .controller
                .list_volumes(csi::ListVolumesRequest { max_entries, starting_token: token })
                .await
                .expect("list volumes")
                .into_inner();
            assert!(max_entries == 0 || page.entries.len() <= usize::try_from(max_entries).unwrap());
            ids.extend(page.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
            if page.next_token.is_empty() {
                return ids;
            }
            token = page.next_token;
        }
    }
}

fn on(node: &str) -> csi::Topology {
    csi::Topology { segments: [(TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())].into() }
}

/// The controller's view of the agents at `addresses`, holding `token`.
fn controller_agents(addresses: Arc<Addresses>, token: &str, timeouts: Timeouts) -> Agents {
    let token = Token::parse(token).unwrap();
    let tls = tls::client_config(&token, Role::Controller).unwrap();
    Agents::new("loam.csi.dev".into(), addresses, &token, tls, timeouts)
}

/// A channel to an agent over TLS as `config` says.
async fn tls_channel(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_timeout(Duration::from_secs(5));
    endpoint.connect_with_connector(tls::Connector::new(config)).await
}

/// A channel to an agent as the controller makes it (the controller's certificate, no token yet).
async fn agent_client(addr: SocketAddr) -> Channel {
    let config = tls::client_config(&Token::parse(TOKEN).unwrap(), Role::Controller).unwrap();
    tls_channel(addr, config).await.expect("connect to agent")
}

#[tokio::test]
async fn volumes_land_where_asked_and_calls_reach_their_owner() {
    let mut s = Split::start().await;
    let b = s.create_on("pvc-b", "node-b").await.unwrap();
    assert!(b.volume_id.ends_with("@node-b"), "{}", b.volume_id);
    assert_eq!(b.accessible_topology[0].segments[TOPOLOGY_NODE_KEY], "node-b");
    let a = s.create_on("pvc-a", "node-a").await.unwrap();
    assert!(a.volume_id.ends_with("@node-a"), "{}", a.volume_id);
    // A retry finds the volume where it is, whatever the request prefers.
    let again = s.controller.create_volume(create_request("pvc-b", MIB)).await.unwrap().into_inner();
    assert_eq!(again.volume.unwrap().volume_id, b.volume_id);

    // A node without an agent is named in the error.
    let mut nowhere = create_request("pvc-x", MIB);
    nowhere.accessibility_requirements =
        Some(csi::TopologyRequirement { requisite: vec![on("node-x")], preferred: vec![] });
    let err = s.controller.create_volume(nowhere).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("node-x"), "{}", err.message());

    // Publishing to a node other than the owner is refused by the owner.
    let publish = |node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: b.volume_id.clone(),
        node_id: node.into(),
        volume_capability: Some(mount_capability(common::Access::Writer)),
        ..Default::default()
    };
    assert_eq!(s.controller.controller_publish_volume(publish("node-a")).await.unwrap_err().code(), Code::NotFound);
    s.controller.controller_publish_volume(publish("node-b")).await.unwrap();
    let got = s
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: b.volume_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status.unwrap().published_node_ids, ["node-b"]);

    // Snapshots and restores stay on the source's node.
    let snap = s
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: b.volume_id.clone(),
            name: "snap-b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.snapshot_id.ends_with("@node-b"), "{}", snap.snapshot_id);
    let mut restore = create_request("pvc-restored", MIB);
    restore.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let restored = s.controller.create_volume(restore).await.unwrap().into_inner().volume.unwrap();
    assert!(restored.volume_id.ends_with("@node-b"), "{}", restored.volume_id);

    // Ids Loam never made get the agents' answers: success for deletes.
    s.controller
        .delete_volume(csi::DeleteVolumeRequest { volume_id: "fake-vol-id".into(), ..Default::default() })
        .await
        .unwrap();
    let err = s
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: "fake-vol-id".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    s.controller
        .delete_volume(csi::DeleteVolumeRequest { volume_id: a.volume_id.clone(), ..Default::default() })
        .await
        .unwrap();
    assert!(!s.volume_ids(0).await.contains(&a.volume_id));
}

#[tokio::test]
async fn group_snapshots_of_one_node_are_cut_there() {
    let mut s = Split::start().await;
    let mut on_a = Vec::new();
    for name in ["pvc-a1", "pvc-a2"] {
        on_a.push(s.create_on(name, "node-a").await.unwrap().volume_id);
    }
    let create = |name: &str, sources: &[&String]| csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: sources.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };

    let group = s.group.create_volume_group_snapshot(create("group-a", &[&on_a[0], &on_a[1]])).await.unwrap();
    let group = group.into_inner().group_snapshot.unwrap();
    assert!(group.group_snapshot_id.ends_with("@node-a"), "{}", group.group_snapshot_id);
    assert!(group.ready_to_use);
    let members: Vec<String> = group.snapshots.iter().map(|m| m.snapshot_id.clone()).collect();
    assert!(members.iter().all(|id| id.ends_with("@node-a")), "{members:?}");

    // Existing groups are reached through their id; the agent's answers come back unchanged.
    let get = |snapshot_ids: Vec<String>| csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: group.group_snapshot_id.clone(),
        snapshot_ids,
        ..Default::default()
    };
    let got = s.group.get_volume_group_snapshot(get(members.clone())).await.unwrap().into_inner();
    assert_eq!(got.group_snapshot.unwrap().group_snapshot_id, group.group_snapshot_id);
    let err = s.group.get_volume_group_snapshot(get(vec![members[0].clone()])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let alone = csi::DeleteSnapshotRequest { snapshot_id: members[0].clone(), ..Default::default() };
    assert_eq!(s.controller.delete_snapshot(alone).await.unwrap_err().code(), Code::InvalidArgument);
    let restore = common::from_snapshot(create_request("pvc-restored", MIB), &members[1]);
    let restored = s.controller.create_volume(restore).await.unwrap().into_inner().volume.unwrap();
    assert!(restored.volume_id.ends_with("@node-a"), "{}", restored.volume_id);

    let delete =
        |id: &str| csi::DeleteVolumeGroupSnapshotRequest { group_snapshot_id: id.into(), ..Default::default() };
    s.group.delete_volume_group_snapshot(delete(&group.group_snapshot_id)).await.unwrap();
    assert_eq!(s.group.get_volume_group_snapshot(get(vec![])).await.unwrap_err().code(), Code::NotFound);
    // Ids Loam never made get the agents' answers, as for snapshots.
    s.group.delete_volume_group_snapshot(delete("fake-group-id")).await.unwrap();
    let fake = csi::GetVolumeGroupSnapshotRequest { group_snapshot_id: "fake-group-id".into(), ..Default::default() };
    assert_eq!(s.group.get_volume_group_snapshot(fake).await.unwrap_err().code(), Code::NotFound);
    let nameless = s.group.create_volume_group_snapshot(create("", &[])).await.unwrap_err();
    assert_eq!(nameless.code(), Code::InvalidArgument);
    // An id is required, as csi-sanity checks.
    assert_eq!(s.group.get_volume_group_snapshot(group_id("")).await.unwrap_err().code(), Code::InvalidArgument);
    let idless = csi::DeleteVolumeGroupSnapshotRequest::default();
    assert_eq!(s.group.delete_volume_group_snapshot(idless).await.unwrap_err().code(), Code::InvalidArgument);
}

fn group_request(name: &str, sources: &[&String]) -> csi::CreateVolumeGroupSnapshotRequest {
    csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: sources.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn group_id(id: &str) -> csi::GetVolumeGroupSnapshotRequest {
    csi::GetVolumeGroupSnapshotRequest { group_snapshot_id: id.into(), ..Default::default() }
}

async fn snapshot_ids(s: &mut Split) -> Vec<String> {
    let listed = s.controller.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    listed.entries.into_iter().map(|e| e.snapshot.unwrap().snapshot_id).collect()
}

#[tokio::test]
async fn a_group_of_volumes_on_two_nodes_is_cut_on_both_and_is_one_group() {
    let mut s = Split::start().await;
    let b = s.create_on("pvc-b", "node-b").await.unwrap().volume_id;
    let a = s.create_on("pvc-a", "node-a").await.unwrap().volume_id;
    let made = s.group.create_volume_group_snapshot(group_request("group-ab", &[&b, &a])).await.unwrap();
    let group = made.into_inner().group_snapshot.unwrap();
    assert!(group.group_snapshot_id.ends_with("@node-a"), "the first node coordinates: {}", group.group_snapshot_id);
    assert!(group.ready_to_use);
    let members: Vec<String> = group.snapshots.iter().map(|m| m.snapshot_id.clone()).collect();
    assert!(members[0].ends_with("@node-b") && members[1].ends_with("@node-a"), "in request order: {members:?}");
    assert_eq!(group.snapshots[0].source_volume_id, b);
    assert!(group.snapshots.iter().all(|m| m.group_snapshot_id == group.group_snapshot_id && m.ready_to_use));

    // A retry gets the same group; the name of other volumes is taken.
    let again = s.group.create_volume_group_snapshot(group_request("group-ab", &[&a, &b])).await.unwrap();
    let again = again.into_inner().group_snapshot.unwrap();
    assert_eq!((again.group_snapshot_id.as_str(), again.ready_to_use), (group.group_snapshot_id.as_str(), true));
    let mut again_members: Vec<String> = again.snapshots.iter().map(|m| m.snapshot_id.clone()).collect();
    again_members.sort();
    let mut sorted = members.clone();
    sorted.sort();
    assert_eq!(again_members, sorted);
    let c = s.create_on("pvc-c", "node-b").await.unwrap().volume_id;
    let taken = s.group.create_volume_group_snapshot(group_request("group-ab", &[&a, &c])).await.unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{}", taken.message());

    // Read through the coordinator, with every node's members.
    let got = s.group.get_volume_group_snapshot(group_id(&group.group_snapshot_id)).await.unwrap().into_inner();
    let got = got.group_snapshot.unwrap();
    assert!(got.ready_to_use);
    assert_eq!(got.snapshots.iter().map(|m| m.snapshot_id.clone()).collect::<Vec<_>>(), members);
    let mut wrong = group_id(&group.group_snapshot_id);
    wrong.snapshot_ids = vec![members[0].clone()];
    assert_eq!(s.group.get_volume_group_snapshot(wrong).await.unwrap_err().code(), Code::InvalidArgument);

    // Each member restores on its own node, and goes only with the group.
    let restore = common::from_snapshot(create_request("pvc-restored", MIB), &members[0]);
    let restored = s.controller.create_volume(restore).await.unwrap().into_inner().volume.unwrap();
    assert!(restored.volume_id.ends_with("@node-b"), "{}", restored.volume_id);
    let alone = csi::DeleteSnapshotRequest { snapshot_id: members[0].clone(), ..Default::default() };
    assert_eq!(s.controller.delete_snapshot(alone).await.unwrap_err().code(), Code::InvalidArgument);

    let delete = csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: group.group_snapshot_id.clone(),
        ..Default::default()
    };
    s.group.delete_volume_group_snapshot(delete.clone()).await.unwrap();
    s.group.delete_volume_group_snapshot(delete).await.unwrap();
    let gone = s.group.get_volume_group_snapshot(group_id(&group.group_snapshot_id)).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(snapshot_ids(&mut s).await.is_empty(), "no member is left on either node");
}

/// Steps node-b's part of a cut as the controller would, then leaves.
async fn step_part_then_leave(s: &Split, prepare: PrepareStep, steps: &[CutStep]) {
    let addr = s.agents[1].addr;
    let mut client =
        GroupsClient::with_interceptor(agent_client(addr).await, SendToken::new(&Token::parse(TOKEN).unwrap()));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(CutStep { step: Some(Step::Prepare(prepare)) }).await.unwrap();
    let mut progress = client.cut(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert!(progress.message().await.unwrap().is_some(), "prepared");
    for step in steps {
        tx.send(step.clone()).await.unwrap();
        assert!(progress.message().await.unwrap().is_some(), "{step:?} answered");
    }
    drop(tx);
    // The part ends when it reads the end of the steps.
    assert!(progress.message().await.map_or(true, |m| m.is_none()));
}

#[tokio::test]
async fn a_controller_gone_mid_cut_leaves_no_part_and_one_gone_after_the_record_is_settled_by_delete() {
    let mut s = Split::start().await;
    let b = s.create_on("pvc-b", "node-b").await.unwrap().volume_id;
    let a = s.create_on("pvc-a", "node-a").await.unwrap().volume_id;
    let id = format!("{}@node-a", Key::for_name(Kind::GroupSnapshot, "group-ab"));
    let prepare = PrepareStep {
        name: "group-ab".into(),
        source_volume_ids: vec![a.clone(), b.clone()],
        group_snapshot_id: id.clone(),
        ..Default::default()
    };
    let cut = CutStep { step: Some(Step::Cut(CutNow {})) };
    let record = CutStep { step: Some(Step::Record(RecordNow {})) };

    // Gone after the cut: node-b undoes its part by itself.
    step_part_then_leave(&s, prepare.clone(), std::slice::from_ref(&cut)).await;
    assert!(snapshot_ids(&mut s).await.is_empty());

    // Gone after the record: the part stays, in doubt, under the group's id,
    // while the coordinator holds nothing: the group does not exist, and
    // deleting it removes the part.
    step_part_then_leave(&s, prepare.clone(), &[cut, record]).await;
    let listed = snapshot_ids(&mut s).await;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].ends_with("@node-b"));
    assert_eq!(s.group.get_volume_group_snapshot(group_id(&id)).await.unwrap_err().code(), Code::NotFound);
    let delete = csi::DeleteVolumeGroupSnapshotRequest { group_snapshot_id: id.clone(), ..Default::default() };
    s.group.delete_volume_group_snapshot(delete).await.unwrap();
    assert!(snapshot_ids(&mut s).await.is_empty());

    // Or a retry of the same request rolls it back and cuts anew.
    step_part_then_leave(
        &s,
        prepare,
        &[CutStep { step: Some(Step::Cut(CutNow {})) }, CutStep { step: Some(Step::Record(RecordNow {})) }],
    )
    .await;
    let made = s.group.create_volume_group_snapshot(group_request("group-ab", &[&a, &b])).await.unwrap();
    let group = made.into_inner().group_snapshot.unwrap();
    assert!(group.ready_to_use);
    assert_eq!(group.group_snapshot_id, id);
    assert_eq!(snapshot_ids(&mut s).await.len(), 2);
}

#[tokio::test]
async fn capacity_is_per_node_or_summed() {
    let mut s = Split::start().await;
    let a = s.controller.get_capacity(capacity(Some("node-a"))).await.unwrap().into_inner();
    let all = s.controller.get_capacity(capacity(None)).await.unwrap().into_inner();
    assert!(a.available_capacity > 0);
    // Both roots share one filesystem here: the sum is about twice one node.
    assert!(all.available_capacity > a.available_capacity + a.available_capacity / 2, "{all:?} vs {a:?}");
    assert!(all.maximum_volume_size.unwrap() < all.available_capacity);
    // A volume no agent has room for is refused by each in turn.
    let err = s.controller.create_volume(create_request("pvc-huge", i64::MAX / 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
}

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn without_topology_the_agent_with_most_room_wins() {
    // node-a comes first in node order but has only 8 MiB.
    let mut s = Split::start_with_small(Some("node-a")).await;
    let small = s.controller.get_capacity(capacity(Some("node-a"))).await.unwrap().into_inner();
    assert!(small.available_capacity <= 8 * MIB, "{small:?}");
    for name in ["pvc-1", "pvc-2"] {
        let vol = s.controller.create_volume(create_request(name, MIB)).await.unwrap().into_inner();
        assert!(vol.volume.unwrap().volume_id.ends_with("@node-b"), "{name}");
    }
    // Asked for by topology, the small node still gets what fits.
    assert!(s.create_on("pvc-3", "node-a").await.unwrap().volume_id.ends_with("@node-a"));
}

fn capacity(segment: Option<&str>) -> csi::GetCapacityRequest {
    csi::GetCapacityRequest {
        accessible_topology: segment.map(on),
        volume_capabilities: vec![mount_capability(common::Access::Writer)],
        ..Default::default()
    }
}

#[tokio::test]
async fn listings_merge_every_agent_with_stable_tokens() {
    let mut s = Split::start().await;
    let mut made = Vec::new();
    for (i, node) in ["node-b", "node-a", "node-b", "node-a", "node-a"].iter().enumerate() {
        made.push(s.create_on(&format!("pvc-{i}"), node).await.unwrap().volume_id);
    }
    let all = s.volume_ids(0).await;
    assert_eq!(all.iter().collect::<BTreeSet<_>>(), made.iter().collect::<BTreeSet<_>>());
    // Ordered by node first: every node-a volume precedes every node-b one.
    let first_b = all.iter().position(|id| id.ends_with("@node-b")).unwrap();
    assert!(all[first_b..].iter().all(|id| id.ends_with("@node-b")), "{all:?}");
    for max in 1..=6 {
        assert_eq!(s.volume_ids(max).await, all, "max_entries {max}");
    }
    for bad in ["garbage", "node-a/zz", "0123456789abcdef0123456789abcdef"] {
        let err = s
            .controller
            .list_volumes(csi::ListVolumesRequest { max_entries: 1, starting_token: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "{bad}");
    }

    for (i, source) in made.iter().enumerate().take(2) {
        s.controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: source.clone(),
                name: format!("snap-{i}"),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let (mut snaps, mut token) = (Vec::new(), String::new());
    loop {
        let page = s
            .controller
            .list_snapshots(csi::ListSnapshotsRequest { max_entries: 1, starting_token: token, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        snaps.extend(page.entries.into_iter().map(|e| e.snapshot.unwrap().source_volume_id));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(snaps, [made[1].clone(), made[0].clone()], "node-a's snapshot first");
    let of_one = s
        .controller
        .list_snapshots(csi::ListSnapshotsRequest { source_volume_id: made[0].clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(of_one.entries.len(), 1);
}

#[tokio::test]
async fn a_stopped_agent_is_unavailable_and_found_again_on_its_new_port() {
    let mut s = Split::start().await;
    let id = s.create_on("pvc-move", "node-b").await.unwrap().volume_id;
    let get = csi::ControllerGetVolumeRequest { volume_id: id.clone() };

    s.agents[1].stop().await;
    let err = s.controller.controller_get_volume(get.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("node-b"), "{}", err.message());
    // The other node is unaffected.
    s.create_on("pvc-stay", "node-a").await.unwrap();

    let old = s.agents[1].addr;
    s.agents[1].restart().await;
    assert_ne!(s.agents[1].addr, old);
    s.addresses.set(s.agents.iter().map(|a| a.addr).collect());
    let got = s.controller.controller_get_volume(get).await.unwrap().into_inner();
    assert_eq!(got.volume.unwrap().volume_id, id);
}

#[tokio::test]
async fn the_agent_endpoint_needs_the_token_and_never_serves_node() {
    let s = Split::start().await;
    let channel = agent_client(s.agents[0].addr).await;

    let mut anonymous = ControllerClient::new(channel.clone());
    let err = anonymous.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = IdentityClient::new(channel.clone()).probe(csi::ProbeRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let wrong = Token::parse("routing-test-token-0123456780").unwrap();
    let mut impostor = ControllerClient::with_interceptor(channel.clone(), SendToken::new(&wrong));
    let err = impostor.create_volume(create_request("pvc-evil", MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let mut anonymous = GroupControllerClient::new(channel.clone());
    let err = anonymous.group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {}).await;
    assert_eq!(err.unwrap_err().code(), Code::Unauthenticated);

    let right = SendToken::new(&Token::parse(TOKEN).unwrap());
    let mut controller = ControllerClient::with_interceptor(channel.clone(), right.clone());
    controller.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}).await.unwrap();
    let mut group = GroupControllerClient::with_interceptor(channel.clone(), right.clone());
    let caps = group.group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {}).await.unwrap();
    assert_eq!(caps.into_inner().capabilities.len(), 1);
    let mut node = NodeClient::with_interceptor(channel, right);
    let err = node.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test]
async fn the_controller_is_ready_without_agents_and_says_which_are_missing() {
    let mut s = Split::start().await;
    for agent in &mut s.agents {
        agent.stop().await;
    }
    let probe = s.identity.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    let info = s.identity.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "loam.csi.dev");
    assert!(info.manifest.is_empty());
    let caps = s.controller.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}).await.unwrap();
    assert!(!caps.into_inner().capabilities.is_empty());
    let err = s.controller.create_volume(create_request("pvc-none", MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
}

#[tokio::test]
async fn the_controller_reports_its_agents_and_forwarded_calls_as_metrics() {
    let mut s = Split::start().await;
    s.create_on("pvc-metrics", "node-a").await.unwrap();
    let scrape = loam::metrics::global().render();
    // The metrics are process-wide and other tests here use the same node
    // names, so only what this test surely caused is asserted.
    for series in [
        r#"loam_agent_up{node="node-a"} 1"#,
        r#"loam_agent_up{node="node-b"} "#,
        r#"loam_forward_duration_seconds_count{node="node-a",method="CreateVolume"} "#,
        r#"loam_discovery_refreshes_total{outcome="found"} "#,
        r#"loam_rpc_duration_seconds_count{method="CreateVolume",code="Ok"} "#,
    ] {
        assert!(scrape.lines().any(|l| l.starts_with(series)), "no {series} in:\n{scrape}");
    }
}

#[tokio::test]
async fn the_controller_watches_its_agents_without_being_asked() {
    let mut agent = Agent::start("node-watched", false).await;
    let addresses = Arc::new(Addresses::default());
    addresses.set(vec![agent.addr]);
    let timeouts = Timeouts {
        connect: Duration::from_secs(2),
        call: Duration::from_secs(10),
        refresh: Duration::from_millis(200),
    };
    let agents = Arc::new(controller_agents(addresses, TOKEN, timeouts));
    let watching = tokio::spawn(agents.clone().watch());
    // No request reaches the controller: only its watch can tell.
    let up = |value: &str| {
        let series = format!(r#"loam_agent_up{{node="node-watched"}} {value}"#);
        loam::metrics::global().render().lines().any(|l| l == series)
    };
    for (what, value) in [("up", "1"), ("gone", "0")] {
        if value == "0" {
            agent.stop().await;
        }
        let mut seen = false;
        for _ in 0..100 {
            seen = up(value);
            if seen {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(seen, "the agent seen {what} within 5 s");
    }
    watching.abort();
}

/// A `loop` volume request (thin ext4 images) for `node` only, as
/// WaitForFirstConsumer with strict topology asks once the scheduler chose.
fn loop_request_for(name: &str, bytes: i64, node: &str) -> csi::CreateVolumeRequest {
    let mut req = create_request(name, bytes);
    req.parameters = [("backend".to_owned(), "loop".to_owned()), ("provisioning".to_owned(), "thin".to_owned())].into();
    req.accessibility_requirements =
        Some(csi::TopologyRequirement { requisite: vec![on(node)], preferred: vec![on(node)] });
    req
}

/// `request` cloned from the volume `volume_id`.
fn cloned_from(mut request: csi::CreateVolumeRequest, volume_id: &str) -> csi::CreateVolumeRequest {
    use csi::volume_content_source::{Type, VolumeSource};
    request.volume_content_source =
        Some(csi::VolumeContentSource { r#type: Some(Type::Volume(VolumeSource { volume_id: volume_id.into() })) });
    request
}

impl Agent {
    /// The image file of this agent's `loop` volume `volume_id`.
    fn image(&self, volume_id: &str) -> std::path::PathBuf {
        let key = loam::ids::ObjectId::parse(volume_id).expect("a Loam id").key;
        self.dir.path().canonicalize().unwrap().join("root/volumes").join(format!("{key}.img"))
    }
}

#[tokio::test]
async fn clones_and_restores_land_on_the_node_the_topology_names_with_their_content() {
    use std::os::unix::fs::FileExt;
    let mut s = Split::start().await;
    let source = s.controller.create_volume(loop_request_for("pvc-primary", 16 * MIB, "node-a")).await.unwrap();
    let source = source.into_inner().volume.unwrap().volume_id;
    assert!(source.ends_with("@node-a"), "{source}");
    // What a pod wrote through the filesystem, as the image holds it: data
    // at the start and deep inside, holes between.
    let image = std::fs::OpenOptions::new().write(true).open(s.agents[0].image(&source)).unwrap();
    image.write_all_at(b"primary rows", 0).unwrap();
    image.write_all_at(&vec![7u8; 3 << 20], 9 << 20).unwrap();
    image.sync_all().unwrap();
    let written = std::fs::read(s.agents[0].image(&source)).unwrap();

    // The scheduler put the replica on node-b: the clone is made there,
    // pulled from node-a's agent, and bigger than its source if asked.
    let replica = cloned_from(loop_request_for("pvc-replica-1", 32 * MIB, "node-b"), &source);
    let made = s.controller.create_volume(replica.clone()).await.unwrap().into_inner().volume.unwrap();
    assert!(made.volume_id.ends_with("@node-b"), "{}", made.volume_id);
    assert_eq!(made.capacity_bytes, 32 * MIB);
    assert_eq!(made.accessible_topology[0].segments[TOPOLOGY_NODE_KEY], "node-b");
    let copied = std::fs::read(s.agents[1].image(&made.volume_id)).unwrap();
    assert_eq!(copied.len(), 32 << 20, "grown to the clone's capacity");
    assert_eq!(&copied[..written.len()], &written[..], "the source's bytes, all of them");
    assert!(copied[written.len()..].iter().all(|b| *b == 0));

    // A retry is answered by the volume already made, without copying again.
    let again = s.controller.create_volume(replica).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(again.volume_id, made.volume_id);

    // From a snapshot of node-a onto node-b: the snapshot's content, not
    // what the source holds now.
    let snap = s
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: source.clone(),
            name: "snap-primary".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    image.write_all_at(b"changed after the snapshot", 0).unwrap();
    let restore = common::from_snapshot(loop_request_for("pvc-restored-b", 16 * MIB, "node-b"), &snap.snapshot_id);
    let restored = s.controller.create_volume(restore).await.unwrap().into_inner().volume.unwrap();
    assert!(restored.volume_id.ends_with("@node-b"), "{}", restored.volume_id);
    assert_eq!(std::fs::read(s.agents[1].image(&restored.volume_id)).unwrap(), written);

    // Where the topology allows the source's node, the copy stays local.
    let mut local = cloned_from(loop_request_for("pvc-local", 16 * MIB, "node-b"), &source);
    local.accessibility_requirements.as_mut().unwrap().requisite.push(on("node-a"));
    let local = s.controller.create_volume(local).await.unwrap().into_inner().volume.unwrap();
    assert!(local.volume_id.ends_with("@node-a"), "{}", local.volume_id);

    // Nothing of the copies is left on node-a: their cuts are gone.
    let exports = s.agents[0].dir.path().join("root/exports");
    assert_eq!(std::fs::read_dir(&exports).unwrap().count(), 0, "no cut left in {}", exports.display());
    let snapshots = std::fs::read_dir(s.agents[0].dir.path().join("root/snapshots")).unwrap().count();
    assert_eq!(snapshots, 1, "only the CO's snapshot");
}

#[tokio::test]
async fn a_copy_whose_source_node_is_away_is_retried_not_failed() {
    let mut s = Split::start().await;
    let source = s.controller.create_volume(loop_request_for("pvc-src", 4 * MIB, "node-a")).await.unwrap();
    let source = source.into_inner().volume.unwrap().volume_id;
    s.agents[0].stop().await;
    let err = s
        .controller
        .create_volume(cloned_from(loop_request_for("pvc-far", 4 * MIB, "node-b"), &source))
        .await
        .unwrap_err();
    // node-b's agent cannot reach node-a's: ABORTED, which the CO retries.
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("cannot reach the agent of node node-a"), "{}", err.message());
    // Nothing was made on node-b.
    let volumes = s.agents[1].dir.path().join("root/volumes");
    assert_eq!(std::fs::read_dir(&volumes).unwrap().count(), 0, "{}", volumes.display());
}

#[tokio::test]
async fn a_copy_into_another_backend_is_refused_before_anything_is_sent() {
    let mut s = Split::start().await;
    let source = s.controller.create_volume(loop_request_for("pvc-img", 4 * MIB, "node-a")).await.unwrap();
    let source = source.into_inner().volume.unwrap().volume_id;
    let mut into_dir = cloned_from(loop_request_for("pvc-dir", 4 * MIB, "node-b"), &source);
    into_dir.parameters.clear();
    let err = s.controller.create_volume(into_dir).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("loop volume's image"), "{}", err.message());
}

#[tokio::test]
async fn what_was_on_a_node_gone_from_the_cluster_can_be_deleted_and_detached() {
    let mut s = Split::start().await;
    let volume = s.create_on("pvc-stranded", "node-b").await.unwrap().volume_id;
    let publish = csi::ControllerPublishVolumeRequest {
        volume_id: volume.clone(),
        node_id: "node-b".into(),
        volume_capability: Some(mount_capability(common::Access::Writer)),
        ..Default::default()
    };
    s.controller.controller_publish_volume(publish).await.unwrap();
    let snapshot = s
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: volume.clone(),
            name: "snap-stranded".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let unpublish = csi::ControllerUnpublishVolumeRequest {
        volume_id: volume.clone(),
        node_id: "node-b".into(),
        ..Default::default()
    };
    let delete = csi::DeleteVolumeRequest { volume_id: volume.clone(), ..Default::default() };
    let delete_snapshot = csi::DeleteSnapshotRequest { snapshot_id: snapshot.clone(), ..Default::default() };

    // The machine is off, but the cluster still has the node: nothing is given up.
    s.agents[1].stop().await;
    let err = s.controller.delete_volume(delete.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("node-b"), "{}", err.message());
    let err = s.controller.controller_unpublish_volume(unpublish.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    // `kubectl delete node node-b`: its volumes and snapshots went with it.
    s.nodes.delete("node-b");
    s.controller.controller_unpublish_volume(unpublish).await.unwrap();
    s.controller.delete_snapshot(delete_snapshot).await.unwrap();
    s.controller.delete_volume(delete).await.unwrap();
    // Calls that need the volume itself still say it cannot be reached.
    let err = s
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: volume.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // The other node is served as before.
    s.create_on("pvc-alive", "node-a").await.unwrap();
}

#[tokio::test]
async fn a_dir_volume_cloned_to_another_node_keeps_its_files_links_and_modes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut s = Split::start().await;
    let mut source = loop_request_for("pvc-files", 8 * MIB, "node-a");
    source.parameters.clear();
    let source = s.controller.create_volume(source).await.unwrap().into_inner().volume.unwrap().volume_id;
    let key = loam::ids::ObjectId::parse(&source).unwrap().key;
    let files = s.agents[0].dir.path().canonicalize().unwrap().join("root/volumes").join(key.to_string());
    std::fs::create_dir(files.join("db")).unwrap();
    std::fs::write(files.join("db/rows"), b"row 1\nrow 2\n").unwrap();
    std::fs::hard_link(files.join("db/rows"), files.join("db/rows.link")).unwrap();
    std::os::unix::fs::symlink("db/rows", files.join("latest")).unwrap();
    std::fs::set_permissions(files.join("db"), std::fs::Permissions::from_mode(0o2750)).unwrap();

    let mut clone = cloned_from(loop_request_for("pvc-files-b", 8 * MIB, "node-b"), &source);
    clone.parameters.clear();
    let made = s.controller.create_volume(clone).await.unwrap().into_inner().volume.unwrap();
    assert!(made.volume_id.ends_with("@node-b"), "{}", made.volume_id);
    let key = loam::ids::ObjectId::parse(&made.volume_id).unwrap().key;
    let copied = s.agents[1].dir.path().canonicalize().unwrap().join("root/volumes").join(key.to_string());
    assert_eq!(std::fs::read(copied.join("db/rows")).unwrap(), b"row 1\nrow 2\n");
    let (rows, link) = (copied.join("db/rows").metadata().unwrap(), copied.join("db/rows.link").metadata().unwrap());
    assert_eq!(rows.ino(), link.ino(), "hard links stay one file");
    assert_eq!(std::fs::read_link(copied.join("latest")).unwrap(), std::path::Path::new("db/rows"));
    assert_eq!(copied.join("db").metadata().unwrap().mode() & 0o7777, 0o2750);
    let exports = s.agents[0].dir.path().join("root/exports");
    assert_eq!(std::fs::read_dir(&exports).unwrap().count(), 0, "the cut is gone");
}

#[tokio::test]
async fn each_caller_of_an_agent_makes_only_its_own_calls() {
    use loam::api::copies_client::CopiesClient;
    use loam::api::{CreateVolumeFromRequest, ExportRequest, export_request::Source};
    let s = Split::start().await;
    let token = Token::parse(TOKEN).unwrap();
    let right = SendToken::new(&token);
    let as_controller = agent_client(s.agents[0].addr).await;
    let peer_tls = tls::client_config(&token, Role::Peer).unwrap();
    let as_peer = tls_channel(s.agents[0].addr, peer_tls).await.expect("a peer connects");
    let export =
        || ExportRequest { source: Some(Source::VolumeId(format!("{}@node-a", "0".repeat(32)))), ..Default::default() };

    // A peer agent, holding the token, cannot act as the controller...
    let mut peer_controller = ControllerClient::with_interceptor(as_peer.clone(), right.clone());
    let err = peer_controller.create_volume(create_request("pvc-peer", MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut peer_copies = CopiesClient::with_interceptor(as_peer.clone(), right.clone());
    let from = CreateVolumeFromRequest { request: Some(create_request("pvc-peer", MIB)), ..Default::default() };
    assert_eq!(peer_copies.create_volume_from(from).await.unwrap_err().code(), Code::PermissionDenied);
    // ...but may export (this volume does not exist).
    let err = peer_copies.export(export()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Nor arrange a snapshot's copies, which is the controller's.
    use loam::api::{CopySnapshotRequest, CutSnapshotRequest};
    let err = peer_copies.cut_snapshot(CutSnapshotRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = peer_copies.copy_snapshot(CopySnapshotRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Nor step, read or remove a node's part of a group snapshot.
    use loam::api::GroupPartRequest;
    let mut peer_groups = GroupsClient::with_interceptor(as_peer.clone(), right.clone());
    let part = || GroupPartRequest { group_snapshot_id: format!("{}@node-a", "0".repeat(32)) };
    assert_eq!(peer_groups.get_part(part()).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(peer_groups.settle_part(part()).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(peer_groups.delete_part(part()).await.unwrap_err().code(), Code::PermissionDenied);
    let steps = tokio_stream::iter(Vec::<CutStep>::new());
    assert_eq!(peer_groups.cut(steps).await.unwrap_err().code(), Code::PermissionDenied);
    // And the controller cannot export: only an agent pulling a copy may.
    let mut controller_copies = CopiesClient::with_interceptor(as_controller, right);
    assert_eq!(controller_copies.export(export()).await.unwrap_err().code(), Code::PermissionDenied);
    // Without the token a peer's certificate gets nothing at all.
    let err = CopiesClient::new(as_peer).export(export()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

/// CreateSnapshot of `volume_id` with a VolumeSnapshotClass that keeps a copy
/// on another node (`protection: off-node`).
fn protected_snapshot(name: &str, volume_id: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: volume_id.into(),
        name: name.into(),
        parameters: [("protection".to_owned(), "off-node".to_owned())].into(),
        ..Default::default()
    }
}

impl Agent {
    fn root(&self) -> std::path::PathBuf {
        self.dir.path().canonicalize().unwrap().join("root")
    }

    /// The image file of this agent's copy of the `loop` snapshot `snapshot_id`.
    fn snapshot_image(&self, snapshot_id: &str) -> std::path::PathBuf {
        let key = loam::ids::SnapshotId::parse(snapshot_id).expect("a Loam snapshot id").key;
        self.root().join("snapshots").join(format!("{key}.img"))
    }

    /// Every name under this agent's `snapshots/` and `snapshot-copies/`,
    /// temporary ones included.
    fn snapshot_files(&self) -> Vec<String> {
        let mut names = Vec::new();
        for dir in ["snapshots", "snapshot-copies"] {
            for entry in std::fs::read_dir(self.root().join(dir)).unwrap() {
                names.push(format!("{dir}/{}", entry.unwrap().file_name().to_string_lossy()));
            }
        }
        names.sort();
        names
    }
}

impl Split {
    fn agent(&mut self, node: &str) -> &mut Agent {
        self.agents.iter_mut().find(|a| a.node == node).expect("an agent of that node")
    }

    /// Every snapshot ListSnapshots shows, page by page.
    async fn snapshots(&mut self) -> Vec<csi::Snapshot> {
        let (mut all, mut token) = (Vec::new(), String::new());
        loop {
            let ask = csi::ListSnapshotsRequest { max_entries: 1, starting_token: token, ..Default::default() };
            let page = self.controller.list_snapshots(ask).await.expect("list snapshots").into_inner();
            all.extend(page.entries.into_iter().map(|e| e.snapshot.unwrap()));
            if page.next_token.is_empty() {
                return all;
            }
            token = page.next_token;
        }
    }

    /// ListSnapshots of the one snapshot `id`.
    async fn snapshot(&mut self, id: &str) -> Vec<csi::Snapshot> {
        let ask = csi::ListSnapshotsRequest { snapshot_id: id.into(), ..Default::default() };
        let page = self.controller.list_snapshots(ask).await.expect("list one snapshot").into_inner();
        page.entries.into_iter().map(|e| e.snapshot.unwrap()).collect()
    }

    /// A 16 MiB thin `loop` volume on `node` holding data at its start and
    /// deep inside; its id and its image's bytes.
    async fn volume_with_data(&mut self, name: &str, node: &str) -> (String, Vec<u8>) {
        use std::os::unix::fs::FileExt;
        let volume = self.controller.create_volume(loop_request_for(name, 16 * MIB, node)).await.unwrap();
        let id = volume.into_inner().volume.unwrap().volume_id;
        let path = self.agent(node).image(&id);
        let image = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        image.write_all_at(format!("rows of {name}").as_bytes(), 0).unwrap();
        image.write_all_at(&vec![9u8; 2 << 20], 11 << 20).unwrap();
        image.sync_all().unwrap();
        (id, std::fs::read(&path).unwrap())
    }
}

/// A Copies client to `agent` as the controller calls it.
async fn copies_as_controller(
    agent: &Agent,
) -> loam::api::copies_client::CopiesClient<tonic::service::interceptor::InterceptedService<Channel, SendToken>> {
    let token = SendToken::new(&Token::parse(TOKEN).unwrap());
    loam::api::copies_client::CopiesClient::with_interceptor(agent_client(agent.addr).await, token)
}

#[tokio::test]
async fn a_snapshot_kept_off_node_is_copied_to_another_node_and_restored_after_its_node_is_gone() {
    let mut s = Split::start_nodes(&["node-a", "node-b", "node-c"], None).await;
    let (source, written) = s.volume_with_data("pvc-db", "node-a").await;

    let snap = s.controller.create_snapshot(protected_snapshot("snap-db", &source)).await.unwrap();
    let snap = snap.into_inner().snapshot.unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, source);
    // The id names both holders: node-a, and whichever other node had most room.
    let id = loam::ids::SnapshotId::parse(&snap.snapshot_id).expect("a snapshot id");
    assert_eq!(id.node, "node-a");
    let copy_node = id.copy.clone().expect("a copy node");
    let third = if copy_node == "node-b" { "node-c" } else { "node-b" };
    assert!(copy_node == "node-b" || copy_node == "node-c", "{copy_node}");
    // Both hold the snapshot's bytes; the third node holds nothing.
    assert_eq!(std::fs::read(s.agent("node-a").snapshot_image(&snap.snapshot_id)).unwrap(), written);
    assert_eq!(std::fs::read(s.agent(&copy_node).snapshot_image(&snap.snapshot_id)).unwrap(), written);
    assert!(s.agent(third).snapshot_files().is_empty(), "{:?}", s.agent(third).snapshot_files());
    // Listed once, ready.
    let listed: Vec<_> = s.snapshots().await.into_iter().filter(|e| e.snapshot_id == snap.snapshot_id).collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].ready_to_use);

    // A retry is the same snapshot, with no second copy anywhere.
    let again = s.controller.create_snapshot(protected_snapshot("snap-db", &source)).await.unwrap();
    assert_eq!(again.into_inner().snapshot.unwrap().snapshot_id, snap.snapshot_id);
    assert_eq!(s.agent(&copy_node).snapshot_files().len(), 1, "{:?}", s.agent(&copy_node).snapshot_files());
    assert!(s.agent(third).snapshot_files().is_empty());

    // A restore on the copy's node uses its own copy.
    let on_copy = common::from_snapshot(loop_request_for("pvc-on-copy", 16 * MIB, &copy_node), &snap.snapshot_id);
    let on_copy = s.controller.create_volume(on_copy).await.unwrap().into_inner().volume.unwrap();
    assert!(on_copy.volume_id.ends_with(&format!("@{copy_node}")), "{}", on_copy.volume_id);
    assert_eq!(std::fs::read(s.agent(&copy_node).image(&on_copy.volume_id)).unwrap(), written);

    // node-a's machine is off (the controller has not noticed yet): a PVC
    // restored on the third node gets the data, pulled from the copy.
    s.agent("node-a").stop().await;
    let elsewhere = common::from_snapshot(loop_request_for("pvc-after-loss", 16 * MIB, third), &snap.snapshot_id);
    let elsewhere = s.controller.create_volume(elsewhere).await.unwrap().into_inner().volume.unwrap();
    assert!(elsewhere.volume_id.ends_with(&format!("@{third}")), "{}", elsewhere.volume_id);
    assert_eq!(std::fs::read(s.agent(third).image(&elsewhere.volume_id)).unwrap(), written);
    // The snapshot is still listed, once, from its copy.
    let one = s.snapshot(&snap.snapshot_id).await;
    assert_eq!(one.len(), 1);
    assert!(one[0].ready_to_use);
    let listed: Vec<_> = s.snapshots().await.into_iter().filter(|e| e.snapshot_id == snap.snapshot_id).collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    // Without a topology, it lands where a copy is.
    let anywhere = common::from_snapshot(create_request("pvc-anywhere", 16 * MIB), &snap.snapshot_id);
    let mut anywhere = anywhere;
    anywhere.parameters = loop_request_for("x", MIB, "x").parameters;
    let anywhere = s.controller.create_volume(anywhere).await.unwrap().into_inner().volume.unwrap();
    assert!(anywhere.volume_id.ends_with(&format!("@{copy_node}")), "{}", anywhere.volume_id);

    // While the cluster knows node-a, deleting waits for it; once it is
    // gone for good, the copy is deleted and node-a's part forgiven.
    let delete = csi::DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() };
    let err = s.controller.delete_snapshot(delete.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    s.nodes.delete("node-a");
    s.controller.delete_snapshot(delete).await.unwrap();
    assert!(s.agent(&copy_node).snapshot_files().is_empty(), "{:?}", s.agent(&copy_node).snapshot_files());
    assert!(s.snapshot(&snap.snapshot_id).await.is_empty());
}

#[tokio::test]
async fn a_snapshot_kept_off_node_is_ready_only_once_its_copy_is_whole_and_retries_converge() {
    use loam::api::{CopySnapshotRequest, CutSnapshotRequest};
    let mut s = Split::start_nodes(&["node-a", "node-b", "node-c"], None).await;
    let (source, written) = s.volume_with_data("pvc-retry", "node-a").await;
    let request = protected_snapshot("snap-retry", &source);

    // The controller crashed right after the cut, which chose node-c.
    let cut =
        CutSnapshotRequest { request: Some(request.clone()), copy_nodes: vec!["node-c".into()], ..Default::default() };
    let cut = copies_as_controller(s.agent("node-a")).await.cut_snapshot(cut).await.unwrap();
    let cut = cut.into_inner().snapshot.unwrap();
    assert!(cut.snapshot_id.ends_with("@node-a+node-c"), "{}", cut.snapshot_id);
    // Nothing looks finished: listed once, not ready.
    let listed: Vec<_> = s.snapshots().await.into_iter().filter(|e| e.snapshot_id == cut.snapshot_id).collect();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].ready_to_use);
    assert!(!s.snapshot(&cut.snapshot_id).await[0].ready_to_use);

    // node-c's pull is cut off (nothing listens where it is sent): it keeps nothing.
    let copy = CopySnapshotRequest {
        snapshot: Some(cut.clone()),
        name: request.name.clone(),
        source_address: "127.0.0.1:9".into(),
    };
    let err = copies_as_controller(s.agent("node-c")).await.copy_snapshot(copy.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(s.agent("node-c").snapshot_files().is_empty(), "{:?}", s.agent("node-c").snapshot_files());
    assert!(!s.snapshot(&cut.snapshot_id).await[0].ready_to_use);
    // Asked to keep a copy it is not named for, node-b refuses.
    let err = copies_as_controller(s.agent("node-b")).await.copy_snapshot(copy).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // The CO's retry converges on node-c, whichever node has most room now.
    let done = s.controller.create_snapshot(request.clone()).await.unwrap().into_inner().snapshot.unwrap();
    assert_eq!(done.snapshot_id, cut.snapshot_id);
    assert!(done.ready_to_use);
    assert_eq!(done.creation_time, cut.creation_time);
    assert_eq!(std::fs::read(s.agent("node-c").snapshot_image(&done.snapshot_id)).unwrap(), written);
    assert!(s.agent("node-b").snapshot_files().is_empty());
    let listed: Vec<_> = s.snapshots().await.into_iter().filter(|e| e.snapshot_id == done.snapshot_id).collect();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].ready_to_use);
    // The same name without the protection is another snapshot: refused.
    let plain = csi::CreateSnapshotRequest { parameters: Default::default(), ..request.clone() };
    assert_eq!(s.controller.create_snapshot(plain).await.unwrap_err().code(), Code::AlreadyExists);
    // Its volume deleted, a late retry still gets the snapshot.
    let delete_volume = csi::DeleteVolumeRequest { volume_id: source.clone(), ..Default::default() };
    s.controller.delete_volume(delete_volume).await.unwrap();
    let late = s.controller.create_snapshot(request.clone()).await.unwrap().into_inner().snapshot.unwrap();
    assert_eq!((late.snapshot_id.as_str(), late.ready_to_use), (done.snapshot_id.as_str(), true));
    let other = protected_snapshot("snap-of-nothing", &source);
    assert_eq!(s.controller.create_snapshot(other).await.unwrap_err().code(), Code::NotFound);

    // Deleting removes both copies; deleting again is still a success.
    let delete = csi::DeleteSnapshotRequest { snapshot_id: done.snapshot_id.clone(), ..Default::default() };
    s.controller.delete_snapshot(delete.clone()).await.unwrap();
    assert!(s.agent("node-a").snapshot_files().is_empty(), "{:?}", s.agent("node-a").snapshot_files());
    assert!(s.agent("node-c").snapshot_files().is_empty(), "{:?}", s.agent("node-c").snapshot_files());
    assert!(s.snapshot(&done.snapshot_id).await.is_empty());
    s.controller.delete_snapshot(delete).await.unwrap();
    let get = csi::GetSnapshotRequest { snapshot_id: done.snapshot_id.clone(), ..Default::default() };
    assert_eq!(s.controller.get_snapshot(get).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn a_copy_a_crash_cut_short_is_removed_when_its_node_starts_again() {
    let mut s = Split::start().await;
    let (source, written) = s.volume_with_data("pvc-crash", "node-a").await;
    let snap = s.controller.create_snapshot(protected_snapshot("snap-crash", &source)).await.unwrap();
    let snap = snap.into_inner().snapshot.unwrap();
    assert!(snap.snapshot_id.ends_with("@node-a+node-b"), "{}", snap.snapshot_id);

    // What node-b's crash in the middle of another copy leaves: the note it
    // writes first, a half-written image, and even one renamed into place
    // whose record was never written.
    let key = "0123456789abcdef0123456789abcdef";
    let root = s.agent("node-b").root();
    std::fs::write(root.join("snapshot-copies").join(key), "loop").unwrap();
    std::fs::write(root.join("snapshots").join(format!(".{key}.img.tmp")), b"half").unwrap();
    std::fs::write(root.join("snapshots").join(format!("{key}.img")), b"whole, unrecorded").unwrap();
    s.agent("node-b").restart().await;
    s.addresses.set(s.agents.iter().map(|a| a.addr).collect());
    // Only the finished copy is left, with its data.
    let files = s.agent("node-b").snapshot_files();
    let key = loam::ids::SnapshotId::parse(&snap.snapshot_id).unwrap().key;
    assert_eq!(files, [format!("snapshots/{key}.img")]);
    assert_eq!(std::fs::read(s.agent("node-b").snapshot_image(&snap.snapshot_id)).unwrap(), written);
    assert!(s.snapshot(&snap.snapshot_id).await[0].ready_to_use);
}

#[tokio::test]
async fn bad_protection_and_node_ids_too_long_to_share_an_id_are_invalid_argument() {
    // 57 + 57 bytes of node ids: with the key, '@' and '+', 148 bytes.
    let (long_a, long_b) = (format!("node-a-{}", "a".repeat(50)), format!("node-b-{}", "b".repeat(50)));
    let mut s = Split::start_nodes(&[&long_a, &long_b], None).await;
    let volume = s.controller.create_volume(loop_request_for("pvc-long", 4 * MIB, &long_a)).await.unwrap();
    let volume = volume.into_inner().volume.unwrap().volume_id;

    for (parameters, named) in [
        (vec![("protection", "offnode")], "\"offnode\""),
        (vec![("protection", "")], "protection=\"\""),
        (vec![("protection", "off-node"), ("copies", "2")], "\"copies\""),
    ] {
        let mut request = protected_snapshot("snap-bad", &volume);
        request.parameters = parameters.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let err = s.controller.create_snapshot(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{parameters:?}: {err:?}");
        assert!(err.message().contains(named), "{parameters:?}: {}", err.message());
    }

    let err = s.controller.create_snapshot(protected_snapshot("snap-long", &volume)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("more than the 94 that fit"), "{}", err.message());
    // Refused before anything was cut.
    assert!(s.snapshots().await.is_empty());
    assert!(s.agent(&long_a).snapshot_files().is_empty(), "{:?}", s.agent(&long_a).snapshot_files());
    // The same volume snapshots locally as ever.
    let mut local = protected_snapshot("snap-local", &volume);
    local.parameters = [("protection".to_owned(), "local".to_owned())].into();
    let local = s.controller.create_snapshot(local).await.unwrap().into_inner().snapshot.unwrap();
    assert!(local.snapshot_id.ends_with(&format!("@{long_a}")) && local.ready_to_use, "{local:?}");
}

#[tokio::test]
async fn a_copy_node_gone_for_good_before_it_held_the_copy_is_replaced_by_another() {
    use loam::api::CutSnapshotRequest;
    let mut s = Split::start_nodes(&["node-a", "node-b", "node-c"], None).await;
    let (source, written) = s.volume_with_data("pvc-stranded", "node-a").await;
    let request = protected_snapshot("snap-stranded", &source);
    // The first attempt chose node-c, and the controller stopped there.
    let cut =
        CutSnapshotRequest { request: Some(request.clone()), copy_nodes: vec!["node-c".into()], ..Default::default() };
    let cut = copies_as_controller(s.agent("node-a")).await.cut_snapshot(cut).await.unwrap();
    let cut = cut.into_inner().snapshot.unwrap();
    assert!(cut.snapshot_id.ends_with("@node-a+node-c"), "{}", cut.snapshot_id);

    // node-c's machine is off, but the cluster still knows it: the retry waits for it.
    s.agent("node-c").stop().await;
    let err = s.controller.create_snapshot(request.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("node-c"), "{}", err.message());

    // Deleted from the cluster: node-b keeps the copy of the same cut, and the snapshot is ready.
    s.nodes.delete("node-c");
    let done = s.controller.create_snapshot(request).await.unwrap().into_inner().snapshot.unwrap();
    let key = loam::ids::SnapshotId::parse(&cut.snapshot_id).unwrap().key;
    assert_eq!(done.snapshot_id, format!("{key}@node-a+node-b"));
    assert!(done.ready_to_use);
    assert_eq!(done.creation_time, cut.creation_time, "the same cut");
    assert_eq!(std::fs::read(s.agent("node-b").snapshot_image(&done.snapshot_id)).unwrap(), written);
    // Only the new id names it.
    assert!(s.snapshot(&cut.snapshot_id).await.is_empty());
    let listed: Vec<_> = s.snapshots().await.into_iter().map(|e| e.snapshot_id).collect();
    assert_eq!(listed, [done.snapshot_id]);
}
