#!/usr/bin/env bash
# The user's story on the e2e cluster, asserted step by step (run by
# cluster.sh inside the cluster's namespaces, KUBECONFIG set). Every step
# checks what the user would look at (bytes in files, sizes, objects) and what
# happened on the node (/var/lib/loam is the node's Loam root here).
# Exits non-zero at the first failed assertion; prints one line per check and
# 'N passed, 0 failed' at the end.
set -euo pipefail
NS=e2e-story
IMAGE=loam:dev # Debian with coreutils and util-linux: the shell of the test pods
# The node the story's volumes are made on (E2E_NODE: a worker of a cluster
# with several; then every pod of the story is pinned to it).
NODE=${E2E_NODE:-loam-e2e}
ROOT=/var/lib/loam
T=${E2E_WAIT:-180}
CHECKS_LABEL=story
# shellcheck source=tests/e2e/checks.sh
. "$(dirname "$0")/checks.sh"
# shellcheck source=tests/e2e/objects.sh
. "$(dirname "$0")/objects.sh"
diagnose() {
    kubectl get pods,pvc -A -o wide
    kubectl get pv,volumesnapshot,volumesnapshotcontent,volumegroupsnapshot,volumegroupsnapshotcontent -A
    kubectl -n "$NS" get events --sort-by=.lastTimestamp | tail -30
    kubectl -n loam logs deploy/loam-controller --all-containers --tail=30 --prefix
    kubectl -n loam logs ds/loam-node --all-containers --tail=30 --prefix
}
# on_node NODE SCRIPT: runs SCRIPT in NODE's filesystem. On the e2e cluster the
# one node is this namespace (E2E_NODE_EXEC unset); a cluster whose nodes are
# containers sets E2E_NODE_EXEC to the command that enters one ("docker exec").
on_node() {
    local n=$1
    shift
    if [ -n "${E2E_NODE_EXEC:-}" ]; then $E2E_NODE_EXEC "$n" sh -c "$*"; else sh -c "$*"; fi
}
# E2E_NODE_STOP: the command that stops a node for good, given its name
# ("docker stop" where nodes are containers); step 12c, the node loss, needs it.
# loam_log POD: the Loam container's log (JSON, as deploy/ sets it) as the
# text format writes it: "<message> key=value ...", the spans' fields last.
loam_log() {
    kubectl -n loam logs "$1" -c loam | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        event = json.loads(line)
    except ValueError:
        continue
    fields = dict(event.get("fields", {}))
    message = fields.pop("message", "")
    text = lambda v: v if isinstance(v, str) else json.dumps(v)
    spans = [f"{k}={text(v)}" for span in event.get("spans", []) for k, v in span.items() if k != "name"]
    print(" ".join([message] + [f"{k}={text(v)}" for k, v in fields.items()] + spans) + " ")'
}
pvc_field() { k get pvc "$1" -o jsonpath="$2"; }
pv_handle() { kubectl get pv "$(pvc_field "$1" '{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeHandle}'; }
key_of() { local h; h=$(pv_handle "$1"); echo "${h%@*}"; }

# none_left KUBECTL_GET...: true once the objects it names or lists are gone
# (false while the API cannot say).
none_left() { local out; out=$("$@" -o name --ignore-not-found) && [ -z "$out" ]; }
# files_gone PATH...: true once none of the paths exists on the node.
files_gone() { on_node "$NODE" "for f in $*; do [ ! -e \$f ] || exit 1; done"; }
empty_dir() { [ -z "$(on_node "$NODE" "find $1 -mindepth 1 -maxdepth 1 -print -quit")" ]; }
# agent_on NODE: the node agent's pod on NODE.
agent_on() {
    kubectl -n loam get pod -l app.kubernetes.io/component=node --field-selector "spec.nodeName=$1" \
        -o jsonpath='{.items[0].metadata.name}'
}

kubectl create namespace "$NS" >/dev/null

say "0. cluster DNS answers for the headless Service the controller uses"
agent_ips=$(kubectl -n loam get pod -l app.kubernetes.io/component=node -o jsonpath='{.items[*].status.podIP}' |
    tr ' ' '\n' | sort | tr '\n' ' ')
pod dns 'true'
expect "loam-agents.loam.svc resolves to every node agent's pod IP" \
    "$(in_pod dns 'getent ahostsv4 loam-agents.loam.svc.cluster.local | cut -d" " -f1 | sort -u | tr "\n" " "')" \
    "$agent_ips"
expect "kubernetes.default resolves to the API Service IP" \
    "$(in_pod dns 'getent hosts kubernetes.default.svc.cluster.local | cut -d" " -f1')" 10.96.0.1
delete_pod dns

say "1. a dir PVC and a loop PVC bind when a pod uses them, and the pod writes"
pvc dir-a loam 64Mi
pvc loop-a loam-loop 64Mi
sleep 3
expect "dir-a waits for its first consumer (WaitForFirstConsumer)" "$(pvc_field dir-a '{.status.phase}')" Pending
expect "loop-a waits for its first consumer" "$(pvc_field loop-a '{.status.phase}')" Pending
pod writer 'head -c 1048576 /dev/urandom >/dir/data && cp /dir/data /loop/data && sync' dir-a:/dir loop-a:/loop
expect "dir-a bound" "$(pvc_field dir-a '{.status.phase}')" Bound
expect "loop-a bound" "$(pvc_field loop-a '{.status.phase}')" Bound
h=$(pv_handle dir-a)
[[ $h =~ ^[0-9a-f]{32}@$NODE$ ]] && ok "volume handle is <key>@<node>: $h" || fail "volume handle $h"
sum_dir=$(in_pod writer 'sha256sum </dir/data')
sum_loop=$(in_pod writer 'sha256sum </loop/data')
expect "the pod wrote the same 1 MiB to both" "$sum_loop" "$sum_dir"
key_dir=$(key_of dir-a)
key_loop=$(key_of loop-a)
expect "the dir volume is a directory on the node with the pod's bytes" \
    "$(on_node "$NODE" "sha256sum <$ROOT/volumes/$key_dir/data")" "$sum_dir"
on_node "$NODE" "test -f $ROOT/volumes/$key_loop.img" && ok "the loop volume is an image file on the node" ||
    fail "no $ROOT/volumes/$key_loop.img"
allocated=$(($(on_node "$NODE" "stat -c '%b*%B' $ROOT/volumes/$key_loop.img")))
[ "$allocated" -ge $((64 << 20)) ] && ok "the image is thick: $allocated bytes allocated" ||
    fail "the image has only $allocated bytes allocated, not 64 MiB (thick): $(on_node "$NODE" "stat $ROOT/volumes/$key_loop.img")"
src=$(in_pod writer "awk '\$2 == \"/loop\" {print \$1, \$3}' /proc/mounts")
[[ $src =~ ^/dev/loop[0-9]+\ ext4$ ]] && ok "the loop volume is ext4 on a loop device in the pod ($src)" ||
    fail "/loop is mounted from '$src'"

say "2. the pod is deleted and recreated: same bytes"
delete_pod writer
pod writer 'true' dir-a:/dir loop-a:/loop
expect "dir-a kept its bytes" "$(in_pod writer 'sha256sum </dir/data')" "$sum_dir"
expect "loop-a kept its bytes" "$(in_pod writer 'sha256sum </loop/data')" "$sum_dir"

say "3. the node agent (DaemonSet pod) is deleted mid-way and comes back"
old_pod=$(agent_on "$NODE")
old_ip=$(kubectl -n loam get pod "$old_pod" -o jsonpath='{.status.podIP}')
kubectl -n loam delete pod "$old_pod" --wait=true --timeout="${T}s" >/dev/null
kubectl -n loam rollout status daemonset/loam-node --timeout="${T}s" >/dev/null || fail "loam-node not back"
new_pod=$(agent_on "$NODE")
new_ip=$(kubectl -n loam get pod "$new_pod" -o jsonpath='{.status.podIP}')
[ "$new_pod" != "$old_pod" ] && ok "a new node pod $new_pod ($old_ip -> $new_ip)" || fail "same node pod"
expect "the running pod still reads its dir volume" "$(in_pod writer 'sha256sum </dir/data')" "$sum_dir"
expect "the running pod still reads its loop volume" "$(in_pod writer 'sha256sum </loop/data')" "$sum_dir"
in_pod writer 'echo after-restart >/dir/after && cat /dir/after' >/dev/null && ok "and writes to it" ||
    fail "write after the agent restart"
agent_ips() {
    kubectl -n loam get endpointslices -l kubernetes.io/service-name=loam-agents \
        -o jsonpath='{.items[*].endpoints[?(@.conditions.ready==true)].addresses[*]}'
}
agent_listed() { [[ " $(agent_ips) " == *" $1 "* ]]; }
until_ok 60 "the headless Service names the new agent" agent_listed "$new_ip"
! agent_listed "$old_ip" && ok "the headless Service no longer names the old agent ($old_ip)" ||
    fail "the headless Service still names the old agent $old_ip: $(agent_ips)"
expect "it names one agent per node" "$(wc -w <<<"$(agent_ips)")" "$(kubectl get nodes -o name | wc -l)"

say "3b. the registrar's liveness probe checks its registration socket: without it the registrar is restarted"
reg_sock=/var/lib/kubelet/plugins_registry/loam.csi.dev-reg.sock
# The new agent pod is ready before its registrar has made the socket.
until_ok 60 "the registrar serves $reg_sock on $NODE" on_node "$NODE" "test -S $reg_sock"
ok "the registrar serves $reg_sock"
restarts=$(kubectl -n loam get pod "$new_pod" \
    -o jsonpath='{.status.containerStatuses[?(@.name=="node-driver-registrar")].restartCount}')
on_node "$NODE" "rm $reg_sock"
until_ok "$T" "the registrar restarted by its liveness probe" sh -c "[ \"\$(kubectl -n loam get pod $new_pod \
    -o jsonpath='{.status.containerStatuses[?(@.name==\"node-driver-registrar\")].restartCount}')\" -gt $restarts ]"
ok "with its registration socket gone, the registrar failed its liveness probe and was restarted"
until_ok "$T" "the registration socket is back" on_node "$NODE" "test -S $reg_sock"
until_ok "$T" "the kubelet lists loam.csi.dev again" sh -c \
    "kubectl get csinode $NODE -o jsonpath='{.spec.drivers[*].name}' | grep -qw loam.csi.dev"
ok "the restarted registrar registered loam.csi.dev with the kubelet again"

say "4. a StatefulSet with volumeClaimTemplates: 3 replicas, scaled down and up, keeps each replica's data"
k apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web}
spec:
  serviceName: web
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      $pin
      containers:
        - name: shell
          image: $IMAGE
          command: ["/bin/sh", "-c", "[ -f /data/id ] || { hostname >/data/id; head -c 65536 /dev/urandom >/data/blob; }; exec sleep infinity"]
          volumeMounts: [{name: data, mountPath: /data}]
          readinessProbe: {exec: {command: ["test", "-f", "/data/id"]}, periodSeconds: 1}
  volumeClaimTemplates:
    - metadata: {name: data}
      spec:
        storageClassName: loam
        accessModes: [ReadWriteOnce]
        resources: {requests: {storage: 32Mi}}
