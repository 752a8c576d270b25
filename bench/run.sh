#!/usr/bin/env bash
# Benchmarks Loam side by side with the kubernetes-csi hostpath plugin, and the
# data path of Loam's volumes against the host filesystem. One command:
#
#   bash bench/run.sh           full run (about 15 minutes on 2 cores); writes
#                               bench/results/*.json, the chart and BENCHMARKS.md
#   bash bench/run.sh --smoke   a few operations of every scenario, results in a
#                               temporary directory (CI runs this; numbers unused)
#
# Builds what it needs: loam and loam-bench (cargo, release), fio (apt-get); the
# hostpath plugin is a binary built beforehand, named by HOSTPATH_PLUGIN. Needs root:
# everything runs in a private mount namespace; drivers are stopped by PID and
# every mount and loop device made here is undone on exit.
#
# Env: BENCH_REPS (default 3), FIO_RUNTIME seconds per job (default 10),
#      FIO_SIZE (default 256M), HOSTPATH_PLUGIN (the peer's binary; without
#      it the run has no peer and says so), BENCH_PEER=none to skip the peer.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

mode=full
[ "${1:-}" = --smoke ] && mode=smoke
step() { printf '\n==> %s\n' "$*" >&2; }

# The smoke run only checks that the harness works: debug builds, which CI
# has already made, do for that.
profile=release
[ "$mode" = smoke ] && profile=debug
if [ "${LOAM_BENCH_IN_NS:-}" != 1 ]; then
    step "building loam and loam-bench ($profile)"
    if [ "$profile" = release ]; then
        cargo build --release --locked --workspace --bins
    else
        cargo build --locked --workspace --bins
    fi
    if ! command -v fio >/dev/null; then
        step "installing fio"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio
    fi
    # Mounts made from here on die with the namespace; loop devices do not,
    # so the cleanup below detaches them.
    exec env LOAM_BENCH_IN_NS=1 unshare --mount --propagation private -- bash "$0" "$@"
fi

if [ "$mode" = smoke ]; then
    reps=1 existing=0,50 cycles=20 node_volumes=5 snapshots=3
    fio_runtime=1 fio_ramp=0 fio_size=16M
else
    reps=${BENCH_REPS:-3} existing=0,1000,10000 cycles=1000 node_volumes=200 snapshots=100
    fio_runtime=${FIO_RUNTIME:-10} fio_ramp=1 fio_size=${FIO_SIZE:-256M}
fi
loam=$repo/target/$profile/loam
bench=$repo/target/$profile/loam-bench
# On the host filesystem, as a node's /var/lib is: the data-path reference.
work=$(mktemp -d /var/tmp/loam-bench.XXXXXX)
driver_pid=""
started=$(date +%s)

