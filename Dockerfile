# idsync as a container image: built in one stage, shipped in a distroless one that holds the
# binary, glibc, CA certificates and nothing else (no shell, no package manager), run as a non-root
# user. The build leaves out `idsync demo` and its emulators (`--no-default-features`).
#
#   docker build -t idsync .
#   docker run --rm -v "$PWD/idsync.toml:/etc/idsync/idsync.toml:ro" -e AZURE_CLIENT_SECRET ... idsync run --once
#
# Kubernetes, Databricks and CI examples: examples/kubernetes, examples/databricks, examples/ci.

# The toolchain CI builds with (rustc 1.95); rust-version in Cargo.toml is the oldest it claims.
FROM docker.io/library/rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that a change to idsync's own code does not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN cargo build --release --locked -p idsync --no-default-features \
 && cp target/release/idsync /idsync \
 && /idsync --version

# glibc, libgcc, CA certificates and /etc/passwd with nonroot (uid 65532); no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /idsync /usr/local/bin/idsync
# The configuration is mounted here; the state belongs in an object store (s3://, az://, gs://)
# so that every run sees the last one's. A folder state needs a writable volume instead.
ENV IDSYNC_CONFIG=/etc/idsync/idsync.toml
USER nonroot:nonroot
# The status page, /metrics, /healthz and /readyz of `idsync run --listen 0.0.0.0:9464`.
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/idsync"]
CMD ["run", "--once"]