EOF
until_ok "$T" "web has 3 ready replicas" sh -c "[ \"\$(kubectl -n $NS get sts web -o jsonpath='{.status.readyReplicas}')\" = 3 ]"
ok "3 replicas ready"
declare -A blob
for i in 0 1 2; do
    expect "web-$i has its own PVC data-web-$i, bound" "$(pvc_field "data-web-$i" '{.status.phase}')" Bound
    expect "web-$i wrote its stable name" "$(in_pod "web-$i" 'cat /data/id')" "web-$i"
    blob[$i]=$(in_pod "web-$i" 'sha256sum </data/blob')
done
for i in 1 2; do
    prev_ready=$(k get pod "web-$((i - 1))" -o jsonpath='{.status.conditions[?(@.type=="Ready")].lastTransitionTime}')
    created=$(k get pod "web-$i" -o jsonpath='{.metadata.creationTimestamp}')
    [[ ! $created < $prev_ready ]] && ok "web-$i was created after web-$((i - 1)) was ready (ordered start)" ||
        fail "web-$i created at $created, before web-$((i - 1)) was ready at $prev_ready"
done
k scale sts web --replicas=1 >/dev/null
until_ok "$T" "web scaled down to 1" sh -c "! kubectl -n $NS get pod web-1 web-2 2>/dev/null | grep -q web"
expect "scaled down: the PVCs stay" "$(k get pvc -o name | grep -c data-web-)" 3
k scale sts web --replicas=3 >/dev/null
until_ok "$T" "web scaled up to 3" sh -c "[ \"\$(kubectl -n $NS get sts web -o jsonpath='{.status.readyReplicas}')\" = 3 ]"
for i in 0 1 2; do
    expect "web-$i kept its data across the scale down and up" \
        "$(in_pod "web-$i" 'cat /data/id; sha256sum </data/blob')" "web-$i
${blob[$i]}"
done

say "5. a VolumeSnapshot restored into a new PVC has the same bytes"
snapshot snap-a dir-a
until_ok "$T" "snap-a ready to use" snapshot_ready snap-a
ok "snap-a is ready to use"
in_pod writer 'echo changed-after-snapshot >/dir/data' >/dev/null
k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: restore-a}
spec:
  storageClassName: loam
  accessModes: [ReadWriteOnce]
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap-a}
  resources: {requests: {storage: 64Mi}}
EOF
pod reader 'true' restore-a:/data
expect "the restore has the bytes of the snapshot, not the later write" \
    "$(in_pod reader 'sha256sum </data/data')" "$sum_dir"

say "6. a VolumeGroupSnapshot of two loop volumes in use: frozen together, each member restores its own bytes"
# group NAME LABEL: a VolumeGroupSnapshot of the namespace's PVCs labelled group=LABEL.
group() {
    k apply -f - >/dev/null <<EOF
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshot
metadata: {name: $1}
spec:
  volumeGroupSnapshotClassName: loam
  source:
    selector: {matchLabels: {group: $2}}
EOF
}
group_field() { k get volumegroupsnapshot "$1" -o jsonpath="$2"; }
group_ready() { [ "$(group_field "$1" '{.status.readyToUse}')" = true ]; }
group_error_says() { [[ $(group_field "$1" '{.status.error.message}') == *"$2"* ]]; }
# members GROUP: the VolumeSnapshots the snapshot-controller made for GROUP,
# found as it finds them (an owner reference to the group, by uid), one line
# each, by source PVC: "<name> <source PVC> <readyToUse> <bound content>".
members() {
    local uid
    uid=$(group_field "$1" '{.metadata.uid}')
    k get volumesnapshot -o json | python3 -c '
import json, sys
for s in json.load(sys.stdin)["items"]:
    if any(o.get("kind") == "VolumeGroupSnapshot" and o.get("uid") == sys.argv[1]
           for o in s["metadata"].get("ownerReferences", [])):
        status = s.get("status") or {}
        print(s["metadata"]["name"], s["spec"]["source"].get("persistentVolumeClaimName") or "-",
              str(status.get("readyToUse", False)).lower(), status.get("boundVolumeSnapshotContentName") or "-")
' "$uid" | sort -k2,2
}
members_ready() { [ "$(members "$1" | awk '$3 == "true"' | wc -l)" = "$2" ]; }
pvc db-data loam-loop 64Mi
pvc db-wal loam-loop 64Mi
k label pvc db-data db-wal group=db >/dev/null
# The pod stays up: both volumes stay staged and mounted, so the cut must freeze them.
pod db 'head -c 1048576 /dev/urandom >/data/data && head -c 1048576 /dev/urandom >/wal/data && sync' \
    db-data:/data db-wal:/wal
sum_data=$(in_pod db 'sha256sum </data/data')
sum_wal=$(in_pod db 'sha256sum </wal/data')
[ "$sum_data" != "$sum_wal" ] && ok "the pod wrote different bytes to db-data and db-wal and keeps both mounted" ||
    fail "the pod wrote the same bytes to db-data and db-wal"
group group-db db
until_ok "$T" "group-db ready to use" group_ready group-db
ok "the VolumeGroupSnapshot group-db (class loam, selector group=db) is ready to use"
vgsc_db=$(group_field group-db '{.status.boundVolumeGroupSnapshotContentName}')
group_handle=$(kubectl get volumegroupsnapshotcontent "$vgsc_db" -o jsonpath='{.status.volumeGroupSnapshotHandle}')
[[ $group_handle =~ ^[0-9a-f]{32}@$NODE$ ]] && ok "its VolumeGroupSnapshotContent's handle is <key>@<node>: $group_handle" ||
    fail "group snapshot handle '$group_handle'"
expect "the content lists db-data's and db-wal's volumes" \
    "$(kubectl get volumegroupsnapshotcontent "$vgsc_db" -o jsonpath='{.status.volumeSnapshotInfoList[*].volumeHandle}' |
        tr ' ' '\n' | sort | tr '\n' ' ')" \
    "$(printf '%s\n' "$(pv_handle db-data)" "$(pv_handle db-wal)" | sort | tr '\n' ' ')"
agent_log=$(loam_log "$(agent_on "$NODE")")
cut=$(grep -F "group=$group_handle " <<<"$agent_log" | grep -F 'group snapshot cut' || true)
[[ $cut == *"members=2 thawed=2"* ]] && ok "the node agent froze both mounted ext4 volumes for the cut (thawed=2)" ||
    fail "the node agent's log has no 'group snapshot cut ... members=2 thawed=2' for $group_handle: '$cut'"
until_ok "$T" "two ready member VolumeSnapshots of group-db" members_ready group-db 2
expect "group-db owns two VolumeSnapshots, one per PVC" "$(members group-db | awk '{print $2}' | tr '\n' ' ')" \
    "db-data db-wal "
snap_data=$(members group-db | awk '$2 == "db-data" {print $1}')
snap_wal=$(members group-db | awk '$2 == "db-wal" {print $1}')
ok "both are ready to use: $snap_data (db-data), $snap_wal (db-wal)"
member_contents=()
member_files=()
for s in "$snap_data" "$snap_wal"; do
    c=$(k get volumesnapshot "$s" -o jsonpath='{.status.boundVolumeSnapshotContentName}')
    h=$(kubectl get volumesnapshotcontent "$c" -o jsonpath='{.status.snapshotHandle}')
    in_group=$(kubectl get volumesnapshotcontent "$c" -o jsonpath='{.status.volumeGroupSnapshotHandle}')
    [[ $h =~ ^[0-9a-f]{32}@$NODE$ && $in_group == "$group_handle" ]] &&
        ok "$s is Loam snapshot $h, a member of $group_handle" ||
        fail "$s: snapshot handle '$h', group snapshot handle '$in_group'"
    on_node "$NODE" "test -f $ROOT/snapshots/${h%@*}.img" && ok "its image is on the node: $ROOT/snapshots/${h%@*}.img" ||
        fail "no $ROOT/snapshots/${h%@*}.img"
    member_contents+=("$c")
    member_files+=("$ROOT/snapshots/${h%@*}.img" "$ROOT/meta/snapshots/${h%@*}.json")
