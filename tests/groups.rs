//! Volume group snapshots through the real gRPC server: members restore what
//! their volumes held at the cut, retries and conflicts, membership checks,
//! the write-order consistency rule, rollback of failed and crashed cuts,
//! and (with `LOAM_PRIVILEGED_TESTS=1`) loop filesystems frozen while written.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Access, Harness, NODE, block_capability, create_request, from_snapshot, mount_capability};
use loam::csi;
use tonic::Code;

const MIB: i64 = 1 << 20;
const ELSEWHERE: &str = "0123456789abcdef0123456789abcdef@other-node";
const MISSING: &str = "0123456789abcdef0123456789abcdef@test-node";

fn key_of(id: &str) -> &str {
    id.split('@').next().unwrap()
}

fn data(h: &Harness, volume_id: &str) -> PathBuf {
    h.root().join("volumes").join(key_of(volume_id))
}

fn snapshot_files(h: &Harness) -> usize {
    std::fs::read_dir(h.root().join("snapshots")).unwrap().count()
}

async fn listed_snapshots(h: &mut Harness) -> Vec<csi::Snapshot> {
    let listed = h.controller.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    listed.entries.into_iter().map(|e| e.snapshot.unwrap()).collect()
}

async fn get(h: &mut Harness, id: &str, snapshot_ids: &[String]) -> Result<csi::VolumeGroupSnapshot, tonic::Status> {
    let request = csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: snapshot_ids.to_vec(),
        ..Default::default()
    };
    Ok(h.group.get_volume_group_snapshot(request).await?.into_inner().group_snapshot.unwrap())
}

async fn delete(h: &mut Harness, id: &str, snapshot_ids: &[String]) -> Result<(), tonic::Status> {
    let request = csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: snapshot_ids.to_vec(),
        ..Default::default()
    };
    h.group.delete_volume_group_snapshot(request).await.map(drop)
}

fn member_ids(group: &csi::VolumeGroupSnapshot) -> Vec<String> {
    group.snapshots.iter().map(|s| s.snapshot_id.clone()).collect()
}

#[tokio::test]
async fn a_group_of_two_volumes_restores_each_and_goes_only_as_a_whole() {
    let mut h = Harness::start().await;
    let (a, b) = (h.create("pvc-a", MIB).await, h.create("pvc-b", MIB).await);
    std::fs::write(data(&h, &a).join("file"), b"a at the cut").unwrap();
    std::fs::write(data(&h, &b).join("file"), b"b at the cut").unwrap();

    let group = h.group_snapshot("group-1", &[&a, &b]).await.unwrap();
    assert!(group.group_snapshot_id.ends_with(&format!("@{NODE}")), "{}", group.group_snapshot_id);
    assert!(group.ready_to_use && group.creation_time.is_some());
    let sources: Vec<&str> = group.snapshots.iter().map(|s| s.source_volume_id.as_str()).collect();
    assert_eq!(sources, [a.as_str(), b.as_str()]);
    for snapshot in &group.snapshots {
        assert_eq!(snapshot.group_snapshot_id, group.group_snapshot_id);
        assert!(snapshot.ready_to_use);
        assert_eq!(snapshot.creation_time, group.creation_time, "members are cut at the group's instant");
    }
    std::fs::write(data(&h, &a).join("file"), b"a later").unwrap();
    std::fs::write(data(&h, &b).join("file"), b"b later").unwrap();

    // A retry, in any order, is the same group; other volumes under the name are not.
    for retry in [[&a, &b], [&b, &a]] {
        let again = h.group_snapshot("group-1", &retry.map(String::as_str)).await.unwrap();
        assert_eq!(again.group_snapshot_id, group.group_snapshot_id);
        assert_eq!(member_ids(&again), member_ids(&group));
    }
    let c = h.create("pvc-c", MIB).await;
    let err = h.group_snapshot("group-1", &[&a, &c]).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(h.group_snapshot("group-1", &[&a]).await.unwrap_err().code(), Code::AlreadyExists);

    // Each member restores what its own volume held at the cut.
    for (snapshot, want) in group.snapshots.iter().zip([&b"a at the cut"[..], b"b at the cut"]) {
        let name = format!("restore-{}", &snapshot.snapshot_id[..8]);
        let restored = h.create_volume(from_snapshot(create_request(&name, MIB), &snapshot.snapshot_id)).await.unwrap();
        assert_eq!(std::fs::read(data(&h, &restored.volume_id).join("file")).unwrap(), want);
    }

    // Members are ordinary snapshots that say which group they belong to.
    let listed = listed_snapshots(&mut h).await;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|s| s.group_snapshot_id == group.group_snapshot_id));
    let got = h
        .controller
        .get_snapshot(csi::GetSnapshotRequest { snapshot_id: member_ids(&group)[1].clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.snapshot.unwrap().group_snapshot_id, group.group_snapshot_id);

    // A member goes only with its group.
    let alone = csi::DeleteSnapshotRequest { snapshot_id: member_ids(&group)[0].clone(), ..Default::default() };
    let err = h.controller.delete_snapshot(alone).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains(&group.group_snapshot_id), "{}", err.message());

    // Snapshot ids that are not the group's members are refused, and nothing is deleted.
    let mut reversed = member_ids(&group);
    reversed.reverse();
    let wrong = [vec![member_ids(&group)[0].clone()], vec![member_ids(&group)[0].clone(), MISSING.to_owned()]];
    for ids in &wrong {
        assert_eq!(get(&mut h, &group.group_snapshot_id, ids).await.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(delete(&mut h, &group.group_snapshot_id, ids).await.unwrap_err().code(), Code::InvalidArgument);
    }
    let fetched = get(&mut h, &group.group_snapshot_id, &reversed).await.unwrap();
    assert_eq!(member_ids(&fetched), member_ids(&group));
    assert!(fetched.ready_to_use);

    delete(&mut h, &group.group_snapshot_id, &reversed).await.unwrap();
    assert_eq!(get(&mut h, &group.group_snapshot_id, &[]).await.unwrap_err().code(), Code::NotFound);
    assert!(listed_snapshots(&mut h).await.is_empty());
    assert_eq!(snapshot_files(&h), 0, "member data outlived its group");
    delete(&mut h, &group.group_snapshot_id, &[]).await.unwrap();
}

