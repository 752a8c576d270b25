#!/usr/bin/env bash
# Upgrades a node in place: the previous Loam (UPGRADE_FROM, a git revision of
# this repository, built from its own history) makes volumes of every kind on
# a root, stages and publishes some and writes data; it is stopped and this
# tree's Loam starts on the same root. Everything must be there (volumes,
# snapshots, the group, data at the published targets, the mounts still
# live), and stay usable through stats, unpublish, unstage and delete, with no
# mount or loop device left. Runs in a private mount namespace, as root.
#
#   scripts/upgrade-test.sh
#
# Env: UPGRADE_FROM (default below: the last revision before records carried a
#      schema version; move it to each release once releases are tagged),
#      LOAM_BIN (the new binary; default target/debug/loam, built if missing).
# The old binary is cached under target/upgrade-from/.
set -euo pipefail

if [ "${LOAM_UPGRADE_IN_NS:-}" != 1 ]; then
    exec env LOAM_UPGRADE_IN_NS=1 unshare --mount --propagation private -- "$0" "$@"
fi

here=$(cd "$(dirname "$0")/.." && pwd)
from=${UPGRADE_FROM:-1418e8e}
new=${LOAM_BIN:-$here/target/debug/loam}
cache=$here/target/upgrade-from
work=$(mktemp -d /tmp/loam-upgrade.XXXXXX)
server=""

cleanup() {
    if [ -n "$server" ]; then
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    awk -v w="$work" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    # Loop devices outlive the namespace: detach the ones backed by this run's images.
    losetup --list --noheadings --output NAME,BACK-FILE 2>/dev/null | awk -v w="$work" 'index($2, w) == 1 {print $1}' |
        while read -r d; do losetup -d "$d" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; [ -f "$work/serve.log" ] && tail -20 "$work/serve.log" >&2; exit 1; }

# The old binary, built once per revision from this repository's history.
revision=$(git -C "$here" rev-parse --verify --quiet "$from^{commit}") ||
    fail "revision $from is not in this clone's history (a shallow clone?); fetch it or set UPGRADE_FROM"
old=$cache/loam-${revision:0:12}
if [ ! -x "$old" ]; then
    echo "building the old Loam at ${revision:0:12} (cached in $cache)"
    rm -rf "$cache/src" && mkdir -p "$cache/src"
    git -C "$here" archive "$revision" | tar -x -C "$cache/src"
    LOAM_GIT_REVISION=${revision:0:12} CARGO_TARGET_DIR=$cache/target \
        cargo build --quiet --locked --bin loam --manifest-path "$cache/src/Cargo.toml"
    cp "$cache/target/debug/loam" "$old"
    rm -rf "$cache/src"
fi
[ -x "$new" ] || cargo build --quiet --locked --bin loam --manifest-path "$here/Cargo.toml"

