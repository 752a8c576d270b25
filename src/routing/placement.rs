//! Which node owns a request's objects, and which nodes a new volume may go
//! to, in the order to try them.

use std::collections::BTreeSet;

use crate::config::TOPOLOGY_NODE_KEY;
use crate::csi;
use crate::ids::{ObjectId, SnapshotId};

/// Who owns the object a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// The node named in the id.
    Node(String),
    /// Nobody: the id is not one Loam made, so any agent answers it the same
    /// way (a validation error, NOT_FOUND, or an idempotent success).
    Any,
}

impl Owner {
    /// The owner of a volume or snapshot id.
    pub fn of(id: &str) -> Owner {
        ObjectId::parse(id).map_or(Owner::Any, |id| Owner::Node(id.node))
    }
}

/// The nodes holding a snapshot: the node it was cut on, then, for one kept
/// off node, the node of its copy. Empty for an id Loam did not make.
pub fn snapshot_holders(id: &str) -> Vec<String> {
    SnapshotId::parse(id).map(|id| id.holders().map(str::to_owned).collect()).unwrap_or_default()
}

/// Where a group snapshot is cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupPlace {
    /// On the one node its source volumes live on (ids Loam did not make
    /// name none; their agent refuses them).
    One(Owner),
    /// Across these nodes, in order; the first coordinates.
    Across(Vec<String>),
}

/// Where a group snapshot of `source_volume_ids` is cut.
pub fn group_place(source_volume_ids: &[String]) -> GroupPlace {
    let nodes: BTreeSet<String> =
        source_volume_ids.iter().filter_map(|id| ObjectId::parse(id)).map(|id| id.node).collect();
    let mut nodes: Vec<String> = nodes.into_iter().collect();
    match nodes.len() {
        0 => GroupPlace::One(Owner::Any),
        1 => GroupPlace::One(Owner::Node(nodes.remove(0))),
        _ => GroupPlace::Across(nodes),
    }
}

/// The nodes a topology requirement names: the preferred ones that are
/// within the requisite ones first, in their order, then the rest of the
/// requisite ones. Empty when the requirement names no node.
pub fn requested_nodes(requirement: Option<&csi::TopologyRequirement>) -> Vec<String> {
    let Some(requirement) = requirement else { return Vec::new() };
    let node = |t: &csi::Topology| t.segments.get(TOPOLOGY_NODE_KEY).cloned();
    let requisite: Vec<String> = requirement.requisite.iter().filter_map(node).collect();
    let mut nodes: Vec<String> = Vec::new();
    let preferred = requirement.preferred.iter().filter_map(node);
    for candidate in preferred.filter(|n| requisite.is_empty() || requisite.contains(n)).chain(requisite.clone()) {
        if !nodes.contains(&candidate) {
            nodes.push(candidate);
        }
    }
    nodes
}

/// Where a copy of a volume or snapshot goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyPlacement {
    /// On this node, which holds the source: a local copy, instant where the
    /// root can reflink or snapshot.
    Local(String),
    /// On one of these nodes, in the order to try them: the topology
    /// requirement rules out every node holding the source.
    Remote(Vec<String>),
}

