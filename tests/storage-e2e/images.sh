# shellcheck shell=bash
# The images Kubernetes' External Storage specs run, made here (nothing can be
# pulled on our machines), sourced by run.sh. Which images and which tags is
# the release's own list: test/utils/image/manifest.go of k8s.io/kubernetes at
# K8S_VERSION (the specs' pods name BusyBox, Agnhost, Nginx and GlibcDnsTesting,
# all from the PromoterE2eRegistry, registry.k8s.io/e2e-test-images). They are
# named under loam-e2e.local/e2e-test-images instead, and the suite is pointed
# there by its registry override, KUBE_TEST_REPO_LIST (a YAML RegistryList that
# sets promoterE2eRegistry), so no spec names an image that could be pulled.
#
#   storage_trees        the Debian trees (debootstrap, Debian's packages, no
#                        docker), cached in $LOAM_E2E_CACHE/storage-e2e
#   storage_images       the images, made from those trees with `docker import`
#                        (needs DOCKER_HOST: tests/kind/docker.sh), kept while
#                        their stamp is unchanged; prints one name per line
#   storage_repo_list F  writes the KUBE_TEST_REPO_LIST file F
#
# What each image is, beside upstream's (test/images/<name>/ in the module):
#   busybox:<tag>        upstream mirrors busybox:1.37.0; here Debian trixie's
#                        busybox-static 1.37 alone with its applet links, as
#                        tests/kind/images.sh makes busybox:1.37
#   agnhost:<tag>        upstream: Alpine + bind-tools curl netcat-openbsd
#                        iproute2 iperf bash util-linux-misc socat + the agnhost
#                        binary; here Debian minbase with the same tools
#                        (bind9-dnsutils for bind-tools, busybox-static for
#                        Alpine's busybox) and agnhost built by
#                        `tests/e2e/build.sh e2etest` from test/images/agnhost
#                        of the same module; /uploads, the agnhost-2 link and
#                        the user 1000 / group 50000 of its Dockerfile. Left
#                        out: coredns 1.6.2 and the fake registry's blobs (both
#                        fetched from the internet by upstream's build), porter's
#                        certificate; no storage spec uses them
#   nginx:<tag>          upstream mirrors nginx:1.27-alpine; here Debian
#                        trixie's nginx package (1.26) on minbase. The storage
#                        specs only run a shell script in it
#   glibc-dns-testing:<tag>  upstream: Debian slim + dnsutils (+ coredns 1.5.0,
#                        left out); here Debian trixie minbase + bind9-dnsutils

storage_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$storage_here/../e2e/versions.sh"
storage_cache=${LOAM_E2E_CACHE:-$HOME/.cache/loam-e2e}
storage_work="$storage_cache/storage-e2e"
storage_registry=loam-e2e.local/e2e-test-images
storage_path=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

