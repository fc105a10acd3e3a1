#!/usr/bin/env bash
# The status page of `idsync run --listen` in a real headless browser: Chromium's headless shell
# (Debian's package `chromium-headless-shell`, installed when missing) renders it on 127.0.0.1;
# the test checks the DOM and the screenshot (kept in target/tmp/status-page.png).
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
if ! command -v chromium-headless-shell >/dev/null 2>&1; then
  echo "== installing chromium-headless-shell (Debian package)"
  pkgs="chromium-headless-shell fonts-dejavu-core"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs >/dev/null; }
fi

IDSYNC_TEST_CHROMIUM="$(command -v chromium-headless-shell)" \
  cargo test -q --locked -p idsync --test status_page -- --ignored
