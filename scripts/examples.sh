#!/usr/bin/env bash
# The deployment examples (Dockerfile, examples/kubernetes, examples/databricks, examples/ci):
# their manifests fit together and keep what the README promises (tests/examples/check.py, with
# PyYAML in the test virtualenv), and each idsync.toml validates with the environment its
# deployment provides (crates/cli/tests/examples.rs, also part of `cargo test`).
#
# Environment: IDSYNC_VENV (default .venv), the virtualenv to use or create.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${IDSYNC_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r tests/examples/requirements.txt
"$venv/bin/python" tests/examples/check.py .
cargo test -q --locked -p idsync --test examples
