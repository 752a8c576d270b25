//! Moves against a small model of a cluster: an API server that keeps
//! objects, and the controllers a move relies on (the volume binder, the
//! claim protection, the external-provisioner's deletions, a StatefulSet,
//! the scheduler), each doing what Kubernetes does, only faster.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::*;
use crate::routing::kube::fake;

const KEY_A: &str = "0123456789abcdef0123456789abcdef";
/// The annotation by which the external-provisioner knows its volumes.
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// Its finalizer on them.
const PROVISIONER_FINALIZER: &str = "external-provisioner.volume.kubernetes.io/finalizer";
const GI: i64 = 1 << 30;

/// How a request the model is told to fail fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Not done, HTTP 500.
    Refused,
    /// Done, but the answer is lost (a crash or a cut connection right after).
    AnswerLost,
}

#[derive(Default)]
struct Cluster {
    objects: BTreeMap<String, Value>,
    serial: u64,
    /// Handles of the volumes the provisioner deleted.
    deleted_volumes: Vec<String>,
    /// Whether the claim's StatefulSet makes it again as soon as it is gone.
    owner_makes_claims: bool,
    /// Events' reasons and messages, in order.
    events: Vec<(String, String)>,
    /// Mutating requests so far ("METHOD path", in order), and which one
    /// fails how.
    mutations: usize,
    log: Vec<String>,
    fail: Option<(usize, Failure)>,
}

fn is_collection(path: &str) -> bool {
    let last = path.rsplit('/').next().unwrap_or_default();
    ["persistentvolumeclaims", "persistentvolumes", "pods", "events", "nodes", "storageclasses"].contains(&last)
}