storage_log() { printf '[storage-images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# storage_moddir: k8s.io/kubernetes at K8S_VERSION in the module cache.
storage_moddir() {
    go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
        python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(d["Error"]) if d.get("Error") else print(d["Dir"])'
}

# storage_tag ID: the tag test/utils/image/manifest.go gives the image ID
# (BusyBox, Agnhost, ...); fails unless it is a PromoterE2eRegistry image.
storage_tag() {
    python3 - "$(storage_moddir)/test/utils/image/manifest.go" "$1" <<'PY'
import re, sys
src, want = open(sys.argv[1]).read(), sys.argv[2]
m = re.search(r'configs\[' + want + r'\] = Config\{list\.(\w+), "([^"]+)", "([^"]+)"\}', src)
if not m:
    sys.exit(f"{want}: not in {sys.argv[1]}")
if m.group(1) != "PromoterE2eRegistry":
    sys.exit(f"{want}: in {m.group(1)}, not PromoterE2eRegistry: the repo list does not rename it")
print(f"{m.group(2)}:{m.group(3)}")
PY
}

# storage_tree NAME PACKAGES: a debootstrap'd minbase trixie with PACKAGES
# (comma-separated), cached while the list is unchanged.
storage_tree() {
    local dir="$storage_work/$1" want="$DEBIAN_SUITE minbase $2"
    [ "$(cat "$dir.stamp" 2>/dev/null)" != "$want" ] || return 0
    storage_log "debootstrap $DEBIAN_SUITE (minbase + $2)"
    rm -rf "$dir" "$dir.tmp"
    mkdir -p "$storage_work/debs" "$storage_cache/log"
    # --cache-dir: the three trees share one download of each package.
    nice -n 15 debootstrap --variant=minbase --cache-dir="$storage_work/debs" --include="$2" \
        "$DEBIAN_SUITE" "$dir.tmp" http://deb.debian.org/debian >"$storage_cache/log/storage-debootstrap-$1.log" 2>&1 ||
        { tail -20 "$storage_cache/log/storage-debootstrap-$1.log" >&2; return 1; }
    rm -rf "$dir.tmp/var/cache/apt/archives/"*.deb "$dir.tmp/var/lib/apt/lists/"*
    mv "$dir.tmp" "$dir"
    printf '%s' "$want" >"$dir.stamp"
}

storage_trees() {
    storage_tree agnhost bind9-dnsutils,curl,netcat-openbsd,iproute2,iperf,socat,busybox-static
    storage_tree glibc bind9-dnsutils
    storage_tree nginx nginx
}

# storage_import REF STAMP DIR CHANGE...: DIR as the single layer of REF, with
# the Dockerfile instructions CHANGE (docker import --change).
storage_import() {
    local ref=$1 stamp=$2 dir=$3 c
    shift 3
    local changes=(--change "ENV $storage_path" --change "LABEL loam-kind.stamp=$stamp")
    for c in "$@"; do changes+=(--change "$c"); done
    if [ "$(docker image inspect -f '{{index .Config.Labels "loam-kind.stamp"}}' "$ref" 2>/dev/null)" = "$stamp" ]; then
        storage_log "$ref: cached"
    else
        tar -C "$dir" --numeric-owner -cf - . | docker import "${changes[@]}" - "$ref" >/dev/null ||
            { echo "docker import of $ref failed" >&2; return 1; }
        storage_log "$ref: made"
    fi
    echo "$ref"
}

storage_images() {
    local bin="$storage_cache/bin" t dir stamp version agn
    storage_trees
    mkdir -p "$storage_work"

    # busybox: the static busybox of the agnhost tree, alone.
    t=$(storage_tag BusyBox)
    dir=$(mktemp -d "$storage_work/busybox.XXXXXX")
    mkdir -p "$dir/bin" "$dir/tmp"
    chmod 1777 "$dir/tmp"
    cp "$storage_work/agnhost/usr/bin/busybox" "$dir/bin/busybox"
    # The tag's release (1.37.0-2: busybox 1.37) is the one Debian ships.
    version=$("$dir/bin/busybox" 2>&1 | head -1 || true)
    [[ $version == *" v$(echo "${t#busybox:}" | cut -d. -f1-2)."* ]] ||
        { echo "Debian's busybox-static is not the release of $t: $version" >&2; rm -rf "$dir"; return 1; }
    for a in $("$dir/bin/busybox" --list); do [ -e "$dir/bin/$a" ] || ln -s busybox "$dir/bin/$a"; done
    stamp=$(sha256sum "$dir/bin/busybox" | cut -c1-16)
    storage_import "$storage_registry/$t" "$stamp" "$dir" 'CMD ["sh"]'
    rm -rf "$dir"

    # agnhost: the binary of this release on the agnhost tree.
    t=$(storage_tag Agnhost)
    agn=$(cat "$(storage_moddir)/test/images/agnhost/VERSION")
    [ "agnhost:$agn" = "$t" ] ||
        { echo "test/images/agnhost/VERSION says $agn, manifest.go names $t" >&2; return 1; }
    [ "$(cat "$bin/agnhost.recipe" 2>/dev/null)" = "agnhost $agn of k8s $K8S_VERSION" ] ||
        { echo "no agnhost $agn in $bin: run tests/e2e/build.sh e2etest" >&2; return 1; }
    stamp=$( { cat "$storage_work/agnhost.stamp"; sha256sum "$bin/agnhost"; } | sha256sum | cut -c1-16)
    dir=$(mktemp -d "$storage_work/agnhost.XXXXXX")
    cp -a "$storage_work/agnhost/." "$dir/"
    install -m 0755 "$bin/agnhost" "$dir/agnhost"
    ln -s agnhost "$dir/agnhost-2"
    mkdir -p "$dir/uploads"
    # adduser -u 1000 -D user-defined-in-image; addgroup -g 50000
    # group-defined-in-image; addgroup user-defined-in-image group-defined-in-image
    echo 'user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh' >>"$dir/etc/passwd"
    echo 'user-defined-in-image:!:20000:0:99999:7:::' >>"$dir/etc/shadow"
    printf '%s\n' 'user-defined-in-image:x:1000:' 'group-defined-in-image:x:50000:user-defined-in-image' >>"$dir/etc/group"
    mkdir -p "$dir/home/user-defined-in-image"
    chown 1000:1000 "$dir/home/user-defined-in-image"
    storage_import "$storage_registry/$t" "$stamp" "$dir" 'ENTRYPOINT ["/agnhost"]' 'CMD ["pause"]' \
        'EXPOSE 80 8080 8081 9376 5000'
    rm -rf "$dir"

    t=$(storage_tag Nginx)
    stamp=$(sha256sum "$storage_work/nginx.stamp" | cut -c1-16)
    storage_import "$storage_registry/$t" "$stamp" "$storage_work/nginx" \
        'CMD ["nginx", "-g", "daemon off;"]' 'EXPOSE 80'

    t=$(storage_tag GlibcDnsTesting)
    stamp=$(sha256sum "$storage_work/glibc.stamp" | cut -c1-16)
    storage_import "$storage_registry/$t" "$stamp" "$storage_work/glibc" 'CMD ["bash"]'
}

storage_repo_list() {
    cat >"$1" <<EOF
# KUBE_TEST_REPO_LIST for e2e.test (test/utils/image/manifest.go, RegistryList):
# the e2e test images are the local ones tests/storage-e2e/images.sh makes.
promoterE2eRegistry: $storage_registry
EOF
}
