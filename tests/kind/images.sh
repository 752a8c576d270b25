# shellcheck shell=bash
# Docker images for the kind target, sourced by node-image.sh and run.sh (after
# docker_up). Nothing can be pulled here: each image is made from what
# tests/e2e/build.sh built from the Go module proxy, or from a debootstrap'd
# Debian tree (node-image.sh), with `docker import`, and kept while its stamp
# (a label: the binaries' and trees' checksums) is unchanged.
#
#   control_plane_images   the images kubeadm runs (printed, one per line): the
#                          control plane, kube-proxy, etcd, CoreDNS, pause, and
#                          kind's StorageClass images (local-path-provisioner)
#   csi_images             the sidecars deploy/ names and the stand-ins (printed)
#   debian_slim_image, rust_image   local stand-ins of the Dockerfile's two base
#                          images, for `docker build -t loam:dev .` (printed)
#   busybox_image          busybox:1.37 of deploy/examples/ (printed)
#   mariadb_image          MariaDB for the story's seed scenario (printed)

images_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$images_here/../e2e/versions.sh"
images_cache=${LOAM_E2E_CACHE:-$HOME/.cache/loam-e2e}
images_bin="$images_cache/bin"
images_work="$images_cache/kind"
images_path=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

images_log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# image_stamp REF: the stamp label of a local image, empty if there is none.
image_stamp() { docker image inspect -f '{{index .Config.Labels "loam-kind.stamp"}}' "$1" 2>/dev/null || true; }

# import_tree REF STAMP DIR ENTRYPOINT_JSON: DIR as the single layer of REF.
import_tree() {
    local ref=$1 stamp=$2 dir=$3 entry=$4
    if [ "$(image_stamp "$ref")" = "$stamp" ]; then
        images_log "$ref: cached"
        return 0
    fi
    tar -C "$dir" --numeric-owner -cf - . | docker import --change "ENV $images_path" \
        --change "ENTRYPOINT $entry" --change "LABEL loam-kind.stamp=$stamp" - "$ref" >/dev/null
    images_log "$ref: made"
}

# static REF BINARY PATH: one static binary on an empty base, as upstream ships
# these programs (distroless); PATH is where the image's users run it from.
static() {
    local ref=$1 binary=$2 path=$3 sum dir
    sum=$(sha256sum "$images_bin/$binary" | cut -c1-16)
    [ "$(image_stamp "$ref")" != "$sum" ] || { images_log "$ref: cached"; return 0; }
    dir=$(mktemp -d "$images_work/static.XXXXXX")
    mkdir -p "$dir$(dirname "$path")" "$dir/tmp"
    chmod 1777 "$dir/tmp"
    cp "$images_bin/$binary" "$dir$path"
    import_tree "$ref" "$sum" "$dir" "[\"$path\"]"
    rm -rf "$dir"
}

# on_tree REF TREE BINARY PATH: a binary on a Debian tree (for programs that
# run other programs: kube-proxy runs iptables, the StorageClass helper a shell).
on_tree() {
    local ref=$1 tree=$2 binary=$3 path=$4 stamp dir
    stamp=$( { cat "$tree.stamp"; [ -z "$binary" ] || sha256sum "$images_bin/$binary"; } | sha256sum | cut -c1-16)
    [ "$(image_stamp "$ref")" != "$stamp" ] || { images_log "$ref: cached"; return 0; }
    dir=$(mktemp -d "$images_work/tree.XXXXXX")
    cp -a "$tree/." "$dir/"
    [ -z "$binary" ] || install -m 0755 "$images_bin/$binary" "$dir$path"
    import_tree "$ref" "$stamp" "$dir" "[\"$path\"]"
    rm -rf "$dir"
}

