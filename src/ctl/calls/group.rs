//! GroupController calls: group snapshots and the group capabilities.

use anyhow::Result;
use loam::csi::*;
use serde_json::json;

use crate::ctl::args::{CreateGroupSnapshot, DeleteGroupSnapshot, GetGroupSnapshot};
use crate::ctl::connect::Ctl;
use crate::ctl::output::{Output, done, enum_name, group_snapshot_output, list_or_dash};

impl CreateGroupSnapshot {
    /// Runs `loam ctl create-group-snapshot`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let CreateGroupSnapshot { name, source_volume_ids, params } = self;
        let mut group = ctl.group();
        let parameters = params.into_iter().collect();
        let request = CreateVolumeGroupSnapshotRequest { name, source_volume_ids, parameters, ..Default::default() };
        let r = ctl.call(group.create_volume_group_snapshot(request)).await?;
        group_snapshot_output(r.group_snapshot, " created")
    }
}

impl DeleteGroupSnapshot {
    /// Runs `loam ctl delete-group-snapshot`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let DeleteGroupSnapshot { group_snapshot_id, snapshot_ids } = self;
        let mut group = ctl.group();
        let text = format!("group snapshot {group_snapshot_id} deleted with its snapshots");
        let request = DeleteVolumeGroupSnapshotRequest { group_snapshot_id, snapshot_ids, ..Default::default() };
        ctl.call(group.delete_volume_group_snapshot(request)).await?;
        Ok(done(text))
    }
}

impl GetGroupSnapshot {
    /// Runs `loam ctl get-group-snapshot`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let GetGroupSnapshot { group_snapshot_id, snapshot_ids } = self;
        let mut group = ctl.group();
        let request = GetVolumeGroupSnapshotRequest { group_snapshot_id, snapshot_ids, ..Default::default() };
        group_snapshot_output(ctl.call(group.get_volume_group_snapshot(request)).await?.group_snapshot, "")
    }
}

/// Runs `loam ctl group-capabilities`.
pub(super) async fn group_capabilities(ctl: &Ctl) -> Result<Output> {
    let mut group = ctl.group();
    use group_controller_service_capability::{Type as G, rpc::Type as GType};
    let request = GroupControllerGetCapabilitiesRequest {};
    let r = ctl.call(group.group_controller_get_capabilities(request)).await?;
    let names: Vec<_> = (r.capabilities.iter().filter_map(|c| c.r#type))
        .map(|G::Rpc(rpc)| enum_name(rpc.r#type, GType::as_str_name))
        .collect();
    Ok((json!({ "group_controller": names }), format!("group controller: {}\n", list_or_dash(&names))))
}
