//! Identity calls: what the plugin is, whether it is ready, and every capability it reports.

use std::fmt::Write as _;

use anyhow::Result;
use loam::csi::*;
use serde_json::json;

use crate::ctl::connect::Ctl;
use crate::ctl::output::{Output, enum_name, list_or_dash, map_lines, plugin_cap};

/// Runs `loam ctl info`.
pub(super) async fn info(ctl: &Ctl) -> Result<Output> {
    let mut identity = ctl.identity();
    let info = ctl.call(identity.get_plugin_info(GetPluginInfoRequest {}));
    let info = info.await?;
    let caps = identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {});
    let caps: Vec<_> = ctl.call(caps).await?.capabilities.iter().filter_map(plugin_cap).collect();
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
    Ok((doc, text))
}

/// Runs `loam ctl probe`.
pub(super) async fn probe(ctl: &Ctl) -> Result<Output> {
    let mut identity = ctl.identity();
    let ready = ctl.call(identity.probe(ProbeRequest {})).await?.ready;
    let text = match ready {
        Some(false) => "not ready\n",
        _ => "ready\n",
    };
    Ok((json!({ "ready": ready }), text.to_owned()))
}

/// Runs `loam ctl capabilities`.
pub(super) async fn capabilities(ctl: &Ctl) -> Result<Output> {
    let mut ctrl = ctl.controller();
    let mut node = ctl.node();
    use controller_service_capability::{Type as C, rpc::Type as CType};
    use node_service_capability::{Type as N, rpc::Type as NType};
    let request = ControllerGetCapabilitiesRequest {};
    let c = ctl.call(ctrl.controller_get_capabilities(request)).await?;
    let n = ctl.call(node.node_get_capabilities(NodeGetCapabilitiesRequest {})).await?;
    let controller: Vec<_> = (c.capabilities.iter().filter_map(|c| c.r#type))
        .map(|C::Rpc(rpc)| enum_name(rpc.r#type, CType::as_str_name))
        .collect();
    let node: Vec<_> = (n.capabilities.iter().filter_map(|c| c.r#type))
        .map(|N::Rpc(rpc)| enum_name(rpc.r#type, NType::as_str_name))
        .collect();
    let text = format!("controller: {}\nnode: {}\n", list_or_dash(&controller), list_or_dash(&node));
    Ok((json!({ "controller": controller, "node": node }), text))
}
