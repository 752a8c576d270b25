//! Loam: a CSI driver that turns node-local storage into Kubernetes volumes.
//!
//! # Layout
//!
//! A request travels down these layers, and each layer only knows the one below:
//!
//! - [`server`] binds the Unix socket privately, builds the gRPC services the
//!   chosen [`config::Mode`] serves, and drains them on shutdown.
//! - [`rpc`] is the CSI surface: one module per service. Each handler validates
//!   the request ([`rpc::validate`]), and runs the [`driver`] on a blocking
//!   thread holding the per-volume [`guard`] (`rpc::claimed`). Nothing else
//!   happens there.
//! - [`driver`] is the node's volume manager: it keeps the [`store`] of volume
//!   and snapshot records ([`records`]) and decides what a request means for
//!   them, calling a [`backend`] for the storage work.
//! - [`backend`] holds the storage engines, chosen per StorageClass: `dir`, a
//!   directory per volume, and `loop`, an image file per volume on a loop
//!   device. The set is closed: a record holds its volume's
//!   [`records::Layout`] enum and [`backend::Backends`] matches on it once
//!   per step (create, delete, expand, snapshot, stage, unstage, what a
//!   publish binds, stats, condition), so the driver never does. It reads a
//!   volume's layout from a request once ([`backend::parse_layout`]).
//! - [`kernel`] is the narrow seam to the kernel: mounts and the mount table,
//!   loop devices, filesystems on block devices, tree copies with reflinks,
//!   usage accounting, quotas.
//! - [`durable`] makes file changes durable, sharing fsyncs among concurrent
//!   operations (group commit); the store and the backends go through it.
//!
//! In `--mode controller` there is no driver below [`rpc`]: its Controller
//! ([`rpc::routed`]) hands each request to [`routing::router`], which finds
//! the node agent owning the object (read from its id), places new volumes,
//! merges listings, and forwards the call to that agent's endpoint
//! ([`server::run_agent`]) over mutual TLS rooted in the agent token
//! ([`tls`]), presenting the token itself too ([`auth`]).
//!
//! A volume cloned or restored onto another node than its source's is
//! filled node to node: the controller asks the new volume's agent
//! (Loam's own Copies service, [`api`], served by [`rpc::copies`]), which
//! pulls a point-in-time copy from the source's agent over the same channel
//! with a peer's certificate ([`routing::peer`]); [`driver`] cuts, sends,
//! receives and verifies it ([`backend::transfer`]). A group snapshot of
//! volumes on several nodes is cut by the controller ([`routing::groups`])
//! stepping each node's part in turn (Loam's Groups service,
//! [`rpc::group_parts`], over [`driver::HeldPart`]).
//!
//! Cross-cutting: [`error`] is the one error type and its mapping to gRPC
//! codes; [`csi`] and [`api`] the generated wire messages; [`ids`] forms and parses volume, snapshot and group snapshot ids;
//! [`config`] holds the settings and the CSI constants; [`quantity`] is the
//! one size grammar; [`endpoint`] the one endpoint parser; [`failpoint`](mod@failpoint)
//! marks where the crash harness kills the driver; [`metrics`] is the
//! process's Prometheus registry, filled where things happen; [`memory`]
//! gives the heap back after a burst of calls; [`write_order`] is the rule of
//! which volumes a group snapshot can cut at one point in time, on one node or
//! across several.
//!
//! ## Rules
//!
//! - [`kernel`] names only [`durable`]; [`records`] names [`kernel`] for the
//!   typed values it holds (a filesystem type); [`backend`] names only [`kernel`],
//!   [`records`] and [`durable`], never [`driver`]; [`driver`] names the
//!   backends, the kernel, the [`store`] and the [`guard`]s.
//! - [`rpc`] names [`driver`] (which re-exports what a request needs of the
//!   backends, such as [`driver::parse_layout`]) or [`routing`], never
//!   [`backend`] or [`kernel`]; [`routing`] names neither a driver nor storage.
//! - Every layer may name the cross-cutting modules.
//!
//! `tests/layering.rs` reads every `crate::` path in `src/` and fails when a
//! module names a layer these rules do not give it.

pub mod auth;
pub mod backend;
pub mod config;
pub mod driver;
pub mod durable;
pub mod endpoint;
pub mod error;
pub mod failpoint;
pub mod guard;
pub mod ids;
pub mod kernel;
pub mod memory;
pub mod metrics;
pub mod quantity;
pub mod records;
pub mod routing;
pub mod rpc;
pub mod server;
pub mod store;
pub mod tls;
pub mod write_order;

/// The CSI v1.12 messages and services, generated from `proto/csi.proto`.
#[allow(clippy::all, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// Loam's own API between its processes (copies between nodes), generated
/// from `proto/loam.proto`.
#[allow(clippy::all, missing_docs)]
pub mod api {
    include!(concat!(env!("OUT_DIR"), "/api/loam.v1.rs"));
}
