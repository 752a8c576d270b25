#!/usr/bin/env bash
# Builds kind's node image locally (no image can be pulled here), cached:
#
#   loam-kind.local/kind-base:<stamp>   kind's base image: what images/base/Dockerfile
#       of the kind module (KIND_VERSION) makes, from a debootstrap'd Debian with
#       that Dockerfile's packages (systemd, iptables, ...), kind's base-image files
#       from the module, and containerd, runc, crictl and the CNI plugins built by
#       tests/e2e/build.sh from the Go module proxy;
#   loam-kind.local/kind-node:<K8S_VERSION>   kind's node image: what `kind build
#       node-image` does (pkg/build/nodeimage/buildcontext.go), done here step by
#       step, because that command pulls every image it did not build itself
#       (etcd, CoreDNS, pause, kindnetd, the StorageClass images) and nothing can
#       be pulled: kubeadm, kubelet and kubectl in /usr/bin, /kind/version, the
#       default StorageClass manifest, and the control-plane images preloaded
#       into the node's containerd, then `docker commit`.
#
# The node has no default CNI manifest: kindnetd is not served by the module
# proxy (sigs.k8s.io/kindnet and github.com/aojea/kindnet answer 403), so the
# cluster config sets disableDefaultCNI and tests/kind/nodes.sh wires the pod
# network (ptp + host-local, one route per node). The StorageClass is kind's own
# manifest with our local-path-provisioner image (v0.0.30 from the module proxy).
#
# Adaptations for machines like ours (no CAP_SYS_RESOURCE in the capability
# bounding set; a machine shared by several people), all from tests/kind/node/:
# containerd with restrict_oom_score_adj and no OOMScoreAdjust, the kubelet's
# host-wide tunables shown to it in its own mount namespace, systemd-sysctl
# replaced by kind's network sysctls only.
#
# Usage: node-image.sh [rootfs|base]   (prints the image's name on stdout;
#        rootfs: only the Debian tree, base: only the base image)
# Needs: docker_up done (tests/kind/docker.sh), tests/e2e/build.sh run for:
#        kubernetes etcd containerd runc coredns pause crictl cni localpath
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../e2e/versions.sh"
cache=${LOAM_E2E_CACHE:-$HOME/.cache/loam-e2e}
bin="$cache/bin"
work="$cache/kind"
mkdir -p "$work" "$cache/log"
log() { printf '[node-image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
kindmod=$(go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(d["Error"]) if d.get("Error") else print(d["Dir"])')
basefiles="$kindmod/images/base/files"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }
# The node's Debian tree, and images.sh's, are debootstrap'd: installed when
# missing (a fresh machine has none).
if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

# The Debian tree: kind's base Dockerfile's package list, read from it.
packages=$(sed -n '/clean-install \\/,/&& find/p' "$kindmod/images/base/Dockerfile" | sed '1d;$d' | tr -d '\\' | xargs echo)
[ -n "$packages" ] || { echo "cannot read the package list of $kindmod/images/base/Dockerfile" >&2; exit 1; }
rootfs() {
    local dir="$work/rootfs" want="$DEBIAN_SUITE minbase $packages"
    [ "$(cat "$dir.stamp" 2>/dev/null)" != "$want" ] || return 0
    log "debootstrap $DEBIAN_SUITE (minbase + kind's base packages)"
    rm -rf "$dir" "$dir.tmp"
    nice -n 10 debootstrap --variant=minbase --include="${packages// /,}" \
        "$DEBIAN_SUITE" "$dir.tmp" http://deb.debian.org/debian >"$cache/log/kind-debootstrap.log" 2>&1 ||
        { tail -20 "$cache/log/kind-debootstrap.log" >&2; return 1; }
    rm -rf "$dir.tmp/var/cache/apt/archives/"*.deb "$dir.tmp/var/lib/apt/lists/"*
    mv "$dir.tmp" "$dir"
    printf '%s' "$want" >"$dir.stamp"
}

base_stamp() {
    {
        cat "$work/rootfs.stamp"
        echo "$KIND_VERSION"
        (cd "$here/node" && sha256sum ./*)
        (cd "$bin" && sha256sum containerd ctr containerd-shim-runc-v2 runc crictl host-local loopback ptp portmap)
    } | sha256sum | cut -c1-12
}

# base REF: kind's images/base/Dockerfile, step by step, on a copy of the tree.
base() {
    local ref=$1 root="$work/base-root"
    have_image "$ref" && { log "base: cached ($ref)"; return 0; }
    log "base: assembling $ref"
    rm -rf "$root"
    cp -a "$work/rootfs" "$root"
    # COPY --chmod ... files/...
    install -m 0755 "$basefiles"/usr/local/bin/* "$root/usr/local/bin/"
    mkdir -p "$root/kind/bin" "$root/LICENSES" "$root/etc/containerd" "$root/etc/default" \
        "$root/etc/sysctl.d" "$root/etc/systemd/system/kubelet.service.d"
    cp "$basefiles"/kind/README.txt "$root/kind/"
    install -m 0755 "$basefiles"/kind/bin/* "$root/kind/bin/"
    install -m 0644 "$basefiles"/LICENSES/* "$root/LICENSES/"
    install -m 0644 "$basefiles"/etc/crictl.yaml "$root/etc/"
    install -m 0644 "$basefiles"/etc/containerd/* "$root/etc/containerd/"
    install -m 0644 "$basefiles"/etc/default/* "$root/etc/default/"
    install -m 0644 "$basefiles"/etc/sysctl.d/* "$root/etc/sysctl.d/"
    install -m 0644 "$basefiles"/etc/systemd/system/*.service "$basefiles"/etc/systemd/system/*.slice \
        "$root/etc/systemd/system/"
    install -m 0644 "$basefiles"/etc/systemd/system/kubelet.service.d/* "$root/etc/systemd/system/kubelet.service.d/"
    # RUN ... (after clean-install: the packages are in the tree already)
    find "$root/lib/systemd/system/sysinit.target.wants/" -name "systemd-tmpfiles-setup.service" -delete
    rm -f "$root"/lib/systemd/system/multi-user.target.wants/* "$root"/etc/systemd/system/*.wants/* \
        "$root"/lib/systemd/system/local-fs.target.wants/* "$root"/lib/systemd/system/sockets.target.wants/*udev* \
        "$root"/lib/systemd/system/sockets.target.wants/*initctl* "$root"/lib/systemd/system/basic.target.wants/*
    echo "ReadKMsg=no" >>"$root/etc/systemd/journald.conf"
    ln -sfn /usr/lib/systemd/systemd "$root/sbin/init"
    # Our machines' adaptations (see the header and each file).
    mkdir -p "$root/etc/systemd/system/containerd.service.d"
    install -m 0644 "$here/node/containerd-no-oom-adjust.conf" "$root/etc/systemd/system/containerd.service.d/"
    install -m 0644 "$here/node/kubelet-host-tunables.conf" "$root/etc/systemd/system/kubelet.service.d/"
    install -m 0755 "$here/node/loam-host-tunables.sh" "$root/kind/bin/"
    install -m 0644 "$here/node/loam-kind-sysctl.service" "$root/etc/systemd/system/"
    sed -i -e 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' \
        -e 's|sandbox_image = "registry.k8s.io/pause:.*"|sandbox_image = "registry.k8s.io/pause:3.10.2"|' \
        "$root/etc/containerd/config.toml"
    chroot "$root" systemctl enable kubelet.service containerd.service undo-mount-hacks.service \
        loam-kind-sysctl.service >/dev/null 2>&1
    chroot "$root" systemctl mask systemd-binfmt.service systemd-sysctl.service >/dev/null 2>&1
    mkdir -p "$root/etc/kubernetes/manifests"
    # The build stages' binaries.
    install -m 0755 "$bin/containerd" "$bin/ctr" "$bin/containerd-shim-runc-v2" "$bin/crictl" "$root/usr/local/bin/"
    install -m 0755 "$bin/runc" "$root/usr/local/sbin/runc"
    mkdir -p "$root/opt/cni/bin"
    install -m 0755 "$bin/host-local" "$bin/loopback" "$bin/ptp" "$bin/portmap" "$root/opt/cni/bin/"
    "$bin/ctr" oci spec |
        jq '.hooks.createContainer[.hooks.createContainer| length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' |
        jq 'del(.process.rlimits)' >"$root/etc/containerd/cri-base.json"
    # FROM scratch / COPY --from=build / / ... (docker import cannot set a stop
    # signal, so a one-line build adds the image's config on top).
    tar -C "$root" --numeric-owner -cf - . | docker import - "$ref-tree" >/dev/null
    printf '%s\n' "FROM $ref-tree" 'ENV container=docker' 'STOPSIGNAL SIGRTMIN+3' \
        'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' | docker build -q -t "$ref" - >/dev/null
    docker image rm "$ref-tree" >/dev/null
    rm -rf "$root"
    log "base: $ref"
}

rootfs
[ "${1:-}" != rootfs ] || exit 0
base_ref="loam-kind.local/kind-base:$(base_stamp)"
base "$base_ref"
[ "${1:-}" != base ] || { echo "$base_ref"; exit 0; }

# kind's default StorageClass manifest (pkg/build/nodeimage/const_storage.go),
# with our local-path-provisioner images in place of kind's.
storage_manifest() {
    local provisioner=$1 helper=$2
    sed -n '/^const defaultStorageManifest = `/,/^`$/p' "$kindmod/pkg/build/nodeimage/const_storage.go" |
        sed -e '1d;$d' -e "s|\` + storageProvisionerImage + \`|$provisioner|g" \
            -e "s|\` + storageHelperImage + \`|$helper|g"
}

. "$here/images.sh"
mapfile -t images < <(control_plane_images)
node_ref="loam-kind.local/kind-node:$K8S_VERSION"
manifest=$(storage_manifest "${images[7]}" "${images[8]}")
grep -q "image: ${images[7]}" <<<"$manifest" || { echo "cannot read kind's StorageClass manifest" >&2; exit 1; }
node_stamp=$( {
    echo "$base_ref"
    (cd "$bin" && sha256sum kubeadm kubelet kubectl)
    for i in "${images[@]}"; do docker image inspect -f '{{.Id}}' "$i"; done
    echo "$manifest"
} | sha256sum | cut -c1-16)
if [ "$(image_stamp "$node_ref")" = "$node_stamp" ]; then
    log "node: cached ($node_ref)"
    echo "$node_ref"
    exit 0
fi

# kubeadm must find every image it runs among ours.
wanted=$("$bin/kubeadm" config images list --kubernetes-version "$K8S_VERSION" 2>/dev/null | grep -v /pause:)
for w in $wanted; do
    printf '%s\n' "${images[@]}" | grep -qx "$w" ||
        log "kubeadm $K8S_VERSION asks for $w, not built here: the cluster config must name ours (run.sh does for etcd)"
done

log "node: assembling $node_ref (kind build node-image's steps)"
build="loam-kind-build-$$"
trap 'docker rm -f -v "$build" >/dev/null 2>&1' EXIT
docker run -d --entrypoint=sleep --name="$build" --security-opt seccomp=unconfined "$base_ref" infinity >/dev/null
for b in kubeadm kubelet kubectl; do
    docker cp "$bin/$b" "$build:/usr/bin/$b"
    docker exec "$build" chmod +x "/usr/bin/$b"
    docker exec "$build" chown root:root "/usr/bin/$b"
done
docker exec "$build" mkdir -p /kind/manifests
printf '%s' "$K8S_VERSION" | docker exec -i "$build" cp /dev/stdin /kind/version
printf '%s\n' "$manifest" | docker exec -i "$build" cp /dev/stdin /kind/manifests/default-storage.yaml
docker exec "$build" bash -c 'nohup containerd >/dev/null 2>&1 &'
docker exec "$build" bash -c 'for i in $(seq 30); do ctr info >/dev/null 2>&1 && exit 0; sleep 1; done; exit 1' ||
    { echo "containerd did not start in the build container" >&2; exit 1; }
for i in "${images[@]}"; do
    docker save "$i" | docker exec -i "$build" ctr --namespace=k8s.io images import \
        --label=io.cri-containerd.pinned=pinned --all-platforms --no-unpack --digests - >/dev/null
done
docker exec "$build" ctr --namespace=k8s.io images list -q | grep -v '^sha256:' >&2
docker exec "$build" pkill containerd
# Until it has stopped (it stays a zombie: the build container's PID 1 is sleep).
docker exec "$build" bash -c 'for i in $(seq 30); do ps -C containerd -o stat= | grep -qv Z || exit 0; sleep 1; done; exit 1' ||
    { echo "containerd in the build container did not stop" >&2; exit 1; }
docker commit --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' \
    --change 'ENV HTTP_PROXY="" HTTPS_PROXY="" NO_PROXY=""' --change "LABEL loam-kind.stamp=$node_stamp" \
    "$build" "$node_ref" >/dev/null
log "node: $node_ref"
echo "$node_ref"
