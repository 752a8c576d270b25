#!/usr/bin/env bash
# Checks Loam on arm64 without an arm64 machine: cross-compiles the library's
# unit tests for aarch64-unknown-linux-gnu and runs them under qemu-user
# (Debian's qemu-aarch64), then cross-builds the release binary as the
# Dockerfile does for an arm64 image (scripts/build-release.sh arm64) and runs
# it. Installs what is missing: the Rust standard library for aarch64
# (rustup), Debian's cross gcc and arm64 libc (ring's C and assembly, and the
# linker) and qemu-user.
#
# qemu-aarch64 is called as the test runner, on the arm64 dynamic loader of
# the cross libc, which then loads the test binary: not with -L (or
# QEMU_LD_PREFIX), which makes qemu look up every absolute path under the
# prefix first when it exists there, "/" included, so that Loam's walks from
# "/" (src/kernel/nofollow.rs) would go through the arm64 sysroot. No
# binfmt_misc handler is registered, so the host's other programs (a container
# engine, say) see no change.
#
# Needs root only to install the packages. Args go to `cargo test` after
# `--` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu

missing=()
for tool in aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu qemu-aarch64:qemu-user; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
[ -e "$sysroot/lib/ld-linux-aarch64.so.1" ] || missing+=(libc6-dev-arm64-cross)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    # No recommends: qemu-user's would register binfmt_misc handlers.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 $sysroot/lib/ld-linux-aarch64.so.1 --library-path $sysroot/lib"

# Skipped: one test asks for the spawn error of a program that does not
# exist. qemu-user runs glibc's posix_spawn (clone with CLONE_VM|CLONE_VFORK)
# as a plain fork, so the child's exec error never reaches the parent, which
# sees a child exiting 127 instead of ENOENT; on arm64 hardware it passes.
cargo test --locked --lib --target "$target" -- \
    --skip kernel::blockfs::tests::mkfs_failure_reports_program_status_and_stderr "$@"
bin=${CARGO_TARGET_DIR:-target}/loam-arm64
scripts/build-release.sh arm64 "$bin"
file "$bin" | grep -q 'ARM aarch64' || { echo "FAIL: $bin is not an arm64 executable: $(file "$bin")" >&2; exit 1; }
# shellcheck disable=SC2086 # the runner is a command and its arguments
echo "arm64: $($CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER "$bin" --version) ($bin)"
