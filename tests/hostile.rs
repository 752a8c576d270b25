//! The hostile-input corpus: every id, name, parameter, mkfsOptions, size,
//! capability, access mode, mount flag, pagination token, secret and inline
//! attribute case Loam must refuse (or take) sent to a real server, each row
//! with the gRPC code it must get. No row may be answered INTERNAL (that is
//! for the machine failing, never for bad input), and no answer may echo an
//! unbounded field back (a reply quoting a 100 KB token would itself exceed
//! the client's message limit).
//!
//! Staging and target path cases that need the filesystem (symlinks, files
//! where directories belong) live in `tests/hostile_paths.rs`. Everything
//! here runs unprivileged: bad input is refused before anything is mounted.

mod common;

use std::collections::HashMap;

use common::{Access, Harness, NODE, block_capability, create_request, mount_capability, path_str};
use loam::csi;
use loam::csi::volume_capability::access_mode::Mode;
use loam::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use tonic::{Code, Status};

/// A well-formed key no object has.
const UNKNOWN: &str = "0123456789abcdef0123456789abcdef";

/// Longest message any refusal may carry.
const MAX_MESSAGE: usize = 1024;

/// One request to any CSI RPC.
#[derive(Debug, Clone)]
enum Call {
    Create(csi::CreateVolumeRequest),
    Delete(csi::DeleteVolumeRequest),
    Attach(csi::ControllerPublishVolumeRequest),
    Detach(csi::ControllerUnpublishVolumeRequest),
    Validate(csi::ValidateVolumeCapabilitiesRequest),
    ListVolumes(csi::ListVolumesRequest),
    Capacity(csi::GetCapacityRequest),
    Snapshot(csi::CreateSnapshotRequest),
    DeleteSnapshot(csi::DeleteSnapshotRequest),
    ListSnapshots(csi::ListSnapshotsRequest),
    GetSnapshot(csi::GetSnapshotRequest),
    Expand(csi::ControllerExpandVolumeRequest),
    GetVolume(csi::ControllerGetVolumeRequest),
    Modify(csi::ControllerModifyVolumeRequest),
    Stage(csi::NodeStageVolumeRequest),
    Unstage(csi::NodeUnstageVolumeRequest),
    Publish(csi::NodePublishVolumeRequest),
    Unpublish(csi::NodeUnpublishVolumeRequest),
    Stats(csi::NodeGetVolumeStatsRequest),
    NodeExpand(csi::NodeExpandVolumeRequest),
    Group(csi::CreateVolumeGroupSnapshotRequest),
    DeleteGroup(csi::DeleteVolumeGroupSnapshotRequest),
    GetGroup(csi::GetVolumeGroupSnapshotRequest),
}

/// What a row must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// This gRPC code.
    Code(Code),
    /// ValidateVolumeCapabilities answers OK without confirming (the spec's
    /// way to say "not supported"), with a message saying why.
    Unconfirmed,
}

/// A corpus row: what is sent and what it must get.
struct Row {
    label: String,
    call: Call,
    want: Want,
}

fn row(label: impl Into<String>, call: Call, want: Code) -> Row {
    Row { label: label.into(), call, want: Want::Code(want) }
}

/// What came back: a code and its message (for an unconfirmed validation,
/// the response's message).
async fn outcome(h: &mut Harness, call: Call) -> (Want, String) {
    if let Call::Validate(request) = call {
        return match h.controller.validate_volume_capabilities(request).await {
            Ok(response) => match response.into_inner() {
                csi::ValidateVolumeCapabilitiesResponse { confirmed: None, message } => (Want::Unconfirmed, message),
                _ => (Want::Code(Code::Ok), String::new()),
            },
            Err(status) => (Want::Code(status.code()), status.message().to_owned()),
        };
    }
    match send(h, call).await {
        Ok(()) => (Want::Code(Code::Ok), String::new()),
        Err(status) => (Want::Code(status.code()), status.message().to_owned()),
    }
}

async fn send(h: &mut Harness, call: Call) -> Result<(), Status> {
    match call {
        Call::Create(r) => h.controller.create_volume(r).await.map(drop),
        Call::Delete(r) => h.controller.delete_volume(r).await.map(drop),
        Call::Attach(r) => h.controller.controller_publish_volume(r).await.map(drop),
        Call::Detach(r) => h.controller.controller_unpublish_volume(r).await.map(drop),
        Call::Validate(r) => h.controller.validate_volume_capabilities(r).await.map(drop),
        Call::ListVolumes(r) => h.controller.list_volumes(r).await.map(drop),
        Call::Capacity(r) => h.controller.get_capacity(r).await.map(drop),
        Call::Snapshot(r) => h.controller.create_snapshot(r).await.map(drop),
        Call::DeleteSnapshot(r) => h.controller.delete_snapshot(r).await.map(drop),
        Call::ListSnapshots(r) => h.controller.list_snapshots(r).await.map(drop),
        Call::GetSnapshot(r) => h.controller.get_snapshot(r).await.map(drop),
        Call::Expand(r) => h.controller.controller_expand_volume(r).await.map(drop),
        Call::GetVolume(r) => h.controller.controller_get_volume(r).await.map(drop),
        Call::Modify(r) => h.controller.controller_modify_volume(r).await.map(drop),
        Call::Stage(r) => h.node.node_stage_volume(r).await.map(drop),
        Call::Unstage(r) => h.node.node_unstage_volume(r).await.map(drop),
        Call::Publish(r) => h.node.node_publish_volume(r).await.map(drop),
        Call::Unpublish(r) => h.node.node_unpublish_volume(r).await.map(drop),
        Call::Stats(r) => h.node.node_get_volume_stats(r).await.map(drop),
        Call::NodeExpand(r) => h.node.node_expand_volume(r).await.map(drop),
        Call::Group(r) => h.group.create_volume_group_snapshot(r).await.map(drop),
        Call::DeleteGroup(r) => h.group.delete_volume_group_snapshot(r).await.map(drop),
        Call::GetGroup(r) => h.group.get_volume_group_snapshot(r).await.map(drop),
    }
}

