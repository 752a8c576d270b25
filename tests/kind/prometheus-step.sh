#!/usr/bin/env bash
# The metrics step of the kind story: a real Prometheus in the cluster scrapes
# Loam's pods, and PromQL through its HTTP API must show what this step does.
# Run against a cluster tests/kind/run.sh holds (KIND_HOLD=1), after its story:
#
#   sudo KIND_HOLD=1 bash tests/kind/run.sh      # waits at "holding the cluster"
#   sudo env "PATH=$PATH" KUBECONFIG=/var/tmp/loam-kind/kubeconfig \
#       DOCKER_HOST=<the DOCKER_HOST run.sh printed> bash tests/kind/prometheus-step.sh
#
# 1. Prometheus v3 and promtool from the Go module proxy (tests/e2e/build.sh
#    prometheus, cached); the configuration checked by `promtool check config`.
# 2. An image of it on the Dockerfile's slim base stand-in, loaded into the
#    nodes (`kind load`), and Prometheus deployed in the namespace
#    loam-prometheus: pods of namespace loam found by kubernetes_sd (role pod,
#    with only `list` and `watch` on pods there), the containers' ports named
#    as the chart's PodMonitor names them (metrics, prov-metrics, att-metrics,
#    rsz-metrics, snap-metrics), every 5 s.
# 3. Queried through the API server's service proxy (kubectl get --raw), the
#    answers parsed with python3:
#    - `up` is 1 for every one of those targets, and every Loam pod has its
#      `metrics` target;
#    - the node agent of E2E_NODE counts the dir and loop volumes a pod there
#      gets (3 dir, 1 loop), reports the bytes the pod wrote into one of them
#      and its capacity, and counts them out again once they are deleted;
#    - the controller's loam_rpc_duration_seconds_count for CreateVolume is
#      above 0 and grew by at least the 4 creates;
#    - with E2E_NODE's agent taken away (the DaemonSet kept off the node),
#      the controller's loam_agent_up for it goes to 0 and the alert rule
#      LoamAgentUnreachable (deploy/monitoring, loaded by this Prometheus) is
#      pending; back to 1 once the agent returns.
# Everything it made is deleted at the end (PROM_KEEP=1 keeps Prometheus and
# its namespace for a look: kubectl -n loam-prometheus port-forward svc/prometheus 9090).
# Prints one line per check and 'N passed, 0 failed'; exits non-zero at the
# first failed one.
# Env: LOAM_E2E_CACHE (the build cache, as run.sh), E2E_NODE (default
# loam-worker), E2E_WAIT (seconds per wait, default 180), PROM_SAMPLES (where
# step 4b writes one sample of each metric; default in the cache).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${LOAM_E2E_CACHE:-$HOME/.cache/loam-e2e}
export PATH="$cache/bin:$PATH"
. "$repo/tests/e2e/versions.sh"
NODE=${E2E_NODE:-loam-worker}
T=${E2E_WAIT:-180}
PROM_NS=loam-prometheus
# One sample of each metric the reference lists, from this run.
SAMPLES=${PROM_SAMPLES:-$cache/kind-prometheus-samples.txt}
NS=loam-prom-story
cluster=loam
IMAGE=loam:dev # the shell of the test pods (Debian, coreutils)
CHECKS_LABEL=prometheus
. "$repo/tests/e2e/checks.sh"
. "$repo/tests/e2e/objects.sh"
diagnose() {
    kubectl -n "$PROM_NS" get pods -o wide
    kubectl -n "$PROM_NS" logs deploy/prometheus --tail=30
    kubectl -n "$NS" get pods,pvc -o wide
}
work=''
agent_off=''
# agent_back: the node agents on every node again (step 6 took one away).
agent_back() {
    kubectl -n loam patch daemonset loam-node --type json \
        -p '[{"op": "remove", "path": "/spec/template/spec/affinity"}]' &&
        kubectl -n loam rollout status daemonset/loam-node --timeout="${T}s" && agent_off=''
}
cleanup() {
    local rc=$?
    set +e
    [ -z "$work" ] || rm -rf "$work"
    [ -z "$agent_off" ] || agent_back >/dev/null
    kubectl delete namespace "$NS" --ignore-not-found --wait=true --timeout="${T}s" >/dev/null
    if [ "${PROM_KEEP:-}" != 1 ]; then
        kubectl -n loam delete rolebinding,role loam-prometheus --ignore-not-found >/dev/null
        kubectl delete namespace "$PROM_NS" --ignore-not-found --wait=true --timeout="${T}s" >/dev/null
    fi
    exit "$rc"
}
trap cleanup EXIT

