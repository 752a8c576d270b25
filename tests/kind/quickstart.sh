#!/usr/bin/env bash
# Runs the README's "Quickstart on kind" block line by line, as a user would
# type it, in the repository's directory (run by run.sh; KUBECONFIG and
# DOCKER_HOST set, the kind cluster's config in $KIND_CONFIG). Each line runs
# as written, except where it needs what this machine cannot reach; those lines
# are replaced by the same thing from local sources, and each replacement is
# printed:
#   kind create cluster     gets --config (our node image; kindest/node cannot be
#                           pulled), then nodes.sh (loop device files, the pod
#                           network: kindnetd cannot be pulled either) and
#                           `kind load docker-image` of $KIND_PRELOAD: the
#                           sidecar images a user's cluster pulls from registry.k8s.io
#   docker build            gets the local stand-ins of the Dockerfile's base
#                           images (--build-arg), the host's network (this
#                           dockerd makes no NAT), a quarter of the CPU weight
#                           (a shared machine) and --force-rm
#   https://github.com/kubernetes-csi/external-snapshotter/...?ref=vX
#                           the same kustomization from the Go module cache
#                           (the README says how to do this offline)
#   kubectl apply -k deploy/groupsnapshot/ (or deploy/)
#                           tests/e2e/overlay (the same, with the stand-ins'
#                           image names), unless LOAM_KIND_UPSTREAM_IMAGES gave
#                           the upstream registrar and livenessprobe images
# Comment lines are printed; `#` after a command is a comment too.
#
# Usage: quickstart.sh REPO CLUSTER_CONFIG RUST_IMAGE DEBIAN_IMAGE
set -euo pipefail
repo=$1 config=$2 rust_image=$3 debian_image=$4
here=$(cd "$(dirname "$0")" && pwd)
. "$repo/tests/e2e/versions.sh"

# The block: the first ```sh after the heading, up to its closing fence.
mapfile -t lines < <(awk '/^### Quickstart on kind/ {h = 1} h && /^```sh/ {b = 1; next} b && /^```/ {exit} b' "$repo/README.md")
[ ${#lines[@]} -gt 5 ] || { echo "no quickstart block in $repo/README.md" >&2; exit 1; }

moddir() {
    go mod download -json "$1" | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(d["Error"]) if d.get("Error") else print(d["Dir"])'
}
upstream_sidecars() {
    docker image inspect "registry.k8s.io/sig-storage/csi-node-driver-registrar:$REGISTRAR_VERSION" \
        "registry.k8s.io/sig-storage/livenessprobe:$LIVENESSPROBE_VERSION" >/dev/null 2>&1
}

cd "$repo"
n=0
for line in "${lines[@]}"; do
    n=$((n + 1))
    case "$line" in
        '' | '#'*) printf '  %s\n' "$line"; continue ;;
    esac
    cmd=$line
    case "$line" in
        'kind create cluster '*)
            cmd="$line --config $config"
            ;;
        'docker build '*)
            cmd=${line/docker build /docker build --network host --force-rm --cpu-shares 256 --build-arg RUST_IMAGE=$rust_image --build-arg DEBIAN_IMAGE=$debian_image }
            ;;
        *'https://github.com/kubernetes-csi/external-snapshotter/client/config/crd?ref='*)
            ref=${line##*ref=}
            ref=${ref%%[\'\" ]*}
            cmd=${line/https:\/\/github.com\/kubernetes-csi\/external-snapshotter\/client\/config\/crd?ref=$ref/$(moddir "github.com/kubernetes-csi/external-snapshotter/client/v8@$ref")\/config\/crd}
            ;;
        *'https://github.com/kubernetes-csi/external-snapshotter/deploy/kubernetes/snapshot-controller?ref='*)
            ref=${line##*ref=}
            ref=${ref%%[\'\" ]*}
            cmd=${line/https:\/\/github.com\/kubernetes-csi\/external-snapshotter\/deploy\/kubernetes\/snapshot-controller?ref=$ref/$(moddir "github.com/kubernetes-csi/external-snapshotter/v8@$ref")\/deploy\/kubernetes\/snapshot-controller}
            ;;
        'kubectl apply -k deploy/groupsnapshot/'*)
            upstream_sidecars || cmd=${line/deploy\/groupsnapshot\//tests\/e2e\/overlay}
            ;;
    esac
    if [ "$cmd" = "$line" ]; then
        printf '$ %s\n' "$line"
    else
        printf '$ %s\n  (here: %s)\n' "$line" "$cmd"
    fi
    bash -c "set -euo pipefail; $cmd" || { echo "quickstart line $n failed: $line" >&2; exit 1; }
    if [[ $line == 'kind create cluster '* ]]; then
        name=${line##*--name }
        name=${name%% *}
        bash "$here/nodes.sh" "$name"
        # shellcheck disable=SC2086 # a list of image names
        kind load docker-image ${KIND_PRELOAD:-} --name "$name"
    fi
done
