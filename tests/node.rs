//! Node behaviour with real bind mounts: the walk-through of docs/cli.md, restarts,
//! read-only and single-writer publishing, stats. These need root in a
//! private mount namespace (the README's test command provides both), so they
//! are ignored unless run with `--include-ignored` and `LOAM_PRIVILEGED_TESTS=1`.

mod common;

use common::{Access, Harness};
use loam::csi;
use tonic::Code;

const MIB: i64 = 1 << 20;

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn walkthrough_keeps_data_across_a_restart_in_the_middle() {
    let mut h = Harness::start().await;
    let id = h.create("pvc-walk", 64 * MIB).await;
    let (staging, target) = (h.co_path("staging"), h.co_path("pod/target"));
    h.stage(&id, &staging).await.unwrap();
    h.publish(&id, &staging, &target, Access::Writer, false).await.unwrap();
    std::fs::write(target.join("hello.txt"), b"hello from a pod").unwrap();

    // The agent restarts while the volume is in use.
    let mut h = h.restart().await;
    // Retried calls converge: no error, no second mount.
    h.stage(&id, &staging).await.unwrap();
    h.publish(&id, &staging, &target, Access::Writer, false).await.unwrap();
    let mounts = loam::kernel::mountinfo::read().unwrap();
    assert_eq!(mounts.iter().filter(|m| m.mount_point == target).count(), 1);
    assert_eq!(std::fs::read(target.join("hello.txt")).unwrap(), b"hello from a pod");

    let stats = h
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: common::path_str(&target),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = &stats.usage[0];
    assert_eq!(bytes.total, 64 * MIB);
    assert!(bytes.used > 0 && bytes.used < MIB, "{bytes:?}");
    assert!(!stats.volume_condition.unwrap().abnormal);

    h.unpublish(&id, &target).await.unwrap();
    assert!(!target.exists(), "NodeUnpublish removes the target path");
    h.unpublish(&id, &target).await.unwrap();
    h.unstage(&id, &staging).await.unwrap();
    h.unstage(&id, &staging).await.unwrap();
    let mounts = loam::kernel::mountinfo::read().unwrap();
    assert!(!mounts.iter().any(|m| m.mount_point.starts_with(h.dir.path())));

    // Restage after everything: the data is still there.
    h.stage(&id, &staging).await.unwrap();
    assert_eq!(std::fs::read(staging.join("hello.txt")).unwrap(), b"hello from a pod");
    h.unstage(&id, &staging).await.unwrap();
    h.controller.delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() }).await.unwrap();
}

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn read_only_publishes_cannot_be_written() {
    let mut h = Harness::start().await;
    let id = h.create("pvc-ro", MIB).await;
    let staging = h.co_path("staging");
    h.stage(&id, &staging).await.unwrap();
    for (name, mode, readonly) in [("flag", Access::Writer, true), ("mode", Access::ReaderOnly, false)] {
        let target = h.co_path(name);
        h.publish(&id, &staging, &target, mode, readonly).await.unwrap();
        let err = std::fs::write(target.join("x"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{name}");
        h.unpublish(&id, &target).await.unwrap();
    }
    // The staging mount itself stays writable.
    std::fs::write(staging.join("x"), b"x").unwrap();
    h.unstage(&id, &staging).await.unwrap();
}

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn single_writer_volumes_refuse_a_second_target_and_conflicts_are_reported() {
    let mut h = Harness::start().await;
    let id = h.create("pvc-sw", MIB).await;
    let (staging, one, two) = (h.co_path("staging"), h.co_path("one"), h.co_path("two"));
    h.stage(&id, &staging).await.unwrap();
    h.publish(&id, &staging, &one, Access::SingleWriter, false).await.unwrap();
    let err = h.publish(&id, &staging, &two, Access::SingleWriter, false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = h.publish(&id, &staging, &one, Access::SingleWriter, true).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = h.unstage(&id, &staging).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "unstage while published");
    h.unpublish(&id, &one).await.unwrap();
    h.unstage(&id, &staging).await.unwrap();
}

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn stats_and_expansion_refuse_paths_that_are_not_the_volume() {
    let mut h = Harness::start().await;
    let id = h.create("pvc-stats", MIB).await;
    let staging = h.co_path("staging");
    h.stage(&id, &staging).await.unwrap();
    let elsewhere = h.co_path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let err = h
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: common::path_str(&elsewhere),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let grown = h
        .node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: common::path_str(&staging),
            capacity_range: Some(csi::CapacityRange { required_bytes: 2 * MIB, limit_bytes: 0 }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(grown.capacity_bytes >= 2 * MIB);
    h.unstage(&id, &staging).await.unwrap();
}

#[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
#[tokio::test]
async fn a_stage_lost_to_a_reboot_does_not_block_delete_but_a_live_one_does() {
    let mut h = Harness::start().await;
    let id = h.create("pvc-reboot", MIB).await;
    let staging = h.co_path("staging");
    h.stage(&id, &staging).await.unwrap();
    let delete = csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() };
    let err = h.controller.delete_volume(delete.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "a staged volume is in use");

    // A reboot takes the mount away; the CO never stages the volume again.
    nix::mount::umount2(&staging, nix::mount::MntFlags::empty()).unwrap();
    let mut h = h.restart().await;
    h.controller.delete_volume(delete).await.unwrap();
    assert!(!h.root().join("volumes").join(id.split('@').next().unwrap()).exists());
}
