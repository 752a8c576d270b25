//! Group snapshots on the controller: cutting one whose volumes live on
//! several nodes, and reading and deleting any group by its coordinator's
//! record.
//!
//! A group's id names its coordinator (`<key>@<node>`): for a group cut
//! across nodes the first of its nodes in order, whose record lists every
//! member and is complete only once every node's part is recorded. The cut
//! ([`Router::create_group_across`]) steps one session per node (Loam's
//! Groups.Cut, [`crate::rpc::group_parts`]), the coordinator's first:
//!
//! 1. prepare the coordinator (which answers at once when the same request
//!    made the group already), then every other node: each claims and
//!    freezes what it can, and says how each member is held;
//! 2. check the whole group against [`crate::write_order`];
//! 3. cut on every node, then record on every node (each thaws first);
//! 4. commit the coordinator (the group now exists), then the others.
//!
//! Any failure before 4 drops every session, and each node thaws and rolls
//! its part back by itself; a node that the controller loses after its part
//! is recorded keeps it in doubt until a later call settles it from the
//! coordinator's record: Get and a retried Create mark it complete when the
//! coordinator's is, Delete removes it. Every node holds its part under the
//! same id, so Delete of a group whose coordinator holds nothing (an attempt
//! the CO gave up) asks every agent to remove what it holds.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

use crate::api::cut_progress::Progress;
use crate::api::cut_step::Step;
use crate::api::member_hold::Hold as WireHold;
use crate::api::{CommitNow, CutNow, CutProgress, CutStep, GroupPart, GroupPartRequest, PrepareStep, RecordNow};
use crate::csi;
use crate::error::{Error, Result};
use crate::ids::{Key, Kind, ObjectId, same_ids};
use crate::routing::agents::{AgentGroupsClient, Agents};
use crate::routing::router::Router;
use crate::write_order::{self, Hold};

/// How long one node may take to answer one step of a cut. Below the
/// agents' own bound on the wait for the next step, so the controller gives
/// up first and every node hears it by the stream's end.
const STEP_ANSWER_TIMEOUT: Duration = Duration::from_secs(100);

/// The calls a deletion makes; a node gone for good has nothing left.
const DELETE: &str = "DeleteVolumeGroupSnapshot";

