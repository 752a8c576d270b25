//! Moving a claim's volume to another node, keeping the claim's name.
//!
//! A node-local volume is chained to its node: the claim is bound to a
//! PersistentVolume whose node affinity names it. To move it, an operator
//! labels the claim `loam.csi.dev/move-to=<node>`; this reconciler (in the
//! controller, every few seconds) does the rest, and says what it did in
//! events on the claim:
//!
//! 1. It checks the target node (it exists, it is not the volume's node, its
//!    agent has room for the volume in the claim's class), then records the
//!    move on the old PersistentVolume (a label to find it, an annotation
//!    with the [`Plan`]) and sets that volume's reclaim policy to `Retain`:
//!    from here on every step is found again from the cluster's objects, by
//!    any controller, after any crash.
//! 2. It deletes the claim and the pods that run with it, so the data stops
//!    changing; the owner (a StatefulSet, a Deployment) makes the pods again,
//!    and they wait. As soon as the claim is gone it is made again, with the
//!    same name, labels, annotations and spec, bound in advance to a
//!    PersistentVolume that does not exist yet, so the owner cannot make one
//!    of its own (and if it won the race with a claim that is not bound yet,
//!    that claim is deleted; one already bound stops the move with an event).
//! 3. The old volume, now still, is bound to a source claim of the move's own,
//!    and a target claim cloned from it with the scheduler's
//!    `selected-node` annotation set to the target node: Loam copies the
//!    volume node to node and verifies the copy end to end
//!    ([`crate::driver::copies`]).
//! 4. The target claim's volume becomes the new PersistentVolume under the
//!    name the claim waits for (same CSI volume, reclaim policy and class as
//!    before); the target claim and its PersistentVolume object are removed
//!    without touching the volume. The claim binds, and the pods start on the
//!    target node.
//! 5. Only then the source claim is deleted and the old PersistentVolume gets
//!    its reclaim policy back: with `Delete`, Kubernetes deletes the old
//!    volume on its node.
//!
//! Downtime: one pod restart plus the copy. A started move is not cancelled;
//! it waits, saying why in events, until it can go on.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::TOPOLOGY_NODE_KEY;
use crate::csi;
use crate::ids::ObjectId;
use crate::routing::agents::Agents;
use crate::routing::kube::{self, EventType, Involved, KubeApi};

/// The label that asks for a claim's volume to be moved, to the node it names.
pub const MOVE_TO_LABEL: &str = "loam.csi.dev/move-to";
/// The label on a PersistentVolume whose move is under way.
pub const MOVING_LABEL: &str = "loam.csi.dev/moving";
/// The annotation on that PersistentVolume that holds the move's [`Plan`].
pub const PLAN_ANNOTATION: &str = "loam.csi.dev/move";
/// The annotation on the new PersistentVolume naming the one it replaced.
pub const MOVED_FROM_ANNOTATION: &str = "loam.csi.dev/moved-from";
/// The external-provisioner's finalizer on the volumes it made.
const PROVISIONER_FINALIZER: &str = "external-provisioner.volume.kubernetes.io/finalizer";
/// How long step 2 watches for the deleted claim to go before it leaves it
/// to the next sweep.
const CLAIM_GONE_WAIT: Duration = Duration::from_secs(30);
/// How often it looks meanwhile: the claim's owner may make a claim of its
/// own as soon as the old one is gone, so the new one must come first.
const CLAIM_GONE_POLL: Duration = Duration::from_millis(50);

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
    /// The claim as it is made again: its metadata (labels, annotations,
    /// owners) and its spec, without the binding.
    pub template: Value,
    /// The old volume's reclaim policy, given back to it at the end.
    pub reclaim: String,
    /// The name of the new PersistentVolume.
    pub volume: String,
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
}

/// A boxed future, for [`Room`].
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How much room a node has for a volume of a class.
pub trait Room: Send + Sync {
    /// The bytes `node` can give a new volume with the class's `parameters`.
    fn available<'a>(&'a self, node: &'a str, parameters: BTreeMap<String, String>)
    -> Pending<'a, Result<i64, String>>;
}

