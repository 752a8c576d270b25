#!/usr/bin/env bash
# Builds every program the end-to-end cluster runs, from the Go module proxy,
# into the cache ($LOAM_E2E_CACHE, default ~/.cache/loam-e2e):
#   bin/<name>            kube-apiserver kube-controller-manager kube-scheduler
#                         kubelet kubectl kubeadm kube-proxy (the last two for
#                         the kind node image, tests/kind) etcd containerd containerd-shim-runc-v2
#                         runc coredns csi-provisioner csi-attacher csi-resizer csi-snapshotter
#                         snapshot-controller pause, and the stand-ins of
#                         tests/e2e/standins (see there)
#                         e2e.test, ginkgo and agnhost (target e2etest, not
#                         built by default: Kubernetes' own storage suite,
#                         tests/storage-e2e)
#                         prometheus and promtool (target prometheus, not
#                         built by default: the kind story's metrics step)
#                         helm (target helm, not built by default: the kind
#                         run's Helm step)
# Each one is built through a small wrapper module under src/<name>: it requires
# the upstream module at its release and turns every replace directive of that
# module's go.mod into one the wrapper can use (a replace by a local directory
# becomes the published module of the same path: k8s.io/<staging> at v0.X.Y,
# a sibling module at the same tag). A program is rebuilt only when its recipe
# (module, version, packages, flags) changed: bin/<name>.recipe records it.
#
# Usage: build.sh [NAME...]   (default: everything)
# Env:   LOAM_E2E_CACHE, LOAM_E2E_DOWNLOAD_ONLY=1 (resolve and download, no compile)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"
cache=${LOAM_E2E_CACHE:-$HOME/.cache/loam-e2e}
mkdir -p "$cache/bin" "$cache/src" "$cache/log"
export GOCACHE="$cache/go-build" GOTOOLCHAIN=local GOFLAGS=-mod=mod
nice=(nice -n "${LOAM_E2E_NICE:-10}")

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# modfield MODULE@VERSION FIELD: downloads the module, prints one field of
# `go mod download -json` (Dir, GoMod), fails with the proxy's answer.
modfield() {
    go mod download -json "$1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
if d.get("Error"):
    sys.exit("download " + sys.argv[1] + ": " + d["Error"])
print(d[sys.argv[2]])' "$1" "$2"
}

# wrapper NAME MODULE VERSION LOCAL_VERSION [MAIN_GO]
# Writes src/NAME/go.mod. LOCAL_VERSION is the version given to modules the
# upstream go.mod replaces by a local directory.
wrapper() {
    local name=$1 module=$2 version=$3 localver=$4 main=${5:-}
    local dir="$cache/src/$name" gomod
    mkdir -p "$dir"
    gomod=$(modfield "$module@$version" GoMod)
    python3 - "$gomod" "$module" "$version" "$localver" >"$dir/go.mod.new" <<'PY'
import json, subprocess, sys
gomod, module, version, localver = sys.argv[1:]
info = json.loads(subprocess.run(["go", "mod", "edit", "-json", gomod],
                                 check=True, capture_output=True, text=True).stdout)
out = [f"module loam-e2e/wrapper", "", f"go {info.get('Go', '1.24')}", "",
       f"require {module} {version}", ""]
seen = set()
for r in info.get("Replace") or []:
    old, new = r["Old"]["Path"], r["New"]
    if old in seen:
        continue
    seen.add(old)
    if new.get("Version"):
        out.append(f"replace {old} => {new['Path']} {new['Version']}")
    else:  # a directory of the upstream repository: its published module
        major = int(localver[1:].split(".")[0])
        if major >= 2 and not old.endswith(f"/v{major}"):
            continue  # cannot be at that version: not a module the build uses
        out.append(f"replace {old} => {old} {localver}")
print("\n".join(out))
PY
    if ! cmp -s "$dir/go.mod.new" "$dir/go.mod"; then
        mv "$dir/go.mod.new" "$dir/go.mod"
        rm -f "$dir/go.sum"
    else
        rm "$dir/go.mod.new"
    fi
    if [ -n "$main" ]; then
        printf '%s\n' "$main" >"$dir/main.go"
    fi
}

