#!/usr/bin/env bash
# Kubernetes-level benchmark: how long N PVCs, each with a pod that mounts it,
# take from `kubectl create` to every pod Running (so every volume provisioned,
# staged and published), and from `kubectl delete` of their namespace to every
# pod and every PersistentVolume gone (so every volume unpublished, unstaged
# and deleted by its driver). Loam beside local-path-provisioner, kind's default
# class, in the same cluster and the same run, the order alternating from one
# repetition to the next.
#
# Against a cluster tests/kind/run.sh holds (KIND_HOLD=1 KIND_STORY=0):
#
#   sudo env "PATH=$PATH" KUBECONFIG=<run.sh's> DOCKER_HOST=<run.sh's> bash bench/kube-scale.sh 100 500
#
# N defaults to "100 500". A node takes at most its kubelet's maxPods (110 by
# default) pods in all; SCALE_MAX_PODS=M first sets maxPods to M on every
# node of the kind cluster (the kubelet's config file, then a restart of the
# kubelet: pods keep running) and lets pods onto the control-plane node too
# (its NoSchedule taint removed), so 500 pods fit on three nodes. The run
# refuses an N the nodes cannot take, and says how many they can.
#
# Env: SCALE_REPS (3), SCALE_CLASSES ("loam standard"), SCALE_TIMEOUT
# (seconds per wait, 1200), SCALE_IMAGE (the pods' image, kind's busybox
# preload), SCALE_OUT (results, bench/results/kube-scale.json), KIND_CLUSTER
# (loam). Prints one line per measurement, then a table of medians.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(100 500)
reps=${SCALE_REPS:-3}
read -r -a classes <<<"${SCALE_CLASSES:-loam standard}"
limit=${SCALE_TIMEOUT:-1200}
image=${SCALE_IMAGE:-docker.io/library/busybox:1.37}
out=${SCALE_OUT:-$repo/bench/results/kube-scale.json}
cluster=${KIND_CLUSTER:-loam}
t0=$SECONDS
say() { printf '[kube-scale %5ds] %s\n' "$((SECONDS - t0))" "$*" >&2; }

for n in "${sizes[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive number: $n" >&2; exit 2; }
done
for c in "${classes[@]}"; do
    kubectl get storageclass "$c" >/dev/null || { echo "no StorageClass $c in this cluster" >&2; exit 1; }
done

