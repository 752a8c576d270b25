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
# cluster config sets disableDefaultCNI and tests/kind/network.sh wires the pod
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
    tar -C "$root" --numeric-owner -cf - . | docker import \
        --change 'ENV container=docker' --change 'STOPSIGNAL SIGRTMIN+3' \
        --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' - "$ref" >/dev/null
    rm -rf "$root"
    log "base: $ref"
}

rootfs
[ "${1:-}" != rootfs ] || exit 0
base_ref="loam-kind.local/kind-base:$(base_stamp)"
base "$base_ref"
[ "${1:-}" != base ] || { echo "$base_ref"; exit 0; }