/// RFC 7396.
fn merge(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().unwrap();
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

impl Cluster {
    fn claims(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.objects.iter().filter(|(p, _)| p.contains("/persistentvolumeclaims/"))
    }

    fn volumes(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.objects.iter().filter(|(p, _)| p.starts_with("/api/v1/persistentvolumes/"))
    }

    fn get(&self, path: &str) -> Option<&Value> {
        self.objects.get(path)
    }

    fn handle(&mut self, call: &str, body: &Value) -> (u16, Value) {
        let (method, target) = call.split_once(' ').unwrap();
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        // Events are best effort (a lost one is not posted again), so they
        // are not among the requests failed on purpose.
        if method != "GET" && !path.ends_with("/events") {
            self.mutations += 1;
            self.log.push(format!("{method} {path}"));
            if let Some((n, failure)) = self.fail
                && n == self.mutations
            {
                if failure == Failure::Refused {
                    return (500, json!({ "message": "injected" }));
                }
                self.apply(method, path, query, body);
                self.react();
                return (500, json!({ "message": "injected after it was done" }));
            }
        }
        let answer = self.apply(method, path, query, body);
        self.react();
        answer
    }

    fn apply(&mut self, method: &str, path: &str, query: &str, body: &Value) -> (u16, Value) {
        match method {
            "GET" if is_collection(path) => {
                let selector = query_label(query);
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|(p, _)| in_collection(p, path))
                    .map(|(_, o)| o.clone())
                    .filter(|o| selector.as_ref().is_none_or(|key| !o["metadata"]["labels"][key].is_null()))
                    .collect();
                (200, json!({ "items": items }))
            }
            "GET" => self.objects.get(path).map_or((404, Value::Null), |o| (200, o.clone())),
            "POST" => {
                self.serial += 1;
                let mut object = body.clone();
                if object["metadata"]["name"].is_null() {
                    object["metadata"]["name"] =
                        json!(format!("{}{}", object["metadata"]["generateName"].as_str().unwrap(), self.serial));
                }
                if path.ends_with("/events") {
                    self.events.push((
                        object["reason"].as_str().unwrap().to_owned(),
                        object["message"].as_str().unwrap().to_owned(),
                    ));
                }
                let item = format!("{path}/{}", object["metadata"]["name"].as_str().unwrap());
                if self.objects.contains_key(&item) {
                    return (409, json!({ "message": "exists" }));
                }
                object["metadata"]["uid"] = json!(format!("uid-{}", self.serial));
                object["metadata"]["resourceVersion"] = json!(self.serial.to_string());
                if path.ends_with("/persistentvolumeclaims") {
                    object["metadata"]["finalizers"] = json!(["kubernetes.io/pvc-protection"]);
                    object["status"] = json!({ "phase": "Pending" });
                }
                self.objects.insert(item, object.clone());
                (201, object)
            }
            "PATCH" => {
                self.serial += 1;
                let serial = self.serial;
                let Some(object) = self.objects.get_mut(path) else { return (404, Value::Null) };
                if let Some(version) = body["metadata"]["resourceVersion"].as_str()
                    && object["metadata"]["resourceVersion"].as_str() != Some(version)
                {
                    return (409, json!({ "message": "the object has been modified" }));
                }
                merge(object, body);
                object["metadata"]["resourceVersion"] = json!(serial.to_string());
                (200, object.clone())
            }
            "DELETE" => {
                let Some(object) = self.objects.get_mut(path) else { return (404, Value::Null) };
                if let Some(uid) = body["preconditions"]["uid"].as_str()
                    && object["metadata"]["uid"].as_str() != Some(uid)
                {
                    return (409, json!({ "message": "precondition failed" }));
                }
                if object["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty()) {
                    object["metadata"]["deletionTimestamp"] = json!("2026-12-02T00:00:00Z");
                    return (200, object.clone());
                }
                (200, self.objects.remove(path).unwrap())
            }
            _ => (405, Value::Null),
        }
    }

    /// What Kubernetes' own controllers do at once after a change.
    fn react(&mut self) {
        loop {
            let before = self.objects.clone();
            self.protect_claims();
            self.bind();
            self.reclaim();
            if before == self.objects {
                break;
            }
        }
    }

    /// A claim being deleted loses its protection once no scheduled pod
    /// uses it, and goes once it has no finalizer left.
    fn protect_claims(&mut self) {
        let used: Vec<String> = self
            .objects
            .iter()
            .filter(|(p, pod)| p.contains("/pods/") && !pod["spec"]["nodeName"].is_null())
            .filter_map(|(_, pod)| pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"].as_str())
            .map(str::to_owned)
            .collect();
        for (path, claim) in self.objects.iter_mut() {
            if !path.contains("/persistentvolumeclaims/") || claim["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            if !used.iter().any(|u| claim["metadata"]["name"] == *u)
                && let Some(finalizers) = claim["metadata"]["finalizers"].as_array_mut()
            {
                finalizers.retain(|f| f != "kubernetes.io/pvc-protection");
            }
            if claim["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty()) {
                claim["metadata"]["gone"] = json!(true);
            }
        }
        // A volume's protection goes with its binding.
        for (_, pv) in self.objects.iter_mut().filter(|(p, _)| p.starts_with("/api/v1/persistentvolumes/")) {
            if pv["metadata"]["deletionTimestamp"].is_null() || pv["status"]["phase"] == "Bound" {
                continue;
            }
            if let Some(finalizers) = pv["metadata"]["finalizers"].as_array_mut() {
                finalizers.retain(|f| f != "kubernetes.io/pv-protection");
            }
            if pv["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty()) {
                pv["metadata"]["gone"] = json!(true);
            }
        }
        self.objects.retain(|_, o| o["metadata"]["gone"].is_null());
    }

    /// The volume binder: pre-bound pairs bind; volumes of claims gone are
    /// released. A volume bound in advance to a claim's name (no uid) while
    /// a claim of that name is bound to it makes that claim `Lost` and the
    /// volume `Available` for the next claim of the name, as Kubernetes'
    /// binder does (`syncBoundClaim`, `syncVolume`).
    fn bind(&mut self) {
        let claims: Vec<(String, Value)> = self.claims().map(|(p, c)| (p.clone(), c.clone())).collect();
        let volumes: Vec<(String, Value)> = self.volumes().map(|(p, v)| (p.clone(), v.clone())).collect();
        for (vpath, pv) in volumes {
            let r = &pv["spec"]["claimRef"];
            if r.is_null() {
                continue;
            }
            let claim = claims.iter().find(|(_, c)| {
                c["metadata"]["name"] == r["name"]
                    && c["metadata"]["namespace"] == r["namespace"]
                    && (r["uid"].is_null() || c["metadata"]["uid"] == r["uid"])
            });
            match claim {
                Some((cpath, c)) if r["uid"].is_null() && c["status"]["phase"] == "Bound" => {
                    if c["spec"]["volumeName"] == pv["metadata"]["name"] {
                        self.objects.get_mut(cpath).unwrap()["status"] = json!({ "phase": "Lost" });
                    }
                    self.objects.get_mut(&vpath).unwrap()["status"] = json!({ "phase": "Available" });
                }
                // Pre-bound (by name, or a claim naming the volume): it binds.
                // A claim once bound is never bound again (`Lost` is final).
                Some((cpath, c))
                    if pv["status"]["phase"] != "Bound"
                        && c["status"]["phase"] == "Pending"
                        && (c["spec"]["volumeName"].is_null() || c["spec"]["volumeName"] == pv["metadata"]["name"]) =>
                {
                    let uid = c["metadata"]["uid"].clone();
                    let v = self.objects.get_mut(&vpath).unwrap();
                    v["spec"]["claimRef"]["uid"] = uid;
                    v["status"] = json!({ "phase": "Bound" });
                    let claim = self.objects.get_mut(cpath).unwrap();
                    claim["spec"]["volumeName"] = pv["metadata"]["name"].clone();
                    claim["status"] = json!({ "phase": "Bound" });
                }
                None if r["uid"].is_null() && pv["status"]["phase"] != "Available" => {
                    self.objects.get_mut(&vpath).unwrap()["status"] = json!({ "phase": "Available" });
                }
                None if pv["status"]["phase"] == "Bound" => {
                    self.objects.get_mut(&vpath).unwrap()["status"] = json!({ "phase": "Released" });
                }
                _ => {}
            }
        }
    }

    /// Released volumes with reclaim policy Delete are deleted, the volume
    /// first (the provisioner), then the object.
    fn reclaim(&mut self) {
        let released: Vec<(String, Value)> = self
            .volumes()
            .filter(|(_, v)| {
                v["status"]["phase"] == "Released" && v["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
            })
            .map(|(p, v)| (p.clone(), v.clone()))
            .collect();
        for (path, pv) in released {
            self.deleted_volumes.push(pv["spec"]["csi"]["volumeHandle"].as_str().unwrap().to_owned());
            self.objects.remove(&path);
        }
    }

    /// What happens between sweeps: the StatefulSet makes its pod again, the
    /// scheduler places a pod whose claim is bound on its volume's node.
    fn settle(&mut self) {
        if !self.objects.contains_key("/api/v1/namespaces/db/pods/db-1") {
            self.objects.insert(
                "/api/v1/namespaces/db/pods/db-1".into(),
                json!({ "metadata": { "name": "db-1", "namespace": "db", "uid": "uid-pod-again" },
                        "spec": { "volumes": [ { "persistentVolumeClaim": { "claimName": "data-db-1" } } ] } }),
            );
        }
        if self.owner_makes_claims && !self.objects.contains_key(&claim_path("db", "data-db-1")) {
            self.serial += 1;
            self.objects.insert(
                claim_path("db", "data-db-1"),
                json!({ "metadata": { "name": "data-db-1", "namespace": "db", "uid": format!("uid-{}", self.serial),
                                      "labels": { "app": "db" }, "finalizers": ["kubernetes.io/pvc-protection"] },
                        "spec": { "accessModes": ["ReadWriteOnce"], "resources": { "requests": { "storage": "1Gi" } },
                                  "storageClassName": "loam" },
                        "status": { "phase": "Pending" } }),
            );
        }
        let pod = self.objects["/api/v1/namespaces/db/pods/db-1"].clone();
        if pod["spec"]["nodeName"].is_null()
            && let Some(claim) = self.objects.get(&claim_path("db", "data-db-1"))
            && claim["status"]["phase"] == "Bound"
        {
            let pv = &self.objects[&volume_path(claim["spec"]["volumeName"].as_str().unwrap())];
            let node = pv["spec"]["csi"]["volumeHandle"].as_str().unwrap().split_once('@').unwrap().1.to_owned();
            self.objects.get_mut("/api/v1/namespaces/db/pods/db-1").unwrap()["spec"]["nodeName"] = json!(node);
        }
        self.react();
    }
}

/// The label key of a `labelSelector=<key>` query (existence only).
fn query_label(query: &str) -> Option<String> {
    query.strip_prefix("labelSelector=").map(|key| key.replace("%2F", "/"))
}

/// Whether the object at `item` is in the list at `collection`.
fn in_collection(item: &str, collection: &str) -> bool {
    match collection {
        "/api/v1/persistentvolumeclaims" => item.contains("/persistentvolumeclaims/"),
        _ => item.strip_prefix(collection).is_some_and(|rest| rest.starts_with('/') && !rest[1..].contains('/')),
    }
}

/// A cluster with claim `db/data-db-1` bound to volume `pv-a` on node-a,
/// used by pod `db-1`, labelled to move to `to`.
fn cluster_moving_to(to: &str) -> Cluster {
    let mut c = Cluster::default();
    let handle = format!("{KEY_A}@node-a");
    c.objects.insert(
        volume_path("pv-a"),
        json!({
            "metadata": { "name": "pv-a", "uid": "uid-pv-a", "resourceVersion": "1",
                          "annotations": { PROVISIONED_BY: "loam.csi.dev" },
                          "finalizers": ["kubernetes.io/pv-protection", PROVISIONER_FINALIZER] },
            "spec": {
                "csi": { "driver": "loam.csi.dev", "volumeHandle": handle },
                "capacity": { "storage": "1Gi" },
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "loam",
                "volumeMode": "Filesystem",
                "persistentVolumeReclaimPolicy": "Delete",
                "claimRef": { "name": "data-db-1", "namespace": "db", "uid": "uid-claim" },
            },
            "status": { "phase": "Bound" },
        }),
    );
    c.objects.insert(
        claim_path("db", "data-db-1"),
        json!({
            "metadata": {
                "name": "data-db-1", "namespace": "db", "uid": "uid-claim", "resourceVersion": "1",
                "labels": { "app": "db", MOVE_TO_LABEL: to },
                "annotations": { "pv.kubernetes.io/bind-completed": "yes", "volume.kubernetes.io/selected-node": "node-a", "team": "data" },
                "finalizers": ["kubernetes.io/pvc-protection"],
            },
            "spec": { "accessModes": ["ReadWriteOnce"], "resources": { "requests": { "storage": "1Gi" } },
                      "storageClassName": "loam", "volumeMode": "Filesystem", "volumeName": "pv-a" },
            "status": { "phase": "Bound" },
        }),
    );
    c.objects.insert(
        "/api/v1/namespaces/db/pods/db-1".into(),
        json!({ "metadata": { "name": "db-1", "namespace": "db", "uid": "uid-pod" },
                "spec": { "nodeName": "node-a",
                          "volumes": [ { "persistentVolumeClaim": { "claimName": "data-db-1" } } ] } }),
    );
    for node in ["node-a", "node-b"] {
        c.objects.insert(format!("/api/v1/nodes/{node}"), json!({ "metadata": { "name": node } }));
    }
    c.objects.insert(
        "/apis/storage.k8s.io/v1/storageclasses/loam".into(),
        json!({ "metadata": { "name": "loam" }, "parameters": { "backend": "loop" } }),
    );
    c
}

/// The node agents as a move sees them: room on every node, and copies that
/// run for a few calls (ABORTED, as CreateVolume answers while it copies)
/// before they are done, idempotent by name.
struct FakeNodes {
    room: i64,
    /// The room of nodes that have other than `room`; none: no agent.
    rooms: BTreeMap<String, Option<i64>>,
    calls_per_copy: usize,
    state: Mutex<NodesState>,
}

#[derive(Default)]
struct NodesState {
    /// The class parameters each room check was asked with.
    asked: Vec<BTreeMap<String, String>>,
    /// CreateVolume calls by name.
    calls: BTreeMap<String, usize>,
    /// (source, target node) of each copy made, in order.
    copies: Vec<(String, String)>,
    /// The requests, the last by name.
    requests: BTreeMap<String, csi::CreateVolumeRequest>,
    /// Ids of the volumes copies made, whole or partial, not deleted.
    stored: std::collections::BTreeSet<String>,
    /// Ids of the volumes deleted, in order.
    deleted: Vec<String>,
}

impl FakeNodes {
    /// The volume id a copy named `name` gets on `node`.
    fn id_of(name: &str, node: &str) -> String {
        crate::ids::ObjectId::for_name(crate::ids::Kind::Volume, name, node).to_string()
    }
}

impl Nodes for FakeNodes {
    fn available<'a>(
        &'a self,
        node: &'a str,
        parameters: BTreeMap<String, String>,
    ) -> Pending<'a, Result<i64, String>> {
        self.state.lock().unwrap().asked.push(parameters);
        let room = self.rooms.get(node).copied().unwrap_or(Some(self.room));
        Box::pin(async move { room.ok_or_else(|| format!("no agent on node {node}")) })
    }

    fn copy(&self, request: csi::CreateVolumeRequest) -> Pending<'_, Result<csi::Volume, tonic::Status>> {
        let mut state = self.state.lock().unwrap();
        let node =
            request.accessibility_requirements.as_ref().unwrap().requisite[0].segments[TOPOLOGY_NODE_KEY].clone();
        let id = FakeNodes::id_of(&request.name, &node);
        // Partial storage from the first call on, as a receiving node has.
        state.stored.insert(id.clone());
        let calls = state.calls.entry(request.name.clone()).or_default();
        *calls += 1;
        let answer = if *calls < self.calls_per_copy {
            Err(tonic::Status::aborted(format!("being copied: call {calls}")))
        } else {
            let Some(csi::volume_content_source::Type::Volume(source)) =
                request.volume_content_source.as_ref().and_then(|s| s.r#type.clone())
            else {
                panic!("a copy without a source volume: {request:?}")
            };
            if *calls == self.calls_per_copy {
                state.copies.push((source.volume_id.clone(), node));
            }
            Ok(csi::Volume {
                volume_id: id,
                capacity_bytes: request.capacity_range.as_ref().unwrap().required_bytes,
                volume_context: [("loam.csi.dev/backend".to_owned(), "loop".to_owned())].into(),
                ..Default::default()
            })
        };
        state.requests.insert(request.name.clone(), request);
        Box::pin(async move { answer })
    }

    /// A copy still running holds its volume: ABORTED until it ends (each
    /// call takes as long as a CreateVolume call does).
    fn delete(&self, id: String) -> Pending<'_, Result<(), tonic::Status>> {
        let mut state = self.state.lock().unwrap();
        let name = state.requests.keys().find(|name| {
            let node = &state.requests[*name].accessibility_requirements.as_ref().unwrap().requisite[0].segments
                [TOPOLOGY_NODE_KEY];
            FakeNodes::id_of(name, node) == id
        });
        let answer = match name.cloned() {
            Some(name) if state.calls[&name] < self.calls_per_copy => {
                *state.calls.get_mut(&name).unwrap() += 1;
                Err(tonic::Status::aborted("an operation on volume is already in progress"))
            }
            _ => {
                if state.stored.remove(&id) {
                    state.deleted.push(id);
                }
                Ok(())
            }
        };
        Box::pin(async move { answer })
    }
}

