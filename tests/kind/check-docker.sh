#!/usr/bin/env bash
# Proves that docker_up's dockerd can run a kind node here: a privileged
# container from the node image's Debian tree (debootstrap'd by node-image.sh)
# boots systemd as PID 1 and `systemctl is-system-running` answers running (or
# degraded: some unit of a bare tree failed, systemd itself is up). On machines
# like ours this fails with "unable to apply caps: operation not permitted"
# without the runtime wrapper runc-no-sys-resource (LOAM_KIND_PLAIN_RUNC=1
# shows it). Removes its container and image, and stops dockerd if it started it.
#
# Usage: check-docker.sh     (as root)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/docker.sh"
cache=${LOAM_E2E_CACHE:-$HOME/.cache/loam-e2e}
name=loam-kind-systemd-check
image=loam-kind.local/systemd-check:latest

cleanup() {
    local rc=$?
    set +e
    docker rm -f -v "$name" >/dev/null 2>&1
    docker image rm "$image" >/dev/null 2>&1
    docker_down
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

docker_up
[ -d "$cache/kind/rootfs" ] || "$here/node-image.sh" rootfs
tar -C "$cache/kind/rootfs" --numeric-owner -cf - . | docker import - "$image" >/dev/null
docker run -d --privileged --name "$name" --tmpfs /run --tmpfs /tmp --env container=docker \
    --stop-signal SIGRTMIN+3 "$image" /usr/lib/systemd/systemd >/dev/null
state=''
for ((i = 0; i < 60; i++)); do
    state=$(docker exec "$name" systemctl is-system-running 2>/dev/null) || true
    case "$state" in running | degraded) break ;; esac
    sleep 1
done
pid1=$(docker exec "$name" cat /proc/1/comm)
echo "PID 1: $pid1; systemctl is-system-running: ${state:-no answer}"
[ "$pid1" = systemd ] && { [ "$state" = running ] || [ "$state" = degraded ]; } || {
    docker logs "$name" 2>&1 | tail -20 >&2
    echo "systemd did not come up in a privileged container" >&2
    exit 1
}
