//! Controller behaviour a CO depends on: idempotency, conflicts, pagination,
//! snapshots, concurrency and hostile ids, through the real gRPC server.

mod common;

use std::collections::HashSet;

use common::{Harness, NODE, create_request};
use loam::csi;
use tonic::Code;

const MIB: i64 = 1 << 20;

#[tokio::test]
async fn create_is_idempotent_by_name_and_conflicts_are_refused() {
    let mut h = Harness::start().await;
    let first = h.create("pvc-a", 10 * MIB + 1).await;
    let again = h.create("pvc-a", 10 * MIB + 1).await;
    assert_eq!(first, again);
    assert!(first.ends_with(&format!("@{NODE}")) && first.len() <= 128, "{first}");

    let resp = h.controller.create_volume(create_request("pvc-b", 10 * MIB + 1)).await.unwrap().into_inner();
    let vol = resp.volume.unwrap();
    // Rounded up, never down.
    assert!(vol.capacity_bytes > 10 * MIB && vol.capacity_bytes % 4096 == 0);
    assert_eq!(vol.accessible_topology[0].segments["topology.loam.csi.dev/node"], NODE);

    let err = h.controller.create_volume(create_request("pvc-a", 100 * MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    let mut bad = create_request("pvc-c", 10 * MIB);
    bad.capacity_range = Some(csi::CapacityRange { required_bytes: 10 * MIB, limit_bytes: MIB });
    assert_eq!(h.controller.create_volume(bad).await.unwrap_err().code(), Code::InvalidArgument);

    let mut multi = create_request("pvc-d", MIB);
    multi.volume_capabilities[0].access_mode = Some(csi::volume_capability::AccessMode {
        mode: csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
    });
    let err = h.controller.create_volume(multi).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("single-node"), "{}", err.message());
}

#[tokio::test]
async fn delete_removes_data_and_is_idempotent() {
    let mut h = Harness::start().await;
    let id = h.create("pvc-del", MIB).await;
    let data = h.root().join("volumes").join(id.split('@').next().unwrap());
    assert!(data.is_dir());
    for _ in 0..2 {
        h.controller
            .delete_volume(csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() })
            .await
            .unwrap();
    }
    assert!(!data.exists());
    // Unknown ids, foreign ids and garbage all delete nothing, successfully.
    for other in ["0123456789abcdef0123456789abcdef@test-node", "0123456789abcdef0123456789abcdef@elsewhere", "garbage"]
    {
        h.controller
            .delete_volume(csi::DeleteVolumeRequest { volume_id: other.into(), ..Default::default() })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_deleted_volume_gives_its_room_back_at_once() {
    let mut h = Harness::start().await;
    let free = |h: &mut Harness| {
        let mut controller = h.controller.clone();
        async move {
            controller.get_capacity(csi::GetCapacityRequest::default()).await.unwrap().into_inner().available_capacity
        }
    };
    // Three quarters of what the node can promise, twice in a row: the
    // second only fits if the first's promise is gone when its delete
    // answers (not at the next background measurement, seconds later).
    let room = free(&mut h).await;
    let big = room / 4 * 3;
    assert!(big > 64 * MIB, "the test root has too little room: {room}");
    for name in ["pvc-big-1", "pvc-big-2"] {
        let id = h.create(name, big).await;
        assert!(free(&mut h).await < big, "the volume is promised its capacity");
        h.controller.delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() }).await.unwrap();
    }
}

