//! Replicas that come back after their node is gone for good.
//!
//! A StatefulSet replica whose node was deleted stays Pending forever:
//! its PersistentVolumeClaim is bound to a volume that lived on that node,
//! and the scheduler cannot place the pod anywhere else ("volume node
//! affinity conflict"). For claims that opt in with the annotation
//! `loam.csi.dev/on-node-loss: recreate` (on the claim, or on the
//! StatefulSet's volumeClaimTemplates, which copy it), the controller does
//! what an operator would, once the node counts as gone
//! ([`super::cluster::GoneNodes`]): it deletes the claim, then the pods
//! that use it (so the claim's protection lets go), and records a Warning
//! event `NodeLost` on the claim saying so. The StatefulSet then makes a
//! new claim from its template, provisioned on a live node: the replica
//! starts empty (its data went with the node) and resyncs as the
//! application does. The released PersistentVolume is deleted by its
//! reclaim policy, which [`super::router`] lets succeed for a gone node.
//!
//! Claims without the annotation are left as they are: the operator
//! decides (see docs/operate.md).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};

use crate::ids::ObjectId;
use crate::routing::cluster::{GoneNodes, Verdict};
use crate::routing::kube::{self, EventType, Involved, KubeApi};

/// The annotation a claim opts in with, and its one value.
pub const ANNOTATION: &str = "loam.csi.dev/on-node-loss";
/// The value that asks for a new claim on a live node.
pub const RECREATE: &str = "recreate";

/// A claim recreated by one sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recreated {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub claim: String,
    /// The node that is gone.
    pub node: String,
    /// The pods deleted with it.
    pub pods: Vec<String>,
}

/// The sweep: which claims of gone nodes to recreate.
#[derive(Debug)]
pub struct NodeLoss {
    api: Arc<KubeApi>,
    gone_nodes: Arc<GoneNodes>,
    driver_name: String,
}

/// A bound PersistentVolume of this driver, as the sweep needs it.
struct Bound {
    pv: String,
    node: String,
    namespace: String,
    claim: String,
}

impl NodeLoss {
    /// Sweeps claims of `driver_name`'s volumes through `api`, judging nodes
    /// with `gone_nodes`.
    pub fn new(api: Arc<KubeApi>, gone_nodes: Arc<GoneNodes>, driver_name: String) -> NodeLoss {
        NodeLoss { api, gone_nodes, driver_name }
    }

