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

missing=()
for tool in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio modprobe:kmod \
    mkfs.xfs:xfsprogs mkfs.ext4:e2fsprogs losetup:mount; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
ls /boot/vmlinuz-* >/dev/null 2>&1 || missing+=(linux-image-amd64)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
# The newest installed Debian kernel; never a hard-coded version.
kernel=$(ls /boot/vmlinuz-* | sort -V | tail -n 1)
version=${kernel#/boot/vmlinuz-}

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

# A busybox initramfs that only mounts the host root over 9p; the guest's
# other modules (xfs, ext4, loop, quota_v2) come from that root's /lib/modules.
initrd=$work/initrd
mkdir -p "$initrd"/{bin,dev,proc,sys,mnt}
cp "$(command -v busybox)" "$initrd/bin/busybox"
modprobe -a -S "$version" --show-depends virtio_pci 9pnet_virtio 9p | awk '$1 == "insmod" {print $2}' |
    awk '!seen[$0]++' >"$initrd/modules"
while read -r module; do
    mkdir -p "$initrd$(dirname "$module")"
    cp "$module" "$initrd$module"
done <"$initrd/modules"
cat >"$initrd/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in \$(cat /modules); do insmod \$m; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro host /mnt
mount -t proc proc /mnt/proc
mount -t sysfs sysfs /mnt/sys
mount -t devtmpfs devtmpfs /mnt/dev
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
poweroff -f
INIT
chmod +x "$initrd/init"
(cd "$initrd" && find . | cpio -o -H newc --quiet) | gzip -1 >"$work/initrd.gz"

start=$(date +%s)
timeout "${VM_TIMEOUT:-600}" qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m 1024 \
    -nographic -no-reboot -kernel "$kernel" -initrd "$work/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet" \
    -virtfs local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap \
    </dev/null | tee "$work/console.log" || true
echo "VM (kernel $version) finished in $(($(date +%s) - start)) s"
grep -q '^LOAM-VM-RESULT=0' "$work/console.log" || { echo "quota tests failed in the VM" >&2; exit 1; }
