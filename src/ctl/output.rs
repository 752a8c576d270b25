//! What `loam ctl` prints: readable text (lines and tables, sizes in binary units)
//! and, for `--json`, the JSON form of each CSI message.

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::{Result, anyhow};
use loam::csi::volume_capability::{AccessType, access_mode};
use loam::csi::*;
use serde_json::{Value, json};

use loam::config::TOPOLOGY_NODE_KEY;

/// A command's result: its JSON document and its readable text.
pub(super) type Output = (Value, String);

/// The result of a command whose response has no fields.
pub(super) fn done(text: String) -> Output {
    (json!({}), text + "\n")
}

/// Formats a byte count in binary units with one decimal, e.g. `64.0 MiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let (mut value, mut unit) = (n as f64 / 1024.0, 0);
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Formats a protobuf size; a negative one is shown as is.
pub(super) fn bytes(n: i64) -> String {
    u64::try_from(n).map_or_else(|_| n.to_string(), human_bytes)
}

/// The node a volume lives on, if its topology says.
pub(super) fn volume_node(v: &Volume) -> Option<&str> {
    v.accessible_topology.iter().find_map(|t| t.segments.get(TOPOLOGY_NODE_KEY)).map(String::as_str)
}

/// The name of a protobuf enum value, or `UNKNOWN(n)` for a value this build lacks.
pub(super) fn enum_name<E: TryFrom<i32>>(value: i32, name: fn(&E) -> &'static str) -> String {
    E::try_from(value).map_or_else(|_| format!("UNKNOWN({value})"), |e| name(&e).to_owned())
}

/// A plugin capability as (field name, value name).
pub(super) fn plugin_cap(cap: &PluginCapability) -> Option<(&'static str, String)> {
    use plugin_capability::{Type, service, volume_expansion};
    Some(match cap.r#type? {
        Type::Service(s) => ("service", enum_name(s.r#type, service::Type::as_str_name)),
        Type::VolumeExpansion(e) => ("volume_expansion", enum_name(e.r#type, volume_expansion::Type::as_str_name)),
    })
}

/// Indented `label: key=value` lines, sorted by key.
pub(super) fn map_lines(label: &str, map: &HashMap<String, String>) -> String {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort();
    entries.iter().map(|(k, v)| format!("  {label}: {k}={v}\n")).collect()
}

/// A comma-separated list, or `-` when empty.
pub(super) fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() { "-".to_owned() } else { items.join(", ") }
}

/// A readable volume condition.
pub(super) fn condition_text(c: Option<&VolumeCondition>) -> String {
    match c {
        None => "-".to_owned(),
        Some(c) if c.abnormal => format!("abnormal: {}", c.message),
        Some(c) if c.message.is_empty() => "ok".to_owned(),
        Some(c) => format!("ok: {}", c.message),
    }
}

/// A volume's summary line, content source and context.
pub(super) fn volume_text(v: &Volume, verb: &str) -> String {
    use volume_content_source::Type;
    let on = volume_node(v).map_or(String::new(), |n| format!(" on node {n}"));
    let mut text = format!("volume {}{verb}: {}{on}\n", v.volume_id, bytes(v.capacity_bytes));
    match v.content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
        Some(Type::Snapshot(s)) => text += &format!("  source: snapshot {}\n", s.snapshot_id),
        Some(Type::Volume(s)) => text += &format!("  source: volume {}\n", s.volume_id),
        None => {}
    }
    text + &map_lines("context", &v.volume_context)
}

/// JSON for a volume.
pub(super) fn volume_json(v: &Volume) -> Value {
    use volume_content_source::Type;
    let source = v.content_source.as_ref().and_then(|s| s.r#type.as_ref()).map(|t| match t {
        Type::Snapshot(s) => json!({ "snapshot": { "snapshot_id": s.snapshot_id } }),
        Type::Volume(s) => json!({ "volume": { "volume_id": s.volume_id } }),
    });
    let topology: Vec<_> = v.accessible_topology.iter().map(|t| json!({ "segments": t.segments })).collect();
    json!({
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "volume_context": v.volume_context,
        "content_source": source,
        "accessible_topology": topology,
    })
}

/// JSON for a volume condition.
pub(super) fn condition_json(c: &VolumeCondition) -> Value {
    json!({ "abnormal": c.abnormal, "message": c.message })
}

/// JSON for a volume status.
pub(super) fn status_json(published: &[String], condition: Option<&VolumeCondition>) -> Value {
    json!({ "published_node_ids": published, "volume_condition": condition.map(condition_json) })
}

/// JSON for a volume capability.
pub(super) fn capability_json(c: &VolumeCapability) -> Value {
    let mode = c.access_mode.map(|m| enum_name(m.mode, access_mode::Mode::as_str_name));
    let access_type = match &c.access_type {
        Some(AccessType::Block(_)) => json!({ "block": {} }),
        Some(AccessType::Mount(m)) => json!({ "mount": {
            "fs_type": m.fs_type, "mount_flags": m.mount_flags, "volume_mount_group": m.volume_mount_group,
        }}),
        None => Value::Null,
    };
    json!({ "access_mode": { "mode": mode }, "access_type": access_type })
}

