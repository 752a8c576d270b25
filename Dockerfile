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
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
# The workspace's other member (the benchmark client) must be there for cargo
# to load the workspace; only loam is built.
COPY bench/Cargo.toml bench/Cargo.toml
COPY bench/src bench/src
# Cargo.toml declares the crash harness as a test target: cargo refuses to load
# the manifest when its file is missing (it is not built here).
COPY tests/crash.rs tests/crash.rs
COPY scripts/build-release.sh scripts/build-release.sh
# build.rs reads it from the environment (an ARG is one during RUN).
ARG LOAM_GIT_REVISION=unknown
ARG TARGETARCH
RUN scripts/build-release.sh "${TARGETARCH:-}" /loam

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
