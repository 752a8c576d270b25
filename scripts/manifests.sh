#!/usr/bin/env bash
# Renders deploy/ with kustomize and the Helm chart (charts/loam) with helm,
# and validates every object offline and strictly: deploy/, deploy/snapshot/,
# deploy/groupsnapshot/, the kubelet directory examples (deploy/examples/k0s/,
# deploy/examples/microk8s/), deploy/examples/, the storage suite's classes
# (tests/storage-e2e/manifests/), the e2e overlay (tests/e2e/overlay), and
# the chart (after `helm lint`) with its default values, with every value
# changed (charts/loam/ci/all-values.yaml) and with metrics off. Then checks
# that the chart renders the same objects as deploy/ (so the two trees cannot
# drift), that it keeps the agent token across
# upgrades, that the controller runs without root (and that the check
# refuses each loosened setting), that no render for another kubelet directory names
# /var/lib/kubelet, that the group snapshot gate is on where group snapshots
# are only, and that the validation is strict: copies with a misspelled
# field, and chart values with a misspelled key, must fail.
#
# Env: KUSTOMIZE and HELM (default: from GOPATH), PYTHON (one with
#      kubernetes-validate), K8S_VERSION (the Kubernetes release whose schemas
#      to use).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
kustomize=${KUSTOMIZE:-$(go env GOPATH)/bin/kustomize}
helm=${HELM:-$(go env GOPATH)/bin/helm}
chart=$here/charts/loam
python=${PYTHON:-python3}
version=${K8S_VERSION:-1.37.0}
work=$(mktemp -d /tmp/loam-manifests.XXXXXX)
trap 'rm -rf "$work"' EXIT

"$kustomize" build "$here/deploy" >"$work/deploy.yaml"
"$kustomize" build "$here/deploy/snapshot" >"$work/snapshot.yaml"
"$kustomize" build "$here/deploy/groupsnapshot" >"$work/groupsnapshot.yaml"
"$kustomize" build "$here/tests/e2e/overlay" >"$work/e2e-overlay.yaml"
"$kustomize" build "$here/deploy/examples/k0s" >"$work/k0s.yaml"
"$kustomize" build "$here/deploy/examples/microk8s" >"$work/microk8s.yaml"

# The chart, rendered as `helm install --namespace loam` would (no cluster:
# `lookup` finds no token, so each render makes one).
"$helm" lint --strict "$chart"
"$helm" lint --strict "$chart" --values "$chart/ci/all-values.yaml"
chart() { "$helm" template loam "$chart" --namespace loam "$@"; }
chart >"$work/chart-default.yaml"
chart --values "$chart/ci/all-values.yaml" >"$work/chart-all.yaml"
chart --set metrics.enabled=false >"$work/chart-no-metrics.yaml"

