#!/usr/bin/env bash
# Loam end to end on a real Kubernetes, built from the package registries:
#   sudo env "PATH=$PATH" bash tests/e2e/run.sh   (sudo alone drops Go and cargo from PATH)
# 1. build.sh: Kubernetes, etcd, containerd, runc, CoreDNS and the CSI sidecars
#    from the Go module proxy (cached in $LOAM_E2E_CACHE, default ~/.cache/loam-e2e);
# 2. the Loam release binary (cargo, target dir in the cache) and images.sh:
#    OCI images without a daemon;
# 3. cluster.sh in new PID, mount and network namespaces: a single-node cluster,
#    deploy/groupsnapshot/ through tests/e2e/overlay, then story.sh's assertions;
# 4. whatever happens, the namespaces die with their processes and mounts;
#    loop devices attached during the run and the kubelet's cgroups are removed.
# Exits non-zero on any failure. Logs of every component: $LOAM_E2E_RUN/logs
# (default /var/tmp/loam-e2e), copied to $LOAM_E2E_CACHE/last-run-logs at the end.
# Env: LOAM_E2E_CACHE, LOAM_E2E_RUN, E2E_HOLD=1 (keep the cluster up after
# bring-up instead of running the story; stop with Ctrl-C or by killing run.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/versions.sh"
cache=${LOAM_E2E_CACHE:-$HOME/.cache/loam-e2e}
run=${LOAM_E2E_RUN:-/var/tmp/loam-e2e}
cgroup_root=/loam-e2e
t0=$SECONDS
step() { printf '\n==> [%ds] %s\n' "$((SECONDS - t0))" "$*"; }
. "$here/tools.sh"
. "$here/loops.sh"
need_tools go cargo python3 gcc || exit 1
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
mkdir -p "$cache/log"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod

step "build from the Go module proxy (cached in $cache)"
"$here/build.sh"
build_s=$((SECONDS - t0))

step "the Loam release binary and the images"
CARGO_TARGET_DIR="$cache/cargo-target" nice -n 10 cargo build --release --locked --bin loam \
    --manifest-path "$repo/Cargo.toml"
LOAM_BIN="$cache/cargo-target/release/loam" "$here/images.sh"
images_s=$((SECONDS - t0 - build_s))

# Host packages the cluster uses: the CNI plugins.
[ -x /usr/lib/cni/bridge ] || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containernetworking-plugins >/dev/null
}
snap_crd=$(go mod download -json "github.com/kubernetes-csi/external-snapshotter/client/v8@$SNAPSHOTTER_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')/config/crd
snap_ctl=$(go mod download -json "github.com/kubernetes-csi/external-snapshotter/v8@$SNAPSHOTTER_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')/deploy/kubernetes/snapshot-controller

cleanup() {
    local rc=$? pidns i loop h d
    set +e
    step "cleanup"
    [ -z "${child:-}" ] || kill -KILL "$child" 2>/dev/null
    # The namespace's processes die with its PID 1; wait until none is left.
    pidns=$(cat "$run/pidns" 2>/dev/null)
    for ((i = 0; i < 60; i++)); do
        [ -n "$pidns" ] || break
        local left=0 p
        for p in /proc/[0-9]*; do
            [ "$(readlink "$p/ns/pid" 2>/dev/null)" = "$pidns" ] && left=$((left + 1))
        done
        [ "$left" = 0 ] && break
        sleep 1
    done
    [ "$i" -lt 60 ] || echo "WARNING: processes of the cluster's PID namespace are still alive" >&2
    # Loop devices attached during the run (Loam's images, the kubelet's block
    # volume references), now that no mount holds them.
    # Only the run's own (loops.sh): another Loam on this host keeps its devices.
    for ((i = 0; i < 10; i++)); do
        local ours
        ours=$(run_loops "$run")
        [ -n "$ours" ] || break
        for loop in $ours; do losetup -d "$loop" 2>/dev/null; done
        sleep 1
    done
    for loop in $(comm -13 <(echo "$loops_before") <(losetup -l -n -O NAME | sort)); do
        echo "attached during the run but not by it, left alone: $loop $(losetup -l -n -O BACK-FILE "$loop")" >&2
    done
    for h in "${cgroup_dirs[@]}"; do
        find "$h" -depth -type d -exec rmdir {} + 2>/dev/null
        [ ! -d "$h" ] || echo "WARNING: cgroup $h not removed" >&2
    done
    if grep -q -e "$run" -e /var/lib/kubelet -e /var/lib/loam /proc/self/mountinfo; then
        echo "WARNING: mounts left on the host:" >&2
        grep -e "$run" -e /var/lib/kubelet -e /var/lib/loam /proc/self/mountinfo >&2
    else
        rm -rf "$cache/last-run-logs"
        [ ! -d "$run/logs" ] || cp -r "$run/logs" "$cache/last-run-logs"
        rm -rf "$run"
    fi
    for ((i = ${#made_dirs[@]} - 1; i >= 0; i--)); do rmdir "${made_dirs[$i]}" 2>/dev/null; done
    step "done: exit $rc (build ${build_s:-?} s, images ${images_s:-?} s, cluster and story $((SECONDS - t0 - ${build_s:-0} - ${images_s:-0})) s; total $((SECONDS - t0)) s)"
    exit "$rc"
}

# --- one run at a time (the lock dies with its holder, even on SIGKILL);
# refused before the trap, so a refused start touches nothing of the live run.
exec 9>/run/loam-e2e.lock
flock -n 9 || { echo "another e2e run is going on (it holds /run/loam-e2e.lock)" >&2; exit 1; }
# A run killed with SIGKILL never ran its cleanup: its namespaces died with
# it, but its cgroups and loop devices stayed.
for h in /sys/fs/cgroup/*/; do
    d=${h%/}$cgroup_root
    [ -d "$d" ] || continue
    echo "removing $d, left by a run that was killed" >&2
    find "$d" -depth -type d -exec rmdir {} +
done
for loop in $(run_loops "$run"); do
    echo "detaching $loop, left by a run that was killed" >&2
    losetup -d "$loop"
done

# --- what the cleanup must undo
loops_before=$(losetup -l -n -O NAME | sort)
made_dirs=()
cgroup_dirs=()
trap cleanup EXIT
trap 'exit 130' INT TERM
for d in /var/lib/kubelet /var/lib/loam /var/lib/cni /var/log/pods /var/log/containers /run/containerd /run/netns; do
    [ -d "$d" ] || { mkdir -p "$d"; made_dirs+=("$d"); }
done
for h in /sys/fs/cgroup/*/; do
    h=${h%/}
    [ -f "$h/cgroup.procs" ] || continue
    mkdir "$h$cgroup_root"
    cgroup_dirs+=("$h$cgroup_root")
    if [ -f "$h/cpuset.cpus" ]; then
        cat "$h/cpuset.cpus" >"$h$cgroup_root/cpuset.cpus"
        cat "$h/cpuset.mems" >"$h$cgroup_root/cpuset.mems"
    fi
done

step "cluster and story, in new PID, mount and network namespaces"
rm -rf "$run"
mkdir -p "$run"
E2E_CACHE="$cache" E2E_RUN="$run" E2E_REPO="$repo" E2E_CGROUP_ROOT="$cgroup_root" \
    E2E_SNAPSHOT_CRD="$snap_crd" E2E_SNAPSHOT_CONTROLLER="$snap_ctl" \
    unshare --pid --fork --kill-child --mount-proc --mount --net --propagation private \
    -- bash "$here/cluster.sh" &
child=$!
wait "$child"
