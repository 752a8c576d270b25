//! Moving a claim's volume to another node, keeping the claim's name.
//!
//! A node-local volume is chained to its node: the claim is bound to a
//! PersistentVolume whose node affinity names it. To move it, an operator
//! labels the claim `loam.csi.dev/move-to=<node>`; this reconciler (in the
//! controller, every few seconds) does the rest, and says what it did in
//! events on the claim:
//!
//! 1. It checks the target node (it exists, it is not the volume's node, its
//!    agent has room for the volume in the claim's class), or, for
//!    `move-to=any` ([`ANY_NODE`]), chooses one, then records the
//!    move on the old PersistentVolume (a label to find it, an annotation
//!    with the [`Plan`]) and sets that volume's reclaim policy to `Retain`:
//!    from here on every step is found again from the cluster's objects, by
//!    any controller, after any crash.
//! 2. It puts a finalizer of its own on the claim and deletes it, then the
//!    pods that run with it. The claim stays, terminating: its owner (a
//!    StatefulSet) can neither start a pod with it nor make a new claim of
//!    that name, so the data stops changing and nothing races the move.
//! 3. Once no pod uses the claim, the volume is copied node to node: a
//!    CreateVolume through the controller's own router, named after the new
//!    PersistentVolume, with the old volume as its content and the target
//!    node as its topology (`driver::copies`: verified end to end;
//!    retried while it runs).
//! 4. The new PersistentVolume is made for the copy, bound in advance to the
//!    claim's name, and the finalizer comes off: the claim goes, and whoever
//!    makes it again (its StatefulSet at once, or this reconciler for a claim
//!    nobody owns, with the old claim's labels, annotations and spec) gets it
//!    bound to the copy. The pods start on the target node.
//! 5. Only then the old PersistentVolume gets its reclaim policy back: with
//!    `Delete`, Kubernetes deletes the old volume on its node.
//!
//! Downtime: one pod restart plus the copy.
//!
//! **Cancelling.** Until the new PersistentVolume is made (step 4), taking
//! the label off the claim (or setting it to the volume's own node) cancels
//! the move: the cancellation is recorded in the [`Plan`] first (the label
//! goes with the claim, a crash must not forget it), then the old volume is
//! bound in advance to the claim's name (without the old claim's uid) and
//! the finalizer comes off, so whoever makes the claim again gets the old
//! volume back; the copy, whole or partial, is deleted through the router,
//! and the old volume gets its reclaim policy back (event `MoveCancelled`).
//! Once the new PersistentVolume exists the claim is about to be bound to
//! it: the label is no longer read, the move finishes (event
//! `MoveNotCancelled`), and moving back is a move of its own. Otherwise a
//! started move waits, saying why in events, until it can go on.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tonic::Code;

use crate::config::TOPOLOGY_NODE_KEY;
use crate::csi;
use crate::ids::{Kind, ObjectId};
use crate::routing::agents::AgentClient;
use crate::routing::kube::{self, EventType, Involved, KubeApi};
use crate::routing::placement::Owner;
use crate::routing::router::Router;

/// The label that asks for a claim's volume to be moved, to the node it names.
pub const MOVE_TO_LABEL: &str = "loam.csi.dev/move-to";
/// The [`MOVE_TO_LABEL`] value that lets the controller choose the node:
/// one the claim's pods could be scheduled on (module `fit`), running a Loam
/// agent with room for the volume, not the volume's node, the one with the
/// most room. It always means that,
/// even in a cluster with a node of that name.
pub const ANY_NODE: &str = "any";
/// The label on a PersistentVolume whose move is under way.
pub const MOVING_LABEL: &str = "loam.csi.dev/moving";
/// The annotation on that PersistentVolume that holds the move's [`Plan`].
pub const PLAN_ANNOTATION: &str = "loam.csi.dev/move";
/// The annotation on the new PersistentVolume naming the one it replaced.
pub const MOVED_FROM_ANNOTATION: &str = "loam.csi.dev/moved-from";
/// The finalizer that holds a claim, terminating, while its volume is copied.
pub const FINALIZER: &str = "loam.csi.dev/move";
/// Kubernetes' finalizer on a claim that a pod uses.
const CLAIM_IN_USE: &str = "kubernetes.io/pvc-protection";

/// What a move needs to go on after a crash, kept on the old volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// The node the volume moves to.
    pub to: String,
    /// The node it is on.
    pub from: String,
    /// The claim's namespace.
    pub namespace: String,
    /// The claim's name, which it keeps.
    pub claim: String,
    /// The uid of the claim as it was before the move.
    pub claim_uid: String,
    /// The claim as it is made again when nobody else does: its metadata
    /// (labels, annotations, owners) and its spec, without the binding.
    pub template: Value,
    /// The old volume's reclaim policy, given back to it at the end.
    pub reclaim: String,
    /// The name of the new PersistentVolume, and of the copy's CSI volume.
    pub volume: String,
    /// The move was cancelled before the new PersistentVolume was made: the
    /// claim goes back to the old volume.
    #[serde(default)]
    pub cancelled: bool,
}

