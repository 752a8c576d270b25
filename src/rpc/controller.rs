//! The CSI Controller service over this node's driver (`--mode all`).

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::controller_service_capability::{self, rpc::Type as Cap};
use crate::csi::{self, controller_server::Controller};
use crate::driver::{Condition, Driver, NewVolume, parse_layout, topology};
use crate::error::{Error, Result, quote};
use crate::ids::{Key, Kind, validate_name};
use crate::records::{ContentSource, Enforcement, Layout, SnapshotRecord, VolumeRecord};
use crate::rpc::validate::{PROTECTION_PARAMETER, Protection};
use crate::rpc::{blocking, claimed, timestamp, traced, validate};

/// Controller over a node's own driver.
#[derive(Debug, Clone)]
pub struct ControllerService {
    driver: Arc<Driver>,
}

impl ControllerService {
    /// Serves Controller for `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        ControllerService { driver }
    }
}

/// The capabilities the Controller advertises.
const CAPABILITIES: &[Cap] = &[
    Cap::CreateDeleteVolume,
    Cap::PublishUnpublishVolume,
    Cap::ListVolumes,
    Cap::GetCapacity,
    Cap::CreateDeleteSnapshot,
    Cap::ListSnapshots,
    Cap::CloneVolume,
    Cap::PublishReadonly,
    Cap::ExpandVolume,
    Cap::ListVolumesPublishedNodes,
    Cap::VolumeCondition,
    Cap::GetVolume,
    Cap::SingleNodeMultiWriter,
    Cap::ModifyVolume,
    // GET_SNAPSHOT is served but not advertised: csi-sanity v5.4.0 fails any
    // driver that lists it, and no kubernetes-csi sidecar calls it yet.
];

/// The Controller's capabilities, the same whether served here or routed.
pub(crate) fn capabilities() -> csi::ControllerGetCapabilitiesResponse {
    let capabilities = CAPABILITIES
        .iter()
        .map(|&kind| csi::ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc {
                r#type: kind as i32,
            })),
        })
        .collect();
    csi::ControllerGetCapabilitiesResponse { capabilities }
}

/// The CSI message for a volume record.
pub fn volume_message(record: &VolumeRecord, driver: &Driver) -> csi::Volume {
    let node_id = &driver.config().node_id;
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let content_source = record.source.as_ref().map(|s| csi::VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource { snapshot_id: id.clone() }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource { volume_id: id.clone() }),
        }),
    });
    let mut context: std::collections::HashMap<String, String> =
        [("backend".to_owned(), format!("{:?}", record.layout.backend()).to_lowercase())].into();
    match &record.layout {
        Layout::Loop(spec) => {
            context.insert("fsType".into(), spec.fs.name().into());
            context.insert("provisioning".into(), spec.provisioning.name().into());
        }
        Layout::Dir => {
            context.insert("quota".into(), quota_context(record.enforcement.as_ref(), driver.unenforced_reason()));
        }
    }
    csi::Volume {
        capacity_bytes: to_i64(record.capacity_bytes),
        volume_id: record.id.clone(),
        volume_context: context,
        content_source,
        accessible_topology: vec![csi::Topology { segments: topology(node_id) }],
    }
}

/// How the volume's capacity is enforced, in words, for its volume context;
/// `root_reason` is why the root cannot enforce, when it cannot.
fn quota_context(enforcement: Option<&Enforcement>, root_reason: Option<&str>) -> String {
    match (enforcement, root_reason) {
        (Some(Enforcement::BtrfsQgroup(id)), _) => format!("btrfs qgroup 0/{id}"),
        (Some(Enforcement::Project(id)), _) => format!("project quota {id}"),
        (Some(Enforcement::Unenforced(reason)), _) if !reason.is_empty() => format!("not enforced: {reason}"),
        (Some(Enforcement::Unenforced(_)), Some(reason)) => format!("not enforced: {reason}"),
        (Some(Enforcement::Unenforced(_)), None) => {
            "not enforced: created while the root could not enforce capacities".into()
        }
        (None, _) => "not enforced: created before Loam enforced capacities".into(),
    }
}

/// The CSI message for a snapshot record.
pub fn snapshot_message(record: &SnapshotRecord) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: to_i64(record.reported_bytes()),
        snapshot_id: record.id.clone(),
        source_volume_id: record.source_volume_id.clone(),
        creation_time: Some(timestamp(record.created_secs, record.created_nanos)),
        // Snapshots are complete copies before their record is written; one
        // kept off node is ready once its other node holds its copy too.
        ready_to_use: !record.awaiting_copy,
        // Tells the CO the snapshot goes only with its group.
        group_snapshot_id: record.group_snapshot_id.clone().unwrap_or_default(),
    }
}

