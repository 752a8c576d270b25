//! The command line of `loam ctl`: its options, its subcommands (one per CSI RPC),
//! the option groups they share, and what each group turns into in a request.

use std::collections::HashMap;

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use loam::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode};
use loam::csi::{CapacityRange, Topology, VolumeCapability};

use loam::config::TOPOLOGY_NODE_KEY;

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
    pub(super) endpoint: String,
    /// Print one machine-readable JSON document instead of text.
    #[arg(long, global = true, help_heading = "Global options")]
    pub(super) json: bool,
    /// Timeout for each RPC, in seconds.
    #[arg(long, default_value_t = 30, global = true, value_name = "SECONDS", help_heading = "Global options")]
    pub(super) timeout: u64,
    #[command(subcommand)]
    pub(super) command: Cmd,
}

/// The subcommands, one per CSI RPC.
#[derive(Debug, Subcommand)]
pub(super) enum Cmd {
    /// Show plugin name, version, manifest and capabilities (GetPluginInfo, GetPluginCapabilities).
    Info,
    /// Ask whether the plugin is ready (Probe).
    Probe,
    /// Create a volume (CreateVolume).
    CreateVolume(CreateVolume),
    /// Delete a volume (DeleteVolume).
    DeleteVolume(DeleteVolume),
    /// List volumes (ListVolumes).
    ListVolumes(PageOpts),
    /// Show available capacity (GetCapacity).
    GetCapacity(GetCapacity),
    /// Attach a volume to a node (ControllerPublishVolume).
    ControllerPublish(ControllerPublish),
    /// Detach a volume from a node, or from all nodes (ControllerUnpublishVolume).
    ControllerUnpublish(ControllerUnpublish),
    /// Check that a volume supports a capability (ValidateVolumeCapabilities).
    Validate(Validate),
    /// Grow a volume (ControllerExpandVolume).
    ExpandVolume(ExpandVolume),
    /// Change a volume's mutable parameters (ControllerModifyVolume), e.g.
    /// `--param provisioning=thick` on a loop volume.
    ModifyVolume(ModifyVolume),
    /// Show a volume and its status (ControllerGetVolume).
    GetVolume(GetVolume),
    /// Snapshot a volume (CreateSnapshot).
    CreateSnapshot(CreateSnapshot),
    /// Delete a snapshot (DeleteSnapshot).
    DeleteSnapshot(DeleteSnapshot),
    /// List snapshots (ListSnapshots).
    ListSnapshots(ListSnapshots),
    /// Show a snapshot (GetSnapshot).
    GetSnapshot(GetSnapshot),
    /// Snapshot several volumes at one point in time (CreateVolumeGroupSnapshot).
    CreateGroupSnapshot(CreateGroupSnapshot),
    /// Delete a group snapshot with its snapshots (DeleteVolumeGroupSnapshot).
    DeleteGroupSnapshot(DeleteGroupSnapshot),
    /// Show a group snapshot and its snapshots (GetVolumeGroupSnapshot).
    GetGroupSnapshot(GetGroupSnapshot),
    /// Show group controller capabilities (GroupControllerGetCapabilities).
    GroupCapabilities,
    /// Stage a volume on this node (NodeStageVolume).
    NodeStage(NodeStage),
    /// Unstage a volume on this node (NodeUnstageVolume).
    NodeUnstage(NodeUnstage),
    /// Publish a volume at a target path on this node (NodePublishVolume).
    NodePublish(NodePublish),
    /// Unpublish a volume from a target path (NodeUnpublishVolume).
    NodeUnpublish(NodeUnpublish),
    /// Show this node's ID, volume limit and topology (NodeGetInfo).
    NodeInfo,
    /// Show usage of a published volume (NodeGetVolumeStats).
    NodeStats(NodeStats),
    /// Grow a volume's filesystem on this node (NodeExpandVolume).
    NodeExpand(NodeExpand),
    /// Show controller and node capabilities (ControllerGetCapabilities, NodeGetCapabilities).
    Capabilities,
}