async fn moves_for(cluster: &Arc<Mutex<Cluster>>, room: i64, dir: &std::path::Path) -> (Moves, Arc<FakeNodes>) {
    let model = cluster.clone();
    let port =
        fake::serve_with(dir, Arc::new(move |call: &str, body: &Value| model.lock().unwrap().handle(call, body))).await;
    let api = Arc::new(KubeApi::at("127.0.0.1".into(), port, dir).unwrap());
    let nodes = Arc::new(FakeNodes { room, rooms: BTreeMap::new(), calls_per_copy: 3, state: Mutex::default() });
    (Moves::new(api, nodes.clone(), "loam.csi.dev".into()), nodes)
}

/// Sweeps until the move is done (at most `limit` sweeps); the stages seen.
async fn sweep_until_done(moves: &Moves, cluster: &Arc<Mutex<Cluster>>, limit: usize) -> Vec<Stage> {
    let mut seen = Vec::new();
    for _ in 0..limit {
        let stages = moves.sweep().await;
        cluster.lock().unwrap().settle();
        let done = stages.get("pv-a") == Some(&Stage::Done);
        seen.extend(stages.into_values());
        if done {
            break;
        }
    }
    seen
}

/// The state a finished move must leave, whatever happened on the way.
fn assert_moved(c: &Cluster, copies: &[(String, String)]) {
    let claim = c.get(&claim_path("db", "data-db-1")).expect("the claim keeps its name");
    assert_eq!(claim["status"]["phase"], "Bound", "{claim}");
    assert_eq!(claim["metadata"]["labels"], json!({ "app": "db" }), "labels kept, the move's label gone");
    if !c.owner_makes_claims {
        assert_eq!(claim["metadata"]["annotations"], json!({ "team": "data" }), "the old binding's annotations gone");
    }
    assert!(
        !claim["metadata"]["finalizers"].as_array().unwrap().iter().any(|f| f == FINALIZER),
        "the move's finalizer is not on the new claim"
    );
    let new_name = claim["spec"]["volumeName"].as_str().unwrap();
    assert_ne!(new_name, "pv-a");
    let new_pv = c.get(&volume_path(new_name)).unwrap();
    let handle = new_pv["spec"]["csi"]["volumeHandle"].as_str().unwrap();
    assert!(handle.ends_with("@node-b"), "the volume is on node-b: {handle}");
    assert_eq!(new_pv["spec"]["claimRef"]["uid"], claim["metadata"]["uid"]);
    assert_eq!(new_pv["spec"]["persistentVolumeReclaimPolicy"], "Delete", "the reclaim policy is the old one");
    assert_eq!(new_pv["metadata"]["annotations"][PROVISIONED_BY], "loam.csi.dev", "deleted by the provisioner later");
    assert_eq!(new_pv["metadata"]["annotations"][MOVED_FROM_ANNOTATION], "pv-a");
    assert!(new_pv["metadata"]["annotations"][PLAN_ANNOTATION].is_null());
    assert_eq!(
        new_pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"],
        json!(["node-b"])
    );
    assert_eq!(new_pv["spec"]["csi"]["volumeAttributes"]["loam.csi.dev/backend"], "loop");
    assert_eq!(copies, [(format!("{KEY_A}@node-a"), "node-b".to_owned())], "one copy, from the old volume");
    assert_eq!(c.deleted_volumes, [format!("{KEY_A}@node-a")], "the old volume deleted, the copy never");
    assert!(c.get(&volume_path("pv-a")).is_none(), "the old PersistentVolume is gone");
    let handles: Vec<&str> = c.volumes().filter_map(|(_, v)| v["spec"]["csi"]["volumeHandle"].as_str()).collect();
    assert_eq!(handles, [handle], "one PersistentVolume names the copy");
    let pod = c.get("/api/v1/namespaces/db/pods/db-1").unwrap();
    assert_eq!(pod["spec"]["nodeName"], "node-b", "the pod runs on the new node");
}