"$python" "$here/scripts/validate-manifests.py" "$version" \
    "$work/deploy.yaml" "$work/snapshot.yaml" "$work/groupsnapshot.yaml" "$work/e2e-overlay.yaml" \
    "$work/k0s.yaml" "$work/microk8s.yaml" "$work/chart-default.yaml" "$work/chart-all.yaml" "$work/chart-no-metrics.yaml" \
    "$here"/deploy/examples/*.yaml "$here"/tests/storage-e2e/manifests/*.yaml

# One source of truth: the chart with the values matching each kustomize
# tree renders its objects (both log JSON by default).
same() { # what, chart values..., --, kustomize renders...
    local what=$1 args=() renders=()
    shift
    while [ "$1" != -- ]; do args+=("$1"); shift; done
    shift
    for r in "$@"; do renders+=("$work/$r"); done
    chart "${args[@]}" >"$work/chart-$what.yaml"
    "$python" "$here/scripts/chart-matches-deploy.py" "$what" "$work/chart-$what.yaml" "${renders[@]}"
}
same deploy -- deploy.yaml
same snapshot --set snapshot.enabled=true -- deploy.yaml snapshot.yaml
same groupsnapshot --set groupSnapshot.enabled=true -- groupsnapshot.yaml
same k0s --set kubeletDir=/var/lib/k0s/kubelet -- k0s.yaml
same microk8s --set kubeletDir=/var/snap/microk8s/common/var/lib/kubelet -- microk8s.yaml

# The agent token survives `helm upgrade`: the chart rendered by Helm's engine
# with a fake API server behind `lookup` (scripts/chart-upgrade), and so do
# installed StorageClasses their immutable fields.
(cd "$here/scripts/chart-upgrade" && go run . "$chart")

# Any kubelet directory: renders for another one never name the default (as
# a whole path: microk8s's directory ends in /var/lib/kubelet).
for r in k0s.yaml microk8s.yaml chart-all.yaml chart-k0s.yaml chart-microk8s.yaml; do
    if grep -nE '(^|[^[:alnum:]_./-])/var/lib/kubelet' "$work/$r"; then
        echo "FAIL $r: names /var/lib/kubelet although it was rendered for another kubelet directory" >&2
        exit 1
    fi
done
echo "kubelet directory: the k0s and microk8s renders (kustomize and chart) never name /var/lib/kubelet"

# The gate: on csi-snapshotter in deploy/groupsnapshot/ (and so in the e2e
# overlay built on it) and the chart with groupSnapshot.enabled, nowhere in
# deploy/ or the chart's defaults.
"$python" - "$work" <<'EOF'
import sys, yaml
gate = "--feature-gates=CSIVolumeGroupSnapshot=true"
def gated(path):
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"] == "loam-controller":
            return {c["name"] for c in doc["spec"]["template"]["spec"]["containers"] if gate in c.get("args", [])}
    sys.exit(f"FAIL {path}: no loam-controller Deployment")
want = {"deploy.yaml": set(), "groupsnapshot.yaml": {"csi-snapshotter"}, "e2e-overlay.yaml": {"csi-snapshotter"},
        "chart-default.yaml": set(), "chart-all.yaml": {"csi-snapshotter"}}
for name, containers in want.items():
    got = gated(f"{sys.argv[1]}/{name}")
    if got != containers:
        sys.exit(f"FAIL {name}: {gate} on {sorted(got)}, want {sorted(containers)}")
print(f"{gate}: on csi-snapshotter in deploy/groupsnapshot/, the e2e overlay and the chart with groupSnapshot.enabled,"
      " off in deploy/ and the chart's defaults")
EOF

# The controller runs without root and the node agents' sidecars without
# capabilities in every render, and the check catches each way of breaking
# that (scripts/pod-security.py says why each setting is needed).
"$python" "$here/scripts/pod-security.py" "$work/deploy.yaml" "$work/groupsnapshot.yaml" \
    "$work/e2e-overlay.yaml" "$work/k0s.yaml" "$work/microk8s.yaml" \
    "$work/chart-default.yaml" "$work/chart-all.yaml" "$work/chart-no-metrics.yaml"
# loosened FILE EDIT...: each EDIT (a sed expression) of deploy/base/FILE
# alone must fail the check.
loosened() {
    local file=$1 edit out
    shift
    for edit in "$@"; do
        sed -e "$edit" "$here/deploy/base/$file" >"$work/insecure.yaml"
        if cmp -s "$work/insecure.yaml" "$here/deploy/base/$file"; then
            echo "FAIL: '$edit' changes nothing in deploy/base/$file; update this list" >&2
            exit 1
        fi
        if out=$("$python" "$here/scripts/pod-security.py" "$work/insecure.yaml"); then
            echo "FAIL: $file with '$edit' passed the check" >&2
            exit 1
        fi
        echo "refused '$edit': $(grep -m1 '^FAIL ' <<<"$out" | sed 's/^FAIL [^:]*: //')"
    done
    echo "strict: each of the $# copies of $file with one setting loosened fails"
}
loosened controller.yaml \
    's/runAsNonRoot: true/runAsNonRoot: false/' \
    's/runAsUser: 65532/runAsUser: 0/' \
    '/fsGroup: 65532/d' \
    's/type: RuntimeDefault/type: Unconfined/' \
    's/allowPrivilegeEscalation: false/allowPrivilegeEscalation: true/' \
    's/readOnlyRootFilesystem: true/readOnlyRootFilesystem: false/' \
    's/drop: \["ALL"\]/drop: ["NET_RAW"]/' \
    's/^\( *\)securityContext: &restricted$/&\n\1  runAsUser: 1000/' \
    's/defaultMode: 0440/defaultMode: 0400/'
loosened node.yaml \
    's/allowPrivilegeEscalation: false/allowPrivilegeEscalation: true/' \
    's/readOnlyRootFilesystem: true/readOnlyRootFilesystem: false/' \
    's/drop: \["ALL"\]/drop: ["NET_RAW"]/' \
    's/type: RuntimeDefault/type: Unconfined/' \
    's/securityContext: \*sidecar/securityContext: {}/' \
    's/^\( *\)securityContext: &sidecar$/&\n\1  runAsNonRoot: true/' 

# Strictness: each broken copy has one misspelled or unknown field in one
# object of the CRD kinds, or a StorageClass csi-provisioner refuses; every
# one of them must be reported.
sed -e 's/^deletionPolicy:/deletionPolicyy:/' "$work/groupsnapshot.yaml" >"$work/broken-class.yaml"
sed -e 's/volumeGroupSnapshotClassName:/volumeGroupSnapshotClass:/' \
    "$here/deploy/examples/group-snapshot.yaml" >"$work/broken-group.yaml"
sed -e 's/matchLabels:/matchLabel:/' "$here/deploy/examples/group-snapshot.yaml" >"$work/broken-selector.yaml"
sed -e 's/volumeSnapshotClassName:/volumeSnapshotClass:/' \
    "$here/deploy/examples/snapshot-restore.yaml" >"$work/broken-snapshot.yaml"
# Not a schema error but one csi-provisioner refuses: Loam's older fsType key.
sed -e 's|csi.storage.k8s.io/fstype:|fsType:|' "$here/deploy/base/storageclasses.yaml" >"$work/broken-fstype.yaml"
broken=("$work"/broken-*.yaml)
if out=$("$python" "$here/scripts/validate-manifests.py" "$version" "${broken[@]}"); then
    echo "FAIL: the broken copies validated:" >&2
    echo "$out" >&2
    exit 1
fi
reported=$(grep -c '^FAIL ' <<<"$out" || true)
if [ "$reported" != "${#broken[@]}" ]; then
    echo "FAIL: ${#broken[@]} broken copies, $reported reported:" >&2
    echo "$out" >&2
    exit 1
fi
echo "strict: each of the ${#broken[@]} copies with a misspelled field fails"

# The chart's values are strict too: a misspelled key, a relative kubelet
# directory, an unknown log format and a PodMonitor without metrics must each
# fail the render with a message, not be ignored.
bad_values=(
    "--set kubeletdir=/var/lib/k0s/kubelet"
    "--set kubeletDir=var/lib/kubelet"
    "--set logFormat=yaml"
    "--set metrics.enabled=false,metrics.podMonitor.enabled=true"
    "--set storageClasses[0].name=loam,storageClasses[0].parameters.backend=zfs"
)
for bad in "${bad_values[@]}"; do
    # shellcheck disable=SC2086 # each entry is a flag and its value
    if out=$(chart $bad 2>&1); then
        echo "FAIL: the chart rendered with $bad" >&2
        exit 1
    fi
    echo "refused $bad: $(grep -m1 -E '^- at |execution error' <<<"$out")"
done
echo "strict: each of the ${#bad_values[@]} renders with a bad value fails"
