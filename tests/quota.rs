//! Enforced capacities on a real filesystem: a fresh btrfs (default), XFS or
//! ext4 (`LOAM_QUOTA_FS=xfs|ext4`, run in a VM by `scripts/vm-quota-test.sh`
//! because the host kernel lacks their quota code) on a loop device, used as
//! the driver's root. Needs root in a private mount namespace
//! (`LOAM_PRIVILEGED_TESTS=1`); the filesystem is unmounted and its loop
//! device detached on every exit, failures included. The same filesystems,
//! made by docs/operate.md's commands, must enforce too.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::quota_fs::{TestFs, fs_kind, is_over_quota, start, sync, write_unprivileged};
use common::{Access, Harness};
use loam::config::QuotaMode;
use loam::csi;
use loam::kernel::quota::{Btrfs, Project, btrfs::Probe};
use tonic::Code;

const MIB: u64 = 1 << 20;

async fn used_bytes(h: &mut Harness, id: &str, path: &Path) -> u64 {
    let stats = h
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: common::path_str(path),
            ..Default::default()
        })
        .await
        .expect("stats")
        .into_inner();
    u64::try_from(stats.usage[0].used).expect("non-negative")
}

async fn quota_context(h: &mut Harness, id: &str) -> String {
    let volume = h
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id.into() })
        .await
        .expect("get volume")
        .into_inner()
        .volume
        .expect("volume");
    volume.volume_context["quota"].clone()
}

/// The limit the kernel enforces for a volume whose context says `quota`.
fn kernel_limit(root: &Path, quota: &str) -> u64 {
    if let Some(id) = quota.strip_prefix("btrfs qgroup 0/") {
        let Probe::Enforcing(btrfs) = Btrfs::probe(root, false).expect("probe") else { panic!("quotas off") };
        btrfs.usage(id.parse().expect("id")).expect("usage").1.unwrap_or(0)
    } else if let Some(id) = quota.strip_prefix("project quota ") {
        Project::open(root).expect("project").get(id.parse().expect("id")).expect("get").bytes_limit
    } else {
        panic!("volume is not enforced: {quota}")
    }
}

