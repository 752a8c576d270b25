//! Node calls: stage, publish, their reverses, node info, stats and expansion.

use std::collections::HashMap;

use anyhow::Result;
use loam::csi::*;
use serde_json::json;

use crate::ctl::args::{NodeExpand, NodePublish, NodeStage, NodeStats, NodeUnpublish, NodeUnstage};
use crate::ctl::connect::Ctl;
use crate::ctl::output::{Output, bytes, condition_json, condition_text, done, enum_name, map_lines, table};

impl NodeStage {
    /// Runs `loam ctl node-stage`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let NodeStage { volume_id, staging_path, context, cap } = self;
        let mut node = ctl.node();
        let text = format!("volume {volume_id} staged at {staging_path}");
        let request = NodeStageVolumeRequest {
            volume_id,
            staging_target_path: staging_path,
            volume_capability: Some(cap.capability()),
            volume_context: context.into_iter().collect(),
            ..Default::default()
        };
        ctl.call(node.node_stage_volume(request)).await?;
        Ok(done(text))
    }
}

impl NodeUnstage {
    /// Runs `loam ctl node-unstage`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let NodeUnstage { volume_id, staging_path } = self;
        let mut node = ctl.node();
        let text = format!("volume {volume_id} unstaged from {staging_path}");
        let request = NodeUnstageVolumeRequest { volume_id, staging_target_path: staging_path };
        ctl.call(node.node_unstage_volume(request)).await?;
        Ok(done(text))
    }
}

impl NodePublish {
    /// Runs `loam ctl node-publish`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let NodePublish { volume_id, target_path, staging_path, read_only, context, cap } = self;
        let mut node = ctl.node();
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
        ctl.call(node.node_publish_volume(request)).await?;
        Ok(done(text))
    }
}

impl NodeUnpublish {
    /// Runs `loam ctl node-unpublish`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let NodeUnpublish { volume_id, target_path } = self;
        let mut node = ctl.node();
        let text = format!("volume {volume_id} unpublished from {target_path}");
        let request = NodeUnpublishVolumeRequest { volume_id, target_path };
        ctl.call(node.node_unpublish_volume(request)).await?;
        Ok(done(text))
    }
}

/// Runs `loam ctl node-info`.
pub(super) async fn node_info(ctl: &Ctl) -> Result<Output> {
    let mut node = ctl.node();
    let r = ctl.call(node.node_get_info(NodeGetInfoRequest {})).await?;
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
    Ok((doc, text))
}

impl NodeStats {
    /// Runs `loam ctl node-stats`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let NodeStats { volume_id, path, staging_path } = self;
        let mut node = ctl.node();
        let request = NodeGetVolumeStatsRequest {
            volume_id,
            volume_path: path,
            staging_target_path: staging_path.unwrap_or_default(),
        };
        let r = ctl.call(node.node_get_volume_stats(request)).await?;
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
        Ok((doc, text))
    }
}

impl NodeExpand {
    /// Runs `loam ctl node-expand`.
    pub(super) async fn run(self, ctl: &Ctl) -> Result<Output> {
        let NodeExpand { volume_id, path, staging_path, size, cap } = self;
        let mut node = ctl.node();
        let text = format!("volume {volume_id} expanded on the node to");
        let request = NodeExpandVolumeRequest {
            volume_id,
            volume_path: path,
            capacity_range: size.range(),
            staging_target_path: staging_path.unwrap_or_default(),
            volume_capability: Some(cap.capability()),
            ..Default::default()
        };
        let r = ctl.call(node.node_expand_volume(request)).await?;
        let doc = json!({ "capacity_bytes": r.capacity_bytes });
        Ok((doc, format!("{text} {}\n", bytes(r.capacity_bytes))))
    }
}