impl Room for Agents {
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
            self.call(node, "GetCapacity", request, |mut c, r| async move { c.get_capacity(r).await })
                .await
                .map(|answer| answer.available_capacity)
                .map_err(|e| e.to_string())
        })
    }
}

/// The reconciler of moves.
pub struct Moves {
    api: Arc<KubeApi>,
    room: Arc<dyn Room>,
    driver_name: String,
    /// The last reason each blocked move (by claim) was reported with: an
    /// event per new reason, not one per sweep.
    blocked: Mutex<BTreeMap<String, String>>,
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

impl Moves {
    /// Moves the claims of `driver_name`'s volumes through `api`, asking
    /// `room` whether a target node has room.
    pub fn new(api: Arc<KubeApi>, room: Arc<dyn Room>, driver_name: String) -> Moves {
        Moves { api, room, driver_name, blocked: Mutex::default() }
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
                Stage::Done => {}
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
        let to = claim["metadata"]["labels"][MOVE_TO_LABEL].as_str().unwrap_or_default();
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
        if id.node == to {
            let message = format!("the volume of claim {name} is on node {to} already; nothing was moved");
            return self.refuse(claim, &message).await;
        }
        match self.api.call(Method::GET, &format!("/api/v1/nodes/{to}"), None).await? {
            (200, _) => {}
            (404, _) => {
                let message = format!("node {to} is not a node of this cluster; label the claim with a node's name");
                return self.refuse(claim, &message).await;
            }
            (status, answer) => return Err(unexpected("reading the target node", status, &answer)),
        }
        let needed = kube_quantity(&pv["spec"]["capacity"]["storage"]);
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
                    let message = format!("the volume's StorageClass {class:?} is gone: the copy on {to} needs it");
                    return self.refuse(claim, &message).await;
                }
                (status, answer) => return Err(unexpected("reading the StorageClass", status, &answer)),
            };
        let available = self.room.available(to, parameters).await.map_err(|e| format!("asking node {to}: {e}"))?;
        if needed.is_none_or(|needed| needed > available) {
            let message = format!(
                "node {to} has {available} bytes free for class {class}; the volume needs {}",
                pv["spec"]["capacity"]["storage"]
            );
            return self.refuse(claim, &message).await;
        }
        let plan = Plan {
            to: to.to_owned(),
            from: id.node.clone(),
            namespace: namespace.to_owned(),
            claim: name.to_owned(),
            claim_uid: uid(claim).to_owned(),
            template: claim_template(claim),
            reclaim: pv["spec"]["persistentVolumeReclaimPolicy"].as_str().unwrap_or("Delete").to_owned(),
            volume: new_volume_name(pv_name, to, uid(claim)),
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
            "moving the volume from node {} to node {to}: the claim and its pods are deleted and the claim made again \
             with the same name, bound to a copy on {to}; its pods start there once the copy is complete and verified",
            id.node
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
        // Step 2: the claim, deleted and made again bound to the new volume.
        let claim = match self.claim_made_again(plan).await? {
            Ok(claim) => claim,
            Err(stage) => return Ok(stage),
        };
        // Step 3: the old volume bound to the source claim.
        let source_name = source_claim(old_name);
        let source = match self.api.call(Method::GET, &claim_path(&plan.namespace, &source_name), None).await? {
            (200, source) => Some(source),
            (404, _) => None,
            (status, answer) => return Err(unexpected("reading the source claim", status, &answer)),
        };
        let new_pv = match self.api.call(Method::GET, &volume_path(&plan.volume), None).await? {
            (200, pv) => Some(pv),
            (404, _) => None,
            (status, answer) => return Err(unexpected("reading the new volume", status, &answer)),
        };
        let Some(new_pv) = new_pv else {
            let Some(source) = source else {
                self.create(&claim_path(&plan.namespace, ""), &source_claim_object(old_pv, plan)).await?;
                return Ok(Stage::Waiting("the source claim was made".into()));
            };
            if old_pv["spec"]["claimRef"]["uid"].as_str() != Some(uid(&source)) {
                let bind = json!({ "spec": { "claimRef": {
                    "kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": plan.namespace,
                    "name": source_name, "uid": uid(&source), "resourceVersion": null,
                } } });
                self.patch(&volume_path(old_name), &bind, "binding the old volume to the source claim").await?;
                return Ok(Stage::Waiting("the old volume binds to the source claim".into()));
            }
            if !is_bound(&source) {
                return Ok(Stage::Waiting("the source claim binds".into()));
            }
            return self.copy(old_pv, plan, &claim).await;
        };
        // Step 4: the target claim and its volume object go, the volume stays.
        if let Some(stage) = self.remove_copy_objects(old_name, plan, &new_pv).await? {
            return Ok(stage);
        }
        if !is_bound(&claim) {
            return Ok(Stage::Waiting(format!("claim {} binds to volume {}", plan.claim, plan.volume)));
        }
        // Step 5: the old volume given back to its reclaim policy.
        if let Some(source) = source {
            self.delete(&claim_path(&plan.namespace, &source_name), uid(&source), "deleting the source claim").await?;
            return Ok(Stage::Waiting("the source claim goes".into()));
        }
        let finish = json!({
            "metadata": { "labels": { MOVING_LABEL: null }, "annotations": { PLAN_ANNOTATION: null } },
            "spec": { "persistentVolumeReclaimPolicy": plan.reclaim },
        });
        self.patch(&volume_path(old_name), &finish, "giving the old volume its reclaim policy back").await?;
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
        self.event(plan, uid(&claim), EventType::Normal, "Moved", &message).await;
        Ok(Stage::Done)
    }