/// JSON for a snapshot.
pub(super) fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "creation_time": s.creation_time.map(|t| t.to_string()),
        "ready_to_use": s.ready_to_use,
        "group_snapshot_id": s.group_snapshot_id,
    })
}

/// The output of a command that returns one snapshot.
pub(super) fn snapshot_output(snapshot: Option<Snapshot>, verb: &str) -> Result<Output> {
    let s = snapshot.ok_or_else(|| anyhow!("the plugin returned no snapshot"))?;
    let ready = if s.ready_to_use { "ready" } else { "not ready" };
    let (id, volume, size) = (&s.snapshot_id, &s.source_volume_id, bytes(s.size_bytes));
    let text = format!("snapshot {id} of volume {volume}{verb}: {size}, {ready}\n");
    Ok((json!({ "snapshot": snapshot_json(&s) }), text))
}

/// JSON for a group snapshot.
fn group_snapshot_json(g: &VolumeGroupSnapshot) -> Value {
    json!({
        "group_snapshot_id": g.group_snapshot_id,
        "snapshots": g.snapshots.iter().map(snapshot_json).collect::<Vec<_>>(),
        "creation_time": g.creation_time.map(|t| t.to_string()),
        "ready_to_use": g.ready_to_use,
    })
}

/// The output of a command that returns one group snapshot: a summary line,
/// then a line per snapshot.
pub(super) fn group_snapshot_output(group: Option<VolumeGroupSnapshot>, verb: &str) -> Result<Output> {
    let g = group.ok_or_else(|| anyhow!("the plugin returned no group snapshot"))?;
    let ready = if g.ready_to_use { "ready" } else { "not ready" };
    let mut text = format!("group snapshot {}{verb}: {} snapshots, {ready}\n", g.group_snapshot_id, g.snapshots.len());
    for s in &g.snapshots {
        writeln!(text, "  snapshot {} of volume {}: {}", s.snapshot_id, s.source_volume_id, bytes(s.size_bytes))?;
    }
    Ok((json!({ "group_snapshot": group_snapshot_json(&g) }), text))
}

/// The output of a list command: a table, plus the next token of a single page.
pub(super) fn list_output(
    header: &[&str],
    rows: Vec<Vec<String>>,
    entries: Vec<Value>,
    next: String,
    page: bool,
) -> Output {
    let mut text = table(header, &rows);
    if page && !next.is_empty() {
        text += &format!("next token: {next}\n");
    }
    (json!({ "entries": entries, "next_token": next }), text)
}

/// Left-aligned columns two spaces apart.
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let cells: Vec<_> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        cells.join("  ").trim_end().to_owned() + "\n"
    };
    let body: String = rows.iter().map(|row| line(row.iter().map(String::as_str).collect())).collect();
    line(header.to_vec()) + &body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::args::node_topology;

    #[test]
    fn human_sizes() {
        let cases = [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (64 << 20, "64.0 MiB")];
        for (n, want) in cases.into_iter().chain([((1 << 20) - 1, "1.0 MiB"), (u64::MAX, "16.0 EiB")]) {
            assert_eq!(human_bytes(n), want);
        }
        assert_eq!(bytes(-1), "-1");
    }

    #[test]
    fn group_snapshot_text() {
        let snapshot = |id: &str, volume: &str| Snapshot {
            snapshot_id: id.into(),
            source_volume_id: volume.into(),
            size_bytes: 1 << 20,
            ready_to_use: true,
            group_snapshot_id: "g1".into(),
            ..Default::default()
        };
        let g = VolumeGroupSnapshot {
            group_snapshot_id: "g1".into(),
            snapshots: vec![snapshot("s1", "v1"), snapshot("s2", "v2")],
            ready_to_use: true,
            ..Default::default()
        };
        let (doc, text) = group_snapshot_output(Some(g), " created").unwrap();
        let want = "group snapshot g1 created: 2 snapshots, ready\n  snapshot s1 of volume v1: 1.0 MiB\n  snapshot s2 \
                    of volume v2: 1.0 MiB\n";
        assert_eq!(text, want);
        assert_eq!(doc["group_snapshot"]["snapshots"][1]["group_snapshot_id"], "g1");
        assert!(group_snapshot_output(None, "").is_err());
    }

    #[test]
    fn readable_output() {
        let rows = [vec!["vol-1".to_owned(), "1.0 GiB".to_owned()], vec!["v".to_owned(), "-".to_owned()]];
        assert_eq!(table(&["ID", "SIZE"], &rows), "ID     SIZE\nvol-1  1.0 GiB\nv      -\n");
        let volume_context = HashMap::from([("b".into(), "2".into()), ("a".into(), "1".into())]);
        let topology = vec![node_topology("x")];
        let v = Volume {
            volume_id: "v1".into(),
            capacity_bytes: 64 << 20,
            volume_context,
            accessible_topology: topology,
            ..Default::default()
        };
        let want = "volume v1 created: 64.0 MiB on node x\n  context: a=1\n  context: b=2\n";
        assert_eq!(volume_text(&v, " created"), want);
        assert_eq!(volume_json(&v)["accessible_topology"][0]["segments"][TOPOLOGY_NODE_KEY], "x");
    }
}