control_plane_images() {
    local k=$K8S_VERSION etcd_tag=${ETCD_VERSION#v}-0
    static "registry.k8s.io/kube-apiserver:$k" kube-apiserver /usr/local/bin/kube-apiserver
    static "registry.k8s.io/kube-controller-manager:$k" kube-controller-manager /usr/local/bin/kube-controller-manager
    static "registry.k8s.io/kube-scheduler:$k" kube-scheduler /usr/local/bin/kube-scheduler
    on_tree "registry.k8s.io/kube-proxy:$k" "$images_work/rootfs" kube-proxy /usr/local/bin/kube-proxy
    static "registry.k8s.io/etcd:$etcd_tag" etcd /usr/local/bin/etcd
    static "registry.k8s.io/coredns/coredns:$COREDNS_VERSION" coredns /coredns
    static "registry.k8s.io/pause:3.10.2" pause /pause
    static "loam-kind.local/local-path-provisioner:$LOCAL_PATH_VERSION" local-path-provisioner \
        /usr/bin/local-path-provisioner
    on_tree "loam-kind.local/local-path-helper:$DEBIAN_SUITE" "$images_work/rootfs" '' /bin/sh
    printf '%s\n' "registry.k8s.io/kube-apiserver:$k" "registry.k8s.io/kube-controller-manager:$k" \
        "registry.k8s.io/kube-scheduler:$k" "registry.k8s.io/kube-proxy:$k" "registry.k8s.io/etcd:$etcd_tag" \
        "registry.k8s.io/coredns/coredns:$COREDNS_VERSION" "registry.k8s.io/pause:3.10.2" \
        "loam-kind.local/local-path-provisioner:$LOCAL_PATH_VERSION" "loam-kind.local/local-path-helper:$DEBIAN_SUITE"
}

# csi_images: the kubernetes-csi sidecars deploy/ names, built from the module
# proxy (tags as deploy/ has them), and the stand-ins of tests/e2e/standins,
# named as ours. A directory in LOAM_KIND_UPSTREAM_IMAGES with `docker save`
# archives (*.tar) of upstream images is loaded too: a user who has the
# upstream registrar, livenessprobe or resizer runs the story with them.
csi_images() {
    static "registry.k8s.io/sig-storage/csi-provisioner:$PROVISIONER_VERSION" csi-provisioner /csi-provisioner
    static "registry.k8s.io/sig-storage/csi-attacher:$ATTACHER_VERSION" csi-attacher /csi-attacher
    static "registry.k8s.io/sig-storage/csi-snapshotter:$SNAPSHOTTER_VERSION" csi-snapshotter /csi-snapshotter
    static "registry.k8s.io/sig-storage/snapshot-controller:$SNAPSHOTTER_VERSION" snapshot-controller /snapshot-controller
    static "registry.k8s.io/sig-storage/csi-resizer:$RESIZER_VERSION" csi-resizer /csi-resizer
    static "loam-e2e.local/standin/csi-node-driver-registrar:$REGISTRAR_VERSION" csi-node-driver-registrar \
        /csi-node-driver-registrar
    static "loam-e2e.local/standin/livenessprobe:$LIVENESSPROBE_VERSION" livenessprobe /livenessprobe
    printf '%s\n' "registry.k8s.io/sig-storage/csi-provisioner:$PROVISIONER_VERSION" \
        "registry.k8s.io/sig-storage/csi-attacher:$ATTACHER_VERSION" \
        "registry.k8s.io/sig-storage/csi-snapshotter:$SNAPSHOTTER_VERSION" \
        "registry.k8s.io/sig-storage/snapshot-controller:$SNAPSHOTTER_VERSION" \
        "registry.k8s.io/sig-storage/csi-resizer:$RESIZER_VERSION" \
        "loam-e2e.local/standin/csi-node-driver-registrar:$REGISTRAR_VERSION" \
        "loam-e2e.local/standin/livenessprobe:$LIVENESSPROBE_VERSION"
    local tar ref
    for tar in "${LOAM_KIND_UPSTREAM_IMAGES:-/nonexistent}"/*.tar; do
        [ -f "$tar" ] || continue
        for ref in $(docker load -i "$tar" | sed -n 's/^Loaded image: //p'); do
            images_log "$ref: from $tar"
            echo "$ref"
        done
    done
}

# The Dockerfile's base images, made locally and named as ours:
# loam-kind.local/debian:trixie-slim is a debootstrap'd minbase trixie (what
# debian:trixie-slim is), loam-kind.local/rust:<version>-trixie is that with
# gcc and libc6-dev (the linker Rust needs) and this machine's Rust toolchain
# (the one rustup gives `cargo` here) in /usr/local/rust.
debian_slim_image() {
    local tree="$images_work/slim" ref="loam-kind.local/debian:$DEBIAN_SUITE-slim"
    if [ "$(cat "$tree.stamp" 2>/dev/null)" != "$DEBIAN_SUITE minbase" ]; then
        images_log "debootstrap $DEBIAN_SUITE (minbase)"
        rm -rf "$tree" "$tree.tmp"
        nice -n 10 debootstrap --variant=minbase "$DEBIAN_SUITE" "$tree.tmp" http://deb.debian.org/debian \
            >"$images_cache/log/kind-debootstrap-slim.log" 2>&1 ||
            { tail -20 "$images_cache/log/kind-debootstrap-slim.log" >&2; return 1; }
        rm -rf "$tree.tmp/var/cache/apt/archives/"*.deb "$tree.tmp/var/lib/apt/lists/"*
        mv "$tree.tmp" "$tree"
        printf '%s' "$DEBIAN_SUITE minbase" >"$tree.stamp"
    fi
    local stamp
    stamp=$(sha256sum "$tree.stamp" | cut -c1-16)
    if [ "$(image_stamp "$ref")" != "$stamp" ]; then
        tar -C "$tree" --numeric-owner -cf - . | docker import --change "ENV $images_path" \
            --change 'CMD ["bash"]' --change "LABEL loam-kind.stamp=$stamp" - "$ref" >/dev/null
    fi
    echo "$ref"
}

rust_image() {
    local slim=$1 toolchain version ref stamp ctx
    toolchain=$(rustc --print sysroot)
    version=$(rustc --version | cut -d' ' -f2)
    ref="loam-kind.local/rust:$version-$DEBIAN_SUITE"
    stamp=$( { echo "$slim $(image_stamp "$slim")"; rustc -vV; cat /usr/local/share/ca-certificates/*.crt 2>/dev/null; } |
        sha256sum | cut -c1-16)
    if [ "$(image_stamp "$ref")" != "$stamp" ]; then
        images_log "$ref: from $toolchain"
        ctx=$(mktemp -d "$images_work/rust.XXXXXX")
        mkdir "$ctx/rust"
        cp -a "$toolchain/bin" "$toolchain/lib" "$toolchain/libexec" "$toolchain/etc" "$ctx/rust/"
        # The local CAs this machine trusts (where the way to crates.io goes
        # through a proxy of its own), so cargo in the build reaches what the
        # host's cargo reaches.
        mkdir "$ctx/ca"
        cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/" 2>/dev/null || true
        cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \\
    && rm -rf /var/lib/apt/lists/*
COPY ca /usr/local/share/ca-certificates
RUN update-ca-certificates
COPY rust /usr/local/rust
ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    CARGO_HOME=/usr/local/cargo
LABEL loam-kind.stamp=$stamp
DOCKERFILE
        docker build --network host --force-rm -q -t "$ref" "$ctx" >/dev/null
        rm -rf "$ctx"
    fi
    echo "$ref"
}

# mariadb_image: MariaDB from Debian's packages on the slim base, for the story's
# seed scenario (step 12d: a database StatefulSet whose replicas are seeded by
# cloning across nodes) (printed).
mariadb_image() {
    local slim=$1 ref=loam-kind.local/mariadb:$DEBIAN_SUITE stamp ctx
    stamp=$(image_stamp "$slim")-mariadb
    [ "$(image_stamp "$ref")" != "$stamp" ] || { images_log "$ref: cached"; echo "$ref"; return 0; }
    ctx=$(mktemp -d "$images_work/mariadb.XXXXXX")
    cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $slim
RUN apt-get update && apt-get install -y --no-install-recommends mariadb-server mariadb-client \\
    && rm -rf /var/lib/apt/lists/*
LABEL loam-kind.stamp=$stamp
DOCKERFILE
    docker build --network host --force-rm -q -t "$ref" "$ctx" >/dev/null
    rm -rf "$ctx"
    images_log "$ref: made"
    echo "$ref"
}

# busybox_image: busybox:1.37, the image of deploy/examples/ (which a user's
# cluster pulls from Docker Hub): Debian trixie's busybox-static 1.37 package,
# alone with its applet links on an empty base (printed).
busybox_image() {
    local slim=$1 ref=docker.io/library/busybox:1.37 stamp dir
    stamp=$(image_stamp "$slim")-busybox
    [ "$(image_stamp "$ref")" != "$stamp" ] || { images_log "$ref: cached"; echo "$ref"; return 0; }
    dir=$(mktemp -d "$images_work/busybox.XXXXXX")
    mkdir -p "$dir/bin" "$dir/tmp"
    chmod 1777 "$dir/tmp"
    docker run --rm --network host -v "$dir/bin:/out" "$slim" sh -c \
        'apt-get update -qq && apt-get install -y -qq busybox-static >/dev/null && cp /usr/bin/busybox /out/' >&2
    local version
    version=$("$dir/bin/busybox" 2>&1 | head -1 || true)
    [[ $version == *' v1.37.'* ]] ||
        { echo "Debian's busybox-static is not 1.37: $version" >&2; rm -rf "$dir"; return 1; }
    for a in $("$dir/bin/busybox" --list); do [ -e "$dir/bin/$a" ] || ln -s busybox "$dir/bin/$a"; done
    import_tree "$ref" "$stamp" "$dir" '["/bin/sh"]'
    rm -rf "$dir"
    echo "$ref"
}
