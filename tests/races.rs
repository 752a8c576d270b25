//! Operations that touch two objects claim both: a copy (clone or restore)
//! holds its source, and so does a snapshot, so deleting the source while it
//! is copied is ABORTED instead of succeeding under the copy's feet.

mod common;

use common::{Harness, create_request, from_snapshot};
use loam::csi;
use tonic::Code;

const MIB: i64 = 1 << 20;
/// Enough files that the copy takes long enough for the delete to land in it.
const FILES: usize = 1000;
const ROUNDS: usize = 3;

/// Fills a directory volume's data with many small files.
fn fill(h: &Harness, id: &str) {
    let data = h.root().join("volumes").join(id.split('@').next().expect("key"));
    for i in 0..FILES {
        std::fs::write(data.join(format!("f{i}")), b"x").expect("write");
    }
}

fn clone_request(name: &str, source: &str) -> csi::CreateVolumeRequest {
    use csi::volume_content_source::{Type, VolumeSource};
    let mut request = create_request(name, 64 * MIB);
    request.volume_content_source =
        Some(csi::VolumeContentSource { r#type: Some(Type::Volume(VolumeSource { volume_id: source.into() })) });
    request
}

/// The outcome of a copy racing the deletion of its source must be one the
/// CO can act on: either the delete was ABORTED (and the copy succeeded), or
/// the delete came first and the copy says its source is gone. Never both OK
/// for the delete and a failure of the copy.
fn check_race(round: usize, copy: Result<(), tonic::Status>, delete: Result<(), tonic::Status>) {
    match (&copy, &delete) {
        (Ok(()), Err(d)) if d.code() == Code::Aborted => {}
        (Err(c), Ok(())) if c.code() == Code::NotFound => {}
        (Err(c), Ok(())) if c.code() == Code::Aborted => {}
        _ => panic!("round {round}: copy {copy:?} racing delete {delete:?}"),
    }
}

/// Runs `copy` in a task and `delete` a few milliseconds into it (once the
/// copy has claimed what it copies and started), then checks the outcome.
async fn race(
    round: usize,
    copy: impl Future<Output = Result<(), tonic::Status>> + Send + 'static,
    delete: impl Future<Output = Result<(), tonic::Status>>,
) {
    let copy = tokio::spawn(copy);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let delete = delete.await;
    check_race(round, copy.await.expect("copy task"), delete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_volume_while_it_is_cloned_is_aborted() {
    let mut h = Harness::start().await;
    for round in 0..ROUNDS {
        let source = h.create(&format!("src-{round}"), 64 * MIB).await;
        fill(&h, &source);
        let mut controller = h.controller.clone();
        let clone = clone_request(&format!("clone-{round}"), &source);
        let delete = csi::DeleteVolumeRequest { volume_id: source.clone(), ..Default::default() };
        race(round, async move { controller.create_volume(clone).await.map(drop) }, async {
            h.controller.delete_volume(delete).await.map(drop)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_snapshot_while_it_is_restored_is_aborted() {
    let mut h = Harness::start().await;
    for round in 0..ROUNDS {
        let source = h.create(&format!("src-{round}"), 64 * MIB).await;
        fill(&h, &source);
        let snapshot = h.snapshot(&source, &format!("snap-{round}")).await.expect("snapshot").snapshot_id;
        let mut controller = h.controller.clone();
        let restore = from_snapshot(create_request(&format!("restore-{round}"), 64 * MIB), &snapshot);
        let delete = csi::DeleteSnapshotRequest { snapshot_id: snapshot.clone(), ..Default::default() };
        race(round, async move { controller.create_volume(restore).await.map(drop) }, async {
            h.controller.delete_snapshot(delete).await.map(drop)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_volume_while_it_is_snapshotted_is_aborted() {
    let mut h = Harness::start().await;
    for round in 0..ROUNDS {
        let source = h.create(&format!("src-{round}"), 64 * MIB).await;
        fill(&h, &source);
        let mut controller = h.controller.clone();
        let snapshot = csi::CreateSnapshotRequest {
            source_volume_id: source.clone(),
            name: format!("snap-{round}"),
            ..Default::default()
        };
        let delete = csi::DeleteVolumeRequest { volume_id: source.clone(), ..Default::default() };
        race(round, async move { controller.create_snapshot(snapshot).await.map(drop) }, async {
            h.controller.delete_volume(delete).await.map(drop)
        })
        .await;
    }
}