/// Where a move stands after one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// It waits for the cluster (the reason).
    Waiting(String),
    /// It cannot go on without an operator (the reason, also in an event).
    Blocked(String),
    /// It is finished.
    Done,
    /// It was cancelled: the claim is bound to the old volume again, the
    /// copy is deleted.
    Cancelled,
}

/// A boxed future, for [`Nodes`].
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a move asks of the node agents.
pub trait Nodes: Send + Sync {
    /// The bytes `node` can give a new volume with the class's `parameters`.
    fn available<'a>(&'a self, node: &'a str, parameters: BTreeMap<String, String>)
    -> Pending<'a, Result<i64, String>>;
    /// Creates the copy `request` asks for, as the controller's CreateVolume.
    fn copy(&self, request: csi::CreateVolumeRequest) -> Pending<'_, Result<csi::Volume, tonic::Status>>;
    /// Deletes the volume `id`, as the controller's DeleteVolume (a volume
    /// that does not exist is deleted already).
    fn delete(&self, id: String) -> Pending<'_, Result<(), tonic::Status>>;
}

impl Nodes for Router {
    fn available<'a>(
        &'a self,
        node: &'a str,
        parameters: BTreeMap<String, String>,
    ) -> Pending<'a, Result<i64, String>> {
        Box::pin(async move {
            let request = csi::GetCapacityRequest {
                parameters: parameters.into_iter().collect(),
                accessible_topology: Some(csi::Topology {
                    segments: [(TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())].into(),
                }),
                ..Default::default()
            };
            self.get_capacity(request).await.map(|answer| answer.available_capacity).map_err(|e| e.to_string())
        })
    }

    fn copy(&self, request: csi::CreateVolumeRequest) -> Pending<'_, Result<csi::Volume, tonic::Status>> {
        Box::pin(async move {
            let answer = self.create_volume(request).await.map_err(tonic::Status::from)?;
            answer.volume.ok_or_else(|| tonic::Status::internal("CreateVolume answered without a volume"))
        })
    }

    fn delete(&self, id: String) -> Pending<'_, Result<(), tonic::Status>> {
        Box::pin(async move {
            let request = csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() };
            let call = |mut client: AgentClient, r| async move { client.delete_volume(r).await };
            self.to_owner(Owner::of(&id), "DeleteVolume", request, call).await.map(drop).map_err(tonic::Status::from)
        })
    }
}

/// The reconciler of moves.
pub struct Moves {
    api: Arc<KubeApi>,
    nodes: Arc<dyn Nodes>,
    driver_name: String,
    /// The last message each move that cannot go on as asked (by claim) was
    /// reported with: an event per new message, not one per sweep.
    reported: Mutex<BTreeMap<String, String>>,
}

impl std::fmt::Debug for Moves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moves").field("driver_name", &self.driver_name).finish_non_exhaustive()
    }
}

/// An answer of the API that was not what a step needs.
fn unexpected(what: &str, status: u16, answer: &Value) -> String {
    let message = answer["message"].as_str().unwrap_or_default();
    format!("{what}: HTTP {status} {message}")
}

mod fit;
mod objects;
#[cfg(test)]
mod tests;

use fit::{Fit, uses};
use objects::*;

impl Moves {
    /// Moves the claims of `driver_name`'s volumes through `api`, asking
    /// `nodes` for room and copies.
    pub fn new(api: Arc<KubeApi>, nodes: Arc<dyn Nodes>, driver_name: String) -> Moves {
        Moves { api, nodes, driver_name, reported: Mutex::default() }
    }