#[tokio::test]
async fn a_claim_moves_to_another_node_keeping_its_name_and_the_old_volume_goes_last() {
    for owner_makes_claims in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Arc::new(Mutex::new(cluster_moving_to("node-b")));
        cluster.lock().unwrap().owner_makes_claims = owner_makes_claims;
        let (moves, nodes) = moves_for(&cluster, 4 * GI, dir.path()).await;
        let stages = sweep_until_done(&moves, &cluster, 30).await;
        assert_eq!(stages.last(), Some(&Stage::Done), "{stages:?}");
        let c = cluster.lock().unwrap();
        let state = nodes.state.lock().unwrap();
        assert_moved(&c, &state.copies);
        assert_eq!(state.asked, [BTreeMap::from([("backend".to_owned(), "loop".to_owned())])]);
        let request = state.requests.values().next().unwrap();
        assert_eq!(request.capacity_range.as_ref().unwrap().required_bytes, GI, "the old volume's size");
        assert_eq!(request.parameters.get("backend").map(String::as_str), Some("loop"), "the class's parameters");
        let reasons: Vec<&str> = c.events.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(reasons, ["MoveStarted", "Moved"]);
        assert!(!stages.iter().any(|s| matches!(s, Stage::Blocked(_))), "{stages:?}");
    }
}

#[tokio::test]
async fn the_volume_is_copied_only_once_no_pod_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(Mutex::new(cluster_moving_to("node-b")));
    cluster.lock().unwrap().owner_makes_claims = true;
    // The pod does not stop at once: a finalizer of its own holds it.
    cluster.lock().unwrap().objects.get_mut("/api/v1/namespaces/db/pods/db-1").unwrap()["metadata"]["finalizers"] =
        json!(["test/slow-to-stop"]);
    let (moves, nodes) = moves_for(&cluster, 4 * GI, dir.path()).await;
    for _ in 0..5 {
        moves.sweep().await;
        cluster.lock().unwrap().settle();
    }
    assert!(nodes.state.lock().unwrap().calls.is_empty(), "no copy while the pod runs");
    {
        let c = cluster.lock().unwrap();
        let claim = &c.objects[&claim_path("db", "data-db-1")];
        assert_eq!(claim["metadata"]["uid"], "uid-claim", "the claim is held: its owner cannot make another");
        assert!(!claim["metadata"]["deletionTimestamp"].is_null());
    }
    cluster.lock().unwrap().objects.remove("/api/v1/namespaces/db/pods/db-1");
    let stages = sweep_until_done(&moves, &cluster, 30).await;
    assert_eq!(stages.last(), Some(&Stage::Done), "{stages:?}");
    assert_moved(&cluster.lock().unwrap(), &nodes.state.lock().unwrap().copies);
}