/// Changes a volume's limit behind the driver's back.
fn tamper_limit(root: &Path, quota: &str, bytes: u64) {
    if let Some(id) = quota.strip_prefix("btrfs qgroup 0/") {
        let Probe::Enforcing(btrfs) = Btrfs::probe(root, false).expect("probe") else { panic!("quotas off") };
        btrfs.set_limit(root, id.parse().expect("id"), bytes).expect("limit");
    } else if let Some(id) = quota.strip_prefix("project quota ") {
        Project::open(root).expect("project").set_limit(id.parse().expect("id"), bytes, 0).expect("limit");
    }
}

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn capacity_is_enforced_grows_online_survives_restarts_and_is_reported() {
    let (_fs, mut h) = start().await;
    let root = h.root();
    let block = nix::sys::statvfs::statvfs(&root).expect("statvfs").block_size();
    let id = h.create("pvc-quota", common::bytes(32 * MIB)).await;
    let quota = quota_context(&mut h, &id).await;
    assert_eq!(kernel_limit(&root, &quota), 32 * MIB, "{quota}");
    let (staging, target) = (h.co_path("staging"), h.co_path("pod"));
    h.stage(&id, &staging).await.unwrap();
    h.publish(&id, &staging, &target, Access::Writer, false).await.unwrap();
    sync(&target);
    let empty = used_bytes(&mut h, &id, &target).await;

    // 48 MiB do not fit in 32 MiB.
    let (written, err) = write_unprivileged(&target.join("big"), 48 * MIB);
    eprintln!("{}: wrote {written} bytes into a 32 MiB volume, then {err:?}", fs_kind());
    assert!(is_over_quota(&err), "writing past capacity must fail: {err:?}");
    assert!((31 * MIB..=32 * MIB).contains(&written), "stops within 1 MiB of the capacity: {written}");
    fs::remove_file(target.join("big")).unwrap();
    sync(&target);

    // Grown online, through both halves of an expansion, with the volume published.
    let grow = Some(csi::CapacityRange { required_bytes: common::bytes(64 * MIB), limit_bytes: 0 });
    h.controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: grow,
            ..Default::default()
        })
        .await
        .unwrap();
    h.node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: common::path_str(&target),
            capacity_range: grow,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(kernel_limit(&root, &quota), 64 * MIB);
    let (written, err) = write_unprivileged(&target.join("big"), 48 * MIB);
    assert!(err.is_none() && written == 48 * MIB, "the same write after expansion: {written} {err:?}");

    // Stats come from the quota and match what was written.
    sync(&target);
    let used = used_bytes(&mut h, &id, &target).await;
    eprintln!("{}: empty volume uses {empty}, after 48 MiB {used} (block {block})", fs_kind());
    assert!(used.abs_diff(empty + 48 * MIB) <= block, "used {used}, empty {empty}, block {block}");

    // Someone loosens the limit; a restart puts it back, and it holds.
    tamper_limit(&root, &quota, 512 * MIB);
    let mut h = h.restart().await;
    assert_eq!(kernel_limit(&root, &quota), 64 * MIB, "restored after restart");
    let (written, err) = write_unprivileged(&target.join("more"), 32 * MIB);
    assert!(is_over_quota(&err), "after a restart the limit still holds: {written} {err:?}");
    fs::remove_file(target.join("more")).unwrap();

    h.unpublish(&id, &target).await.unwrap();
    h.unstage(&id, &staging).await.unwrap();
    h.controller.delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() }).await.unwrap();
}

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn concurrent_creates_get_distinct_limits_and_snapshots_restore_with_their_own() {
    let (_fs, mut h) = start().await;
    let root = h.root();
    let creates: Vec<_> = (0..32u64)
        .map(|i| {
            let mut controller = h.controller.clone();
            tokio::spawn(async move {
                // Distinct sizes, so every limit is distinct too; 264 MiB in all.
                let req = common::create_request(&format!("pvc-{i}"), common::bytes((i + 1) * MIB / 2));
                controller.create_volume(req).await.expect("create").into_inner().volume.expect("volume")
            })
        })
        .collect();
    let mut ids = Vec::new();
    let mut quotas = std::collections::BTreeSet::new();
    for (i, task) in creates.into_iter().enumerate() {
        let volume = task.await.unwrap();
        let quota = volume.volume_context["quota"].clone();
        assert_eq!(kernel_limit(&root, &quota), (i as u64 + 1) * MIB / 2, "{quota}");
        quotas.insert(quota);
        ids.push(volume.volume_id);
    }
    assert_eq!(quotas.len(), 32, "{quotas:?}");

    // A restore from a snapshot is limited on its own.
    let snapshot = h.snapshot(&ids[3], "snap").await.unwrap();
    let req = common::from_snapshot(common::create_request("restored", common::bytes(8 * MIB)), &snapshot.snapshot_id);
    let restored = h.controller.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    let quota = restored.volume_context["quota"].clone();
    assert!(!quotas.contains(&quota), "{quota}");
    assert_eq!(kernel_limit(&root, &quota), 8 * MIB);

    // What the volumes were promised is no longer offered.
    let free = nix::sys::statvfs::statvfs(&root).unwrap();
    let free = free.blocks_available() * free.fragment_size();
    let capacity =
        h.controller.get_capacity(csi::GetCapacityRequest::default()).await.unwrap().into_inner().available_capacity;
    let capacity = u64::try_from(capacity).unwrap();
    let promised: u64 = (1..=32).map(|i| i * MIB / 2).sum::<u64>() + 8 * MIB;
    assert!(capacity < free && capacity + promised >= free, "capacity {capacity}, free {free}, promised {promised}");

    h.controller
        .delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: snapshot.snapshot_id, ..Default::default() })
        .await
        .unwrap();
    for id in ids.into_iter().chain([restored.volume_id]) {
        h.controller.delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() }).await.unwrap();
    }
    if let Some(id) = quota.strip_prefix("project quota ") {
        let id: u32 = id.parse().unwrap();
        assert_eq!(Project::open(&root).unwrap().get(id).unwrap().bytes_limit, 0, "released ids are cleared");
    }
}

