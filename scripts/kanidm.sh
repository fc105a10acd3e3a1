#!/usr/bin/env bash
# Proves the Kanidm emulator against Kanidm itself: builds tests/kanidm, a small HTTP server around
# Kanidm's real server library (kanidmd_lib 1.7.4, an in-memory server, in a workspace and lock
# file of its own), and runs the conformance suite (crates/emulators/tests/kanidm.rs) against it,
# on 127.0.0.1. The suite also runs against the emulator in `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -q --locked --manifest-path tests/kanidm/Cargo.toml
IDSYNC_TEST_KANIDM="$PWD/tests/kanidm/target/debug/idsync-kanidm-harness" \
  cargo test -q --locked -p idsync-emulators --test kanidm -- --ignored
