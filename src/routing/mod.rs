//! The controller's view of the node agents: where they are, which node each
//! serves, and how a request reaches the one that owns its object.
//!
//! Volume and snapshot ids end in `@<node-id>` ([`crate::ids`]), so the owner
//! of any existing object is read from its id: one call, no fan-out. Only
//! what has no owner yet (a new volume without a content source) or spans
//! every node (listings, capacity without a segment) asks several agents.
//! Nothing here is persisted: a restarted controller rediscovers the agents.

pub mod agents;
pub mod cluster;
pub mod discovery;
pub mod groups;
pub mod kube;
pub mod listing;
pub mod moves;
pub mod node_loss;
pub mod peer;
pub mod placement;
pub mod router;