#[tokio::test]
async fn listing_pages_are_stable_and_bad_tokens_abort() {
    let mut h = Harness::start().await;
    let mut made = HashSet::new();
    for i in 0..7 {
        made.insert(h.create(&format!("pvc-{i}"), MIB).await);
    }
    let mut seen = HashSet::new();
    let mut token = String::new();
    loop {
        let page = h
            .controller
            .list_volumes(csi::ListVolumesRequest { max_entries: 3, starting_token: token.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 3);
        seen.extend(page.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen, made);
    let err = h
        .controller
        .list_volumes(csi::ListVolumesRequest { max_entries: 1, starting_token: "not-a-token".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
}

/// A listing without `max_entries` on a node with more volumes than one
/// response carries (1,000, docs/volumes.md, Capabilities) comes in pages the
/// caller follows by `next_token`, so no response outgrows grpc-go's 4 MiB
/// receive limit, and following them lists every volume once.
#[tokio::test]
async fn a_listing_without_max_entries_comes_in_pages_of_at_most_1000() {
    const LONGEST_PAGE: usize = 1000;
    let h = Harness::start().await;
    let mut made = HashSet::new();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..8 {
        let mut controller = h.controller.clone();
        workers.spawn(async move {
            let mut ids = Vec::new();
            for i in (w..=LONGEST_PAGE).step_by(8) {
                let created = controller.create_volume(create_request(&format!("pvc-{i}"), MIB)).await.unwrap();
                ids.push(created.into_inner().volume.unwrap().volume_id);
            }
            ids
        });
    }
    while let Some(ids) = workers.join_next().await {
        made.extend(ids.unwrap());
    }
    assert_eq!(made.len(), LONGEST_PAGE + 1);
    let mut controller = h.controller.clone();
    let (mut seen, mut token, mut pages) = (HashSet::new(), String::new(), Vec::new());
    loop {
        let page = controller
            .list_volumes(csi::ListVolumesRequest { max_entries: 0, starting_token: token })
            .await
            .unwrap()
            .into_inner();
        pages.push(page.entries.len());
        for entry in page.entries {
            assert!(seen.insert(entry.volume.unwrap().volume_id), "listed twice");
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(pages, [LONGEST_PAGE, 1]);
    assert_eq!(seen, made);
    // A larger max_entries is a ceiling, not a promise: still one page's worth.
    let asked = controller
        .list_volumes(csi::ListVolumesRequest { max_entries: 5000, starting_token: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(asked.entries.len(), LONGEST_PAGE);
    assert!(!asked.next_token.is_empty());
}

#[tokio::test]
async fn snapshots_restore_and_clone_copy_content_at_that_point() {
    let mut h = Harness::start().await;
    let id = h.create("pvc-src", MIB).await;
    let data = h.root().join("volumes").join(id.split('@').next().unwrap());
    std::fs::write(data.join("file"), b"before").unwrap();

    let snap = h.snapshot(&id, "snap-1").await.unwrap();
    assert!(snap.ready_to_use);
    std::fs::write(data.join("file"), b"after").unwrap();

    // Same name, other source: conflict. Same request: the same snapshot.
    let other = h.create("pvc-other", MIB).await;
    let err = h
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: other,
            name: "snap-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    let restore = common::from_snapshot(create_request("pvc-restored", MIB), &snap.snapshot_id);
    let restored = h.controller.create_volume(restore).await.unwrap().into_inner().volume.unwrap();
    let restored_data = h.root().join("volumes").join(restored.volume_id.split('@').next().unwrap());
    assert_eq!(std::fs::read(restored_data.join("file")).unwrap(), b"before");

    let mut clone = create_request("pvc-clone", MIB);
    clone.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
            volume_id: id.clone(),
        })),
    });
    let cloned = h.controller.create_volume(clone).await.unwrap().into_inner().volume.unwrap();
    let cloned_data = h.root().join("volumes").join(cloned.volume_id.split('@').next().unwrap());
    assert_eq!(std::fs::read(cloned_data.join("file")).unwrap(), b"after");

    let listed = h
        .controller
        .list_snapshots(csi::ListSnapshotsRequest { source_volume_id: id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);

    let missing =
        common::from_snapshot(create_request("pvc-missing-source", MIB), "0123456789abcdef0123456789abcdef@test-node");
    assert_eq!(h.controller.create_volume(missing).await.unwrap_err().code(), Code::NotFound);
}

/// A volume rounded up to its filesystem's least (a 1 MiB claim of an ext4
/// class gets 4 MiB) has snapshots that say 1 MiB, so a claim of the size
/// its source's asked (a StatefulSet's template, restored) restores them; the
/// restore is rounded up as its source was. Grown, it says its new size.
#[tokio::test]
async fn a_snapshot_of_a_rounded_up_volume_restores_into_a_claim_of_its_sources_size() {
    let mut h = Harness::start().await;
    let as_loop = |mut request: csi::CreateVolumeRequest| {
        request.parameters = [("backend".to_owned(), "loop".to_owned())].into();
        request
    };
    let source = h.controller.create_volume(as_loop(create_request("pvc-small", MIB))).await.unwrap();
    let source = source.into_inner().volume.unwrap();
    assert_eq!(source.capacity_bytes, 4 * MIB, "ext4's least");
    let snap = h.snapshot(&source.volume_id, "snap-small").await.unwrap();
    assert_eq!(snap.size_bytes, MIB, "what the source's claim asked");

    let restore = as_loop(common::from_snapshot(create_request("pvc-restored", MIB), &snap.snapshot_id));
    let restored = h.controller.create_volume(restore).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(restored.capacity_bytes, 4 * MIB, "rounded up as its source was: it holds the whole image");
    let listed = h
        .controller
        .list_snapshots(csi::ListSnapshotsRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries[0].snapshot.as_ref().unwrap().size_bytes, MIB);

    let grow = csi::ControllerExpandVolumeRequest {
        volume_id: source.volume_id.clone(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 8 * MIB, limit_bytes: 0 }),
        ..Default::default()
    };
    h.controller.controller_expand_volume(grow).await.unwrap();
    let grown = h.snapshot(&source.volume_id, "snap-grown").await.unwrap();
    assert_eq!(grown.size_bytes, 8 * MIB);
    let too_small = as_loop(common::from_snapshot(create_request("pvc-too-small", 4 * MIB), &grown.snapshot_id));
    let made = h.controller.create_volume(too_small).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(made.capacity_bytes, 8 * MIB, "a restore is never smaller than its snapshot's image");
}

#[tokio::test]
async fn concurrent_creates_of_one_name_make_one_volume_and_of_many_names_make_many() {
    let h = Harness::start().await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let mut controller = h.controller.clone();
        tasks.push(tokio::spawn(async move {
            controller.create_volume(create_request(&format!("pvc-many-{i}"), 1 << 20)).await
        }));
        let mut controller = h.controller.clone();
        tasks.push(tokio::spawn(async move { controller.create_volume(create_request("pvc-one", 1 << 20)).await }));
    }
    let mut ids = HashSet::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(resp) => {
                ids.insert(resp.into_inner().volume.unwrap().volume_id);
            }
            // Only a concurrent operation on the same name may be refused.
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    let listed = h.controller.clone().list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), 33);
    assert!(ids.len() >= 32);
}

