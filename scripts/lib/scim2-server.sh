# Sourced by scripts/ldap.sh and scripts/samba.sh: installs scim2-server (PyPI) into the project's
# virtualenv (IDSYNC_VENV, default .venv) if needed, starts it on a free port of 127.0.0.1 with
# its log in "$work", sets scim_pid (the caller stops it) and exports IDSYNC_TEST_SCIM and
# IDSYNC_TEST_SCIM_TOKEN.
start_scim2_server() {
  local venv="${IDSYNC_VENV:-.venv}" port
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check -r tests/servers/requirements.txt
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
  IDSYNC_TEST_SCIM_TOKEN="idsync-test-$RANDOM$RANDOM"
  "$venv/bin/scim2-server" --hostname 127.0.0.1 --port "$port" --bearer-token "$IDSYNC_TEST_SCIM_TOKEN" \
    > "$work/scim.log" 2>&1 &
  scim_pid=$!
  for _ in $(seq 100); do
    if curl -sf "http://127.0.0.1:$port/ServiceProviderConfig" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$scim_pid" 2>/dev/null; then echo "scim2-server did not start:"; cat "$work/scim.log"; exit 1; fi
    sleep 0.1
  done
  export IDSYNC_TEST_SCIM="http://127.0.0.1:$port" IDSYNC_TEST_SCIM_TOKEN
}