# Namespaces this run made, deleted on any exit (their volumes with them).
made=()
cleanup() {
    [ ${#made[@]} -gt 0 ] || return 0
    kubectl delete namespace "${made[@]}" --ignore-not-found --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${SCALE_MAX_PODS:-}" ]; then
    say "every node: kubelet maxPods $SCALE_MAX_PODS, control-plane schedulable"
    for node in $(kind get nodes --name "$cluster"); do
        docker exec "$node" sh -c "sed -i '/^maxPods:/d' /var/lib/kubelet/config.yaml &&
            echo 'maxPods: $SCALE_MAX_PODS' >>/var/lib/kubelet/config.yaml && systemctl restart kubelet"
    done
    kubectl taint nodes -l node-role.kubernetes.io/control-plane node-role.kubernetes.io/control-plane:NoSchedule- \
        >/dev/null 2>&1 || true
    for ((i = 0; i < limit; i++)); do
        want=$(kubectl get nodes -o jsonpath='{range .items[*]}{.status.allocatable.pods}{"\n"}{end}' |
            grep -cvx "$SCALE_MAX_PODS" || true)
        [ "$want" = 0 ] && break
        sleep 1
    done
    kubectl wait --for=condition=Ready node --all --timeout="${limit}s" >/dev/null
fi

# room: pods the schedulable nodes still take (allocatable minus what runs).
room() {
    kubectl get nodes -o json | python3 -c '
import json, subprocess, sys
nodes = json.load(sys.stdin)["items"]
pods = json.loads(subprocess.run(["kubectl", "get", "pods", "-A", "-o", "json"], check=True,
                                 capture_output=True).stdout)["items"]
held = {}
for p in pods:
    if p["status"].get("phase") not in ("Succeeded", "Failed"):
        node = p["spec"].get("nodeName")
        held[node] = held.get(node, 0) + 1
room = 0
for n in nodes:
    if any(t.get("effect") in ("NoSchedule", "NoExecute") for t in n["spec"].get("taints", [])):
        continue
    if n["spec"].get("unschedulable"):
        continue
    room += int(n["status"]["allocatable"]["pods"]) - held.get(n["metadata"]["name"], 0)
print(room)'
}

# manifest NS CLASS N: N claims and N pods, pod i mounting claim i, spread
# evenly over the schedulable nodes. The pods exit at once on SIGTERM, so
# deletion measures the volumes, not a grace period.
manifest() {
    local ns=$1 class=$2 n=$3 i
    for ((i = 0; i < n; i++)); do
        cat <<EOF
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data-$i, namespace: $ns}
spec:
  storageClassName: $class
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: app-$i, namespace: $ns, labels: {app: kube-scale}}
spec:
  terminationGracePeriodSeconds: 5
  # Spread over the nodes, as the comparison asks: with WaitForFirstConsumer
  # and CSIStorageCapacity the scheduler's storage capacity scoring packs a
  # capacity-tracking driver's pods onto the node it used last.
  topologySpreadConstraints:
    # (nodeTaintsPolicy: a tainted control-plane node is no domain to fill.)
    - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, nodeTaintsPolicy: Honor,
       labelSelector: {matchLabels: {app: kube-scale}}}
  containers:
    - name: app
      image: $image
      imagePullPolicy: IfNotPresent
      command: [sh, -c, "trap 'exit 0' TERM; while :; do sleep 1; done"]
      volumeMounts: [{name: data, mountPath: /data}]
  volumes:
    - name: data
      persistentVolumeClaim: {claimName: data-$i}
EOF
    done
}

running() { kubectl -n "$1" get pods -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -cx Running || true; }
pods_left() { kubectl -n "$1" get pods --no-headers 2>/dev/null | wc -l; }
pvs_left() {
    kubectl get pv -o jsonpath='{range .items[*]}{.spec.claimRef.namespace}{"\n"}{end}' | grep -cx "$1" || true
}
spread() {
    kubectl -n "$1" get pods -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' | sort | uniq -c |
        awk '{printf "%s%s=%s", (NR > 1 ? "," : ""), $2, $1}'
}

# phases NS START: when the last claim's volume was provisioned (its PV
# made), the last pod scheduled, and the last pod's containers started,
# in seconds after START (the API server's timestamps, whole seconds): where
# the time to Running went.
phases() {
    local ns=$1 start=$2
    python3 -c '
import datetime, json, subprocess, sys
ns, start = sys.argv[1], float(sys.argv[2])
get = lambda *args: json.loads(subprocess.run(["kubectl", *args, "-o", "json"], check=True, capture_output=True).stdout)
docs = [get("get", "pv"), get("-n", ns, "get", "pods")]
def at(ts):
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() - start
pvs = [at(pv["metadata"]["creationTimestamp"]) for pv in docs[0]["items"]
       if pv["spec"].get("claimRef", {}).get("namespace") == ns]
def cond(pod, kind):
    return next((at(c["lastTransitionTime"]) for c in pod["status"].get("conditions", []) if c["type"] == kind), None)
pods = docs[1]["items"]
scheduled = [t for t in (cond(p, "PodScheduled") for p in pods) if t is not None]
started = [t for t in (cond(p, "ContainersReady") for p in pods) if t is not None]
last = lambda xs: round(max(xs), 1) if xs else None
print(json.dumps({"provisioned_last_s": last(pvs), "scheduled_last_s": last(scheduled),
                  "started_last_s": last(started)}))' "$ns" "$start"
}