done
in_pod db 'echo changed-after-group-snapshot >/data/data && echo changed-after-group-snapshot >/wal/data && sync' \
    >/dev/null
restored db-data-restored loam-loop "$snap_data" 64Mi
restored db-wal-restored loam-loop "$snap_wal" 64Mi
pod db-reader 'true' db-data-restored:/data db-wal-restored:/wal
expect "db-data's member restores db-data's bytes of the cut, not the later write" \
    "$(in_pod db-reader 'sha256sum </data/data')" "$sum_data"
expect "db-wal's member restores db-wal's bytes of the cut, not the later write" \
    "$(in_pod db-reader 'sha256sum </wal/data')" "$sum_wal"

# Two dir volumes in use cannot be frozen: the group is refused, not cut
# inconsistent. (Here the root is not btrfs, so each is a file-by-file copy;
# on btrfs each would be live, and two live members are refused the same way.)
pvc dirs-1 loam 16Mi
pvc dirs-2 loam 16Mi
k label pvc dirs-1 dirs-2 group=dirs >/dev/null
pod dirs 'echo one >/one/f && echo two >/two/f' dirs-1:/one dirs-2:/two
group group-dirs dirs
until_ok "$T" "group-dirs reports Loam's refusal" group_error_says group-dirs 'code = FailedPrecondition'
msg=$(group_field group-dirs '{.status.error.message}')
ok "group-dirs is refused with FAILED_PRECONDITION (the VolumeGroupSnapshot's status.error)"
h1=$(pv_handle dirs-1)
h2=$(pv_handle dirs-2)
[[ $msg == *"volumes $h1, $h2 are in use"* || $msg == *"volumes $h2, $h1 are in use"* ]] &&
    ok "the message names both volumes" || fail "the message does not name $h1 and $h2: $msg"
[[ $msg == *"cannot be snapshotted at one point in time"* && $msg == *"loop volumes staged as a filesystem are frozen"* ]] &&
    ok "and the rule: in use and unfreezable, so not at one point in time; loop filesystem volumes are frozen" ||
    fail "the message does not state the rule: $msg"
expect "group-dirs is not ready to use" "$(group_field group-dirs '{.status.readyToUse}')" false
vgsc_dirs=$(group_field group-dirs '{.status.boundVolumeGroupSnapshotContentName}')
[[ $(kubectl get volumegroupsnapshotcontent "$vgsc_dirs" -o jsonpath='{.status.error.message}') == *"code = FailedPrecondition"* ]] &&
    ok "its VolumeGroupSnapshotContent carries the same error (set by csi-snapshotter)" ||
    fail "no FailedPrecondition in $vgsc_dirs's status.error"
expect "it has no group snapshot handle" \
    "$(kubectl get volumegroupsnapshotcontent "$vgsc_dirs" -o jsonpath='{.status.volumeGroupSnapshotHandle}')" ""
expect "group-dirs owns no VolumeSnapshot" "$(members group-dirs | wc -l)" 0
expect "the node holds only group-db's group record: the refusal cut nothing" "$(on_node "$NODE" "ls $ROOT/meta/groups")" \
    "${group_handle%@*}.json"

k delete volumegroupsnapshot group-db group-dirs --wait=true --timeout="${T}s" >/dev/null ||
    fail "deleting group-db and group-dirs"
ok "group-db and group-dirs are deleted"
until_ok "$T" "the group contents gone" none_left kubectl get volumegroupsnapshotcontent "$vgsc_db" "$vgsc_dirs"
ok "their VolumeGroupSnapshotContents are gone"
until_ok "$T" "group-db's members gone" none_left k get volumesnapshot "$snap_data" "$snap_wal"
until_ok "$T" "the members' contents gone" none_left kubectl get volumesnapshotcontent "${member_contents[@]}"
ok "group-db's member VolumeSnapshots and their contents are gone"
until_ok 60 "the members' images and records gone from the node" files_gone "${member_files[@]}" \
    "$ROOT/meta/groups/${group_handle%@*}.json"
ok "the members' images and records and the group's record are gone from the node"
expect "the restores keep their bytes" "$(in_pod db-reader 'sha256sum </data/data; sha256sum </wal/data')" \
    "$sum_data
$sum_wal"
for p in db db-reader dirs; do delete_pod "$p"; done

say "7. a PVC expanded online: the pod sees the new size"
# grow CLAIM POD PATH NEW_SIZE: expands a mounted PVC, waits for the pod to see it.
grow() {
    local claim=$1 p=$2 path=$3 size=$4 before after
    before=$(in_pod "$p" "df -k $path | awk 'NR==2 {print \$2}'")
    k patch pvc "$claim" --type merge -p "{\"spec\":{\"resources\":{\"requests\":{\"storage\":\"$size\"}}}}" >/dev/null
    until_ok "$T" "$claim capacity $size" sh -c "[ \"\$(kubectl -n $NS get pvc $claim -o jsonpath='{.status.capacity.storage}')\" = $size ]"
    ok "$claim's capacity is $size"
    until_ok 60 "the pod sees the grown filesystem" sh -c \
        "[ \"\$(kubectl -n $NS exec $p -- df -k $path | awk 'NR==2 {print \$2}')\" -gt $((before * 5 / 4)) ]"
    after=$(in_pod "$p" "df -k $path | awk 'NR==2 {print \$2}'")
    ok "the pod's $path grew from ${before}K to ${after}K while mounted"
}
# Growing a mounted ext4 takes CAP_SYS_RESOURCE (the kernel's EXT4_IOC_RESIZE_FS),
# which a privileged pod has only where the host's bounding set does.
if (( (0x$(awk '/^CapBnd/ {print $2}' /proc/self/status) >> 24) & 1 )); then
    grow loop-a writer /loop 128Mi
    expect "its data is intact" "$(in_pod writer 'sha256sum </loop/data')" "$sum_dir"
    in_pod writer 'head -c 83886080 /dev/zero >/loop/big && sync && rm /loop/big' >/dev/null &&
        ok "80 MiB fit on the grown filesystem (more than its old size)" || fail "writing 80 MiB after the expansion"
else
    # No pod can grow a mounted ext4 here: Loam refuses NodeExpandVolume with
    # FAILED_PRECONDITION, the kubelet stops retrying while the volume is
    # mounted, and the next NodeStage grows the filesystem offline.
    say "   (no CAP_SYS_RESOURCE in this host's bounding set: the ext4 growth finishes at the next mount)"
    before=$(in_pod writer "df -k /loop | awk 'NR==2 {print \$2}'")
    k patch pvc loop-a --type merge -p '{"spec":{"resources":{"requests":{"storage":"128Mi"}}}}' >/dev/null
    until_ok "$T" "a NodeResizeError condition on loop-a naming CAP_SYS_RESOURCE" sh -c \
        "kubectl -n $NS get pvc loop-a -o jsonpath='{.status.conditions[?(@.type==\"NodeResizeError\")].message}' | grep -q CAP_SYS_RESOURCE"
    ok "loop-a reports why it cannot grow while mounted (NodeResizeError names CAP_SYS_RESOURCE)"
    expect "the mounted filesystem kept its size" "$(in_pod writer "df -k /loop | awk 'NR==2 {print \$2}'")" "$before"
    delete_pod writer
    pod writer 'true' dir-a:/dir loop-a:/loop
    until_ok "$T" "loop-a capacity 128Mi after the pod restart" sh -c \
        "[ \"\$(kubectl -n $NS get pvc loop-a -o jsonpath='{.status.capacity.storage}')\" = 128Mi ]"
    ok "loop-a's capacity is 128Mi after the pod restart"
    after=$(in_pod writer "df -k /loop | awk 'NR==2 {print \$2}'")
    [ "$after" -gt $((before * 3 / 2)) ] && ok "the pod's /loop grew from ${before}K to ${after}K at the new mount" ||
        fail "/loop is ${after}K after the restart, was ${before}K"
    expect "its data is intact" "$(in_pod writer 'sha256sum </loop/data')" "$sum_dir"
fi
kubectl apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: loam-loop-xfs}
provisioner: loam.csi.dev
reclaimPolicy: Delete
volumeBindingMode: WaitForFirstConsumer
allowVolumeExpansion: true
parameters: {backend: loop, csi.storage.k8s.io/fstype: xfs, provisioning: thin}
EOF
pvc grow-xfs loam-loop-xfs 320Mi
pod grower 'head -c 1048576 /dev/urandom >/data/data' grow-xfs:/data
sum_xfs=$(in_pod grower 'sha256sum </data/data')
grow grow-xfs grower /data 480Mi
expect "its data is intact" "$(in_pod grower 'sha256sum </data/data')" "$sum_xfs"
in_pod grower 'head -c 367001600 /dev/zero >/data/big && sync && rm /data/big' >/dev/null &&
    ok "350 MiB fit on the grown filesystem (more than its old size)" || fail "writing 350 MiB after the expansion"
