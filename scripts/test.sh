#!/usr/bin/env bash
# Installs what idsync's tests need and runs them: formatting, lints, the dependency tree's licenses
# and sources (cargo-deny, installed from crates.io when missing), every test of the
# workspace (unit, property, the real binary against temporary folders), the emulators'
# conformance suite (the vendors' Python clients, installed into .venv from PyPI), and the state
# backends against moto (PyPI) and Azurite (npm), the SCIM target against scim2-server (PyPI) and
# the LDAP source against OpenLDAP (slapd, a Debian package: scripts/ldap.sh) and Active Directory
# (a Samba AD domain controller, Debian packages: scripts/samba.sh), the metrics of `idsync run`
# against a real Prometheus and promtool (Debian packages: scripts/prometheus.sh), its status page
# in Chromium's headless shell (a Debian package: scripts/browser.sh), the Kanidm emulator against
# Kanidm's own server library (crates.io: scripts/kanidm.sh),
# started on 127.0.0.1 and stopped by pid, then the fault suite at the size CI affords (RELIABILITY.md).
#
# CI calls this through .ci/run. Everything runs on 127.0.0.1 only; nothing here reaches the network
# except the package registries (crates.io, PyPI, npm, Debian) for the first build and install.
#
# Environment:
#   PROPTEST_CASES   cases per property test (default 1000)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is required; install Rust from https://rustup.rs" >&2
  exit 1
fi

# rustfmt and clippy ship with rustup's default profile; add them when a minimal toolchain lacks them.
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo deny check licenses bans sources (deny.toml; the advisory database is not reachable from CI)"
# The version is pinned so that a new release's rules cannot fail a build that changed nothing.
deny_version=0.20.2
if [ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $deny_version" ]; then
  cargo install cargo-deny --locked --version "=$deny_version"
fi
cargo deny --log-level error check licenses bans sources

echo "== cargo check: the command without the demo and its emulators (a production build)"
cargo check -p idsync --no-default-features --locked

echo "== cargo test (PROPTEST_CASES=${PROPTEST_CASES:-1000})"
PROPTEST_CASES="${PROPTEST_CASES:-1000}" cargo test --workspace --locked

echo "== emulator conformance (the vendors' official Python clients against idsync-emulator)"
scripts/conformance.sh

echo "== the LDAP source against OpenLDAP (slapd from Debian, on 127.0.0.1)"
scripts/ldap.sh

echo "== the LDAP source against Active Directory (a Samba AD domain controller from Debian, on 127.0.0.1)"
scripts/samba.sh

echo "== against real servers: state on moto (S3, STS) and Azurite (Azure Blob); the SCIM target on scim2-server"
scripts/servers.sh

echo "== idsync run --listen scraped by a real Prometheus, its exposition checked by promtool (Debian's prometheus)"
scripts/prometheus.sh

echo "== the status page of idsync run --listen in a headless browser (Debian's chromium-headless-shell)"
scripts/browser.sh

echo "== the deployment examples: the manifests fit together, each configuration validates"
scripts/examples.sh

echo "== the Kanidm emulator against Kanidm's own server library (kanidmd_lib 1.7.4, tests/kanidm)"
scripts/kanidm.sh
