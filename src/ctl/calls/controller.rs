//! Controller calls on volumes: create, delete, list, capacity, publish, validate, expand, modify, get.

use std::fmt::Write as _;

use anyhow::{Result, anyhow};
use loam::csi::*;
use serde_json::json;

use crate::ctl::args::{
    ControllerPublish, ControllerUnpublish, CreateVolume, DeleteVolume, ExpandVolume, GetCapacity, GetVolume,
    ModifyVolume, PageOpts, Validate, capacity_range, node_topology,
};
use crate::ctl::connect::Ctl;
use crate::ctl::output::{
    Output, bytes, capability_json, condition_text, done, list_or_dash, list_output, map_lines, status_json,
    volume_json, volume_node, volume_text,
};

impl CreateVolume {
    /// Runs `loam ctl create-volume`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let CreateVolume { name, size, limit, params, from_snapshot, from_volume, node: on, cap } = self;
        let mut ctrl = ctl.controller();
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
        let volume = ctl.call(ctrl.create_volume(request)).await?.volume;
        let volume = volume.ok_or_else(|| anyhow!("the plugin returned no volume"))?;
        Ok((json!({ "volume": volume_json(&volume) }), volume_text(&volume, " created")))
    }
}

impl DeleteVolume {
    /// Runs `loam ctl delete-volume`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let DeleteVolume { volume_id } = self;
        let mut ctrl = ctl.controller();
        let text = format!("volume {volume_id} deleted");
        let request = DeleteVolumeRequest { volume_id, ..Default::default() };
        ctl.call(ctrl.delete_volume(request)).await?;
        Ok(done(text))
    }
}

/// Runs `loam ctl list-volumes`.
pub(super) async fn list_volumes(ctl: &Ctl, page: PageOpts) -> Result<Output> {
    let ctrl = ctl.controller();
    let (entries, next) = page
        .collect(|starting_token, max_entries| {
            let request = ListVolumesRequest { max_entries, starting_token };
            let mut ctrl = ctrl.clone();
            async move {
                let r = ctl.call(ctrl.list_volumes(request)).await?;
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
    Ok(list_output(&header, rows, docs, next, page.page))
}

impl GetCapacity {
    /// Runs `loam ctl get-capacity`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let GetCapacity { params, node: on, cap } = self;
        let mut ctrl = ctl.controller();
        let request = GetCapacityRequest {
            volume_capabilities: vec![cap.capability()],
            parameters: params.into_iter().collect(),
            accessible_topology: on.as_deref().map(node_topology),
        };
        let r = ctl.call(ctrl.get_capacity(request)).await?;
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
        Ok((doc, text))
    }
}

impl ControllerPublish {
    /// Runs `loam ctl controller-publish`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let ControllerPublish { volume_id, node: node_id, read_only, context, cap } = self;
        let mut ctrl = ctl.controller();
        let text = format!("volume {volume_id} published to node {node_id}\n");
        let request = ControllerPublishVolumeRequest {
            volume_id,
            node_id,
            volume_capability: Some(cap.capability()),
            readonly: read_only,
            volume_context: context.into_iter().collect(),
            ..Default::default()
        };
        let r = ctl.call(ctrl.controller_publish_volume(request)).await?;
        let text = text + &map_lines("publish context", &r.publish_context);
        Ok((json!({ "publish_context": r.publish_context }), text))
    }
}

impl ControllerUnpublish {
    /// Runs `loam ctl controller-unpublish`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let ControllerUnpublish { volume_id, node: node_id } = self;
        let mut ctrl = ctl.controller();
        let from = node_id.as_ref().map_or("all nodes".to_owned(), |n| format!("node {n}"));
        let text = format!("volume {volume_id} unpublished from {from}");
        let node_id = node_id.unwrap_or_default();
        let request = ControllerUnpublishVolumeRequest { volume_id, node_id, ..Default::default() };
        ctl.call(ctrl.controller_unpublish_volume(request)).await?;
        Ok(done(text))
    }
}

impl Validate {
    /// Runs `loam ctl validate`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let Validate { volume_id, context, params, cap } = self;
        let mut ctrl = ctl.controller();
        let text = format!("volume {volume_id}: capability");
        let request = ValidateVolumeCapabilitiesRequest {
            volume_id,
            volume_context: context.into_iter().collect(),
            volume_capabilities: vec![cap.capability()],
            parameters: params.into_iter().collect(),
            ..Default::default()
        };
        let r = ctl.call(ctrl.validate_volume_capabilities(request)).await?;
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
        Ok((json!({ "confirmed": confirmed, "message": r.message }), text))
    }
}

impl ExpandVolume {
    /// Runs `loam ctl expand-volume`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let ExpandVolume { volume_id, size, cap } = self;
        let mut ctrl = ctl.controller();
        let text = format!("volume {volume_id} expanded to");
        let request = ControllerExpandVolumeRequest {
            volume_id,
            capacity_range: size.range(),
            volume_capability: Some(cap.capability()),
            ..Default::default()
        };
        let r = ctl.call(ctrl.controller_expand_volume(request)).await?;
        let more = if r.node_expansion_required { ", node expansion required" } else { "" };
        let doc = json!({
            "capacity_bytes": r.capacity_bytes,
            "node_expansion_required": r.node_expansion_required,
        });
        Ok((doc, format!("{text} {}{more}\n", bytes(r.capacity_bytes))))
    }
}

impl ModifyVolume {
    /// Runs `loam ctl modify-volume`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let ModifyVolume { volume_id, params } = self;
        let mut ctrl = ctl.controller();
        let text = format!("volume {volume_id} modified");
        let request = ControllerModifyVolumeRequest {
            volume_id,
            mutable_parameters: params.into_iter().collect(),
            ..Default::default()
        };
        ctl.call(ctrl.controller_modify_volume(request)).await?;
        Ok(done(text))
    }
}

impl GetVolume {
    /// Runs `loam ctl get-volume`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let GetVolume { volume_id } = self;
        let mut ctrl = ctl.controller();
        let r = ctrl.controller_get_volume(ControllerGetVolumeRequest { volume_id });
        let r = ctl.call(r).await?;
        let volume = r.volume.ok_or_else(|| anyhow!("the plugin returned no volume"))?;
        let s = r.status.unwrap_or_default();
        let condition = s.volume_condition.as_ref();
        let mut text = volume_text(&volume, "");
        writeln!(text, "  published on: {}", list_or_dash(&s.published_node_ids))?;
        writeln!(text, "  condition: {}", condition_text(condition))?;
        let status = status_json(&s.published_node_ids, condition);
        Ok((json!({ "volume": volume_json(&volume), "status": status }), text))
    }
}
