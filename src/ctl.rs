//! `loam ctl`: a command-line CSI client for people and scripts.
//!
//! Each subcommand issues one CSI RPC (`info` and `capabilities` issue two) against a
//! plugin endpoint and prints the result as readable text or, with `--json`, as one JSON
//! document on stdout. A failed RPC becomes an error reading `<GRPC_CODE>: <message>`,
//! which `main` prints as `error: ...` before exiting with status 1.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use hyper_util::rt::TokioIo;
use loam::csi::controller_client::ControllerClient;
use loam::csi::group_controller_client::GroupControllerClient;
use loam::csi::identity_client::IdentityClient;
use loam::csi::node_client::NodeClient;
use loam::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode};
use loam::csi::*;
use serde_json::{Value, json};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Response, Status};

/// Topology segment key that pins a Loam volume to one node.
const NODE_KEY: &str = "topology.loam.csi.dev/node";

/// Options and subcommand of `loam ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// CSI endpoint: unix:///path, unix:/path, /path, tcp://host:port or http://host:port.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/loam/csi.sock",
        global = true,
        help_heading = "Global options"
    )]
    endpoint: String,
    /// Print one machine-readable JSON document instead of text.
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
    /// Timeout for each RPC, in seconds.
    #[arg(long, default_value_t = 30, global = true, value_name = "SECONDS", help_heading = "Global options")]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

/// The subcommands, one per CSI RPC.
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show plugin name, version, manifest and capabilities (GetPluginInfo, GetPluginCapabilities).
    Info,
    /// Ask whether the plugin is ready (Probe).
    Probe,
    /// Create a volume (CreateVolume).
    CreateVolume {
        /// Volume name (the idempotency key).
        name: String,
        /// Required capacity: bytes, or a number with K/M/G/T or Ki/Mi/Gi/Ti.
        #[arg(long, value_parser = parse_size)]
        size: Option<i64>,
        /// Capacity limit, same syntax as --size.
        #[arg(long, value_parser = parse_size)]
        limit: Option<i64>,
        /// Creation parameter KEY=VALUE (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_kv)]
        params: Vec<(String, String)>,
        /// Restore this snapshot into the new volume.
        #[arg(long, value_name = "ID", conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Clone this volume.
        #[arg(long, value_name = "ID")]
        from_volume: Option<String>,
        /// Put the volume on this node (preferred and requisite topology).
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        cap: CapOpts,
    },
    /// Delete a volume (DeleteVolume).
    DeleteVolume {
        /// Volume ID.
        volume_id: String,
    },
    /// List volumes (ListVolumes).
    ListVolumes(PageOpts),
    /// Show available capacity (GetCapacity).
    GetCapacity {
        /// Parameter KEY=VALUE (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_kv)]
        params: Vec<(String, String)>,
        /// Only count capacity on this node.
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        cap: CapOpts,
    },
    /// Attach a volume to a node (ControllerPublishVolume).
    ControllerPublish {
        /// Volume ID.
        volume_id: String,
        /// Node ID.
        #[arg(long)]
        node: String,
        /// Publish read-only.
        #[arg(long)]
        read_only: bool,
        /// Volume context KEY=VALUE (repeatable).
        #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_kv)]
        context: Vec<(String, String)>,
        #[command(flatten)]
        cap: CapOpts,
    },
    /// Detach a volume from a node, or from all nodes (ControllerUnpublishVolume).
    ControllerUnpublish {
        /// Volume ID.
        volume_id: String,
        /// Node ID; all nodes when omitted.
        #[arg(long)]
        node: Option<String>,
    },
    /// Check that a volume supports a capability (ValidateVolumeCapabilities).
    Validate {
        /// Volume ID.
        volume_id: String,
        /// Volume context KEY=VALUE (repeatable).
        #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_kv)]
        context: Vec<(String, String)>,
        /// Parameter KEY=VALUE (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_kv)]
        params: Vec<(String, String)>,
        #[command(flatten)]
        cap: CapOpts,
    },
    /// Grow a volume (ControllerExpandVolume).
    ExpandVolume {
        /// Volume ID.
        volume_id: String,
        #[command(flatten)]
        size: SizeOpts,
        #[command(flatten)]
        cap: CapOpts,
    },
    /// Show a volume and its status (ControllerGetVolume).
    GetVolume {
        /// Volume ID.
        volume_id: String,
    },
    /// Snapshot a volume (CreateSnapshot).
    CreateSnapshot {
        /// Snapshot name (the idempotency key).
        name: String,
        /// Volume to snapshot.
        #[arg(long, visible_alias = "volume", value_name = "ID")]
        source_volume_id: String,
        /// Parameter KEY=VALUE (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_kv)]
        params: Vec<(String, String)>,
    },
    /// Delete a snapshot (DeleteSnapshot).
    DeleteSnapshot {
        /// Snapshot ID.
        snapshot_id: String,
    },
    /// List snapshots (ListSnapshots).
    ListSnapshots {
        /// Only the snapshot with this ID.
        #[arg(long, value_name = "ID")]
        snapshot_id: Option<String>,
        /// Only snapshots of this volume.
        #[arg(long, value_name = "ID")]
        source_volume_id: Option<String>,
        #[command(flatten)]
        page: PageOpts,
    },
    /// Show a snapshot (GetSnapshot).
    GetSnapshot {
        /// Snapshot ID.
        snapshot_id: String,
    },
    /// Snapshot several volumes at one point in time (CreateVolumeGroupSnapshot).
    CreateGroupSnapshot {
        /// Group snapshot name (the idempotency key).
        name: String,
        /// A volume to snapshot (repeatable; at least one).
        #[arg(long = "source-volume-id", visible_alias = "volume", value_name = "ID", required = true)]
        source_volume_ids: Vec<String>,
        /// Parameter KEY=VALUE (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_kv)]
        params: Vec<(String, String)>,
    },
    /// Delete a group snapshot with its snapshots (DeleteVolumeGroupSnapshot).
    DeleteGroupSnapshot {
        /// Group snapshot ID.
        group_snapshot_id: String,
        /// A snapshot ID of the group, for the plugin to check (repeatable).
        #[arg(long = "snapshot-id", value_name = "ID")]
        snapshot_ids: Vec<String>,
    },
    /// Show a group snapshot and its snapshots (GetVolumeGroupSnapshot).
    GetGroupSnapshot {
        /// Group snapshot ID.
        group_snapshot_id: String,
        /// A snapshot ID of the group, for the plugin to check (repeatable).
        #[arg(long = "snapshot-id", value_name = "ID")]
        snapshot_ids: Vec<String>,
    },
    /// Show group controller capabilities (GroupControllerGetCapabilities).
    GroupCapabilities,
    /// Stage a volume on this node (NodeStageVolume).
    NodeStage {
        /// Volume ID.
        volume_id: String,
        /// Staging target path.
        #[arg(long)]
        staging_path: String,
        /// Volume context KEY=VALUE (repeatable).
        #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_kv)]
        context: Vec<(String, String)>,
        #[command(flatten)]
        cap: CapOpts,
    },
    /// Unstage a volume on this node (NodeUnstageVolume).
    NodeUnstage {
        /// Volume ID.
        volume_id: String,
        /// Staging target path.
        #[arg(long)]
        staging_path: String,
    },
    /// Publish a volume at a target path on this node (NodePublishVolume).
    NodePublish {
        /// Volume ID.
        volume_id: String,
        /// Target path.
        #[arg(long)]
        target_path: String,
        /// Staging target path, if the volume was staged.
        #[arg(long)]
        staging_path: Option<String>,
        /// Publish read-only.
        #[arg(long)]
        read_only: bool,
        /// Volume context KEY=VALUE (repeatable).
        #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_kv)]
        context: Vec<(String, String)>,
        #[command(flatten)]
        cap: CapOpts,
    },
    /// Unpublish a volume from a target path (NodeUnpublishVolume).
    NodeUnpublish {
        /// Volume ID.
        volume_id: String,
        /// Target path.
        #[arg(long)]
        target_path: String,
    },
    /// Show this node's ID, volume limit and topology (NodeGetInfo).
    NodeInfo,
    /// Show usage of a published volume (NodeGetVolumeStats).
    NodeStats {
        /// Volume ID.
        volume_id: String,
        /// Path where the volume is published.
        #[arg(long)]
        path: String,
        /// Staging target path.
        #[arg(long)]
        staging_path: Option<String>,
    },
    /// Grow a volume's filesystem on this node (NodeExpandVolume).
    NodeExpand {
        /// Volume ID.
        volume_id: String,
        /// Path where the volume is published.
        #[arg(long)]
        path: String,
        /// Staging target path.
        #[arg(long)]
        staging_path: Option<String>,
        #[command(flatten)]
        size: SizeOpts,
        #[command(flatten)]
        cap: CapOpts,
    },
    /// Show controller and node capabilities (ControllerGetCapabilities, NodeGetCapabilities).
    Capabilities,
}

