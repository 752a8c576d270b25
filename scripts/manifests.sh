#!/usr/bin/env bash
# Renders deploy/ with kustomize and validates every object offline and
# strictly: deploy/, deploy/snapshot/, deploy/groupsnapshot/, deploy/examples/
# and the e2e overlay (tests/e2e/overlay). Then checks that the group snapshot
# gate is on in deploy/groupsnapshot/ only, and that the validation is strict:
# copies with a misspelled field must fail.
#
# Env: KUSTOMIZE (default: from GOPATH), PYTHON (one with kubernetes-validate),
#      K8S_VERSION (the Kubernetes release whose schemas to use).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
kustomize=${KUSTOMIZE:-$(go env GOPATH)/bin/kustomize}
python=${PYTHON:-python3}
version=${K8S_VERSION:-1.37.0}
work=$(mktemp -d /tmp/loam-manifests.XXXXXX)
trap 'rm -rf "$work"' EXIT

"$kustomize" build "$here/deploy" >"$work/deploy.yaml"
"$kustomize" build "$here/deploy/snapshot" >"$work/snapshot.yaml"
"$kustomize" build "$here/deploy/groupsnapshot" >"$work/groupsnapshot.yaml"
"$kustomize" build "$here/tests/e2e/overlay" >"$work/e2e-overlay.yaml"
"$python" "$here/scripts/validate-manifests.py" "$version" \
    "$work/deploy.yaml" "$work/snapshot.yaml" "$work/groupsnapshot.yaml" "$work/e2e-overlay.yaml" \
    "$here"/deploy/examples/*.yaml

# The gate: on csi-snapshotter in deploy/groupsnapshot/ (and so in the e2e
# overlay built on it), nowhere in deploy/.
"$python" - "$work" <<'EOF'
import sys, yaml
gate = "--feature-gates=CSIVolumeGroupSnapshot=true"
def gated(path):
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"] == "loam-controller":
            return {c["name"] for c in doc["spec"]["template"]["spec"]["containers"] if gate in c.get("args", [])}
    sys.exit(f"FAIL {path}: no loam-controller Deployment")
want = {"deploy.yaml": set(), "groupsnapshot.yaml": {"csi-snapshotter"}, "e2e-overlay.yaml": {"csi-snapshotter"}}
for name, containers in want.items():
    got = gated(f"{sys.argv[1]}/{name}")
    if got != containers:
        sys.exit(f"FAIL {name}: {gate} on {sorted(got)}, want {sorted(containers)}")
print(f"{gate}: on csi-snapshotter in deploy/groupsnapshot/ and the e2e overlay, off in deploy/")
EOF

# Strictness: each broken copy has one misspelled or unknown field in one
# object of the CRD kinds; every one of them must be reported.
sed -e 's/^deletionPolicy:/deletionPolicyy:/' "$work/groupsnapshot.yaml" >"$work/broken-class.yaml"
sed -e 's/volumeGroupSnapshotClassName:/volumeGroupSnapshotClass:/' \
    "$here/deploy/examples/group-snapshot.yaml" >"$work/broken-group.yaml"
sed -e 's/matchLabels:/matchLabel:/' "$here/deploy/examples/group-snapshot.yaml" >"$work/broken-selector.yaml"
sed -e 's/volumeSnapshotClassName:/volumeSnapshotClass:/' \
    "$here/deploy/examples/snapshot-restore.yaml" >"$work/broken-snapshot.yaml"
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
