//! Where each request of the routed Controller goes, and how answers from
//! several agents become one: placement of new volumes, capacity sums and
//! merged listings.
//!
//! - an existing volume or snapshot: the node in its id;
//! - a new volume with a content source: the source's node (a local copy)
//!   unless the topology requirement rules it out; then the nodes it names,
//!   preferred first within requisite, whose agent pulls the copy from the
//!   source's agent (Copies.CreateVolumeFrom: the data goes node to node);
//! - a new volume without: with a topology requirement, the nodes it names,
//!   preferred first within requisite; without, the agents by free
//!   capacity, largest first. The next candidate is tried only when one answers
//!   RESOURCE_EXHAUSTED, and a retried request goes back to the node that
//!   already holds a volume of that name;
//! - listings: every agent, merged ([`super::listing`]);
//! - GetCapacity: the agent of the requested node; without a node segment,
//!   the sum of every reachable agent's capacity, and the largest single
//!   agent's as the maximum volume size (a volume never spans nodes).

use std::future::Future;
use std::sync::Arc;

use tokio::task::JoinSet;
use tonic::{Code, Response, Status};

use crate::api::CreateVolumeFromRequest;
use crate::config::TOPOLOGY_NODE_KEY;
use crate::csi;
use crate::error::{Error, Result};
use crate::ids::{Kind, ObjectId};
use crate::routing::agents::{AgentClient, AgentGroupClient, Agents};
use crate::routing::cluster::{GoneNodes, Verdict};
use crate::routing::listing::{self, Cursor, Page};
use crate::routing::placement::Owner;
use crate::routing::placement::{CopyPlacement, copy_placement, requested_nodes};

/// Calls that succeed for an object whose node is gone for good
/// ([`crate::routing::cluster`]): its volumes and snapshots went with it,
/// and nothing is attached to a node that no longer exists.
const GONE_WITH_THE_NODE: &[&str] =
    &["DeleteVolume", "ControllerUnpublishVolume", "DeleteSnapshot", "DeleteVolumeGroupSnapshot"];

/// Finds the agent that answers each Controller and GroupController request
/// and passes the request on.
#[derive(Debug, Clone)]
pub struct Router {
    agents: Arc<Agents>,
    gone_nodes: Option<Arc<GoneNodes>>,
}

impl Router {
    /// Routes requests to `agents`; `gone_nodes` judges unreachable nodes.
    pub fn new(agents: Arc<Agents>, gone_nodes: Option<Arc<GoneNodes>>) -> Self {
        Router { agents, gone_nodes }
    }

    /// What an unreachable `node` means for `method`: success when the node
    /// is gone for good and the call only takes away what was on it; the
    /// agent's unavailability otherwise, with how long until that changes.
    async fn unreachable<T: Default>(&self, node: &str, method: &str, unavailable: Error) -> Result<T> {
        let Some(gone_nodes) = self.gone_nodes.as_ref().filter(|_| GONE_WITH_THE_NODE.contains(&method)) else {
            return Err(unavailable);
        };
        match gone_nodes.verdict(node).await {
            Verdict::Gone(missing) => {
                tracing::warn!(
                    %node,
                    method,
                    missing_for = ?missing,
                    "node is no longer in the cluster: what was on it is gone with it; answering success"
                );
                Ok(T::default())
            }
            Verdict::Missing { left } => Err(Error::Unavailable(format!(
                "{unavailable}; node {node} is no longer in the cluster, so in {}s this call succeeds (its data \
                 went with the node), unless it comes back",
                left.as_secs()
            ))),
            Verdict::Known => Err(unavailable),
        }
    }

    /// The node that answers for `owner`: the owner, or the first agent.
    async fn node_of(&self, owner: Owner) -> Result<String> {
        match owner {
            Owner::Node(node) => Ok(node),
            Owner::Any => self.agents.all().await.into_iter().next().map(|a| a.node).ok_or_else(no_agents),
        }
    }