delete_pod grower

say "7b. ModifyVolume through a VolumeAttributesClass (csi-resizer): a thin loop volume made thick while in use"
kubectl apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: loam-loop-thin}
provisioner: loam.csi.dev
reclaimPolicy: Delete
volumeBindingMode: WaitForFirstConsumer
parameters: {backend: loop, provisioning: thin}
---
apiVersion: storage.k8s.io/v1
kind: VolumeAttributesClass
metadata: {name: loam-reserved}
driverName: loam.csi.dev
parameters: {provisioning: thick}
EOF
pvc thin loam-loop-thin 64Mi
pod thinner 'true' thin:/data
key_thin=$(key_of thin)
thin_image="$ROOT/volumes/$key_thin.img"
allocated=$(($(on_node "$NODE" "stat -c '%b*%B' $thin_image")))
[ "$allocated" -lt $((32 << 20)) ] && ok "the thin image has $allocated bytes allocated (less than half of 64 MiB)" ||
    fail "the thin image has $allocated bytes allocated"
modified=$SECONDS
k patch pvc thin --type merge -p '{"spec":{"volumeAttributesClassName":"loam-reserved"}}' >/dev/null
until_ok "$T" "thin's current VolumeAttributesClass is loam-reserved" sh -c \
    "[ \"\$(kubectl -n $NS get pvc thin -o jsonpath='{.status.currentVolumeAttributesClassName}')\" = loam-reserved ]"
ok "the PVC's current VolumeAttributesClass is loam-reserved (ControllerModifyVolume answered)"
# The thin ext4 leaves its inode tables to the kernel's ext4lazyinit thread,
# whose write-zeroes requests the loop device turns into punched holes, also
# after the modify (seen: 62,955,520 of 67,108,864 bytes left); Loam allocates
# again what a thick image lost at each measurement (every 10 s at most). No
# waiting for that thread: 20 s after the modify (the thread has had its time
# to punch) the allocation must be whole within 10 s more.
thick() { [ "$(($(on_node "$NODE" "stat -c '%b*%B' $thin_image")))" -ge $((64 << 20)) ]; }
sleep $((modified + 20 > SECONDS ? modified + 20 - SECONDS : 0))
until_ok 10 "the image whole (64 MiB allocated) 20-30 s after ModifyVolume" thick
lazyinit=$(on_node "$NODE" "dev=\$(losetup -n -O NAME -j $thin_image | head -1);
    dumpe2fs \$dev 2>/dev/null | grep '^Group [0-9]' | grep -vc ITABLE_ZEROED" || true)
ok "the image is now thick: $(($(on_node "$NODE" "stat -c '%b*%B' $thin_image"))) bytes allocated (${lazyinit:-?} block groups still left to ext4lazyinit)"
regained=$(loam_log "$(agent_on "$NODE")" | grep -F "allocated a thick volume's image again" |
    grep -F "volume=$key_thin" | grep -o 'bytes=[0-9]*' | head -1 || true)
[ -n "$regained" ] && say "   (Loam's agent allocated the holes ext4lazyinit punched again: $regained)" ||
    say "   (Loam's agent had nothing to allocate again: ext4lazyinit punched no hole this time)"
in_pod thinner 'echo still-here >/data/f && cat /data/f' >/dev/null && ok "the pod still writes to it" ||
    fail "write after ModifyVolume"
delete_pod thinner

say "8. a block PVC is written raw"
pvc blk loam-loop 32Mi Block
pod raw 'true' blk:/dev/xvda
expect "the pod sees a 32 MiB block device" "$(in_pod raw 'blockdev --getsize64 /dev/xvda')" 33554432
sum_raw=$(in_pod raw 'head -c 4194304 /dev/urandom >/tmp/r && dd if=/tmp/r of=/dev/xvda bs=1M oflag=direct 2>/dev/null && sha256sum </tmp/r')
expect "raw bytes read back" "$(in_pod raw 'head -c 4194304 /dev/xvda | sha256sum')" "$sum_raw"
delete_pod raw
pod raw 'true' blk:/dev/xvda
expect "raw bytes still there in a new pod" "$(in_pod raw 'head -c 4194304 /dev/xvda | sha256sum')" "$sum_raw"

say "9. an inline volume (CSI ephemeral): size-enforced scratch space that lives and dies with its pod"
images_before=$(on_node "$NODE" "ls $ROOT/volumes" | grep '\.img$' | sort || true)
k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: scratch}
spec:
  terminationGracePeriodSeconds: 1
  $pin
  containers:
    - name: shell
      image: $IMAGE
      command: ["/bin/sh", "-c", "touch /tmp/ready; exec sleep infinity"]
      readinessProbe: {exec: {command: ["test", "-f", "/tmp/ready"]}, periodSeconds: 1}
      volumeMounts: [{name: scratch, mountPath: /scratch}]
  volumes:
    - name: scratch
      csi: {driver: loam.csi.dev, volumeAttributes: {backend: loop, size: 32Mi}}
EOF
k wait --for=condition=Ready pod/scratch --timeout="${T}s" >/dev/null || fail "pod scratch not Ready"
ok "a pod with an inline Loam volume (backend loop, size 32Mi) runs"
inline_image=$(comm -13 <(echo "$images_before") <(on_node "$NODE" "ls $ROOT/volumes" | grep '\.img$' | sort))
expect "the node holds one new 32 MiB image for it" \
    "$(on_node "$NODE" "stat -c %s $ROOT/volumes/$inline_image" 2>/dev/null)" $((32 << 20))
src=$(in_pod scratch "awk '\$2 == \"/scratch\" {print \$1, \$3}' /proc/mounts")
[[ $src =~ ^/dev/loop[0-9]+\ ext4$ ]] && ok "/scratch is ext4 on a loop device ($src)" || fail "/scratch is mounted from '$src'"
in_pod scratch 'head -c 16777216 /dev/urandom >/scratch/half && sync' >/dev/null &&
    ok "16 MiB fit" || fail "writing 16 MiB to the 32 MiB inline volume"
in_pod scratch 'head -c 50331648 /dev/zero >/scratch/big' >/dev/null 2>&1 &&
    fail "48 MiB fit on a 32 MiB inline volume" || ok "48 MiB do not fit: the size is enforced"
expect "no PV stands for it" "$(kubectl get pv -o jsonpath='{range .items[*]}{.spec.csi.volumeHandle}{"\n"}{end}' |
    grep -c "${inline_image%.img}" || true)" 0
delete_pod scratch
until_ok 60 "the inline volume's image is gone from the node" files_gone "$ROOT/volumes/$inline_image"
ok "deleting the pod deleted the inline volume and its image"
! on_node "$NODE" "losetup -l -n -O BACK-FILE" | grep -q "${inline_image%.img}" && ok "and detached its loop device" ||
    fail "a loop device still holds ${inline_image%.img}"

say "10. reclaim: Delete removes the volume from the node, Retain keeps it"
key_restore=$(key_of restore-a)
delete_pod reader
k delete pvc restore-a --wait=true --timeout="${T}s" >/dev/null
until_ok "$T" "the restore's PV is gone" sh -c "! kubectl get pv | grep -q $NS/restore-a"
until_ok 30 "the restore's data is gone from the node" on_node "$NODE" "test ! -e $ROOT/volumes/$key_restore"
ok "Delete: PV and $ROOT/volumes/$key_restore are gone"
kubectl apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: loam-retain}
provisioner: loam.csi.dev
reclaimPolicy: Retain
volumeBindingMode: WaitForFirstConsumer
parameters: {backend: dir}
EOF
pvc kept loam-retain 16Mi
pod keeper 'echo retained >/data/r' kept:/data
pv_kept=$(pvc_field kept '{.spec.volumeName}')
key_kept=$(key_of kept)
delete_pod keeper
k delete pvc kept --wait=true --timeout="${T}s" >/dev/null
until_ok 60 "the retained PV is Released" sh -c "[ \"\$(kubectl get pv $pv_kept -o jsonpath='{.status.phase}')\" = Released ]"
ok "Retain: the PV $pv_kept is Released, not deleted"
expect "Retain: the data stays on the node" "$(on_node "$NODE" "cat $ROOT/volumes/$key_kept/r")" retained

nodes=$(kubectl get nodes -o name | wc -l)
if [ "$nodes" -lt 3 ]; then
    say "12. (not run: the cluster has $nodes node(s); the steps across nodes need three)"
