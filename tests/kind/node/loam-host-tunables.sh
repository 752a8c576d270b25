#!/bin/sh
# Shows the kubelet its values of the host-wide tunables it sets, without
# changing the host's (see kubelet-host-tunables.conf). Runs before every
# kubelet start; a tunable already shown is left as it is.
set -eu
mkdir -p /run/loam-sysctl
for kv in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \
    kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
    f=${kv%=*} v=${kv#*=}
    [ "$(cat "/proc/sys/$f")" != "$v" ] || continue
    file=/run/loam-sysctl/$(echo "$f" | tr / .)
    echo "$v" >"$file"
    mount --bind "$file" "/proc/sys/$f"
    mount -o remount,bind,ro "/proc/sys/$f"
done