impl Router {
    /// Cuts a group snapshot of volumes on `nodes` (in order; the first
    /// coordinates) at one point in time.
    pub async fn create_group_across(
        &self,
        req: csi::CreateVolumeGroupSnapshotRequest,
        nodes: Vec<String>,
    ) -> Result<csi::CreateVolumeGroupSnapshotResponse> {
        let coordinator = nodes.first().cloned().unwrap_or_default();
        let id = ObjectId { key: Key::for_name(Kind::GroupSnapshot, &req.name), node: coordinator.clone() };
        let prepare = PrepareStep {
            name: req.name.clone(),
            source_volume_ids: req.source_volume_ids.clone(),
            parameters: req.parameters.clone(),
            group_snapshot_id: id.to_string(),
        };
        let mut first = Session::open(&self.agents, &coordinator).await?;
        let mut holds = match first.step(Step::Prepare(prepare.clone())).await? {
            Progress::Made(_) => {
                drop(first);
                let group = self.group(&id, &[]).await?;
                return Ok(csi::CreateVolumeGroupSnapshotResponse { group_snapshot: Some(group) });
            }
            Progress::Prepared(prepared) => prepared.members,
            other => return Err(first.unexpected("prepare", &other)),
        };
        let mut others = JoinSet::new();
        for node in &nodes[1..] {
            let (agents, prepare, node) = (self.agents.clone(), prepare.clone(), node.clone());
            others.spawn(async move {
                let mut session = Session::open(&agents, &node).await?;
                match session.step(Step::Prepare(prepare)).await? {
                    Progress::Prepared(prepared) => Ok((session, prepared.members)),
                    other => Err(session.unexpected("prepare", &other)),
                }
            });
        }
        let mut sessions = vec![first];
        for prepared in others.join_all().await {
            let (session, members) = prepared?;
            sessions.push(session);
            holds.extend(members);
        }
        let named: Vec<(&str, Hold)> = holds.iter().map(|m| (m.volume_id.as_str(), hold(m.hold()))).collect();
        write_order::check(&named)?;
        let (sessions, _) =
            all_step(sessions, "cut", || Step::Cut(CutNow {}), |p| matches!(p, Progress::Cut(_))).await?;
        let record = || Step::Record(RecordNow {});
        let (mut sessions, recorded) =
            all_step(sessions, "record", record, |p| matches!(p, Progress::Recorded(_))).await?;
        let mut snapshots: Vec<csi::Snapshot> = recorded
            .into_iter()
            .flat_map(|progress| match progress {
                Progress::Recorded(recorded) => recorded.snapshots,
                _ => Vec::new(),
            })
            .collect();
        // The commit point: the coordinator's record complete.
        let mut coordinating = sessions.remove(0);
        match coordinating.step(Step::Commit(CommitNow {})).await? {
            Progress::Committed(_) => {}
            other => return Err(coordinating.unexpected("commit", &other)),
        }
        let mut commits = JoinSet::new();
        for mut session in sessions {
            commits.spawn(async move {
                if let Err(e) = session.step(Step::Commit(CommitNow {})).await {
                    tracing::warn!(
                        node = %session.node,
                        error = %e,
                        "a part of a group snapshot was not committed; the next call naming the group settles it"
                    );
                }
            });
        }
        commits.join_all().await;
        let order = |s: &csi::Snapshot| req.source_volume_ids.iter().position(|v| *v == s.source_volume_id);
        snapshots.sort_by_key(order);
        let creation_time = snapshots.iter().find(|s| s.snapshot_id.ends_with(&format!("@{coordinator}")));
        let group = csi::VolumeGroupSnapshot {
            group_snapshot_id: id.to_string(),
            creation_time: creation_time.and_then(|s| s.creation_time),
            snapshots,
            ready_to_use: true,
        };
        Ok(csi::CreateVolumeGroupSnapshotResponse { group_snapshot: Some(group) })
    }

    /// GetVolumeGroupSnapshot: the group from its coordinator's record and
    /// every node's part, settling parts in doubt.
    pub async fn get_group(
        &self,
        req: csi::GetVolumeGroupSnapshotRequest,
    ) -> Result<csi::GetVolumeGroupSnapshotResponse> {
        let id = ObjectId::parse(&req.group_snapshot_id).ok_or_else(|| {
            Error::NotFound(format!("group snapshot {} does not exist (not an id Loam made)", req.group_snapshot_id))
        })?;
        let group = self.group(&id, &req.snapshot_ids).await?;
        Ok(csi::GetVolumeGroupSnapshotResponse { group_snapshot: Some(group) })
    }

    /// DeleteVolumeGroupSnapshot: every other node's part, then the
    /// coordinator's; every agent's part when the coordinator has none.
    pub async fn delete_group(
        &self,
        req: csi::DeleteVolumeGroupSnapshotRequest,
    ) -> Result<csi::DeleteVolumeGroupSnapshotResponse> {
        // An id Loam never made names nothing to delete.
        let Some(id) = ObjectId::parse(&req.group_snapshot_id) else {
            return Ok(csi::DeleteVolumeGroupSnapshotResponse {});
        };
        let nodes = match self.part(&id.node, &id).await {
            Ok(part) => {
                check_listed(&id, &part, &req.snapshot_ids)?;
                let mut nodes = member_nodes(&part, &id.node);
                nodes.push(id.node.clone());
                nodes
            }
            Err(e) if e.code() == Code::NotFound => self.agents.all().await.into_iter().map(|a| a.node).collect(),
            Err(e) if e.code() == Code::Unavailable => {
                // Gone for good, the coordinator took its record with it:
                // what other nodes hold is found by asking them all.
                self.unreachable::<()>(&id.node, DELETE, e).await?;
                self.agents.all().await.into_iter().map(|a| a.node).collect()
            }
            Err(e) => return Err(e),
        };
        // The coordinator's last: while it stands, its record names the rest.
        for node in nodes {
            let request = GroupPartRequest { group_snapshot_id: id.to_string() };
            let call = |mut client: AgentGroupsClient, r| async move { client.delete_part(r).await };
            match self.agents.call_groups(&node, DELETE, request, call).await {
                Ok(_) => {}
                Err(e) if e.code() == Code::Unavailable => self.unreachable::<()>(&node, DELETE, e).await?,
                Err(e) => return Err(e),
            }
        }
        Ok(csi::DeleteVolumeGroupSnapshotResponse {})
    }