# promql EXPR: the instant vector's samples, one per line: the labels named in
# LABELS (space-separated, in that order) then the value; a scalar's value alone.
promql() {
    local path
    path="/api/v1/namespaces/$PROM_NS/services/prometheus:web/proxy/api/v1/query?query=$(
        python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1")"
    kubectl get --raw "$path" | LABELS="${LABELS:-}" python3 -c '
import json, os, sys
answer = json.load(sys.stdin)
if answer.get("status") != "success":
    sys.exit(f"query failed: {answer}")
data = answer["data"]
if data["resultType"] == "scalar":
    print(data["result"][1])
else:
    names = os.environ["LABELS"].split()
    for sample in sorted(data["result"], key=lambda s: [s["metric"].get(n, "") for n in names]):
        print(" ".join([sample["metric"].get(n, "") for n in names] + [sample["value"][1]]))'
}
# series EXPR: EXPR's first sample as the exposition format writes one,
# name{label="value",...} value (the target's own labels left out).
series() {
    local path
    path="/api/v1/namespaces/$PROM_NS/services/prometheus:web/proxy/api/v1/query?query=$(
        python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1")"
    kubectl get --raw "$path" | python3 -c '
import json, sys
result = json.load(sys.stdin)["data"]["result"]
scrape = {"job", "instance", "pod", "pod_node", "component", "port"}
for sample in result[:1]:
    metric = sample["metric"]
    labels = ",".join(f"{k}=\"{v}\"" for k, v in sorted(metric.items()) if k != "__name__" and k not in scrape)
    print(metric["__name__"] + ("{" + labels + "}" if labels else ""), sample["value"][1])'
}
# value EXPR: the one number EXPR gives (an empty vector is 0).
value() {
    local out
    out=$(promql "$1")
    [ -n "$out" ] || out=0
    [ "$(wc -l <<<"$out")" = 1 ] || fail "$1 gave several samples: $out"
    python3 -c 'import sys; v = float(sys.argv[1]); print(int(v) if v.is_integer() else v)' "$out"
}
# equals EXPR WANTED: true when EXPR's value is WANTED (for until_ok).
equals() { [ "$(value "$1")" = "$2" ]; }

say "1. Prometheus $PROMETHEUS_VERSION and promtool, built from the Go module proxy (cached); the configuration checks"
bash "$repo/tests/e2e/build.sh" prometheus
work=$(mktemp -d /tmp/loam-prometheus-step.XXXXXX)
cp "$cache/bin/prometheus" "$cache/bin/promtool" "$repo/deploy/monitoring/loam.rules.yaml" "$work/"
# The chart's PodMonitor, written out for a Prometheus without the operator:
# every declared container port of the pods labelled app.kubernetes.io/name=loam
# is a target; the ports the PodMonitor names are kept.
cat >"$work/prometheus.yml" <<'EOF'
global:
  scrape_interval: 5s
  evaluation_interval: 5s
# The alert rules deploy/monitoring ships, evaluated as a user's Prometheus would.
rule_files: [loam.rules.yaml]
scrape_configs:
  - job_name: loam
    kubernetes_sd_configs:
      - role: pod
        namespaces: {names: [loam]}
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_name]
        regex: loam
        action: keep
      - source_labels: [__meta_kubernetes_pod_container_port_name]
        regex: metrics|prov-metrics|att-metrics|rsz-metrics|snap-metrics
        action: keep
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      # Not `node`: loam_agent_up and loam_forward_duration_seconds have a
      # label of that name (the node an agent serves).
      - source_labels: [__meta_kubernetes_pod_node_name]
        target_label: pod_node
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
        target_label: component
      - source_labels: [__meta_kubernetes_pod_container_port_name]
        target_label: port
EOF
"$work/promtool" check config "$work/prometheus.yml" >/dev/null || fail "promtool check config"
ok "promtool check config: the scrape configuration and deploy/monitoring's rules are valid"
version=$("$work/prometheus" --version | head -1)
[[ $version == "prometheus, version 3."* ]] || fail "prometheus --version: $version"
ok "$version"

say "2. Prometheus in the cluster, scraping the Loam pods"
image=loam-kind.local/prometheus:$("$work/prometheus" --version | sed -n '1s/^prometheus, version \([^ ]*\).*/\1/p')
cat >"$work/Dockerfile" <<EOF
FROM loam-kind.local/debian:$DEBIAN_SUITE-slim
COPY prometheus promtool /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/prometheus"]
EOF
docker build --network host --force-rm -q -t "$image" -f "$work/Dockerfile" "$work" >/dev/null
# Into the nodes the cluster still has: the story's step 12c leaves
# loam-worker2's container stopped, which `kind load` would try to enter.
kind load docker-image "$image" --name "$cluster" \
    --nodes "$(kubectl get nodes -o jsonpath='{.items[*].metadata.name}' | tr ' ' ',')" >/dev/null
