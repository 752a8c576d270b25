#!/usr/bin/env bash
# The kind target: Loam on a kind cluster of one control-plane node and two
# workers, every image built on this machine (nothing can be pulled here).
#
#   sudo bash tests/kind/run.sh
#
# 1. tools: says what is missing (and how to get it) instead of failing later
# 2. build: tests/e2e/build.sh (cached), plus what kind's node needs
# 3. docker: docker.sh (installs docker.io, starts a dockerd of its own)
# 4. images: the kind node image (node-image.sh), the sidecars, the stand-ins
#    of the Dockerfile's base images (images.sh)
# 5. cluster: a Loam root of its own size on each node (a loop-mounted ext4
#    this run makes), then the README's quickstart, line by line
#    (quickstart.sh: `kind create cluster`, `docker build -t loam:dev .`,
#    `kind load`, the snapshot CRDs and controller, deploy/, the example)
# 6. the story (tests/e2e/story.sh, on three nodes), then, after a story that
#    passed, the metrics step (prometheus-step.sh) and the Helm step
#    (helm-step.sh: the kustomize install replaced by `helm install` of an
#    earlier Loam, then `helm upgrade` to this tree's, volumes kept)
#
# Everything it started is removed at the end, also on failure and on SIGTERM
# or Ctrl-C: the cluster (its containers and network), the loop devices and
# mounts of the roots (only the ones this run made), dockerd if it started it.
# KIND_HOLD=1 keeps the cluster up after the story, green or not (Ctrl-C
# removes it). KIND_STORY=0 leaves the story out (a cluster for other tests,
# tests/storage-e2e: the story's step 12c removes a worker);
# LOAM_KIND_ROOT_SIZES="CONTROL_PLANE WORKER WORKER2" sets the roots' sizes
# (default "2G 3G 1500M", which the story's capacity steps expect).
# Env: LOAM_E2E_CACHE (the build cache), LOAM_KIND_UPSTREAM_IMAGES (a directory
# of `docker save` archives of upstream sidecar images to use instead of the
# stand-ins), LOAM_KIND_PLAIN_RUNC=1 (see docker.sh), LOAM_KIND_RUN (the run's
# directory: roots, kubeconfig; default /var/tmp/loam-kind), and docker.sh's
# LOAM_KIND_DOCKER_ROOT (dockerd's data root, where the images are kept) and
# LOAM_KIND_STATE (its socket, pid file and exec root): all of them fresh, with
# GOMODCACHE, make a cold run on a warm machine.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${LOAM_E2E_CACHE:-$HOME/.cache/loam-e2e}
export LOAM_E2E_CACHE=$cache
run=${LOAM_KIND_RUN:-/var/tmp/loam-kind}
cluster=loam
t0=$SECONDS
step() { printf '\n=== [kind %4ds] %s\n' "$((SECONDS - t0))" "$*"; }
declare -A took

# --- 1. tools (sudo's secure_path drops the directories of Go and cargo)
. "$repo/tests/e2e/tools.sh"
need_tools go cargo rustc python3 gcc || exit 1
[ "$(id -u)" = 0 ] || { echo "run as root (docker, loop devices, mounts)" >&2; exit 1; }
. "$repo/tests/e2e/versions.sh"

# --- one run at a time (the lock dies with its holder)
exec 9>/run/loam-kind.lock
flock -n 9 || { echo "another kind run is going on (it holds /run/loam-kind.lock)" >&2; exit 1; }

