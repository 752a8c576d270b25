//! Controller calls on snapshots: create, delete, list, get.

use anyhow::Result;
use loam::csi::*;
use serde_json::json;

use crate::ctl::args::{CreateSnapshot, DeleteSnapshot, GetSnapshot, ListSnapshots};
use crate::ctl::connect::Ctl;
use crate::ctl::output::{Output, bytes, done, list_output, snapshot_json, snapshot_output};

impl CreateSnapshot {
    /// Runs `loam ctl create-snapshot`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let CreateSnapshot { name, source_volume_id, params } = self;
        let mut ctrl = ctl.controller();
        let parameters = params.into_iter().collect();
        let request = CreateSnapshotRequest { source_volume_id, name, parameters, ..Default::default() };
        snapshot_output(ctl.call(ctrl.create_snapshot(request)).await?.snapshot, " created")
    }
}

impl DeleteSnapshot {
    /// Runs `loam ctl delete-snapshot`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let DeleteSnapshot { snapshot_id } = self;
        let mut ctrl = ctl.controller();
        let text = format!("snapshot {snapshot_id} deleted");
        let request = DeleteSnapshotRequest { snapshot_id, ..Default::default() };
        ctl.call(ctrl.delete_snapshot(request)).await?;
        Ok(done(text))
    }
}

impl ListSnapshots {
    /// Runs `loam ctl list-snapshots`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let ListSnapshots { snapshot_id, source_volume_id, page } = self;
        let ctrl = ctl.controller();
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
                    let r = ctl.call(ctrl.list_snapshots(request)).await?;
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
        Ok(list_output(&header, rows, docs, next, page.page))
    }
}

impl GetSnapshot {
    /// Runs `loam ctl get-snapshot`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let GetSnapshot { snapshot_id } = self;
        let mut ctrl = ctl.controller();
        let request = GetSnapshotRequest { snapshot_id, ..Default::default() };
        snapshot_output(ctl.call(ctrl.get_snapshot(request)).await?.snapshot, "")
    }
}