    /// Step 2: the claim as it is after the move (made again, bound in
    /// advance to the new volume), or the stage that keeps it from being so.
    async fn claim_made_again(&self, plan: &Plan) -> Result<Result<Value, Stage>, String> {
        let path = claim_path(&plan.namespace, &plan.claim);
        let mut claim = match self.api.call(Method::GET, &path, None).await? {
            (200, claim) => Some(claim),
            (404, _) => None,
            (status, answer) => return Err(unexpected("reading the claim", status, &answer)),
        };
        if let Some(old) = claim.as_ref().filter(|c| uid(c) == plan.claim_uid) {
            if old["metadata"]["deletionTimestamp"].is_null() {
                self.delete(&path, &plan.claim_uid, "deleting the claim").await?;
            }
            self.stop_pods(plan).await?;
            claim = self.wait_until_replaced(&path, &plan.claim_uid).await?;
            if claim.as_ref().is_some_and(|c| uid(c) == plan.claim_uid) {
                return Ok(Err(Stage::Waiting(format!("claim {} goes once its pods have stopped", plan.claim))));
            }
        }
        match claim {
            Some(claim) if claim["spec"]["volumeName"].as_str() == Some(plan.volume.as_str()) => Ok(Ok(claim)),
            Some(other)
                if other["spec"]["volumeName"].is_null() && other["metadata"]["deletionTimestamp"].is_null() =>
            {
                // The claim's owner made one first; it has no volume yet, so no data.
                tracing::info!(namespace = %plan.namespace, claim = %plan.claim, "a claim made by its owner during the move is deleted before it gets a volume");
                self.delete(&path, uid(&other), "deleting a claim made during the move").await?;
                Ok(Err(Stage::Waiting("a claim made meanwhile by the claim's owner goes".into())))
            }
            Some(other) if !other["metadata"]["deletionTimestamp"].is_null() => {
                Ok(Err(Stage::Waiting("a claim made meanwhile goes".into())))
            }
            Some(other) => {
                let message = format!(
                    "claim {} was made again by someone else during the move and is bound to volume {}; the moved \
                     data is safe (still on node {}); delete claim {} and its pods to let the move go on",
                    plan.claim,
                    other["spec"]["volumeName"].as_str().unwrap_or("?"),
                    plan.from,
                    plan.claim
                );
                self.report_blocked(plan, uid(&other), &message).await;
                Ok(Err(Stage::Blocked(message)))
            }
            None => {
                let made = self.create(&claim_path(&plan.namespace, ""), &claim_object(plan)).await?;
                Ok(Err(Stage::Waiting(format!(
                    "claim {} was made again{}",
                    plan.claim,
                    if made { "" } else { " by someone else" }
                ))))
            }
        }
    }

