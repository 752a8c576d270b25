#!/usr/bin/env bash
# Cuts the power of a machine running Loam and checks that every acknowledged
# record survived whole. A VM (scripts/vm-common.sh) keeps Loam's root on an
# ext4 (or XFS) data disk; the real `loam serve` runs there under concurrent
# CreateVolume, CreateSnapshot, DeleteSnapshot and DeleteVolume calls (dir
# and thin loop volumes, so records are written in group-committed batches),
# and the host kills qemu with SIGKILL at a seeded random moment. The next
# boot, on the same disk, must find no torn or damaged record, start the
# driver, converge every call whose outcome the cut left unknown when retried,
# and list exactly the volumes and snapshots whose creation was acknowledged
# and whose deletion was not. The last boot deletes everything and checks
# that nothing is left. scripts/powerloss.py runs the boots and the checks on
# the host and starts the driver in the guest; bench/src/bin/powerloss.rs is
# the guest's client.
#
# The disk is `cache=none`: the guest sees a volatile write cache and sends
# flushes, qemu writes to the image with O_DIRECT and fdatasyncs it on each
# flush. Killing qemu loses what the guest had not written out (its page
# cache, its queued requests) as a power cut does; what qemu had completed is
# already in the host's kernel and survives.
#
#   scripts/vm-powerloss-test.sh
#
# Env: POWERLOSS_CUTS (default 3), POWERLOSS_SEED (default 1), POWERLOSS_FS
# (ext4, the default, or xfs), POWERLOSS_WORKERS (concurrent clients, default
# 6), VM_TIMEOUT (seconds per boot, default 300), POWERLOSS_KEEP=1 keeps the
# disk image, consoles and channels in /tmp.
# Needs root; installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

. scripts/vm-common.sh
vm_prepare mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs strip:binutils
cargo build --locked -p loam --bin loam -p loam-bench --bin powerloss

work=$(mktemp -d /tmp/loam-powerloss.XXXXXX)
[ -n "${POWERLOSS_KEEP:-}" ] && echo "keeping $work" || trap 'rm -rf "$work"' EXIT
# Without their debug info the binaries take a fifth of the guest's memory.
strip -o "$work/loam" target/debug/loam
strip -o "$work/powerloss" target/debug/powerloss
# mkfs.xfs refuses filesystems under 300 MB.
fs=${POWERLOSS_FS:-ext4}
truncate -s 512M "$work/data.img"
case $fs in
ext4) mkfs.ext4 -q -F "$work/data.img" ;;
xfs) mkfs.xfs -q -f "$work/data.img" ;;
*) echo "POWERLOSS_FS=$fs: ext4 or xfs" >&2 && exit 2 ;;
esac

# The guest's part of /init: a tmpfs on /run for the binary, the socket and
# the driver's log (the host root is read-only), the data disk under it, and
# the workload, which reads this boot's plan from $work over 9p.
part=$(
    cat <<PART
mount -t tmpfs -o size=300m tmpfs /mnt/run
mkdir -p /mnt/run/powerloss/data
cp /mnt$work/loam /mnt$work/powerloss /mnt/run/powerloss/
chroot /mnt /sbin/modprobe -a virtio_blk $fs loop
chroot /mnt /bin/mount -t $fs /dev/vda /run/powerloss/data
chroot /mnt /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin python3 $repo/scripts/powerloss.py guest \
    --plan $work/plan.json --channel /dev/ttyS1 --loam /run/powerloss/loam --client /run/powerloss/powerloss --root /run/powerloss/data/root
chroot /mnt /bin/umount /run/powerloss/data
PART
)
vm_initrd "$work" "$part"
vm_qemu_args "$work/initrd.gz"

python3 scripts/powerloss.py host --work "$work" --cuts "${POWERLOSS_CUTS:-3}" --seed "${POWERLOSS_SEED:-1}" \
    --workers "${POWERLOSS_WORKERS:-6}" --timeout "${VM_TIMEOUT:-300}" -- \
    qemu-system-x86_64 "${vm_args[@]}" -drive "file=$work/data.img,format=raw,if=virtio,cache=none"