root=$work/root
socket=$work/csi.sock
ctl() { "$new" ctl --endpoint "unix://$socket" "$@"; }
json() { "$new" ctl --endpoint "unix://$socket" --json "$@"; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
serve() {
    "$1" serve --mode all --node-id upgrade-node --root "$root" --endpoint "unix://$socket" 2>>"$work/serve.log" &
    server=$!
    for _ in $(seq 200); do
        [ -S "$socket" ] && ctl probe >/dev/null 2>&1 && return 0
        kill -0 "$server" 2>/dev/null || fail "$1 did not start"
        sleep 0.05
    done
    fail "$1 did not serve $socket"
}
stop() {
    kill -TERM "$server"
    wait "$server" || fail "the server did not stop cleanly"
    server=""
}

echo "== the old Loam ($("$old" --version)) makes volumes of every kind"
serve "$old"
create() { json create-volume "$@" | field 'd["volume"]["volume_id"]'; }
dir=$(create dir-vol --size 64Mi)
ext4=$(create ext4-thick --size 64Mi --param backend=loop --param mkfsOptions="-m 1")
xfs=$(create xfs-thin --size 320Mi --param backend=loop --param fsType=xfs --param provisioning=thin)
block=$(create raw-block --size 16Mi --param backend=loop --block)
snap=$(json create-snapshot dir-snap --source-volume-id "$dir" | field 'd["snapshot"]["snapshot_id"]')
restored=$(create dir-restored --size 64Mi --from-snapshot "$snap")
group=$(json create-group-snapshot grp --source-volume-id "$ext4" --source-volume-id "$xfs" |
    field 'd["group_snapshot"]["group_snapshot_id"]')
k=$work/kubelet
mkdir -p "$k"
for v in dir ext4 xfs; do
    id=${!v}
    ctl node-stage "$id" --staging-path "$k/$v-stage" >/dev/null
    ctl node-publish "$id" --staging-path "$k/$v-stage" --target-path "$k/$v-target" >/dev/null
    echo "written by the old Loam into $v" >"$k/$v-target/data"
    sync "$k/$v-target/data"
done
ctl node-stage "$block" --staging-path "$k/block-stage" --block >/dev/null
ctl node-publish "$block" --staging-path "$k/block-stage" --target-path "$k/block-target" --block >/dev/null
printf 'block data from the old Loam' | dd of="$k/block-target" conv=fsync status=none
volumes_before=$(json list-volumes | field 'sorted(e["volume"]["volume_id"] for e in d["entries"])')
stop

echo "== this tree's Loam ($("$new" --version)) starts on the same root"
serve "$new"
volumes_after=$(json list-volumes | field 'sorted(e["volume"]["volume_id"] for e in d["entries"])')
[ "$volumes_before" = "$volumes_after" ] || fail "volumes before $volumes_before, after $volumes_after"
[ "$(json list-snapshots | field 'len(d["entries"])')" = 3 ] || fail "the snapshot and the group's two members are not all listed"
json get-group-snapshot "$group" >/dev/null || fail "the group snapshot is gone"
for v in dir ext4 xfs; do
    id=${!v}
    grep -qx "written by the old Loam into $v" "$k/$v-target/data" || fail "$v: the data is not at the target"
    echo "and by the new one" >>"$k/$v-target/data"
    json node-stats "$id" --path "$k/$v-target" | field 'd["usage"]' >/dev/null || fail "$v: no stats"
    json get-volume "$id" | field 'd["status"]["volume_condition"]["abnormal"]' | grep -qx False ||
        fail "$v: reported abnormal after the upgrade"
done
[ "$(head -c 28 "$k/block-target")" = "block data from the old Loam" ] || fail "the block volume lost its data"
# The old Loam's stage is the new one's: staging again at the same path converges.
ctl node-stage "$ext4" --staging-path "$k/ext4-stage" >/dev/null || fail "restaging ext4 does not converge"
clone=$(create ext4-clone --size 64Mi --param backend=loop --param mkfsOptions="-m 1" --from-volume "$ext4") ||
    fail "cloning a volume the old Loam made"

echo "== and everything goes away cleanly"
for v in dir ext4 xfs; do
    ctl node-unpublish "${!v}" --target-path "$k/$v-target" >/dev/null
    ctl node-unstage "${!v}" --staging-path "$k/$v-stage" >/dev/null
done
ctl node-unpublish "$block" --target-path "$k/block-target" >/dev/null
ctl node-unstage "$block" --staging-path "$k/block-stage" >/dev/null
ctl delete-group-snapshot "$group" >/dev/null
ctl delete-volume "$restored" >/dev/null
ctl delete-snapshot "$snap" >/dev/null
for id in $dir $ext4 $xfs $block $clone; do ctl delete-volume "$id" >/dev/null; done
[ "$(json list-volumes | field 'len(d["entries"])')" = 0 ] || fail "volumes are left"
awk -v w="$k" '$5 ~ "^"w' /proc/self/mountinfo | grep -q . && fail "mounts are left under $k"
losetup --list --noheadings --output BACK-FILE | grep -q "^$work" && fail "loop devices are left"
stop
echo "upgrade from ${revision:0:12}: 6 volumes (one cloned after the upgrade), 3 snapshots and a group made, staged and published by the old Loam survived; ok"
