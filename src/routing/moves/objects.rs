//! The objects a move reads and makes: API paths, the names of its own
//! claims and of the new volume, and the claims it makes.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{MOVE_TO_LABEL, MOVING_LABEL, Plan};

/// The scheduler's annotation that makes the provisioner create a claim's
/// volume on one node.
pub(super) const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// The annotation by which the external-provisioner knows its volumes (and
/// deletes them by their reclaim policy).
pub(super) const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";

/// Annotations of a bound claim that belong to its old binding, not to it.
pub(super) const BINDING_ANNOTATIONS: [&str; 5] = [
    "pv.kubernetes.io/bind-completed",
    "pv.kubernetes.io/bound-by-controller",
    SELECTED_NODE,
    "volume.beta.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/storage-provisioner",
];

pub(super) fn claim_path(namespace: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}")
}

pub(super) fn volume_path(name: &str) -> String {
    format!("/api/v1/persistentvolumes/{name}")
}

/// The source and target claims of the move of volume `pv`: names of the
/// move's own, one move per volume at a time.
pub(super) fn source_claim(pv: &str) -> String {
    format!("loam-move-source-{pv}")
}

pub(super) fn target_claim(pv: &str) -> String {
    format!("loam-move-target-{pv}")
}

/// The new PersistentVolume's name: the same for every try of one move, and
/// never the name of the volume it replaces.
pub(super) fn new_volume_name(pv: &str, to: &str, claim_uid: &str) -> String {
    let digest = Sha256::new().chain_update(pv).chain_update([0]).chain_update(to).chain_update([0]);
    let hex: String = digest.chain_update(claim_uid).finalize()[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("pvc-{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// What a claim is made again from: its metadata without the binding and the
/// move's label, and its spec without the binding and the data source (the
/// data is the moved volume's).
pub(super) fn claim_template(claim: &Value) -> Value {
    let mut labels = claim["metadata"]["labels"].clone();
    if let Some(map) = labels.as_object_mut() {
        map.remove(MOVE_TO_LABEL);
    }
    let mut annotations = claim["metadata"]["annotations"].clone();
    if let Some(map) = annotations.as_object_mut() {
        for key in BINDING_ANNOTATIONS {
            map.remove(key);
        }
    }
    let mut spec = claim["spec"].clone();
    if let Some(map) = spec.as_object_mut() {
        for key in ["volumeName", "dataSource", "dataSourceRef"] {
            map.remove(key);
        }
    }
    json!({
        "metadata": {
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": claim["metadata"]["ownerReferences"],
        },
        "spec": spec,
    })
}

/// A claim's uid.
pub(super) fn uid(object: &Value) -> &str {
    object["metadata"]["uid"].as_str().unwrap_or_default()
}

pub(super) fn is_bound(object: &Value) -> bool {
    object["status"]["phase"].as_str() == Some("Bound")
}

/// Bytes of a Kubernetes quantity (`10Gi`, `1G`, `1048576`); none when it is
/// not one Loam's volumes have.
pub(super) fn kube_quantity(quantity: &Value) -> Option<i64> {
    let text = quantity.as_str()?;
    crate::quantity::parse(text).ok().and_then(|n| i64::try_from(n).ok())
}

/// The claim made again: the template, bound in advance to the new volume.
pub(super) fn claim_object(plan: &Plan) -> Value {
    let mut claim = plan.template.clone();
    claim["apiVersion"] = json!("v1");
    claim["kind"] = json!("PersistentVolumeClaim");
    claim["metadata"]["name"] = json!(plan.claim);
    claim["metadata"]["namespace"] = json!(plan.namespace);
    claim["spec"]["volumeName"] = json!(plan.volume);
    claim
}

/// The claim the old volume binds to while it is copied.
pub(super) fn source_claim_object(old_pv: &Value, plan: &Plan) -> Value {
    let name = old_pv["metadata"]["name"].as_str().unwrap_or_default();
    let mut spec = claim_spec_of(old_pv);
    spec["volumeName"] = json!(name);
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": { "name": source_claim(name), "namespace": plan.namespace,
                      "labels": { MOVING_LABEL: "source" } },
        "spec": spec,
    })
}

/// The claim Loam provisions the copy for, on the target node.
pub(super) fn target_claim_object(old_pv: &Value, plan: &Plan) -> Value {
    let name = old_pv["metadata"]["name"].as_str().unwrap_or_default();
    let mut spec = claim_spec_of(old_pv);
    spec["dataSource"] = json!({ "kind": "PersistentVolumeClaim", "name": source_claim(name) });
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": { "name": target_claim(name), "namespace": plan.namespace,
                      "labels": { MOVING_LABEL: "target" },
                      "annotations": { SELECTED_NODE: plan.to } },
        "spec": spec,
    })
}

/// A claim spec that fits `pv` exactly: its class, size, modes.
pub(super) fn claim_spec_of(pv: &Value) -> Value {
    json!({
        "accessModes": pv["spec"]["accessModes"],
        "resources": { "requests": { "storage": pv["spec"]["capacity"]["storage"] } },
        "storageClassName": pv["spec"]["storageClassName"],
        "volumeMode": pv["spec"]["volumeMode"].as_str().unwrap_or("Filesystem"),
    })
}