    /// Passes a request on to the agent of `owner`.
    pub async fn to_owner<R, T, F, Fut>(&self, owner: Owner, method: &'static str, req: R, call: F) -> Result<T>
    where
        R: Clone + Send,
        T: Default,
        F: Fn(AgentClient, R) -> Fut + Send + Sync,
        Fut: Future<Output = std::result::Result<Response<T>, Status>> + Send,
    {
        let node = self.node_of(owner).await?;
        match self.agents.call(&node, method, req, call).await {
            Err(e) if e.code() == Code::Unavailable => self.unreachable(&node, method, e).await,
            answer => answer,
        }
    }

    /// Passes a group snapshot request on to the agent of `owner`.
    pub async fn group_to_owner<R, T, F, Fut>(&self, owner: Owner, method: &'static str, req: R, call: F) -> Result<T>
    where
        R: Clone + Send,
        T: Default,
        F: Fn(AgentGroupClient, R) -> Fut + Send + Sync,
        Fut: Future<Output = std::result::Result<Response<T>, Status>> + Send,
    {
        let node = self.node_of(owner).await?;
        match self.agents.call_group(&node, method, req, call).await {
            Err(e) if e.code() == Code::Unavailable => self.unreachable(&node, method, e).await,
            answer => answer,
        }
    }

    /// Runs `call` on every node in `nodes` at once; results in node order.
    async fn each<T, F, Fut>(&self, nodes: Vec<String>, call: F) -> Vec<(String, Result<T>)>
    where
        T: Send + 'static,
        F: Fn(Arc<Agents>, String) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let mut calls = JoinSet::new();
        for node in nodes {
            let answer = call(self.agents.clone(), node.clone());
            calls.spawn(async move { (node, answer.await) });
        }
        let mut answers: Vec<_> = calls.join_all().await;
        answers.sort_by(|a, b| a.0.cmp(&b.0));
        answers
    }

    /// Every reachable agent's node, most free capacity for `req` first.
    async fn by_free_capacity(&self, req: &csi::CreateVolumeRequest) -> Vec<String> {
        let nodes = self.agents.all().await.into_iter().map(|a| a.node).collect();
        let ask = csi::GetCapacityRequest {
            volume_capabilities: req.volume_capabilities.clone(),
            parameters: req.parameters.clone(),
            ..Default::default()
        };
        let mut free: Vec<(i64, String)> = self
            .each(nodes, |agents, node| {
                let ask = ask.clone();
                async move {
                    agents.call(&node, "GetCapacity", ask, |mut c, r| async move { c.get_capacity(r).await }).await
                }
            })
            .await
            .into_iter()
            .filter_map(|(node, answer)| answer.ok().map(|c| (c.available_capacity, node)))
            .collect();
        free.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        free.into_iter().map(|(_, node)| node).collect()
    }

    /// The node among `nodes` that already holds a volume called `name`.
    async fn holding(&self, name: &str, nodes: &[String]) -> Option<String> {
        self.each(nodes.to_vec(), |agents, node| {
            let volume_id = ObjectId::for_name(Kind::Volume, name, &node).to_string();
            let ask = csi::ControllerGetVolumeRequest { volume_id };
            async move {
                agents
                    .call(&node, "ControllerGetVolume", ask, |mut c, r| async move { c.controller_get_volume(r).await })
                    .await
            }
        })
        .await
        .into_iter()
        .find_map(|(node, answer)| answer.is_ok().then_some(node))
    }

    /// CreateVolume on the first candidate node with room: the content
    /// source's node, the requested nodes, or every agent by free capacity.
    pub async fn create_volume(&self, req: csi::CreateVolumeRequest) -> Result<csi::CreateVolumeResponse> {
        use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
        let source = req.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()).map(|t| match t {
            Type::Snapshot(SnapshotSource { snapshot_id: id }) | Type::Volume(VolumeSource { volume_id: id }) => id,
        });
        let mut candidates = match source {
            Some(id) => {
                let owner = self.node_of(Owner::of(id)).await?;
                match copy_placement(req.accessibility_requirements.as_ref(), &owner) {
                    CopyPlacement::Local => vec![owner],
                    CopyPlacement::Remote(nodes) => return self.copy_across(req, &owner, nodes).await,
                }
            }
            None => match requested_nodes(req.accessibility_requirements.as_ref()) {
                requested if requested.is_empty() => self.by_free_capacity(&req).await,
                requested => requested,
            },
        };
        if candidates.len() > 1
            && !req.name.is_empty()
            && let Some(node) = self.holding(&req.name, &candidates).await
        {
            candidates = vec![node];
        }
        let mut last = no_agents();
        for node in candidates {
            let answer = self
                .agents
                .call(&node, "CreateVolume", req.clone(), |mut c, r| async move { c.create_volume(r).await })
                .await;
            match answer {
                Err(e) if e.code() == Code::ResourceExhausted => last = e,
                answer => return answer,
            }
        }
        Err(last)
    }

    /// CreateVolume on the first of `nodes` with room, filled from the
    /// source on `source_node` by the new volume's agent.
    async fn copy_across(
        &self,
        req: csi::CreateVolumeRequest,
        source_node: &str,
        mut nodes: Vec<String>,
    ) -> Result<csi::CreateVolumeResponse> {
        let source_address = self.agents.agent(source_node).await?.addr.to_string();
        if nodes.len() > 1
            && !req.name.is_empty()
            && let Some(node) = self.holding(&req.name, &nodes).await
        {
            nodes = vec![node];
        }
        let ask = CreateVolumeFromRequest { request: Some(req), source_address };
        let mut last = no_agents();
        for node in nodes {
            let answer =
                self.agents
                    .call_copies(&node, "CreateVolumeFrom", ask.clone(), |mut c, r| async move {
                        c.create_volume_from(r).await
                    })
                    .await;
            match answer {
                Err(e) if e.code() == Code::ResourceExhausted => last = e,
                answer => return answer,
            }
        }
        Err(last)
    }

