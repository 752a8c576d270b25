//! The CSI GroupController service over this node's driver (`--mode all`,
//! and the agent endpoint): volume group snapshots.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::group_controller_service_capability::{self, rpc::Type as Cap};
use crate::csi::{self, group_controller_server::GroupController};
use crate::driver::{Driver, GroupSnapshot};
use crate::error::{Error, Result};
use crate::ids::{Kind, validate_name};
use crate::rpc::controller::snapshot_message;
use crate::rpc::{claimed, timestamp, traced, validate};

/// GroupController over a node's own driver.
#[derive(Debug, Clone)]
pub struct GroupControllerService {
    driver: Arc<Driver>,
}

impl GroupControllerService {
    /// Serves GroupController for `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        GroupControllerService { driver }
    }
}

/// The GroupController's capabilities, the same whether served here or routed.
pub(crate) fn capabilities() -> csi::GroupControllerGetCapabilitiesResponse {
    let capabilities = [Cap::CreateDeleteGetVolumeGroupSnapshot]
        .into_iter()
        .map(|kind| csi::GroupControllerServiceCapability {
            r#type: Some(group_controller_service_capability::Type::Rpc(group_controller_service_capability::Rpc {
                r#type: kind as i32,
            })),
        })
        .collect();
    csi::GroupControllerGetCapabilitiesResponse { capabilities }
}

/// The CSI message for a group snapshot and its members.
pub fn group_snapshot_message(group: &GroupSnapshot) -> csi::VolumeGroupSnapshot {
    let record = &group.record;
    csi::VolumeGroupSnapshot {
        group_snapshot_id: record.id.clone(),
        snapshots: group.members.iter().map(|s| snapshot_message(s)).collect(),
        creation_time: Some(timestamp(record.created_secs, record.created_nanos)),
        ready_to_use: group.ready(),
    }
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities()))
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("CreateVolumeGroupSnapshot", &req.name.clone(), async move {
            validate_name("group snapshot", &req.name)?;
            let sources = validate::source_volume_ids(&req.source_volume_ids)?;
            validate::group_snapshot_parameters(&req.parameters)?;
            let volumes = sources.iter().map(|id| driver.group_source_key(id)).collect::<Result<Vec<_>>>()?;
            let key = driver.key_for(Kind::GroupSnapshot, &req.name);
            let group = claimed(driver.claim_group(key, &volumes)?, &driver, move |driver| {
                driver.create_group_snapshot(key, &req.name, &sources)
            })
            .await?;
            Ok(csi::CreateVolumeGroupSnapshotResponse { group_snapshot: Some(group_snapshot_message(&group)) })
        })
        .await
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("DeleteVolumeGroupSnapshot", &req.group_snapshot_id.clone(), async move {
            validate::required_id("group snapshot id", &req.group_snapshot_id)?;
            let key = match driver.group_snapshot_key(&req.group_snapshot_id) {
                Ok(key) => key,
                // An id this node never made names nothing to delete.
                Err(Error::NotFound(_)) => return Ok(csi::DeleteVolumeGroupSnapshotResponse {}),
                Err(e) => return Err(e),
            };
            claimed(driver.claim(Kind::GroupSnapshot, key)?, &driver, move |driver| {
                driver.delete_group_snapshot(key, &req.snapshot_ids)
            })
            .await?;
            Ok(csi::DeleteVolumeGroupSnapshotResponse {})
        })
        .await
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("GetVolumeGroupSnapshot", &req.group_snapshot_id.clone(), async move {
            validate::required_id("group snapshot id", &req.group_snapshot_id)?;
            let key = driver.group_snapshot_key(&req.group_snapshot_id)?;
            let group = driver.group_snapshot(&key, &req.snapshot_ids)?;
            Ok(csi::GetVolumeGroupSnapshotResponse { group_snapshot: Some(group_snapshot_message(&group)) })
        })
        .await
    }
}