fn condition_message(c: Condition) -> csi::VolumeCondition {
    csi::VolumeCondition { abnormal: c.abnormal, message: c.message }
}

/// Saturates instead of wrapping: CSI sizes are signed.
pub fn to_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// Reads a pagination token; ABORTED when it is not one Loam handed out.
fn page_token(token: &str) -> Result<Option<Key>> {
    if token.is_empty() {
        return Ok(None);
    }
    Key::parse(token)
        .map(Some)
        .ok_or_else(|| Error::Aborted(format!("starting token {} is not valid; restart the listing", quote(token))))
}

/// The most entries one ListVolumes or ListSnapshots response carries, also
/// when the caller sets no `max_entries`: a page of 1,000 volumes is about
/// 0.37 MiB on the wire, so a node of 11,000 or more never answers past
/// grpc-go's default 4 MiB receive limit (which fails the call), and no node
/// holds its whole listing in memory at once. The spec has the caller follow `next_token`
/// whenever it is set, as Kubernetes' sidecars and csi-sanity do.
pub(crate) const LONGEST_PAGE: usize = 1000;

/// How many entries a listing returns: what the caller asked, at most
/// [`LONGEST_PAGE`] (0 asks for no limit).
fn page_size(max_entries: i32) -> Result<usize> {
    let max =
        usize::try_from(max_entries).map_err(|_| Error::InvalidArgument("max_entries must not be negative".into()))?;
    Ok(if max == 0 { LONGEST_PAGE } else { max.min(LONGEST_PAGE) })
}

