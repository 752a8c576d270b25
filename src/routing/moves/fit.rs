//! Whether the pods of a claim may run on a node, for `move-to=any`: a move
//! must not choose a node its pods will never be scheduled on, or the claim
//! comes back bound to a volume there and its pods stay Pending for good.
//!
//! The scheduler's hard rules that depend on the node, as it applies them:
//! Ready and not cordoned, taints with `NoSchedule`/`NoExecute` tolerated,
//! `nodeSelector`, required node affinity, and required pod anti-affinity both
//! ways (the claim's pods' terms against the pods already running, and those
//! pods' terms against the claim's pods). Pod anti-affinity is matched
//! against pods of the claim's own namespace (the terms' default; terms that
//! name other namespaces are matched there too, as far as those pods are
//! listed). Preferences never keep a move away; resources other than Loam's
//! room are the scheduler's to weigh once the pod is made.

use serde_json::Value;

/// The pods a move's choice must respect, and the cluster's nodes.
pub(super) struct Fit<'a> {
    /// The pods that mount the claim: they will run where the volume goes.
    pub users: Vec<&'a Value>,
    /// Every other pod running in the claim's namespace.
    pub others: Vec<&'a Value>,
    /// The cluster's nodes (for the topology of the pods running on them).
    pub nodes: Vec<&'a Value>,
}

impl<'a> Fit<'a> {
    /// The pods of `pods` that mount `claim`, and the others that run on a
    /// node (neither finished nor unscheduled).
    pub fn new(claim: &str, pods: &'a Value, nodes: &'a Value) -> Self {
        let (users, others): (Vec<&Value>, Vec<&Value>) = items(pods).partition(|pod| uses(pod, claim));
        let others = others
            .into_iter()
            .filter(|pod| {
                pod["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty())
                    && !matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
            })
            .collect();
        Fit { users, others, nodes: items(nodes).collect() }
    }

    /// Why a move may not choose `node` (not Ready, cordoned, a taint the
    /// claim's pods do not tolerate, their node selector or affinity, a pod
    /// their anti-affinity avoids or that avoids them); none when it may.
    /// With no pods known, no pod is known to tolerate a taint either.
    pub fn refusal(&self, node: &Value) -> Option<String> {
        let ready = items(&node["status"]["conditions"]).any(|c| c["type"] == "Ready" && c["status"] == "True");
        if !ready {
            return Some("is not Ready".to_owned());
        }
        if node["spec"]["unschedulable"] == true {
            return Some("is cordoned".to_owned());
        }
        let repels = |taint: &&Value| matches!(taint["effect"].as_str(), Some("NoSchedule" | "NoExecute"));
        for taint in items(&node["spec"]["taints"]).filter(repels) {
            if self.users.is_empty() || !self.users.iter().all(|pod| tolerates(pod, taint)) {
                let key = taint["key"].as_str().unwrap_or_default();
                let value = taint["value"].as_str().map(|v| format!("={v}")).unwrap_or_default();
                let effect = taint["effect"].as_str().unwrap_or_default();
                return Some(format!("has the taint {key}{value}:{effect}, which the claim's pods do not tolerate"));
            }
        }
        for pod in &self.users {
            let name = name(pod);
            if !selector_matches(&pod["spec"]["nodeSelector"], &node["metadata"]["labels"]) {
                return Some(format!("does not match the node selector of pod {name}"));
            }
            let required = &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
            if !required.is_null() && !items(&required["nodeSelectorTerms"]).any(|term| term_matches(term, node)) {
                return Some(format!("does not match the required node affinity of pod {name}"));
            }
        }
        for other in &self.others {
            let Some(other_node) = self.nodes.iter().find(|n| n["metadata"]["name"] == other["spec"]["nodeName"])
            else {
                continue;
            };
            for user in &self.users {
                let apart =
                    keeps_apart(user, other, node, other_node).or_else(|| keeps_apart(other, user, other_node, node));
                if let Some(key) = apart {
                    return Some(format!(
                        "would put pod {} in the same {key} as pod {}, which a required pod anti-affinity forbids",
                        name(user),
                        name(other)
                    ));
                }
            }
        }
        None
    }
}

/// The topology key of a required anti-affinity term of `holder` that
/// selects `selected` while `holder_node` and `selected_node` share that
/// key's value: the two pods may not run so.
fn keeps_apart<'v>(holder: &'v Value, selected: &Value, holder_node: &Value, selected_node: &Value) -> Option<&'v str> {
    let terms = &holder["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    items(terms).find_map(|term| {
        let key = term["topologyKey"].as_str()?;
        let domain = holder_node["metadata"]["labels"][key].as_str()?;
        let namespace = &selected["metadata"]["namespace"];
        let in_scope = match items(&term["namespaces"]).next() {
            None => *namespace == holder["metadata"]["namespace"],
            Some(_) => items(&term["namespaces"]).any(|n| n == namespace),
        };
        (selected_node["metadata"]["labels"][key].as_str() == Some(domain)
            && in_scope
            && label_selector_matches(&term["labelSelector"], &selected["metadata"]["labels"]))
        .then_some(key)
    })
}