#[tokio::test]
async fn a_move_converges_whichever_request_fails_or_loses_its_answer() {
    // Count the requests a clean move makes, then fail each one in turn.
    for owner_makes_claims in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let clean = Arc::new(Mutex::new(cluster_moving_to("node-b")));
        clean.lock().unwrap().owner_makes_claims = owner_makes_claims;
        let (moves, _) = moves_for(&clean, 4 * GI, dir.path()).await;
        sweep_until_done(&moves, &clean, 30).await;
        let total = clean.lock().unwrap().mutations;
        assert!(total > 8, "{total}");
        for n in 1..=total {
            for failure in [Failure::Refused, Failure::AnswerLost] {
                let dir = tempfile::tempdir().unwrap();
                let cluster = Arc::new(Mutex::new(cluster_moving_to("node-b")));
                cluster.lock().unwrap().owner_makes_claims = owner_makes_claims;
                cluster.lock().unwrap().fail = Some((n, failure));
                // A controller that restarts after the failure knows only the cluster.
                let (first, first_nodes) = moves_for(&cluster, 4 * GI, dir.path()).await;
                first.sweep().await;
                cluster.lock().unwrap().settle();
                let (second, second_nodes) = moves_for(&cluster, 4 * GI, dir.path()).await;
                let stages = sweep_until_done(&second, &cluster, 40).await;
                let c = cluster.lock().unwrap();
                // Done, or done with the answer of its last request lost:
                // the old volume (and the move's record on it) went at once.
                let finished = stages.last() == Some(&Stage::Done) || c.get(&volume_path("pv-a")).is_none();
                assert!(finished, "request {n} {failure:?}: {stages:?}");
                assert!(c.events.iter().any(|(reason, _)| reason == "Moved"), "request {n} {failure:?}");
                let mut copies = first_nodes.state.lock().unwrap().copies.clone();
                copies.extend(second_nodes.state.lock().unwrap().copies.clone());
                assert_moved(&c, &copies);
            }
        }
    }
}

#[tokio::test]
async fn moves_that_cannot_be_done_are_refused_with_an_event_and_change_nothing() {
    for (to, room, why) in [
        ("node-a", 4 * GI, "is on node node-a already"),
        ("node-z", 4 * GI, "node-z is not a node"),
        ("node-b", GI / 2, "node node-b has 536870912 bytes free"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Arc::new(Mutex::new(cluster_moving_to(to)));
        let before = cluster.lock().unwrap().objects[&volume_path("pv-a")].clone();
        let (moves, nodes) = moves_for(&cluster, room, dir.path()).await;
        let stages = moves.sweep().await;
        assert!(stages.is_empty(), "{stages:?}");
        let c = cluster.lock().unwrap();
        assert_eq!(c.objects[&volume_path("pv-a")], before, "{to}: the volume is untouched");
        let claim = &c.objects[&claim_path("db", "data-db-1")];
        assert!(claim["metadata"]["labels"][MOVE_TO_LABEL].is_null(), "{to}: the label comes off");
        assert_eq!(claim["spec"]["volumeName"], "pv-a");
        assert!(claim["metadata"]["deletionTimestamp"].is_null(), "{to}: the claim stays");
        assert_eq!(c.events.len(), 1, "{to}");
        assert_eq!(c.events[0].0, "MoveRefused");
        assert!(c.events[0].1.contains(why), "{to}: {}", c.events[0].1);
        assert!(nodes.state.lock().unwrap().calls.is_empty() && c.deleted_volumes.is_empty());
    }
}

#[tokio::test]
async fn a_claim_bound_elsewhere_meanwhile_stops_the_move_and_keeps_the_old_volume() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(Mutex::new(cluster_moving_to("node-b")));
    let (moves, _) = moves_for(&cluster, 4 * GI, dir.path()).await;
    // Until the claim is let go (held, deleted, the pod stopped, copied).
    let mut stages = BTreeMap::new();
    for _ in 0..10 {
        stages = moves.sweep().await;
        if cluster.lock().unwrap().get(&claim_path("db", "data-db-1")).is_none() {
            break;
        }
    }
    assert!(cluster.lock().unwrap().get(&claim_path("db", "data-db-1")).is_none(), "{stages:?}");
    // Someone makes a claim of that name bound to a volume of its own.
    cluster.lock().unwrap().objects.insert(
        claim_path("db", "data-db-1"),
        json!({ "metadata": { "name": "data-db-1", "namespace": "db", "uid": "uid-other",
                              "finalizers": ["kubernetes.io/pvc-protection"] },
                "spec": { "accessModes": ["ReadWriteOnce"], "storageClassName": "loam", "volumeName": "pv-other" },
                "status": { "phase": "Bound" } }),
    );
    let stages = moves.sweep().await;
    let Some(Stage::Blocked(why)) = stages.get("pv-a") else { panic!("{stages:?}") };
    assert!(why.contains("is bound to volume pv-other"), "{why}");
    assert_eq!(moves.sweep().await.get("pv-a"), stages.get("pv-a"), "still blocked");
    let c = cluster.lock().unwrap();
    assert_eq!(c.objects[&claim_path("db", "data-db-1")]["metadata"]["uid"], "uid-other", "not touched");
    let blocked = c.events.iter().filter(|(reason, _)| reason == "MoveBlocked").count();
    assert_eq!(blocked, 1, "one event for a reason, not one per sweep");
    assert!(c.deleted_volumes.is_empty(), "the old volume is kept");
    assert_eq!(c.objects[&volume_path("pv-a")]["spec"]["persistentVolumeReclaimPolicy"], "Retain");
}

/// How an operator takes a move back.
#[derive(Debug, Clone, Copy)]
enum Cancel {
    /// `kubectl label pvc data-db-1 loam.csi.dev/move-to-`
    Unlabel,
    /// `kubectl label pvc data-db-1 --overwrite loam.csi.dev/move-to=node-a`
    BackToItsNode,
}

