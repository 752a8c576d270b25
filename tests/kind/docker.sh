# shellcheck shell=bash
# Docker for the kind target, sourced by tests/kind/run.sh: installs Debian's
# docker.io when dockerd is missing, and starts a dockerd of our own (its own
# data root, exec root, socket and pid file; no systemd, no iptables rules, no
# docker0 bridge) unless one is already answering on our socket.
#
#   docker_up     sets DOCKER_HOST; sets docker_started (dockerd's PID) when
#                 this shell started dockerd
#   docker_down   stops dockerd (by that PID) only if this shell started it
#
# The default runtime is runc-no-sys-resource (beside this file): on machines
# like ours the capability bounding set lacks CAP_SYS_RESOURCE and privileged
# containers (kind's nodes) cannot start with plain runc; see that file. Set
# LOAM_KIND_PLAIN_RUNC=1 on a machine whose bounding set has it.
#
# The docker client used is Debian's /usr/bin/docker (the one of the same
# release as the daemon), put first on PATH through $kind_state/bin: a
# different `docker` found first on PATH (here a static 28.x client in
# /usr/local/bin) is not relied on.

kind_state=${LOAM_KIND_STATE:-/run/loam-kind}
docker_root=${LOAM_KIND_DOCKER_ROOT:-/var/lib/loam-kind/docker}

docker_up() {
    local here sock="$kind_state/docker.sock" i
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    mkdir -p "$kind_state/bin" "$docker_root"
    if [ ! -x /usr/sbin/dockerd ] || [ ! -x /usr/bin/docker ]; then
        echo "installing docker.io (Debian's dockerd and docker client)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
    fi
    command -v jq >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null
    ln -sfn /usr/bin/docker "$kind_state/bin/docker"
    export PATH="$kind_state/bin:$PATH" DOCKER_HOST="unix://$sock"
    if docker version >/dev/null 2>&1; then
        echo "dockerd already answers on $sock: using it" >&2
        return 0
    fi
    local runtime='"default-runtime": "loam-runc", "runtimes": {"loam-runc": {"path": "'"$here"'/runc-no-sys-resource"}},'
    [ "${LOAM_KIND_PLAIN_RUNC:-}" != 1 ] || runtime=''
    cat >"$kind_state/daemon.json" <<JSON
{
  $runtime
  "storage-driver": "overlay2",
  "exec-opts": ["native.cgroupdriver=cgroupfs"],
  "bridge": "none",
  "iptables": false,
  "ip-masq": false,
  "log-driver": "json-file",
  "log-opts": {"max-size": "10m", "max-file": "2"}
}
JSON
    # The system's PATH: dockerd runs the containerd it finds there, which must be
    # Debian's of the same release, not one a build put first on PATH.
    env PATH=/usr/sbin:/usr/bin:/sbin:/bin dockerd --config-file "$kind_state/daemon.json" --data-root "$docker_root" \
        --exec-root "$kind_state/exec" --pidfile "$kind_state/dockerd.pid" \
        --host "unix://$sock" >"$kind_state/dockerd.log" 2>&1 &
    docker_started=$!
    for ((i = 0; i < 60; i++)); do
        docker version >/dev/null 2>&1 && return 0
        kill -0 "$docker_started" 2>/dev/null ||
            { tail -20 "$kind_state/dockerd.log" >&2; echo "dockerd exited (log: $kind_state/dockerd.log)" >&2; return 1; }
        sleep 1
    done
    echo "dockerd did not answer on $sock within 60 s (log: $kind_state/dockerd.log)" >&2
    return 1
}

docker_down() {
    local pid=${docker_started:-} i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 30; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "dockerd ($pid) still up after 30 s: killing it" >&2
        kill -KILL "$pid"
    fi
    # dockerd leaves the bind mount of its default network namespace behind.
    local m
    for m in $(awk -v root="$kind_state/exec/" 'index($2, root) == 1 {print $2}' /proc/self/mounts); do
        umount "$m"
    done
    docker_started=''
}
