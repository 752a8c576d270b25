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
//! - a snapshot kept off node (`<key>@<node>+<copy node>`): reads go to the
//!   node it was cut on, or to its copy's node when that one cannot be
//!   reached; deletes go to both, the copy first; restores use the copy on
//!   the node the topology asks for, or copy from a holder that answers.
//!   CreateSnapshot of one ([`Router::create_protected_snapshot`]) cuts it on
//!   its volume's node, has another node with room pull a verified copy,
//!   then marks it ready; every step is idempotent and the id records the
//!   choice of node, so a retry after a crash anywhere converges;
//! - listings: every agent, merged ([`super::listing`]); a copy of a
//!   snapshot kept off node is listed by its origin node only, unless that
//!   node's agent is not there;
//! - GetCapacity: the agent of the requested node; without a node segment,
//!   the sum of every reachable agent's capacity, and the largest single
//!   agent's as the maximum volume size (a volume never spans nodes).

use std::future::Future;
use std::sync::Arc;

use tokio::task::JoinSet;
use tonic::{Code, Response, Status};

use crate::api::{CopySnapshotRequest, CreateVolumeFromRequest, CutSnapshotRequest};
use crate::config::TOPOLOGY_NODE_KEY;
use crate::csi;
use crate::error::{Error, Result};
use crate::ids::{Kind, ObjectId, SnapshotId};
use crate::routing::agents::{AgentClient, AgentGroupClient, Agents};
use crate::routing::cluster::{GoneNodes, Verdict};
use crate::routing::listing::{self, Cursor, Page};
use crate::routing::placement::Owner;
use crate::routing::placement::{CopyPlacement, copy_placement, requested_nodes, snapshot_holders};

/// Calls that succeed for an object whose node is gone for good
/// ([`crate::routing::cluster`]): its volumes and snapshots went with it,
/// and nothing is attached to a node that no longer exists.
const GONE_WITH_THE_NODE: &[&str] =
    &["DeleteVolume", "ControllerUnpublishVolume", "DeleteSnapshot", "DeleteVolumeGroupSnapshot"];

/// How often marking a snapshot kept off node ready is tried while its
/// source's export still holds it, and the pause between tries.
const CONFIRM_ATTEMPTS: u32 = 20;
const CONFIRM_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// How often one CreateSnapshot names another node for a snapshot's copy
/// when the one named is gone for good (each of them would have to be).
const RECHOOSE_ROUNDS: u32 = 3;

/// Finds the agent that answers each Controller and GroupController request
/// and passes the request on.
#[derive(Debug, Clone)]
pub struct Router {
    pub(super) agents: Arc<Agents>,
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
    pub(super) async fn unreachable<T: Default>(&self, node: &str, method: &str, unavailable: Error) -> Result<T> {
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
        let ask = csi::GetCapacityRequest {
            volume_capabilities: req.volume_capabilities.clone(),
            parameters: req.parameters.clone(),
            ..Default::default()
        };
        self.free_capacity(ask).await.into_iter().map(|(_, node)| node).collect()
    }