/// Where a copy of a source held by `holders` goes: on a holder whenever
/// the requirement allows one (no requirement, only preferences, or a
/// requisite naming it), the first in the requirement's order, else the
/// first of `holders`; otherwise on the requested nodes.
pub fn copy_placement(requirement: Option<&csi::TopologyRequirement>, holders: &[String]) -> CopyPlacement {
    let node = |t: &csi::Topology| t.segments.get(TOPOLOGY_NODE_KEY).cloned();
    let requisite: Vec<String> = requirement.map(|r| r.requisite.iter().filter_map(node).collect()).unwrap_or_default();
    let allowed: Vec<&String> = holders.iter().filter(|h| requisite.is_empty() || requisite.contains(h)).collect();
    let requested = requested_nodes(requirement);
    match requested.iter().find(|n| allowed.contains(n)).or(allowed.first().copied()) {
        Some(holder) => CopyPlacement::Local(holder.clone()),
        None => CopyPlacement::Remote(requested),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(node: &str) -> csi::Topology {
        csi::Topology { segments: [(TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())].into() }
    }

    #[test]
    fn preferred_come_first_but_only_within_requisite() {
        let req = csi::TopologyRequirement {
            requisite: vec![on("a"), on("b"), on("c")],
            preferred: vec![on("c"), on("x"), on("a")],
        };
        assert_eq!(requested_nodes(Some(&req)), ["c", "a", "b"]);
        let preferred_only = csi::TopologyRequirement { requisite: vec![], preferred: vec![on("b"), on("a")] };
        assert_eq!(requested_nodes(Some(&preferred_only)), ["b", "a"]);
        let other_key = csi::Topology { segments: [("zone".to_owned(), "z1".to_owned())].into() };
        let unrelated = csi::TopologyRequirement { requisite: vec![other_key], preferred: vec![] };
        assert!(requested_nodes(Some(&unrelated)).is_empty());
        assert!(requested_nodes(None).is_empty());
    }

    #[test]
    fn copies_stay_on_their_source_node_unless_the_topology_rules_it_out() {
        let req = |requisite: &[&str], preferred: &[&str]| csi::TopologyRequirement {
            requisite: requisite.iter().map(|n| on(n)).collect(),
            preferred: preferred.iter().map(|n| on(n)).collect(),
        };
        let a = ["a".to_owned()];
        let local = |n: &str| CopyPlacement::Local(n.into());
        assert_eq!(copy_placement(None, &a), local("a"));
        assert_eq!(copy_placement(Some(&req(&[], &["b"])), &a), local("a"), "a preference is a hint");
        assert_eq!(copy_placement(Some(&req(&["b", "a"], &["b"])), &a), local("a"));
        // WaitForFirstConsumer with strict topology: the scheduler's node only.
        assert_eq!(copy_placement(Some(&req(&["b"], &["b"])), &a), CopyPlacement::Remote(vec!["b".into()]));
        assert_eq!(
            copy_placement(Some(&req(&["b", "c"], &["c"])), &a),
            CopyPlacement::Remote(vec!["c".into(), "b".into()])
        );
    }

    #[test]
    fn a_snapshot_kept_off_node_is_restored_from_the_copy_the_topology_asks_for() {
        let req = |requisite: &[&str], preferred: &[&str]| csi::TopologyRequirement {
            requisite: requisite.iter().map(|n| on(n)).collect(),
            preferred: preferred.iter().map(|n| on(n)).collect(),
        };
        let both = ["a".to_owned(), "b".to_owned()];
        let local = |n: &str| CopyPlacement::Local(n.into());
        assert_eq!(copy_placement(None, &both), local("a"), "the first holder (the router lists reachable ones first)");
        assert_eq!(copy_placement(Some(&req(&["b"], &["b"])), &both), local("b"), "the copy on the node asked");
        assert_eq!(copy_placement(Some(&req(&[], &["b"])), &both), local("b"), "a preferred holder");
        assert_eq!(copy_placement(Some(&req(&["a", "b"], &["b"])), &both), local("b"));
        assert_eq!(copy_placement(Some(&req(&["c"], &["c"])), &both), CopyPlacement::Remote(vec!["c".into()]));
        // Only b's agent answers: a restore anywhere else copies from b.
        let b = ["b".to_owned()];
        assert_eq!(copy_placement(None, &b), local("b"));
        assert_eq!(copy_placement(Some(&req(&["a"], &["a"])), &b), CopyPlacement::Remote(vec!["a".into()]));

        let key = "0123456789abcdef0123456789abcdef";
        assert_eq!(snapshot_holders(&format!("{key}@a+b")), ["a", "b"]);
        assert_eq!(snapshot_holders(&format!("{key}@a")), ["a"]);
        assert!(snapshot_holders("fake-snapshot-id").is_empty());
    }

    #[test]
    fn a_group_is_cut_on_the_one_node_of_its_sources_or_across_them_all() {
        let ids = |nodes: &[&str]| -> Vec<String> {
            nodes.iter().map(|n| if n.is_empty() { "fake".into() } else { format!("{}@{n}", "0".repeat(32)) }).collect()
        };
        assert_eq!(group_place(&ids(&["a", "a", ""])), GroupPlace::One(Owner::Node("a".into())));
        assert_eq!(group_place(&ids(&[""])), GroupPlace::One(Owner::Any));
        assert_eq!(group_place(&[]), GroupPlace::One(Owner::Any));
        let across = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        assert_eq!(group_place(&ids(&["c", "a", "b", "a"])), GroupPlace::Across(across));
    }

    #[test]
    fn owners_are_read_from_ids() {
        assert_eq!(Owner::of("0123456789abcdef0123456789abcdef@node-1"), Owner::Node("node-1".into()));
        assert_eq!(Owner::of("fake-vol-id"), Owner::Any);
        assert_eq!(Owner::of(""), Owner::Any);
    }
}
