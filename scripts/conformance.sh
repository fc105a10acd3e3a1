#!/usr/bin/env bash
# Proves the emulators' fidelity: installs the vendors' official Python clients into a virtualenv,
# starts `idsync-emulator all` on 127.0.0.1 (Graph over HTTPS with a generated certificate), runs
# tests/conformance/conformance.py against it, and stops the emulator by its pid.
#
# Environment: IDSYNC_VENV (default .venv), the virtualenv to use or create.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${IDSYNC_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r tests/conformance/requirements.txt

cargo build -q --locked -p idsync-emulators --bin idsync-emulator

work=$(mktemp -d)
pid=""
cleanup() {
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

target/debug/idsync-emulator generate --preset small --out "$work/tenant.json" 2>/dev/null
# What the checks expect, read from the tenant itself.
"$venv/bin/python" - "$work/tenant.json" > "$work/expect.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
small = min(t["groups"], key=lambda g: (len(g.get("members", [])), g["id"]))
members = {m["id"] for m in small.get("members", [])}
user = next(u["id"] for u in t["users"] if u["id"] not in members)
print(json.dumps({"expect_users": len(t["users"]), "expect_groups": len(t["groups"]),
                  "some_group": small["id"], "some_user": user}))
PY

target/debug/idsync-emulator all --tenant "$work/tenant.json" --tls --cert-out "$work/cert.pem" \
  --ports-file "$work/ports.json" > "$work/emulator.log" 2>&1 &
pid=$!
for _ in $(seq 200); do
  [ -f "$work/ports.json" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/emulator.log"; exit 1; }
  sleep 0.05
done
[ -f "$work/ports.json" ] || { echo "the emulator did not start"; cat "$work/emulator.log"; exit 1; }

# The clients trust the emulator's certificate through the usual variables (requests, httpx).
REQUESTS_CA_BUNDLE="$work/cert.pem" SSL_CERT_FILE="$work/cert.pem" \
  "$venv/bin/python" tests/conformance/conformance.py "$work/ports.json" "$work/cert.pem" "$work/expect.json"