    /// The group `id` as its coordinator records it, with every member that
    /// exists; `listed`, when given, must be its members.
    async fn group(&self, id: &ObjectId, listed: &[String]) -> Result<csi::VolumeGroupSnapshot> {
        let coordinator = self.part(&id.node, id).await.map_err(|e| match e.code() {
            Code::NotFound => Error::NotFound(format!("group snapshot {id} does not exist")),
            _ => e,
        })?;
        check_listed(id, &coordinator, listed)?;
        let mut snapshots = coordinator.snapshots.clone();
        for node in member_nodes(&coordinator, &id.node) {
            let part = match self.part(&node, id).await {
                Ok(part) => part,
                // A member's node lost it (or never recorded it): the group
                // is not ready, and says so by the member missing.
                Err(e) if e.code() == Code::NotFound => continue,
                Err(e) => return Err(e),
            };
            let part = if coordinator.complete && !part.complete { self.settle(&node, id).await? } else { part };
            snapshots.extend(part.snapshots);
        }
        let order = |s: &csi::Snapshot| coordinator.snapshot_ids.iter().position(|m| *m == s.snapshot_id);
        snapshots.retain(|s| order(s).is_some());
        snapshots.sort_by_key(order);
        Ok(csi::VolumeGroupSnapshot {
            group_snapshot_id: id.to_string(),
            ready_to_use: coordinator.complete && snapshots.len() == coordinator.snapshot_ids.len(),
            snapshots,
            creation_time: Some(prost_types::Timestamp {
                seconds: coordinator.created_secs,
                nanos: coordinator.created_nanos,
            }),
        })
    }

    async fn part(&self, node: &str, id: &ObjectId) -> Result<GroupPart> {
        let request = GroupPartRequest { group_snapshot_id: id.to_string() };
        let call = |mut client: AgentGroupsClient, r| async move { client.get_part(r).await };
        self.agents.call_groups(node, "GetPart", request, call).await
    }

    async fn settle(&self, node: &str, id: &ObjectId) -> Result<GroupPart> {
        let request = GroupPartRequest { group_snapshot_id: id.to_string() };
        let call = |mut client: AgentGroupsClient, r| async move { client.settle_part(r).await };
        self.agents.call_groups(node, "SettlePart", request, call).await
    }
}

/// The nodes other than `coordinator` that hold members of a part's group.
fn member_nodes(part: &GroupPart, coordinator: &str) -> Vec<String> {
    let nodes: BTreeSet<String> = part
        .snapshot_ids
        .iter()
        .filter_map(|id| ObjectId::parse(id))
        .map(|id| id.node)
        .filter(|node| node != coordinator)
        .collect();
    nodes.into_iter().collect()
}

/// Refuses a `listed` that is given and is not the group's members.
fn check_listed(id: &ObjectId, coordinator: &GroupPart, listed: &[String]) -> Result<()> {
    if listed.is_empty() || same_ids(listed, &coordinator.snapshot_ids) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "group snapshot {id} is made of snapshots {}, not of the snapshot ids this request names",
        coordinator.snapshot_ids.join(", ")
    )))
}