kubectl create namespace "$PROM_NS" >/dev/null
kubectl -n "$PROM_NS" create configmap prometheus --from-file=prometheus.yml="$work/prometheus.yml" \
    --from-file=loam.rules.yaml="$work/loam.rules.yaml" >/dev/null
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: prometheus, namespace: $PROM_NS}
---
# kubernetes_sd with role pod lists and watches the pods of namespace loam.
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: loam-prometheus, namespace: loam}
rules:
  - apiGroups: [""]
    resources: [pods]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: loam-prometheus, namespace: loam}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: loam-prometheus}
subjects:
  - {kind: ServiceAccount, name: prometheus, namespace: $PROM_NS}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: prometheus, namespace: $PROM_NS}
spec:
  replicas: 1
  selector: {matchLabels: {app: prometheus}}
  template:
    metadata: {labels: {app: prometheus}}
    spec:
      serviceAccountName: prometheus
      securityContext:
        runAsNonRoot: true
        runAsUser: 65534
        runAsGroup: 65534
        fsGroup: 65534
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: prometheus
          image: $image
          args:
            - --config.file=/etc/prometheus/prometheus.yml
            - --storage.tsdb.path=/prometheus
            - --web.listen-address=:9090
          ports:
            - {name: web, containerPort: 9090}
          readinessProbe:
            httpGet: {path: /-/ready, port: web}
            periodSeconds: 2
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
          volumeMounts:
            - {name: config, mountPath: /etc/prometheus}
            - {name: data, mountPath: /prometheus}
      volumes:
        - {name: config, configMap: {name: prometheus}}
        - {name: data, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: prometheus, namespace: $PROM_NS}
spec:
  selector: {app: prometheus}
  ports:
    - {name: web, port: 9090, targetPort: web}
EOF
kubectl -n "$PROM_NS" rollout status deploy/prometheus --timeout="${T}s" >/dev/null || fail "Prometheus not ready"
ok "Prometheus is ready ($image)"
until_ok "$T" "Prometheus answers PromQL through the API server" equals 'vector(1)' 1
ok "PromQL answers through the API server's service proxy"

say "3. up is 1 for every Loam target"
pods=$(kubectl -n loam get pods -l app.kubernetes.io/name=loam -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' |
    LC_ALL=C sort) # the order promql sorts in
node_pods=$(kubectl -n loam get pods -l app.kubernetes.io/component=node -o name | wc -l)
# The node agents' metrics port, the controller's, and its four sidecars'.
targets=$((node_pods + 5))
until_ok "$T" "$targets targets up" equals 'sum(up{job="loam"})' "$targets"
expect "every target of the loam job is up (count)" "$(value 'count(up{job="loam"})')" "$targets"
expect "no target of the loam job is down" "$(value 'count(up{job="loam"} == 0) or vector(0)')" 0
expect "every Loam pod has its metrics target, up" \
    "$(LABELS=pod promql 'up{job="loam",port="metrics"} == 1' | cut -d' ' -f1)" "$pods"

say "4. the node agent of $NODE counts the volumes a pod there gets"
agent_volumes() { value "sum(loam_volumes{job=\"loam\",pod_node=\"$NODE\",backend=\"$1\"}) or vector(0)"; }
creates() { value 'sum(loam_rpc_duration_seconds_count{job="loam",component="controller",method="CreateVolume"}) or vector(0)'; }
until_ok "$T" "the agent on $NODE is scraped" equals "count(loam_root_size_bytes{job=\"loam\",pod_node=\"$NODE\"})" 1
dir0=$(agent_volumes dir)
loop0=$(agent_volumes loop)
creates0=$(creates)
ok "before: $dir0 dir and $loop0 loop volumes on $NODE, $creates0 CreateVolume calls served by the controller"
kubectl create namespace "$NS" >/dev/null
for c in d1:loam d2:loam d3:loam l1:loam-loop; do pvc "${c%%:*}" "${c#*:}" 64Mi; done
pod writer 'head -c 8388608 /dev/urandom >/d1/data && sync' d1:/d1 d2:/d2 d3:/d3 l1:/l1
ok "a pod on $NODE with 3 dir and 1 loop volumes wrote 8 MiB"
until_ok 60 "loam_volumes on $NODE shows 3 more dir volumes" equals \
    "sum(loam_volumes{job=\"loam\",pod_node=\"$NODE\",backend=\"dir\"})" "$((dir0 + 3))"
ok "loam_volumes{backend=\"dir\"} on $NODE: $dir0 -> $((dir0 + 3))"
expect "loam_volumes{backend=\"loop\"} on $NODE: $loop0 -> $((loop0 + 1))" "$(agent_volumes loop)" "$((loop0 + 1))"
pv=$(kubectl -n "$NS" get pvc d1 -o jsonpath='{.spec.volumeName}')
# Used bytes come from the agent's measurement every 10 s.
until_ok 60 "loam_volume_used_bytes of d1 reaches 8 MiB" equals \
    "loam_volume_used_bytes{job=\"loam\",volume=\"$pv\"} >= bool 8388608" 1
