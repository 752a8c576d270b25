#!/usr/bin/env bash
# Runs every test Loam has, on a fresh machine too: installs what is missing
# (Debian packages, rustfmt/clippy, csi-sanity), then fmt, clippy, the Rust
# tests (privileged ones in a private mount namespace), csi-sanity on a plain
# and on a btrfs root, the quota tests on XFS and ext4 in a VM, power cuts of a
# VM running Loam (acknowledged records survive whole), and a smoke run
# of the benchmark harness (its numbers are never judged here).
# Needs root (mounts); run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

CSI_SANITY_VERSION=v5.4.0
KUSTOMIZE_VERSION=v5.8.2 # v5.8.3 needs Go 1.27
. tests/e2e/versions.sh # HELM_VERSION, which the kind run's Helm step shares
KUBERNETES_VALIDATE_VERSION=1.37.0 # bundles the schemas of Kubernetes 1.37.0
step() { printf '\n==> %s\n' "$*"; }

# Everything is also kept in a log, so the run can end with one line that
# totals every test runner's count.
log=$(mktemp /tmp/loam-test.XXXXXX.log)
loop_params=$(mktemp /tmp/loam-loop-params.XXXXXX.yaml)
loop_mutable=$(mktemp /tmp/loam-loop-mutable.XXXXXX.yaml)
trap 'rm -f "$log" "$loop_params" "$loop_mutable"' EXIT
exec > >(tee "$log") 2>&1

step "installing what is missing"
missing=()
for tool in unshare:util-linux mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
sanity="$(go env GOPATH)/bin/csi-sanity"
if [ ! -x "$sanity" ]; then
    go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@${CSI_SANITY_VERSION}"
fi
kustomize="$(go env GOPATH)/bin/kustomize"
if ! "$kustomize" version 2>/dev/null | grep -qx "$KUSTOMIZE_VERSION"; then
    go install "sigs.k8s.io/kustomize/kustomize/v5@${KUSTOMIZE_VERSION}"
fi
# helm built from the Go module proxy; `go version -m` reads the module
# version the binary was built from (helm's own --version needs release ldflags).
helm="$(go env GOPATH)/bin/helm"
if [ "$(go version -m "$helm" 2>/dev/null | awk '$1 == "mod" { print $3 }')" != "$HELM_VERSION" ]; then
    go install "helm.sh/helm/v4/cmd/helm@${HELM_VERSION}"
fi
venv=target/validate-venv
if ! "$venv/bin/python" -c "import kubernetes_validate" 2>/dev/null ||
    [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
fi

step "deploy/ and charts/loam: render with kustomize and helm, validate offline against Kubernetes ${KUBERNETES_VALIDATE_VERSION}, compare"
KUSTOMIZE="$kustomize" HELM="$helm" PYTHON="$venv/bin/python" K8S_VERSION="$KUBERNETES_VALIDATE_VERSION" \
    scripts/manifests.sh

step "docs: every relative link and anchor in README.md and docs/ resolves"
python3 scripts/doclinks.py

step "alert rules: parse as promtool parses them and name only the metrics docs/metrics.md documents"
grep -o '`loam_[a-z_]*`' docs/metrics.md | tr -d '`' | sort -u >target/metric-names.txt
(cd scripts/rulecheck && go build -o ../../target/rulecheck .)
target/rulecheck -metrics target/metric-names.txt deploy/monitoring/*.rules.yaml

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "cargo test (privileged, in a private mount namespace)"
LOAM_PRIVILEGED_TESTS=1 unshare --mount --propagation private -- cargo test --locked --workspace -- --include-ignored

step "crash-point harness (the driver killed at fault points and at random, seed 12, 200 kill points; 24 copies between two agents, either killed; 12 snapshots kept off node, either node killed; 10 group snapshots across two agents, either killed)"
LOAM_PRIVILEGED_TESTS=1 unshare --mount --propagation private -- \
    cargo test --locked -p loam --features failpoints --test crash -- --include-ignored --nocapture

step "upgrade in place: the previous Loam's volumes, mounts and data under this tree's Loam"
cargo build --locked
scripts/upgrade-test.sh

step "csi-sanity: dir backend"
CSI_SANITY="$sanity" scripts/sanity.sh

step "grpc C-core (Python grpcio) against loam serve on its Unix socket"
scripts/interop.sh

step "csi-sanity: dir backend on btrfs with enforced quotas"
CSI_SANITY="$sanity" SANITY_ROOT_FS=btrfs scripts/sanity.sh

step "quota tests on XFS and ext4, in a VM (about 40 s under software emulation)"
scripts/vm-quota-test.sh

step "power cuts of a VM running Loam: acknowledged records survive whole (about 2 min under software emulation)"
scripts/vm-powerloss-test.sh

# Thin volumes, so the ModifyVolume specs really change them (thin -> thick,
# allocated at once); the specs that create with the mutable parameters
# cover thick creation.
printf 'backend: loop\nprovisioning: thin\n' >"$loop_params"
printf 'provisioning: thick\n' >"$loop_mutable"
modify=(--csi.testvolumemutableparameters "$loop_mutable")
step "csi-sanity: loop backend, filesystem volumes"
CSI_SANITY="$sanity" SANITY_PARAMS="$loop_params" scripts/sanity.sh --csi.testvolumeaccesstype=mount "${modify[@]}"
step "csi-sanity: loop backend, raw block volumes"
CSI_SANITY="$sanity" SANITY_PARAMS="$loop_params" scripts/sanity.sh --csi.testvolumeaccesstype=block "${modify[@]}"

step "csi-sanity: split (controller routing to two node agents)"
SANITY_MODE=split CSI_SANITY="$sanity" scripts/sanity.sh
step "csi-sanity: split, loop backend, raw block volumes"
SANITY_MODE=split CSI_SANITY="$sanity" SANITY_PARAMS="$loop_params" scripts/sanity.sh --csi.testvolumeaccesstype=block \
    "${modify[@]}"

step "benchmark harness smoke run: Loam only, a few operations (numbers are not judged)"
BENCH_PEER=none bash bench/run.sh --smoke

# cargo test (host and VM), csi-sanity and the C-core client, summed; csi-sanity's summary line
# is coloured, so colours are stripped first. A csi-sanity run that
# scripts/sanity.sh ran again (its failures were all csi-test's own connect
# race) counts once, as its second run.
sed 's/\x1b\[[0-9;]*m//g' "$log" | awk '
    /^test result: / { p += $4; f += $6; s += $8 }
    /^(SUCCESS|FAIL)! -- / { p += $3; f += $6; s += $12; lp = $3; lf = $6; ls = $12 }
    /^csi-sanity: every failure was its own connect race/ { p -= lp; f -= lf; s -= ls }
    /^interop: [0-9]+ passed, [0-9]+ failed$/ { p += $2; f += $4 }
    END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }'