/// Validates a CreateVolume request into what the driver makes.
pub(crate) fn new_volume(req: csi::CreateVolumeRequest) -> Result<NewVolume> {
    validate_name("volume", &req.name)?;
    let parameters = validate::parameters(&req.parameters)?;
    // A VolumeAttributesClass's values win over the StorageClass's.
    let mutable_parameters = validate::parameters(&req.mutable_parameters)?;
    let capabilities = validate::capabilities(&req.volume_capabilities)?;
    let capability_fs = capabilities.iter().map(|c| c.fs_type.as_str()).find(|fs| !fs.is_empty());
    let layout = parse_layout(&parameters, &mutable_parameters, capability_fs.unwrap_or_default())?;
    Ok(NewVolume {
        capabilities,
        capacity: validate::capacity(req.capacity_range.as_ref())?.unwrap_or_default(),
        layout,
        parameters,
        mutable_parameters,
        source: validate::content_source(req.volume_content_source.as_ref())?,
        allowed_nodes: validate::allowed_nodes(req.accessibility_requirements.as_ref()),
        name: req.name,
    })
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("CreateVolume", &req.name.clone(), async move {
            let new = new_volume(req)?;
            let key = driver.key_for(Kind::Volume, &new.name);
            let record = claimed(driver.claim_create(key, new.source.as_ref())?, &driver, move |driver| {
                driver.create_volume(key, new)
            })
            .await?;
            Ok(csi::CreateVolumeResponse { volume: Some(volume_message(&record, &driver)) })
        })
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("DeleteVolume", &req.volume_id.clone(), async move {
            validate::required_id("volume id", &req.volume_id)?;
            let key = match driver.volume_key(&req.volume_id) {
                Ok(key) => key,
                // An id this node never made names nothing to delete.
                Err(Error::NotFound(_)) => return Ok(csi::DeleteVolumeResponse {}),
                Err(e) => return Err(e),
            };
            claimed(driver.claim(Kind::Volume, key)?, &driver, move |driver| driver.delete_volume(key)).await?;
            Ok(csi::DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("ControllerPublishVolume", &req.volume_id.clone(), async move {
            validate::required_id("volume id", &req.volume_id)?;
            validate::required_id("node id", &req.node_id)?;
            let capability = validate::capability(req.volume_capability.as_ref())?;
            let key = driver.volume_key(&req.volume_id)?;
            let publish_context = claimed(driver.claim(Kind::Volume, key)?, &driver, move |driver| {
                driver.controller_publish(key, &req.node_id, req.readonly, capability)
            })
            .await?;
            Ok(csi::ControllerPublishVolumeResponse { publish_context: publish_context.into_iter().collect() })
        })
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("ControllerUnpublishVolume", &req.volume_id.clone(), async move {
            validate::required_id("volume id", &req.volume_id)?;
            // Optional (empty: every node), but never unbounded.
            if !req.node_id.is_empty() {
                validate::required_id("node id", &req.node_id)?;
            }
            let Ok(key) = driver.volume_key(&req.volume_id) else {
                // Not this node's volume, so not attached here: done.
                return Ok(csi::ControllerUnpublishVolumeResponse {});
            };
            claimed(driver.claim(Kind::Volume, key)?, &driver, move |driver| {
                driver.controller_unpublish(key, &req.node_id)
            })
            .await?;
            Ok(csi::ControllerUnpublishVolumeResponse {})
        })
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("ValidateVolumeCapabilities", &req.volume_id.clone(), async move {
            validate::required_id("volume id", &req.volume_id)?;
            if req.volume_capabilities.is_empty() {
                return Err(Error::InvalidArgument("volume capabilities are required".into()));
            }
            let key = driver.volume_key(&req.volume_id)?;
            let record = driver.volume(&key)?;
            let unsupported = req.volume_capabilities.iter().find_map(|cap| match validate::capability(Some(cap)) {
                Ok(cap) => Driver::supports(&record.layout, &cap).err(),
                Err(e) => Some(e.to_string()),
            });
            let params_match = validate::parameters(&req.parameters)? == record.parameters || req.parameters.is_empty();
            let message = match (unsupported, params_match) {
                (Some(why), _) => why,
                (None, false) => "the parameters differ from those the volume was created with".into(),
                (None, true) => {
                    let confirmed = csi::validate_volume_capabilities_response::Confirmed {
                        volume_context: req.volume_context,
                        volume_capabilities: req.volume_capabilities,
                        parameters: req.parameters,
                        mutable_parameters: Default::default(),
                    };
                    return Ok(csi::ValidateVolumeCapabilitiesResponse {
                        confirmed: Some(confirmed),
                        message: String::new(),
                    });
                }
            };
            Ok(csi::ValidateVolumeCapabilitiesResponse { confirmed: None, message })
        })
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("ListVolumes", "", async move {
            let after = page_token(&req.starting_token)?;
            let max = page_size(req.max_entries)?;
            // Conditions look at the filesystem (and sysfs for loop volumes).
            blocking(move || {
                let page = driver.list_volumes(after, max);
                let entries = page
                    .rows
                    .iter()
                    .map(|record| csi::list_volumes_response::Entry {
                        volume: Some(volume_message(record, &driver)),
                        status: Some(csi::list_volumes_response::VolumeStatus {
                            published_node_ids: record.attachment.iter().map(|a| a.node_id.clone()).collect(),
                            volume_condition: Some(condition_message(driver.condition(record))),
                        }),
                    })
                    .collect();
                Ok(csi::ListVolumesResponse {
                    entries,
                    next_token: page.next.map(|k| k.to_string()).unwrap_or_default(),
                })
            })
            .await
        })
        .await
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("GetCapacity", "", async move {
            let node = driver.config().node_id.clone();
            let elsewhere = req
                .accessible_topology
                .as_ref()
                .and_then(|t| t.segments.get(crate::config::TOPOLOGY_NODE_KEY))
                .is_some_and(|n| *n != node);
            let parameters = validate::parameters(&req.parameters)?;
            let layout = parse_layout(&parameters, &BTreeMap::new(), "")?;
            let unsupported = req
                .volume_capabilities
                .iter()
                .any(|c| !validate::capability(Some(c)).is_ok_and(|cap| Driver::supports(&layout, &cap).is_ok()));
            let available = if elsewhere || unsupported { 0 } else { blocking(move || driver.capacity()).await? };
            Ok(csi::GetCapacityResponse {
                available_capacity: to_i64(available),
                maximum_volume_size: Some(to_i64(available)),
                minimum_volume_size: None,
            })
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities()))
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("CreateSnapshot", &req.name.clone(), async move {
            validate_name("snapshot", &req.name)?;
            validate::required_id("source volume id", &req.source_volume_id)?;
            if validate::snapshot_parameters(&req.parameters)? == Protection::OffNode {
                // The other node and the copy are the controller's to arrange
                // (Copies.CutSnapshot and CopySnapshot); a lone driver has no
                // other node.
                return Err(Error::FailedPrecondition(format!(
                    "snapshot parameter {PROTECTION_PARAMETER}: {} keeps a copy on another node, which only Loam's \
                     controller (--mode controller, with node agents) arranges; this driver serves node {} alone",
                    Protection::OffNode.name(),
                    driver.config().node_id
                )));
            }
            let key = driver.key_for(Kind::Snapshot, &req.name);
            let record = claimed(driver.claim(Kind::Snapshot, key)?, &driver, move |driver| {
                driver.create_snapshot(key, &req.name, &req.source_volume_id)
            })
            .await?;
            Ok(csi::CreateSnapshotResponse { snapshot: Some(snapshot_message(&record)) })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("DeleteSnapshot", &req.snapshot_id.clone(), async move {
            validate::required_id("snapshot id", &req.snapshot_id)?;
            let Ok(key) = driver.snapshot_key(&req.snapshot_id) else {
                return Ok(csi::DeleteSnapshotResponse {});
            };
            claimed(driver.claim(Kind::Snapshot, key)?, &driver, move |driver| driver.delete_snapshot(key)).await?;
            Ok(csi::DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("ListSnapshots", "", async move {
            let after = page_token(&req.starting_token)?;
            let max = page_size(req.max_entries)?;
            let entry =
                |s: &SnapshotRecord| csi::list_snapshots_response::Entry { snapshot: Some(snapshot_message(s)) };
            if !req.snapshot_id.is_empty() {
                // One snapshot at most: an unknown id is an empty list.
                let entries = driver
                    .snapshot_key(&req.snapshot_id)
                    .and_then(|k| driver.snapshot(&k))
                    .ok()
                    .filter(|s| req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id)
                    .map(|s| vec![entry(&s)])
                    .unwrap_or_default();
                return Ok(csi::ListSnapshotsResponse { entries, next_token: String::new() });
            }
            let source = (!req.source_volume_id.is_empty()).then_some(req.source_volume_id.as_str());
            let page = driver.list_snapshots(after, max, source);
            Ok(csi::ListSnapshotsResponse {
                entries: page.rows.iter().map(|s| entry(s)).collect(),
                next_token: page.next.map(|k| k.to_string()).unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("GetSnapshot", &req.snapshot_id.clone(), async move {
            validate::required_id("snapshot id", &req.snapshot_id)?;
            let key = driver.snapshot_key(&req.snapshot_id)?;
            let record = driver.snapshot(&key)?;
            Ok(csi::GetSnapshotResponse { snapshot: Some(snapshot_message(&record)) })
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("ControllerExpandVolume", &req.volume_id.clone(), async move {
            validate::required_id("volume id", &req.volume_id)?;
            let range = validate::capacity(req.capacity_range.as_ref())?
                .ok_or_else(|| Error::InvalidArgument("capacity range is required".into()))?;
            let key = driver.volume_key(&req.volume_id)?;
            let (capacity, node_expansion_required) =
                claimed(driver.claim(Kind::Volume, key)?, &driver, move |driver| {
                    let capacity = driver.expand_volume(key, range)?;
                    Ok((capacity, driver.node_expansion_required(&key)))
                })
                .await?;
            Ok(csi::ControllerExpandVolumeResponse { capacity_bytes: to_i64(capacity), node_expansion_required })
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("ControllerGetVolume", &req.volume_id.clone(), async move {
            validate::required_id("volume id", &req.volume_id)?;
            let key = driver.volume_key(&req.volume_id)?;
            let (record, condition) = {
                let driver = driver.clone();
                blocking(move || driver.volume_with_condition(&key)).await?
            };
            let volume = match &record {
                Some(r) => volume_message(r, &driver),
                // A damaged record still answers, so the CO sees the condition.
                None => csi::Volume { volume_id: req.volume_id.clone(), ..Default::default() },
            };
            Ok(csi::ControllerGetVolumeResponse {
                volume: Some(volume),
                status: Some(csi::controller_get_volume_response::VolumeStatus {
                    published_node_ids: record
                        .iter()
                        .flat_map(|r| r.attachment.iter().map(|a| a.node_id.clone()))
                        .collect(),
                    volume_condition: Some(condition_message(condition)),
                }),
            })
        })
        .await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver.clone();
        traced("ControllerModifyVolume", &req.volume_id.clone(), async move {
            validate::required_id("volume id", &req.volume_id)?;
            let mutable = validate::parameters(&req.mutable_parameters)?;
            let key = driver.volume_key(&req.volume_id)?;
            claimed(driver.claim(Kind::Volume, key)?, &driver, move |driver| driver.modify_volume(key, mutable))
                .await?;
            Ok(csi::ControllerModifyVolumeResponse {})
        })
        .await
    }
}
