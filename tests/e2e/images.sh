#!/usr/bin/env bash
# Builds the OCI images the e2e cluster runs, without a daemon or a registry,
# into $LOAM_E2E_CACHE/images/<name>.tar (OCI archives, tag in the index) with
# bin/*.ref naming each one's full reference (what the manifests ask for):
#   - the Loam image: the Dockerfile's runtime stage rebuilt without pulling:
#     a debootstrap'd Debian ${DEBIAN_SUITE} (minbase; e2fsprogs, xfsprogs, the
#     Dockerfile's packages) with the release binary at /usr/local/bin/loam.
#     The Dockerfile's build stage (rust:1.95-trixie) cannot be pulled here, so
#     the binary comes from `cargo build --release --locked --bin loam`, the
#     same command, on this machine. It is also the shell image of the tests.
#   - pause, coredns, each sidecar and the snapshot-controller: the one static
#     binary on an empty base, as upstream ships them (distroless).
# An image is rebuilt only when what goes into it changed (images/<name>.stamp).
# Needs: umoci, debootstrap (installed when missing), and tests/e2e/build.sh's
# binaries in $LOAM_E2E_CACHE/bin; LOAM_BIN: the loam binary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"
cache=${LOAM_E2E_CACHE:-$HOME/.cache/loam-e2e}
bin="$cache/bin"
out="$cache/images"
mkdir -p "$out"
log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

need=()
command -v umoci >/dev/null || need+=(umoci)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The runtime base of the Dockerfile (debian:trixie-slim plus its apt-get line).
base_packages=$(sed -n 's/.*apt-get install -y --no-install-recommends \(.*\) \\$/\1/p' "$here/../../Dockerfile")
[ -n "$base_packages" ] || { echo "cannot read the Dockerfile's packages" >&2; exit 1; }
rootfs() {
    local dir="$cache/rootfs/$DEBIAN_SUITE" want="$DEBIAN_SUITE minbase $base_packages"
    if [ "$(cat "$dir.stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    log "debootstrap $DEBIAN_SUITE (minbase + $base_packages)"
    rm -rf "$dir" "$dir.stamp"
    mkdir -p "$dir"
    nice -n 10 debootstrap --variant=minbase --include="${base_packages// /,}" \
        "$DEBIAN_SUITE" "$dir" http://deb.debian.org/debian >"$cache/log/debootstrap.log" 2>&1 ||
        { tail -20 "$cache/log/debootstrap.log" >&2; return 1; }
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
        "$dir"/var/log/* "$dir"/tmp/*
    printf '%s' "$want" >"$dir.stamp"
}

# image NAME REF STAMP ROOTFS_DIR ENTRYPOINT_JSON_ARGS...
# Packs ROOTFS_DIR as the single layer of image REF (registry/name:tag).
image() {
    local name=$1 ref=$2 stamp=$3 root=$4
    shift 4
    if [ "$(cat "$out/$name.stamp" 2>/dev/null)" = "$stamp" ] && [ -f "$out/$name.tar" ]; then
        log "$name: cached"
        return 0
    fi
    local tag=${ref##*:} layout="$cache/oci/$name"
    rm -rf "$layout"
    mkdir -p "$(dirname "$layout")"
    umoci init --layout "$layout"
    umoci new --image "$layout:$tag"
    umoci insert --rootless=false --image "$layout:$tag" "$root" /
    local args=() a
    for a in "$@"; do args+=(--config.entrypoint "$a"); done
    umoci config --image "$layout:$tag" "${args[@]}" --config.user 0:0 \
        --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --author loam-e2e --created 1970-01-01T00:00:00Z
    umoci gc --layout "$layout"
    tar -C "$layout" -cf "$out/$name.tar.tmp" .
    mv "$out/$name.tar.tmp" "$out/$name.tar"
    printf '%s' "$ref" >"$out/$name.ref"
    printf '%s' "$stamp" >"$out/$name.stamp"
    rm -rf "$layout"
    log "$name: $ref"
}

# static NAME REF BINARY [ENTRYPOINT_PATH]: one static binary on an empty base.
static() {
    local name=$1 ref=$2 binary=$3 path=${4:-/$3}
    local sum root="$cache/oci-root/$name"
    sum=$(sha256sum "$bin/$binary" | cut -d' ' -f1)
    rm -rf "$root"
    mkdir -p "$root$(dirname "$path")" "$root/tmp"
    chmod 1777 "$root/tmp"
    cp "$bin/$binary" "$root$path"
    image "$name" "$ref" "$ref $sum" "$root" "$path"
    rm -rf "$root"
}

rootfs
[ "${1:-}" != rootfs ] || exit 0 # images.sh rootfs: only the base
loam_bin=${LOAM_BIN:?LOAM_BIN: the loam release binary}
loam_sum=$(sha256sum "$loam_bin" | cut -d' ' -f1)
loam_root="$cache/oci-root/loam"
if [ "$(cat "$out/loam.stamp" 2>/dev/null)" != "loam $loam_sum $(cat "$cache/rootfs/$DEBIAN_SUITE.stamp")" ]; then
    rm -rf "$loam_root"
    mkdir -p "$(dirname "$loam_root")"
    cp -a "$cache/rootfs/$DEBIAN_SUITE" "$loam_root"
    install -m 0755 "$loam_bin" "$loam_root/usr/local/bin/loam"
fi
image loam docker.io/library/loam:dev "loam $loam_sum $(cat "$cache/rootfs/$DEBIAN_SUITE.stamp")" \
    "$loam_root" /usr/local/bin/loam
rm -rf "$loam_root"

static pause "registry.k8s.io/pause:3.10.2" pause /pause
static coredns "registry.k8s.io/coredns/coredns:$COREDNS_VERSION" coredns /coredns
static csi-provisioner "registry.k8s.io/sig-storage/csi-provisioner:$PROVISIONER_VERSION" csi-provisioner
static csi-attacher "registry.k8s.io/sig-storage/csi-attacher:$ATTACHER_VERSION" csi-attacher
static csi-snapshotter "registry.k8s.io/sig-storage/csi-snapshotter:$SNAPSHOTTER_VERSION" csi-snapshotter
static csi-resizer "registry.k8s.io/sig-storage/csi-resizer:$RESIZER_VERSION" csi-resizer
static snapshot-controller "registry.k8s.io/sig-storage/snapshot-controller:$SNAPSHOTTER_VERSION" snapshot-controller
# Stand-ins: named as ours, never as the upstream images (the overlay maps them).
static standin-csi-node-driver-registrar "loam-e2e.local/standin/csi-node-driver-registrar:$REGISTRAR_VERSION" \
    csi-node-driver-registrar
static standin-livenessprobe "loam-e2e.local/standin/livenessprobe:$LIVENESSPROBE_VERSION" livenessprobe
