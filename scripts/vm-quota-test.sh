#!/usr/bin/env bash
# Runs the quota tests (tests/quota.rs) on XFS and ext4 inside a VM: the host
# kernel lacks XFS quota and QFMT_V2, so a stock Debian kernel boots under
# qemu (software emulation; KVM is not needed), shares the host root
# read-only over 9p, chroots into it and runs the same test binary there,
# once per filesystem. Needs root; installs what is missing.
#
#   scripts/vm-quota-test.sh [FS...]     (default: xfs ext4)
#
# Env: VM_TIMEOUT (seconds, default 600).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
filesystems=("${@:-xfs}")
[ $# -gt 0 ] || filesystems=(xfs ext4)

. scripts/vm-common.sh
vm_prepare mkfs.xfs:xfsprogs mkfs.ext4:e2fsprogs losetup:mount

# The artifact of the `quota` test target itself: cargo also reports the
# binaries it builds for integration tests, in no promised order.
bin=$(cargo test --locked -p loam --test quota --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    target = msg.get("target", {})
    if msg.get("reason") == "compiler-artifact" and target.get("name") == "quota" and "test" in target.get("kind", []):
        print(msg["executable"])
')
[ -x "$bin" ] || { echo "could not build the quota test binary" >&2; exit 1; }

work=$(mktemp -d /tmp/loam-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT

# The guest's part of /init: carry the test binary into the guest and run it
# once per filesystem.
vm_initrd "$work" "$(cat <<PART
# The tmpfs hides the host's /tmp, where the test binary may live (a clone
# in /tmp): carry the binary across it.
cp /mnt$bin /quota-test
mount -t tmpfs -o size=900m tmpfs /mnt/tmp
cp /quota-test /mnt/tmp/quota-test
status=0
chroot /mnt /bin/sh -c 'modprobe -a xfs ext4 loop quota_v2' || status=\$?
for fs in ${filesystems[*]}; do
    [ \$status = 0 ] || break
    echo "==> quota tests on \$fs"
    chroot /mnt /usr/bin/env LOAM_QUOTA_FS=\$fs LOAM_PRIVILEGED_TESTS=1 TMPDIR=/tmp \
        /tmp/quota-test --include-ignored --test-threads=1 --nocapture || status=\$?
done
echo "LOAM-VM-RESULT=\$status"
PART
)"
vm_qemu_args "$work/initrd.gz"

start=$(date +%s)
timeout "${VM_TIMEOUT:-600}" qemu-system-x86_64 "${vm_args[@]}" -nographic </dev/null | tee "$work/console.log" || true
echo "VM (kernel $vm_version) finished in $(($(date +%s) - start)) s"
grep -q '^LOAM-VM-RESULT=0' "$work/console.log" || { echo "quota tests failed in the VM" >&2; exit 1; }
