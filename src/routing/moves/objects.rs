//! The objects a move reads and makes: API paths, the new volume's name,
//! the CreateVolume request of the copy, the new PersistentVolume and the
//! claim made again.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{MOVE_TO_LABEL, MOVED_FROM_ANNOTATION, MOVING_LABEL, PLAN_ANNOTATION, Plan};
use crate::config::TOPOLOGY_NODE_KEY;
use crate::csi;

/// The scheduler's annotation naming the node a claim's volume is for.
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

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

/// The claim made again: the template, bound in advance to `volume` (the
/// copy's, or the old one's when the move was cancelled).
pub(super) fn claim_object(plan: &Plan, volume: &str) -> Value {
    let mut claim = plan.template.clone();
    claim["apiVersion"] = json!("v1");
    claim["kind"] = json!("PersistentVolumeClaim");
    claim["metadata"]["name"] = json!(plan.claim);
    claim["metadata"]["namespace"] = json!(plan.namespace);
    claim["spec"]["volumeName"] = json!(volume);
    claim
}

/// The CreateVolume that copies the old volume `old_pv` to the plan's node:
/// named after the new PersistentVolume (so retries land on the same
/// volume), sized, shaped and parameterized as the old one, its content the
/// old volume, its topology only the target node.
pub(super) fn copy_request(old_pv: &Value, plan: &Plan, class_parameters: &Value) -> Option<csi::CreateVolumeRequest> {
    let source = old_pv["spec"]["csi"]["volumeHandle"].as_str()?.to_owned();
    let bytes = kube_quantity(&old_pv["spec"]["capacity"]["storage"])?;
    // As the external-provisioner does: its own keys are not the driver's;
    // the fs type one becomes the capability's.
    let mut fs_type = old_pv["spec"]["csi"]["fsType"].as_str().unwrap_or_default().to_owned();
    let mut parameters = std::collections::HashMap::new();
    for (key, value) in class_parameters.as_object().into_iter().flatten() {
        let value = value.as_str().unwrap_or_default().to_owned();
        match key.strip_prefix("csi.storage.k8s.io/") {
            Some("fstype") if fs_type.is_empty() => fs_type = value,
            Some(_) => {}
            None => {
                parameters.insert(key.clone(), value);
            }
        }
    }
    let access_type = if old_pv["spec"]["volumeMode"].as_str() == Some("Block") {
        csi::volume_capability::AccessType::Block(csi::volume_capability::BlockVolume {})
    } else {
        csi::volume_capability::AccessType::Mount(csi::volume_capability::MountVolume { fs_type, ..Default::default() })
    };
    let single_pod = old_pv["spec"]["accessModes"].as_array().into_iter().flatten().any(|m| m == "ReadWriteOncePod");
    let mode = if single_pod {
        csi::volume_capability::access_mode::Mode::SingleNodeSingleWriter
    } else {
        csi::volume_capability::access_mode::Mode::SingleNodeWriter
    };
    let on_target = csi::Topology { segments: [(TOPOLOGY_NODE_KEY.to_owned(), plan.to.clone())].into() };
    Some(csi::CreateVolumeRequest {
        name: plan.volume.clone(),
        capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![csi::VolumeCapability {
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
            access_type: Some(access_type),
        }],
        parameters,
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
                volume_id: source,
            })),
        }),
        accessibility_requirements: Some(csi::TopologyRequirement {
            requisite: vec![on_target.clone()],
            preferred: vec![on_target],
        }),
        ..Default::default()
    })
}

/// The new PersistentVolume for the copy `copy` of `old_pv`: the old one's
/// class, modes, annotations (so the provisioner deletes it as its own) and
/// reclaim policy, the copy's handle, size and node, and bound in advance to
/// the claim's name (no uid): whoever makes the claim again, the move or the
/// claim's StatefulSet, the volume binder binds it to this volume.
pub(super) fn new_volume_object(old_pv: &Value, plan: &Plan, copy: &csi::Volume, driver: &str) -> Value {
    let mut annotations = old_pv["metadata"]["annotations"].clone();
    if let Some(map) = annotations.as_object_mut() {
        map.remove(PLAN_ANNOTATION);
        map.remove("pv.kubernetes.io/bound-by-controller");
        map.insert(MOVED_FROM_ANNOTATION.to_owned(), old_pv["metadata"]["name"].clone());
    }
    let mut attributes = old_pv["spec"]["csi"]["volumeAttributes"].clone();
    if !attributes.is_object() {
        attributes = json!({});
    }
    for (key, value) in &copy.volume_context {
        attributes[key] = json!(value);
    }
    let mut spec = old_pv["spec"].clone();
    spec["csi"] = json!({
        "driver": driver,
        "volumeHandle": copy.volume_id,
        "fsType": old_pv["spec"]["csi"]["fsType"],
        "volumeAttributes": attributes,
    });
    spec["capacity"] = json!({ "storage": copy.capacity_bytes.to_string() });
    spec["nodeAffinity"] = json!({ "required": { "nodeSelectorTerms": [ { "matchExpressions": [
        { "key": TOPOLOGY_NODE_KEY, "operator": "In", "values": [plan.to] } ] } ] } });
    spec["claimRef"] = json!({
        "kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": plan.namespace, "name": plan.claim,
    });
    spec["persistentVolumeReclaimPolicy"] = json!(plan.reclaim);
    let mut labels = old_pv["metadata"]["labels"].clone();
    if let Some(map) = labels.as_object_mut() {
        map.remove(MOVING_LABEL);
    }
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": plan.volume,
            "labels": labels,
            "annotations": annotations,
            "finalizers": old_pv["metadata"]["finalizers"],
        },
        "spec": spec,
    })
}
