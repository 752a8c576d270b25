#!/usr/bin/env bash
# Runs csi-sanity against `loam serve` on throw-away roots, inside a private
# mount namespace so no mount can outlive the run.
#
#   scripts/sanity.sh [extra csi-sanity flags...]
#
# SANITY_MODE=all (the default) runs one `--mode all` process. SANITY_MODE=split
# runs the Kubernetes layout: two `--mode node` agents (node ids sanity-node and
# sanity-small, separate roots, one token generated for this run) and a
# `--mode controller` routing to them with static --agents; csi-sanity drives
# the controller's socket and sanity-node's. It creates volumes without
# topology, so they go to the agent with the most free space: sanity-small's
# root is an 8 MiB tmpfs, too small for csi-sanity's 16 MiB volumes.
#
# Env: LOAM_BIN (default target/debug/loam), CSI_SANITY (default: from GOPATH),
#      SANITY_PARAMS (a parameters YAML file for every CreateVolume),
#      SANITY_ROOT_FS=btrfs (the root is a fresh btrfs on a loop device, and
#      loam runs with --quota required, so every volume is a limited subvolume).
set -euo pipefail

if [ "${LOAM_SANITY_IN_NS:-}" != 1 ]; then
    exec env LOAM_SANITY_IN_NS=1 unshare --mount --propagation private -- "$0" "$@"
fi

here=$(cd "$(dirname "$0")/.." && pwd)
loam=${LOAM_BIN:-$here/target/debug/loam}
sanity=${CSI_SANITY:-$(go env GOPATH)/bin/csi-sanity}
work=$(mktemp -d /tmp/loam-sanity.XXXXXX)
mode=${SANITY_MODE:-all}
servers=()
device=""

cleanup() {
    for pid in "${servers[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    # Deepest first; the namespace dies with us anyway, this keeps rm safe.
    awk -v w="$work" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    # A loop device outlives the namespace: always detach it.
    [ -n "$device" ] && losetup -d "$device" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# start NAME SOCKET [loam serve flags...]: starts a server, waits for its socket.
start() {
    local name=$1 socket=$2
    shift 2
    "$loam" serve --endpoint "unix://$socket" "$@" 2>"$work/$name.log" &
    servers+=($!)
    for _ in $(seq 100); do
        [ -S "$socket" ] && return 0
        kill -0 "${servers[-1]}" 2>/dev/null || { cat "$work/$name.log"; exit 1; }
        sleep 0.05
    done
    echo "$name did not create $socket"; cat "$work/$name.log"; exit 1
}

quota=auto
case "${SANITY_ROOT_FS:-}" in
"") ;;
btrfs)
    # Sparse, so the size costs nothing. Deleted volumes leave GetCapacity's
    # promises only at the next 10 s refresh, and the whole run takes ~3 s:
    # every volume it makes (91 specs now that ModifyVolume runs) must fit.
    truncate -s 2G "$work/root.img"
    mkfs.btrfs -q -f "$work/root.img"
    device=$(losetup --find --show "$work/root.img")
    mkdir "$work/root"
    mount -t btrfs "$device" "$work/root"
    quota=required
    ;;
*) echo "SANITY_ROOT_FS=$SANITY_ROOT_FS: only btrfs is supported" >&2; exit 2 ;;
esac

case "$mode" in
all)
    start loam "$work/csi.sock" --node-id sanity-node --root "$work/root" --max-volumes-per-node 10 --quota "$quota"
    endpoints=(--csi.endpoint "unix://$work/csi.sock")
    ;;
split)
    (umask 077 && head -c 32 /dev/urandom | base64 >"$work/token")
    mkdir -p "$work/small"
    mount -t tmpfs -o size=8m loam-sanity-small "$work/small"
    agents=()
    for agent in sanity-node:"$work/root" sanity-small:"$work/small/root"; do
        node=${agent%%:*}
        start "$node" "$work/$node.sock" --mode node --node-id "$node" --root "${agent#*:}" --quota "$quota" \
            --max-volumes-per-node 10 --agent-listen 127.0.0.1:0 --agent-token-file "$work/token"
        agents+=("$(grep -o 'agent endpoint listening addr=[0-9.:]*' "$work/$node.log" | cut -d= -f2)")
    done
    start controller "$work/controller.sock" --mode controller \
        --agents "$(IFS=,; echo "${agents[*]}")" --agent-token-file "$work/token"
    endpoints=(--csi.endpoint "unix://$work/sanity-node.sock"
        --csi.controllerendpoint "unix://$work/controller.sock")
    ;;
*) echo "SANITY_MODE must be all or split, not $mode"; exit 2 ;;
esac

params=()
[ -n "${SANITY_PARAMS:-}" ] && params=(--csi.testvolumeparameters "$SANITY_PARAMS")

run_sanity() {
    "$sanity" "${endpoints[@]}" \
        --csi.stagingdir "$work/staging" --csi.mountdir "$work/mount" \
        --csi.testvolumesize $((16 << 20)) --csi.testvolumeexpandsize $((32 << 20)) \
        --csi.testnodevolumeattachlimit \
        "${params[@]}" "$@" 2>&1 | tee "$work/sanity.out"
    return "${PIPESTATUS[0]}"
}
# Whether every failure of the run was csi-test's own connect race: its
# utils.Connect waits for the channel's state to change from the one it reads,
# so a connection that became ready before it read it is waited on for 60 s
# and reported as "Connection timed out" (kubernetes-csi/csi-test#97). Such a
# failure says nothing about the driver, which then answers the next spec.
only_connect_races() {
    local text failed timeouts
    text=$(sed 's/\x1b\[[0-9;]*m//g' "$1")
    failed=$(grep -o '| [0-9]* Failed' <<<"$text" | grep -o '[0-9]*' | tail -1)
    timeouts=$(grep -c 's: "Connection timed out"' <<<"$text" || true)
    [ -n "$failed" ] && [ "$failed" -gt 0 ] && [ "$failed" = "$timeouts" ]
}
status=0
run_sanity "$@" || status=$?
if [ "$status" != 0 ] && only_connect_races "$work/sanity.out"; then
    echo "csi-sanity: every failure was its own connect race (Connection timed out); running it once more"
    status=0
    run_sanity "$@" || status=$?
fi
if [ "$status" != 0 ]; then
    for log in "$work"/*.log; do
        echo "--- $(basename "$log") (last 60 lines) ---"
        tail -n 60 "$log"
    done
fi
exit "$status"