/// A field far larger than any real one.
fn huge() -> String {
    "A".repeat(100_000)
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn capability(mode: i32, access_type: Option<AccessType>) -> csi::VolumeCapability {
    csi::VolumeCapability { access_mode: Some(AccessMode { mode }), access_type }
}

fn mount_with(mount: MountVolume) -> csi::VolumeCapability {
    capability(Mode::SingleNodeWriter as i32, Some(AccessType::Mount(mount)))
}

fn flags(flags: &[&str]) -> csi::VolumeCapability {
    mount_with(MountVolume { mount_flags: flags.iter().map(|f| f.to_string()).collect(), ..Default::default() })
}

/// The objects rows refer to: a dir volume, a loop volume and a snapshot,
/// plus CO paths outside the root.
struct Fixture {
    volume: String,
    loop_volume: String,
    snapshot: String,
    staging: String,
    target: String,
}

async fn fixture(h: &mut Harness) -> Fixture {
    let volume = h.create("hostile-dir", 1 << 20).await;
    let mut request = create_request("hostile-loop", 8 << 20);
    request.parameters = map(&[("backend", "loop"), ("provisioning", "thin")]);
    let loop_volume = h.create_volume(request).await.expect("loop volume").volume_id;
    let snapshot = h.snapshot(&volume, "hostile-snap").await.expect("snapshot").snapshot_id;
    Fixture {
        volume,
        loop_volume,
        snapshot,
        staging: path_str(&h.co_path("staging")),
        target: path_str(&h.co_path("target")),
    }
}

/// Every RPC that names a volume, with `id` in that field and the rest valid.
fn volume_calls(f: &Fixture, id: &str) -> Vec<(&'static str, Call)> {
    let id = id.to_owned();
    vec![
        ("DeleteVolume", Call::Delete(csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() })),
        (
            "ControllerPublish",
            Call::Attach(csi::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: NODE.into(),
                volume_capability: Some(mount_capability(Access::Writer)),
                ..Default::default()
            }),
        ),
        (
            "ControllerUnpublish",
            Call::Detach(csi::ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: NODE.into(),
                ..Default::default()
            }),
        ),
        (
            "ValidateVolumeCapabilities",
            Call::Validate(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![mount_capability(Access::Writer)],
                ..Default::default()
            }),
        ),
        (
            "ControllerExpand",
            Call::Expand(csi::ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(csi::CapacityRange { required_bytes: 2 << 20, limit_bytes: 0 }),
                ..Default::default()
            }),
        ),
        ("ControllerGetVolume", Call::GetVolume(csi::ControllerGetVolumeRequest { volume_id: id.clone() })),
        (
            "ControllerModify",
            Call::Modify(csi::ControllerModifyVolumeRequest {
                volume_id: id.clone(),
                mutable_parameters: map(&[("provisioning", "thick")]),
                ..Default::default()
            }),
        ),
        (
            "CreateSnapshot",
            Call::Snapshot(csi::CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: "hostile-snap-2".into(),
                ..Default::default()
            }),
        ),
        (
            "NodeStage",
            Call::Stage(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: f.staging.clone(),
                volume_capability: Some(mount_capability(Access::Writer)),
                ..Default::default()
            }),
        ),
        (
            "NodeUnstage",
            Call::Unstage(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: f.staging.clone(),
            }),
        ),
        (
            "NodePublish",
            Call::Publish(csi::NodePublishVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: f.staging.clone(),
                target_path: f.target.clone(),
                volume_capability: Some(mount_capability(Access::Writer)),
                ..Default::default()
            }),
        ),
        (
            "NodeUnpublish",
            Call::Unpublish(csi::NodeUnpublishVolumeRequest { volume_id: id.clone(), target_path: f.target.clone() }),
        ),
        (
            "NodeGetVolumeStats",
            Call::Stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: f.target.clone(),
                ..Default::default()
            }),
        ),
        (
            "NodeExpand",
            Call::NodeExpand(csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: f.target.clone(),
                ..Default::default()
            }),
        ),
    ]
}

/// Malformed volume ids: refused as such by every RPC.
fn malformed_volume_ids(f: &Fixture) -> Vec<Row> {
    let mut rows = Vec::new();
    for (what, id) in [
        ("empty", String::new()),
        ("129 bytes", "v".repeat(129)),
        ("100 KB", huge()),
        ("NUL", "vol\0@test-node".to_owned()),
    ] {
        for (rpc, call) in volume_calls(f, &id) {
            rows.push(row(format!("{rpc}: {what} volume id"), call, Code::InvalidArgument));
        }
    }
    rows
}

/// Well-formed ids of no volume: NOT_FOUND where the spec asks for it, OK
/// where the operation is already done (nothing to delete, detach, unstage
/// or unpublish).
fn unknown_volume_ids(f: &Fixture) -> Vec<Row> {
    let mut rows = Vec::new();
    for (what, id) in [
        ("unknown key", format!("{UNKNOWN}@{NODE}")),
        ("malformed key", format!("0123456789abcdef@{NODE}")),
        ("another node's", format!("{UNKNOWN}@node-b")),
        ("traversal", "../../etc/passwd".to_owned()),
        ("slashes", format!("a/b/c@{NODE}")),
        ("no node", "plainname".to_owned()),
    ] {
        for (rpc, call) in volume_calls(f, &id) {
            let want = match rpc {
                "DeleteVolume" | "ControllerUnpublish" | "NodeUnstage" | "NodeUnpublish" => Code::Ok,
                _ => Code::NotFound,
            };
            rows.push(row(format!("{rpc}: {what} volume id {id:?}"), call, want));
        }
    }
    rows
}

fn snapshot_id_rows(f: &Fixture) -> Vec<Row> {
    let mut rows = Vec::new();
    for (what, id, malformed) in [
        ("empty", String::new(), true),
        ("129 bytes", "s".repeat(129), true),
        ("100 KB", huge(), true),
        ("NUL", "s\0".to_owned(), true),
        ("unknown", format!("{UNKNOWN}@{NODE}"), false),
        ("traversal", "../../../etc/shadow".to_owned(), false),
        ("a volume's id", f.volume.clone(), false),
    ] {
        let gone = if malformed { Code::InvalidArgument } else { Code::Ok };
        let missing = if malformed { Code::InvalidArgument } else { Code::NotFound };
        rows.push(row(
            format!("DeleteSnapshot: {what} snapshot id"),
            Call::DeleteSnapshot(csi::DeleteSnapshotRequest { snapshot_id: id.clone(), ..Default::default() }),
            gone,
        ));
        rows.push(row(
            format!("GetSnapshot: {what} snapshot id"),
            Call::GetSnapshot(csi::GetSnapshotRequest { snapshot_id: id.clone(), ..Default::default() }),
            missing,
        ));
        rows.push(row(
            format!("CreateVolume: restore from {what} snapshot id"),
            Call::Create(common::from_snapshot(create_request("hostile-restore", 1 << 20), &id)),
            missing,
        ));
    }
    let mut clone = create_request("hostile-clone", 1 << 20);
    clone.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
            volume_id: huge(),
        })),
    });
    rows.push(row("CreateVolume: clone of a 100 KB volume id", Call::Create(clone), Code::InvalidArgument));
    rows.push(row(
        "CreateVolume: restore of a dir snapshot into a loop volume",
        Call::Create({
            let mut r = common::from_snapshot(create_request("hostile-cross", 1 << 20), &f.snapshot);
            r.parameters = map(&[("backend", "loop")]);
            r
        }),
        Code::InvalidArgument,
    ));
    rows
}