/// Whether `pod` mounts the claim `claim`.
pub(super) fn uses(pod: &Value, claim: &str) -> bool {
    items(&pod["spec"]["volumes"]).any(|v| v["persistentVolumeClaim"]["claimName"] == claim)
}

fn items(list: &Value) -> impl Iterator<Item = &Value> {
    list.as_array().into_iter().flatten().chain(list["items"].as_array().into_iter().flatten())
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

/// Whether one of `pod`'s tolerations matches `taint`, as the scheduler
/// matches them (an empty key with `Exists` matches every taint; an empty
/// effect every effect; `Equal`, the default, compares the values).
fn tolerates(pod: &Value, taint: &Value) -> bool {
    items(&pod["spec"]["tolerations"]).any(|t| {
        let exists = t["operator"] == "Exists";
        let key = t["key"].as_str().unwrap_or_default();
        let effect = t["effect"].as_str().unwrap_or_default();
        (key.is_empty() && exists || t["key"] == taint["key"])
            && (effect.is_empty() || t["effect"] == taint["effect"])
            && (exists || t["value"].as_str().unwrap_or_default() == taint["value"].as_str().unwrap_or_default())
    })
}

/// A `nodeSelector`: every key has its value among `labels` (none: any node).
fn selector_matches(selector: &Value, labels: &Value) -> bool {
    selector.as_object().is_none_or(|wanted| wanted.iter().all(|(k, v)| labels[k] == *v))
}

/// A node selector term: every expression on the node's labels and every
/// field expression (`metadata.name`, the only field the API allows) holds;
/// a term with neither matches no node, as in the scheduler.
fn term_matches(term: &Value, node: &Value) -> bool {
    let expressions: Vec<&Value> = items(&term["matchExpressions"]).collect();
    let fields: Vec<&Value> = items(&term["matchFields"]).collect();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    expressions.iter().all(|e| expression_holds(e, &node["metadata"]["labels"]))
        && fields.iter().all(|f| {
            f["key"] == "metadata.name" && expression_holds(f, &serde_json::json!({ "metadata.name": name(node) }))
        })
}

/// A pod anti-affinity term's label selector: a null one selects no pod, an
/// empty one every pod.
fn label_selector_matches(selector: &Value, labels: &Value) -> bool {
    if selector.is_null() {
        return false;
    }
    selector_matches(&selector["matchLabels"], labels)
        && items(&selector["matchExpressions"]).all(|e| expression_holds(e, labels))
}

/// One requirement (`In`, `NotIn`, `Exists`, `DoesNotExist`, and for nodes
/// `Gt`, `Lt` on integers) on `labels`; an unknown operator never holds.
fn expression_holds(expression: &Value, labels: &Value) -> bool {
    let value = expression["key"].as_str().and_then(|key| labels[key].as_str());
    let mut values = items(&expression["values"]).filter_map(Value::as_str);
    let bound = || items(&expression["values"]).next().and_then(Value::as_str).and_then(|v| v.parse::<i64>().ok());
    let number = value.and_then(|v| v.parse::<i64>().ok());
    match expression["operator"].as_str() {
        Some("In") => value.is_some_and(|v| values.any(|w| w == v)),
        Some("NotIn") => value.is_none_or(|v| values.all(|w| w != v)),
        Some("Exists") => value.is_some(),
        Some("DoesNotExist") => value.is_none(),
        Some("Gt") => number.zip(bound()).is_some_and(|(n, b)| n > b),
        Some("Lt") => number.zip(bound()).is_some_and(|(n, b)| n < b),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::Fit;

    fn node(name: &str, labels: Value, spec: Value) -> Value {
        json!({
            "metadata": { "name": name, "labels": labels },
            "spec": spec,
            "status": { "conditions": [{ "type": "Ready", "status": "True" }] },
        })
    }

    fn pod(name: &str, labels: Value, spec: Value) -> Value {
        json!({ "metadata": { "name": name, "namespace": "db", "labels": labels }, "spec": spec })
    }

    fn refusal(node: &Value, users: &[&Value]) -> Option<String> {
        Fit { users: users.to_vec(), others: vec![], nodes: vec![] }.refusal(node)
    }

    #[test]
    fn a_taint_keeps_a_move_away_unless_every_pod_of_the_claim_tolerates_it() {
        let gpu =
            node("gpu", json!({}), json!({ "taints": [{ "key": "gpu", "value": "a100", "effect": "NoExecute" }] }));
        let user = |tolerations: Value| pod("db-1", json!({}), json!({ "tolerations": tolerations }));
        let tolerating = [
            json!([{ "operator": "Exists" }]),
            json!([{ "key": "gpu", "operator": "Exists" }]),
            json!([{ "key": "gpu", "value": "a100" }]),
            json!([{ "key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoExecute" }]),
        ];
        for tolerations in tolerating {
            assert_eq!(refusal(&gpu, &[&user(tolerations.clone())]), None, "{tolerations}");
        }
        let not_tolerating = [
            json!([]),
            json!([{ "key": "gpu", "value": "h100" }]),
            json!([{ "key": "gpu", "operator": "Exists", "effect": "NoSchedule" }]),
            json!([{ "key": "other", "operator": "Exists" }]),
        ];
        for tolerations in not_tolerating {
            let why = refusal(&gpu, &[&user(tolerations.clone())]).unwrap_or_else(|| panic!("{tolerations}"));
            assert!(why.contains("gpu=a100:NoExecute"), "{why}");
        }
        let everyone = user(json!([{ "operator": "Exists" }]));
        let nobody = user(json!([]));
        assert!(refusal(&gpu, &[&everyone, &nobody]).is_some(), "every pod must tolerate it");
        assert!(refusal(&gpu, &[]).is_some(), "no pod is known to tolerate it");
        let soft = node("soft", json!({}), json!({ "taints": [{ "key": "loud", "effect": "PreferNoSchedule" }] }));
        assert_eq!(refusal(&soft, &[]), None, "a preference does not keep a move away");
        let not_ready = json!({ "status": { "conditions": [{ "type": "Ready", "status": "Unknown" }] } });
        assert_eq!(refusal(&not_ready, &[]).as_deref(), Some("is not Ready"));
    }

    #[test]
    fn a_move_keeps_to_the_nodes_the_claims_pods_select() {
        let fast = node("node-a", json!({ "disk": "nvme", "gen": "5", "zone": "z1" }), json!({}));
        let slow = node("node-b", json!({ "disk": "hdd", "gen": "3" }), json!({}));
        let with = |spec: Value| pod("db-1", json!({}), spec);
        let required = |terms: Value| {
            with(json!({ "affinity": { "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": terms } } } }))
        };
        let expression = |key: &str, operator: &str, values: Value| json!([{ "matchExpressions": [{ "key": key, "operator": operator, "values": values }] }]);
        // (the pod, whether it may run on the fast node, on the slow one)
        let cases = [
            (with(json!({})), true, true),
            (with(json!({ "nodeSelector": { "disk": "nvme" } })), true, false),
            (with(json!({ "nodeSelector": { "disk": "nvme", "gen": "3" } })), false, false),
            (required(expression("disk", "In", json!(["nvme", "ssd"]))), true, false),
            (required(expression("disk", "NotIn", json!(["nvme"]))), false, true),
            (required(expression("zone", "Exists", json!([]))), true, false),
            (required(expression("zone", "DoesNotExist", json!([]))), false, true),
            (required(expression("gen", "Gt", json!(["4"]))), true, false),
            (required(expression("gen", "Lt", json!(["4"]))), false, true),
            (
                required(
                    json!([{ "matchFields": [{ "key": "metadata.name", "operator": "In", "values": ["node-b"] }] }]),
                ),
                false,
                true,
            ),
            // Terms are ORed, expressions in a term ANDed; an empty term matches no node.
            (
                required(json!([
                    { "matchExpressions": [{ "key": "disk", "operator": "In", "values": ["nvme"] },
                                           { "key": "gen", "operator": "In", "values": ["3"] }] },
                    { "matchExpressions": [{ "key": "disk", "operator": "In", "values": ["hdd"] }] },
                ])),
                false,
                true,
            ),
            (required(json!([{}])), false, false),
            (required(expression("disk", "Unknown", json!(["nvme"]))), false, false),
            // A preference never keeps a move away.
            (
                with(json!({ "affinity": { "nodeAffinity": { "preferredDuringSchedulingIgnoredDuringExecution": [
                    { "weight": 1, "preference": { "matchExpressions": [{ "key": "disk", "operator": "In", "values": ["ssd"] }] } },
                ] } } })),
                true,
                true,
            ),
        ];
        for (user, on_fast, on_slow) in cases {
            assert_eq!(
                refusal(&fast, &[&user]).is_none(),
                on_fast,
                "fast node, {}: {:?}",
                user["spec"],
                refusal(&fast, &[&user])
            );
            assert_eq!(
                refusal(&slow, &[&user]).is_none(),
                on_slow,
                "slow node, {}: {:?}",
                user["spec"],
                refusal(&slow, &[&user])
            );
        }
        let why = refusal(&slow, &[&with(json!({ "nodeSelector": { "disk": "nvme" } }))]).unwrap();
        assert_eq!(why, "does not match the node selector of pod db-1");
        let why = refusal(&slow, &[&required(expression("disk", "In", json!(["nvme"])))]).unwrap();
        assert_eq!(why, "does not match the required node affinity of pod db-1");
    }

    #[test]
    fn a_move_keeps_the_claims_pods_apart_from_the_pods_their_anti_affinity_avoids() {
        let nodes = json!({ "items": [
            node("node-a", json!({ "kubernetes.io/hostname": "node-a", "zone": "z1" }), json!({})),
            node("node-b", json!({ "kubernetes.io/hostname": "node-b", "zone": "z1" }), json!({})),
            node("node-c", json!({ "kubernetes.io/hostname": "node-c", "zone": "z2" }), json!({})),
            node("node-d", json!({ "kubernetes.io/hostname": "node-d", "zone": "z3" }), json!({})),
        ] });
        let apart = |key: &str| {
            json!({ "podAntiAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": [
                { "topologyKey": key, "labelSelector": { "matchExpressions": [{ "key": "app", "operator": "In", "values": ["db"] }] } },
            ] } })
        };
        let claim = |name: &str| json!([{ "name": "data", "persistentVolumeClaim": { "claimName": name } }]);
        // A StatefulSet's replicas: db-1 mounts the claim moved, db-0 runs on
        // node-a, db-2 on node-c; a web pod without the label on node-d; a
        // finished replica on node-b.
        let pods = json!({ "items": [
            pod("db-0", json!({ "app": "db" }), json!({ "nodeName": "node-a", "affinity": apart("kubernetes.io/hostname"), "volumes": claim("data-db-0") })),
            pod("db-1", json!({ "app": "db" }), json!({ "affinity": apart("kubernetes.io/hostname"), "volumes": claim("data-db-1") })),
            pod("db-2", json!({ "app": "db" }), json!({ "nodeName": "node-c", "affinity": apart("kubernetes.io/hostname"), "volumes": claim("data-db-2") })),
            pod("web", json!({ "app": "web" }), json!({ "nodeName": "node-d" })),
            json!({ "metadata": { "name": "old", "namespace": "db", "labels": { "app": "db" } },
                    "spec": { "nodeName": "node-b" }, "status": { "phase": "Succeeded" } }),
        ] });
        let node_named =
            |name: &str| nodes["items"].as_array().unwrap().iter().find(|n| n["metadata"]["name"] == name).unwrap();
        let fit = Fit::new("data-db-1", &pods, &nodes);
        assert_eq!(fit.users.len(), 1);
        assert_eq!(fit.others.len(), 3, "db-0, db-2 and web; not the finished pod");
        assert_eq!(
            fit.refusal(node_named("node-a")).as_deref(),
            Some(
                "would put pod db-1 in the same kubernetes.io/hostname as pod db-0, which a required pod anti-affinity forbids"
            )
        );
        assert_eq!(fit.refusal(node_named("node-b")), None);
        assert!(fit.refusal(node_named("node-c")).unwrap().contains("as pod db-2"));
        assert_eq!(fit.refusal(node_named("node-d")), None, "web is not selected");

        // A zone as the topology: node-b shares db-0's zone.
        let mut zoned = pods.clone();
        zoned["items"][1]["spec"]["affinity"] = apart("zone");
        let fit = Fit::new("data-db-1", &zoned, &nodes);
        assert!(fit.refusal(node_named("node-b")).unwrap().contains("in the same zone as pod db-0"));
        assert_eq!(fit.refusal(node_named("node-d")), None);

        // The running pod's term keeps the claim's pod away too, when only it has one.
        let mut one_sided = pods.clone();
        one_sided["items"][1]["spec"]["affinity"] = Value::Null;
        let fit = Fit::new("data-db-1", &one_sided, &nodes);
        assert!(fit.refusal(node_named("node-a")).unwrap().contains("as pod db-0"));
        one_sided["items"][0]["spec"]["affinity"] = Value::Null;
        one_sided["items"][2]["spec"]["affinity"] = Value::Null;
        let fit = Fit::new("data-db-1", &one_sided, &nodes);
        assert_eq!(fit.refusal(node_named("node-a")), None, "no term anywhere");

        // A term naming another namespace does not select this one's pods.
        let mut elsewhere = pods.clone();
        for i in 0..3 {
            elsewhere["items"][i]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                [0]["namespaces"] = json!(["other"]);
        }
        let fit = Fit::new("data-db-1", &elsewhere, &nodes);
        assert_eq!(fit.refusal(node_named("node-a")), None);
    }
}