#[tokio::test]
async fn requests_are_checked_and_the_service_is_advertised() {
    let mut h = Harness::start().await;
    let a = h.create("pvc-a", MIB).await;
    let caps = h.identity.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    use csi::plugin_capability::{Type, service};
    let group_service = caps.capabilities.iter().any(
        |c| matches!(&c.r#type, Some(Type::Service(s)) if s.r#type == service::Type::GroupControllerService as i32),
    );
    assert!(group_service, "GROUP_CONTROLLER_SERVICE is not advertised");
    let caps = h.group.group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {}).await;
    use csi::group_controller_service_capability::{Type as G, rpc::Type as GType};
    let names: Vec<i32> = caps
        .unwrap()
        .into_inner()
        .capabilities
        .iter()
        .map(|c| match c.r#type {
            Some(G::Rpc(rpc)) => rpc.r#type,
            None => 0,
        })
        .collect();
    assert_eq!(names, [GType::CreateDeleteGetVolumeGroupSnapshot as i32]);

    for (name, sources, code) in [
        ("", vec![a.as_str()], Code::InvalidArgument),
        ("g", vec![], Code::InvalidArgument),
        ("g", vec![a.as_str(), a.as_str()], Code::InvalidArgument),
        ("g", vec![a.as_str(), "garbage"], Code::InvalidArgument),
        ("g", vec![a.as_str(), ELSEWHERE], Code::InvalidArgument),
        ("g", vec![a.as_str(), MISSING], Code::NotFound),
    ] {
        let err = h.group_snapshot(name, &sources).await.unwrap_err();
        assert_eq!(err.code(), code, "{name:?} {sources:?}: {err:?}");
    }
    let with = |parameters: &[(&str, &str)]| csi::CreateVolumeGroupSnapshotRequest {
        name: "g".into(),
        source_volume_ids: vec![a.clone()],
        parameters: parameters.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>(),
        ..Default::default()
    };
    let err = h.group.create_volume_group_snapshot(with(&[("freeze", "no")])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    h.group.create_volume_group_snapshot(with(&[("csi.storage.k8s.io/group-snapshot-name", "x")])).await.unwrap();
    // A refused request left nothing behind.
    assert_eq!(listed_snapshots(&mut h).await.len(), 1);

    assert_eq!(get(&mut h, "", &[]).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(get(&mut h, "fake-group-id", &[]).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(&mut h, MISSING, &[]).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(delete(&mut h, "", &[]).await.unwrap_err().code(), Code::InvalidArgument);
    for unknown in ["fake-group-id", MISSING, ELSEWHERE] {
        delete(&mut h, unknown, &[]).await.unwrap();
    }
}

/// Whether dir volumes on this harness's root are btrfs subvolumes, whose
/// snapshots are point in time.
fn dir_snapshots_are_atomic(h: &Harness) -> bool {
    nix::sys::statfs::statfs(&h.root().join("volumes")).unwrap().filesystem_type()
        == nix::sys::statfs::BTRFS_SUPER_MAGIC
}

#[tokio::test]
async fn two_live_dir_volumes_cannot_be_cut_together() {
    let mut h = Harness::start().await;
    let (a, b, quiet) = (h.create("pvc-a", MIB).await, h.create("pvc-b", MIB).await, h.create("pvc-q", MIB).await);
    for id in [&a, &b] {
        let (staging, target) = (h.co_path(&format!("staging-{id}")), h.co_path(&format!("target-{id}")));
        h.stage(id, &staging).await.unwrap();
        h.publish(id, &staging, &target, Access::Writer, false).await.unwrap();
    }
    let err = h.group_snapshot("group-live", &[&a, &quiet, &b]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    for named in [&a, &b, &"loop volumes staged as a filesystem are frozen".to_owned()] {
        assert!(err.message().contains(named.as_str()), "{}", err.message());
    }
    assert!(!err.message().contains(&quiet), "the quiet volume is not to blame: {}", err.message());
    assert!(listed_snapshots(&mut h).await.is_empty());
    assert_eq!(snapshot_files(&h), 0);

    // One live volume alone is a plain snapshot; with a quiet one it needs a
    // point-in-time snapshot of its own, which a copied directory is not.
    h.group_snapshot("group-alone", &[&a]).await.unwrap();
    let with_quiet = h.group_snapshot("group-pair", &[&a, &quiet]).await;
    if dir_snapshots_are_atomic(&h) {
        assert_eq!(with_quiet.unwrap().snapshots.len(), 2);
    } else {
        let err = with_quiet.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("file-by-file copy"), "{}", err.message());
    }
}

#[tokio::test]
async fn a_failed_cut_leaves_no_member_and_a_retry_succeeds() {
    let mut h = Harness::start().await;
    let (a, b) = (h.create("pvc-a", MIB).await, h.create("pvc-b", MIB).await);
    // b's data is replaced by a link: its snapshot fails after a's was cut.
    let outside = tempfile::tempdir().unwrap();
    std::fs::remove_dir(data(&h, &b)).unwrap();
    std::os::unix::fs::symlink(outside.path(), data(&h, &b)).unwrap();
    let err = h.group_snapshot("group-fail", &[&a, &b]).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    assert!(listed_snapshots(&mut h).await.is_empty(), "a member outlived the failed group");
    assert_eq!(snapshot_files(&h), 0);
    let id = format!("{}@{NODE}", loam::ids::Key::for_name(loam::ids::Kind::GroupSnapshot, "group-fail"));
    assert_eq!(get(&mut h, &id, &[]).await.unwrap_err().code(), Code::NotFound);

    std::fs::remove_file(data(&h, &b)).unwrap();
    std::fs::create_dir(data(&h, &b)).unwrap();
    let group = h.group_snapshot("group-fail", &[&a, &b]).await.unwrap();
    assert_eq!(group.group_snapshot_id, id);
    assert_eq!(listed_snapshots(&mut h).await.len(), 2);
}

#[tokio::test]
async fn a_group_a_crash_left_incomplete_is_rolled_back_at_restart() {
    let mut h = Harness::start().await;
    let (a, b) = (h.create("pvc-a", MIB).await, h.create("pvc-b", MIB).await);
    let group = h.group_snapshot("group-crash", &[&a, &b]).await.unwrap();
    // As the record stands between the intent and the last member's cut.
    let record = h.root().join("meta/groups").join(format!("{}.json", key_of(&group.group_snapshot_id)));
    let mut intent: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(intent["complete"], true);
    intent["complete"] = false.into();
    std::fs::write(&record, serde_json::to_vec(&intent).unwrap()).unwrap();

    let mut h = h.restart().await;
    assert_eq!(get(&mut h, &group.group_snapshot_id, &[]).await.unwrap_err().code(), Code::NotFound);
    assert!(listed_snapshots(&mut h).await.is_empty());
    assert_eq!(snapshot_files(&h), 0);
    assert!(!record.exists());
    let again = h.group_snapshot("group-crash", &[&a, &b]).await.unwrap();
    assert_eq!(member_ids(&again), member_ids(&group), "members land on the same ids again");
}

// ----- Real loop devices and filesystems -----

fn loop_request(name: &str, block: bool) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 32 * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![if block { block_capability() } else { mount_capability(Access::Writer) }],
        parameters: [("backend".to_owned(), "loop".to_owned())].into(),
        ..Default::default()
    }
}