    /// Sweeps every `every` until the task is dropped.
    pub async fn run(self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            self.sweep().await;
        }
    }

    /// One pass: starts the moves claims ask for, advances those under way;
    /// where each move stands, by old PersistentVolume.
    pub async fn sweep(&self) -> BTreeMap<String, Stage> {
        let mut stages = BTreeMap::new();
        let asked = format!("/api/v1/persistentvolumeclaims?labelSelector={}", MOVE_TO_LABEL.replace('/', "%2F"));
        match self.api.call(Method::GET, &asked, None).await {
            Ok((200, list)) => {
                for claim in list["items"].as_array().into_iter().flatten() {
                    if let Err(e) = self.start(claim).await {
                        tracing::warn!(
                            namespace = claim["metadata"]["namespace"].as_str(),
                            claim = claim["metadata"]["name"].as_str(),
                            error = %e,
                            "cannot start moving the claim's volume; the next sweep tries again"
                        );
                    }
                }
            }
            Ok((status, answer)) => tracing::warn!(
                error = %unexpected("listing claims to move", status, &answer),
                "check the controller's RBAC (list persistentvolumeclaims)"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot list the claims to move"),
        }
        let under_way = format!("/api/v1/persistentvolumes?labelSelector={}", MOVING_LABEL.replace('/', "%2F"));
        let list = match self.api.call(Method::GET, &under_way, None).await {
            Ok((200, list)) => list,
            Ok((status, answer)) => {
                tracing::warn!(error = %unexpected("listing volumes being moved", status, &answer), "moves wait");
                return stages;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the volumes being moved; moves wait");
                return stages;
            }
        };
        for pv in list["items"].as_array().into_iter().flatten() {
            let name = pv["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let plan = pv["metadata"]["annotations"][PLAN_ANNOTATION].as_str().map(serde_json::from_str::<Plan>);
            let stage = match plan {
                Some(Ok(plan)) => match self.advance(pv, &plan).await {
                    Ok(stage) => stage,
                    Err(e) => Stage::Waiting(format!("a step failed, the next sweep tries again: {e}")),
                },
                _ => Stage::Blocked(format!(
                    "volume {name} has the {MOVING_LABEL} label without a readable {PLAN_ANNOTATION} annotation"
                )),
            };
            match &stage {
                Stage::Waiting(why) => tracing::debug!(volume = %name, %why, "move waits"),
                Stage::Blocked(why) => tracing::warn!(volume = %name, %why, "move blocked"),
                Stage::Done | Stage::Cancelled => {}
            }
            stages.insert(name, stage);
        }
        stages
    }

    /// Starts the move a claim asks for, or refuses it with an event (and
    /// takes the label off, so it is not asked again).
    async fn start(&self, claim: &Value) -> Result<(), String> {
        let namespace = claim["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = claim["metadata"]["name"].as_str().unwrap_or_default();
        let asked = claim["metadata"]["labels"][MOVE_TO_LABEL].as_str().unwrap_or_default();
        if !claim["metadata"]["deletionTimestamp"].is_null() {
            return Ok(());
        }
        let Some(pv_name) = claim["spec"]["volumeName"].as_str().filter(|_| is_bound(claim)) else {
            return self
                .refuse(claim, &format!("claim {name} is not bound to a volume: there is nothing to move"))
                .await;
        };
        let pv = match self.api.call(Method::GET, &volume_path(pv_name), None).await? {
            (200, pv) => pv,
            (status, answer) => return Err(unexpected("reading the claim's volume", status, &answer)),
        };
        if pv["metadata"]["labels"][MOVING_LABEL].as_str().is_some() {
            return Ok(()); // Under way: the label comes off at the end.
        }
        if pv["spec"]["csi"]["driver"].as_str() != Some(self.driver_name.as_str()) {
            let message = format!("volume {pv_name} of claim {name} is not a volume of {}", self.driver_name);
            return self.refuse(claim, &message).await;
        }
        let Some(id) = pv["spec"]["csi"]["volumeHandle"].as_str().and_then(ObjectId::parse) else {
            return self.refuse(claim, &format!("volume {pv_name} has a volume handle Loam did not make")).await;
        };
        let class = pv["spec"]["storageClassName"].as_str().unwrap_or_default();
        let parameters =
            match self.api.call(Method::GET, &format!("/apis/storage.k8s.io/v1/storageclasses/{class}"), None).await? {
                (200, class) => class["parameters"]
                    .as_object()
                    .map(|map| {
                        map.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect()
                    })
                    .unwrap_or_default(),
                (404, _) => {
                    let message = format!("the volume's StorageClass {class:?} is gone: the copy needs it");
                    return self.refuse(claim, &message).await;
                }
                (status, answer) => return Err(unexpected("reading the StorageClass", status, &answer)),
            };
        let needed = kube_quantity(&pv["spec"]["capacity"]["storage"]);
        let chosen;
        let to = if asked == ANY_NODE {
            match self.choose_node(claim, &id.node, class, &parameters, needed).await? {
                Ok(node) => {
                    chosen = node;
                    chosen.as_str()
                }
                Err(why) => {
                    let message = format!("no node can take the volume of claim {name} now: {why}; tried every sweep");
                    let involved = Involved { kind: "PersistentVolumeClaim", namespace, name, uid: uid(claim) };
                    self.report_once_on(involved, EventType::Warning, "MoveBlocked", &message).await;
                    return Ok(());
                }
            }
        } else {
            if id.node == asked {
                let message = format!("the volume of claim {name} is on node {asked} already; nothing was moved");
                return self.refuse(claim, &message).await;
            }
            match self.api.call(Method::GET, &format!("/api/v1/nodes/{asked}"), None).await? {
                (200, _) => {}
                (404, _) => {
                    let message = format!(
                        "node {asked} is not a node of this cluster; label the claim with a node's name, or \
                         {MOVE_TO_LABEL}={ANY_NODE}"
                    );
                    return self.refuse(claim, &message).await;
                }
                (status, answer) => return Err(unexpected("reading the target node", status, &answer)),
            }
            let available =
                self.nodes.available(asked, parameters).await.map_err(|e| format!("asking node {asked}: {e}"))?;
            if needed.is_none_or(|needed| needed > available) {
                let message = format!(
                    "node {asked} has {available} bytes free for class {class}; the volume needs {}",
                    pv["spec"]["capacity"]["storage"]
                );
                return self.refuse(claim, &message).await;
            }
            asked
        };
        let plan = Plan {
            to: to.to_owned(),
            from: id.node.clone(),
            namespace: namespace.to_owned(),
            claim: name.to_owned(),
            claim_uid: uid(claim).to_owned(),
            template: claim_template(claim),
            reclaim: pv["spec"]["persistentVolumeReclaimPolicy"].as_str().unwrap_or("Delete").to_owned(),
            volume: new_volume_name(pv_name, to, uid(claim)),
            cancelled: false,
        };
        let record = json!({
            "metadata": {
                "labels": { MOVING_LABEL: "true" },
                "annotations": { PLAN_ANNOTATION: serde_json::to_string(&plan).map_err(|e| e.to_string())? },
                // Fails the patch if the volume changed since it was read.
                "resourceVersion": pv["metadata"]["resourceVersion"],
            },
            "spec": { "persistentVolumeReclaimPolicy": "Retain" },
        });
        match self.api.call(Method::PATCH, &volume_path(pv_name), Some(&record)).await? {
            (200, _) => {}
            (status, answer) => return Err(unexpected("recording the move on the volume", status, &answer)),
        }
        let message = format!(
            "moving the volume from node {} to node {to}{}: the claim and its pods are deleted and the claim made \
             again with the same name, bound to a copy on {to}; its pods start there once the copy is complete and \
             verified",
            id.node,
            if asked == ANY_NODE {
                " (chosen by the controller: the most room of the nodes that can take it)"
            } else {
                ""
            }
        );
        tracing::info!(%namespace, claim = %name, volume = %pv_name, from = %id.node, %to, "{message}");
        self.event(&plan, uid(claim), EventType::Normal, "MoveStarted", &message).await;
        Ok(())
    }

    /// Refuses a claim's move: an event, and the label taken off.
    async fn refuse(&self, claim: &Value, message: &str) -> Result<(), String> {
        let namespace = claim["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = claim["metadata"]["name"].as_str().unwrap_or_default();
        tracing::warn!(%namespace, claim = %name, "move refused: {message}");
        let involved = Involved { kind: "PersistentVolumeClaim", namespace, name, uid: uid(claim) };
        self.post_event(namespace, kube::event(involved, EventType::Warning, "MoveRefused", message)).await;
        let unlabel = json!({ "metadata": { "labels": { MOVE_TO_LABEL: null } } });
        match self.api.call(Method::PATCH, &claim_path(namespace, name), Some(&unlabel)).await? {
            (200 | 404, _) => Ok(()),
            (status, answer) => Err(unexpected("taking the move label off", status, &answer)),
        }
    }

    /// Advances one move as far as the cluster lets it now.
    async fn advance(&self, old_pv: &Value, plan: &Plan) -> Result<Stage, String> {
        let old_name = old_pv["metadata"]["name"].as_str().unwrap_or_default();
        let path = claim_path(&plan.namespace, &plan.claim);
        let claim = match self.api.call(Method::GET, &path, None).await? {
            (200, claim) => Some(claim),
            (404, _) => None,
            (status, answer) => return Err(unexpected("reading the claim", status, &answer)),
        };
        if plan.cancelled {
            return self.cancel(old_pv, plan, claim).await;
        }
        match claim {
            // Steps 2 to 4: the old claim, held while its volume is copied.
            Some(old) if uid(&old) == plan.claim_uid => {
                if let Some(stage) = self.asked_to_cancel(old_pv, plan, &old).await? {
                    return Ok(stage);
                }
                let finalizers: Vec<&str> =
                    old["metadata"]["finalizers"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                let terminating = !old["metadata"]["deletionTimestamp"].is_null();
                if !finalizers.contains(&FINALIZER) {
                    if terminating {
                        // Deleted by someone else before the move held it:
                        // it goes, and the move goes on from step 4 with
                        // the volume quiet.
                        return Ok(Stage::Waiting(format!("claim {} goes", plan.claim)));
                    }
                    let mut held: Vec<&str> = finalizers.clone();
                    held.push(FINALIZER);
                    let hold = json!({ "metadata": {
                        "finalizers": held, "resourceVersion": old["metadata"]["resourceVersion"] } });
                    self.patch(&path, &hold, "holding the claim").await?;
                    return Ok(Stage::Waiting(format!("claim {} is held", plan.claim)));
                }
                if !terminating {
                    self.delete(&path, &plan.claim_uid, "deleting the claim").await?;
                }
                self.stop_pods(plan).await?;
                if finalizers.contains(&CLAIM_IN_USE) {
                    return Ok(Stage::Waiting(format!("the pods of claim {} stop", plan.claim)));
                }
                if let Some(stage) = self.new_volume(old_pv, plan, &old).await? {
                    return Ok(stage);
                }
                let released: Vec<&str> = finalizers.into_iter().filter(|f| *f != FINALIZER).collect();
                let release = json!({ "metadata": {
                    "finalizers": released, "resourceVersion": old["metadata"]["resourceVersion"] } });
                self.patch(&path, &release, "letting the claim go").await?;
                Ok(Stage::Waiting(format!("claim {} goes, to be made again bound to {}", plan.claim, plan.volume)))
            }
            // Step 4 for a claim nobody makes again: the move makes it.
            None => {
                if let Some(stage) = self.new_volume(old_pv, plan, &Value::Null).await? {
                    return Ok(stage);
                }
                let made = self.create(&claim_path(&plan.namespace, ""), &claim_object(plan, &plan.volume)).await?;
                Ok(Stage::Waiting(format!(
                    "claim {} was made again{}",
                    plan.claim,
                    if made { "" } else { " by someone else" }
                )))
            }
            Some(claim) => match claim["spec"]["volumeName"].as_str() {
                Some(volume) if volume == plan.volume && is_bound(&claim) => self.finish(old_name, plan, &claim).await,
                Some(volume) if volume != plan.volume => {
                    let message = format!(
                        "claim {} was made again during the move and is bound to volume {volume}, not to the copy \
                         {}; the old volume {old_name} is kept (reclaim policy Retain) with the data on node {}",
                        plan.claim, plan.volume, plan.from
                    );
                    self.report_blocked(plan, uid(&claim), &message).await;
                    Ok(Stage::Blocked(message))
                }
                _ => Ok(Stage::Waiting(format!("claim {} binds to volume {}", plan.claim, plan.volume))),
            },
        }
    }

    /// Reads the old claim's label while the move can still be cancelled:
    /// taken off or set to the volume's node, the cancellation is recorded
    /// on the old volume (the stage to report then); once the new volume
    /// exists it is too late, which an event says.
    async fn asked_to_cancel(&self, old_pv: &Value, plan: &Plan, old: &Value) -> Result<Option<Stage>, String> {
        let old_name = old_pv["metadata"]["name"].as_str().unwrap_or_default();
        let asked = old["metadata"]["labels"][MOVE_TO_LABEL].as_str();
        if asked == Some(plan.to.as_str()) || asked == Some(ANY_NODE) {
            return Ok(None);
        }
        if let Some(other) = asked.filter(|node| *node != plan.from) {
            let message = format!(
                "the claim is labelled {MOVE_TO_LABEL}={other}, but its move to node {} goes on: a started move is \
                 not redirected; take the label off to cancel it, then label the claim again",
                plan.to
            );
            self.report_once(plan, uid(old), EventType::Warning, "MoveGoesOn", &message).await;
            return Ok(None);
        }
        let made = match self.api.call(Method::GET, &volume_path(&plan.volume), None).await? {
            (200, _) => true,
            (404, _) => false,
            (status, answer) => return Err(unexpected("reading the new volume", status, &answer)),
        };
        if made {
            let message = format!(
                "the {MOVE_TO_LABEL} label was taken off after the copy's volume {} was made on node {}: the move \
                 can no longer be cancelled and finishes; to go back, label the claim {MOVE_TO_LABEL}={} once it \
                 is done",
                plan.volume, plan.to, plan.from
            );
            self.report_once(plan, uid(old), EventType::Warning, "MoveNotCancelled", &message).await;
            return Ok(None);
        }
        let cancelled = Plan { cancelled: true, ..plan.clone() };
        let record = json!({ "metadata": {
            "annotations": { PLAN_ANNOTATION: serde_json::to_string(&cancelled).map_err(|e| e.to_string())? },
            "resourceVersion": old_pv["metadata"]["resourceVersion"],
        } });
        self.patch(&volume_path(old_name), &record, "recording the move's cancellation").await?;
        tracing::info!(namespace = %plan.namespace, claim = %plan.claim, to = %plan.to, "the move is cancelled: the claim goes back to its volume");
        Ok(Some(Stage::Waiting(format!("the move of claim {} is cancelled", plan.claim))))
    }

    /// A cancelled move, as far as the cluster lets it go now: the claim
    /// bound to the old volume again (made again if it was deleted), then
    /// the copy deleted, then the old volume's reclaim policy back.
    async fn cancel(&self, old_pv: &Value, plan: &Plan, claim: Option<Value>) -> Result<Stage, String> {
        let old_name = old_pv["metadata"]["name"].as_str().unwrap_or_default();
        let path = claim_path(&plan.namespace, &plan.claim);
        let claim_uid = match claim {
            Some(old) if uid(&old) == plan.claim_uid => {
                let terminating = !old["metadata"]["deletionTimestamp"].is_null();
                if terminating {
                    self.bind_to_name(old_pv, plan).await?;
                }
                let finalizers: Vec<&str> =
                    old["metadata"]["finalizers"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                let labelled = !old["metadata"]["labels"][MOVE_TO_LABEL].is_null();
                if finalizers.contains(&FINALIZER) || labelled {
                    let released: Vec<&str> = finalizers.into_iter().filter(|f| *f != FINALIZER).collect();
                    let release = json!({ "metadata": {
                        "labels": { MOVE_TO_LABEL: null },
                        "finalizers": released,
                        "resourceVersion": old["metadata"]["resourceVersion"],
                    } });
                    self.patch(&path, &release, "letting the claim go").await?;
                }
                if terminating {
                    // Deleted, it cannot come back: it goes once its pods
                    // stop, and is made again bound to the old volume.
                    self.stop_pods(plan).await?;
                    return Ok(Stage::Waiting(format!(
                        "claim {} goes, to be made again bound to {old_name}",
                        plan.claim
                    )));
                }
                // Never deleted: it is still bound to the old volume.
                plan.claim_uid.clone()
            }
            None => {
                self.bind_to_name(old_pv, plan).await?;
                self.create(&claim_path(&plan.namespace, ""), &claim_object(plan, old_name)).await?;
                return Ok(Stage::Waiting(format!("claim {} was made again, bound to {old_name}", plan.claim)));
            }
            Some(claim) => match claim["spec"]["volumeName"].as_str() {
                Some(volume) if volume == old_name && is_bound(&claim) => uid(&claim).to_owned(),
                Some(volume) if volume != old_name => {
                    let message = format!(
                        "the move was cancelled, but claim {} was made again meanwhile and is bound to volume \
                         {volume}; the old volume {old_name} is kept (reclaim policy Retain) with the data on node {}",
                        plan.claim, plan.from
                    );
                    self.report_blocked(plan, uid(&claim), &message).await;
                    return Ok(Stage::Blocked(message));
                }
                _ => {
                    self.bind_to_name(old_pv, plan).await?;
                    return Ok(Stage::Waiting(format!("claim {} binds to volume {old_name}", plan.claim)));
                }
            },
        };
        // The copy was never handed to a PersistentVolume: nothing else
        // deletes it. A copy still running holds it (ABORTED) until it ends.
        let copy = ObjectId::for_name(Kind::Volume, &plan.volume, &plan.to).to_string();
        match self.nodes.delete(copy.clone()).await {
            Ok(()) => {}
            Err(status) if status.code() == Code::Aborted => {
                return Ok(Stage::Waiting(format!("the copy {copy} is deleted once it stops: {}", status.message())));
            }
            Err(status) => {
                let message = format!(
                    "the move was cancelled and the claim is bound to its volume {old_name} again, but the copy \
                     {copy} on node {} cannot be deleted ({:?}: {}); it is tried again every sweep",
                    plan.to,
                    status.code(),
                    status.message()
                );
                self.report_blocked(plan, &claim_uid, &message).await;
                return Ok(Stage::Blocked(message));
            }
        }
        let message = format!(
            "the move to node {} was cancelled before the copy's volume was made: the claim is bound to its volume \
             {old_name} on node {} again; the copy {copy} was deleted",
            plan.to, plan.from
        );
        tracing::info!(namespace = %plan.namespace, claim = %plan.claim, "{message}");
        self.event(plan, &claim_uid, EventType::Normal, "MoveCancelled", &message).await;
        let finish = json!({
            "metadata": { "labels": { MOVING_LABEL: null }, "annotations": { PLAN_ANNOTATION: null } },
            "spec": { "persistentVolumeReclaimPolicy": plan.reclaim },
        });
        self.patch(&volume_path(old_name), &finish, "giving the old volume its reclaim policy back").await?;
        Ok(Stage::Cancelled)
    }

    /// Binds the old volume in advance to the claim's name, without the uid
    /// of the claim the move deleted: whoever makes the claim again (its
    /// StatefulSet, or the cancel) gets it from the volume binder. A volume
    /// bound to another claim of that name meanwhile is left alone.
    async fn bind_to_name(&self, old_pv: &Value, plan: &Plan) -> Result<(), String> {
        if old_pv["spec"]["claimRef"]["uid"].as_str() != Some(plan.claim_uid.as_str()) {
            return Ok(());
        }
        let old_name = old_pv["metadata"]["name"].as_str().unwrap_or_default();
        let unbind = json!({
            "metadata": { "resourceVersion": old_pv["metadata"]["resourceVersion"] },
            "spec": { "claimRef": { "uid": null, "resourceVersion": null } },
        });
        self.patch(&volume_path(old_name), &unbind, "binding the old volume to the claim's name").await
    }

    /// Step 3 and the start of 4: the copy on the target node and its
    /// PersistentVolume; the stage while they are not there yet.
    async fn new_volume(&self, old_pv: &Value, plan: &Plan, claim: &Value) -> Result<Option<Stage>, String> {
        match self.api.call(Method::GET, &volume_path(&plan.volume), None).await? {
            (200, _) => return Ok(None),
            (404, _) => {}
            (status, answer) => return Err(unexpected("reading the new volume", status, &answer)),
        }
        let class = old_pv["spec"]["storageClassName"].as_str().unwrap_or_default();
        let parameters =
            match self.api.call(Method::GET, &format!("/apis/storage.k8s.io/v1/storageclasses/{class}"), None).await? {
                (200, class) => class["parameters"].clone(),
                (status, answer) => return Err(unexpected("reading the StorageClass", status, &answer)),
            };
        let Some(request) = copy_request(old_pv, plan, &parameters) else {
            let message = format!("the old volume {} has no size or handle Loam can copy", plan.volume);
            self.report_blocked(plan, uid(claim), &message).await;
            return Ok(Some(Stage::Blocked(message)));
        };
        let copy = match self.nodes.copy(request).await {
            Ok(copy) => copy,
            Err(status) if status.code() == Code::Aborted => {
                return Ok(Some(Stage::Waiting(format!("the copy to node {}: {}", plan.to, status.message()))));
            }
            Err(status) => {
                let message = format!(
                    "the copy to node {} failed ({:?}: {}); it is tried again every sweep",
                    plan.to,
                    status.code(),
                    status.message()
                );
                self.report_blocked(plan, uid(claim), &message).await;
                return Ok(Some(Stage::Blocked(message)));
            }
        };
        let on = ObjectId::parse(&copy.volume_id).map(|id| id.node);
        if on.as_deref() != Some(plan.to.as_str()) {
            return Err(format!("the copy {} is not on node {}", copy.volume_id, plan.to));
        }
        self.create("/api/v1/persistentvolumes", &new_volume_object(old_pv, plan, &copy, &self.driver_name)).await?;
        tracing::info!(namespace = %plan.namespace, claim = %plan.claim, volume = %plan.volume, id = %copy.volume_id, "the copy of a moved claim's volume is verified; its PersistentVolume is made");
        Ok(Some(Stage::Waiting(format!("volume {} was made from the copy", plan.volume))))
    }

    /// Step 5: the claim is bound to the copy; the old volume gets its
    /// reclaim policy back and the move's records go.
    async fn finish(&self, old_name: &str, plan: &Plan, claim: &Value) -> Result<Stage, String> {
        let message = format!(
            "moved from node {} to node {}: the claim is bound to volume {}, a copy verified end to end; the old \
             volume {old_name} {}",
            plan.from,
            plan.to,
            plan.volume,
            if plan.reclaim == "Delete" {
                "is deleted by its reclaim policy"
            } else {
                "is kept by its reclaim policy (Retain)"
            }
        );
        tracing::info!(namespace = %plan.namespace, claim = %plan.claim, "{message}");
        // Before the patch that ends the move: with reclaim policy Delete the
        // old volume, and with it the move's record, may go at once.
        self.event(plan, uid(claim), EventType::Normal, "Moved", &message).await;
        let finish = json!({
            "metadata": { "labels": { MOVING_LABEL: null }, "annotations": { PLAN_ANNOTATION: null } },
            "spec": { "persistentVolumeReclaimPolicy": plan.reclaim },
        });
        self.patch(&volume_path(old_name), &finish, "giving the old volume its reclaim policy back").await?;
        Ok(Stage::Done)
    }

    /// Deletes the scheduled pods that use the claim (pods its owner made
    /// again are not scheduled: they wait for the claim).
    async fn stop_pods(&self, plan: &Plan) -> Result<(), String> {
        let pods =
            match self.api.call(Method::GET, &format!("/api/v1/namespaces/{}/pods", plan.namespace), None).await? {
                (200, pods) => pods,
                (status, answer) => return Err(unexpected("listing pods", status, &answer)),
            };
        for pod in pods["items"].as_array().into_iter().flatten() {
            let uses = uses(pod, &plan.claim);
            let scheduled = pod["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty());
            let Some(name) = pod["metadata"]["name"].as_str() else { continue };
            if uses && scheduled && pod["metadata"]["deletionTimestamp"].is_null() {
                tracing::info!(namespace = %plan.namespace, pod = %name, claim = %plan.claim, "stopping a pod of a moved claim");
                self.delete(&format!("/api/v1/namespaces/{}/pods/{name}", plan.namespace), uid(pod), "deleting a pod")
                    .await?;
            }
        }
        Ok(())
    }

    /// POSTs `object` to the collection of `path`; whether this call made it
    /// (false: it existed).
    async fn create(&self, path: &str, object: &Value) -> Result<bool, String> {
        let collection = path.trim_end_matches('/');
        match self.api.call(Method::POST, collection, Some(object)).await? {
            (200..=202, _) => Ok(true),
            (409, _) => Ok(false),
            (status, answer) => Err(unexpected(&format!("making {}", object["metadata"]["name"]), status, &answer)),
        }
    }

    async fn patch(&self, path: &str, patch: &Value, what: &str) -> Result<(), String> {
        match self.api.call(Method::PATCH, path, Some(patch)).await? {
            (200, _) => Ok(()),
            (status, answer) => Err(unexpected(what, status, &answer)),
        }
    }

    /// Deletes the object at `path` if it still has `uid`.
    async fn delete(&self, path: &str, uid: &str, what: &str) -> Result<(), String> {
        let options = json!({ "kind": "DeleteOptions", "apiVersion": "v1", "preconditions": { "uid": uid } });
        match self.api.call(Method::DELETE, path, Some(&options)).await? {
            // 409: the precondition failed, the object is another one now.
            (200 | 202 | 404 | 409, _) => Ok(()),
            (status, answer) => Err(unexpected(what, status, &answer)),
        }
    }

    /// The node a claim labelled [`ANY_NODE`] moves to: of the nodes that
    /// are Ready, not cordoned, without a NoSchedule or NoExecute taint the
    /// claim's pods do not tolerate, not the volume's node `from` and whose
    /// agent answers with room for the volume (`needed` bytes in `class`),
    /// the one with the most room (ties: the first by name). None: why
    /// each node cannot, in words.
    async fn choose_node(
        &self,
        claim: &Value,
        from: &str,
        class: &str,
        parameters: &BTreeMap<String, String>,
        needed: Option<i64>,
    ) -> Result<Result<String, String>, String> {
        let nodes = match self.api.call(Method::GET, "/api/v1/nodes", None).await? {
            (200, nodes) => nodes,
            (status, answer) => return Err(unexpected("listing nodes", status, &answer)),
        };
        let namespace = claim["metadata"]["namespace"].as_str().unwrap_or_default();
        let claim_name = claim["metadata"]["name"].as_str().unwrap_or_default();
        let pods = match self.api.call(Method::GET, &format!("/api/v1/namespaces/{namespace}/pods"), None).await? {
            (200, pods) => pods,
            (status, answer) => return Err(unexpected("listing pods", status, &answer)),
        };
        let fit = Fit::new(claim_name, &pods, &nodes);
        let mut names: Vec<&Value> = nodes["items"].as_array().into_iter().flatten().collect();
        names.sort_by_key(|node| node["metadata"]["name"].as_str().unwrap_or_default().to_owned());
        let mut best: Option<(i64, String)> = None;
        let mut why = Vec::new();
        for node in names {
            let name = node["metadata"]["name"].as_str().unwrap_or_default();
            if name == from {
                why.push(format!("{name} is the volume's node"));
                continue;
            }
            if let Some(unfit) = fit.refusal(node) {
                why.push(format!("{name} {unfit}"));
                continue;
            }
            match self.nodes.available(name, parameters.clone()).await {
                Err(e) => why.push(format!("{name}: no Loam agent answers ({e})")),
                Ok(free) if needed.is_none_or(|needed| needed > free) => {
                    why.push(format!("{name} has {free} bytes free for class {class}"));
                }
                Ok(free) => {
                    if best.as_ref().is_none_or(|(most, _)| free > *most) {
                        best = Some((free, name.to_owned()));
                    }
                }
            }
        }
        Ok(match best {
            Some((_, node)) => Ok(node),
            None if why.is_empty() => Err("the cluster lists no nodes".to_owned()),
            None => Err(format!("the volume needs {} bytes; {}", needed.unwrap_or_default(), why.join("; "))),
        })
    }

    /// A Warning event `MoveBlocked`, once per reason.
    async fn report_blocked(&self, plan: &Plan, claim_uid: &str, message: &str) {
        self.report_once(plan, claim_uid, EventType::Warning, "MoveBlocked", message).await;
    }

    /// An event on the claim, unless the last one reported for it said the same.
    async fn report_once(&self, plan: &Plan, claim_uid: &str, kind: EventType, reason: &str, message: &str) {
        let involved =
            Involved { kind: "PersistentVolumeClaim", namespace: &plan.namespace, name: &plan.claim, uid: claim_uid };
        self.report_once_on(involved, kind, reason, message).await;
    }

    async fn report_once_on(&self, involved: Involved<'_>, kind: EventType, reason: &str, message: &str) {
        let claim = format!("{}/{}", involved.namespace, involved.name);
        let new = self.reported.lock().unwrap_or_else(PoisonError::into_inner).insert(claim, message.to_owned());
        if new.as_deref() != Some(message) {
            let namespace = involved.namespace.to_owned();
            self.post_event(&namespace, kube::event(involved, kind, reason, message)).await;
        }
    }

    async fn event(&self, plan: &Plan, claim_uid: &str, kind: EventType, reason: &str, message: &str) {
        let involved =
            Involved { kind: "PersistentVolumeClaim", namespace: &plan.namespace, name: &plan.claim, uid: claim_uid };
        self.post_event(&plan.namespace, kube::event(involved, kind, reason, message)).await;
    }

    async fn post_event(&self, namespace: &str, event: Value) {
        let path = format!("/api/v1/namespaces/{namespace}/events");
        if let Err(e) = self.api.call(Method::POST, &path, Some(&event)).await {
            tracing::warn!(error = %e, "cannot record an event of a move");
        }
    }
}