else
    say "12. across nodes: capacity per node and class, placement by room, a StatefulSet spread over the nodes"
    # capacity NODE CLASS: Loam's CSIStorageCapacity for NODE and CLASS, in bytes (empty if none).
    capacity() {
        kubectl -n loam get csistoragecapacities -o json | python3 -c '
import json, re, sys
node, cls = sys.argv[1:]
units = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
for c in json.load(sys.stdin)["items"]:
    labels = (c.get("nodeTopology") or {}).get("matchLabels") or {}
    if c["storageClassName"] == cls and labels.get("topology.loam.csi.dev/node") == node:
        num, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", c.get("capacity", "0")).groups()
        print(int(float(num) * units[unit]))
        break' "$1" "$2"
    }
    has_capacity() { [ -n "$(capacity "$1" "$2")" ]; }
    all_nodes=$(kubectl get nodes -o jsonpath='{.items[*].metadata.name}')
    for n in $all_nodes; do
        for c in loam loam-loop; do
            until_ok 150 "a CSIStorageCapacity for $n and class $c" has_capacity "$n" "$c"
        done
    done
    ok "a CSIStorageCapacity per node and class ($(wc -w <<<"$all_nodes") nodes x loam, loam-loop)"
    # The workers (the control plane keeps its NoSchedule taint): the one with the
    # most room and the one with the least.
    read -r small big < <(for n in $(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' \
        -o jsonpath='{.items[*].metadata.name}'); do echo "$(capacity "$n" loam) $n"; done | sort -n |
        awk 'NR == 1 {s = $2} {b = $2} END {print s, b}')
    small_room=$(capacity "$small" loam)
    big_room=$(capacity "$big" loam)
    [ "$big_room" -gt "$small_room" ] && ok "the workers' roots differ: $small has $small_room bytes, $big $big_room" ||
        fail "the workers' roots do not differ: $small $small_room, $big $big_room"
    size_mi=$(((small_room + big_room) / 2 >> 20))
    pin_saved=$pin
    pin=''
    pvc roomy loam "${size_mi}Mi"
    pod roomy 'true' roomy:/data
    h=$(pv_handle roomy)
    expect "a ${size_mi}Mi PVC, too large for $small's root, is placed on $big" "${h#*@}" "$big"
    expect "its PV's node affinity names $big" "$(kubectl get pv "$(pvc_field roomy '{.spec.volumeName}')" \
        -o jsonpath='{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}')" "$big"
    room_follows() { [ "$(capacity "$big" loam)" -le $((big_room - (size_mi << 20) + (8 << 20))) ]; }
    until_ok 150 "$big's capacity follows the new volume" room_follows
    ok "$big's capacity for loam went from $big_room to $(capacity "$big" loam) bytes"
    delete_pod roomy
    k delete pvc roomy --wait=true --timeout="${T}s" >/dev/null
    pvc huge loam 64Gi
    k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: huge}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{name: shell, image: $IMAGE, command: ["sleep", "infinity"], volumeMounts: [{name: v, mountPath: /data}]}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: huge}}]
EOF
    says_no_room() {
        k get events --field-selector involvedObject.name=huge -o jsonpath='{.items[*].message}' |
            grep -q -e 'did not have enough free storage' -e RESOURCE_EXHAUSTED -e ResourceExhausted
    }
    until_ok 120 "the 64Gi PVC's pod is refused for lack of room" says_no_room
    ok "a 64Gi PVC, too large for every node: $(k get events --field-selector involvedObject.name=huge \
        -o jsonpath='{.items[-1:].message}' | cut -c1-160)"
    expect "and stays Pending" "$(pvc_field huge '{.status.phase}')" Pending
    delete_pod huge
    k delete pvc huge --wait=true --timeout="${T}s" >/dev/null

    k apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: spread}
spec:
  serviceName: spread
  replicas: 3
  podManagementPolicy: Parallel
  selector: {matchLabels: {app: spread}}
  template:
    metadata: {labels: {app: spread}}
    spec:
      terminationGracePeriodSeconds: 1
      tolerations: [{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}]
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - {labelSelector: {matchLabels: {app: spread}}, topologyKey: kubernetes.io/hostname}
      containers:
        - name: shell
          image: $IMAGE
          command: ["/bin/sh", "-c", "[ -f /data/id ] || { hostname >/data/id; head -c 65536 /dev/urandom >/data/blob; }; exec sleep infinity"]
          volumeMounts: [{name: data, mountPath: /data}]
          readinessProbe: {exec: {command: ["test", "-f", "/data/id"]}, periodSeconds: 1}
  volumeClaimTemplates:
    - metadata: {name: data}
      spec:
        storageClassName: loam
        accessModes: [ReadWriteOnce]
        resources: {requests: {storage: 16Mi}}
EOF
    until_ok "$T" "spread has 3 ready replicas" sh -c "[ \"\$(kubectl -n $NS get sts spread -o jsonpath='{.status.readyReplicas}')\" = 3 ]"
    declare -A on
    for i in 0 1 2; do
        on[$i]=$(k get pod "spread-$i" -o jsonpath='{.spec.nodeName}')
        h=$(pv_handle "data-spread-$i")
        expect "spread-$i's volume is on its pod's node ${on[$i]}" "${h#*@}" "${on[$i]}"
        expect "data-spread-$i's PV node affinity names ${on[$i]}" "$(kubectl get pv "$(pvc_field "data-spread-$i" \
            '{.spec.volumeName}')" -o jsonpath='{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}')" \
            "${on[$i]}"
        blob[$i]=$(in_pod "spread-$i" 'sha256sum </data/blob')
    done
    expect "one replica and one local volume per node" "$(printf '%s\n' "${on[@]}" | sort -u | wc -l)" 3
    controller_node=$(kubectl -n loam get pod -l app.kubernetes.io/component=controller -o jsonpath='{.items[0].spec.nodeName}')
    others=$(printf '%s\n' "${on[@]}" | grep -vcx "$controller_node" || true)
    expect "the controller on $controller_node made $others of them on the other nodes (through the headless Service)" \
        "$others" 2
    k delete pod spread-1 --wait=true --timeout="${T}s" >/dev/null
    until_ok "$T" "spread-1 back" sh -c "[ \"\$(kubectl -n $NS get sts spread -o jsonpath='{.status.readyReplicas}')\" = 3 ]"
    expect "spread-1 is back on ${on[1]} with its data" \
        "$(k get pod spread-1 -o jsonpath='{.spec.nodeName}') $(in_pod spread-1 'cat /data/id; sha256sum </data/blob')" \
        "${on[1]} spread-1
${blob[1]}"
    k scale sts spread --replicas=1 >/dev/null
    until_ok "$T" "spread scaled down to 1" sh -c "! kubectl -n $NS get pod spread-1 spread-2 2>/dev/null | grep -q spread"
    expect "spread scaled down: the PVCs stay" "$(k get pvc -o name | grep -c data-spread-)" 3
    k scale sts spread --replicas=3 >/dev/null
    until_ok "$T" "spread scaled up to 3" sh -c "[ \"\$(kubectl -n $NS get sts spread -o jsonpath='{.status.readyReplicas}')\" = 3 ]"
    for i in 0 1 2; do
        expect "spread-$i is back on ${on[$i]} with its data after the scale down and up" \
            "$(k get pod "spread-$i" -o jsonpath='{.spec.nodeName}') $(in_pod "spread-$i" 'cat /data/id; sha256sum </data/blob')" \
            "${on[$i]} spread-$i