# --- what the cleanup must undo, recorded before each is made
made_loops=()
made_mounts=()
loops_before=$(losetup -l -n -O NAME | sort)
cluster_made=''
network_made=''
child=''
# in_child COMMAND...: runs COMMAND in the background and waits for it, so that
# SIGTERM or Ctrl-C reaches the cleanup at once (bash runs a trap only between
# commands), which then ends COMMAND by its PID.
in_child() {
    local rc=0
    "$@" &
    child=$!
    wait "$child" || rc=$?
    child=''
    return "$rc"
}
. "$here/docker.sh"
cleanup() {
    local rc=$? i
    set +e
    step "cleanup"
    if [ -n "$child" ]; then
        pkill -TERM -P "$child"
        kill -TERM "$child"
        wait "$child"
    fi
    if [ -n "$cluster_made" ]; then
        kind export logs "$run/logs" --name "$cluster" >/dev/null 2>&1
        # Loop devices are the kernel's, not the nodes': what Loam and the
        # kubelets attached outlives the node containers. Pods that use volumes
        # are deleted first, so that Loam and the kubelets detach them.
        kubectl delete namespace e2e-story --ignore-not-found --wait=true --timeout=180s >/dev/null 2>&1
        kubectl delete pod,pvc --all -n default --wait=true --timeout=120s >/dev/null 2>&1
        kind delete cluster --name "$cluster"
    fi
    [ -z "$network_made" ] || docker network rm kind >/dev/null
    # Whatever is still attached to a file on one of this run's roots (Loam's
    # images, when the cluster went down with volumes in use) is the run's.
    local roots='' l majmin
    for l in "${made_loops[@]}"; do roots+=" $(stat -c '%Hr:%Lr' "$l")"; done
    while read -r l majmin; do
        [[ " $roots " != *" $majmin "* ]] || { echo "detaching $l (a Loam image on this run's roots)" >&2; losetup -d "$l"; }
    done < <(losetup -l -n -O NAME,BACK-MAJ:MIN)
    for ((i = ${#made_mounts[@]} - 1; i >= 0; i--)); do umount "${made_mounts[$i]}"; done
    for i in "${made_loops[@]}"; do losetup -d "$i"; done
    # A detach waits for the device's last user: give it some seconds.
    for ((i = 0; i < 10; i++)); do
        [ -n "$(comm -13 <(echo "$loops_before") <(losetup -l -n -O NAME | sort))" ] || break
        sleep 1
    done
    for l in $(comm -13 <(echo "$loops_before") <(losetup -l -n -O NAME | sort)); do
        echo "WARNING: attached during the run and still there (not detached: not provably this run's):" \
            "$l $(losetup -l -n -O BACK-FILE "$l")" >&2
    done
    docker_down
    if [ -d "$run/logs" ]; then
        rm -rf "$cache/kind-last-run-logs"
        mv "$run/logs" "$cache/kind-last-run-logs"
    fi
    grep -q " $run/" /proc/self/mounts || rm -rf "$run"
    local times='' s
    for s in build docker images cluster story prometheus helm; do times+="$s ${took[$s]:-?} s, "; done
    step "done: exit $rc ($times""total $((SECONDS - t0)) s)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 2. build (each program is rebuilt only when its recipe changed)
s=$SECONDS
step "build"
# Prometheus and Helm are for the steps after the story: built here, not while
# a cluster waits.
extra=()
[ "${KIND_STORY:-1}" = 0 ] || extra=(prometheus helm)
bash "$repo/tests/e2e/build.sh" kubernetes etcd containerd runc coredns sidecars standins pause \
    crictl cni localpath kind "${extra[@]}"
export PATH="$cache/bin:$PATH"
took[build]=$((SECONDS - s))

# --- 3. docker
s=$SECONDS
step "docker"
docker_up
took[docker]=$((SECONDS - s))

# --- 4. images
s=$SECONDS
step "images"
node_image=$(bash "$here/node-image.sh")
. "$here/images.sh"
mapfile -t csi < <(csi_images)
slim_image=$(debian_slim_image)
rust_image=$(rust_image "$slim_image")
csi+=("$(busybox_image "$slim_image")")
mariadb=$(mariadb_image "$slim_image")
csi+=("$mariadb")
took[images]=$((SECONDS - s))

# --- 5. cluster: roots, then the README's quickstart (kind create cluster ... deploy/)
s=$SECONDS
step "cluster: a Loam root per node, then the README quickstart line by line"
rm -rf "$run"
mkdir -p "$run/roots"
# root NAME SIZE: a Loam root of its own size for one node (an ext4 on a loop
# device this run attaches), so capacity differs from node to node.
root() {
    local img="$run/roots/$1.img" dir="$run/roots/$1" dev
    truncate -s "$2" "$img"
    mkfs.ext4 -q -F "$img"
    dev=$(losetup --find --show "$img")
    made_loops+=("$dev")
    mkdir -p "$dir"
    mount "$dev" "$dir"
    made_mounts+=("$dir")
}
# The story runs on loam-worker: its root takes all the story's volumes.
read -r size_cp size_w size_w2 <<<"${LOAM_KIND_ROOT_SIZES:-2G 3G 1500M}"
root control-plane "$size_cp"
root worker "$size_w"
root worker2 "$size_w2"
cat >"$run/cluster.yaml" <<EOF
# Loam's kind cluster (tests/kind/run.sh): three nodes of our node image, each
# with a Loam root of its own size at /var/lib/loam.
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  # kindnetd cannot be built here (nodes.sh wires the pods instead).
  disableDefaultCNI: true
kubeadmConfigPatches:
  - |
    kind: KubeletConfiguration
    # Our machines are cgroup v1 hosts without CAP_SYS_RESOURCE.
    failCgroupV1: false
    oomScoreAdj: 0
  - |
    kind: ClusterConfiguration
    etcd:
      local:
        imageTag: ${ETCD_VERSION#v}-0
nodes:
EOF
for n in control-plane worker worker2; do
    cat >>"$run/cluster.yaml" <<EOF
  - role: ${n%2}
    image: $node_image
    extraMounts:
      - {hostPath: $run/roots/$n, containerPath: /var/lib/loam}
EOF
done
export KUBECONFIG="$run/kubeconfig"
# Only what this run makes is removed at the end: a cluster or network of the
# same name that is already there is someone else's.
! kind get clusters 2>/dev/null | grep -qx "$cluster" ||
    { echo "a kind cluster named $cluster exists already (the quickstart makes one of that name): delete it first" >&2; exit 1; }
docker network inspect kind >/dev/null 2>&1 || network_made=1
cluster_made=1
KIND_PRELOAD="${csi[*]}" in_child bash "$here/quickstart.sh" "$repo" "$run/cluster.yaml" "$rust_image" "$slim_image"
took[cluster]=$((SECONDS - s))

s=$SECONDS
step "story"
kubectl get nodes -o wide
story_rc=0
if [ "${KIND_STORY:-1}" = 0 ]; then
    echo "KIND_STORY=0: no story"
else
    E2E_DB_IMAGE=$mariadb E2E_NODE=$cluster-worker E2E_NODE_EXEC="docker exec" E2E_NODE_STOP="docker stop" \
        in_child bash "$repo/tests/e2e/story.sh" || story_rc=$?
fi
took[story]=$((SECONDS - s))
# The metrics step (prometheus-step.sh): a real Prometheus scraping Loam's
# pods, asserted with PromQL, after a story that passed.
if [ "${KIND_STORY:-1}" != 0 ] && [ "$story_rc" = 0 ]; then
    s=$SECONDS
    step "prometheus"
    E2E_NODE=$cluster-worker in_child bash "$here/prometheus-step.sh" || story_rc=$?
    took[prometheus]=$((SECONDS - s))
fi
# The Helm step (helm-step.sh): the kustomize install replaced by a Helm
# install of an earlier Loam, upgraded to this tree's; last, as it takes the
# quickstart's install away.
if [ "${KIND_STORY:-1}" != 0 ] && [ "$story_rc" = 0 ]; then
    s=$SECONDS
    step "helm"
    E2E_NODE=$cluster-worker LOAM_RUST_IMAGE=$rust_image LOAM_DEBIAN_IMAGE=$slim_image \
        in_child bash "$here/helm-step.sh" || story_rc=$?
    took[helm]=$((SECONDS - s))
fi
# Held also after a failed story: the cluster is where to look.
if [ "${KIND_HOLD:-}" = 1 ]; then
    step "holding the cluster (story exit $story_rc): KUBECONFIG=$run/kubeconfig DOCKER_HOST=$DOCKER_HOST; Ctrl-C ends it"
    in_child sleep infinity
fi
exit "$story_rc"
