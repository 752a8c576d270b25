//! The CSI Node service: staging, publishing and stats on this node.

use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::node_service_capability::{self, rpc::Type as Cap};
use crate::csi::{self, node_server::Node};
use crate::driver::{Driver, topology};
use crate::error::{Error, Result};
use crate::ids::{Key, Kind};
use crate::rpc::controller::to_i64;
use crate::rpc::{blocking, claimed, traced, validate};

/// Node over this node's driver.
#[derive(Debug, Clone)]
pub struct NodeService {
    driver: Arc<Driver>,
}

impl NodeService {
    /// Serves Node for `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        NodeService { driver }
    }

    /// Checks the volume id and path of a stats or expand call. The path is
    /// only compared with the paths the volume is staged and published at,
    /// so any other path, malformed or not, is NOT_FOUND.
    fn volume_and_path(&self, id: &str, path: &str) -> Result<(Key, PathBuf)> {
        validate::required_id("volume id", id)?;
        let path = validate::known_path("volume path", path)?;
        Ok((self.driver.volume_key(id)?, path))
    }

    /// NodePublishVolume of a pod's inline volume: no staging path (Loam
    /// stages it itself), the pod's attributes instead of a StorageClass.
    async fn publish_inline(&self, req: csi::NodePublishVolumeRequest) -> Result<csi::NodePublishVolumeResponse> {
        validate::required_id("volume id", &req.volume_id)?;
        let target = validate::caller_path("target path", &req.target_path, &self.driver.config().root)?;
        if !req.staging_target_path.is_empty() {
            return Err(Error::InvalidArgument(
                "an inline volume has no staging target path: Loam stages it itself".into(),
            ));
        }
        let capability = validate::capability(req.volume_capability.as_ref())?;
        let volume = validate::inline_volume(&req.volume_id, &req.volume_context, &capability)?;
        let key = self.driver.inline_key(&req.volume_id).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "volume id {} is a Loam volume id, which never names an inline volume; the CO names those",
                req.volume_id
            ))
        })?;
        claimed(self.driver.claim(Kind::Volume, key)?, &self.driver, move |driver| {
            driver.inline_publish(key, volume, &target, req.readonly, capability)
        })
        .await?;
        Ok(csi::NodePublishVolumeResponse {})
    }
}

