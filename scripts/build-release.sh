#!/usr/bin/env bash
# Builds the release `loam` binary for a Debian architecture and copies it to
# OUT: natively when ARCH is this machine's (or empty), else cross-compiled
# with Debian's cross gcc (ring's C and assembly, and the linker) and the
# Rust standard library of the target, both installed when missing. The
# Dockerfile's build stage runs it with BuildKit's TARGETARCH, so that
# `docker buildx build --platform linux/amd64,linux/arm64` compiles on the
# builder's own CPU; scripts/arm64.sh runs the same cross path here.
#
#   scripts/build-release.sh ARCH OUT      (ARCH: amd64, arm64, or empty)
set -euo pipefail
cd "$(dirname "$0")/.."

arch=$1 out=$2
native=$(dpkg --print-architecture)
case ${arch:-$native} in
"$native") target='' ;;
arm64) target=aarch64-unknown-linux-gnu gcc=aarch64-linux-gnu-gcc cross=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
amd64) target=x86_64-unknown-linux-gnu gcc=x86_64-linux-gnu-gcc cross=(gcc-x86-64-linux-gnu libc6-dev-amd64-cross) ;;
*)
    echo "build-release.sh: no Rust target for the Debian architecture $arch" >&2
    exit 1
    ;;
esac

built=${CARGO_TARGET_DIR:-target}
if [ -z "$target" ]; then
    cargo build --release --locked --bin loam
    built+=/release/loam
else
    if ! command -v "$gcc" >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -qy --no-install-recommends "${cross[@]}"
    fi
    rustup target list --installed | grep -qx "$target" || rustup target add "$target"
    # Cargo's linker and the cc crate's compiler for the target, by their
    # environment names (CARGO_TARGET_<TRIPLE>_LINKER, CC_<triple>).
    upper=$(tr 'a-z-' 'A-Z_' <<<"$target")
    export "CARGO_TARGET_${upper}_LINKER=$gcc" "CC_${target//-/_}=$gcc"
    cargo build --release --locked --bin loam --target "$target"
    built+=/$target/release/loam
fi
cp "$built" "$out"
