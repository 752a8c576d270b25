//! What a running driver is told at start-up.

use std::path::PathBuf;

/// Which services one `loam serve` process offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity, Controller and Node in one process, for a single machine.
    All,
    /// A node agent: Identity and Node on the kubelet's socket, and the
    /// node-local Controller work on a TCP endpoint behind mutual TLS and
    /// the agent token.
    Node,
    /// The central controller: Identity and a Controller that routes every
    /// request to the node agent owning its volume or snapshot.
    Controller,
}

/// Whether directory volumes get their capacity enforced by a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuotaMode {
    /// Enforce where the root's filesystem can; say where it cannot.
    Auto,
    /// Enforce or refuse to create directory volumes; enables btrfs quotas.
    Required,
    /// Never enforce (capacities are only recorded).
    Off,
}

/// Settings shared by every layer of a running driver.
#[derive(Debug, Clone)]
pub struct Config {
    /// The name the driver registers under (a StorageClass's `provisioner`).
    pub driver_name: String,
    /// This node's id, as reported by NodeGetInfo and encoded in volume ids.
    pub node_id: String,
    /// The directory that holds every volume, snapshot and record.
    pub root: PathBuf,
    /// How many volumes may be attached to this node; 0 means no limit.
    pub max_volumes_per_node: u32,
    /// Whether directory volume capacities are enforced.
    pub quota: QuotaMode,
}

/// The topology key whose value names the node a volume lives on.
pub const TOPOLOGY_NODE_KEY: &str = "topology.loam.csi.dev/node";

/// Keys Kubernetes adds for itself (the sidecars: secrets, PVC names, fstype;
/// the kubelet: an inline volume's pod); never meant for the driver, so never refused.
pub const CO_PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";

/// The git revision this binary was built from (`unknown` when built
/// outside a checkout without `LOAM_GIT_REVISION`).
pub const GIT_REVISION: &str = env!("LOAM_GIT_REVISION");

/// The version as GetPluginInfo reports it: the release, with the revision as
/// semver build metadata.
pub const VENDOR_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("LOAM_GIT_REVISION"));