    /// GetCapacity of the requested node, or summed over every agent.
    pub async fn get_capacity(&self, req: csi::GetCapacityRequest) -> Result<csi::GetCapacityResponse> {
        let call = |agents: Arc<Agents>, node: String, req: csi::GetCapacityRequest| async move {
            agents.call(&node, "GetCapacity", req, |mut c, r| async move { c.get_capacity(r).await }).await
        };
        if let Some(node) = req.accessible_topology.as_ref().and_then(|t| t.segments.get(TOPOLOGY_NODE_KEY)) {
            return call(self.agents.clone(), node.clone(), req.clone()).await;
        }
        let nodes = self.agents.all().await.into_iter().map(|a| a.node).collect();
        let answers = self.each(nodes, |agents, node| call(agents, node, req.clone())).await;
        let mut total: Option<csi::GetCapacityResponse> = None;
        let mut failure = no_agents();
        for (node, answer) in answers {
            match answer {
                Ok(c) => {
                    let sum = total.get_or_insert_with(Default::default);
                    sum.available_capacity = sum.available_capacity.saturating_add(c.available_capacity);
                    sum.maximum_volume_size = sum.maximum_volume_size.max(c.maximum_volume_size);
                }
                Err(e) => {
                    tracing::warn!(%node, error = %e, "capacity left out");
                    failure = e;
                }
            }
        }
        total.ok_or(failure)
    }

    /// Merges a listing over `nodes`; `list` lists one node.
    async fn merged<E, F, Fut>(&self, nodes: Vec<String>, token: &str, max: i32, list: F) -> Result<(Vec<E>, String)>
    where
        F: Fn(Arc<Agents>, String, String, i32) -> Fut,
        Fut: Future<Output = Result<Page<E>>>,
    {
        listing::merge(&nodes, token, max, |node, inner, room| list(self.agents.clone(), node, inner, room)).await
    }

    /// ListVolumes merged over every agent.
    pub async fn list_volumes(&self, req: csi::ListVolumesRequest) -> Result<csi::ListVolumesResponse> {
        let nodes = self.agents.all().await.into_iter().map(|a| a.node).collect();
        let (entries, next_token) = self
            .merged(
                nodes,
                &req.starting_token,
                req.max_entries,
                |agents, node, starting_token, max_entries| async move {
                    let ask = csi::ListVolumesRequest { max_entries, starting_token };
                    let page = agents
                        .call(&node, "ListVolumes", ask, |mut c, r| async move { c.list_volumes(r).await })
                        .await?;
                    Ok(Page { entries: page.entries, next: page.next_token })
                },
            )
            .await?;
        Ok(csi::ListVolumesResponse { entries, next_token })
    }

    /// ListSnapshots from the snapshot's or the volume's node, or merged
    /// over every agent.
    pub async fn list_snapshots(&self, req: csi::ListSnapshotsRequest) -> Result<csi::ListSnapshotsResponse> {
        if !req.snapshot_id.is_empty() {
            // One snapshot at most, from its owner; the token still must be ours.
            Cursor::parse(&req.starting_token)?;
            let node = self.node_of(Owner::of(&req.snapshot_id)).await?;
            let ask = csi::ListSnapshotsRequest { starting_token: String::new(), ..req };
            return self
                .agents
                .call(&node, "ListSnapshots", ask, |mut c, r| async move { c.list_snapshots(r).await })
                .await;
        }
        let nodes = if req.source_volume_id.is_empty() {
            self.agents.all().await.into_iter().map(|a| a.node).collect()
        } else {
            // A volume's snapshots live on its node.
            vec![self.node_of(Owner::of(&req.source_volume_id)).await?]
        };
        let source_volume_id = req.source_volume_id.clone();
        let (entries, next_token) = self
            .merged(nodes, &req.starting_token, req.max_entries, |agents, node, starting_token, max_entries| {
                let ask = csi::ListSnapshotsRequest {
                    max_entries,
                    starting_token,
                    source_volume_id: source_volume_id.clone(),
                    ..Default::default()
                };
                async move {
                    let page = agents
                        .call(&node, "ListSnapshots", ask, |mut c, r| async move { c.list_snapshots(r).await })
                        .await?;
                    Ok(Page { entries: page.entries, next: page.next_token })
                }
            })
            .await?;
        Ok(csi::ListSnapshotsResponse { entries, next_token })
    }
}

fn no_agents() -> Error {
    Error::Unavailable("no Loam node agent answers; check the loam-node pods and --agents/--agents-service".into())
}