/// Cancels the move on the claim the move started with, if it is still there.
fn cancel(c: &mut Cluster, how: Cancel) {
    let Some(claim) = c.objects.get_mut(&claim_path("db", "data-db-1")) else { return };
    if claim["metadata"]["uid"] != "uid-claim" {
        return;
    }
    let labels = claim["metadata"]["labels"].as_object_mut().unwrap();
    match how {
        Cancel::Unlabel => labels.remove(MOVE_TO_LABEL),
        Cancel::BackToItsNode => labels.insert(MOVE_TO_LABEL.into(), json!("node-a")),
    };
}

/// Whether the copy's PersistentVolume was made: past the point of cancelling.
fn copy_volume_made(c: &Cluster) -> bool {
    c.volumes().any(|(_, v)| !v["metadata"]["annotations"][MOVED_FROM_ANNOTATION].is_null())
}

/// Sweeps until the move of pv-a is over (at most `limit` sweeps), with a
/// fresh controller after the first sweep in which the model failed a
/// request: it knows only the cluster. Whether it is over.
async fn sweep_until_over(
    cluster: &Arc<Mutex<Cluster>>,
    dir: &std::path::Path,
    limit: usize,
    nodes: &Arc<FakeNodes>,
) -> bool {
    let mut moves = moves_with(cluster, dir, nodes.clone()).await;
    let mut fresh = false;
    for _ in 0..limit {
        let stages = moves.sweep().await;
        cluster.lock().unwrap().settle();
        let (over, failed) = {
            let c = cluster.lock().unwrap();
            let over = matches!(stages.get("pv-a"), Some(Stage::Cancelled))
                || c.get(&volume_path("pv-a")).is_none_or(|pv| pv["metadata"]["labels"][MOVING_LABEL].is_null());
            (over, c.fail.is_some_and(|(n, _)| c.mutations >= n))
        };
        if over {
            return true;
        }
        if failed && !fresh {
            fresh = true;
            moves = moves_with(cluster, dir, nodes.clone()).await;
        }
    }
    false
}

async fn moves_with(cluster: &Arc<Mutex<Cluster>>, dir: &std::path::Path, nodes: Arc<FakeNodes>) -> Moves {
    let model = cluster.clone();
    let port =
        fake::serve_with(dir, Arc::new(move |call: &str, body: &Value| model.lock().unwrap().handle(call, body))).await;
    let api = Arc::new(KubeApi::at("127.0.0.1".into(), port, dir).unwrap());
    Moves::new(api, nodes, "loam.csi.dev".into())
}

fn fake_nodes() -> Arc<FakeNodes> {
    Arc::new(FakeNodes { room: 4 * GI, rooms: BTreeMap::new(), calls_per_copy: 3, state: Mutex::default() })
}

/// The state a cancelled move must leave: the claim bound to its old volume,
/// as it was, nothing of the copy left anywhere.
fn assert_cancelled(c: &Cluster, nodes: &NodesState, what: &str) {
    let claim = c.get(&claim_path("db", "data-db-1")).unwrap_or_else(|| panic!("{what}: the claim is there"));
    assert_eq!(claim["status"]["phase"], "Bound", "{what}: {claim}");
    assert_eq!(claim["spec"]["volumeName"], "pv-a", "{what}: bound to its old volume");
    assert!(claim["metadata"]["deletionTimestamp"].is_null(), "{what}: {claim}");
    assert_eq!(claim["metadata"]["labels"], json!({ "app": "db" }), "{what}: the move's label gone");
    assert!(
        !claim["metadata"]["finalizers"].as_array().unwrap().iter().any(|f| f == FINALIZER),
        "{what}: the move's finalizer is gone"
    );
    let pv = c.get(&volume_path("pv-a")).unwrap_or_else(|| panic!("{what}: the old volume is kept"));
    assert_eq!(pv["status"]["phase"], "Bound", "{what}: {pv}");
    assert_eq!(pv["spec"]["claimRef"]["uid"], claim["metadata"]["uid"], "{what}");
    assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Delete", "{what}: its reclaim policy is back");
    assert!(pv["metadata"]["labels"][MOVING_LABEL].is_null(), "{what}: {pv}");
    assert!(pv["metadata"]["annotations"][PLAN_ANNOTATION].is_null(), "{what}: {pv}");
    assert_eq!(c.volumes().count(), 1, "{what}: no PersistentVolume for the copy");
    assert!(c.deleted_volumes.is_empty(), "{what}: the old volume is not deleted");
    assert!(nodes.stored.is_empty(), "{what}: the copy is deleted: {:?}", nodes.stored);
    let pod = c.get("/api/v1/namespaces/db/pods/db-1").unwrap();
    assert_eq!(pod["spec"]["nodeName"], "node-a", "{what}: the pod runs on the old node");
    let reasons: Vec<&str> = c.events.iter().map(|(r, _)| r.as_str()).collect();
    if reasons.contains(&"MoveStarted") {
        assert!(reasons.contains(&"MoveCancelled"), "{what}: {reasons:?}");
    }
    assert!(!reasons.contains(&"Moved"), "{what}: {reasons:?}");
}

/// How many sweeps a clean move makes before its copy's volume exists: the
/// sweeps after which it can still be cancelled.
async fn sweeps_before_the_copy_volume(owner_makes_claims: bool) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(Mutex::new(cluster_moving_to("node-b")));
    cluster.lock().unwrap().owner_makes_claims = owner_makes_claims;
    let moves = moves_with(&cluster, dir.path(), fake_nodes()).await;
    let mut sweeps = 0;
    loop {
        moves.sweep().await;
        cluster.lock().unwrap().settle();
        if copy_volume_made(&cluster.lock().unwrap()) {
            return sweeps;
        }
        sweeps += 1;
    }
}

/// A move labelled, swept `before` times, then cancelled `how`; `fail` as
/// the model's. Whether it converged, the cluster and the nodes.
async fn cancelled_move(
    owner_makes_claims: bool,
    before: usize,
    how: Cancel,
    fail: Option<(usize, Failure)>,
) -> (bool, Arc<Mutex<Cluster>>, Arc<FakeNodes>) {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(Mutex::new(cluster_moving_to("node-b")));
    cluster.lock().unwrap().owner_makes_claims = owner_makes_claims;
    cluster.lock().unwrap().fail = fail;
    let nodes = fake_nodes();
    let first = moves_with(&cluster, dir.path(), nodes.clone()).await;
    for _ in 0..before {
        first.sweep().await;
        cluster.lock().unwrap().settle();
    }
    cancel(&mut cluster.lock().unwrap(), how);
    let over = sweep_until_over(&cluster, dir.path(), 40, &nodes).await;
    (over, cluster, nodes)
}