cleanup() {
    [ -n "$driver_pid" ] && { kill -TERM "$driver_pid" 2>/dev/null || true; wait "$driver_pid" 2>/dev/null || true; }
    awk -v w="$work" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    losetup -n -O NAME,BACK-FILE -l 2>/dev/null | awk -v w="$work" 'index($2, w) == 1 {print $1}' |
        while read -r d; do losetup -d "$d" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

if [ "$mode" = smoke ]; then results=$work/results markdown=$work/BENCHMARKS.md; else
    results=$repo/bench/results markdown=$repo/BENCHMARKS.md
fi
mkdir -p "$results" "$work/fio-raw"
rm -f "$results"/control-*.json

# ---- the peer: a hostpath plugin built elsewhere ------------------------------
# The Go module proxy refuses github.com/kubernetes-csi/csi-driver-host-path
# (403 for every version), so the harness does not build it: HOSTPATH_PLUGIN
# names a binary built from the plugin's published source (docs/testing.md,
# Benchmarks, says how). What it is comes from the binary itself: its
# --version line and the module and VCS stamps Go writes into every build.
hostpath="" peer_note="" peer_build=""
if [ "${BENCH_PEER:-hostpath}" = none ]; then
    peer_note="skipped (BENCH_PEER=none)"
elif [ -z "${HOSTPATH_PLUGIN:-}" ]; then
    peer_note="HOSTPATH_PLUGIN is not set (a hostpathplugin binary built from its published source)"
elif [ ! -x "$HOSTPATH_PLUGIN" ]; then
    echo "HOSTPATH_PLUGIN=$HOSTPATH_PLUGIN is not an executable file" >&2
    exit 1
else
    hostpath=$(realpath "$HOSTPATH_PLUGIN")
    # "path", "mod" and the vcs.* settings of `go version -m`: which source it
    # is, at which commit, and whether that tree was modified.
    peer_build=$("$hostpath" --version 2>/dev/null | head -n1)
    if command -v go >/dev/null; then
        peer_build+="; $(go version -m "$hostpath" | awk '$1 == "mod" || ($1 == "build" && $2 ~ /^(vcs\.revision|vcs\.time|vcs\.modified)=/) {print $2, $3}' | paste -sd, | sed 's/,/, /g')"
        peer_build+="; $(go version "$hostpath" | cut -d' ' -f2-)"
    fi
fi
[ -n "$peer_note" ] && step "no peer this run: $peer_note"
if [ -n "$hostpath" ]; then "$hostpath" -help >"$results/hostpath-flags.txt" 2>&1 || true; fi

# ---- control path ---------------------------------------------------------
run_driver() { # name rep command...
    local name=$1 rep=$2; shift 2
    rm -rf "$work/state" "$work/co" && mkdir -p "$work/state" "$work/co"
    "$bench" run --driver "$name" --rep "$rep" --socket "$work/$name.sock" --log "$work/$name.log" \
        --work "$work/co" --existing "$existing" --cycles "$cycles" --node-volumes "$node_volumes" \
        --snapshots "$snapshots" -- "$@" >"$results/control-$name-$rep.json"
}
loam_cmd=("$loam" serve --node-id bench-node --root "$work/state" --endpoint "unix://$work/loam.sock")
# hostpath: its own state file and volumes under --statedir; no attach limit
# (--maxvolumespernode 0) and no capacity kinds, so 10,000 small volumes fit.
hostpath_cmd=("$hostpath" --endpoint "unix://$work/hostpath.sock" --nodeid bench-node --drivername hostpath.csi.k8s.io
    --statedir "$work/state" --maxvolumespernode 0)
for rep in $(seq "$reps"); do
    # Alternate who goes first, so drift in the machine's load favours neither.
    order=(loam hostpath)
    [ $((rep % 2)) = 0 ] && order=(hostpath loam)
    for d in "${order[@]}"; do
        case $d in
        loam) step "control path: loam, repetition $rep/$reps"; run_driver loam "$rep" "${loam_cmd[@]}" ;;
        hostpath)
            [ -n "$hostpath" ] || continue
            step "control path: hostpath, repetition $rep/$reps"
            run_driver hostpath "$rep" "${hostpath_cmd[@]}"
            ;;
        esac
    done
done

# ---- data path ------------------------------------------------------------
step "data path: fio on the host, a dir volume and a loop volume (direct I/O on and off)"
rm -rf "$work/state" "$work/co" && mkdir -p "$work/co/host" "$work/co/dir-staging" "$work/co/loop-staging"
"${loam_cmd[@]}" 2>"$work/loam-fio.log" &
driver_pid=$!
export CSI_ENDPOINT=unix://$work/loam.sock
for _ in $(seq 200); do "$loam" ctl probe >/dev/null 2>&1 && break; sleep 0.05; done
ctl() { "$loam" ctl "$@"; }
vol_id() { ctl --json create-volume "$@" | sed -n 's/.*"volume_id": *"\([^"]*\)".*/\1/p' | head -n1; }
# Room for the fio file plus filesystem overhead.
vol_mib=$(($(numfmt --from=iec "$fio_size") / 1048576 * 2 + 64))
dir_id=$(vol_id fio-dir --size "${vol_mib}Mi")
loop_id=$(vol_id fio-loop --size "${vol_mib}Mi" --param backend=loop)
ctl node-stage "$dir_id" --staging-path "$work/co/dir-staging" >/dev/null
ctl node-publish "$dir_id" --staging-path "$work/co/dir-staging" --target-path "$work/co/dir" >/dev/null
# Stage once so Loam formats the image, then copy the clean image for the
# buffered twin before staging it for good.
ctl node-stage "$loop_id" --staging-path "$work/co/loop-staging" >/dev/null
ctl node-unstage "$loop_id" --staging-path "$work/co/loop-staging" >/dev/null
cp --sparse=always "$work/state/volumes/${loop_id%@*}.img" "$work/nodio.img"
ctl node-stage "$loop_id" --staging-path "$work/co/loop-staging" >/dev/null
ctl node-publish "$loop_id" --staging-path "$work/co/loop-staging" --target-path "$work/co/loop-dio" >/dev/null
# Loam always asks for direct I/O; "off" is the same filesystem on a loop
# device attached by hand without it (page cache of the image file in use).
nodio_dev=$(losetup --find --show --direct-io=off "$work/nodio.img")
mkdir -p "$work/co/loop-nodio" && mount "$nodio_dev" "$work/co/loop-nodio"
dio_state() { cat "/sys/block/${1#/dev/}/loop/dio" 2>/dev/null || echo "?"; }
loop_dev=$(losetup -n -O NAME -j "$work/state/volumes/${loop_id%@*}.img" | head -n1)
step "loop devices: Loam's $loop_dev dio=$(dio_state "$loop_dev"), hand-made $nodio_dev dio=$(dio_state "$nodio_dev")"