/// The filesystems docs/operate.md prepares a root on, as its blocks' first
/// lines name them, and this test's name for each.
const GUIDE_FILESYSTEMS: [(&str, &str); 3] = [("btrfs", "btrfs"), ("XFS", "xfs"), ("ext4", "ext4")];

/// The ```sh blocks of docs/operate.md's "Give a node a root that enforces
/// capacity", each as its lines.
fn guide_blocks() -> Vec<Vec<&'static str>> {
    let doc = include_str!("../docs/operate.md");
    let heading = "\n## Give a node a root that enforces capacity\n";
    let section = doc.split(heading).nth(1).expect("the section in docs/operate.md");
    let section = section.split("\n## ").next().expect("text");
    let mut lines = section.lines();
    let mut blocks = Vec::new();
    while let Some(line) = lines.next() {
        if line == "```sh" {
            blocks.push(lines.by_ref().take_while(|l| *l != "```").collect());
        }
    }
    blocks
}

/// Which filesystem a block of the guide is for (its first line, `# XFS: ...`).
fn guide_block_fs(block: &[&str]) -> &'static str {
    let first = block.first().copied().unwrap_or_default();
    GUIDE_FILESYSTEMS
        .iter()
        .find(|(named, _)| {
            first
                .strip_prefix("# ")
                .and_then(|rest| rest.strip_prefix(named))
                .is_some_and(|rest| rest.starts_with([':', ',']))
        })
        .map(|(_, kind)| *kind)
        .unwrap_or_else(|| panic!("a block of the guide names no filesystem in its first line: {block:?}"))
}

#[ignore = "needs root: mkfs and mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn the_operate_guide_prepares_a_root_that_enforces() {
    // Every block is for a filesystem some run of this test covers (btrfs
    // here, XFS and ext4 in scripts/vm-quota-test.sh's VM).
    let blocks: Vec<_> = guide_blocks().into_iter().filter(|b| guide_block_fs(b) == fs_kind()).collect();
    assert!(!blocks.is_empty(), "docs/operate.md prepares no {} root", fs_kind());
    for block in blocks {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical").join("root");
        let fs = TestFs::blank(&root);
        // A block that makes no filesystem turns one that exists into a
        // root that enforces: the one it starts from has no quota features.
        if !block.iter().any(|l| l.starts_with("mkfs")) {
            let out = Command::new(format!("mkfs.{}", fs_kind())).arg("-q").arg(fs.device()).output().expect("mkfs");
            assert!(out.status.success(), "mkfs: {}", String::from_utf8_lossy(&out.stderr));
        }
        // The lines as written, but for the disk and the root's place.
        let mut script = String::new();
        for line in &block {
            match line.split_once('=') {
                Some(("dev", _)) => script += &format!("dev={}\n", fs.device()),
                Some(("root", _)) => script += &format!("root={}\n", root.display()),
                _ => script += &format!("{line}\n"),
            }
        }
        assert_eq!(script.matches("\ndev=").count() + script.matches("\nroot=").count(), 2, "{script}");
        let out = Command::new("bash").args(["-euxo", "pipefail", "-c", &script]).output().expect("bash");
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "docs/operate.md's block {:?} failed", block[0]);

        // Auto: Loam turns nothing on itself, so the block alone must do it.
        let mut h = Harness::start_with_quota(dir, QuotaMode::Auto).await;
        let id = h.create("pvc-guide", common::bytes(32 * MIB)).await;
        let quota = quota_context(&mut h, &id).await;
        assert_eq!(kernel_limit(&h.root(), &quota), 32 * MIB, "after {:?}: {quota}", block[0]);
        h.controller.delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() }).await.unwrap();
        // The harness stops, then the filesystem is unmounted and detached
        // (locals drop in reverse order).
    }
}

#[tokio::test]
async fn required_refuses_volumes_on_a_root_that_cannot_enforce() {
    // No privileges needed: the temporary directory's filesystem has no
    // usable quota (tmpfs, or ext4 without prjquota), and nothing is mounted.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = Harness::start_with_quota(dir, QuotaMode::Required).await;
    let err = h.controller.create_volume(common::create_request("pvc", common::bytes(MIB))).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("--quota required") && err.message().contains("prjquota"), "{err:?}");
}