#[tokio::test]
async fn a_move_cancelled_before_its_copy_has_a_volume_gives_the_claim_its_old_volume_back() {
    for owner_makes_claims in [false, true] {
        let cancellable = sweeps_before_the_copy_volume(owner_makes_claims).await;
        assert!(cancellable >= 4, "held, deleted, copying: {cancellable}");
        for before in 1..=cancellable {
            for how in [Cancel::Unlabel, Cancel::BackToItsNode] {
                let what = format!("owner makes claims {owner_makes_claims}, cancelled after {before} sweeps {how:?}");
                let (over, cluster, nodes) = cancelled_move(owner_makes_claims, before, how, None).await;
                assert!(over, "{what}");
                let c = cluster.lock().unwrap();
                let state = nodes.state.lock().unwrap();
                assert_cancelled(&c, &state, &what);
                let reasons: Vec<&str> = c.events.iter().map(|(r, _)| r.as_str()).collect();
                assert_eq!(reasons, ["MoveStarted", "MoveCancelled"], "{what}");
                if before >= 4 {
                    assert!(!state.calls.is_empty(), "{what}: the copy had started");
                    assert_eq!(state.deleted.len(), 1, "{what}: the partial copy deleted through the router");
                }
            }
        }
    }
}

#[tokio::test]
async fn a_cancel_converges_whichever_request_fails_or_loses_its_answer() {
    for owner_makes_claims in [false, true] {
        let cancellable = sweeps_before_the_copy_volume(owner_makes_claims).await;
        for before in 1..=cancellable {
            let (_, clean, _) = cancelled_move(owner_makes_claims, before, Cancel::Unlabel, None).await;
            let total = clean.lock().unwrap().mutations;
            for n in 1..=total {
                for failure in [Failure::Refused, Failure::AnswerLost] {
                    let what = format!(
                        "owner makes claims {owner_makes_claims}, cancelled after {before} sweeps, \
                                        request {n} {failure:?}"
                    );
                    let (over, cluster, nodes) =
                        cancelled_move(owner_makes_claims, before, Cancel::Unlabel, Some((n, failure))).await;
                    assert!(over, "{what}");
                    assert_cancelled(&cluster.lock().unwrap(), &nodes.state.lock().unwrap(), &what);
                }
            }
        }
    }
}

#[tokio::test]
async fn once_the_copy_has_its_volume_taking_the_label_off_no_longer_cancels_and_says_so() {
    // The claim is let go in the sweep that makes the copy's volume: fail
    // that request, so the old claim, still labelled, outlives the volume.
    let dir = tempfile::tempdir().unwrap();
    let clean = Arc::new(Mutex::new(cluster_moving_to("node-b")));
    let (moves, _) = moves_for(&clean, 4 * GI, dir.path()).await;
    sweep_until_done(&moves, &clean, 30).await;
    let log = clean.lock().unwrap().log.clone();
    let made = log.iter().position(|call| call == "POST /api/v1/persistentvolumes").unwrap();
    let claim = format!("PATCH {}", claim_path("db", "data-db-1"));
    let release = made + log[made..].iter().position(|call| *call == claim).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(Mutex::new(cluster_moving_to("node-b")));
    cluster.lock().unwrap().fail = Some((release + 1, Failure::Refused));
    let (moves, nodes) = moves_for(&cluster, 4 * GI, dir.path()).await;
    while cluster.lock().unwrap().mutations <= release {
        moves.sweep().await;
        cluster.lock().unwrap().settle();
    }
    assert!(copy_volume_made(&cluster.lock().unwrap()));
    cancel(&mut cluster.lock().unwrap(), Cancel::Unlabel);
    let stages = sweep_until_done(&moves, &cluster, 30).await;
    assert_eq!(stages.last(), Some(&Stage::Done), "{stages:?}");
    let c = cluster.lock().unwrap();
    assert_moved(&c, &nodes.state.lock().unwrap().copies);
    let reasons: Vec<&str> = c.events.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(reasons, ["MoveStarted", "MoveNotCancelled", "Moved"]);
    assert!(c.events[1].1.contains("can no longer be cancelled"), "{}", c.events[1].1);
}

/// A cluster whose claim is labelled `move-to=any`, with a node of each kind
/// a move may not choose, and two it may (node-f, with the most room, and
/// node-b); the room each node's agent has.
fn cluster_moving_to_any() -> (Cluster, BTreeMap<String, Option<i64>>) {
    let mut c = cluster_moving_to(ANY_NODE);
    let ready = json!([{ "type": "Ready", "status": "True" }]);
    let nodes = [
        ("node-a", json!({}), ready.clone()),
        ("node-b", json!({}), ready.clone()),
        ("node-c", json!({ "unschedulable": true }), ready.clone()),
        ("node-d", json!({}), json!([{ "type": "Ready", "status": "False" }])),
        (
            "node-e",
            json!({ "taints": [{ "key": "dedicated", "value": "gpu", "effect": "NoSchedule" }] }),
            ready.clone(),
        ),
        (
            "node-f",
            json!({ "taints": [{ "key": "storage", "value": "big", "effect": "NoSchedule" },
                                      { "key": "loud", "effect": "PreferNoSchedule" }] }),
            ready.clone(),
        ),
        ("node-g", json!({}), ready.clone()),
        ("node-h", json!({}), ready),
    ];
    for (name, spec, conditions) in nodes {
        c.objects.insert(
            format!("/api/v1/nodes/{name}"),
            json!({ "metadata": { "name": name }, "spec": spec, "status": { "conditions": conditions } }),
        );
    }
    c.objects.get_mut("/api/v1/namespaces/db/pods/db-1").unwrap()["spec"]["tolerations"] =
        json!([{ "key": "storage", "operator": "Equal", "value": "big", "effect": "NoSchedule" }]);
    let rooms = [
        ("node-a", Some(20 * GI)),
        ("node-b", Some(2 * GI)),
        ("node-c", Some(20 * GI)),
        ("node-d", Some(20 * GI)),
        ("node-e", Some(20 * GI)),
        ("node-f", Some(3 * GI)),
        ("node-g", None),
        ("node-h", Some(GI / 2)),
    ];
    (c, rooms.into_iter().map(|(n, r)| (n.to_owned(), r)).collect())
}