${blob[$i]}"
    done
    spread_pvs=$(for i in 0 1 2; do pvc_field "data-spread-$i" '{.spec.volumeName} '; done)
    k delete sts spread --wait=true --timeout="${T}s" >/dev/null
    k delete pvc data-spread-0 data-spread-1 data-spread-2 --wait=true --timeout="${T}s" >/dev/null
    # Detached and deleted on every node before 12b takes one node's agent away.
    until_ok "$T" "spread's volumes deleted on their nodes" none_left kubectl get pv $spread_pvs
    ok "deleting spread's PVCs deleted their volumes on the three nodes"

    say "12b. one worker's node agent away: the other nodes keep working; the away node's operations fail UNAVAILABLE naming it, then succeed"
    away=$small
    here_node=$big
    [ "$here_node" != "$away" ] || fail "two workers needed"
    # A volume on $away, made while its agent is there, and detached again.
    pin="nodeSelector: {kubernetes.io/hostname: $away}"
    pvc onaway loam 16Mi
    pod onaway 'echo on-away >/data/f' onaway:/data
    pv_onaway=$(pvc_field onaway '{.spec.volumeName}')
    delete_pod onaway
    detached() { [ -z "$(kubectl get volumeattachments -o jsonpath="{.items[?(@.spec.source.persistentVolumeName==\"$pv_onaway\")].metadata.name}")" ]; }
    until_ok "$T" "onaway's volume detached" detached
    agent_gone() { [ -z "$(agent_on "$away")" ]; }
    kubectl -n loam patch daemonset loam-node --type merge -p "{\"spec\":{\"template\":{\"spec\":{\"affinity\":{\"nodeAffinity\":{\"requiredDuringSchedulingIgnoredDuringExecution\":{\"nodeSelectorTerms\":[{\"matchExpressions\":[{\"key\":\"kubernetes.io/hostname\",\"operator\":\"NotIn\",\"values\":[\"$away\"]}]}]}}}}}}}" >/dev/null
    kubectl -n loam rollout status daemonset/loam-node --timeout="${T}s" >/dev/null || fail "loam-node rollout without $away"
    until_ok "$T" "no node agent on $away" agent_gone
    ok "the node agent of $away is gone (the DaemonSet keeps off it)"
    pin="nodeSelector: {kubernetes.io/hostname: $here_node}"
    pvc elsewhere loam 16Mi
    pod elsewhere 'echo other-node >/data/f' elsewhere:/data
    h=$(pv_handle elsewhere)
    expect "meanwhile a volume on $here_node is provisioned and attached" "${h#*@}" "$here_node"
    snapshot snap-elsewhere elsewhere
    until_ok "$T" "snap-elsewhere ready" snapshot_ready snap-elsewhere
    ok "and snapshotted"
    snapshot snap-away onaway
    snapshot_error() { k get volumesnapshot snap-away -o jsonpath='{.status.error.message}'; }
    snapshot_unavailable() { [[ $(snapshot_error) == *"code = Unavailable"*"$away"* ]]; }
    until_ok "$T" "the snapshot of onaway fails UNAVAILABLE naming $away" snapshot_unavailable
    ok "a snapshot of the volume on $away fails: $(snapshot_error | grep -o 'code = Unavailable.*' | cut -c1-160)"
    expect "snap-away is not ready to use" "$(k get volumesnapshot snap-away -o jsonpath='{.status.readyToUse}')" false
    # The registrar went with the agent, so the kubelet of $away lists no Loam
    # driver: the provisioner drops its CSIStorageCapacity and the scheduler
    # keeps new volumes off the node (no CreateVolume reaches Loam for it).
    pin="nodeSelector: {kubernetes.io/hostname: $away}"
    pvc stranded loam 16Mi
    k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: stranded}
spec:
  terminationGracePeriodSeconds: 1
  $pin
  containers: [{name: shell, image: $IMAGE, command: ["sleep", "infinity"], volumeMounts: [{name: v, mountPath: /data}]}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: stranded}}]
EOF
    stranded_refusal() {
        k get events --field-selector involvedObject.name=stranded,reason=FailedScheduling -o jsonpath='{.items[-1:].message}'
    }
    no_room_on_away() {
        k get events --field-selector involvedObject.name=stranded,reason=FailedScheduling -o jsonpath='{.items[*].message}' |
            grep -q 'did not have enough free storage'
    }
    until_ok 120 "the scheduler keeps a new volume off $away" no_room_on_away
    ok "a new volume for $away is not placed there: $(stranded_refusal | cut -c1-160)"
    no_driver() { [ -z "$(kubectl get csinode "$away" -o jsonpath='{.spec.drivers[*].name}')" ]; }
    until_ok 60 "$away's CSINode lists no Loam driver" no_driver
    no_capacity() { ! has_capacity "$away" loam; }
    until_ok 90 "no CSIStorageCapacity for $away" no_capacity
    ok "$away's CSINode lists no Loam driver and it has no CSIStorageCapacity while its agent is away"
    expect "stranded stays Pending while the agent is away" "$(pvc_field stranded '{.status.phase}')" Pending
    kubectl -n loam patch daemonset loam-node --type json -p '[{"op": "remove", "path": "/spec/template/spec/affinity"}]' >/dev/null
    kubectl -n loam rollout status daemonset/loam-node --timeout="${T}s" >/dev/null || fail "loam-node rollout back on $away"
    until_ok "$T" "snap-away ready once the agent is back" snapshot_ready snap-away
    ok "once the agent is back the snapshot of the volume on $away is made"
    k wait --for=condition=Ready pod/stranded --timeout="${T}s" >/dev/null || fail "the stranded pod did not start once the agent came back"
    h=$(pv_handle stranded)
    expect "and the new volume is made on $away and its pod runs" "${h#*@}" "$away"
    b12_pvs=$(for c in onaway elsewhere stranded; do pvc_field "$c" '{.spec.volumeName} '; done)
    for p in elsewhere stranded; do delete_pod "$p"; done
    k delete volumesnapshot snap-elsewhere snap-away --wait=true --timeout="${T}s" >/dev/null
    k delete pvc onaway elsewhere stranded --wait=true --timeout="${T}s" >/dev/null
    until_ok "$T" "12b's volumes deleted on their nodes" none_left kubectl get pv $b12_pvs
    pin=$pin_saved

    if [ -z "${E2E_DB_IMAGE:-}" ]; then
        say "12d. (not run: E2E_DB_IMAGE is unset, no database image here)"
    else
        say "12d. the seed scenario: a MariaDB StatefulSet whose replicas are seeded by cloning, primary -> replica 1 -> replica 2, one per node; then a replica's PVC moved to another node with kubectl label, a move cancelled, a move to any node"
        # db-N's PVC data-db-N is made before the StatefulSet scales to N+1, as
        # a clone of the replica before it; the StatefulSet takes a PVC of its
        # template's name that exists. Its pod may not share a node with another
        # replica, so the clone lands on another node than its source.
        db_sts() {
            k apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: $1
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      terminationGracePeriodSeconds: 30
      tolerations: [{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}]
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - {labelSelector: {matchLabels: {app: db}}, topologyKey: kubernetes.io/hostname}
      containers:
        - name: mariadb
          image: $E2E_DB_IMAGE
          command:
            - sh
            - -c
            - |
              set -e
              mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
              [ -d /var/lib/mysql/data/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql/data \
                --skip-test-db --innodb-log-file-size=16M >/dev/null
              chown -R mysql:mysql /var/lib/mysql/data
              exec mariadbd --user=mysql --datadir=/var/lib/mysql/data --innodb-log-file-size=16M \
                --skip-networking --socket=/run/mysqld/mysqld.sock
          readinessProbe: {exec: {command: [mariadb-admin, --socket=/run/mysqld/mysqld.sock, ping]}, periodSeconds: 2}
          volumeMounts: [{name: data, mountPath: /var/lib/mysql}]
  volumeClaimTemplates:
    - metadata: {name: data}
      spec:
        storageClassName: loam-loop
        accessModes: [ReadWriteOnce]
        resources: {requests: {storage: 256Mi}}
EOF
        }
        db_ready() { [ "$(k get sts db -o jsonpath='{.status.readyReplicas}')" = "$1" ]; }
        sql() { local p=$1; shift; k exec "$p" -c mariadb -- mariadb --socket=/run/mysqld/mysqld.sock -N -B -e "$*"; }
        rows() { sql "$1" 'SELECT GROUP_CONCAT(v ORDER BY id) FROM seed.t'; }
        # clone_of NAME SOURCE: a PVC of the template's class and size cloned from SOURCE.
        clone_of() { cloned "$1" loam-loop "$2" 256Mi; }
        db_sts 1
        until_ok 300 "db-0 (the primary) ready" db_ready 1
        sql db-0 "CREATE DATABASE seed; CREATE TABLE seed.t (id INT PRIMARY KEY, v VARCHAR(32)) ENGINE=InnoDB;
                  INSERT INTO seed.t VALUES (1, 'primary-1'), (2, 'primary-2'), (3, 'primary-3');"
        expect "the primary answers its rows" "$(rows db-0)" "primary-1,primary-2,primary-3"
        declare -A db_on
        db_on[0]=$(k get pod db-0 -o jsonpath='{.spec.nodeName}')
        # Cloned while the primary runs: the cut of a mounted loop filesystem is
        # frozen, so the copy is crash-consistent and InnoDB recovers from it.
        clone_of data-db-1 data-db-0
        t_clone=$SECONDS
        db_sts 2
        until_ok 300 "db-1 ready on its clone of the primary's volume" db_ready 2
        db_on[1]=$(k get pod db-1 -o jsonpath='{.spec.nodeName}')
        h=$(pv_handle data-db-1)
        [ "${db_on[1]}" != "${db_on[0]}" ] && [ "${h#*@}" = "${db_on[1]}" ] &&
            ok "replica 1 runs on ${db_on[1]} (the primary on ${db_on[0]}), on its volume there, cloned across nodes in $((SECONDS - t_clone)) s with its pod's start" ||
            fail "db-1 on ${db_on[1]}, its volume on ${h#*@}, the primary on ${db_on[0]}"
        expect "replica 1 starts on the cloned data and answers the primary's rows" "$(rows db-1)" \
            "primary-1,primary-2,primary-3"
        sql db-1 "INSERT INTO seed.t VALUES (4, 'replica1-4');"
        clone_of data-db-2 data-db-1
        db_sts 3
        until_ok 300 "db-2 ready on its clone of replica 1's volume" db_ready 3
        db_on[2]=$(k get pod db-2 -o jsonpath='{.spec.nodeName}')
        h=$(pv_handle data-db-2)
        expect "replica 2 runs on the third node, on its volume there" \
            "$(printf '%s\n' "${db_on[@]}" | sort -u | wc -l) ${h#*@}" "3 ${db_on[2]}"
        expect "replica 2 answers replica 1's rows (cloned from replica 1, not the primary)" "$(rows db-2)" \
            "primary-1,primary-2,primary-3,replica1-4"
        expect "the primary never saw replica 1's row" "$(rows db-0)" "primary-1,primary-2,primary-3"

        # The move: replica 2 scaled away frees its node; replica 1's volume
        # moves there, keeping its PVC's name.
        db_sts 2
        until_ok "$T" "db scaled down to 2" sh -c "! kubectl -n $NS get pod db-2 >/dev/null 2>&1"
        to=${db_on[2]}
        pv_before=$(pvc_field data-db-1 '{.spec.volumeName}')
        uid_before=$(pvc_field data-db-1 '{.metadata.uid}')
        t_move=$SECONDS
        k label pvc data-db-1 "loam.csi.dev/move-to=$to" >/dev/null
        moved() {
            [ "$(k get events --field-selector involvedObject.name=data-db-1,reason=Moved -o name | wc -l)" -ge 1 ]
        }
        until_ok 400 "the move of data-db-1 to $to" moved
        until_ok "$T" "db-1 ready after the move" db_ready 2
        h=$(pv_handle data-db-1)
        expect "data-db-1 keeps its name, is a new claim, bound to a volume on $to" \
            "$(pvc_field data-db-1 '{.status.phase}') $([ "$(pvc_field data-db-1 '{.metadata.uid}')" != "$uid_before" ] && echo new) ${h#*@}" \
            "Bound new $to"
        ok "moved in $((SECONDS - t_move)) s (label to Moved event, db-1 ready): $(k get events \
            --field-selector involvedObject.name=data-db-1,reason=Moved -o jsonpath='{.items[-1:].message}' | cut -c1-200)"
        expect "db-1 runs on $to with its rows" "$(k get pod db-1 -o jsonpath='{.spec.nodeName}') $(rows db-1)" \
            "$to primary-1,primary-2,primary-3,replica1-4"
        expect "the label is gone from the claim" "$(pvc_field data-db-1 '{.metadata.labels.loam\.csi\.dev/move-to}')" ""
        until_ok "$T" "the old volume $pv_before deleted (reclaim Delete)" none_left kubectl get pv "$pv_before"
        ok "the old volume $pv_before is deleted, after the new one is bound"
        expect "the claim no longer carries the move's finalizer" \
            "$(pvc_field data-db-1 '{.metadata.finalizers}' | grep -c 'loam.csi.dev/move' || true)" 0
        # events_of REASON: how many events REASON data-db-1 has had (each of
        # its claims: a move makes the claim again); more_events REASON N:
        # more than N; last_event REASON: the latest one's message.
        events_of() { k get events --field-selector "involvedObject.name=data-db-1,reason=$1" -o name | wc -l; }
        more_events() { [ "$(events_of "$1")" -gt "$2" ]; }
        last_event() {
            k get events --field-selector "involvedObject.name=data-db-1,reason=$1" --sort-by=.lastTimestamp \
                -o jsonpath='{.items[-1:].message}'
        }

        # A move cancelled: the label taken off as soon as the move started,
        # before the copy has its PV; the StatefulSet's claim gets the old volume back.
        pv_before=$(pvc_field data-db-1 '{.spec.volumeName}')
        started=$(events_of MoveStarted) cancelled=$(events_of MoveCancelled)
        k label pvc data-db-1 "loam.csi.dev/move-to=${db_on[1]}" >/dev/null
        until_ok 60 "MoveStarted for the move of data-db-1 to ${db_on[1]}" more_events MoveStarted "$started"
        k label pvc data-db-1 loam.csi.dev/move-to- >/dev/null
        until_ok "$T" "MoveCancelled on data-db-1" more_events MoveCancelled "$cancelled"
        ok "the label taken off after MoveStarted: MoveCancelled ($(last_event MoveCancelled | cut -c1-160))"
        until_ok "$T" "db-1 ready after the cancelled move" db_ready 2
        expect "data-db-1 is bound to its volume of before, reclaim policy Delete again, no move recorded" \
            "$(pvc_field data-db-1 '{.spec.volumeName}') $(kubectl get pv "$pv_before" \
                -o jsonpath='{.spec.persistentVolumeReclaimPolicy} {.metadata.labels.loam\.csi\.dev/moving}')" \
            "$pv_before Delete "
        expect "db-1 runs on $to with its rows" "$(k get pod db-1 -o jsonpath='{.spec.nodeName}') $(rows db-1)" \
            "$to primary-1,primary-2,primary-3,replica1-4"

        # move-to=any: the controller chooses. The replicas keep apart
        # (required anti-affinity) and db-0 runs on ${db_on[0]}: of the three
        # nodes, the one a move may choose is ${db_on[1]}, whatever the rooms.
        moved_before=$(events_of Moved)
        t_move=$SECONDS
        k label pvc data-db-1 loam.csi.dev/move-to=any >/dev/null
        until_ok 400 "the move of data-db-1 to any node" more_events Moved "$moved_before"
        until_ok "$T" "db-1 ready after the move to any node" db_ready 2
        started=$(last_event MoveStarted)
        [[ $started == *"to node ${db_on[1]} (chosen by the controller"* ]] ||
            fail "move-to=any chose another node than ${db_on[1]}, the one db-0's anti-affinity leaves: $started"
        ok "move-to=any chose ${db_on[1]}, not db-0's node ${db_on[0]} (the replicas' anti-affinity), moved in $((SECONDS - t_move)) s"
        expect "db-1 runs on ${db_on[1]} with its rows" "$(k get pod db-1 -o jsonpath='{.spec.nodeName}') $(rows db-1)" \
            "${db_on[1]} primary-1,primary-2,primary-3,replica1-4"

        db_pvs=$(for i in 0 1 2; do pvc_field "data-db-$i" '{.spec.volumeName} '; done)
        k delete sts db --wait=true --timeout="${T}s" >/dev/null
        k delete pvc data-db-0 data-db-1 data-db-2 --wait=true --timeout="${T}s" >/dev/null
        until_ok "$T" "db's volumes deleted on their nodes" none_left kubectl get pv $db_pvs
    fi

    if [ -z "${E2E_NODE_STOP:-}" ]; then
        say "12c. (not run: E2E_NODE_STOP is unset, nothing here can stop a node)"
    else
        say "12c. a worker node lost ($away's container stopped): the rest keeps running; once the node is deleted, Loam brings its StatefulSet replica back, empty, on a live node (loam.csi.dev/on-node-loss: recreate) and lets its old volume go"
        # The grace before a deleted node's volumes are given up, 300 s by
        # default, shortened for the run.
        kubectl -n loam set env deployment/loam-controller -c loam LOAM_GONE_NODE_GRACE=20 >/dev/null
        kubectl -n loam rollout status deployment/loam-controller --timeout="${T}s" >/dev/null ||
            fail "the controller with a 20 s grace"
        # Two replicas, never on one node, one of them on $away if it can.
        k apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: lost}
spec:
  serviceName: lost
  replicas: 2
  podManagementPolicy: Parallel
  selector: {matchLabels: {app: lost}}
  template:
    metadata: {labels: {app: lost}}
    spec:
      terminationGracePeriodSeconds: 1
      tolerations: [{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}]
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - {labelSelector: {matchLabels: {app: lost}}, topologyKey: kubernetes.io/hostname}
        nodeAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - {weight: 100, preference: {matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [$away]}]}}
      containers:
        - name: shell
          image: $IMAGE
          command: ["/bin/sh", "-c", "[ -f /data/id ] || { hostname >/data/id; head -c 65536 /dev/urandom >/data/blob; }; exec sleep infinity"]
          volumeMounts: [{name: data, mountPath: /data}]
          readinessProbe: {exec: {command: ["test", "-f", "/data/id"]}, periodSeconds: 1}
  volumeClaimTemplates:
    - metadata: {name: data, annotations: {loam.csi.dev/on-node-loss: recreate}}
      spec:
        storageClassName: loam
        accessModes: [ReadWriteOnce]
        resources: {requests: {storage: 16Mi}}