#[tokio::test]
async fn hostile_ids_and_planted_symlinks_never_reach_outside_the_root() {
    let mut h = Harness::start().await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("precious"), b"keep").unwrap();

    for bad in ["../../etc", "/etc/passwd", "a\0b", &"x".repeat(4096), "..@test-node", "@test-node"] {
        let err = h
            .controller
            .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: bad.into() })
            .await
            .unwrap_err();
        assert!(matches!(err.code(), Code::NotFound | Code::InvalidArgument), "{bad:?}: {err:?}");
    }
    // A long or odd name is just a name: it never becomes a path.
    h.create(&"../".repeat(300), MIB).await;

    // Someone replaces a volume's directory with a symlink to precious data.
    let id = h.create("pvc-victim", MIB).await;
    let data = h.root().join("volumes").join(id.split('@').next().unwrap());
    std::fs::remove_dir(&data).unwrap();
    std::os::unix::fs::symlink(outside.path(), &data).unwrap();

    let got = h
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(got.status.unwrap().volume_condition.unwrap().abnormal);

    let staging = h.co_path("staging");
    let err = h.stage(&id, &staging).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let snap = h
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "s".into(),
            ..Default::default()
        })
        .await;
    assert!(snap.is_err(), "a snapshot must not follow the planted link");

    h.controller.delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() }).await.unwrap();
    assert_eq!(std::fs::read(outside.path().join("precious")).unwrap(), b"keep");

    // CO paths may not point into the driver's root.
    let other = h.create("pvc-other", MIB).await;
    let into_root = h.root().join("volumes");
    let err = h.stage(&other, &into_root).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn attach_honours_node_limit_and_read_only_conflicts() {
    let mut h = Harness::start_with_limit(1).await;
    let a = h.create("pvc-a", MIB).await;
    let b = h.create("pvc-b", MIB).await;
    let publish = |id: &str, node: &str, readonly: bool| csi::ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(common::mount_capability(common::Access::Writer)),
        readonly,
        ..Default::default()
    };
    h.controller.controller_publish_volume(publish(&a, NODE, false)).await.unwrap();
    h.controller.controller_publish_volume(publish(&a, NODE, false)).await.unwrap();
    let err = h.controller.controller_publish_volume(publish(&a, NODE, true)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = h.controller.controller_publish_volume(publish(&b, NODE, false)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let err = h.controller.controller_publish_volume(publish(&b, "other-node", false)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    h.controller
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: a.clone(),
            node_id: NODE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    h.controller.controller_publish_volume(publish(&b, NODE, false)).await.unwrap();
}