# gobuild NAME "RECIPE" PACKAGE...   (go build flags in the array gflags)
# Builds into bin/ unless bin/NAME.recipe already says RECIPE. With gout set,
# the single package's binary gets that name. With gsrc set, the wrapper is
# src/$gsrc instead of src/NAME; with gtest set, the single package's test
# binary is built (go test -c), as Kubernetes builds e2e.test.
gobuild() {
    local name=$1 recipe=$2
    shift 2
    local dir="$cache/src/${gsrc:-$name}"
    if [ "$(cat "$cache/bin/$name.recipe" 2>/dev/null)" = "$recipe" ]; then
        log "$name: cached"
        return 0
    fi
    # Resolve and download first (network and disk only). A test binary also
    # needs the test files' imports.
    local list=(list -deps) build=(build)
    [ -z "${gtest:-}" ] || { list+=(-test); build=(test -c -vet=off); }
    (cd "$dir" && go "${list[@]}" "${gflags[@]}" "$@" >/dev/null 2>"$cache/log/$name.list") ||
        { cat "$cache/log/$name.list" >&2; return 1; }
    if [ "${LOAM_E2E_DOWNLOAD_ONLY:-}" = 1 ]; then
        log "$name: downloaded"
        return 0
    fi
    log "$name: building"
    local start=$SECONDS out="$cache/bin/$name.tmp/"
    rm -rf "$out"
    mkdir -p "$out"
    [ -z "${gout:-}" ] || out+="$gout"
    (cd "$dir" && "${nice[@]}" go "${build[@]}" -trimpath "${gflags[@]}" -o "$out" "$@" \
        >"$cache/log/$name.build" 2>&1) || { tail -40 "$cache/log/$name.build" >&2; return 1; }
    mv -f "$cache/bin/$name.tmp/"* "$cache/bin/"
    rmdir "$cache/bin/$name.tmp"
    printf '%s' "$recipe" >"$cache/bin/$name.recipe"
    log "$name: built in $((SECONDS - start)) s"
}