#[derive(Debug, Args)]
pub(super) struct CreateVolume {
    /// Volume name (the idempotency key).
    pub(super) name: String,
    /// Required capacity: bytes, or a Kubernetes quantity such as 64Mi, 1.5Gi or 500M.
    #[arg(long, value_parser = parse_size)]
    pub(super) size: Option<i64>,
    /// Capacity limit, same syntax as --size.
    #[arg(long, value_parser = parse_size)]
    pub(super) limit: Option<i64>,
    /// Creation parameter KEY=VALUE (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub(super) params: Vec<(String, String)>,
    /// Restore this snapshot into the new volume.
    #[arg(long, value_name = "ID", conflicts_with = "from_volume")]
    pub(super) from_snapshot: Option<String>,
    /// Clone this volume.
    #[arg(long, value_name = "ID")]
    pub(super) from_volume: Option<String>,
    /// Put the volume on this node (preferred and requisite topology).
    #[arg(long)]
    pub(super) node: Option<String>,
    #[command(flatten)]
    pub(super) cap: CapOpts,
}

#[derive(Debug, Args)]
pub(super) struct DeleteVolume {
    /// Volume ID.
    pub(super) volume_id: String,
}

#[derive(Debug, Args)]
pub(super) struct GetCapacity {
    /// Parameter KEY=VALUE (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub(super) params: Vec<(String, String)>,
    /// Only count capacity on this node.
    #[arg(long)]
    pub(super) node: Option<String>,
    #[command(flatten)]
    pub(super) cap: CapOpts,
}

#[derive(Debug, Args)]
pub(super) struct ControllerPublish {
    /// Volume ID.
    pub(super) volume_id: String,
    /// Node ID.
    #[arg(long)]
    pub(super) node: String,
    /// Publish read-only.
    #[arg(long)]
    pub(super) read_only: bool,
    /// Volume context KEY=VALUE (repeatable).
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub(super) context: Vec<(String, String)>,
    #[command(flatten)]
    pub(super) cap: CapOpts,
}

#[derive(Debug, Args)]
pub(super) struct ControllerUnpublish {
    /// Volume ID.
    pub(super) volume_id: String,
    /// Node ID; all nodes when omitted.
    #[arg(long)]
    pub(super) node: Option<String>,
}

#[derive(Debug, Args)]
pub(super) struct Validate {
    /// Volume ID.
    pub(super) volume_id: String,
    /// Volume context KEY=VALUE (repeatable).
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub(super) context: Vec<(String, String)>,
    /// Parameter KEY=VALUE (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub(super) params: Vec<(String, String)>,
    #[command(flatten)]
    pub(super) cap: CapOpts,
}

#[derive(Debug, Args)]
pub(super) struct ExpandVolume {
    /// Volume ID.
    pub(super) volume_id: String,
    #[command(flatten)]
    pub(super) size: SizeOpts,
    #[command(flatten)]
    pub(super) cap: CapOpts,
}

