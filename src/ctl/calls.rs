//! What each subcommand does: the request it sends, and how the response becomes
//! its output (a JSON document and readable text).

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::{Result, anyhow};
use loam::csi::controller_client::ControllerClient;
use loam::csi::group_controller_client::GroupControllerClient;
use loam::csi::identity_client::IdentityClient;
use loam::csi::node_client::NodeClient;
use loam::csi::*;
use serde_json::json;

use super::args::{Cmd, capacity_range, node_topology};
use super::connect::Ctl;
use super::output::{
    Output, bytes, capability_json, condition_json, condition_text, done, enum_name, group_snapshot_output,
    list_or_dash, list_output, map_lines, plugin_cap, snapshot_json, snapshot_output, status_json, table, volume_json,
    volume_node, volume_text,
};

impl Ctl {
    /// Runs one subcommand and returns what it prints.
    pub(super) async fn execute(&self, command: Cmd) -> Result<Output> {
        let mut identity = IdentityClient::new(self.channel.clone());
        let mut ctrl = ControllerClient::new(self.channel.clone());
        let mut node = NodeClient::new(self.channel.clone());
        let mut group = GroupControllerClient::new(self.channel.clone());
        Ok(match command {
            Cmd::Info => {
                let info = self.call(identity.get_plugin_info(GetPluginInfoRequest {}));
                let info = info.await?;
                let caps = identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {});
                let caps: Vec<_> = self.call(caps).await?.capabilities.iter().filter_map(plugin_cap).collect();
                let mut text = format!("plugin {} {}\n", info.name, info.vendor_version);
                text += &map_lines("manifest", &info.manifest);
                for (kind, name) in &caps {
                    writeln!(text, "  {kind}: {name}")?;
                }
                let caps: Vec<_> = caps.into_iter().map(|(kind, name)| json!({ kind: name })).collect();
                let doc = json!({
                    "name": info.name,
                    "vendor_version": info.vendor_version,
                    "manifest": info.manifest,
                    "capabilities": caps,
                });
                (doc, text)
            }
            Cmd::Probe => {
                let ready = self.call(identity.probe(ProbeRequest {})).await?.ready;
                let text = match ready {
                    Some(false) => "not ready\n",
                    _ => "ready\n",
                };
                (json!({ "ready": ready }), text.to_owned())
            }
            Cmd::CreateVolume { name, size, limit, params, from_snapshot, from_volume, node: on, cap } => {
                use volume_content_source::{SnapshotSource, Type, VolumeSource};
                let source = from_snapshot
                    .map(|snapshot_id| Type::Snapshot(SnapshotSource { snapshot_id }))
                    .or(from_volume.map(|volume_id| Type::Volume(VolumeSource { volume_id })));
                let request = CreateVolumeRequest {
                    name,
                    capacity_range: capacity_range(size, limit),
                    volume_capabilities: vec![cap.capability()],
                    parameters: params.into_iter().collect(),
                    volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
                    accessibility_requirements: on.map(|n| TopologyRequirement {
                        requisite: vec![node_topology(&n)],
                        preferred: vec![node_topology(&n)],
                    }),
                    ..Default::default()
                };
                let volume = self.call(ctrl.create_volume(request)).await?.volume;
                let volume = volume.ok_or_else(|| anyhow!("the plugin returned no volume"))?;
                (json!({ "volume": volume_json(&volume) }), volume_text(&volume, " created"))
            }
            Cmd::DeleteVolume { volume_id } => {
                let text = format!("volume {volume_id} deleted");
                let request = DeleteVolumeRequest { volume_id, ..Default::default() };
                self.call(ctrl.delete_volume(request)).await?;
                done(text)
            }
            Cmd::ListVolumes(page) => {
                let (entries, next) = page
                    .collect(|starting_token, max_entries| {
                        let request = ListVolumesRequest { max_entries, starting_token };
                        let mut ctrl = ctrl.clone();
                        async move {
                            let r = self.call(ctrl.list_volumes(request)).await?;
                            Ok((r.entries, r.next_token))
                        }
                    })
                    .await?;
                let (rows, docs) = entries
                    .into_iter()
                    .map(|e| {
                        let v = e.volume.unwrap_or_default();
                        let s = e.status.unwrap_or_default();
                        let condition = s.volume_condition.as_ref();
                        let row = vec![
                            v.volume_id.clone(),
                            bytes(v.capacity_bytes),
                            volume_node(&v).unwrap_or("-").to_owned(),
                            list_or_dash(&s.published_node_ids),
                            condition_text(condition),
                        ];
                        let status = status_json(&s.published_node_ids, condition);
                        (row, json!({ "volume": volume_json(&v), "status": status }))
                    })
                    .unzip();
                let header = ["VOLUME_ID", "CAPACITY", "NODE", "PUBLISHED_ON", "CONDITION"];
                list_output(&header, rows, docs, next, page.page)
            }
            Cmd::GetCapacity { params, node: on, cap } => {
                let request = GetCapacityRequest {
                    volume_capabilities: vec![cap.capability()],
                    parameters: params.into_iter().collect(),
                    accessible_topology: on.as_deref().map(node_topology),
                };
                let r = self.call(ctrl.get_capacity(request)).await?;
                let (min, max) = (r.minimum_volume_size, r.maximum_volume_size);
                let mut text = format!("available: {}\n", bytes(r.available_capacity));
                if min.is_some() || max.is_some() {
                    let [min, max] = [min, max].map(|s| s.map_or("-".to_owned(), bytes));
                    writeln!(text, "volume size: {min} to {max}")?;
                }
                let doc = json!({
                    "available_capacity": r.available_capacity,
                    "maximum_volume_size": max,
                    "minimum_volume_size": min,
                });
                (doc, text)
            }
            Cmd::ControllerPublish { volume_id, node: node_id, read_only, context, cap } => {
                let text = format!("volume {volume_id} published to node {node_id}\n");
                let request = ControllerPublishVolumeRequest {
                    volume_id,
                    node_id,
                    volume_capability: Some(cap.capability()),
                    readonly: read_only,
                    volume_context: context.into_iter().collect(),
                    ..Default::default()
                };
                let r = self.call(ctrl.controller_publish_volume(request)).await?;
                let text = text + &map_lines("publish context", &r.publish_context);
                (json!({ "publish_context": r.publish_context }), text)
            }
            Cmd::ControllerUnpublish { volume_id, node: node_id } => {
                let from = node_id.as_ref().map_or("all nodes".to_owned(), |n| format!("node {n}"));
                let text = format!("volume {volume_id} unpublished from {from}");
                let node_id = node_id.unwrap_or_default();
                let request = ControllerUnpublishVolumeRequest { volume_id, node_id, ..Default::default() };
                self.call(ctrl.controller_unpublish_volume(request)).await?;
                done(text)
            }
            Cmd::Validate { volume_id, context, params, cap } => {
                let text = format!("volume {volume_id}: capability");
                let request = ValidateVolumeCapabilitiesRequest {
                    volume_id,
                    volume_context: context.into_iter().collect(),
                    volume_capabilities: vec![cap.capability()],
                    parameters: params.into_iter().collect(),
                    ..Default::default()
                };
                let r = self.call(ctrl.validate_volume_capabilities(request)).await?;
                let text = match (&r.confirmed, r.message.as_str()) {
                    (Some(_), _) => format!("{text} confirmed\n"),
                    (None, "") => format!("{text} not confirmed\n"),
                    (None, message) => format!("{text} not confirmed: {message}\n"),
                };
                let confirmed = r.confirmed.map(|c| {
                    let caps: Vec<_> = c.volume_capabilities.iter().map(capability_json).collect();
                    json!({
                        "volume_context": c.volume_context,
                        "volume_capabilities": caps,
                        "parameters": c.parameters,
                        "mutable_parameters": c.mutable_parameters,
                    })
                });
                (json!({ "confirmed": confirmed, "message": r.message }), text)
            }
            Cmd::ExpandVolume { volume_id, size, cap } => {
                let text = format!("volume {volume_id} expanded to");
                let request = ControllerExpandVolumeRequest {
                    volume_id,
                    capacity_range: size.range(),
                    volume_capability: Some(cap.capability()),
                    ..Default::default()
                };
                let r = self.call(ctrl.controller_expand_volume(request)).await?;
                let more = if r.node_expansion_required { ", node expansion required" } else { "" };
                let doc = json!({
                    "capacity_bytes": r.capacity_bytes,
                    "node_expansion_required": r.node_expansion_required,
                });
                (doc, format!("{text} {}{more}\n", bytes(r.capacity_bytes)))
            }
            Cmd::ModifyVolume { volume_id, params } => {
                let text = format!("volume {volume_id} modified");
                let request = ControllerModifyVolumeRequest {
                    volume_id,
                    mutable_parameters: params.into_iter().collect(),
                    ..Default::default()
                };
                self.call(ctrl.controller_modify_volume(request)).await?;
                done(text)
            }
            Cmd::GetVolume { volume_id } => {
                let r = ctrl.controller_get_volume(ControllerGetVolumeRequest { volume_id });
                let r = self.call(r).await?;
                let volume = r.volume.ok_or_else(|| anyhow!("the plugin returned no volume"))?;
                let s = r.status.unwrap_or_default();
                let condition = s.volume_condition.as_ref();
                let mut text = volume_text(&volume, "");
                writeln!(text, "  published on: {}", list_or_dash(&s.published_node_ids))?;
                writeln!(text, "  condition: {}", condition_text(condition))?;
                let status = status_json(&s.published_node_ids, condition);
                (json!({ "volume": volume_json(&volume), "status": status }), text)
            }
            Cmd::CreateSnapshot { name, source_volume_id, params } => {
                let parameters = params.into_iter().collect();
                let request = CreateSnapshotRequest { source_volume_id, name, parameters, ..Default::default() };
                snapshot_output(self.call(ctrl.create_snapshot(request)).await?.snapshot, " created")?
            }
            Cmd::DeleteSnapshot { snapshot_id } => {
                let text = format!("snapshot {snapshot_id} deleted");
                let request = DeleteSnapshotRequest { snapshot_id, ..Default::default() };
                self.call(ctrl.delete_snapshot(request)).await?;
                done(text)
            }
            Cmd::ListSnapshots { snapshot_id, source_volume_id, page } => {
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
                            let r = self.call(ctrl.list_snapshots(request)).await?;
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
                list_output(&header, rows, docs, next, page.page)
            }
            Cmd::GetSnapshot { snapshot_id } => {
                let request = GetSnapshotRequest { snapshot_id, ..Default::default() };
                snapshot_output(self.call(ctrl.get_snapshot(request)).await?.snapshot, "")?
            }
            Cmd::CreateGroupSnapshot { name, source_volume_ids, params } => {
                let parameters = params.into_iter().collect();
                let request =
                    CreateVolumeGroupSnapshotRequest { name, source_volume_ids, parameters, ..Default::default() };
                let r = self.call(group.create_volume_group_snapshot(request)).await?;
                group_snapshot_output(r.group_snapshot, " created")?
            }
            Cmd::DeleteGroupSnapshot { group_snapshot_id, snapshot_ids } => {
                let text = format!("group snapshot {group_snapshot_id} deleted with its snapshots");
                let request =
                    DeleteVolumeGroupSnapshotRequest { group_snapshot_id, snapshot_ids, ..Default::default() };
                self.call(group.delete_volume_group_snapshot(request)).await?;
                done(text)
            }
            Cmd::GetGroupSnapshot { group_snapshot_id, snapshot_ids } => {
                let request = GetVolumeGroupSnapshotRequest { group_snapshot_id, snapshot_ids, ..Default::default() };
                group_snapshot_output(self.call(group.get_volume_group_snapshot(request)).await?.group_snapshot, "")?
            }
            Cmd::GroupCapabilities => {
                use group_controller_service_capability::{Type as G, rpc::Type as GType};
                let request = GroupControllerGetCapabilitiesRequest {};
                let r = self.call(group.group_controller_get_capabilities(request)).await?;
                let names: Vec<_> = (r.capabilities.iter().filter_map(|c| c.r#type))
                    .map(|G::Rpc(rpc)| enum_name(rpc.r#type, GType::as_str_name))
                    .collect();
                (json!({ "group_controller": names }), format!("group controller: {}\n", list_or_dash(&names)))
            }
            Cmd::NodeStage { volume_id, staging_path, context, cap } => {
                let text = format!("volume {volume_id} staged at {staging_path}");
                let request = NodeStageVolumeRequest {
                    volume_id,
                    staging_target_path: staging_path,
                    volume_capability: Some(cap.capability()),
                    volume_context: context.into_iter().collect(),
                    ..Default::default()
                };
                self.call(node.node_stage_volume(request)).await?;
                done(text)
            }
            Cmd::NodeUnstage { volume_id, staging_path } => {
                let text = format!("volume {volume_id} unstaged from {staging_path}");
                let request = NodeUnstageVolumeRequest { volume_id, staging_target_path: staging_path };
                self.call(node.node_unstage_volume(request)).await?;
                done(text)
            }
            Cmd::NodePublish { volume_id, target_path, staging_path, read_only, context, cap } => {
                let text = format!("volume {volume_id} published at {target_path}");
                let request = NodePublishVolumeRequest {
                    volume_id,
                    staging_target_path: staging_path.unwrap_or_default(),
                    target_path,
                    volume_capability: Some(cap.capability()),
                    readonly: read_only,
                    volume_context: context.into_iter().collect(),
                    ..Default::default()
                };
                self.call(node.node_publish_volume(request)).await?;
                done(text)
            }
            Cmd::NodeUnpublish { volume_id, target_path } => {
                let text = format!("volume {volume_id} unpublished from {target_path}");
                let request = NodeUnpublishVolumeRequest { volume_id, target_path };
                self.call(node.node_unpublish_volume(request)).await?;
                done(text)
            }
            Cmd::NodeInfo => {
                let r = self.call(node.node_get_info(NodeGetInfoRequest {})).await?;
                let segments = r.accessible_topology.map(|t| t.segments);
                let max = match r.max_volumes_per_node {
                    0 => "unlimited".to_owned(),
                    n => n.to_string(),
                };
                let text = format!("node {}: max volumes {max}\n", r.node_id)
                    + &map_lines("topology", segments.as_ref().unwrap_or(&HashMap::new()));
                let doc = json!({
                    "node_id": r.node_id,
                    "max_volumes_per_node": r.max_volumes_per_node,
                    "accessible_topology": segments.map(|s| json!({ "segments": s })),
                });
                (doc, text)
            }
            Cmd::NodeStats { volume_id, path, staging_path } => {
                let request = NodeGetVolumeStatsRequest {
                    volume_id,
                    volume_path: path,
                    staging_target_path: staging_path.unwrap_or_default(),
                };
                let r = self.call(node.node_get_volume_stats(request)).await?;
                let (rows, usage): (Vec<_>, Vec<_>) = r
                    .usage
                    .iter()
                    .map(|u| {
                        let unit = enum_name(u.unit, volume_usage::Unit::as_str_name);
                        let is_bytes = u.unit == volume_usage::Unit::Bytes as i32;
                        let [total, used, available] =
                            [u.total, u.used, u.available].map(|n| if is_bytes { bytes(n) } else { n.to_string() });
                        let doc = json!({ "unit": unit, "total": u.total, "used": u.used, "available": u.available });
                        (vec![unit, total, used, available], doc)
                    })
                    .unzip();
                let condition = r.volume_condition.as_ref();
                let text = table(&["UNIT", "TOTAL", "USED", "AVAILABLE"], &rows)
                    + &format!("condition: {}\n", condition_text(condition));
                let doc = json!({ "usage": usage, "volume_condition": condition.map(condition_json) });
                (doc, text)
            }
            Cmd::NodeExpand { volume_id, path, staging_path, size, cap } => {
                let text = format!("volume {volume_id} expanded on the node to");
                let request = NodeExpandVolumeRequest {
                    volume_id,
                    volume_path: path,
                    capacity_range: size.range(),
                    staging_target_path: staging_path.unwrap_or_default(),
                    volume_capability: Some(cap.capability()),
                    ..Default::default()
                };
                let r = self.call(node.node_expand_volume(request)).await?;
                let doc = json!({ "capacity_bytes": r.capacity_bytes });
                (doc, format!("{text} {}\n", bytes(r.capacity_bytes)))
            }
            Cmd::Capabilities => {
                use controller_service_capability::{Type as C, rpc::Type as CType};
                use node_service_capability::{Type as N, rpc::Type as NType};
                let request = ControllerGetCapabilitiesRequest {};
                let c = self.call(ctrl.controller_get_capabilities(request)).await?;
                let n = self.call(node.node_get_capabilities(NodeGetCapabilitiesRequest {})).await?;
                let controller: Vec<_> = (c.capabilities.iter().filter_map(|c| c.r#type))
                    .map(|C::Rpc(rpc)| enum_name(rpc.r#type, CType::as_str_name))
                    .collect();
                let node: Vec<_> = (n.capabilities.iter().filter_map(|c| c.r#type))
                    .map(|N::Rpc(rpc)| enum_name(rpc.r#type, NType::as_str_name))
                    .collect();
                let text = format!("controller: {}\nnode: {}\n", list_or_dash(&controller), list_or_dash(&node));
                (json!({ "controller": controller, "node": node }), text)
            }
        })
    }
}
