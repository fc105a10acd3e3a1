#!/usr/bin/env bash
# Proves the Kanidm emulator against Kanidm itself: builds tests/kanidm, a small HTTP server around
# Kanidm's real server library (kanidmd_lib 1.7.4, an in-memory server, in a workspace and lock
# file of its own), and runs the conformance suite (crates/emulators/tests/kanidm.rs) and the Kanidm
# target's tests against it, on 127.0.0.1. They also run against the emulator in `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -q --locked --manifest-path tests/kanidm/Cargo.toml
export IDSYNC_TEST_KANIDM="$PWD/tests/kanidm/target/debug/idsync-kanidm-harness"
# The emulator's conformance suite, then idsync's Kanidm target: every flow through the runner,
# and the agreement's endings through the binary.
cargo test -q --locked -p idsync-emulators --test kanidm -- --ignored
# (kanidm_at_scale, the measurement of bench/RESULTS.md, is not a test: run it by name.)
cargo test -q --locked -p idsync-connectors --test kanidm_target -- --ignored kanidm_takes_
cargo test -q --locked -p idsync --test kanidm -- --ignored
