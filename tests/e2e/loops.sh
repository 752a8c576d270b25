# shellcheck shell=bash
# run_loops RUN_DIR: prints the loop devices a run made, one per line, and only
# those: a device whose backing file lies under RUN_DIR (found by filesystem
# and inode, whatever path the run's namespace named it by: Loam's images under
# the bound /var/lib/loam, the run's own files), and a device backed by one of
# those devices (the kubelet's reference to a raw block volume). Every other
# device is not named, another Loam's on the same host included (a name
# matching *loam* or /var/lib/kubelet says nothing about who made it).
# Sourced by run.sh; checked by loops-test.sh.
run_loops() {
    local run=$1 run_dev loop majmin ino d
    local -a ours=() nodes=()
    [ -d "$run" ] || return 0
    run_dev=$(stat -c '%Hd:%Ld' "$run")
    while read -r loop majmin ino; do
        if [ "$majmin" = "$run_dev" ] && [ -n "$(find "$run" -xdev -inum "$ino" -print -quit 2>/dev/null)" ]; then
            ours+=("$loop")
            nodes+=("$(stat -c '%Hd:%Ld %i' "$loop")")
        fi
    done < <(losetup -l -n -O NAME,BACK-MAJ:MIN,BACK-INO)
    [ ${#ours[@]} -gt 0 ] || return 0
    printf '%s\n' "${ours[@]}"
    while read -r loop majmin ino; do
        for d in "${nodes[@]}"; do
            [ "$majmin $ino" != "$d" ] || echo "$loop"
        done
    done < <(losetup -l -n -O NAME,BACK-MAJ:MIN,BACK-INO)
}
