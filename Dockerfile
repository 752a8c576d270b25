# The Loam image: the `loam` binary and the filesystem tools it runs (mkfs and
# resize for ext4 and xfs), on Debian slim.
#   docker build -t loam:dev .
# The image has no git history: pass the revision for `loam --version`, the
# build-info metric and the OCI label with
#   --build-arg LOAM_GIT_REVISION=$(git rev-parse --short=12 HEAD)
# Where no image can be pulled, both base images can be local stand-ins
# (tests/kind/images.sh makes them: --build-arg RUST_IMAGE=... DEBIAN_IMAGE=...).
# For amd64 and arm64 at once (BuildKit):
#   docker buildx build --platform linux/amd64,linux/arm64 -t loam:dev .
# The build stage then runs on the builder's own platform (BUILDPLATFORM) and
# cross-compiles for each image's (TARGETARCH): scripts/build-release.sh. The
# classic builder sets neither: "linux" is its own platform, and an empty
# TARGETARCH builds for it.
ARG RUST_IMAGE=rust:1.95-trixie
ARG DEBIAN_IMAGE=debian:trixie-slim
FROM --platform=${BUILDPLATFORM:-linux} ${RUST_IMAGE} AS build
WORKDIR /src
# The dependencies first, in a layer of their own: it is kept while the
# manifests, the lock file, build.rs and the protos stay the same, so a change
# to Loam's own source compiles Loam alone (the classic builder has no cache
# mounts, so a layer it is). Cargo loads a manifest only when every target it
# declares exists: the workspace's other member (the benchmark client, never
# built here) and the crash harness (a test target) are there for that, and in
# this layer empty files stand in for Loam's own source.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY bench/Cargo.toml bench/Cargo.toml
COPY scripts/build-release.sh scripts/build-release.sh
ARG TARGETARCH
RUN mkdir -p src bench/src tests \
    && printf '//! Stands in while the dependencies compile.\nfn main() {}\n' >src/main.rs \
    && echo '//! Stands in while the dependencies compile.' >src/lib.rs && touch bench/src/main.rs tests/crash.rs \
    && scripts/build-release.sh "${TARGETARCH:-}" /dev/null \
    && rm -r src bench/src tests
COPY src src
COPY bench/src bench/src
COPY tests/crash.rs tests/crash.rs
# build.rs reads it from the environment (an ARG is one during RUN).
ARG LOAM_GIT_REVISION=unknown
# Cargo tells a changed source by its modification time, and a copied file
# keeps the one it had in the build context, which may be older than the
# stand-ins' build: touched, the real source is always compiled.
RUN find src bench/src tests -type f -exec touch {} + \
    && scripts/build-release.sh "${TARGETARCH:-}" /loam

FROM ${DEBIAN_IMAGE}
ARG LOAM_GIT_REVISION=unknown
LABEL org.opencontainers.image.title="loam" \
      org.opencontainers.image.description="Loam: a CSI driver that turns node-local storage into Kubernetes volumes" \
      org.opencontainers.image.revision="${LOAM_GIT_REVISION}"
RUN apt-get update \
    && apt-get install -y --no-install-recommends e2fsprogs xfsprogs \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /loam /usr/local/bin/loam
ENTRYPOINT ["/usr/local/bin/loam"]