mkdir -p "$(dirname "$out")"
lines=$(mktemp)
trap 'cleanup; rm -f "$lines"' EXIT
for n in "${sizes[@]}"; do
    free=$(room)
    [ "$free" -ge "$n" ] || {
        echo "the schedulable nodes take $free more pods, not $n: set SCALE_MAX_PODS (see the header)" >&2
        exit 1
    }
    for rep in $(seq "$reps"); do
        order=("${classes[@]}")
        [ $((rep % 2)) = 1 ] || mapfile -t order < <(printf '%s\n' "${classes[@]}" | tac)
        for class in "${order[@]}"; do
            ns=kube-scale-$class-$n-$rep
            kubectl create namespace "$ns" >/dev/null
            made+=("$ns")
            file=$(mktemp)
            manifest "$ns" "$class" "$n" >"$file"
            start=$(date +%s.%N)
            kubectl create -f "$file" >/dev/null
            rm -f "$file"
            created=$(date +%s.%N)
            for ((i = 0; ; i++)); do
                [ "$(running "$ns")" = "$n" ] && break
                [ "$i" -lt "$limit" ] || { echo "$ns: $(running "$ns") of $n pods Running after ${limit}s" >&2; exit 1; }
                sleep 1
            done
            up=$(date +%s.%N)
            where=$(spread "$ns")
            phases=$(phases "$ns" "$start")
            kubectl delete namespace "$ns" --wait=false >/dev/null
            for ((i = 0; ; i++)); do
                [ "$(pods_left "$ns")" = 0 ] && [ "$(pvs_left "$ns")" = 0 ] && break
                [ "$i" -lt "$limit" ] ||
                    { echo "$ns: $(pods_left "$ns") pods, $(pvs_left "$ns") PVs left after ${limit}s" >&2; exit 1; }
                sleep 1
            done
            down=$(date +%s.%N)
            python3 - "$class" "$n" "$rep" "$start" "$created" "$up" "$down" "$where" "$phases" >>"$lines" <<'EOF'
import json, sys
c, n, rep, start, created, up, down, where, phases = sys.argv[1:]
print(json.dumps({"class": c, "n": int(n), "rep": int(rep), "create_s": round(float(created) - float(start), 1),
                  "running_s": round(float(up) - float(start), 1), "gone_s": round(float(down) - float(up), 1),
                  "nodes": where, **json.loads(phases)}))
EOF
            say "$(tail -n1 "$lines")"
            # The namespace object itself may linger a moment; wait it out so
            # the next measurement starts on a quiet API server.
            kubectl wait --for=delete "namespace/$ns" --timeout="${limit}s" >/dev/null 2>&1 || true
        done
    done
done

python3 - "$lines" "$out" "${classes[0]}" <<'EOF'
import json, statistics, subprocess, sys, datetime
lines, out, first = sys.argv[1:]
rows = [json.loads(l) for l in open(lines)]
version = subprocess.run(["kubectl", "version", "-o", "json"], capture_output=True, text=True).stdout
doc = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
       "server": json.loads(version).get("serverVersion", {}).get("gitVersion", "unknown") if version else "unknown",
       "nodes": subprocess.run(["kubectl", "get", "nodes", "--no-headers"], capture_output=True, text=True).stdout.split("\n")[:-1],
       "measurements": rows}
json.dump(doc, open(out, "w"), indent=1)
print("| N | Class | Running (median, min-max) | Gone after delete (median, min-max) | Reps |")
print("|---:|---|---:|---:|---:|")
for n in sorted({r["n"] for r in rows}):
    for c in sorted({r["class"] for r in rows}, key=lambda c: c != first):
        rs = [r for r in rows if r["n"] == n and r["class"] == c]
        if not rs:
            continue
        up = [r["running_s"] for r in rs]
        down = [r["gone_s"] for r in rs]
        print(f"| {n} | {c} | {statistics.median(up):.1f} s ({min(up):.1f}-{max(up):.1f}) | "
              f"{statistics.median(down):.1f} s ({min(down):.1f}-{max(down):.1f}) | {len(rs)} |")
EOF
say "results: $out"
