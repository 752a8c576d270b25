# VM pieces shared by the tests that boot a stock Debian kernel under qemu
# (scripts/vm-quota-test.sh, scripts/vm-powerloss-test.sh); source it, do not
# run it. The guest is a busybox initramfs that mounts the host root
# read-only over 9p at /mnt, with proc, sysfs and devtmpfs inside it, and then
# runs the caller's part of /init; software emulation (KVM does not run a
# stock kernel on our machines), 1 vCPU, 1 GiB.
#
#   vm_prepare [PACKAGE...]       installs what is missing; sets vm_kernel, vm_version
#   vm_initrd DIR PART            writes DIR/initrd.gz whose /init runs the sh code PART
#                                 with the host root at /mnt, then powers off
#   vm_qemu_args INITRD           sets the array vm_args: qemu's machine, kernel and 9p share
#                                 (the caller adds the console and any disks)

# Installs qemu, busybox, a Debian kernel and any extra packages given as
# COMMAND:PACKAGE when COMMAND is missing; picks the newest installed kernel.
vm_prepare() {
    local missing=() tool
    for tool in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio modprobe:kmod "$@"; do
        command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
    done
    ls /boot/vmlinuz-* >/dev/null 2>&1 || missing+=(linux-image-amd64)
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
    # The newest installed Debian kernel; never a hard-coded version.
    vm_kernel=$(ls /boot/vmlinuz-* | sort -V | tail -n 1)
    vm_version=${vm_kernel#/boot/vmlinuz-}
}

# A busybox initramfs that only mounts the host root over 9p; the guest's
# other modules (filesystems, disks, loop) come from that root's /lib/modules.
vm_initrd() {
    local dir=$1/initrd part=$2 module
    mkdir -p "$dir"/{bin,dev,proc,sys,mnt}
    cp "$(command -v busybox)" "$dir/bin/busybox"
    modprobe -a -S "$vm_version" --show-depends virtio_pci 9pnet_virtio 9p | awk '$1 == "insmod" {print $2}' |
        awk '!seen[$0]++' >"$dir/modules"
    while read -r module; do
        mkdir -p "$dir$(dirname "$module")"
        cp "$module" "$dir$module"
    done <"$dir/modules"
    {
        cat <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules); do insmod $m; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro host /mnt
mount -t proc proc /mnt/proc
mount -t sysfs sysfs /mnt/sys
mount -t devtmpfs devtmpfs /mnt/dev
INIT
        printf '%s\n' "$part"
        echo 'poweroff -f'
    } >"$dir/init"
    chmod +x "$dir/init"
    (cd "$dir" && find . | cpio -o -H newc --quiet) | gzip -1 >"$1/initrd.gz"
}

# qemu's machine: TCG, the kernel and initramfs, the host root over 9p
# (multidevs=remap, or the host's /proc and /sys collide in the guest).
vm_qemu_args() {
    vm_args=(-accel tcg -cpu max -smp 1 -m 1024 -no-reboot -kernel "$vm_kernel" -initrd "$1"
        -append "console=ttyS0 panic=-1 quiet"
        -virtfs local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap)
}