    /// Sweeps every `every` until the task is dropped.
    pub async fn run(self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            self.sweep().await;
        }
    }

    /// One pass: recreates the opted-in claims of volumes on gone nodes.
    pub async fn sweep(&self) -> Vec<Recreated> {
        let volumes = match self.api.call(Method::GET, "/api/v1/persistentvolumes", None).await {
            Ok((200, list)) => list,
            Ok((status, _)) => {
                tracing::warn!(
                    status,
                    "cannot list PersistentVolumes to find volumes of gone nodes; check the controller's RBAC (list persistentvolumes)"
                );
                return Vec::new();
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list PersistentVolumes to find volumes of gone nodes");
                return Vec::new();
            }
        };
        let mut by_node: BTreeMap<String, Vec<Bound>> = BTreeMap::new();
        for bound in bound_volumes(&volumes, &self.driver_name) {
            by_node.entry(bound.node.clone()).or_default().push(bound);
        }
        let mut recreated = Vec::new();
        for (node, volumes) in by_node {
            let Verdict::Gone(missing) = self.gone_nodes.verdict(&node).await else { continue };
            for bound in volumes {
                match self.recreate(&bound, missing).await {
                    Ok(Some(done)) => recreated.push(done),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(
                        namespace = %bound.namespace,
                        claim = %bound.claim,
                        %node,
                        error = %e,
                        "cannot recreate the claim of a volume whose node is gone; the next sweep tries again"
                    ),
                }
            }
        }
        recreated
    }

    /// Recreates one claim if it opted in and still holds the volume.
    async fn recreate(&self, bound: &Bound, missing: Duration) -> Result<Option<Recreated>, String> {
        let (namespace, name) = (&bound.namespace, &bound.claim);
        let claim_path = format!("/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}");
        let claim = match self.api.call(Method::GET, &claim_path, None).await? {
            (200, claim) => claim,
            (404, _) => return Ok(None),
            (status, _) => return Err(format!("reading the claim: HTTP {status}")),
        };
        let opted_in = claim["metadata"]["annotations"][ANNOTATION].as_str() == Some(RECREATE);
        let still_ours = claim["spec"]["volumeName"].as_str() == Some(bound.pv.as_str());
        if !opted_in || !still_ours || !claim["metadata"]["deletionTimestamp"].is_null() {
            return Ok(None);
        }
        let uid = claim["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
        // Only this claim, as it was read: a claim of the same name made since is not touched.
        let precondition = json!({ "kind": "DeleteOptions", "apiVersion": "v1", "preconditions": { "uid": uid } });
        match self.api.call(Method::DELETE, &claim_path, Some(&precondition)).await? {
            (200 | 202 | 404, _) => {}
            (status, _) => return Err(format!("deleting the claim: HTTP {status}")),
        }
        let mut pods = Vec::new();
        let listing = self.api.call(Method::GET, &format!("/api/v1/namespaces/{namespace}/pods"), None).await?;
        for pod in listing.1["items"].as_array().into_iter().flatten() {
            let uses = pod["spec"]["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|volume| volume["persistentVolumeClaim"]["claimName"].as_str() == Some(name.as_str()));
            let Some(pod_name) = pod["metadata"]["name"].as_str().filter(|_| uses) else { continue };
            match self
                .api
                .call(Method::DELETE, &format!("/api/v1/namespaces/{namespace}/pods/{pod_name}"), None)
                .await?
            {
                (200 | 202 | 404, _) => pods.push(pod_name.to_owned()),
                (status, _) => return Err(format!("deleting pod {pod_name}: HTTP {status}")),
            }
        }
        let message = format!(
            "node {} was deleted from the cluster {}s ago with volume {} of this claim; as its {ANNOTATION} annotation \
             asks, the claim and its pods ({}) were deleted so that its StatefulSet makes a new claim on a live node, \
             which starts empty",
            bound.node,
            missing.as_secs(),
            bound.pv,
            if pods.is_empty() { "none".to_owned() } else { pods.join(", ") }
        );
        tracing::warn!(%namespace, claim = %name, node = %bound.node, ?pods, "{message}");
        let involved = Involved { kind: "PersistentVolumeClaim", namespace, name, uid: &uid };
        let event = kube::event(involved, EventType::Warning, "NodeLost", &message);
        if let Err(e) =
            self.api.call(Method::POST, &format!("/api/v1/namespaces/{namespace}/events"), Some(&event)).await
        {
            tracing::warn!(error = %e, "cannot record the NodeLost event");
        }
        Ok(Some(Recreated { namespace: namespace.clone(), claim: name.clone(), node: bound.node.clone(), pods }))
    }
}

/// This driver's bound PersistentVolumes in a list, with their node.
fn bound_volumes(list: &Value, driver_name: &str) -> Vec<Bound> {
    let mut found = Vec::new();
    for pv in list["items"].as_array().into_iter().flatten() {
        if pv["spec"]["csi"]["driver"].as_str() != Some(driver_name) || pv["status"]["phase"].as_str() != Some("Bound")
        {
            continue;
        }
        let Some(id) = pv["spec"]["csi"]["volumeHandle"].as_str().and_then(ObjectId::parse) else { continue };
        let (Some(pv_name), Some(namespace), Some(claim)) = (
            pv["metadata"]["name"].as_str(),
            pv["spec"]["claimRef"]["namespace"].as_str(),
            pv["spec"]["claimRef"]["name"].as_str(),
        ) else {
            continue;
        };
        found.push(Bound { pv: pv_name.into(), node: id.node, namespace: namespace.into(), claim: claim.into() });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::kube::fake;

    fn pv(name: &str, node: &str, claim: &str) -> Value {
        json!({
            "metadata": { "name": name },
            "spec": {
                "csi": { "driver": "loam.csi.dev", "volumeHandle": format!("{}@{node}", "0".repeat(32)) },
                "claimRef": { "namespace": "db", "name": claim },
            },
            "status": { "phase": "Bound" },
        })
    }

    fn claim(name: &str, pv: &str, opted_in: bool) -> Value {
        let annotations = if opted_in { json!({ ANNOTATION: RECREATE }) } else { json!({}) };
        json!({ "metadata": { "name": name, "uid": format!("uid-{name}"), "annotations": annotations },
                "spec": { "volumeName": pv } })
    }

    #[tokio::test]
    async fn opted_in_claims_of_a_gone_node_are_recreated_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (answers, calls) = (fake::Answers::default(), fake::Calls::default());
        let list = json!({ "items": [
            pv("pv-0", "alive", "data-db-0"),
            pv("pv-1", "gone", "data-db-1"),
            pv("pv-2", "gone", "data-db-2"),
            { "metadata": { "name": "pv-other" }, "spec": { "csi": { "driver": "other.csi", "volumeHandle": "x@gone" },
              "claimRef": { "namespace": "db", "name": "other" } }, "status": { "phase": "Bound" } },
        ]});
        let pods = json!({ "items": [
            { "metadata": { "name": "db-1" }, "spec": { "volumes": [ { "persistentVolumeClaim": { "claimName": "data-db-1" } } ] } },
            { "metadata": { "name": "db-0" }, "spec": { "volumes": [ { "persistentVolumeClaim": { "claimName": "data-db-0" } } ] } },
        ]});
        {
            let mut a = answers.lock().unwrap();
            a.insert("GET /api/v1/persistentvolumes".into(), (200, list));
            a.insert("GET /api/v1/nodes/alive".into(), (200, json!({})));
            a.insert(
                "GET /api/v1/namespaces/db/persistentvolumeclaims/data-db-1".into(),
                (200, claim("data-db-1", "pv-1", true)),
            );
            a.insert(
                "GET /api/v1/namespaces/db/persistentvolumeclaims/data-db-2".into(),
                (200, claim("data-db-2", "pv-2", false)),
            );
            a.insert("DELETE /api/v1/namespaces/db/persistentvolumeclaims/data-db-1".into(), (200, json!({})));
            a.insert("GET /api/v1/namespaces/db/pods".into(), (200, pods));
            a.insert("DELETE /api/v1/namespaces/db/pods/db-1".into(), (200, json!({})));
            a.insert("POST /api/v1/namespaces/db/events".into(), (201, json!({})));
        }
        let port = fake::serve(dir.path(), answers, calls.clone()).await;
        let api = Arc::new(KubeApi::at("127.0.0.1".into(), port, dir.path()).unwrap());
        let gone_nodes = Arc::new(GoneNodes::new(api.clone(), Duration::ZERO));
        let sweep = NodeLoss::new(api, gone_nodes, "loam.csi.dev".into());

        let done = sweep.sweep().await;
        assert_eq!(
            done,
            [Recreated {
                namespace: "db".into(),
                claim: "data-db-1".into(),
                node: "gone".into(),
                pods: vec!["db-1".into()]
            }]
        );
        let calls = calls.lock().unwrap().clone();
        let names: Vec<&str> = calls.iter().map(|(c, _)| c.as_str()).collect();
        assert!(
            !names.iter().any(|c| c.contains("data-db-0") || c.contains("data-db-2") && c.starts_with("DELETE")),
            "{names:?}"
        );
        assert!(!names.contains(&"DELETE /api/v1/namespaces/db/pods/db-0"), "{names:?}");
        let delete =
            calls.iter().find(|(c, _)| c == "DELETE /api/v1/namespaces/db/persistentvolumeclaims/data-db-1").unwrap();
        assert_eq!(delete.1["preconditions"]["uid"], "uid-data-db-1", "only the claim that was read");
        let claim_deleted =
            names.iter().position(|c| c.ends_with("persistentvolumeclaims/data-db-1") && c.starts_with("DELETE"));
        let pod_deleted = names.iter().position(|c| *c == "DELETE /api/v1/namespaces/db/pods/db-1");
        assert!(claim_deleted < pod_deleted, "the claim first, so the StatefulSet makes a new one: {names:?}");
        let event = &calls.iter().find(|(c, _)| c == "POST /api/v1/namespaces/db/events").unwrap().1;
        assert_eq!(event["reason"], "NodeLost");
        assert_eq!(event["involvedObject"]["name"], "data-db-1");
        assert!(event["message"].as_str().unwrap().contains("node gone was deleted"), "{event}");
    }
}