EOF
        lost_ready() { [ "$(k get sts lost -o jsonpath='{.status.readyReplicas}')" = 2 ]; }
        until_ok "$T" "lost has 2 ready replicas" lost_ready
        gone_i='' live_i=''
        for i in 0 1; do
            if [ "$(k get pod "lost-$i" -o jsonpath='{.spec.nodeName}')" = "$away" ]; then gone_i=$i; else live_i=$i; fi
        done
        [ -n "$gone_i" ] && [ -n "$live_i" ] || fail "no replica of lost on $away: $(k get pod -l app=lost -o wide)"
        live_node=$(k get pod "lost-$live_i" -o jsonpath='{.spec.nodeName}')
        in_pod "lost-$gone_i" 'echo before-the-loss >/data/marker && sync' >/dev/null
        # A snapshot kept off node (VolumeSnapshotClass loam-off-node): a
        # verified copy on a second node, so it outlives $away.
        snapshot lost-kept "data-lost-$gone_i" loam-off-node
        until_ok "$T" "lost-kept (kept off node) ready" snapshot_ready lost-kept
        kept_handle=$(kubectl get volumesnapshotcontent "$(k get volumesnapshot lost-kept \
            -o jsonpath='{.status.boundVolumeSnapshotContentName}')" -o jsonpath='{.status.snapshotHandle}')
        [[ $kept_handle == *"@$away+"* ]] && ok "a snapshot of lost-$gone_i's volume kept off node: $kept_handle" ||
            fail "lost-kept's handle '$kept_handle' does not name $away and a second node"
        live_sum=$(in_pod "lost-$live_i" 'sha256sum </data/blob')
        pv_gone=$(pvc_field "data-lost-$gone_i" '{.spec.volumeName}')
        handle_gone=$(pv_handle "data-lost-$gone_i")
        ok "lost-$gone_i on $away (PV $pv_gone, $handle_gone), lost-$live_i on $live_node"
        controller_node=$(kubectl -n loam get pod -l app.kubernetes.io/component=controller -o jsonpath='{.items[0].spec.nodeName}')
        $E2E_NODE_STOP "$away" >/dev/null
        node_ready() { kubectl get node "$away" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'; }
        not_ready() { [ "$(node_ready)" != True ]; }
        until_ok 150 "$away NotReady after its container stopped" not_ready
        ok "$away is NotReady (Ready=$(node_ready)) after its container stopped"
        expect "lost-$live_i on $live_node keeps running with its data" \
            "$(k get pod "lost-$live_i" -o jsonpath='{.status.phase}') $(in_pod "lost-$live_i" 'sha256sum </data/blob')" \
            "Running $live_sum"
        expect "lost-$gone_i stays bound to $away (nothing moves a pod off a NotReady node before its eviction)" \
            "$(k get pod "lost-$gone_i" -o jsonpath='{.spec.nodeName}')" "$away"
        expect "data-lost-$gone_i stays Bound to its PV, whose node affinity names $away" \
            "$(pvc_field "data-lost-$gone_i" '{.status.phase}') $(kubectl get pv "$pv_gone" \
                -o jsonpath='{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}')" "Bound $away"
        say "   what Kubernetes shows with $away stopped (recorded, not asserted):"
        {
            kubectl get node "$away" -o jsonpath='taints: {.spec.taints[*].key}{"\n"}'
            k get pod -l app=lost -o wide
            kubectl get volumeattachments -o custom-columns=NAME:.metadata.name,PV:.spec.source.persistentVolumeName,NODE:.spec.nodeName,ATTACHED:.status.attached
        } 2>&1 | sed 's/^/      /' || true

        kubectl delete node "$away" >/dev/null
        ok "kubectl delete node $away"
        # A controller on the lost node is replaced only now: until the node
        # is deleted (or its pods evicted, 5 minutes later) nothing provisions.
        kubectl -n loam rollout status deployment/loam-controller --timeout="${T}s" >/dev/null ||
            fail "no loam-controller after the loss of $away"
        ok "the controller runs on $(kubectl -n loam get pod -l app.kubernetes.io/component=controller \
            --field-selector status.phase=Running -o jsonpath='{.items[0].spec.nodeName}') (it was on $controller_node)"
        # The pod garbage collector deletes the pods of a node that no longer
        # exists; the StatefulSet makes lost-$gone_i again, and its PV ties it
        # to the gone node.
        recreated() {
            [ -n "$(k get pod "lost-$gone_i" -o jsonpath='{.metadata.uid}')" ] &&
                [ -z "$(k get pod "lost-$gone_i" -o jsonpath='{.spec.nodeName}')" ]
        }
        until_ok 240 "lost-$gone_i deleted with its node and made again, unscheduled" recreated
        ok "lost-$gone_i was deleted with the node and made again by the StatefulSet: $(k get pod "lost-$gone_i" \
            -o jsonpath='{.status.phase}')"
        scheduling_failures() {
            k get events --field-selector "involvedObject.name=lost-$gone_i,reason=FailedScheduling" -o jsonpath='{.items[*].message}'
        }
        affinity_conflict() { scheduling_failures | grep -q "node affinity"; }
        until_ok 120 "lost-$gone_i refused by the scheduler for its PV's node affinity" affinity_conflict
        ok "and stays Pending: $(k get events --field-selector "involvedObject.name=lost-$gone_i,reason=FailedScheduling" \
            -o jsonpath='{.items[-1:].message}' | cut -c1-160)"
        agents_left() {
            [ "$(kubectl -n loam get endpointslices -l kubernetes.io/service-name=loam-agents \
                -o jsonpath='{.items[*].endpoints[*].addresses[*]}' | wc -w)" = "$(kubectl get nodes -o name | wc -l)" ]
        }
        until_ok 120 "the headless Service names the agents of the remaining nodes only" agents_left
        ok "the headless Service names one agent per remaining node ($(kubectl get nodes -o name | wc -l))"
        expect "lost-$live_i keeps running with its data" "$(in_pod "lost-$live_i" 'sha256sum </data/blob')" "$live_sum"

        say "   the recovery, by Loam: the claim that opted in is deleted with its pod once the node counts as gone"
        node_lost() {
            k get events --field-selector "involvedObject.name=data-lost-$gone_i,reason=NodeLost" -o jsonpath='{.items[*].message}'
        }
        has_node_lost() { [ -n "$(node_lost)" ]; }
        until_ok 180 "the NodeLost event on data-lost-$gone_i" has_node_lost
        ok "Loam deleted data-lost-$gone_i and its pod: $(node_lost | cut -c1-200)"
        until_ok "$T" "lost back to 2 ready replicas" lost_ready
        back_on=$(k get pod "lost-$gone_i" -o jsonpath='{.spec.nodeName}')
        [ "$back_on" != "$away" ] && [ "$back_on" != "$live_node" ] &&
            ok "lost-$gone_i runs again on $back_on, a live node without the other replica" ||
            fail "lost-$gone_i runs on '$back_on' (gone: $away, other replica: $live_node)"
        h=$(pv_handle "data-lost-$gone_i")
        expect "its new PVC's volume is on $back_on" "${h#*@}" "$back_on"
        expect "and empty: what was written before the loss is gone with the node" \
            "$(in_pod "lost-$gone_i" 'test -e /data/marker && echo there || echo absent')" absent
        # The old PV (reclaim Delete) is released; its VolumeAttachment to the
        # gone node must be detached and the volume deleted, which Loam lets
        # succeed for a node gone past the grace.
        va_gone=$(kubectl get volumeattachments -o jsonpath="{.items[?(@.spec.source.persistentVolumeName==\"$pv_gone\")].metadata.name}")
        va_left=$va_gone
        for ((i = 0; i < 90 && ${#va_left}; i++)); do
            none_left kubectl get volumeattachment "$va_gone" && va_left='' || sleep 1
        done
        if [ -n "$va_left" ]; then
            say "   Kubernetes keeps the VolumeAttachment of a deleted node (docs/operate.md): deleted by hand, no finalizer to remove"
            kubectl delete volumeattachment "$va_gone" --wait=false >/dev/null
            until_ok 90 "the VolumeAttachment gone: ControllerUnpublishVolume succeeds for the gone node" \
                none_left kubectl get volumeattachment "$va_gone"
            ok "its VolumeAttachment $va_gone is gone once deleted: Loam's ControllerUnpublishVolume succeeded for $away"
        fi
        until_ok 180 "the old PV $pv_gone deleted by its reclaim policy" none_left kubectl get pv "$pv_gone"
        ok "the old PV $pv_gone is gone: Loam's DeleteVolume succeeded for the gone node, no finalizer removed by hand"
        say "   the data written before the loss, restored from the snapshot kept off node"
        pin=''
        restored lost-restored loam lost-kept 16Mi
        pod lost-restored 'true' lost-restored:/data
        pin=$pin_saved
        h=$(pv_handle lost-restored)
        expect "lost-restored is made on a live node from the copy and holds what was written before the loss" \
            "$([ "${h#*@}" != "$away" ] && echo live) $(in_pod lost-restored 'cat /data/marker')" "live before-the-loss"
        delete_pod lost-restored
        kept_pvs=$(pvc_field lost-restored '{.spec.volumeName}')
        k delete pvc lost-restored --wait=true --timeout="${T}s" >/dev/null
        k delete volumesnapshot lost-kept --wait=true --timeout="${T}s" >/dev/null
        ok "the snapshot kept off node is deleted though its first node is gone"
        until_ok "$T" "lost-restored's volume deleted" none_left kubectl get pv $kept_pvs
        k delete sts lost --wait=true --timeout="${T}s" >/dev/null
        lost_pvs=$(for i in 0 1; do pvc_field "data-lost-$i" '{.spec.volumeName} '; done)
        k delete pvc data-lost-0 data-lost-1 --wait=true --timeout="${T}s" >/dev/null
        until_ok "$T" "lost's volumes deleted on the live nodes" none_left kubectl get pv $lost_pvs
    fi
fi

say "11. everything removed: the volumes with reclaim policy Delete leave the node"
kubectl delete namespace "$NS" --wait=true --timeout="${T}s" >/dev/null
kubectl delete pv "$pv_kept" --wait=true >/dev/null
kubectl delete storageclass loam-retain loam-loop-xfs loam-loop-thin >/dev/null
kubectl delete volumeattributesclass loam-reserved >/dev/null
until_ok "$T" "no Loam PV left" sh -c "! kubectl get pv -o jsonpath='{.items[*].spec.csi.driver}' | grep -q loam"
left=$(on_node "$NODE" "find $ROOT/volumes -mindepth 1 -maxdepth 1 -printf '%f\n'" | sort | tr '\n' ' ')
expect "the node keeps only the retained volume" "$left" "$key_kept "
until_ok 60 "no VolumeAttachment left" sh -c "[ -z \"\$(kubectl get volumeattachments -o name)\" ]"
ok "no VolumeAttachment left"
expect "no CSI mount left on the node" \
    "$(grep -c -e 'kubernetes.io~csi' -e 'plugins/kubernetes.io/csi' -e "$ROOT/" <(on_node "$NODE" "cat /proc/self/mountinfo") || true)" 0
expect "no loop device of a Loam image left" "$(on_node "$NODE" "losetup -l -n -O BACK-FILE" | grep -c "$ROOT/" || true)" 0
until_ok "$T" "no snapshot content left" none_left kubectl get volumesnapshotcontents,volumegroupsnapshotcontents
ok "no VolumeSnapshotContent and no VolumeGroupSnapshotContent left"
until_ok 60 "no snapshot left on the node" empty_dir "$ROOT/snapshots"
ok "no snapshot left on the node"
expect "no snapshot or group snapshot record left on the node" \
    "$(on_node "$NODE" "find $ROOT/meta/snapshots $ROOT/meta/groups -type f" | wc -l)" 0

say "story done in $((SECONDS - t0)) s"
echo "$passed passed, 0 failed"