/// Volume capability options of the commands that send one.
#[derive(Debug, Args)]
#[command(next_help_heading = "Volume capability")]
struct CapOpts {
    /// Ask for a raw block device instead of a mounted filesystem.
    #[arg(long)]
    block: bool,
    /// Filesystem type.
    #[arg(long, conflicts_with = "block")]
    fs_type: Option<String>,
    /// Mount flag (repeatable).
    #[arg(long = "mount-flag", value_name = "FLAG", conflicts_with = "block")]
    mount_flags: Vec<String>,
    /// Group that should own the mounted volume.
    #[arg(long, value_name = "GROUP", conflicts_with = "block")]
    mount_group: Option<String>,
    /// Access mode.
    #[arg(long, value_enum, default_value_t = Mode::SingleNodeWriter)]
    access_mode: Mode,
}

/// CSI access modes.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
}

/// New size of an expansion.
#[derive(Debug, Args)]
struct SizeOpts {
    /// New required capacity, same syntax as create-volume --size.
    #[arg(long, value_parser = parse_size)]
    size: i64,
    /// Capacity limit.
    #[arg(long, value_parser = parse_size)]
    limit: Option<i64>,
}

/// Paging options of the list commands.
#[derive(Debug, Args)]
struct PageOpts {
    /// Maximum entries per page (0: the plugin decides).
    #[arg(long, default_value_t = 0, value_name = "N")]
    max_entries: i32,
    /// Token to start from.
    #[arg(long, default_value = "", value_name = "TOKEN")]
    starting_token: String,
    /// Fetch one page and print its next token, instead of following all pages.
    #[arg(long)]
    page: bool,
}

/// Runs one `loam ctl` subcommand and prints its result on stdout.
pub async fn run(args: CtlArgs) -> Result<()> {
    let timeout = Duration::from_secs(args.timeout);
    let channel = connect(parse_endpoint(&args.endpoint)?, timeout)?;
    let (doc, text) = Ctl { channel, timeout }.execute(args.command).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{text}");
    }
    Ok(())
}

/// Where the plugin listens.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Unix(PathBuf),
    Http(String),
}

/// Parses the accepted `--endpoint` forms.
fn parse_endpoint(s: &str) -> Result<Target> {
    let unix = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:"));
    if let Some(path) = unix.or_else(|| s.starts_with('/').then_some(s)) {
        if !path.starts_with('/') {
            bail!("invalid endpoint {s:?}: the socket path must be absolute");
        }
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    match s.strip_prefix("tcp://").or_else(|| s.strip_prefix("http://")) {
        Some(addr) if !addr.is_empty() => Ok(Target::Http(format!("http://{addr}"))),
        _ => bail!("invalid endpoint {s:?}: expected unix:///path, /path or tcp://host:port"),
    }
}

/// Builds a lazily connecting channel, so that connection failures surface as statuses.
fn connect(target: Target, timeout: Duration) -> Result<Channel> {
    Ok(match target {
        Target::Unix(path) => Endpoint::try_from("http://[::]:50051")?
            .connect_timeout(timeout)
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = UnixStream::connect(&path)
                        .await
                        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            })),
        Target::Http(uri) => Endpoint::from_shared(uri)?.connect_timeout(timeout).connect_lazy(),
    })
}