    /// Every reachable agent's free capacity as `ask` asks it, with its
    /// node, most first (ties by node id, so the order is the same each time).
    async fn free_capacity(&self, ask: csi::GetCapacityRequest) -> Vec<(i64, String)> {
        let nodes = self.agents.all().await.into_iter().map(|a| a.node).collect();
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
        free
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
        let is_snapshot =
            matches!(req.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()), Some(Type::Snapshot(_)));
        let mut candidates = match source {
            Some(id) => {
                let holders = self.source_holders(id, is_snapshot).await?;
                match copy_placement(req.accessibility_requirements.as_ref(), &holders) {
                    CopyPlacement::Local(holder) => vec![holder],
                    CopyPlacement::Remote(nodes) => return self.copy_across(req, &holders[0], nodes).await,
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

    /// The nodes holding the source `id` of a new volume, those whose agent
    /// answers first (all of them when none does, so the call names what is
    /// missing); for an id Loam did not make, any one agent, which answers
    /// it as it would locally.
    async fn source_holders(&self, id: &str, is_snapshot: bool) -> Result<Vec<String>> {
        let holders = match is_snapshot {
            true => snapshot_holders(id),
            false => ObjectId::parse(id).map(|id| vec![id.node]).unwrap_or_default(),
        };
        if holders.len() < 2 {
            let owner = holders.into_iter().next().map_or(Owner::Any, Owner::Node);
            return Ok(vec![self.node_of(owner).await?]);
        }
        // Asked, not read from the table: an agent that stopped since the
        // last refresh is still in it, and a copy pulled from it would fail.
        let (mut answering, mut away) = (Vec::new(), Vec::new());
        for holder in holders {
            let ask = csi::ControllerGetCapabilitiesRequest {};
            let probe = |mut c: AgentClient, r| async move { c.controller_get_capabilities(r).await };
            match self.agents.call(&holder, "ControllerGetCapabilities", ask, probe).await {
                Ok(_) => answering.push(holder),
                Err(e) => {
                    tracing::info!(node = %holder, error = %e, "a holder of the snapshot does not answer; using the other");
                    away.push(holder);
                }
            }
        }
        Ok(if answering.is_empty() { away } else { answering })
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
        let ask = CreateVolumeFromRequest { request: Some(req), source_address, source_node: source_node.to_owned() };
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

    /// CreateSnapshot of a snapshot kept off node (VolumeSnapshotClass
    /// `protection: off-node`), validated by the caller: cut on the source
    /// volume's node, which records it not ready under an id naming the node
    /// chosen for the copy (the first of the reachable others with room for
    /// the volume's capacity, most room first, whose id fits); copied by that
    /// node's agent from the first one's (Copies.CopySnapshot, node to
    /// node, verified); then marked ready on the first node. Each step finds
    /// what an earlier attempt did, so the CO's retry converges on the same
    /// copy after a failure or crash anywhere.
    pub async fn create_protected_snapshot(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::CreateSnapshotResponse> {
        let Owner::Node(node) = Owner::of(&req.source_volume_id) else {
            return Err(Error::NotFound(format!(
                "source volume {} does not exist (not an id Loam made)",
                crate::error::quote(&req.source_volume_id)
            )));
        };
        // The room a copy may need: the volume's capacity. A volume deleted
        // since a first attempt cut its snapshot is left to the cut's answer
        // (the snapshot that attempt made, or NOT_FOUND).
        let ask = csi::ControllerGetVolumeRequest { volume_id: req.source_volume_id.clone() };
        let volume = self
            .agents
            .call(&node, "ControllerGetVolume", ask, |mut c, r| async move { c.controller_get_volume(r).await })
            .await;
        let needed = match volume {
            Ok(answer) => answer.volume.map_or(0, |v| v.capacity_bytes),
            Err(e) if e.code() == Code::NotFound => 0,
            Err(e) => return Err(e),
        };
        let copy_nodes = self
            .free_capacity(csi::GetCapacityRequest::default())
            .await
            .into_iter()
            .filter(|(free, other)| *other != node && *free >= needed)
            .map(|(_, other)| other)
            .collect();
        let mut cut = CutSnapshotRequest { request: Some(req.clone()), copy_nodes, ..Default::default() };
        let mut rounds = 0;
        loop {
            let snapshot = self.cut_snapshot(&node, cut.clone()).await?;
            if snapshot.ready_to_use {
                return Ok(csi::CreateSnapshotResponse { snapshot: Some(snapshot) });
            }
            let Some(copy_node) = SnapshotId::parse(&snapshot.snapshot_id).and_then(|id| id.copy) else {
                return Err(Error::FailedPrecondition(format!(
                    "the agent of node {node} answered with snapshot id {}, which names no node for its copy; it runs \
                     a Loam that does not agree with this controller's",
                    crate::error::quote(&snapshot.snapshot_id)
                )));
            };
            let source_address = self.agents.agent(&node).await?.addr.to_string();
            let id = snapshot.snapshot_id.clone();
            let copy = CopySnapshotRequest { snapshot: Some(snapshot), name: req.name.clone(), source_address };
            let copied = self
                .agents
                .call_copies(&copy_node, "CopySnapshot", copy, |mut c, r| async move { c.copy_snapshot(r).await })
                .await;
            let unavailable = match copied {
                Ok(_) => break,
                Err(e) if e.code() == Code::Unavailable && rounds < RECHOOSE_ROUNDS => e,
                Err(e) => return Err(e),
            };
            // The node named for the copy cannot be reached. Gone for good,
            // it never will: the snapshot, not ready yet, names another.
            match self.gone_nodes.as_ref() {
                Some(gone_nodes) => match gone_nodes.verdict(&copy_node).await {
                    Verdict::Gone(_) => {
                        tracing::warn!(snapshot = %id, node = %copy_node, "the node chosen for the snapshot's copy is gone for good; choosing another");
                        cut.gone_copy_node = copy_node;
                        rounds += 1;
                    }
                    Verdict::Missing { left } => {
                        return Err(Error::Unavailable(format!(
                            "{unavailable}; node {copy_node}, chosen for the copy of snapshot {id}, is no longer in \
                             the cluster: in {}s another node is chosen, unless it comes back",
                            left.as_secs()
                        )));
                    }
                    Verdict::Known => return Err(unavailable),
                },
                None => return Err(unavailable),
            }
        }
        let confirm = CutSnapshotRequest { request: Some(req), copy_held: true, ..Default::default() };
        // The source's export lets go of the snapshot when its sending thread
        // ends, which can trail the copy's answer by a moment: a claim still
        // held then is waited out here rather than handed to the CO.
        let mut attempts = 0;
        loop {
            match self.cut_snapshot(&node, confirm.clone()).await {
                Err(e) if e.code() == Code::Aborted && attempts < CONFIRM_ATTEMPTS => {
                    attempts += 1;
                    tokio::time::sleep(CONFIRM_PAUSE).await;
                }
                answer => return answer.map(|snapshot| csi::CreateSnapshotResponse { snapshot: Some(snapshot) }),
            }
        }
    }

    async fn cut_snapshot(&self, node: &str, cut: CutSnapshotRequest) -> Result<csi::Snapshot> {
        let answer = self
            .agents
            .call_copies(node, "CutSnapshot", cut, |mut c, r| async move { c.cut_snapshot(r).await })
            .await?;
        Ok(answer.snapshot.unwrap_or_default())
    }

    /// DeleteSnapshot on every node holding the snapshot: the copy first, so
    /// what a failure in between leaves is still listed by its origin node
    /// and deleted by the retry. A node gone for good is forgiven its part.
    pub async fn delete_snapshot(&self, req: csi::DeleteSnapshotRequest) -> Result<csi::DeleteSnapshotResponse> {
        let call = |mut c: AgentClient, r| async move { c.delete_snapshot(r).await };
        let holders = snapshot_holders(&req.snapshot_id);
        if holders.is_empty() {
            return self.to_owner(Owner::Any, "DeleteSnapshot", req, call).await;
        }
        for node in holders.into_iter().rev() {
            self.to_owner(Owner::Node(node), "DeleteSnapshot", req.clone(), call).await?;
        }
        Ok(csi::DeleteSnapshotResponse {})
    }

    /// A read of one snapshot: from the node it was cut on, or from its
    /// copy's node when that one's agent cannot be reached.
    pub async fn to_snapshot_holder<R, T, F, Fut>(&self, id: &str, method: &'static str, req: R, call: F) -> Result<T>
    where
        R: Clone + Send,
        T: Default,
        F: Fn(AgentClient, R) -> Fut + Send + Sync,
        Fut: Future<Output = std::result::Result<Response<T>, Status>> + Send,
    {
        let holders = snapshot_holders(id);
        let Some((first, others)) = holders.split_first() else {
            return self.to_owner(Owner::Any, method, req, call).await;
        };
        let mut answer = self.agents.call(first, method, req.clone(), &call).await;
        for other in others {
            match answer {
                Err(e) if e.code() == Code::Unavailable => {
                    tracing::info!(node = %first, copy = %other, method, "the snapshot's node cannot be reached; asking its copy's");
                    answer = self.agents.call(other, method, req.clone(), &call).await;
                }
                _ => break,
            }
        }
        answer
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
            // One snapshot at most, from a holder; the token still must be ours.
            Cursor::parse(&req.starting_token)?;
            let id = req.snapshot_id.clone();
            let ask = csi::ListSnapshotsRequest { starting_token: String::new(), ..req };
            let call = |mut c: AgentClient, r| async move { c.list_snapshots(r).await };
            return self.to_snapshot_holder(&id, "ListSnapshots", ask, call).await;
        }
        let nodes = if req.source_volume_id.is_empty() {
            self.agents.all().await.into_iter().map(|a| a.node).collect()
        } else {
            // A volume's snapshots live on its node.
            vec![self.node_of(Owner::of(&req.source_volume_id)).await?]
        };
        let source_volume_id = req.source_volume_id.clone();
        let listed: Arc<Vec<String>> = Arc::new(nodes.clone());
        let (entries, next_token) = self
            .merged(nodes, &req.starting_token, req.max_entries, |agents, node, starting_token, max_entries| {
                let listed = listed.clone();
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
                    // A snapshot kept off node is listed once, by the node it
                    // was cut on; its copy stands in only when that node is
                    // not listed (its agent is away or gone).
                    let listed_by_origin = |e: &csi::list_snapshots_response::Entry| {
                        let id = e.snapshot.as_ref().and_then(|s| SnapshotId::parse(&s.snapshot_id));
                        id.is_some_and(|id| id.node != node && listed.contains(&id.node))
                    };
                    let entries = page.entries.into_iter().filter(|e| !listed_by_origin(e)).collect();
                    Ok(Page { entries, next: page.next_token })
                }
            })
            .await?;
        Ok(csi::ListSnapshotsResponse { entries, next_token })
    }
}

fn no_agents() -> Error {
    Error::Unavailable("no Loam node agent answers; check the loam-node pods and --agents/--agents-service".into())
}
