#!/usr/bin/env bash
# Runs csi-sanity against `loam serve` on a throw-away root, inside a private
# mount namespace so no mount can outlive the run.
#
#   scripts/sanity.sh [extra csi-sanity flags...]
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
server=""
device=""

cleanup() {
    if [ -n "$server" ]; then
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    # Deepest first; the namespace dies with us anyway, this keeps rm safe.
    awk -v w="$work" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    # A loop device outlives the namespace: always detach it.
    [ -n "$device" ] && losetup -d "$device" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

quota=auto
case "${SANITY_ROOT_FS:-}" in
"") ;;
btrfs)
    truncate -s 1G "$work/root.img"
    mkfs.btrfs -q -f "$work/root.img"
    device=$(losetup --find --show "$work/root.img")
    mkdir "$work/root"
    mount -t btrfs "$device" "$work/root"
    quota=required
    ;;
*) echo "SANITY_ROOT_FS=$SANITY_ROOT_FS: only btrfs is supported" >&2; exit 2 ;;
esac

"$loam" serve --endpoint "unix://$work/csi.sock" --node-id sanity-node \
    --root "$work/root" --max-volumes-per-node 10 --quota "$quota" 2>"$work/loam.log" &
server=$!
for _ in $(seq 100); do
    [ -S "$work/csi.sock" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$work/loam.log"; exit 1; }
    sleep 0.05
done

params=()
[ -n "${SANITY_PARAMS:-}" ] && params=(--csi.testvolumeparameters "$SANITY_PARAMS")

status=0
"$sanity" --csi.endpoint "unix://$work/csi.sock" \
    --csi.stagingdir "$work/staging" --csi.mountdir "$work/mount" \
    --csi.testvolumesize $((16 << 20)) --csi.testvolumeexpandsize $((32 << 20)) \
    --csi.testnodevolumeattachlimit \
    "${params[@]}" "$@" || status=$?
if [ "$status" != 0 ]; then
    echo "--- loam log (last 60 lines) ---"
    tail -n 60 "$work/loam.log"
fi
exit "$status"