/// The canonical gRPC name of a status code.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Turns a status into `CODE: message`, adding the root cause of a transport failure.
fn status_error(status: &Status) -> anyhow::Error {
    let mut message = status.message().to_owned();
    let mut cause = std::error::Error::source(status);
    while let Some(inner) = cause.and_then(|c| c.source()) {
        cause = Some(inner);
    }
    if let Some(root) = cause.map(ToString::to_string)
        && !message.contains(&root)
    {
        message = format!("{message}: {root}");
    }
    anyhow!("{}: {message}", code_name(status.code()))
}

/// A command's result: its JSON document and its readable text.
type Output = (Value, String);

/// The result of a command whose response has no fields.
fn done(text: String) -> Output {
    (json!({}), text + "\n")
}

/// A connection to the plugin.
struct Ctl {
    channel: Channel,
    timeout: Duration,
}

impl Ctl {
    /// Awaits one RPC under the per-call timeout.
    async fn call<T>(&self, rpc: impl Future<Output = Result<Response<T>, Status>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, rpc).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(status_error(&status)),
            Err(_) => bail!("DEADLINE_EXCEEDED: no response within {:?}", self.timeout),
        }
    }

    /// Runs one subcommand and returns what it prints.
    async fn execute(&self, command: Cmd) -> Result<Output> {
        let mut identity = IdentityClient::new(self.channel.clone());
        let mut ctrl = ControllerClient::new(self.channel.clone());
        let mut node = NodeClient::new(self.channel.clone());
        let mut group = GroupControllerClient::new(self.channel.clone());
        Ok(match command {
            Cmd::Info => {
                let info = self.call(identity.get_plugin_info(GetPluginInfoRequest {}));
                let info = info.await?;
                let caps = identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {});
                let caps: Vec<_> = self.call(caps).await?.capabilities.iter().filter_map(plugin_cap).collect();
                let mut text = format!("plugin {} {}\n", info.name, info.vendor_version);
                text += &map_lines("manifest", &info.manifest);
                for (kind, name) in &caps {
                    writeln!(text, "  {kind}: {name}")?;
                }
                let caps: Vec<_> = caps.into_iter().map(|(kind, name)| json!({ kind: name })).collect();
                let doc = json!({
                    "name": info.name,
                    "vendor_version": info.vendor_version,
                    "manifest": info.manifest,
                    "capabilities": caps,
                });
                (doc, text)
            }
            Cmd::Probe => {
                let ready = self.call(identity.probe(ProbeRequest {})).await?.ready;
                let text = match ready {
                    Some(false) => "not ready\n",
                    _ => "ready\n",
                };
                (json!({ "ready": ready }), text.to_owned())
            }
            Cmd::CreateVolume { name, size, limit, params, from_snapshot, from_volume, node: on, cap } => {
                use volume_content_source::{SnapshotSource, Type, VolumeSource};
                let source = from_snapshot
                    .map(|snapshot_id| Type::Snapshot(SnapshotSource { snapshot_id }))
                    .or(from_volume.map(|volume_id| Type::Volume(VolumeSource { volume_id })));
                let request = CreateVolumeRequest {
                    name,
                    capacity_range: capacity_range(size, limit),
                    volume_capabilities: vec![cap.capability()],
                    parameters: params.into_iter().collect(),
                    volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
                    accessibility_requirements: on.map(|n| TopologyRequirement {
                        requisite: vec![node_topology(&n)],
                        preferred: vec![node_topology(&n)],
                    }),
                    ..Default::default()
                };
                let volume = self.call(ctrl.create_volume(request)).await?.volume;
                let volume = volume.ok_or_else(|| anyhow!("the plugin returned no volume"))?;
                (json!({ "volume": volume_json(&volume) }), volume_text(&volume, " created"))
            }
            Cmd::DeleteVolume { volume_id } => {
                let text = format!("volume {volume_id} deleted");
                let request = DeleteVolumeRequest { volume_id, ..Default::default() };
                self.call(ctrl.delete_volume(request)).await?;
                done(text)
            }
            Cmd::ListVolumes(page) => {
                let (entries, next) = page
                    .collect(|starting_token, max_entries| {
                        let request = ListVolumesRequest { max_entries, starting_token };
                        let mut ctrl = ctrl.clone();
                        async move {
                            let r = self.call(ctrl.list_volumes(request)).await?;
                            Ok((r.entries, r.next_token))
                        }
                    })
                    .await?;
                let (rows, docs) = entries
                    .into_iter()
                    .map(|e| {
                        let v = e.volume.unwrap_or_default();
                        let s = e.status.unwrap_or_default();
                        let condition = s.volume_condition.as_ref();
                        let row = vec![
                            v.volume_id.clone(),
                            bytes(v.capacity_bytes),
                            volume_node(&v).unwrap_or("-").to_owned(),
                            list_or_dash(&s.published_node_ids),
                            condition_text(condition),
                        ];
                        let status = status_json(&s.published_node_ids, condition);
                        (row, json!({ "volume": volume_json(&v), "status": status }))
                    })
                    .unzip();
                let header = ["VOLUME_ID", "CAPACITY", "NODE", "PUBLISHED_ON", "CONDITION"];
                list_output(&header, rows, docs, next, page.page)
            }
            Cmd::GetCapacity { params, node: on, cap } => {
                let request = GetCapacityRequest {
                    volume_capabilities: vec![cap.capability()],
                    parameters: params.into_iter().collect(),
                    accessible_topology: on.as_deref().map(node_topology),
                };
                let r = self.call(ctrl.get_capacity(request)).await?;
                let (min, max) = (r.minimum_volume_size, r.maximum_volume_size);
                let mut text = format!("available: {}\n", bytes(r.available_capacity));
                if min.is_some() || max.is_some() {
                    let [min, max] = [min, max].map(|s| s.map_or("-".to_owned(), bytes));
                    writeln!(text, "volume size: {min} to {max}")?;
                }
                let doc = json!({
                    "available_capacity": r.available_capacity,
                    "maximum_volume_size": max,
                    "minimum_volume_size": min,
                });
                (doc, text)
            }
            Cmd::ControllerPublish { volume_id, node: node_id, read_only, context, cap } => {
                let text = format!("volume {volume_id} published to node {node_id}\n");
                let request = ControllerPublishVolumeRequest {
                    volume_id,
                    node_id,
                    volume_capability: Some(cap.capability()),
                    readonly: read_only,
                    volume_context: context.into_iter().collect(),
                    ..Default::default()
                };
                let r = self.call(ctrl.controller_publish_volume(request)).await?;
                let text = text + &map_lines("publish context", &r.publish_context);
                (json!({ "publish_context": r.publish_context }), text)
            }
            Cmd::ControllerUnpublish { volume_id, node: node_id } => {
                let from = node_id.as_ref().map_or("all nodes".to_owned(), |n| format!("node {n}"));
                let text = format!("volume {volume_id} unpublished from {from}");
                let node_id = node_id.unwrap_or_default();
                let request = ControllerUnpublishVolumeRequest { volume_id, node_id, ..Default::default() };
                self.call(ctrl.controller_unpublish_volume(request)).await?;
                done(text)
            }
            Cmd::Validate { volume_id, context, params, cap } => {
                let text = format!("volume {volume_id}: capability");
                let request = ValidateVolumeCapabilitiesRequest {
                    volume_id,
                    volume_context: context.into_iter().collect(),
                    volume_capabilities: vec![cap.capability()],
                    parameters: params.into_iter().collect(),
                    ..Default::default()
                };
                let r = self.call(ctrl.validate_volume_capabilities(request)).await?;
                let text = match (&r.confirmed, r.message.as_str()) {
                    (Some(_), _) => format!("{text} confirmed\n"),
                    (None, "") => format!("{text} not confirmed\n"),
                    (None, message) => format!("{text} not confirmed: {message}\n"),
                };
                let confirmed = r.confirmed.map(|c| {
                    let caps: Vec<_> = c.volume_capabilities.iter().map(capability_json).collect();
                    json!({
                        "volume_context": c.volume_context,
                        "volume_capabilities": caps,
                        "parameters": c.parameters,
                        "mutable_parameters": c.mutable_parameters,
                    })
                });
                (json!({ "confirmed": confirmed, "message": r.message }), text)
            }
            Cmd::ExpandVolume { volume_id, size, cap } => {
                let text = format!("volume {volume_id} expanded to");
                let request = ControllerExpandVolumeRequest {
                    volume_id,
                    capacity_range: size.range(),
                    volume_capability: Some(cap.capability()),
                    ..Default::default()
                };
                let r = self.call(ctrl.controller_expand_volume(request)).await?;
                let more = if r.node_expansion_required { ", node expansion required" } else { "" };
                let doc = json!({
                    "capacity_bytes": r.capacity_bytes,
                    "node_expansion_required": r.node_expansion_required,
                });
                (doc, format!("{text} {}{more}\n", bytes(r.capacity_bytes)))
            }
            Cmd::GetVolume { volume_id } => {
                let r = ctrl.controller_get_volume(ControllerGetVolumeRequest { volume_id });
                let r = self.call(r).await?;
                let volume = r.volume.ok_or_else(|| anyhow!("the plugin returned no volume"))?;
                let s = r.status.unwrap_or_default();
                let condition = s.volume_condition.as_ref();
                let mut text = volume_text(&volume, "");
                writeln!(text, "  published on: {}", list_or_dash(&s.published_node_ids))?;
                writeln!(text, "  condition: {}", condition_text(condition))?;
                let status = status_json(&s.published_node_ids, condition);
                (json!({ "volume": volume_json(&volume), "status": status }), text)
            }
            Cmd::CreateSnapshot { name, source_volume_id, params } => {
                let parameters = params.into_iter().collect();
                let request = CreateSnapshotRequest { source_volume_id, name, parameters, ..Default::default() };
                snapshot_output(self.call(ctrl.create_snapshot(request)).await?.snapshot, " created")?
            }
            Cmd::DeleteSnapshot { snapshot_id } => {
                let text = format!("snapshot {snapshot_id} deleted");
                let request = DeleteSnapshotRequest { snapshot_id, ..Default::default() };
                self.call(ctrl.delete_snapshot(request)).await?;
                done(text)
            }
            Cmd::ListSnapshots { snapshot_id, source_volume_id, page } => {
                let (entries, next) = page
                    .collect(|starting_token, max_entries| {
                        let request = ListSnapshotsRequest {
                            max_entries,
                            starting_token,
                            source_volume_id: source_volume_id.clone().unwrap_or_default(),
                            snapshot_id: snapshot_id.clone().unwrap_or_default(),
                            ..Default::default()
                        };
                        let mut ctrl = ctrl.clone();
                        async move {
                            let r = self.call(ctrl.list_snapshots(request)).await?;
                            Ok((r.entries, r.next_token))
                        }
                    })
                    .await?;
                let (rows, docs) = entries
                    .into_iter()
                    .map(|e| {
                        let s = e.snapshot.unwrap_or_default();
                        let row = vec![
                            s.snapshot_id.clone(),
                            s.source_volume_id.clone(),
                            bytes(s.size_bytes),
                            if s.ready_to_use { "yes" } else { "no" }.to_owned(),
                            s.creation_time.map_or("-".to_owned(), |t| t.to_string()),
                        ];
                        (row, json!({ "snapshot": snapshot_json(&s) }))
                    })
                    .unzip();
                let header = ["SNAPSHOT_ID", "SOURCE_VOLUME_ID", "SIZE", "READY", "CREATED"];
                list_output(&header, rows, docs, next, page.page)
            }
            Cmd::GetSnapshot { snapshot_id } => {
                let request = GetSnapshotRequest { snapshot_id, ..Default::default() };
                snapshot_output(self.call(ctrl.get_snapshot(request)).await?.snapshot, "")?
            }
            Cmd::CreateGroupSnapshot { name, source_volume_ids, params } => {
                let parameters = params.into_iter().collect();
                let request =
                    CreateVolumeGroupSnapshotRequest { name, source_volume_ids, parameters, ..Default::default() };
                let r = self.call(group.create_volume_group_snapshot(request)).await?;
                group_snapshot_output(r.group_snapshot, " created")?
            }
            Cmd::DeleteGroupSnapshot { group_snapshot_id, snapshot_ids } => {
                let text = format!("group snapshot {group_snapshot_id} deleted with its snapshots");
                let request =
                    DeleteVolumeGroupSnapshotRequest { group_snapshot_id, snapshot_ids, ..Default::default() };
                self.call(group.delete_volume_group_snapshot(request)).await?;
                done(text)
            }
            Cmd::GetGroupSnapshot { group_snapshot_id, snapshot_ids } => {
                let request = GetVolumeGroupSnapshotRequest { group_snapshot_id, snapshot_ids, ..Default::default() };
                group_snapshot_output(self.call(group.get_volume_group_snapshot(request)).await?.group_snapshot, "")?
            }
            Cmd::GroupCapabilities => {
                use group_controller_service_capability::{Type as G, rpc::Type as GType};
                let request = GroupControllerGetCapabilitiesRequest {};
                let r = self.call(group.group_controller_get_capabilities(request)).await?;
                let names: Vec<_> = (r.capabilities.iter().filter_map(|c| c.r#type))
                    .map(|G::Rpc(rpc)| enum_name(rpc.r#type, GType::as_str_name))
                    .collect();
                (json!({ "group_controller": names }), format!("group controller: {}\n", list_or_dash(&names)))
            }
            Cmd::NodeStage { volume_id, staging_path, context, cap } => {
                let text = format!("volume {volume_id} staged at {staging_path}");
                let request = NodeStageVolumeRequest {
                    volume_id,
                    staging_target_path: staging_path,
                    volume_capability: Some(cap.capability()),
                    volume_context: context.into_iter().collect(),
                    ..Default::default()
                };
                self.call(node.node_stage_volume(request)).await?;
                done(text)
            }
            Cmd::NodeUnstage { volume_id, staging_path } => {
                let text = format!("volume {volume_id} unstaged from {staging_path}");
                let request = NodeUnstageVolumeRequest { volume_id, staging_target_path: staging_path };
                self.call(node.node_unstage_volume(request)).await?;
                done(text)
            }
            Cmd::NodePublish { volume_id, target_path, staging_path, read_only, context, cap } => {
                let text = format!("volume {volume_id} published at {target_path}");
                let request = NodePublishVolumeRequest {
                    volume_id,
                    staging_target_path: staging_path.unwrap_or_default(),
                    target_path,
                    volume_capability: Some(cap.capability()),
                    readonly: read_only,
                    volume_context: context.into_iter().collect(),
                    ..Default::default()
                };
                self.call(node.node_publish_volume(request)).await?;
                done(text)
            }
            Cmd::NodeUnpublish { volume_id, target_path } => {
                let text = format!("volume {volume_id} unpublished from {target_path}");
                let request = NodeUnpublishVolumeRequest { volume_id, target_path };
                self.call(node.node_unpublish_volume(request)).await?;
                done(text)
            }
            Cmd::NodeInfo => {
                let r = self.call(node.node_get_info(NodeGetInfoRequest {})).await?;
                let segments = r.accessible_topology.map(|t| t.segments);
                let max = match r.max_volumes_per_node {
                    0 => "unlimited".to_owned(),
                    n => n.to_string(),
                };
                let text = format!("node {}: max volumes {max}\n", r.node_id)
                    + &map_lines("topology", segments.as_ref().unwrap_or(&HashMap::new()));
                let doc = json!({
                    "node_id": r.node_id,
                    "max_volumes_per_node": r.max_volumes_per_node,
                    "accessible_topology": segments.map(|s| json!({ "segments": s })),
                });
                (doc, text)
            }
            Cmd::NodeStats { volume_id, path, staging_path } => {
                let request = NodeGetVolumeStatsRequest {
                    volume_id,
                    volume_path: path,
                    staging_target_path: staging_path.unwrap_or_default(),
                };
                let r = self.call(node.node_get_volume_stats(request)).await?;
                let (rows, usage): (Vec<_>, Vec<_>) = r
                    .usage
                    .iter()
                    .map(|u| {
                        let unit = enum_name(u.unit, volume_usage::Unit::as_str_name);
                        let is_bytes = u.unit == volume_usage::Unit::Bytes as i32;
                        let [total, used, available] =
                            [u.total, u.used, u.available].map(|n| if is_bytes { bytes(n) } else { n.to_string() });
                        let doc = json!({ "unit": unit, "total": u.total, "used": u.used, "available": u.available });
                        (vec![unit, total, used, available], doc)
                    })
                    .unzip();
                let condition = r.volume_condition.as_ref();
                let text = table(&["UNIT", "TOTAL", "USED", "AVAILABLE"], &rows)
                    + &format!("condition: {}\n", condition_text(condition));
                let doc = json!({ "usage": usage, "volume_condition": condition.map(condition_json) });
                (doc, text)
            }
            Cmd::NodeExpand { volume_id, path, staging_path, size, cap } => {
                let text = format!("volume {volume_id} expanded on the node to");
                let request = NodeExpandVolumeRequest {
                    volume_id,
                    volume_path: path,
                    capacity_range: size.range(),
                    staging_target_path: staging_path.unwrap_or_default(),
                    volume_capability: Some(cap.capability()),
                    ..Default::default()
                };
                let r = self.call(node.node_expand_volume(request)).await?;
                let doc = json!({ "capacity_bytes": r.capacity_bytes });
                (doc, format!("{text} {}\n", bytes(r.capacity_bytes)))
            }
            Cmd::Capabilities => {
                use controller_service_capability::{Type as C, rpc::Type as CType};
                use node_service_capability::{Type as N, rpc::Type as NType};
                let request = ControllerGetCapabilitiesRequest {};
                let c = self.call(ctrl.controller_get_capabilities(request)).await?;
                let n = self.call(node.node_get_capabilities(NodeGetCapabilitiesRequest {})).await?;
                let controller: Vec<_> = (c.capabilities.iter().filter_map(|c| c.r#type))
                    .map(|C::Rpc(rpc)| enum_name(rpc.r#type, CType::as_str_name))
                    .collect();
                let node: Vec<_> = (n.capabilities.iter().filter_map(|c| c.r#type))
                    .map(|N::Rpc(rpc)| enum_name(rpc.r#type, NType::as_str_name))
                    .collect();
                let text = format!("controller: {}\nnode: {}\n", list_or_dash(&controller), list_or_dash(&node));
                (json!({ "controller": controller, "node": node }), text)
            }
        })
    }
}

impl PageOpts {
    /// Fetches pages via `fetch(token, max_entries)`, following `next_token` unless `--page`.
    async fn collect<E, F, Fut>(&self, mut fetch: F) -> Result<(Vec<E>, String)>
    where
        F: FnMut(String, i32) -> Fut,
        Fut: Future<Output = Result<(Vec<E>, String)>>,
    {
        let (mut all, mut token) = (Vec::new(), self.starting_token.clone());
        loop {
            let (entries, next) = fetch(token.clone(), self.max_entries).await?;
            all.extend(entries);
            if self.page || next.is_empty() {
                return Ok((all, next));
            }
            if next == token {
                bail!("the plugin returned next_token {next:?} twice in a row");
            }
            token = next;
        }
    }
}

impl CapOpts {
    /// Builds the volume capability these options describe.
    fn capability(&self) -> VolumeCapability {
        use access_mode::Mode as M;
        let mode = match self.access_mode {
            Mode::SingleNodeWriter => M::SingleNodeWriter,
            Mode::SingleNodeReaderOnly => M::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter => M::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter => M::SingleNodeMultiWriter,
            Mode::MultiNodeReaderOnly => M::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter => M::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter => M::MultiNodeMultiWriter,
        };
        let access_type = if self.block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: self.fs_type.clone().unwrap_or_default(),
                mount_flags: self.mount_flags.clone(),
                volume_mount_group: self.mount_group.clone().unwrap_or_default(),
            })
        };
        let access_mode = Some(AccessMode { mode: mode as i32 });
        VolumeCapability { access_mode, access_type: Some(access_type) }
    }
}

impl SizeOpts {
    /// The requested capacity range.
    fn range(&self) -> Option<CapacityRange> {
        capacity_range(Some(self.size), self.limit)
    }
}

/// Parses a size: bytes, or a number with K/M/G/T (powers of 1000) or Ki/Mi/Gi/Ti (of 1024).
fn parse_size(s: &str) -> Result<i64, String> {
    let (digits, suffix) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let multiplier: u64 = match suffix {
        "" => 1,
        "K" | "k" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => 0,
    };
    if digits.is_empty() || multiplier == 0 {
        return Err(format!("invalid size {s:?}: expected bytes or a number with K, M, G, T, Ki, Mi, Gi or Ti"));
    }
    (digits.parse::<u64>().ok())
        .and_then(|n| n.checked_mul(multiplier))
        .and_then(|n| i64::try_from(n).ok())
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses `KEY=VALUE`.
fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Formats a byte count in binary units with one decimal, e.g. `64.0 MiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let (mut value, mut unit) = (n as f64 / 1024.0, 0);
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Formats a protobuf size; a negative one is shown as is.
fn bytes(n: i64) -> String {
    u64::try_from(n).map_or_else(|_| n.to_string(), human_bytes)
}

/// A capacity range, or none when neither bound is given.
fn capacity_range(required: Option<i64>, limit: Option<i64>) -> Option<CapacityRange> {
    (required.is_some() || limit.is_some())
        .then(|| CapacityRange { required_bytes: required.unwrap_or(0), limit_bytes: limit.unwrap_or(0) })
}

/// The topology of one node.
fn node_topology(node: &str) -> Topology {
    Topology { segments: HashMap::from([(NODE_KEY.to_owned(), node.to_owned())]) }
}

/// The node a volume lives on, if its topology says.
fn volume_node(v: &Volume) -> Option<&str> {
    v.accessible_topology.iter().find_map(|t| t.segments.get(NODE_KEY)).map(String::as_str)
}

/// The name of a protobuf enum value, or `UNKNOWN(n)` for a value this build lacks.
fn enum_name<E: TryFrom<i32>>(value: i32, name: fn(&E) -> &'static str) -> String {
    E::try_from(value).map_or_else(|_| format!("UNKNOWN({value})"), |e| name(&e).to_owned())
}

/// A plugin capability as (field name, value name).
fn plugin_cap(cap: &PluginCapability) -> Option<(&'static str, String)> {
    use plugin_capability::{Type, service, volume_expansion};
    Some(match cap.r#type? {
        Type::Service(s) => ("service", enum_name(s.r#type, service::Type::as_str_name)),
        Type::VolumeExpansion(e) => ("volume_expansion", enum_name(e.r#type, volume_expansion::Type::as_str_name)),
    })
}

/// Indented `label: key=value` lines, sorted by key.
fn map_lines(label: &str, map: &HashMap<String, String>) -> String {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort();
    entries.iter().map(|(k, v)| format!("  {label}: {k}={v}\n")).collect()
}

/// A comma-separated list, or `-` when empty.
fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() { "-".to_owned() } else { items.join(", ") }
}

/// A readable volume condition.
fn condition_text(c: Option<&VolumeCondition>) -> String {
    match c {
        None => "-".to_owned(),
        Some(c) if c.abnormal => format!("abnormal: {}", c.message),
        Some(c) if c.message.is_empty() => "ok".to_owned(),
        Some(c) => format!("ok: {}", c.message),
    }
}

/// A volume's summary line, content source and context.
fn volume_text(v: &Volume, verb: &str) -> String {
    use volume_content_source::Type;
    let on = volume_node(v).map_or(String::new(), |n| format!(" on node {n}"));
    let mut text = format!("volume {}{verb}: {}{on}\n", v.volume_id, bytes(v.capacity_bytes));
    match v.content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
        Some(Type::Snapshot(s)) => text += &format!("  source: snapshot {}\n", s.snapshot_id),
        Some(Type::Volume(s)) => text += &format!("  source: volume {}\n", s.volume_id),
        None => {}
    }
    text + &map_lines("context", &v.volume_context)
}

/// JSON for a volume.
fn volume_json(v: &Volume) -> Value {
    use volume_content_source::Type;
    let source = v.content_source.as_ref().and_then(|s| s.r#type.as_ref()).map(|t| match t {
        Type::Snapshot(s) => json!({ "snapshot": { "snapshot_id": s.snapshot_id } }),
        Type::Volume(s) => json!({ "volume": { "volume_id": s.volume_id } }),
    });
    let topology: Vec<_> = v.accessible_topology.iter().map(|t| json!({ "segments": t.segments })).collect();
    json!({
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "volume_context": v.volume_context,
        "content_source": source,
        "accessible_topology": topology,
    })
}

/// JSON for a volume condition.
fn condition_json(c: &VolumeCondition) -> Value {
    json!({ "abnormal": c.abnormal, "message": c.message })
}

/// JSON for a volume status.
fn status_json(published: &[String], condition: Option<&VolumeCondition>) -> Value {
    json!({ "published_node_ids": published, "volume_condition": condition.map(condition_json) })
}

/// JSON for a volume capability.
fn capability_json(c: &VolumeCapability) -> Value {
    let mode = c.access_mode.map(|m| enum_name(m.mode, access_mode::Mode::as_str_name));
    let access_type = match &c.access_type {
        Some(AccessType::Block(_)) => json!({ "block": {} }),
        Some(AccessType::Mount(m)) => json!({ "mount": {
            "fs_type": m.fs_type, "mount_flags": m.mount_flags, "volume_mount_group": m.volume_mount_group,
        }}),
        None => Value::Null,
    };
    json!({ "access_mode": { "mode": mode }, "access_type": access_type })
}

/// JSON for a snapshot.
fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "creation_time": s.creation_time.map(|t| t.to_string()),
        "ready_to_use": s.ready_to_use,
        "group_snapshot_id": s.group_snapshot_id,
    })
}

/// The output of a command that returns one snapshot.
fn snapshot_output(snapshot: Option<Snapshot>, verb: &str) -> Result<Output> {
    let s = snapshot.ok_or_else(|| anyhow!("the plugin returned no snapshot"))?;
    let ready = if s.ready_to_use { "ready" } else { "not ready" };
    let (id, volume, size) = (&s.snapshot_id, &s.source_volume_id, bytes(s.size_bytes));
    let text = format!("snapshot {id} of volume {volume}{verb}: {size}, {ready}\n");
    Ok((json!({ "snapshot": snapshot_json(&s) }), text))
}

/// JSON for a group snapshot.
fn group_snapshot_json(g: &VolumeGroupSnapshot) -> Value {
    json!({
        "group_snapshot_id": g.group_snapshot_id,
        "snapshots": g.snapshots.iter().map(snapshot_json).collect::<Vec<_>>(),
        "creation_time": g.creation_time.map(|t| t.to_string()),
        "ready_to_use": g.ready_to_use,
    })
}

/// The output of a command that returns one group snapshot: a summary line,
/// then a line per snapshot.
fn group_snapshot_output(group: Option<VolumeGroupSnapshot>, verb: &str) -> Result<Output> {
    let g = group.ok_or_else(|| anyhow!("the plugin returned no group snapshot"))?;
    let ready = if g.ready_to_use { "ready" } else { "not ready" };
    let mut text = format!("group snapshot {}{verb}: {} snapshots, {ready}\n", g.group_snapshot_id, g.snapshots.len());
    for s in &g.snapshots {
        writeln!(text, "  snapshot {} of volume {}: {}", s.snapshot_id, s.source_volume_id, bytes(s.size_bytes))?;
    }
    Ok((json!({ "group_snapshot": group_snapshot_json(&g) }), text))
}

/// The output of a list command: a table, plus the next token of a single page.
fn list_output(header: &[&str], rows: Vec<Vec<String>>, entries: Vec<Value>, next: String, page: bool) -> Output {
    let mut text = table(header, &rows);
    if page && !next.is_empty() {
        text += &format!("next token: {next}\n");
    }
    (json!({ "entries": entries, "next_token": next }), text)
}

/// Left-aligned columns two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let cells: Vec<_> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        cells.join("  ").trim_end().to_owned() + "\n"
    };
    let body: String = rows.iter().map(|row| line(row.iter().map(String::as_str).collect())).collect();
    line(header.to_vec()) + &body
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CtlArgs,
    }

    fn parse(argv: &[&str]) -> Result<CtlArgs, clap::Error> {
        Cli::try_parse_from(["ctl"].iter().chain(argv)).map(|cli| cli.args)
    }

    fn capability(argv: &[&str]) -> VolumeCapability {
        match parse(&[&["validate", "vol"], argv].concat()).expect("valid arguments").command {
            Cmd::Validate { cap, .. } => cap.capability(),
            other => panic!("unexpected command {other:?}"),
        }
    }

    #[test]
    fn sizes() {
        let cases = [("0", 0), ("4096", 4096), ("10K", 10_000), ("10k", 10_000), ("3M", 3_000_000)];
        let more = [("2G", 2_000_000_000), ("1T", 1_000_000_000_000), ("1Ki", 1024), ("64Mi", 64 << 20)];
        let binary = [("5Gi", 5 << 30), ("2Ti", 2 << 40), ("9223372036854775807", i64::MAX)];
        for (text, want) in cases.into_iter().chain(more).chain(binary) {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in ["", "Mi", "abc", "-1", "1.5Gi", "12X", "1 Gi", "1gi", "1MiB", " 1", "0x10"] {
            assert!(parse_size(bad).expect_err(bad).contains("invalid size"), "{bad}");
        }
        for huge in ["9223372036854775808", "8388608Ti", "99999999999999999999999", "18446744073709551615"] {
            assert!(parse_size(huge).expect_err(huge).contains("too large"), "{huge}");
        }
        assert_eq!(parse_size("8388607Ti"), Ok(8_388_607 << 40));
    }

    #[test]
    fn human_sizes() {
        let cases = [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (64 << 20, "64.0 MiB")];
        for (n, want) in cases.into_iter().chain([((1 << 20) - 1, "1.0 MiB"), (u64::MAX, "16.0 EiB")]) {
            assert_eq!(human_bytes(n), want);
        }
        assert_eq!(bytes(-1), "-1");
    }

    #[test]
    fn endpoints() {
        let unix = |p: &str| Some(Target::Unix(PathBuf::from(p)));
        assert_eq!(parse_endpoint("unix:///var/lib/loam/csi.sock").ok(), unix("/var/lib/loam/csi.sock"));
        assert_eq!(parse_endpoint("unix:/tmp/csi.sock").ok(), unix("/tmp/csi.sock"));
        assert_eq!(parse_endpoint("/tmp/csi.sock").ok(), unix("/tmp/csi.sock"));
        let http = |s: &str| Some(Target::Http(s.to_owned()));
        assert_eq!(parse_endpoint("tcp://127.0.0.1:10000").ok(), http("http://127.0.0.1:10000"));
        assert_eq!(parse_endpoint("http://localhost:9000").ok(), http("http://localhost:9000"));
        for bad in ["unix://relative.sock", "unix:relative", "csi.sock", "tcp://", "https://x:1", ""] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_values() {
        assert_eq!(parse_kv("a=b"), Ok(("a".into(), "b".into())));
        assert_eq!(parse_kv("a="), Ok(("a".into(), String::new())));
        assert_eq!(parse_kv("k=v=w"), Ok(("k".into(), "v=w".into())));
        assert!(parse_kv("novalue").is_err() && parse_kv("=v").is_err());
    }

    #[test]
    fn capabilities() {
        let mode = |m: access_mode::Mode| Some(AccessMode { mode: m as i32 });
        let cap = capability(&[]);
        assert_eq!(cap.access_mode, mode(access_mode::Mode::SingleNodeWriter));
        assert_eq!(cap.access_type, Some(AccessType::Mount(MountVolume::default())));

        let argv = ["--fs-type=xfs", "--mount-flag=noatime", "--mount-flag", "nodev", "--mount-group=1000"];
        let cap = capability(&[&argv[..], &["--access-mode=multi-node-reader-only"]].concat());
        assert_eq!(cap.access_mode, mode(access_mode::Mode::MultiNodeReaderOnly));
        let mount = MountVolume {
            fs_type: "xfs".into(),
            mount_flags: vec!["noatime".into(), "nodev".into()],
            volume_mount_group: "1000".into(),
        };
        assert_eq!(cap.access_type, Some(AccessType::Mount(mount)));

        let cap = capability(&["--block", "--access-mode", "single-node-single-writer"]);
        let want = json!({ "access_mode": { "mode": "SINGLE_NODE_SINGLE_WRITER" }, "access_type": { "block": {} } });
        assert_eq!(capability_json(&cap), want);
        assert!(parse(&["validate", "v", "--block", "--fs-type", "ext4"]).is_err());
    }

    #[test]
    fn command_line() {
        Cli::command().debug_assert();
        let argv = ["--endpoint=/x.sock", "create-volume", "pvc", "--size=64Mi", "--param=a=b", "--node=n1", "--json"];
        let args = parse(&argv).expect("valid arguments");
        assert!(args.json && args.endpoint == "/x.sock" && args.timeout == 30);
        let Cmd::CreateVolume { name, size, params, node, .. } = args.command else { panic!("not create-volume") };
        assert_eq!((name.as_str(), size, node.as_deref()), ("pvc", Some(64 << 20), Some("n1")));
        assert_eq!(params, [("a".to_owned(), "b".to_owned())]);
        assert!(parse(&["create-volume", "x", "--size=12Q"]).is_err());
        assert!(parse(&["create-volume", "x", "--from-snapshot=a", "--from-volume=b"]).is_err());
    }

    #[test]
    fn group_snapshot_commands() {
        let args = parse(&["create-group-snapshot", "g", "--volume", "a", "--source-volume-id=b", "--param=k=v"]);
        let Cmd::CreateGroupSnapshot { name, source_volume_ids, params } = args.expect("valid arguments").command
        else {
            panic!("not create-group-snapshot")
        };
        assert_eq!((name.as_str(), source_volume_ids), ("g", vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(params, [("k".to_owned(), "v".to_owned())]);
        assert!(parse(&["create-group-snapshot", "g"]).is_err(), "a group needs a volume");
        let args = parse(&["get-group-snapshot", "gid", "--snapshot-id", "s1", "--snapshot-id", "s2"]).unwrap();
        let Cmd::GetGroupSnapshot { snapshot_ids, .. } = args.command else { panic!("not get-group-snapshot") };
        assert_eq!(snapshot_ids, ["s1", "s2"]);

        let snapshot = |id: &str, volume: &str| Snapshot {
            snapshot_id: id.into(),
            source_volume_id: volume.into(),
            size_bytes: 1 << 20,
            ready_to_use: true,
            group_snapshot_id: "g1".into(),
            ..Default::default()
        };
        let g = VolumeGroupSnapshot {
            group_snapshot_id: "g1".into(),
            snapshots: vec![snapshot("s1", "v1"), snapshot("s2", "v2")],
            ready_to_use: true,
            ..Default::default()
        };
        let (doc, text) = group_snapshot_output(Some(g), " created").unwrap();
        let want = "group snapshot g1 created: 2 snapshots, ready\n  snapshot s1 of volume v1: 1.0 MiB\n  snapshot s2 \
                    of volume v2: 1.0 MiB\n";
        assert_eq!(text, want);
        assert_eq!(doc["group_snapshot"]["snapshots"][1]["group_snapshot_id"], "g1");
        assert!(group_snapshot_output(None, "").is_err());
    }

    #[test]
    fn readable_output() {
        let rows = [vec!["vol-1".to_owned(), "1.0 GiB".to_owned()], vec!["v".to_owned(), "-".to_owned()]];
        assert_eq!(table(&["ID", "SIZE"], &rows), "ID     SIZE\nvol-1  1.0 GiB\nv      -\n");
        let volume_context = HashMap::from([("b".into(), "2".into()), ("a".into(), "1".into())]);
        let topology = vec![node_topology("x")];
        let v = Volume {
            volume_id: "v1".into(),
            capacity_bytes: 64 << 20,
            volume_context,
            accessible_topology: topology,
            ..Default::default()
        };
        let want = "volume v1 created: 64.0 MiB on node x\n  context: a=1\n  context: b=2\n";
        assert_eq!(volume_text(&v, " created"), want);
        assert_eq!(volume_json(&v)["accessible_topology"][0]["segments"][NODE_KEY], "x");
    }
}
