#!/usr/bin/env bash
# Checks run_loops (loops.sh), as root: of loop devices attached to a file
# under a run directory, to a file of "another Loam" elsewhere (a path with
# loam in it) and to one of the run's devices (as the kubelet does for a block
# volume), it names the run's two and not the other. Detaches what it attached
# and removes its files, also when it fails.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/loops.sh"
tmp=$(mktemp -d /var/tmp/loops-test.XXXXXX)
attached=()
cleanup() {
    local i
    for ((i = ${#attached[@]} - 1; i >= 0; i--)); do losetup -d "${attached[$i]}"; done
    rm -rf "$tmp"
}
trap cleanup EXIT
mkdir -p "$tmp/run/volumes" "$tmp/other-loam/volumes"
truncate -s 8M "$tmp/run/volumes/a.img" "$tmp/other-loam/volumes/b.img"
# attach FILE: attaches FILE to a free loop device, named in $dev.
attach() { dev=$(losetup --find --show "$1"); attached+=("$dev"); }
attach "$tmp/run/volumes/a.img"
mine=$dev
attach "$tmp/other-loam/volumes/b.img"
other=$dev
attach "$mine"
ref=$dev
got=$(run_loops "$tmp/run" | sort | tr '\n' ' ')
want=$(printf '%s\n' "$mine" "$ref" | sort | tr '\n' ' ')
if [ "$got" = "$want" ]; then
    echo "ok - run_loops names the run's device and the reference to it ($got), not $other"
    echo "1 passed, 0 failed"
else
    echo "FAIL - run_loops named '$got', want '$want' (another Loam's device: $other)"
    echo "0 passed, 1 failed"
    exit 1
fi