#[tokio::test]
async fn a_claim_labelled_any_moves_to_the_schedulable_node_with_the_most_room() {
    let dir = tempfile::tempdir().unwrap();
    let (c, rooms) = cluster_moving_to_any();
    let cluster = Arc::new(Mutex::new(c));
    let nodes = Arc::new(FakeNodes { room: 4 * GI, rooms, calls_per_copy: 3, state: Mutex::default() });
    let moves = moves_with(&cluster, dir.path(), nodes.clone()).await;
    let stages = sweep_until_done(&moves, &cluster, 30).await;
    assert_eq!(stages.last(), Some(&Stage::Done), "{stages:?}");
    let c = cluster.lock().unwrap();
    let claim = &c.objects[&claim_path("db", "data-db-1")];
    let pv = &c.objects[&volume_path(claim["spec"]["volumeName"].as_str().unwrap())];
    let handle = pv["spec"]["csi"]["volumeHandle"].as_str().unwrap();
    assert!(handle.ends_with("@node-f"), "the tolerated node with the most room: {handle}");
    assert_eq!(c.objects["/api/v1/namespaces/db/pods/db-1"]["spec"]["nodeName"], "node-f");
    assert_eq!(nodes.state.lock().unwrap().copies, [(format!("{KEY_A}@node-a"), "node-f".to_owned())]);
    let reasons: Vec<&str> = c.events.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(reasons, ["MoveStarted", "Moved"]);
    assert!(c.events[0].1.contains("to node node-f (chosen by the controller"), "{}", c.events[0].1);
}

#[tokio::test]
async fn a_claim_labelled_any_is_not_moved_next_to_a_replica_its_pods_anti_affinity_avoids() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, rooms) = cluster_moving_to_any();
    // The StatefulSet's other replica runs on node-f, the node with the most
    // room; db-1 must not run beside it.
    let apart = json!({ "podAntiAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": [
        { "topologyKey": "kubernetes.io/hostname", "labelSelector": { "matchLabels": { "app": "db" } } },
    ] } });
    for (path, node) in c.objects.iter_mut().filter(|(path, _)| path.starts_with("/api/v1/nodes/")) {
        node["metadata"]["labels"] = json!({ "kubernetes.io/hostname": path.trim_start_matches("/api/v1/nodes/") });
    }
    let db1 = c.objects.get_mut("/api/v1/namespaces/db/pods/db-1").unwrap();
    db1["metadata"]["labels"] = json!({ "app": "db" });
    db1["spec"]["affinity"] = apart.clone();
    let mut db0 = db1.clone();
    db0["metadata"]["name"] = json!("db-0");
    db0["metadata"]["uid"] = json!("uid-db-0");
    db0["spec"]["nodeName"] = json!("node-f");
    db0["spec"]["volumes"] = json!([{ "persistentVolumeClaim": { "claimName": "data-db-0" } }]);
    c.objects.insert("/api/v1/namespaces/db/pods/db-0".into(), db0);
    let cluster = Arc::new(Mutex::new(c));
    let nodes = Arc::new(FakeNodes { room: 4 * GI, rooms, calls_per_copy: 3, state: Mutex::default() });
    let moves = moves_with(&cluster, dir.path(), nodes.clone()).await;
    let stages = sweep_until_done(&moves, &cluster, 30).await;
    assert_eq!(stages.last(), Some(&Stage::Done), "{stages:?}");
    let c = cluster.lock().unwrap();
    assert_eq!(nodes.state.lock().unwrap().copies, [(format!("{KEY_A}@node-a"), "node-b".to_owned())]);
    assert_eq!(c.objects["/api/v1/namespaces/db/pods/db-1"]["spec"]["nodeName"], "node-b", "not beside db-0");
}

#[tokio::test]
async fn a_claim_labelled_any_waits_with_the_reasons_while_no_node_can_take_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, mut rooms) = cluster_moving_to_any();
    // node-b and node-f, the nodes that could, cannot either.
    c.objects.get_mut("/api/v1/namespaces/db/pods/db-1").unwrap()["spec"]["tolerations"] = json!([]);
    rooms.insert("node-b".into(), Some(GI / 4));
    let cluster = Arc::new(Mutex::new(c));
    let nodes = Arc::new(FakeNodes { room: 4 * GI, rooms, calls_per_copy: 3, state: Mutex::default() });
    let moves = moves_with(&cluster, dir.path(), nodes.clone()).await;
    for _ in 0..3 {
        assert!(moves.sweep().await.is_empty(), "no move starts");
        cluster.lock().unwrap().settle();
    }
    {
        let c = cluster.lock().unwrap();
        assert!(c.objects[&volume_path("pv-a")]["metadata"]["labels"][MOVING_LABEL].is_null());
        assert_eq!(c.objects[&claim_path("db", "data-db-1")]["metadata"]["labels"][MOVE_TO_LABEL], ANY_NODE, "kept");
        assert_eq!(c.events.len(), 1, "one event for a reason, not one per sweep: {:?}", c.events);
        let (reason, message) = &c.events[0];
        assert_eq!(reason, "MoveBlocked");
        for why in [
            "the volume needs 1073741824 bytes",
            "node-a is the volume's node",
            "node-b has 268435456 bytes free for class loam",
            "node-c is cordoned",
            "node-d is not Ready",
            "node-e has the taint dedicated=gpu:NoSchedule, which the claim's pods do not tolerate",
            "node-f has the taint storage=big:NoSchedule",
            "node-g: no Loam agent answers (no agent on node node-g)",
            "node-h has 536870912 bytes free",
        ] {
            assert!(message.contains(why), "{why:?} in {message}");
        }
        assert!(nodes.state.lock().unwrap().calls.is_empty());
    }
    // A node that can take it comes: the move starts.
    cluster.lock().unwrap().objects.get_mut("/api/v1/nodes/node-c").unwrap()["spec"] = json!({});
    let stages = sweep_until_done(&moves, &cluster, 30).await;
    assert_eq!(stages.last(), Some(&Stage::Done), "{stages:?}");
    let c = cluster.lock().unwrap();
    assert_eq!(c.objects["/api/v1/namespaces/db/pods/db-1"]["spec"]["nodeName"], "node-c");
}