ok "loam_volume_used_bytes of d1 ($pv) counts the 8 MiB written"
expect "loam_volume_capacity_bytes of d1 is its 64 MiB" \
    "$(value "loam_volume_capacity_bytes{job=\"loam\",volume=\"$pv\"}")" 67108864
created=$(creates)
python3 -c 'import sys; sys.exit(not (int(sys.argv[1]) > 0 and int(sys.argv[1]) - int(sys.argv[2]) >= 4))' \
    "$created" "$creates0" || fail "CreateVolume calls served by the controller: $creates0 -> $created, want 4 more"
ok "loam_rpc_duration_seconds_count{method=\"CreateVolume\"} of the controller: $creates0 -> $created"

say "4b. every metric docs/metrics.md lists, as Prometheus has it now (one sample each, kept in $SAMPLES)"
# The names the reference lists, histograms by their _count series.
mapfile -t listed < <(python3 - "$repo/docs/metrics.md" <<'PY'
import re, sys
for line in open(sys.argv[1]):
    if not line.startswith("| `loam_"):
        continue
    cell = line.split("|")[1]
    for name in re.findall(r"`(loam_[a-z_]+)`", cell):
        print(name + ("_count" if "(histogram)" in cell else ""))
PY
)
: >"$SAMPLES"
missing=()
for name in "${listed[@]}"; do
    sample=$(series "$name{job=\"loam\"}")
    if [ -z "$sample" ]; then missing+=("$name"); else echo "$sample" >>"$SAMPLES"; fi
done
expect "every metric of docs/metrics.md is scraped (${#listed[@]} names)" "${missing[*]}" ""

say "5. the volumes deleted, the agent counts them out"
pvs=$(kubectl -n "$NS" get pvc -o jsonpath='{.items[*].spec.volumeName}')
kubectl delete namespace "$NS" --wait=true --timeout="${T}s" >/dev/null
# shellcheck disable=SC2086 # one name per PV
until_ok "$T" "the 4 PVs deleted" sh -c "[ -z \"\$(kubectl get pv $pvs -o name --ignore-not-found)\" ]"
until_ok 60 "loam_volumes on $NODE back to $dir0 dir volumes" equals \
    "sum(loam_volumes{job=\"loam\",pod_node=\"$NODE\",backend=\"dir\"}) or vector(0)" "$dir0"
ok "loam_volumes{backend=\"dir\"} on $NODE back to $dir0"
expect "loam_volumes{backend=\"loop\"} on $NODE back to $loop0" "$(agent_volumes loop)" "$loop0"

say "6. an agent down: loam_agent_up of $NODE goes to 0 and LoamAgentUnreachable is pending; back to 1"
agent_up_is() { equals "loam_agent_up{job=\"loam\",component=\"controller\",node=\"$NODE\"}" "$1"; }
agent_up_is 1 || fail "loam_agent_up of $NODE is not 1 before the step"
ok "loam_agent_up of $NODE is 1"
# The loam-node pod of NODE goes (the DaemonSet kept off it), the others stay.
agent_off=1
off='{"spec": {"template": {"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":'
off+=' {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["'$NODE'"]}]}]}}}}}}}'
kubectl -n loam patch daemonset loam-node --type merge -p "$off" >/dev/null
kubectl -n loam rollout status daemonset/loam-node --timeout="${T}s" >/dev/null || fail "loam-node rollout without $NODE"
no_agent_pod() { [ -z "$(kubectl -n loam get pods -l app.kubernetes.io/component=node --field-selector "spec.nodeName=$NODE" -o name)" ]; }
until_ok "$T" "no loam-node pod on $NODE" no_agent_pod
ok "the loam-node pod of $NODE is gone"
# The controller learns it at its next look at the agents (on the next request
# for a node, such as csi-provisioner's capacity polls, at most every 30 s).
until_ok "$T" "loam_agent_up of $NODE at 0" agent_up_is 0
ok "loam_agent_up of $NODE is 0"
until_ok 60 "LoamAgentUnreachable pending for $NODE" equals \
    "count(ALERTS{alertname=\"LoamAgentUnreachable\",alertstate=\"pending\",node=\"$NODE\"})" 1
ok "the rule LoamAgentUnreachable of deploy/monitoring is pending for $NODE (it fires after 5m)"
agent_back >/dev/null || fail "loam-node back on $NODE"
until_ok "$T" "loam_agent_up of $NODE back at 1" agent_up_is 1
ok "the agent of $NODE back: loam_agent_up is 1 again"

say "prometheus step done in $((SECONDS - t0)) s"
echo "$passed passed, 0 failed"