/// Writes `i` to `a`'s counter, then to `b`'s, for i = 1, 2, ... until told
/// to stop: a snapshot of both at one instant holds (i, i) or (i, i - 1).
fn write_counters(a: &Path, b: &Path, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let open = |dir: &Path| std::fs::File::create(dir.join("counter")).unwrap();
    let (a, b) = (open(a), open(b));
    std::thread::spawn(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            a.write_all_at(format!("{i:020}").as_bytes(), 0).unwrap();
            b.write_all_at(format!("{i:020}").as_bytes(), 0).unwrap();
        }
        i
    })
}

fn counter(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("counter")).unwrap().parse().unwrap()
}

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn staged_loop_filesystems_being_written_are_frozen_and_cut_at_one_instant() {
    let mut h = Harness::start().await;
    let mut ids = Vec::new();
    let mut payloads = Vec::new();
    for (i, name) in ["loop-a", "loop-b"].into_iter().enumerate() {
        let id = h.create_volume(loop_request(name, false)).await.unwrap().volume_id;
        let staging = h.co_path(&format!("staging-{name}"));
        h.stage(&id, &staging).await.unwrap();
        let payload: Vec<u8> = (0..2u32 << 20)
            .map(|n| (n.wrapping_mul(2654435761 + u32::try_from(i).unwrap()) >> 11).to_le_bytes()[0])
            .collect();
        std::fs::File::create(staging.join("payload")).unwrap().write_all(&payload).unwrap();
        ids.push((id, staging));
        payloads.push(payload);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_counters(&ids[0].1, &ids[1].1, stop.clone());
    while !ids[1].1.join("counter").metadata().is_ok_and(|m| m.len() == 20) {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    let group = h.group_snapshot("loop-group", &[&ids[0].0, &ids[1].0]).await;
    // The writer goes on after the cut: the filesystems were thawed.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    let group = group.unwrap();
    for (_, staging) in &ids {
        std::fs::write(staging.join("payload"), b"after the cut").unwrap();
    }

    let mut counters = Vec::new();
    for (i, snapshot) in group.snapshots.iter().enumerate() {
        let request = from_snapshot(loop_request(&format!("loop-restored-{i}"), false), &snapshot.snapshot_id);
        let restored = h.create_volume(request).await.unwrap().volume_id;
        let staging = h.co_path(&format!("restored-{i}"));
        h.stage(&restored, &staging).await.unwrap();
        assert!(std::fs::read(staging.join("payload")).unwrap() == payloads[i], "member {i} differs from its volume");
        counters.push(counter(&staging));
        h.unstage(&restored, &staging).await.unwrap();
    }
    let (a, b) = (counters[0], counters[1]);
    assert!(b >= 1, "the snapshot predates the writer");
    assert!(a == b || a == b + 1, "members are not of one instant: a={a} b={b}");
    assert!(written > a + 1, "writes did not go on after the cut ({written} written, {a} at the cut)");
    for (id, staging) in &ids {
        h.unstage(id, staging).await.unwrap();
    }
}

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn raw_block_loop_volumes_in_use_are_refused_together_and_alone_are_cut() {
    let mut h = Harness::start().await;
    let mut ids = Vec::new();
    for name in ["block-a", "block-b"] {
        let id = h.create_volume(loop_request(name, true)).await.unwrap().volume_id;
        let staging = h.co_path(&format!("staging-{name}"));
        h.stage_as(&id, &staging, block_capability()).await.unwrap();
        ids.push((id, staging));
    }
    let err = h.group_snapshot("block-group", &[&ids[0].0, &ids[1].0]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(&ids[0].0) && err.message().contains(&ids[1].0), "{}", err.message());
    assert_eq!(snapshot_files(&h), 0);
    // With one of them unstaged (quiet), the other is cut if its image reflinks.
    h.unstage(&ids[1].0, &ids[1].1).await.unwrap();
    let pair = h.group_snapshot("block-group", &[&ids[0].0, &ids[1].0]).await;
    let reflinks = loam::kernel::copy::reflinks_in(&h.root().join("snapshots")).unwrap();
    match pair {
        Ok(group) => assert!(reflinks && group.snapshots.len() == 2, "cut without reflinks"),
        Err(err) => assert!(!reflinks && err.message().contains("without reflinks"), "{err:?}"),
    }
    h.unstage(&ids[0].0, &ids[0].1).await.unwrap();
}