fn name_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for (what, name) in [("empty", String::new()), ("100 KB", huge()), ("NUL", "a\0b".to_owned())] {
        rows.push(row(
            format!("CreateVolume: {what} name"),
            Call::Create(create_request(&name, 1 << 20)),
            Code::InvalidArgument,
        ));
        rows.push(row(
            format!("CreateSnapshot: {what} name"),
            Call::Snapshot(csi::CreateSnapshotRequest {
                source_volume_id: format!("{UNKNOWN}@{NODE}"),
                name: name.clone(),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ));
        rows.push(row(
            format!("CreateVolumeGroupSnapshot: {what} name"),
            Call::Group(csi::CreateVolumeGroupSnapshotRequest {
                name: name.clone(),
                source_volume_ids: vec![format!("{UNKNOWN}@{NODE}")],
                ..Default::default()
            }),
            Code::InvalidArgument,
        ));
    }
    // A name that looks like a path is only a name: its key is a hash.
    rows.push(row("CreateVolume: name ../../etc", Call::Create(create_request("../../etc", 1 << 20)), Code::Ok));
    rows
}

fn create_with(parameters: &[(&str, &str)]) -> Call {
    let mut request = create_request("hostile-params", 8 << 20);
    request.parameters = map(parameters);
    Call::Create(request)
}

fn parameter_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    let big = huge();
    for (label, params) in [
        ("unknown key", vec![("color", "blue")]),
        ("key differing in case", vec![("Backend", "loop")]),
        ("unknown backend", vec![("backend", "lvm")]),
        ("100 KB backend", vec![("backend", big.as_str())]),
        ("100 KB key", vec![(big.as_str(), "x")]),
        ("fsType on dir", vec![("fsType", "xfs")]),
        ("mkfsOptions on dir", vec![("mkfsOptions", "-b 4096")]),
        ("fsType ntfs", vec![("backend", "loop"), ("fsType", "ntfs")]),
        ("fsType with NUL", vec![("backend", "loop"), ("fsType", "ext4\0")]),
        ("provisioning fat", vec![("backend", "loop"), ("provisioning", "fat")]),
        ("provisioning 100 KB", vec![("backend", "loop"), ("provisioning", big.as_str())]),
        ("mkfsOptions 100 KB", vec![("backend", "loop"), ("mkfsOptions", big.as_str())]),
    ] {
        rows.push(row(format!("CreateVolume: parameter {label}"), create_with(&params), Code::InvalidArgument));
    }
    // mkfsOptions: nothing that names a file or device, forces, dry-runs,
    // or fails only when the volume is formatted.
    for (fs, options) in [
        ("ext4", "-d /etc"),
        ("ext4", "-d etc"),
        ("ext4", "-l /etc/passwd"),
        ("ext4", "-l badblocks"),
        ("ext4", "-J device=/dev/sda"),
        ("ext4", "-z /tmp/undo"),
        ("ext4", "-E offset=4096"),
        ("ext4", "-E discard"),
        ("ext4", "-b 65536"),
        ("ext4", "-b 512"),
        ("ext4", "-I 4096"),
        ("ext4", "-O quota,project"),
        ("ext4", "-N 0"),
        ("ext4", "-O ^extent"),
        ("ext4", "-O casefold"),
        ("ext4", "-L $(reboot)"),
        ("ext4", "-U random"),
        ("ext4", "-F"),
        ("ext4", "-n"),
        ("ext4", "-S 1"),
        ("ext4", "-t ext2"),
        ("ext4", "/dev/sda"),
        ("ext4", "--root-dir=/etc"),
        ("xfs", "-l logdev=/etc/shadow"),
        ("xfs", "-r rtdev=/etc/shadow"),
        ("xfs", "-d name=/etc/shadow"),
        ("xfs", "-d file=1,name=/etc/shadow"),
        ("xfs", "-p /etc/proto"),
        ("xfs", "-c options=/etc/mkfs.conf"),
        ("xfs", "-b size=65536"),
        ("xfs", "-b 4096"),
        ("xfs", "-i size=256"),
        ("xfs", "-m crc=0"),
        ("xfs", "-n size=512"),
        ("xfs", "-L thirteenchars"),
        ("xfs", "-N 1"),
        ("xfs", "-f 1"),
    ] {
        rows.push(row(
            format!("CreateVolume: {fs} mkfsOptions {options:?}"),
            create_with(&[("backend", "loop"), ("fsType", fs), ("mkfsOptions", options)]),
            Code::InvalidArgument,
        ));
    }
    for (fs, options) in
        [("ext4", "-b 4096 -i 8192 -O ^has_journal -E stride=4 -L data"), ("xfs", "-m reflink=1 -L data")]
    {
        let mut request = create_request(&format!("hostile-ok-{fs}"), 1 << 20);
        request.parameters =
            map(&[("backend", "loop"), ("provisioning", "thin"), ("fsType", fs), ("mkfsOptions", options)]);
        rows.push(row(format!("CreateVolume: {fs} accepted mkfsOptions {options:?}"), Call::Create(request), Code::Ok));
    }
    // Mutable parameters (VolumeAttributesClass) at CreateVolume.
    for (label, parameters, mutable) in [
        ("unknown mutable key", vec![("backend", "loop")], vec![("color", "blue")]),
        ("immutable key as mutable", vec![("backend", "loop")], vec![("fsType", "xfs")]),
        ("mutable provisioning on dir", vec![], vec![("provisioning", "thick")]),
        ("mutable provisioning fat", vec![("backend", "loop")], vec![("provisioning", "fat")]),
    ] {
        let mut request = create_request("hostile-mutable", 8 << 20);
        request.parameters = map(&parameters);
        request.mutable_parameters = map(&mutable);
        rows.push(row(format!("CreateVolume: {label}"), Call::Create(request), Code::InvalidArgument));
    }
    let oversized: HashMap<String, String> =
        (0..600).map(|i| (format!("csi.storage.k8s.io/k{i}"), "v".into())).collect();
    let mut request = create_request("hostile-many", 1 << 20);
    request.parameters = oversized;
    rows.push(row("CreateVolume: parameters over 4 KiB", Call::Create(request), Code::InvalidArgument));
    rows
}

