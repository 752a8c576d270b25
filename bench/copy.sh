#!/usr/bin/env bash
# Measures a copy of a volume between two nodes against plain `cp` of the same
# data on the host, the limit on one machine. Two node agents (node-a, node-b)
# and a routing controller run here on loopback, as in a cluster; a `loop`
# volume of COPY_SIZE (default 1Gi) filled with random data on node-a is
#
#   - cloned onto node-b (the source is cut first: a reflink where the root
#     can, a copy of the image where it cannot, as on ext4), and
#   - restored onto node-b from a snapshot (no cut: the transfer alone),
#
# each checked byte for byte against the source. Prints one line per
# measurement; numbers are MiB/s of the volume's data.
#
#   sudo bash bench/copy.sh            release build (the numbers to report)
#   sudo bash bench/copy.sh --smoke    debug build, 64 MiB (the harness works)
#
# Env: COPY_SIZE (a size such as 1Gi), COPY_ROOT (where the nodes' roots go;
# default a fresh directory under /var/tmp, on the host filesystem). Needs
# root; runs in a private mount namespace; stops what it started by PID and
# removes its directory, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release size=${COPY_SIZE:-1Gi}
if [ "${1:-}" = --smoke ]; then
    profile=debug size=${COPY_SIZE:-64Mi}
fi
if [ "${LOAM_COPY_BENCH_IN_NS:-}" != 1 ]; then
    if [ "$profile" = release ]; then
        cargo build --release --locked --bin loam
    else
        cargo build --locked --bin loam
    fi
    exec env LOAM_COPY_BENCH_IN_NS=1 unshare --mount --propagation private -- bash "$0" "$@"
fi

loam=$PWD/target/$profile/loam
work=$(mktemp -d "${COPY_ROOT:-/var/tmp}/loam-copy-bench.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/token"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
declare -A agent
for node in node-a node-b; do
    agent[$node]=127.0.0.1:$(port)
    mkdir -p "$work/$node"
    "$loam" serve --mode node --node-id "$node" --root "$work/$node/root" --endpoint "unix://$work/$node/csi.sock" \
        --agent-listen "${agent[$node]}" --agent-token-file "$work/token" >"$work/$node.log" 2>&1 &
    pids+=($!)
done
"$loam" serve --mode controller --endpoint "unix://$work/controller.sock" --agent-token-file "$work/token" \
    --agents "${agent[node-a]},${agent[node-b]}" >"$work/controller.log" 2>&1 &
pids+=($!)
ctl() { "$loam" ctl --endpoint "unix://$work/controller.sock" --timeout 600 --json "$@"; }
for _ in $(seq 100); do
    ctl get-capacity --node node-b >/dev/null 2>&1 && ctl get-capacity --node node-a >/dev/null 2>&1 && break
    sleep 0.2
done

# field A.B: that member of the JSON document on stdin.
field() {
    python3 -c 'import functools,json,sys; print(functools.reduce(lambda d, k: d[k], sys.argv[1].split("."), json.load(sys.stdin)))' "$1"
}
image() { echo "$work/$1/root/volumes/${2%@*}.img"; }
mib() { python3 -c "import sys; print(round(int(sys.argv[1]) / 1048576 / float(sys.argv[2]), 1))" "$1" "$2"; }
seconds() { python3 -c "import sys; print(round((int(sys.argv[2]) - int(sys.argv[1])) / 1e9, 2))" "$1" "$2"; }

params=(--param backend=loop --param provisioning=thick)
source=$(ctl create-volume source --size "$size" "${params[@]}" --node node-a | field volume.volume_id)
bytes=$(stat -c %s "$(image node-a "$source")")
# What a pod wrote: every byte of the image, incompressible.
head -c "$bytes" /dev/urandom | dd of="$(image node-a "$source")" bs=1M conv=notrunc,fsync status=none
echo "source: $bytes bytes of random data on node-a ($(df -T "$work" | awk 'NR == 2 { print $2 }') root, $profile build)"

start=$(date +%s%N)
cp "$(image node-a "$source")" "$work/plain-copy.img"
sync -f "$work/plain-copy.img"
end=$(date +%s%N)
t=$(seconds "$start" "$end")
echo "cp on the host (then sync):           $t s, $(mib "$bytes" "$t") MiB/s"
rm -f "$work/plain-copy.img"

start=$(date +%s%N)
clone=$(ctl create-volume clone --size "$size" "${params[@]}" --from-volume "$source" --node node-b | field volume.volume_id)
end=$(date +%s%N)
t=$(seconds "$start" "$end")
cmp "$(image node-a "$source")" "$(image node-b "$clone")"
echo "clone node-a -> node-b (cut + copy):  $t s, $(mib "$bytes" "$t") MiB/s, identical"

snapshot=$(ctl create-snapshot snap --source-volume-id "$source" | field snapshot.snapshot_id)
start=$(date +%s%N)
restored=$(ctl create-volume restored --size "$size" "${params[@]}" --from-snapshot "$snapshot" --node node-b | field volume.volume_id)
end=$(date +%s%N)
t=$(seconds "$start" "$end")
cmp "$(image node-a "$source")" "$(image node-b "$restored")"
echo "restore node-a -> node-b (copy only): $t s, $(mib "$bytes" "$t") MiB/s, identical"
