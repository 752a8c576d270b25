# The Loam image: the `loam` binary and the filesystem tools it runs (mkfs and
# resize for ext4 and xfs), on Debian slim.
#   docker build -t loam:dev .
FROM rust:1.95-trixie AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
# The workspace's other member (the benchmark client) must be there for cargo
# to load the workspace; only loam is built.
COPY bench/Cargo.toml bench/Cargo.toml
COPY bench/src bench/src
RUN cargo build --release --locked --bin loam

FROM debian:trixie-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends e2fsprogs xfsprogs \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/loam /usr/local/bin/loam
ENTRYPOINT ["/usr/local/bin/loam"]
