#!/usr/bin/env bash
# The metrics of `idsync run --listen` against a real Prometheus and promtool (Debian's package
# `prometheus`, installed when missing): the test starts the service and a Prometheus server on
# 127.0.0.1, Prometheus scrapes it, and `promtool check metrics` lints the exposition. Both are
# stopped by the test.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "== installing prometheus (Debian package)"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
fi

IDSYNC_TEST_PROMETHEUS="$(command -v prometheus)" IDSYNC_TEST_PROMTOOL="$(command -v promtool)" \
  cargo test -q --locked -p idsync --test daemon -- --ignored
