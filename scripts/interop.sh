#!/usr/bin/env bash
# Drives a live `loam serve` with grpc C-core, the gRPC of Python, C++, Ruby and
# PHP (here through Python's grpcio), over unix:///path. C-core names the socket
# in :authority percent-encoded, which the HTTP/2 layer under tonic refuses by
# itself (hyperium/h2#487); Loam must answer anyway (src/server/authority.rs).
#
# Installs grpcio and grpcio-tools (pinned) into target/interop-venv if missing
# and generates the CSI stubs from proto/csi.proto into target/interop-stubs.
# Needs no root: the calls made touch no mount.
#
# Env: LOAM_BIN (default target/debug/loam).
set -euo pipefail

GRPCIO_VERSION=1.85.3
GRPCIO_TOOLS_VERSION=1.85.1

here=$(cd "$(dirname "$0")/.." && pwd)
loam=${LOAM_BIN:-$here/target/debug/loam}
venv=$here/target/interop-venv
stubs=$here/target/interop-stubs
work=$(mktemp -d /tmp/loam-interop.XXXXXX)
server=""

cleanup() {
    if [ -n "$server" ]; then
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

if ! "$venv/bin/python" -c "import grpc, grpc_tools; assert grpc.__version__ == '$GRPCIO_VERSION'" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "grpcio==$GRPCIO_VERSION" "grpcio-tools==$GRPCIO_TOOLS_VERSION"
fi
mkdir -p "$stubs"
"$venv/bin/python" -m grpc_tools.protoc -I"$here/proto" --python_out="$stubs" --grpc_python_out="$stubs" \
    "$here/proto/csi.proto"

socket=$work/csi.sock
"$loam" serve --endpoint "unix://$socket" --node-id interop-node --root "$work/root" 2>"$work/loam.log" &
server=$!
for _ in $(seq 100); do
    [ -S "$socket" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$work/loam.log"; exit 1; }
    sleep 0.05
done
[ -S "$socket" ] || { echo "loam did not create $socket"; cat "$work/loam.log"; exit 1; }

PYTHONPATH=$stubs "$venv/bin/python" "$here/scripts/interop/c_core_client.py" "unix://$socket" ||
    { cat "$work/loam.log"; exit 1; }
