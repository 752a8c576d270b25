//! Inline volumes driven as the kubelet drives them: only
//! NodePublish and NodeUnpublish, with the kubelet's own volume ids and the
//! pod author's attributes. Refusals, rollback and bookkeeping need no
//! privileges; real mounts, loop devices and quotas need root in a private
//! mount namespace (`LOAM_PRIVILEGED_TESTS=1`).

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::quota_fs::{self, fs_kind, is_over_quota, write_unprivileged};
use common::{Harness, NODE, path_str};
use loam::csi;
use loam::kernel::{loopdev, mountinfo};
use sha2::{Digest, Sha256};
use tonic::Code;

const MIB: u64 = 1 << 20;

/// The id the kubelet gives a pod's inline volume: `csi-` and the SHA-256
/// of the pod's UID followed by the volume's name.
fn kubelet_id(pod_uid: &str, volume: &str) -> String {
    let digest = Sha256::digest(format!("{pod_uid}{volume}"));
    format!("csi-{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Where the kubelet publishes a pod's inline volume.
fn kubelet_target(h: &Harness, pod_uid: &str, volume: &str) -> PathBuf {
    h.co_path(&format!("pods/{pod_uid}/volumes/kubernetes.io~csi/{volume}/mount"))
}

/// A NodePublishVolume as the kubelet sends it for an inline volume: the
/// attributes plus its own keys (podInfoOnMount), no staging path, and
/// ReadWriteOnce as SINGLE_NODE_MULTI_WRITER (Loam advertises it).
fn inline_request(id: &str, target: &Path, attributes: &[(&str, &str)]) -> csi::NodePublishVolumeRequest {
    use csi::volume_capability::{AccessMode, AccessType, access_mode::Mode};
    let kubelet = [
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.name", "scratch"),
        ("csi.storage.k8s.io/pod.namespace", "default"),
        ("csi.storage.k8s.io/pod.uid", "3f1c9a52-pod"),
        ("csi.storage.k8s.io/serviceAccount.name", "default"),
    ];
    let volume_context: HashMap<String, String> =
        kubelet.iter().chain(attributes).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: path_str(target),
        volume_capability: Some(csi::VolumeCapability {
            access_mode: Some(AccessMode { mode: Mode::SingleNodeMultiWriter as i32 }),
            access_type: Some(AccessType::Mount(Default::default())),
        }),
        volume_context,
        ..Default::default()
    }
}

async fn publish(h: &mut Harness, id: &str, target: &Path, attributes: &[(&str, &str)]) -> Result<(), tonic::Status> {
    h.node.node_publish_volume(inline_request(id, target, attributes)).await.map(drop)
}

async fn stats(h: &mut Harness, id: &str, path: &Path) -> Result<csi::NodeGetVolumeStatsResponse, tonic::Status> {
    let request =
        csi::NodeGetVolumeStatsRequest { volume_id: id.into(), volume_path: path_str(path), ..Default::default() };
    Ok(h.node.node_get_volume_stats(request).await?.into_inner())
}

async fn capacity(h: &mut Harness) -> u64 {
    let response = h.controller.get_capacity(csi::GetCapacityRequest::default()).await.expect("capacity");
    u64::try_from(response.into_inner().available_capacity).expect("non-negative")
}

/// Every volume, record and staging directory under the driver's root.
fn leftovers(h: &Harness) -> Vec<PathBuf> {
    let root = h.root();
    ["volumes", "meta/volumes", "ephemeral"]
        .iter()
        .filter_map(|dir| fs::read_dir(root.join(dir)).ok())
        .flatten()
        .map(|entry| entry.expect("entry").path())
        .collect()
}

/// The key of the only volume the root holds, from its record's file name.
fn only_key(h: &Harness) -> String {
    let records: Vec<_> = fs::read_dir(h.root().join("meta/volumes")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(records.len(), 1, "{records:?}");
    records[0].file_stem().unwrap().to_str().unwrap().to_owned()
}

/// Mounts stacked at `path`.
fn mounts_at(path: &Path) -> usize {
    mountinfo::read().unwrap().iter().filter(|m| m.mount_point == path).count()
}

/// Loop devices backed by any file in the test's directory.
fn loop_devices(h: &Harness) -> Vec<loopdev::LoopDevice> {
    let dir = h.dir.path().canonicalize().unwrap();
    loopdev::list().unwrap().into_iter().filter(|d| d.backing_file.starts_with(&dir)).collect()
}

fn statvfs_total(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks() * st.fragment_size()
}

#[tokio::test]
async fn hostile_attributes_are_refused_and_leave_nothing() {
    let mut h = Harness::start().await;
    let id = kubelet_id("3f1c9a52-pod", "scratch");
    let target = kubelet_target(&h, "3f1c9a52-pod", "scratch");
    let refused: [&[(&str, &str)]; 7] = [
        &[("size", "-1")],
        &[("size", "1Ei")],
        &[("size", "abc")],
        &[("size", "100m")],
        &[("color", "blue")],
        &[("backend", "lvm")],
        &[("backend", "dir"), ("fsType", "xfs")],
    ];
    for attributes in refused {
        let err = publish(&mut h, &id, &target, attributes).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{attributes:?}: {err:?}");
    }
    // A raw block capability, a staging path, and a Loam id are not inline volumes.
    let mut block = inline_request(&id, &target, &[]);
    block.volume_capability = Some(common::block_capability());
    let mut staged = inline_request(&id, &target, &[]);
    staged.staging_target_path = path_str(&h.co_path("staging"));
    let loam_id = format!("{}@{NODE}", "0".repeat(32));
    for (what, request) in [("block", block), ("staging", staged), ("loam id", inline_request(&loam_id, &target, &[]))]
    {
        let err = h.node.node_publish_volume(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
    assert_eq!(leftovers(&h), Vec::<PathBuf>::new());
    assert!(!target.exists());
    // Unpublishing a volume that was never made succeeds.
    h.unpublish(&id, &target).await.unwrap();
}

#[tokio::test]
async fn a_size_the_node_cannot_hold_is_resource_exhausted_and_leaves_nothing() {
    let mut h = Harness::start().await;
    let id = kubelet_id("3f1c9a52-pod", "huge");
    let target = kubelet_target(&h, "3f1c9a52-pod", "huge");
    for attributes in [&[("size", "512Ti")][..], &[("size", "512Ti"), ("backend", "loop")]] {
        let err = publish(&mut h, &id, &target, attributes).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{attributes:?}: {err:?}");
        assert!(err.message().contains("bytes not yet promised"), "{err:?}");
    }
    assert_eq!(leftovers(&h), Vec::<PathBuf>::new());
    assert!(!target.exists());
}

#[tokio::test]
async fn a_failed_publish_leaves_nothing_behind() {
    let mut h = Harness::start().await;
    let id = kubelet_id("3f1c9a52-pod", "scratch");
    let target = kubelet_target(&h, "3f1c9a52-pod", "scratch");
    // The volume is made and staged, then its target cannot be a directory.
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    fs::write(&target, b"").unwrap();
    let err = publish(&mut h, &id, &target, &[("size", "1Mi")]).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "a file where a directory belongs is the caller's to fix: {err:?}"
    );
    assert_eq!(leftovers(&h), Vec::<PathBuf>::new(), "the kubelet will not unpublish after a final error");
    // The next attempt, once the target is usable, succeeds.
    fs::remove_file(&target).ok();
    publish(&mut h, &id, &target, &[("size", "1Mi")]).await.unwrap();
    h.unpublish(&id, &target).await.unwrap();
    assert_eq!(leftovers(&h), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn inline_volumes_stay_out_of_the_controllers_view_and_go_with_their_last_target() {
    let mut h = Harness::start().await;
    let pvc = h.create("pvc-1", common::bytes(MIB)).await;
    let id = kubelet_id("3f1c9a52-pod", "scratch");
    let (one, two) = (kubelet_target(&h, "3f1c9a52-pod", "scratch"), h.co_path("elsewhere"));
    publish(&mut h, &id, &one, &[("size", "4Mi")]).await.unwrap();
    let listed = h.controller.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    let ids: Vec<_> = listed.entries.iter().map(|e| e.volume.as_ref().unwrap().volume_id.clone()).collect();
    assert_eq!(ids, vec![pvc.clone()], "ListVolumes shows only what the CO created");

    // Its internal Loam id reaches nothing: not found, and a delete leaves it alone.
    let key = fs::read_dir(h.root().join("meta/volumes"))
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_str().unwrap().to_owned())
        .find(|k| !pvc.starts_with(k.as_str()))
        .unwrap();
    let internal = format!("{key}@{NODE}");
    let err = h
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: internal.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    h.controller.delete_volume(csi::DeleteVolumeRequest { volume_id: internal, ..Default::default() }).await.unwrap();
    let usage = stats(&mut h, &id, &one).await.unwrap().usage;
    assert_eq!(usage[0].total, common::bytes(4 * MIB), "the kubelet's stats see the inline volume by its id");

    // Published twice (not something the kubelet does), it lives until the last target goes.
    publish(&mut h, &id, &two, &[("size", "4Mi")]).await.unwrap();
    h.unpublish(&id, &one).await.unwrap();
    assert!(!one.exists());
    stats(&mut h, &id, &two).await.expect("still published at the other target");
    h.unpublish(&id, &two).await.unwrap();
    let err = stats(&mut h, &id, &two).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let left = leftovers(&h);
    assert!(left.iter().all(|p| p.to_str().unwrap().contains(pvc.split('@').next().unwrap())), "{left:?}");
    h.unpublish(&id, &two).await.unwrap();
}

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn dir_volume_is_a_writable_scratch_space_until_unpublished() {
    let mut h = Harness::start().await;
    let id = kubelet_id("3f1c9a52-pod", "scratch");
    let target = kubelet_target(&h, "3f1c9a52-pod", "scratch");
    publish(&mut h, &id, &target, &[("size", "16Mi")]).await.unwrap();
    fs::write(target.join("data"), vec![7u8; 1 << 20]).unwrap();
    let key = only_key(&h);
    let data = h.root().join("volumes").join(&key);
    assert_eq!(fs::read(data.join("data")).unwrap().len(), 1 << 20, "the target shows the volume");
    assert_eq!(mounts_at(&data), 0, "a dir volume is published from its directory, with no staging mount");

    let usage = stats(&mut h, &id, &target).await.unwrap().usage;
    assert_eq!(usage[0].total, common::bytes(16 * MIB));
    assert!(usage[0].used >= common::bytes(MIB) && usage[0].used < common::bytes(2 * MIB), "{usage:?}");

    // The kubelet retries a publish whose answer it missed: still one mount.
    publish(&mut h, &id, &target, &[("size", "16Mi")]).await.unwrap();
    assert_eq!(mounts_at(&target), 1);
    // A read-only inline volume cannot be written.
    let ro_id = kubelet_id("3f1c9a52-pod", "ro");
    let ro = kubelet_target(&h, "3f1c9a52-pod", "ro");
    let mut request = inline_request(&ro_id, &ro, &[("size", "1Mi")]);
    request.readonly = true;
    h.node.node_publish_volume(request).await.unwrap();
    assert_eq!(fs::write(ro.join("x"), b"x").unwrap_err().raw_os_error(), Some(libc::EROFS));
    h.unpublish(&ro_id, &ro).await.unwrap();

    h.unpublish(&id, &target).await.unwrap();
    assert!(!target.exists(), "NodeUnpublish removes the target");
    assert!(!data.exists(), "and the volume's data");
    assert_eq!(leftovers(&h), Vec::<PathBuf>::new());
    h.unpublish(&id, &target).await.unwrap();
    assert!(!mountinfo::read().unwrap().iter().any(|m| m.mount_point.starts_with(h.dir.path())));
}

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn loop_ext4_volume_mounts_at_its_size_and_detaches_when_unpublished() {
    let mut h = Harness::start().await;
    let id = kubelet_id("3f1c9a52-pod", "fast");
    let target = kubelet_target(&h, "3f1c9a52-pod", "fast");
    // A block size of 3 is refused before anything is made (it used to
    // reach mkfs, which refused it): the publish fails and leaves nothing.
    let err = publish(&mut h, &id, &target, &[("size", "64Mi"), ("backend", "loop"), ("mkfsOptions", "-b 3")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(leftovers(&h), Vec::<PathBuf>::new());
    assert_eq!(loop_devices(&h), vec![]);

    publish(&mut h, &id, &target, &[("size", "64Mi"), ("backend", "loop")]).await.unwrap();
    let entry = mountinfo::read().unwrap().into_iter().rfind(|m| m.mount_point == target).expect("mounted");
    assert_eq!(entry.fs_type, "ext4");
    assert_eq!(mounts_at(&h.root().join("ephemeral").join(only_key(&h))), 1, "staged under the root");
    let devices = loop_devices(&h);
    assert_eq!(devices.len(), 1);
    assert_eq!(fs::metadata(&devices[0].backing_file).unwrap().len(), 64 * MIB, "the image is the size asked for");
    // ext4's journal and inode tables take their share of the 64 MiB.
    let total = statvfs_total(&target);
    eprintln!("a 64 MiB inline ext4 volume shows {total} bytes");
    assert!((48 * MIB..64 * MIB).contains(&total), "{total}");
    fs::write(target.join("data"), b"scratch").unwrap();
    let usage = stats(&mut h, &id, &target).await.unwrap().usage;
    assert_eq!(u64::try_from(usage[0].total).unwrap(), total);

    publish(&mut h, &id, &target, &[("size", "64Mi"), ("backend", "loop")]).await.unwrap();
    assert_eq!(mounts_at(&target), 1, "a retried publish converges");
    assert_eq!(loop_devices(&h).len(), 1);

    h.unpublish(&id, &target).await.unwrap();
    assert!(!target.exists());
    assert_eq!(loop_devices(&h), vec![], "unpublish detaches the loop device");
    assert_eq!(leftovers(&h), Vec::<PathBuf>::new(), "image, record and staging directory are gone");
    assert!(!mountinfo::read().unwrap().iter().any(|m| m.mount_point.starts_with(h.dir.path())));
    h.unpublish(&id, &target).await.unwrap();
}

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn a_restart_between_publish_and_unpublish_loses_nothing_and_leaks_nothing() {
    let mut h = Harness::start().await;
    let pods = [("dir", &[("size", "8Mi")][..]), ("loop", &[("size", "32Mi"), ("backend", "loop")])];
    for (name, attributes) in pods {
        let target = kubelet_target(&h, "3f1c9a52-pod", name);
        publish(&mut h, &kubelet_id("3f1c9a52-pod", name), &target, attributes).await.unwrap();
        fs::write(target.join("data"), name).unwrap();
    }

    // The node agent restarts while the pod runs.
    let mut h = h.restart().await;
    for (name, attributes) in pods {
        let (id, target) = (kubelet_id("3f1c9a52-pod", name), kubelet_target(&h, "3f1c9a52-pod", name));
        assert_eq!(fs::read(target.join("data")).unwrap(), name.as_bytes());
        stats(&mut h, &id, &target).await.unwrap();
        // The kubelet's reconstruction may publish again: nothing changes.
        publish(&mut h, &id, &target, attributes).await.unwrap();
        assert_eq!(mounts_at(&target), 1, "{name}");
    }
    // The pod goes.
    for (name, _) in pods {
        let (id, target) = (kubelet_id("3f1c9a52-pod", name), kubelet_target(&h, "3f1c9a52-pod", name));
        h.unpublish(&id, &target).await.unwrap();
        assert!(!target.exists(), "{name}");
    }
    assert_eq!(leftovers(&h), Vec::<PathBuf>::new());
    assert_eq!(loop_devices(&h), vec![]);
    assert!(!mountinfo::read().unwrap().iter().any(|m| m.mount_point.starts_with(h.dir.path())));
}

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn size_is_enforced_and_counted_on_a_root_with_quotas() {
    let (_fs, mut h) = quota_fs::start().await;
    let id = kubelet_id("3f1c9a52-pod", "scratch");
    let target = kubelet_target(&h, "3f1c9a52-pod", "scratch");
    let before = capacity(&mut h).await;
    publish(&mut h, &id, &target, &[("size", "32Mi")]).await.unwrap();
    let after = capacity(&mut h).await;
    assert!(before - after >= 31 * MIB, "GetCapacity no longer offers what the pod was given: {before} -> {after}");

    let (written, err) = write_unprivileged(&target.join("big"), 48 * MIB);
    eprintln!("{}: wrote {written} bytes into a 32 MiB inline volume, then {err:?}", fs_kind());
    assert!(is_over_quota(&err), "writing past size must fail: {err:?}");
    if fs_kind() == "btrfs" {
        assert_eq!(err.as_ref().and_then(std::io::Error::raw_os_error), Some(libc::EDQUOT));
    }
    assert!((31 * MIB..=32 * MIB).contains(&written), "stops within 1 MiB of the size: {written}");

    h.unpublish(&id, &target).await.unwrap();
    assert_eq!(leftovers(&h), Vec::<PathBuf>::new());
}