build_kubernetes() {
    local v=$K8S_VERSION staging minor ld="-s -w" pkg
    staging="v0.${v#v1.}" # v1.37.2 -> v0.37.2
    wrapper kubernetes k8s.io/kubernetes "$v" "$staging"
    minor=${v#v1.}
    minor=${minor%%.*}
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    gflags=(-ldflags "$ld"); gout=''; CGO_ENABLED=0 gobuild kubernetes "k8s $v $ld" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl \
        k8s.io/kubernetes/cmd/kubeadm k8s.io/kubernetes/cmd/kube-proxy
}

# Kubernetes' end-to-end suite, for tests/storage-e2e: e2e.test (the test
# binary of k8s.io/kubernetes/test/e2e, as hack/lib/golang.sh makes it with
# `go test -c`) and the ginkgo CLI at the version k8s.io/kubernetes's go.mod
# pins (upstream builds it from its vendor directory, so from the same module
# graph, which is what building it in this wrapper gives). Same release and
# the same flags as the kubernetes target (CGO_ENABLED=0, -trimpath, no tags):
# the packages both link are then compiled once, shared through GOCACHE. The
# wrapper has its own directory, so that a kubernetes build running at the
# same time keeps its go.mod and go.sum.
build_e2etest() {
    local v=$K8S_VERSION staging minor ld="-s -w" pkg ginkgo
    staging="v0.${v#v1.}"
    wrapper e2etest k8s.io/kubernetes "$v" "$staging"
    minor=${v#v1.}
    minor=${minor%%.*}
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    gflags=(-ldflags "$ld"); gout=e2e.test; gsrc=e2etest; gtest=1; CGO_ENABLED=0 \
        gobuild e2e.test "e2e.test $v $ld" k8s.io/kubernetes/test/e2e
    gtest=''
    # The version the module graph selects is the one k8s.io/kubernetes's
    # go.mod requires (it lists its whole build list).
    ginkgo=$(cd "$cache/src/e2etest" && go list -m -f '{{.Version}}' github.com/onsi/ginkgo/v2)
    log "ginkgo: github.com/onsi/ginkgo/v2 $ginkgo (k8s.io/kubernetes $v's go.mod)"
    gflags=(-ldflags "-s -w"); gout=ginkgo; CGO_ENABLED=0 \
        gobuild ginkgo "ginkgo $ginkgo of k8s $v" github.com/onsi/ginkgo/v2/ginkgo
    # agnhost, the suite's all-purpose test image program, from the same
    # module (test/images/agnhost), as its Makefile builds it (image-util.sh:
    # CGO_ENABLED=0, main.Version from its VERSION file, which is the tag
    # test/utils/image/manifest.go names).
    local agn
    agn=$(cat "$(modfield "k8s.io/kubernetes@$v" Dir)/test/images/agnhost/VERSION")
    gflags=(-ldflags "-s -w -X main.Version=$agn"); gout=agnhost; CGO_ENABLED=0 \
        gobuild agnhost "agnhost $agn of k8s $v" k8s.io/kubernetes/test/images/agnhost
    gsrc=''
}

build_etcd() {
    wrapper etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_VERSION" \
        'package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

// etcd, as the upstream etcd binary runs it.
func main() { etcdmain.Main(os.Args) }'
    gflags=(-ldflags "-s -w"); gout=etcd; CGO_ENABLED=0 gobuild etcd "etcd $ETCD_VERSION" .
}

build_containerd() {
    local v=$CONTAINERD_VERSION ld
    wrapper containerd github.com/containerd/containerd/v2 "$v" "$v"
    ld="-s -w -X github.com/containerd/containerd/v2/version.Version=$v"
    gflags=(-tags "no_btrfs no_devmapper no_zfs" -ldflags "$ld"); gout=''; CGO_ENABLED=0 \
        gobuild containerd "containerd $v $ld" \
        github.com/containerd/containerd/v2/cmd/containerd \
        github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
        github.com/containerd/containerd/v2/cmd/ctr
}

build_runc() {
    local v=$RUNC_VERSION ld
    wrapper runc github.com/opencontainers/runc "$v" "$v"
    ld="-s -w -X main.version=${v#v}"
    # runc needs cgo (nsenter) and libseccomp (RuntimeDefault seccomp profiles).
    gflags=(-tags seccomp -ldflags "$ld"); gout=runc; CGO_ENABLED=1 \
        gobuild runc "runc $v $ld seccomp" github.com/opencontainers/runc
}

build_coredns() {
    local v=$COREDNS_VERSION
    wrapper coredns github.com/coredns/coredns "$v" "$v"
    gflags=(-ldflags "-s -w"); gout=coredns; CGO_ENABLED=0 gobuild coredns "coredns $v" github.com/coredns/coredns
}

build_sidecars() {
    wrapper csi-provisioner github.com/kubernetes-csi/external-provisioner/v6 "$PROVISIONER_VERSION" "$PROVISIONER_VERSION"
    gflags=(-ldflags "-s -w -X main.version=$PROVISIONER_VERSION"); gout=''; CGO_ENABLED=0 \
        gobuild csi-provisioner "provisioner $PROVISIONER_VERSION" \
        github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner
    wrapper csi-attacher github.com/kubernetes-csi/external-attacher/v4 "$ATTACHER_VERSION" "$ATTACHER_VERSION"
    gflags=(-ldflags "-s -w -X main.version=$ATTACHER_VERSION"); gout=''; CGO_ENABLED=0 \
        gobuild csi-attacher "attacher $ATTACHER_VERSION" \
        github.com/kubernetes-csi/external-attacher/v4/cmd/csi-attacher
    wrapper csi-snapshotter github.com/kubernetes-csi/external-snapshotter/v8 "$SNAPSHOTTER_VERSION" "$SNAPSHOTTER_VERSION"
    gflags=(-ldflags "-s -w -X main.version=$SNAPSHOTTER_VERSION"); gout=''; CGO_ENABLED=0 \
        gobuild csi-snapshotter "snapshotter $SNAPSHOTTER_VERSION" \
        github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter \
        github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller
    wrapper csi-resizer github.com/kubernetes-csi/external-resizer/v2 "$RESIZER_VERSION" "$RESIZER_VERSION"
    gflags=(-ldflags "-s -w -X main.version=$RESIZER_VERSION"); gout=''; CGO_ENABLED=0 \
        gobuild csi-resizer "resizer $RESIZER_VERSION" \
        github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer
}

# Stand-ins for the sidecars the module proxy does not serve (node-driver-registrar,
# livenessprobe): our own small programs in tests/e2e/standins,
# built against published modules.
build_standins() {
    local dir="$cache/src/standins" recipe
    rm -rf "$dir"
    cp -r "$here/standins" "$dir"
    recipe="standins $(cd "$here/standins" && find . -type f | sort | xargs sha256sum | sha256sum)"
    gflags=(-ldflags "-s -w"); gout=''; CGO_ENABLED=0 gobuild standins "$recipe" ./cmd/...
}

# The pause container: upstream's pause.c from the k8s.io/kubernetes module,
# linked statically.
build_pause() {
    local src
    src=$(modfield "k8s.io/kubernetes@$K8S_VERSION" Dir)
    local recipe="pause $K8S_VERSION"
    if [ "$(cat "$cache/bin/pause.recipe" 2>/dev/null)" = "$recipe" ]; then
        log "pause: cached"
        return 0
    fi
    [ "${LOAM_E2E_DOWNLOAD_ONLY:-}" = 1 ] && return 0
    gcc -Os -Wall -static -DVERSION="$K8S_VERSION-loam-e2e" -o "$cache/bin/pause" "$src/build/pause/linux/pause.c"
    strip "$cache/bin/pause"
    printf '%s' "$recipe" >"$cache/bin/pause.recipe"
    log "pause: built"
}

# What only the kind node image (tests/kind) adds, at the versions kind's base
# image Dockerfile pins (versions.sh): crictl, the CNI plugins kind's nodes
# carry, and the program of kind's default StorageClass image.
build_crictl() {
    wrapper crictl sigs.k8s.io/cri-tools "$CRICTL_VERSION" "$CRICTL_VERSION"
    gflags=(-ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION"); gout=''; CGO_ENABLED=0 \
        gobuild crictl "crictl $CRICTL_VERSION" sigs.k8s.io/cri-tools/cmd/crictl
}

build_cni() {
    wrapper cni github.com/containernetworking/plugins "$CNI_PLUGINS_VERSION" "$CNI_PLUGINS_VERSION"
    gflags=(-ldflags "-s -w"); gout=''; CGO_ENABLED=0 gobuild cni "cni $CNI_PLUGINS_VERSION" \
        github.com/containernetworking/plugins/plugins/ipam/host-local \
        github.com/containernetworking/plugins/plugins/main/loopback \
        github.com/containernetworking/plugins/plugins/main/ptp \
        github.com/containernetworking/plugins/plugins/meta/portmap
}

build_localpath() {
    wrapper local-path-provisioner github.com/rancher/local-path-provisioner "$LOCAL_PATH_VERSION" "$LOCAL_PATH_VERSION"
    gflags=(-ldflags "-s -w -X main.VERSION=$LOCAL_PATH_VERSION"); gout=local-path-provisioner; CGO_ENABLED=0 \
        gobuild local-path-provisioner "local-path-provisioner $LOCAL_PATH_VERSION" \
        github.com/rancher/local-path-provisioner
}

# Prometheus and promtool (target prometheus, not built by default: the
# metrics step of the kind story, tests/kind/prometheus-step.sh), as its
# .promu.yml builds them but for two tags: without builtinassets the web UI
# is not embedded, so no npm build is needed (the step uses the HTTP API
# only), and remove_all_sd with enable_kubernetes_sd keeps the Kubernetes
# service discovery (and file and http, always in) and no cloud ones.
build_prometheus() {
    local v=$PROMETHEUS_VERSION minor release ld pkg=github.com/prometheus/common/version
    minor=${v#v0.}
    minor=${minor%%.*}                     # v0.316.0 -> 316
    release="3.$((10#${minor:1})).${v##*.}" # -> 3.16.0
    wrapper prometheus github.com/prometheus/prometheus "$v" "$v"
    # A module zip has no git history: its version stands for the revision.
    ld="-s -w -X $pkg.Version=$release -X $pkg.Revision=$v -X $pkg.Branch=HEAD"
    ld+=" -X $pkg.BuildUser=loam-e2e -X $pkg.BuildDate=19700101-00:00:00"
    gflags=(-tags netgo,remove_all_sd,enable_kubernetes_sd -ldflags "$ld"); gout=''; CGO_ENABLED=0 \
        gobuild prometheus "prometheus $release $ld netgo,remove_all_sd,enable_kubernetes_sd" \
        github.com/prometheus/prometheus/cmd/prometheus github.com/prometheus/prometheus/cmd/promtool
}

# kind itself, as its README installs it: go install sigs.k8s.io/kind@VERSION.
build_kind() {
    local recipe="kind $KIND_VERSION"
    if [ "$(cat "$cache/bin/kind.recipe" 2>/dev/null)" = "$recipe" ]; then
        log "kind: cached"
        return 0
    fi
    [ "${LOAM_E2E_DOWNLOAD_ONLY:-}" = 1 ] && return 0
    log "kind: building"
    GOBIN="$cache/bin" GOFLAGS= CGO_ENABLED=0 "${nice[@]}" go install "sigs.k8s.io/kind@$KIND_VERSION"
    printf '%s' "$recipe" >"$cache/bin/kind.recipe"
    log "kind: built"
}

# Helm (target helm, not built by default: the kind run's Helm step), as its
# docs install it from source: go install helm.sh/helm/v4/cmd/helm@VERSION.
build_helm() {
    local recipe="helm $HELM_VERSION"
    if [ "$(cat "$cache/bin/helm.recipe" 2>/dev/null)" = "$recipe" ]; then
        log "helm: cached"
        return 0
    fi
    [ "${LOAM_E2E_DOWNLOAD_ONLY:-}" = 1 ] && return 0
    log "helm: building"
    GOBIN="$cache/bin" GOFLAGS= CGO_ENABLED=0 "${nice[@]}" go install "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
    printf '%s' "$recipe" >"$cache/bin/helm.recipe"
    log "helm: built"
}

all=(kubernetes etcd containerd runc coredns sidecars standins pause)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
if ! dpkg -s libseccomp-dev >/dev/null 2>&1 && [[ " ${targets[*]} " == *" runc "* ]]; then
    log "installing libseccomp-dev (runc's seccomp support)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libseccomp-dev pkg-config >/dev/null
fi
start=$SECONDS
for t in "${targets[@]}"; do
    "build_$t"
done
log "all done in $((SECONDS - start)) s"
