#!/usr/bin/env bash
# Renders deploy/ with kustomize and validates every object offline and
# strictly: deploy/, deploy/snapshot/ and deploy/examples/.
#
# Env: KUSTOMIZE (default: from GOPATH), PYTHON (one with kubernetes-validate),
#      K8S_VERSION (the Kubernetes release whose schemas to use).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
kustomize=${KUSTOMIZE:-$(go env GOPATH)/bin/kustomize}
python=${PYTHON:-python3}
work=$(mktemp -d /tmp/loam-manifests.XXXXXX)
trap 'rm -rf "$work"' EXIT

"$kustomize" build "$here/deploy" >"$work/deploy.yaml"
"$kustomize" build "$here/deploy/snapshot" >"$work/snapshot.yaml"
"$python" "$here/scripts/validate-manifests.py" "${K8S_VERSION:-1.37.0}" \
    "$work/deploy.yaml" "$work/snapshot.yaml" "$here"/deploy/examples/*.yaml
