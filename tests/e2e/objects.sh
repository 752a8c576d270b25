# shellcheck shell=bash
# The objects the story (story.sh) and the kind steps (tests/kind/*-step.sh)
# make in namespace $NS: claims, snapshots and shell pods of image $IMAGE,
# pinned to node $NODE when E2E_NODE is set (the global `pin`, which a step
# may change), waits of $T seconds. Sourced after checks.sh (a pod that is not
# Ready fails the step).
k() { kubectl -n "$NS" "$@"; }
# in_pod POD SCRIPT: runs SCRIPT in POD's shell.
in_pod() { local p=$1; shift; k exec "$p" -- sh -c "$*"; }
# pvc NAME CLASS SIZE [MODE [SOURCE]]: a ReadWriteOnce claim of volumeMode
# MODE (Filesystem; Block), filled from SOURCE (a dataSource, as YAML) if any.
pvc() {
    k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  storageClassName: $2
  accessModes: [ReadWriteOnce]
  volumeMode: ${4:-Filesystem}
  resources: {requests: {storage: $3}}
  ${5:+dataSource: $5}
EOF
}
# restored NAME CLASS SNAPSHOT SIZE: a claim restored from a VolumeSnapshot.
restored() { pvc "$1" "$2" "$4" Filesystem "{apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: $3}"; }
# cloned NAME CLASS SOURCE SIZE: a claim cloned from the claim SOURCE.
cloned() { pvc "$1" "$2" "$4" Filesystem "{kind: PersistentVolumeClaim, name: $3}"; }
# snapshot NAME CLAIM [CLASS]: a VolumeSnapshot of CLAIM (class loam).
snapshot() {
    k apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: $1}
spec:
  volumeSnapshotClassName: ${3:-loam}
  source: {persistentVolumeClaimName: $2}
EOF
}
snapshot_ready() { [ "$(k get volumesnapshot "$1" -o jsonpath='{.status.readyToUse}')" = true ]; }
pin=''
[ -z "${E2E_NODE:-}" ] || pin="nodeSelector: {kubernetes.io/hostname: $NODE}"
# pod NAME SCRIPT CLAIM:PATH...   (a path under /dev means a raw block device)
# The pod is Ready once SCRIPT has succeeded.
pod() {
    local name=$1 script=$2 mounts="" devices="" vols="" i=0 c
    shift 2
    for c in "$@"; do
        i=$((i + 1))
        if [[ ${c#*:} == /dev/* ]]; then
            devices+="        - {name: v$i, devicePath: ${c#*:}}"$'\n'
        else
            mounts+="        - {name: v$i, mountPath: ${c#*:}}"$'\n'
        fi
        vols+="    - {name: v$i, persistentVolumeClaim: {claimName: ${c%%:*}}}"$'\n'
    done
    k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name}
spec:
  terminationGracePeriodSeconds: 1
  $pin
  containers:
    - name: shell
      image: $IMAGE
      command: ["/bin/sh", "-c", $(printf '%s' "($script) && touch /tmp/ready; exec sleep infinity" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')]
      readinessProbe: {exec: {command: ["test", "-f", "/tmp/ready"]}, periodSeconds: 1}
      volumeMounts:
${mounts:-        []}
      volumeDevices:
${devices:-        []}
  volumes:
$vols
EOF
    k wait --for=condition=Ready "pod/$name" --timeout="${T}s" >/dev/null || fail "pod $name not Ready"
}
delete_pod() { k delete pod "$1" --wait=true --timeout="${T}s" >/dev/null; }