/// The capabilities the Node service advertises. Not `VOLUME_MOUNT_GROUP`:
/// with it the kubelet hands the pod's fsGroup to the driver instead of
/// applying it, and ignores fsGroupChangePolicy (`Always` must regroup every
/// file, `OnRootMismatch` only when the root differs), which a driver is never
/// told; the kubelet does both itself under the CSIDriver's `fsGroupPolicy: File`.
const CAPABILITIES: &[Cap] = &[
    Cap::StageUnstageVolume,
    Cap::GetVolumeStats,
    Cap::ExpandVolume,
    Cap::VolumeCondition,
    Cap::SingleNodeMultiWriter,
];

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        traced("NodeStageVolume", &req.volume_id.clone(), async move {
            let (key, path) = {
                validate::required_id("volume id", &req.volume_id)?;
                let root = &self.driver.config().root;
                let path = validate::caller_path("staging target path", &req.staging_target_path, root)?;
                (self.driver.volume_key(&req.volume_id)?, path)
            };
            let capability = validate::capability(req.volume_capability.as_ref())?;
            claimed(self.driver.claim(Kind::Volume, key)?, &self.driver, move |driver| {
                driver.node_stage(key, &path, capability)
            })
            .await?;
            Ok(csi::NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        traced("NodeUnstageVolume", &req.volume_id.clone(), async move {
            validate::required_id("volume id", &req.volume_id)?;
            let path =
                validate::caller_path("staging target path", &req.staging_target_path, &self.driver.config().root)?;
            // A volume this node never had is not staged here.
            let Ok(key) = self.driver.volume_key(&req.volume_id) else {
                return Ok(csi::NodeUnstageVolumeResponse {});
            };
            claimed(self.driver.claim(Kind::Volume, key)?, &self.driver, move |driver| driver.node_unstage(key, &path))
                .await?;
            Ok(csi::NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        traced("NodePublishVolume", &req.volume_id.clone(), async move {
            if validate::is_inline(&req.volume_context)? {
                return self.publish_inline(req).await;
            }
            validate::required_id("volume id", &req.volume_id)?;
            let root = &self.driver.config().root;
            let target = validate::caller_path("target path", &req.target_path, root)?;
            let staging = validate::caller_path("staging target path", &req.staging_target_path, root)?;
            let capability = validate::capability(req.volume_capability.as_ref())?;
            let key = self.driver.volume_key(&req.volume_id)?;
            claimed(self.driver.claim(Kind::Volume, key)?, &self.driver, move |driver| {
                driver.node_publish(key, &staging, &target, req.readonly, capability)
            })
            .await?;
            Ok(csi::NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        traced("NodeUnpublishVolume", &req.volume_id.clone(), async move {
            validate::required_id("volume id", &req.volume_id)?;
            let target = validate::caller_path("target path", &req.target_path, &self.driver.config().root)?;
            // Any id but Loam's own may be an inline volume's.
            let (key, inline) = match self.driver.inline_key(&req.volume_id) {
                Some(key) => (key, true),
                None => match self.driver.volume_key(&req.volume_id) {
                    Ok(key) => (key, false),
                    // Another node's volume (or a pod's inline volume named
                    // by its Loam id) is published nowhere on this node: the
                    // unpublish succeeds and touches nothing, so a kubelet
                    // cleaning up never retries forever.
                    Err(Error::NotFound(why)) => {
                        tracing::info!(%why, "nothing to unpublish on this node");
                        return Ok(csi::NodeUnpublishVolumeResponse {});
                    }
                    Err(e) => return Err(e),
                },
            };
            claimed(self.driver.claim(Kind::Volume, key)?, &self.driver, move |driver| {
                if inline { driver.inline_unpublish(key, &target) } else { driver.node_unpublish(key, &target) }
            })
            .await?;
            Ok(csi::NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        use csi::volume_usage::Unit;
        let req = request.into_inner();
        traced("NodeGetVolumeStats", &req.volume_id.clone(), async move {
            validate::required_id("volume id", &req.volume_id)?;
            let (key, path) = match self.driver.inline_key(&req.volume_id) {
                Some(key) => (key, validate::known_path("volume path", &req.volume_path)?),
                None => self.volume_and_path(&req.volume_id, &req.volume_path)?,
            };
            let driver = self.driver.clone();
            // Stats only read: no claim, so kubelet's polling never blocks
            // (or is blocked by) a real operation.
            let (stats, condition) = blocking(move || driver.node_stats(key, &path)).await?;
            let usage = |unit: Unit, total: u64, used: u64, available: u64| csi::VolumeUsage {
                available: to_i64(available),
                total: to_i64(total),
                used: to_i64(used),
                unit: unit as i32,
            };
            Ok(csi::NodeGetVolumeStatsResponse {
                usage: vec![
                    usage(Unit::Bytes, stats.total_bytes, stats.used_bytes, stats.available_bytes),
                    usage(
                        Unit::Inodes,
                        stats.used_inodes.saturating_add(stats.available_inodes),
                        stats.used_inodes,
                        stats.available_inodes,
                    ),
                ],
                volume_condition: Some(csi::VolumeCondition {
                    abnormal: condition.abnormal,
                    message: condition.message,
                }),
            })
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        traced("NodeExpandVolume", &req.volume_id.clone(), async move {
            // Optional, but a capability Loam cannot serve is refused as such.
            if req.volume_capability.is_some() {
                validate::capability(req.volume_capability.as_ref())?;
            }
            let (key, path) = self.volume_and_path(&req.volume_id, &req.volume_path)?;
            let range = validate::capacity(req.capacity_range.as_ref())?.unwrap_or_default();
            let driver = self.driver.clone();
            let capacity =
                claimed(driver.claim(Kind::Volume, key)?, &driver, move |driver| driver.node_expand(key, &path, range))
                    .await?;
            Ok(csi::NodeExpandVolumeResponse { capacity_bytes: to_i64(capacity) })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|&kind| csi::NodeServiceCapability {
                r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc { r#type: kind as i32 })),
            })
            .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let config = self.driver.config();
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: config.node_id.clone(),
            max_volumes_per_node: i64::from(config.max_volumes_per_node),
            accessible_topology: Some(csi::Topology { segments: topology(&config.node_id) }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_group_is_left_to_the_kubelet() {
        assert!(!CAPABILITIES.contains(&Cap::VolumeMountGroup), "the kubelet must apply fsGroup and its change policy");
    }
}