fn modify_rows(f: &Fixture) -> Vec<Row> {
    let modify = |id: &str, pairs: &[(&str, &str)]| {
        Call::Modify(csi::ControllerModifyVolumeRequest {
            volume_id: id.into(),
            mutable_parameters: map(pairs),
            ..Default::default()
        })
    };
    let big = huge();
    vec![
        row("ControllerModify: unknown key", modify(&f.loop_volume, &[("color", "blue")]), Code::InvalidArgument),
        row("ControllerModify: fsType", modify(&f.loop_volume, &[("fsType", "xfs")]), Code::InvalidArgument),
        row(
            "ControllerModify: mkfsOptions",
            modify(&f.loop_volume, &[("mkfsOptions", "-d /etc")]),
            Code::InvalidArgument,
        ),
        row(
            "ControllerModify: provisioning fat",
            modify(&f.loop_volume, &[("provisioning", "fat")]),
            Code::InvalidArgument,
        ),
        row(
            "ControllerModify: 100 KB value",
            modify(&f.loop_volume, &[("provisioning", big.as_str())]),
            Code::InvalidArgument,
        ),
        row("ControllerModify: 100 KB key", modify(&f.loop_volume, &[(big.as_str(), "thick")]), Code::InvalidArgument),
        row(
            "ControllerModify: provisioning of a dir volume",
            modify(&f.volume, &[("provisioning", "thick")]),
            Code::InvalidArgument,
        ),
        row("ControllerModify: nothing to change", modify(&f.loop_volume, &[]), Code::Ok),
    ]
}

fn capacity_rows(f: &Fixture) -> Vec<Row> {
    let create = |name: &str, required: i64, limit: i64, params: &[(&str, &str)]| {
        let mut request = create_request(name, required);
        request.capacity_range = Some(csi::CapacityRange { required_bytes: required, limit_bytes: limit });
        request.parameters = map(params);
        Call::Create(request)
    };
    let expand = |id: &str, required: i64, limit: i64| {
        Call::Expand(csi::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: required, limit_bytes: limit }),
            ..Default::default()
        })
    };
    let loop_ = [("backend", "loop"), ("provisioning", "thin")];
    let xfs = [("backend", "loop"), ("provisioning", "thin"), ("fsType", "xfs")];
    vec![
        row("CreateVolume: negative required bytes", create("cap-neg", -1, 0, &[]), Code::InvalidArgument),
        row("CreateVolume: negative limit", create("cap-neg-limit", 0, -5, &[]), Code::InvalidArgument),
        row(
            "CreateVolume: limit below required",
            create("cap-inverted", 10 << 20, 1 << 20, &[]),
            Code::InvalidArgument,
        ),
        row("CreateVolume: i64::MAX bytes", create("cap-max", i64::MAX, 0, &[]), Code::ResourceExhausted),
        row("CreateVolume: more than the node has", create("cap-huge", 1 << 60, 0, &[]), Code::ResourceExhausted),
        row(
            "CreateVolume: xfs limited below its minimum",
            create("cap-xfs", 1 << 20, 10 << 20, &xfs),
            Code::OutOfRange,
        ),
        row("CreateVolume: ext4 limited below its minimum", create("cap-ext4", 4097, 4097, &loop_), Code::OutOfRange),
        row(
            "CreateVolume: ext4 -N past the limit",
            create(
                "cap-inodes",
                4 << 20,
                8 << 20,
                &[("backend", "loop"), ("provisioning", "thin"), ("mkfsOptions", "-N 1000000")],
            ),
            Code::OutOfRange,
        ),
        row("CreateVolume: a 4097-byte loop ext4 volume is rounded up", create("cap-4097", 4097, 0, &loop_), Code::Ok),
        row("CreateVolume: 1 byte dir volume", create("cap-1", 1, 0, &[]), Code::Ok),
        row(
            "ControllerExpand: no capacity range",
            Call::Expand(csi::ControllerExpandVolumeRequest { volume_id: f.volume.clone(), ..Default::default() }),
            Code::InvalidArgument,
        ),
        row("ControllerExpand: negative bytes", expand(&f.volume, -1, 0), Code::InvalidArgument),
        row("ControllerExpand: limit below required", expand(&f.volume, 4 << 20, 2 << 20), Code::InvalidArgument),
        row("ControllerExpand: shrink a loop volume", expand(&f.loop_volume, 4096, 4096), Code::OutOfRange),
        row("ControllerExpand: i64::MAX bytes", expand(&f.volume, i64::MAX, 0), Code::ResourceExhausted),
        row("ControllerExpand: more than the node has", expand(&f.loop_volume, 1 << 60, 0), Code::ResourceExhausted),
    ]
}

