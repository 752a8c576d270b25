# shellcheck shell=bash
# The checks' vocabulary, shared by the story (story.sh) and the kind steps
# (tests/kind/*-step.sh): one line per check, and at the first failed one what
# to look at, 'N passed, 1 failed' and a non-zero exit. Sourced after setting
# CHECKS_LABEL (the step's name in each line); a `diagnose` function, when the
# script defines one, prints what to look at (indented under the failure).
passed=0
t0=$SECONDS
say() { printf '[%s %4ds] %s\n' "$CHECKS_LABEL" "$((SECONDS - t0))" "$*"; }
fail() {
    say "FAIL: $*"
    if declare -F diagnose >/dev/null; then diagnose 2>&1 | sed 's/^/    /'; fi
    echo "$passed passed, 1 failed"
    exit 1
}
ok() {
    passed=$((passed + 1))
    say "ok $passed - $*"
}
# expect WHAT ACTUAL WANTED
expect() { [ "$2" = "$3" ] && ok "$1" || fail "$1: got '$2', want '$3'"; }
# until_ok SECONDS WHAT COMMAND...: COMMAND succeeds within SECONDS, or fail.
until_ok() {
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1
    done
    fail "$what: not within ${limit}s"
}