jobs=("seq-read read 1M" "seq-write write 1M" "rand-read randread 4k" "rand-write randwrite 4k")
for rep in $(seq "$reps"); do
    for job in "${jobs[@]}"; do
        read -r name rw bs <<<"$job"
        # Targets interleaved within a job, so drift hits all of them alike.
        for target in host dir loop-dio loop-nodio; do
            fio --name="$name" --filename="$work/co/$target/fio.dat" --size="$fio_size" --rw="$rw" --bs="$bs" \
                --direct=1 --ioengine=libaio --iodepth=16 --time_based --runtime="$fio_runtime" --ramp_time="$fio_ramp" \
                --output-format=json --output="$work/fio-raw/$target.$name.$rep.json" >/dev/null
        done
        printf '  fio %s, repetition %s/%s done\n' "$name" "$rep" "$reps" >&2
    done
done
umount "$work/co/loop-nodio" && losetup -d "$nodio_dev"
ctl node-unpublish "$loop_id" --target-path "$work/co/loop-dio" >/dev/null
ctl node-unstage "$loop_id" --staging-path "$work/co/loop-staging" >/dev/null
ctl node-unpublish "$dir_id" --target-path "$work/co/dir" >/dev/null
ctl node-unstage "$dir_id" --staging-path "$work/co/dir-staging" >/dev/null
ctl delete-volume "$loop_id" >/dev/null && ctl delete-volume "$dir_id" >/dev/null
kill -TERM "$driver_pid" && wait "$driver_pid" || true
driver_pid=""

# ---- machine, versions, report -----------------------------------------------
json_str() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr '\n' ' ')"; }
{
    printf '{\n'
    printf '  "date": %s,\n' "$(json_str "$(date -u +%Y-%m-%dT%H:%MZ)")"
    printf '  "cpu": %s,\n' "$(json_str "$(nproc) × $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1)")"
    printf '  "memory": %s,\n' "$(json_str "$(free -g | awk '/^Mem:/ {print $2 " GiB"}')")"
    printf '  "kernel": %s,\n' "$(json_str "$(uname -r)")"
    printf '  "filesystem under the roots": %s,\n' "$(json_str "$(findmnt -no SOURCE,FSTYPE -T /var/tmp)")"
    printf '  "load average at the end": %s,\n' "$(json_str "$(cut -d' ' -f1-3 /proc/loadavg)")"
    printf '  "loam": %s,\n' "$(json_str "$(git describe --always --dirty 2>/dev/null || echo unknown) ($(rustc --version))")"
    printf '  "peer": %s,\n' "$(json_str "${hostpath:+hostpath plugin: $peer_build}${peer_note:+hostpath plugin not measured: $peer_note}")"
    printf '  "fio": %s,\n' "$(json_str "$(fio --version), $fio_size file, ${fio_runtime} s per job after ${fio_ramp} s ramp, libaio, iodepth 16, direct=1")"
    printf '  "scenario sizes": %s,\n' "$(json_str "Create+Delete: $cycles pairs per point over $existing existing; node: $node_volumes volumes; snapshots: $snapshots pairs; volumes of 1 MiB (dir backend)")"
    printf '  "bench wall time": %s\n' "$(json_str "$(($(date +%s) - started)) s for $reps repetitions")"
    printf '}\n'
} >"$results/machine.json"
"$bench" report --results "$results" --fio-raw "$work/fio-raw" --markdown "$markdown" \
    --chart "$results/cost-vs-existing.svg"
step "done in $(($(date +%s) - started)) s: $markdown, $results"
# The smoke run's numbers are thrown away with its directory; show them in the log.
[ "$mode" = smoke ] && sed -n '/bench:begin/,/bench:end/p' "$markdown"
true