fn capability_rows(f: &Fixture) -> Vec<Row> {
    let big = huge();
    let caps: Vec<(&str, Option<csi::VolumeCapability>)> = vec![
        ("no capability", None),
        (
            "no access mode",
            Some(csi::VolumeCapability { access_mode: None, access_type: Some(AccessType::Mount(Default::default())) }),
        ),
        ("no access type", Some(capability(Mode::SingleNodeWriter as i32, None))),
        ("unknown access mode 0", Some(capability(0, Some(AccessType::Mount(Default::default()))))),
        ("access mode 99", Some(capability(99, Some(AccessType::Mount(Default::default()))))),
        ("access mode -1", Some(capability(-1, Some(AccessType::Mount(Default::default()))))),
        (
            "MULTI_NODE_READER_ONLY",
            Some(capability(Mode::MultiNodeReaderOnly as i32, Some(AccessType::Mount(Default::default())))),
        ),
        (
            "MULTI_NODE_SINGLE_WRITER",
            Some(capability(Mode::MultiNodeSingleWriter as i32, Some(AccessType::Mount(Default::default())))),
        ),
        (
            "MULTI_NODE_MULTI_WRITER",
            Some(capability(Mode::MultiNodeMultiWriter as i32, Some(AccessType::Mount(Default::default())))),
        ),
        ("fs type ntfs;reboot", Some(mount_with(MountVolume { fs_type: "ntfs;reboot".into(), ..Default::default() }))),
        ("fs type 100 KB", Some(mount_with(MountVolume { fs_type: big.clone(), ..Default::default() }))),
        (
            "mount group wheel",
            Some(mount_with(MountVolume { volume_mount_group: "wheel".into(), ..Default::default() })),
        ),
        ("mount group -1", Some(mount_with(MountVolume { volume_mount_group: "-1".into(), ..Default::default() }))),
        // Numeric too: Loam does not offer VOLUME_MOUNT_GROUP (the kubelet applies fsGroup).
        ("mount group 1000", Some(mount_with(MountVolume { volume_mount_group: "1000".into(), ..Default::default() }))),
        ("mount group 100 KB", Some(mount_with(MountVolume { volume_mount_group: big.clone(), ..Default::default() }))),
        ("mount flag x-weird", Some(flags(&["x-weird"]))),
        ("mount flag with a value", Some(flags(&["uid=0"]))),
        ("mount flag list in one word", Some(flags(&["ro,nosuid"]))),
        ("empty mount flag", Some(flags(&[""]))),
        ("mount flag with NUL", Some(flags(&["ro\0"]))),
        ("100 KB mount flag", Some(flags(&[big.as_str()]))),
        ("mount flag remount", Some(flags(&["remount"]))),
        ("mount flag shared", Some(flags(&["shared"]))),
    ];
    let mut rows = Vec::new();
    for (what, cap) in caps {
        let mut create = create_request("hostile-cap", 1 << 20);
        create.volume_capabilities = cap.clone().into_iter().collect();
        rows.push(row(format!("CreateVolume: {what}"), Call::Create(create), Code::InvalidArgument));
        let validate = Call::Validate(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: f.volume.clone(),
            volume_capabilities: cap.clone().into_iter().collect(),
            ..Default::default()
        });
        let label = format!("ValidateVolumeCapabilities: {what}");
        rows.push(match cap {
            None => row(label, validate, Code::InvalidArgument),
            Some(_) => Row { label, call: validate, want: Want::Unconfirmed },
        });
        rows.push(row(
            format!("NodeStage: {what}"),
            Call::Stage(csi::NodeStageVolumeRequest {
                volume_id: f.volume.clone(),
                staging_target_path: f.staging.clone(),
                volume_capability: cap.clone(),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ));
        rows.push(row(
            format!("NodePublish: {what}"),
            Call::Publish(csi::NodePublishVolumeRequest {
                volume_id: f.volume.clone(),
                staging_target_path: f.staging.clone(),
                target_path: f.target.clone(),
                volume_capability: cap,
                ..Default::default()
            }),
            Code::InvalidArgument,
        ));
    }
    let mut block_dir = create_request("hostile-block-dir", 1 << 20);
    block_dir.volume_capabilities = vec![block_capability()];
    rows.push(row("CreateVolume: raw block on the dir backend", Call::Create(block_dir), Code::InvalidArgument));
    let mut xfs_cap = create_request("hostile-fs-mismatch", 8 << 20);
    xfs_cap.parameters = map(&[("backend", "loop"), ("fsType", "ext4")]);
    xfs_cap.volume_capabilities = vec![mount_with(MountVolume { fs_type: "btrfs".into(), ..Default::default() })];
    rows.push(row("CreateVolume: loop capability fsType btrfs", Call::Create(xfs_cap), Code::InvalidArgument));
    rows.push(row(
        "NodeStage: loop volume staged as xfs though made ext4",
        Call::Stage(csi::NodeStageVolumeRequest {
            volume_id: f.loop_volume.clone(),
            staging_target_path: f.staging.clone(),
            volume_capability: Some(mount_with(MountVolume { fs_type: "xfs".into(), ..Default::default() })),
            ..Default::default()
        }),
        Code::InvalidArgument,
    ));
    rows
}

fn path_rows(f: &Fixture, root: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let long = format!("/{}", "p".repeat(5000));
    let inside = format!("{root}/volumes");
    for (what, path) in [
        ("empty", ""),
        ("relative", "relative/path"),
        ("dot-dot", "/tmp/../etc"),
        ("dot", "/tmp/./x"),
        ("NUL", "/tmp/a\0b"),
        ("5000 bytes", long.as_str()),
        ("the root", "/"),
        ("inside the driver's root", inside.as_str()),
    ] {
        rows.push(row(
            format!("NodeStage: {what} staging path"),
            Call::Stage(csi::NodeStageVolumeRequest {
                volume_id: f.volume.clone(),
                staging_target_path: path.into(),
                volume_capability: Some(mount_capability(Access::Writer)),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ));
        rows.push(row(
            format!("NodePublish: {what} target path"),
            Call::Publish(csi::NodePublishVolumeRequest {
                volume_id: f.volume.clone(),
                staging_target_path: f.staging.clone(),
                target_path: path.into(),
                volume_capability: Some(mount_capability(Access::Writer)),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ));
    }
    rows
}

fn listing_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for (what, token) in [
        ("garbage", "garbage".to_owned()),
        ("100 KB", huge()),
        ("traversal", "../../etc".to_owned()),
        ("NUL", "\0".to_owned()),
        ("another node's", "node-b/0123456789abcdef".to_owned()),
    ] {
        rows.push(row(
            format!("ListVolumes: {what} starting token"),
            Call::ListVolumes(csi::ListVolumesRequest { max_entries: 0, starting_token: token.clone() }),
            Code::Aborted,
        ));
        rows.push(row(
            format!("ListSnapshots: {what} starting token"),
            Call::ListSnapshots(csi::ListSnapshotsRequest { starting_token: token, ..Default::default() }),
            Code::Aborted,
        ));
    }
    rows.push(row(
        "ListVolumes: negative max entries",
        Call::ListVolumes(csi::ListVolumesRequest { max_entries: -1, ..Default::default() }),
        Code::InvalidArgument,
    ));
    rows.push(row(
        "ListSnapshots: negative max entries",
        Call::ListSnapshots(csi::ListSnapshotsRequest { max_entries: -1, ..Default::default() }),
        Code::InvalidArgument,
    ));
    rows.push(row(
        "ListSnapshots: 100 KB source volume id",
        Call::ListSnapshots(csi::ListSnapshotsRequest { source_volume_id: huge(), ..Default::default() }),
        Code::Ok,
    ));
    rows.push(row(
        "ListSnapshots: 100 KB snapshot id",
        Call::ListSnapshots(csi::ListSnapshotsRequest { snapshot_id: huge(), ..Default::default() }),
        Code::Ok,
    ));
    rows.push(row(
        "GetCapacity: unknown parameter",
        Call::Capacity(csi::GetCapacityRequest { parameters: map(&[("color", "blue")]), ..Default::default() }),
        Code::InvalidArgument,
    ));
    rows.push(row(
        "GetCapacity: 100 KB fsType",
        Call::Capacity(csi::GetCapacityRequest {
            parameters: [("fsType".to_owned(), huge()), ("backend".to_owned(), "loop".to_owned())].into(),
            ..Default::default()
        }),
        Code::InvalidArgument,
    ));
    rows
}

/// Secrets are never needed, never stored and never echoed.
fn secret_rows(f: &Fixture) -> Vec<Row> {
    let secrets: HashMap<String, String> = [("password".to_owned(), huge())].into();
    let mut create = create_request("hostile-secret", 1 << 20);
    create.secrets = secrets.clone();
    vec![
        row("CreateVolume: 100 KB secret", Call::Create(create), Code::Ok),
        row(
            "DeleteVolume: 100 KB secret, unknown volume",
            Call::Delete(csi::DeleteVolumeRequest { volume_id: format!("{UNKNOWN}@{NODE}"), secrets: secrets.clone() }),
            Code::Ok,
        ),
        row(
            "CreateSnapshot: 100 KB secret, unknown volume",
            Call::Snapshot(csi::CreateSnapshotRequest {
                source_volume_id: format!("{UNKNOWN}@{NODE}"),
                name: "hostile-secret-snap".into(),
                secrets: secrets.clone(),
                ..Default::default()
            }),
            Code::NotFound,
        ),
        row(
            "NodeStage: 100 KB secret, bad capability",
            Call::Stage(csi::NodeStageVolumeRequest {
                volume_id: f.volume.clone(),
                staging_target_path: f.staging.clone(),
                volume_capability: Some(flags(&["x-weird"])),
                secrets,
                ..Default::default()
            }),
            Code::InvalidArgument,
        ),
    ]
}

fn inline(id: &str, target: &str, attributes: &[(&str, &str)], cap: csi::VolumeCapability) -> Call {
    let mut context = map(&[("csi.storage.k8s.io/ephemeral", "true"), ("csi.storage.k8s.io/pod.name", "p")]);
    context.extend(map(attributes));
    Call::Publish(csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.into(),
        volume_capability: Some(cap),
        volume_context: context,
        ..Default::default()
    })
}

fn inline_rows(f: &Fixture) -> Vec<Row> {
    let id = "csi-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let big = huge();
    let mut rows = Vec::new();
    for (what, attributes) in [
        ("size -1", vec![("size", "-1")]),
        ("size 0", vec![("size", "0")]),
        ("size 1Ei", vec![("size", "1Ei")]),
        ("size 1e9", vec![("size", "1e9")]),
        ("size 100m", vec![("size", "100m")]),
        ("size abc", vec![("size", "abc")]),
        ("size 100 KB", vec![("size", big.as_str())]),
        ("unknown attribute", vec![("color", "blue")]),
        ("100 KB attribute key", vec![(big.as_str(), "x")]),
        ("backend lvm", vec![("backend", "lvm")]),
        ("mkfsOptions -d /etc", vec![("backend", "loop"), ("mkfsOptions", "-d /etc")]),
        ("mkfsOptions -E offset", vec![("backend", "loop"), ("mkfsOptions", "-E offset=1")]),
        (
            "xfs mkfsOptions -r rtdev",
            vec![("backend", "loop"), ("fsType", "xfs"), ("mkfsOptions", "-r rtdev=/etc/passwd")],
        ),
        ("fsType on dir", vec![("fsType", "xfs")]),
    ] {
        rows.push(row(
            format!("NodePublish inline: {what}"),
            inline(id, &f.target, &attributes, mount_capability(Access::Writer)),
            Code::InvalidArgument,
        ));
    }
    rows.push(row(
        "NodePublish inline: raw block",
        inline(id, &f.target, &[], block_capability()),
        Code::InvalidArgument,
    ));
    let mut flag = match inline(id, &f.target, &[], mount_capability(Access::Writer)) {
        Call::Publish(r) => r,
        _ => unreachable!(),
    };
    flag.volume_context.insert("csi.storage.k8s.io/ephemeral".into(), "yes".into());
    rows.push(row("NodePublish inline: csi.storage.k8s.io/ephemeral=yes", Call::Publish(flag), Code::InvalidArgument));
    rows
}

fn group_rows(f: &Fixture) -> Vec<Row> {
    let group = |sources: Vec<String>, params: &[(&str, &str)]| {
        Call::Group(csi::CreateVolumeGroupSnapshotRequest {
            name: "hostile-group".into(),
            source_volume_ids: sources,
            parameters: map(params),
            ..Default::default()
        })
    };
    let big = huge();
    vec![
        row("CreateVolumeGroupSnapshot: no sources", group(vec![], &[]), Code::InvalidArgument),
        row(
            "CreateVolumeGroupSnapshot: a source twice",
            group(vec![f.volume.clone(), f.volume.clone()], &[]),
            Code::InvalidArgument,
        ),
        row("CreateVolumeGroupSnapshot: a 100 KB source", group(vec![big.clone()], &[]), Code::InvalidArgument),
        row("CreateVolumeGroupSnapshot: unknown source", group(vec![format!("{UNKNOWN}@{NODE}")], &[]), Code::NotFound),
        row(
            "CreateVolumeGroupSnapshot: malformed source",
            group(vec![format!("0123456789abcdef@{NODE}")], &[]),
            Code::InvalidArgument,
        ),
        row(
            "CreateVolumeGroupSnapshot: unknown parameter",
            group(vec![f.volume.clone()], &[("freeze", "false")]),
            Code::InvalidArgument,
        ),
        row(
            "CreateVolumeGroupSnapshot: 100 KB parameter key",
            group(vec![f.volume.clone()], &[(big.as_str(), "x")]),
            Code::InvalidArgument,
        ),
        row(
            "DeleteVolumeGroupSnapshot: 100 KB id",
            Call::DeleteGroup(csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: big.clone(),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ),
        row(
            "DeleteVolumeGroupSnapshot: unknown id",
            Call::DeleteGroup(csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: format!("{UNKNOWN}@{NODE}"),
                ..Default::default()
            }),
            Code::Ok,
        ),
        row(
            "GetVolumeGroupSnapshot: empty id",
            Call::GetGroup(csi::GetVolumeGroupSnapshotRequest::default()),
            Code::InvalidArgument,
        ),
        row(
            "GetVolumeGroupSnapshot: traversal id",
            Call::GetGroup(csi::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: "../../etc".into(),
                ..Default::default()
            }),
            Code::NotFound,
        ),
        row(
            "GetVolumeGroupSnapshot: a snapshot's id",
            Call::GetGroup(csi::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: f.snapshot.clone(),
                ..Default::default()
            }),
            Code::NotFound,
        ),
    ]
}

/// Detaches loop devices of images under the harness's directory when the
/// test ends, failed or not: a regression that lets a hostile inline volume
/// through would attach one (the harness itself only cleans up after
/// privileged runs).
struct LoopDevicesOf(std::path::PathBuf);

impl Drop for LoopDevicesOf {
    fn drop(&mut self) {
        for device in loam::kernel::loopdev::list().unwrap_or_default() {
            if device.backing_file.starts_with(&self.0) {
                let _ = loam::kernel::loopdev::detach(&device.device);
            }
        }
    }
}

/// The remaining fields of the remaining RPCs: node ids, volume paths,
/// topology, snapshot parameters, capabilities where they are optional.
fn other_field_rows(f: &Fixture) -> Vec<Row> {
    let big = huge();
    let attach = |node: &str, cap: Option<csi::VolumeCapability>| {
        Call::Attach(csi::ControllerPublishVolumeRequest {
            volume_id: f.volume.clone(),
            node_id: node.into(),
            volume_capability: cap,
            ..Default::default()
        })
    };
    let stats = |path: &str| {
        Call::Stats(csi::NodeGetVolumeStatsRequest {
            volume_id: f.volume.clone(),
            volume_path: path.into(),
            ..Default::default()
        })
    };
    let node_expand = |range: Option<csi::CapacityRange>, cap: Option<csi::VolumeCapability>| {
        Call::NodeExpand(csi::NodeExpandVolumeRequest {
            volume_id: f.volume.clone(),
            volume_path: f.target.clone(),
            capacity_range: range,
            volume_capability: cap,
            ..Default::default()
        })
    };
    let mut topology = create_request("hostile-topology", 1 << 20);
    topology.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology { segments: map(&[("topology.loam.csi.dev/node", big.as_str())]) }],
        preferred: vec![],
    });
    vec![
        row(
            "ControllerPublish: empty node id",
            attach("", Some(mount_capability(Access::Writer))),
            Code::InvalidArgument,
        ),
        row(
            "ControllerPublish: 100 KB node id",
            attach(&big, Some(mount_capability(Access::Writer))),
            Code::InvalidArgument,
        ),
        row(
            "ControllerPublish: unknown node",
            attach("node-b", Some(mount_capability(Access::Writer))),
            Code::NotFound,
        ),
        row("ControllerPublish: no capability", attach(NODE, None), Code::InvalidArgument),
        row("ControllerPublish: bad mount flag", attach(NODE, Some(flags(&["x-weird"]))), Code::InvalidArgument),
        row(
            "ControllerUnpublish: 100 KB node id",
            Call::Detach(csi::ControllerUnpublishVolumeRequest {
                volume_id: f.volume.clone(),
                node_id: big.clone(),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ),
        row("NodeGetVolumeStats: empty volume path", stats(""), Code::InvalidArgument),
        row("NodeGetVolumeStats: 100 KB volume path", stats(&big), Code::InvalidArgument),
        row("NodeGetVolumeStats: a path it is not published at", stats("/tmp/not-published-here"), Code::NotFound),
        row(
            "NodeExpand: negative capacity",
            node_expand(Some(csi::CapacityRange { required_bytes: -1, limit_bytes: 0 }), None),
            Code::InvalidArgument,
        ),
        row("NodeExpand: bad capability", node_expand(None, Some(flags(&["x-weird"]))), Code::InvalidArgument),
        row(
            "NodeExpand: empty volume path",
            Call::NodeExpand(csi::NodeExpandVolumeRequest { volume_id: f.volume.clone(), ..Default::default() }),
            Code::InvalidArgument,
        ),
        row("CreateVolume: topology naming a 100 KB node", Call::Create(topology), Code::ResourceExhausted),
        row(
            "CreateSnapshot: unknown parameter",
            Call::Snapshot(csi::CreateSnapshotRequest {
                source_volume_id: f.volume.clone(),
                name: "hostile-snap-params".into(),
                parameters: map(&[("color", "blue")]),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ),
        row(
            "CreateSnapshot: unknown protection",
            Call::Snapshot(csi::CreateSnapshotRequest {
                source_volume_id: f.volume.clone(),
                name: "hostile-snap-protection".into(),
                parameters: map(&[("protection", "everywhere")]),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ),
        // A lone driver has no other node to keep the copy on.
        row(
            "CreateSnapshot: off-node protection without a controller",
            Call::Snapshot(csi::CreateSnapshotRequest {
                source_volume_id: f.volume.clone(),
                name: "hostile-snap-off-node".into(),
                parameters: map(&[("protection", "off-node")]),
                ..Default::default()
            }),
            Code::FailedPrecondition,
        ),
        // No volume can have it, so none fits: OK with 0 bytes, as the spec asks.
        row(
            "GetCapacity: multi-node capability",
            Call::Capacity(csi::GetCapacityRequest {
                volume_capabilities: vec![capability(
                    Mode::MultiNodeMultiWriter as i32,
                    Some(AccessType::Mount(Default::default())),
                )],
                ..Default::default()
            }),
            Code::Ok,
        ),
    ]
}

#[tokio::test]
async fn every_hostile_input_gets_its_code_never_internal_and_no_unbounded_echo() {
    let mut h = Harness::start().await;
    let _loop_devices = LoopDevicesOf(h.root());
    let f = fixture(&mut h).await;
    let root = path_str(&h.root());
    let rows: Vec<Row> = [
        malformed_volume_ids(&f),
        unknown_volume_ids(&f),
        snapshot_id_rows(&f),
        name_rows(),
        parameter_rows(),
        modify_rows(&f),
        capacity_rows(&f),
        capability_rows(&f),
        path_rows(&f, &root),
        listing_rows(),
        secret_rows(&f),
        inline_rows(&f),
        group_rows(&f),
        other_field_rows(&f),
    ]
    .into_iter()
    .flatten()
    .collect();
    let total = rows.len();
    assert!(total >= 150, "the corpus has {total} rows");
    let mut failures = Vec::new();
    for Row { label, call, want } in rows {
        let (got, message) = outcome(&mut h, call).await;
        let echoed = message.contains(&"A".repeat(200));
        let refused_without_reason = got != Want::Code(Code::Ok) && message.is_empty();
        if got != want
            || got == Want::Code(Code::Internal)
            || message.len() > MAX_MESSAGE
            || echoed
            || refused_without_reason
        {
            failures.push(format!("{label}: want {want:?}, got {got:?} ({} bytes): {message:.300}", message.len()));
        }
    }
    eprintln!("{total} rows, {} failed", failures.len());
    assert!(failures.is_empty(), "{} of {total} rows failed:\n{}", failures.len(), failures.join("\n"));
}

/// CreateVolume rounds a loop ext4 volume too small for its filesystem up
/// to the least that formats (as xfs to 300 MiB), so NodeStage never meets
/// an image mkfs refuses; a limit that forbids it is OUT_OF_RANGE.
#[tokio::test]
async fn loop_volumes_are_made_large_enough_for_their_filesystem_and_options() {
    let mut h = Harness::start().await;
    let mut request = create_request("tiny-ext4", 4097);
    request.parameters = map(&[("backend", "loop"), ("provisioning", "thin")]);
    let volume = h.create_volume(request).await.expect("rounded up");
    assert_eq!(volume.capacity_bytes, 4 << 20, "ext4's least size");
    let mut request = create_request("many-inodes", 1 << 20);
    request.parameters = map(&[("backend", "loop"), ("provisioning", "thin"), ("mkfsOptions", "-N 100000")]);
    let volume = h.create_volume(request).await.expect("rounded up");
    assert!(volume.capacity_bytes >= (4 << 20) + 100_000 * 256 * 2, "{}", volume.capacity_bytes);
    let mut request = create_request("limited", 4097);
    request.capacity_range = Some(csi::CapacityRange { required_bytes: 4097, limit_bytes: 1 << 20 });
    request.parameters = map(&[("backend", "loop"), ("provisioning", "thin")]);
    let err = h.create_volume(request).await.expect_err("limit below ext4's least size");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
}

/// A disk with 4096-byte logical sectors (a loop device over a file, like a
/// 4Kn drive), formatted ext4 and mounted as the driver's root; detached and
/// unmounted however the test ends.
struct SectorDisk {
    device: String,
    image: std::path::PathBuf,
    root: std::path::PathBuf,
}

impl SectorDisk {
    fn new(dir: &std::path::Path) -> SectorDisk {
        use std::process::Command;
        let image = dir.join("disk4k.img");
        std::fs::File::create(&image).unwrap().set_len(128 << 20).unwrap();
        let out = Command::new("losetup")
            .args(["--sector-size", "4096", "--show", "-f"])
            .arg(&image)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let root = dir.join("root");
        let device = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let disk = SectorDisk { device, image: image.canonicalize().unwrap(), root };
        let status = Command::new("mkfs.ext4").args(["-q", "-F", &disk.device]).status().expect("mkfs.ext4");
        assert!(status.success());
        std::fs::create_dir(&disk.root).unwrap();
        nix::mount::mount(
            Some(disk.device.as_str()),
            &disk.root,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount the 4K disk");
        disk
    }
}

impl Drop for SectorDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.root, nix::mount::MntFlags::MNT_DETACH);
        // Only while it still backs our image: once the harness has detached
        // it, the number may already belong to another test's device.
        for device in loam::kernel::loopdev::list().unwrap_or_default() {
            if device.backing_file == self.image && device.device == std::path::Path::new(&self.device) {
                let _ = loam::kernel::loopdev::detach(&device.device);
            }
        }
    }
}

/// On a root whose loop devices get 4096-byte sectors, a 1024-byte block
/// size cannot be formatted: CreateVolume refuses it (it used to pass and
/// fail NodeStage with INTERNAL) and leaves no image; 4096 stages for real.
#[tokio::test]
#[ignore = "needs root: a 4K-sector loop disk mounted as the driver's root, real mounts"]
async fn block_sizes_below_the_roots_sectors_are_refused_at_create() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SectorDisk::new(dir.path());
    let mut h = Harness::start_with_quota(dir, loam::config::QuotaMode::Auto).await;
    let _loop_devices = LoopDevicesOf(h.root());
    let request = |name: &str, options: &str| {
        let mut request = create_request(name, 8 << 20);
        request.parameters = map(&[("backend", "loop"), ("provisioning", "thin"), ("mkfsOptions", options)]);
        request
    };
    let err = h.create_volume(request("small-blocks", "-b 1024")).await.expect_err("1024-byte blocks on 4K sectors");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("4096"), "{err:?}");
    let images = std::fs::read_dir(h.root().join("volumes")).unwrap().count();
    assert_eq!(images, 0, "the refused volume's image is removed");
    let id = h.create_volume(request("large-blocks", "-b 4096")).await.expect("4096-byte blocks").volume_id;
    let staging = h.co_path("staging");
    h.stage(&id, &staging).await.expect("stage formats and mounts");
    h.unstage(&id, &staging).await.expect("unstage");
    drop(h);
    drop(disk);
}

/// What CreateVolume accepts, NodeStage formats and mounts: a few option
/// sets of each filesystem, staged for real and unstaged.
#[tokio::test]
#[ignore = "needs root: real loop devices, mkfs and mounts in a private mount namespace"]
async fn accepted_mkfs_options_stage_for_real() {
    let mut h = Harness::start().await;
    let _loop_devices = LoopDevicesOf(h.root());
    for (i, (fs, options)) in [
        ("ext4", "-b 4096 -I 512 -i 8192 -O ^has_journal,encrypt -E stride=16,stripe_width=64 -L data -m 1"),
        (
            "ext4",
            "-N 5000 -O metadata_csum_seed,large_dir -E root_owner=1000:1000 -U 0123abcd-0000-1111-2222-333344445555",
        ),
        ("ext4", "-b 2048 -I 1024"),
        ("xfs", "-b size=4096 -i size=1024,maxpct=10,sparse=1 -m reflink=1,rmapbt=1,bigtime=1 -n size=16384 -L data"),
        ("xfs", "-m finobt=1,inobtcount=1,uuid=0123abcd-0000-1111-2222-333344445555"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut request = create_request(&format!("options-{i}"), 1 << 20);
        request.parameters =
            map(&[("backend", "loop"), ("provisioning", "thin"), ("fsType", fs), ("mkfsOptions", options)]);
        let id = h.create_volume(request).await.expect("accepted").volume_id;
        let staging = h.co_path(&format!("staging-{i}"));
        h.stage(&id, &staging).await.unwrap_or_else(|e| panic!("{fs} {options:?}: {e:?}"));
        h.unstage(&id, &staging).await.expect("unstage");
    }
}