fn hold(wire: WireHold) -> Hold {
    match wire {
        WireHold::Quiet => Hold::Quiet,
        WireHold::Frozen => Hold::Frozen,
        WireHold::Live => Hold::Live,
        // Unknown: as strict as it gets.
        WireHold::Copied | WireHold::Unspecified => Hold::Copied,
    }
}

/// Sends one step to every session at once; the sessions and their answers
/// in session order, or the first failure (the sessions then dropped).
async fn all_step(
    sessions: Vec<Session>,
    name: &'static str,
    step: impl Fn() -> Step,
    fits: fn(&Progress) -> bool,
) -> Result<(Vec<Session>, Vec<Progress>)> {
    let mut answers = JoinSet::new();
    for (i, mut session) in sessions.into_iter().enumerate() {
        let step = step();
        answers.spawn(async move {
            let answer = match session.step(step).await {
                Ok(progress) if fits(&progress) => Ok(progress),
                Ok(progress) => Err(session.unexpected(name, &progress)),
                Err(e) => Err(e),
            };
            (i, session, answer)
        });
    }
    let mut answers = answers.join_all().await;
    answers.sort_by_key(|(i, _, _)| *i);
    let mut sessions = Vec::with_capacity(answers.len());
    let mut progress = Vec::with_capacity(answers.len());
    for (_, session, answer) in answers {
        progress.push(answer?);
        sessions.push(session);
    }
    Ok((sessions, progress))
}

/// One node's cut session: dropping it ends the controller's side of the
/// stream, which ends the node's part (see [`crate::rpc::group_parts`]).
struct Session {
    node: String,
    steps: mpsc::Sender<CutStep>,
    progress: Streaming<CutProgress>,
}

impl Session {
    /// Opens `node`'s session (found again if its agent moved, as every
    /// call to an agent is).
    async fn open(agents: &Agents, node: &str) -> Result<Session> {
        let call = |mut client: AgentGroupsClient, ()| async move {
            let (steps, outgoing) = mpsc::channel(1);
            let opened = client.cut(ReceiverStream::new(outgoing)).await?;
            Ok(opened.map(|progress| (steps, progress)))
        };
        let (steps, progress) = agents.call_groups(node, "GroupCut", (), call).await?;
        Ok(Session { node: node.to_owned(), steps, progress })
    }

    async fn step(&mut self, step: Step) -> Result<Progress> {
        if self.steps.send(CutStep { step: Some(step) }).await.is_err() {
            return Err(self.gone("the stream is closed"));
        }
        match tokio::time::timeout(STEP_ANSWER_TIMEOUT, self.progress.message()).await {
            Ok(Ok(Some(CutProgress { progress: Some(progress) }))) => Ok(progress),
            Ok(Ok(Some(CutProgress { progress: None }))) => Err(self.gone("it sent an empty answer")),
            Ok(Ok(None)) => Err(self.gone("it ended the stream")),
            Ok(Err(status)) if status.code() == Code::Unknown || status.code() == Code::Unavailable => {
                Err(self.gone(status.message()))
            }
            Ok(Err(status)) => Err(Error::Forwarded { status }),
            Err(_) => Err(too_late(&self.node, "a step of the cut")),
        }
    }

    fn gone(&self, why: &str) -> Error {
        Error::Unavailable(format!(
            "the agent of node {} left the group snapshot's cut ({why}); every node rolls its part back, retry",
            self.node
        ))
    }

    fn unexpected(&self, step: &str, progress: &Progress) -> Error {
        Error::Unavailable(format!(
            "the agent of node {} answered {step} with {progress:?}; it may be of another Loam release; retry",
            self.node
        ))
    }
}

fn too_late(node: &str, what: &str) -> Error {
    Error::DeadlineExceeded(format!(
        "the agent of node {node} took longer than {STEP_ANSWER_TIMEOUT:?} over {what}; every node rolls its part \
         back; retry (a member whose snapshot is a full copy, on a root without reflinks, is slow to cut)"
    ))
}