    /// Watches the deleted claim until it is gone, then makes the new one at
    /// once; the claim of that name found (none if it is still not gone).
    async fn wait_until_replaced(&self, path: &str, old_uid: &str) -> Result<Option<Value>, String> {
        let deadline = tokio::time::Instant::now() + CLAIM_GONE_WAIT;
        loop {
            match self.api.call(Method::GET, path, None).await? {
                (200, claim) if uid(&claim) == old_uid && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(CLAIM_GONE_POLL).await;
                }
                (200, claim) => return Ok(Some(claim)),
                (404, _) => return Ok(None),
                (status, answer) => return Err(unexpected("reading the claim", status, &answer)),
            }
        }
    }

    /// Deletes the scheduled pods that use the claim (pods its owner made
    /// again are not scheduled: they wait for the claim without holding it).
    async fn stop_pods(&self, plan: &Plan) -> Result<(), String> {
        let pods =
            match self.api.call(Method::GET, &format!("/api/v1/namespaces/{}/pods", plan.namespace), None).await? {
                (200, pods) => pods,
                (status, answer) => return Err(unexpected("listing pods", status, &answer)),
            };
        for pod in pods["items"].as_array().into_iter().flatten() {
            let uses = pod["spec"]["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v["persistentVolumeClaim"]["claimName"].as_str() == Some(plan.claim.as_str()));
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

    /// Step 3 and the start of 4: the target claim cloned from the source on
    /// the target node; once it is bound, its volume kept and the new
    /// PersistentVolume made from it.
    async fn copy(&self, old_pv: &Value, plan: &Plan, claim: &Value) -> Result<Stage, String> {
        let old_name = old_pv["metadata"]["name"].as_str().unwrap_or_default();
        let target_name = target_claim(old_name);
        let target = match self.api.call(Method::GET, &claim_path(&plan.namespace, &target_name), None).await? {
            (200, target) => target,
            (404, _) => {
                self.create(&claim_path(&plan.namespace, ""), &target_claim_object(old_pv, plan)).await?;
                return Ok(Stage::Waiting(format!("the copy to node {} was asked for", plan.to)));
            }
            (status, answer) => return Err(unexpected("reading the target claim", status, &answer)),
        };
        let Some(copy_name) = target["spec"]["volumeName"].as_str().filter(|_| is_bound(&target)) else {
            return Ok(Stage::Waiting(format!(
                "the copy to node {} runs (claim {target_name}'s events and `loam ctl` ControllerGetVolume show it)",
                plan.to
            )));
        };
        let copy = match self.api.call(Method::GET, &volume_path(copy_name), None).await? {
            (200, copy) => copy,
            (status, answer) => return Err(unexpected("reading the copy's volume", status, &answer)),
        };
        let on = copy["spec"]["csi"]["volumeHandle"].as_str().and_then(ObjectId::parse).map(|id| id.node);
        if on.as_deref() != Some(plan.to.as_str()) {
            let message = format!(
                "the copy {copy_name} was made on node {} instead of {}; delete claim {target_name} so the move asks again",
                on.as_deref().unwrap_or("?"),
                plan.to
            );
            self.report_blocked(plan, uid(claim), &message).await;
            return Ok(Stage::Blocked(message));
        }
        // Kept before a second PersistentVolume names the same volume, so
        // that removing this one can never delete it.
        let keep = json!({ "spec": { "persistentVolumeReclaimPolicy": "Retain" } });
        self.patch(&volume_path(copy_name), &keep, "keeping the copy's volume").await?;
        let mut spec = copy["spec"].clone();
        spec["claimRef"] = json!({
            "kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": plan.namespace,
            "name": plan.claim, "uid": uid(claim),
        });
        spec["persistentVolumeReclaimPolicy"] = json!(plan.reclaim);
        let volume = json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": plan.volume,
                "annotations": { PROVISIONED_BY: self.driver_name, MOVED_FROM_ANNOTATION: old_name },
            },
            "spec": spec,
        });
        self.create("/api/v1/persistentvolumes", &volume).await?;
        Ok(Stage::Waiting(format!("volume {} was made from the copy", plan.volume)))
    }

    /// Removes the target claim and its PersistentVolume object once the new
    /// PersistentVolume names their volume; the stage while they go.
    async fn remove_copy_objects(&self, old_name: &str, plan: &Plan, new_pv: &Value) -> Result<Option<Stage>, String> {
        let target_name = target_claim(old_name);
        let handle = new_pv["spec"]["csi"]["volumeHandle"].as_str().unwrap_or_default();
        if let (200, target) = self.api.call(Method::GET, &claim_path(&plan.namespace, &target_name), None).await? {
            if let Some(copy_name) = target["spec"]["volumeName"].as_str() {
                let copy = self.api.call(Method::GET, &volume_path(copy_name), None).await?;
                if copy.0 == 200 && copy.1["spec"]["persistentVolumeReclaimPolicy"].as_str() != Some("Retain") {
                    let keep = json!({ "spec": { "persistentVolumeReclaimPolicy": "Retain" } });
                    self.patch(&volume_path(copy_name), &keep, "keeping the copy's volume").await?;
                }
            }
            self.delete(&claim_path(&plan.namespace, &target_name), uid(&target), "deleting the target claim").await?;
            return Ok(Some(Stage::Waiting("the target claim goes".into())));
        }
        let volumes = match self.api.call(Method::GET, "/api/v1/persistentvolumes", None).await? {
            (200, list) => list,
            (status, answer) => return Err(unexpected("listing volumes", status, &answer)),
        };
        for copy in volumes["items"].as_array().into_iter().flatten() {
            let name = copy["metadata"]["name"].as_str().unwrap_or_default();
            if name == plan.volume || copy["spec"]["csi"]["volumeHandle"].as_str() != Some(handle) {
                continue;
            }
            if copy["spec"]["persistentVolumeReclaimPolicy"].as_str() != Some("Retain") {
                // Never reached by the steps above; a volume named twice is
                // never deleted through the object that goes.
                let keep = json!({ "spec": { "persistentVolumeReclaimPolicy": "Retain" } });
                self.patch(&volume_path(name), &keep, "keeping the copy's volume").await?;
                return Ok(Some(Stage::Waiting("the copy's old object is kept from deleting the volume".into())));
            }
            // The provisioner's finalizer would wait for a deletion of the
            // volume that must not happen.
            let finalizers: Vec<&Value> = copy["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|f| f.as_str() != Some(PROVISIONER_FINALIZER))
                .collect();
            let release = json!({ "metadata": { "finalizers": finalizers } });
            self.patch(&volume_path(name), &release, "releasing the copy's old object").await?;
            self.delete(&volume_path(name), uid(copy), "deleting the copy's old object").await?;
            return Ok(Some(Stage::Waiting("the copy's old object goes".into())));
        }
        Ok(None)
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

    /// A Warning event `MoveBlocked`, once per reason.
    async fn report_blocked(&self, plan: &Plan, claim_uid: &str, message: &str) {
        let claim = format!("{}/{}", plan.namespace, plan.claim);
        let new = self.blocked.lock().unwrap_or_else(PoisonError::into_inner).insert(claim, message.to_owned());
        if new.as_deref() != Some(message) {
            self.event(plan, claim_uid, EventType::Warning, "MoveBlocked", message).await;
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

mod objects;
#[cfg(test)]
mod tests;

use objects::*;