#[derive(Debug, Args)]
pub(super) struct ModifyVolume {
    /// Volume ID.
    pub(super) volume_id: String,
    /// Mutable parameter KEY=VALUE (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_kv, required = true)]
    pub(super) params: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub(super) struct GetVolume {
    /// Volume ID.
    pub(super) volume_id: String,
}

#[derive(Debug, Args)]
pub(super) struct CreateSnapshot {
    /// Snapshot name (the idempotency key).
    pub(super) name: String,
    /// Volume to snapshot.
    #[arg(long, visible_alias = "volume", value_name = "ID")]
    pub(super) source_volume_id: String,
    /// Parameter KEY=VALUE (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub(super) params: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub(super) struct DeleteSnapshot {
    /// Snapshot ID.
    pub(super) snapshot_id: String,
}

#[derive(Debug, Args)]
pub(super) struct ListSnapshots {
    /// Only the snapshot with this ID.
    #[arg(long, value_name = "ID")]
    pub(super) snapshot_id: Option<String>,
    /// Only snapshots of this volume.
    #[arg(long, value_name = "ID")]
    pub(super) source_volume_id: Option<String>,
    #[command(flatten)]
    pub(super) page: PageOpts,
}

#[derive(Debug, Args)]
pub(super) struct GetSnapshot {
    /// Snapshot ID.
    pub(super) snapshot_id: String,
}

#[derive(Debug, Args)]
pub(super) struct CreateGroupSnapshot {
    /// Group snapshot name (the idempotency key).
    pub(super) name: String,
    /// A volume to snapshot (repeatable; at least one).
    #[arg(long = "source-volume-id", visible_alias = "volume", value_name = "ID", required = true)]
    pub(super) source_volume_ids: Vec<String>,
    /// Parameter KEY=VALUE (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub(super) params: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub(super) struct DeleteGroupSnapshot {
    /// Group snapshot ID.
    pub(super) group_snapshot_id: String,
    /// A snapshot ID of the group, for the plugin to check (repeatable).
    #[arg(long = "snapshot-id", value_name = "ID")]
    pub(super) snapshot_ids: Vec<String>,
}

#[derive(Debug, Args)]
pub(super) struct GetGroupSnapshot {
    /// Group snapshot ID.
    pub(super) group_snapshot_id: String,
    /// A snapshot ID of the group, for the plugin to check (repeatable).
    #[arg(long = "snapshot-id", value_name = "ID")]
    pub(super) snapshot_ids: Vec<String>,
}

#[derive(Debug, Args)]
pub(super) struct NodeStage {
    /// Volume ID.
    pub(super) volume_id: String,
    /// Staging target path.
    #[arg(long)]
    pub(super) staging_path: String,
    /// Volume context KEY=VALUE (repeatable).
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub(super) context: Vec<(String, String)>,
    #[command(flatten)]
    pub(super) cap: CapOpts,
}

#[derive(Debug, Args)]
pub(super) struct NodeUnstage {
    /// Volume ID.
    pub(super) volume_id: String,
    /// Staging target path.
    #[arg(long)]
    pub(super) staging_path: String,
}

#[derive(Debug, Args)]
pub(super) struct NodePublish {
    /// Volume ID.
    pub(super) volume_id: String,
    /// Target path.
    #[arg(long)]
    pub(super) target_path: String,
    /// Staging target path, if the volume was staged.
    #[arg(long)]
    pub(super) staging_path: Option<String>,
    /// Publish read-only.
    #[arg(long)]
    pub(super) read_only: bool,
    /// Volume context KEY=VALUE (repeatable).
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub(super) context: Vec<(String, String)>,
    #[command(flatten)]
    pub(super) cap: CapOpts,
}

#[derive(Debug, Args)]
pub(super) struct NodeUnpublish {
    /// Volume ID.
    pub(super) volume_id: String,
    /// Target path.
    #[arg(long)]
    pub(super) target_path: String,
}

#[derive(Debug, Args)]
pub(super) struct NodeStats {
    /// Volume ID.
    pub(super) volume_id: String,
    /// Path where the volume is published.
    #[arg(long)]
    pub(super) path: String,
    /// Staging target path.
    #[arg(long)]
    pub(super) staging_path: Option<String>,
}

#[derive(Debug, Args)]
pub(super) struct NodeExpand {
    /// Volume ID.
    pub(super) volume_id: String,
    /// Path where the volume is published.
    #[arg(long)]
    pub(super) path: String,
    /// Staging target path.
    #[arg(long)]
    pub(super) staging_path: Option<String>,
    #[command(flatten)]
    pub(super) size: SizeOpts,
    #[command(flatten)]
    pub(super) cap: CapOpts,
}

/// Volume capability options of the commands that send one.
#[derive(Debug, Args)]
#[command(next_help_heading = "Volume capability")]
pub(super) struct CapOpts {
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
pub(super) struct SizeOpts {
    /// New required capacity, same syntax as create-volume --size.
    #[arg(long, value_parser = parse_size)]
    size: i64,
    /// Capacity limit.
    #[arg(long, value_parser = parse_size)]
    limit: Option<i64>,
}

/// Paging options of the list commands.
#[derive(Debug, Args)]
pub(super) struct PageOpts {
    /// Maximum entries per page (0: the plugin decides).
    #[arg(long, default_value_t = 0, value_name = "N")]
    max_entries: i32,
    /// Token to start from.
    #[arg(long, default_value = "", value_name = "TOKEN")]
    starting_token: String,
    /// Fetch one page and print its next token, instead of following all pages.
    #[arg(long)]
    pub(super) page: bool,
}

impl PageOpts {
    /// Fetches pages via `fetch(token, max_entries)`, following `next_token` unless `--page`.
    pub(super) async fn collect<E, F, Fut>(&self, mut fetch: F) -> Result<(Vec<E>, String)>
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
    pub(super) fn capability(&self) -> VolumeCapability {
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
    pub(super) fn range(&self) -> Option<CapacityRange> {
        capacity_range(Some(self.size), self.limit)
    }
}

/// Parses a size as Kubernetes writes quantities ([`loam::quantity`]), as
/// the driver reads every size, within CSI's signed 64-bit bytes.
fn parse_size(s: &str) -> Result<i64, String> {
    let bytes = loam::quantity::parse(s)?;
    i64::try_from(bytes).map_err(|_| format!("{s:?} is more bytes than CSI can carry (at most 8Ei - 1)"))
}

/// Parses `KEY=VALUE`.
fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// A capacity range, or none when neither bound is given.
pub(super) fn capacity_range(required: Option<i64>, limit: Option<i64>) -> Option<CapacityRange> {
    (required.is_some() || limit.is_some())
        .then(|| CapacityRange { required_bytes: required.unwrap_or(0), limit_bytes: limit.unwrap_or(0) })
}

/// The topology of one node.
pub(super) fn node_topology(node: &str) -> Topology {
    Topology { segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())]) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::output::capability_json;
    use clap::{CommandFactory, Parser};
    use serde_json::json;

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
            Cmd::Validate(Validate { cap, .. }) => cap.capability(),
            other => panic!("unexpected command {other:?}"),
        }
    }

    #[test]
    fn sizes_are_kubernetes_quantities_within_i64() {
        let cases = [("0", 0), ("4096", 4096), ("10k", 10_000), ("3M", 3_000_000), ("1.5Gi", 3 << 29)];
        let binary = [("5Gi", 5 << 30), ("2Ti", 2 << 40), ("9223372036854775807", i64::MAX)];
        for (text, want) in cases.into_iter().chain(binary) {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in ["", "Mi", "abc", "-1", "10K", "12X", "1 Gi", "1gi", "1MiB", " 1", "0x10", "100m"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        for huge in ["9223372036854775808", "8Ei", "99999999999999999999999", "18446744073709551615"] {
            assert!(parse_size(huge).is_err(), "{huge}");
        }
        assert_eq!(parse_size("8388607Ti"), Ok(8_388_607 << 40));
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
        let Cmd::CreateVolume(CreateVolume { name, size, params, node, .. }) = args.command else {
            panic!("not create-volume")
        };
        assert_eq!((name.as_str(), size, node.as_deref()), ("pvc", Some(64 << 20), Some("n1")));
        assert_eq!(params, [("a".to_owned(), "b".to_owned())]);
        assert!(parse(&["create-volume", "x", "--size=12Q"]).is_err());
        assert!(parse(&["create-volume", "x", "--from-snapshot=a", "--from-volume=b"]).is_err());
    }

    #[test]
    fn modify_volume_takes_mutable_parameters() {
        let args = parse(&["modify-volume", "v1", "--param", "provisioning=thick"]);
        let Cmd::ModifyVolume(ModifyVolume { volume_id, params }) = args.expect("valid arguments").command else {
            panic!("not modify-volume")
        };
        assert_eq!(volume_id, "v1");
        assert_eq!(params, [("provisioning".to_owned(), "thick".to_owned())]);
        assert!(parse(&["modify-volume", "v1"]).is_err(), "a modify without parameters changes nothing");
    }

    #[test]
    fn group_snapshot_commands() {
        let args = parse(&["create-group-snapshot", "g", "--volume", "a", "--source-volume-id=b", "--param=k=v"]);
        let Cmd::CreateGroupSnapshot(CreateGroupSnapshot { name, source_volume_ids, params }) =
            args.expect("valid arguments").command
        else {
            panic!("not create-group-snapshot")
        };
        assert_eq!((name.as_str(), source_volume_ids), ("g", vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(params, [("k".to_owned(), "v".to_owned())]);
        assert!(parse(&["create-group-snapshot", "g"]).is_err(), "a group needs a volume");
        let args = parse(&["get-group-snapshot", "gid", "--snapshot-id", "s1", "--snapshot-id", "s2"]).unwrap();
        let Cmd::GetGroupSnapshot(GetGroupSnapshot { snapshot_ids, .. }) = args.command else {
            panic!("not get-group-snapshot")
        };
        assert_eq!(snapshot_ids, ["s1", "s2"]);
    }
}
