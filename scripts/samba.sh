#!/usr/bin/env bash
# The LDAP source's Active Directory tests against a real Samba AD domain controller: installs
# Samba from Debian when it is missing (apt-get, as root or through sudo), provisions a private
# domain IDSYNC.TEST in a temporary folder, starts only its LDAP and KDC services on 127.0.0.1,
# runs the tests, and stops it by its pid.
#
# Samba needs root, and its LDAP port is fixed at 389: the script stops with a clear message when
# it is not root or when 127.0.0.1:389 is taken.
#
# The domain has the administrator and one ordinary user (idsync-reader), who may read the
# directory but not the tombstones. Each test makes its own organizational unit. The command-line
# test also syncs into scim2-server (PyPI, scripts/lib/scim2-server.sh), started beside Samba.
#
#   scripts/samba.sh            # the tests
#   scripts/samba.sh serve      # start it and print the environment, until Ctrl-C (for a person)
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-test}"

sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    echo "scripts/samba.sh: Samba's domain controller runs as root, and this user is not root (nor may it sudo)" >&2
    exit 1
  fi
fi
if ! command -v samba-tool >/dev/null 2>&1; then
  echo "== installing Samba's AD domain controller (Debian packages)"
  pkgs="samba samba-ad-dc samba-ad-provision winbind ldap-utils"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs >/dev/null; }
fi

if python3 -c 'import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(("127.0.0.1",389))!=0)'; then
  echo "scripts/samba.sh: 127.0.0.1:389 is taken (another LDAP server?): Samba's LDAP port cannot be moved" >&2
  exit 1
fi

work=$(mktemp -d)
chmod 755 "$work"
pid=""
scim_pid=""
cleanup() {
  if [ -n "$scim_pid" ]; then
    kill "$scim_pid" 2>/dev/null || true
  fi
  if [ -n "$pid" ]; then
    $sudo kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do $sudo kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    $sudo kill -9 "$pid" 2>/dev/null || true
  fi
  $sudo rm -rf "$work"
}
trap cleanup EXIT

# Password complexity is enforced: upper, lower, digit and symbol.
password="Idsync-Admin-$RANDOM$RANDOM!"
reader_password="Idsync-Reader-$RANDOM$RANDOM!"
dc="$work/dc"
echo "== provisioning the domain IDSYNC.TEST in $dc"
$sudo samba-tool domain provision --targetdir="$dc" --realm=IDSYNC.TEST --domain=IDSYNC \
  --server-role=dc --dns-backend=NONE --adminpass="$password" --use-rfc2307 \
  --option="interfaces=127.0.0.1" --option="bind interfaces only=yes" > "$work/provision.log" 2>&1 \
  || { cat "$work/provision.log"; exit 1; }
$sudo mkdir -p "$dc/run" "$dc/log"
$sudo chmod 750 "$dc/run"
# Only the services the tests use; every path under $dc. Plain simple binds are allowed (tests
# run on loopback); a production directory keeps `ldap server require strong auth` at its default.
$sudo tee "$dc/etc/smb.conf" >/dev/null <<CONF
[global]
	netbios name = IDSYNCDC
	realm = IDSYNC.TEST
	workgroup = IDSYNC
	server role = active directory domain controller
	server services = ldap, cldap, kdc
	interfaces = 127.0.0.1
	bind interfaces only = yes
	disable netbios = yes
	ldap server require strong auth = no
	private dir = $dc/private
	state directory = $dc/state
	cache directory = $dc/cache
	lock directory = $dc
	binddns dir = $dc/bind-dns
	pid directory = $dc/run
	ncalrpc dir = $dc/run/ncalrpc
	ntp signd socket directory = $dc/run/ntp
	winbindd socket directory = $dc/run/winbindd
	log file = $dc/log/log.%m
	logging = file
	idmap_ldb:use rfc2307 = yes
CONF
$sudo samba-tool user add idsync-reader "$reader_password" -H "$dc/private/sam.ldb" -s "$dc/etc/smb.conf" >/dev/null

$sudo samba -i -M single -s "$dc/etc/smb.conf" > "$work/samba.log" 2>&1 &
pid=$!
up=""
for _ in $(seq 300); do
  if ldapsearch -x -H ldap://127.0.0.1 -b "" -s base "(objectClass=*)" >/dev/null 2>&1; then up=1; break; fi
  if ! $sudo kill -0 "$pid" 2>/dev/null; then break; fi
  sleep 0.1
done
if [ -z "$up" ]; then
  echo "samba did not start (no LDAP answer on 127.0.0.1:389 within 30 s):"
  $sudo cat "$work/samba.log" "$dc"/log/log.* 2>/dev/null | tail -40
  exit 1
fi

export IDSYNC_TEST_AD="ldap://127.0.0.1"
export IDSYNC_TEST_AD_PASSWORD="$password"
export IDSYNC_TEST_AD_READER_PASSWORD="$reader_password"
if [ "$mode" = serve ]; then
  echo "IDSYNC_TEST_AD=$IDSYNC_TEST_AD IDSYNC_TEST_AD_PASSWORD='$password' IDSYNC_TEST_AD_READER_PASSWORD='$reader_password'"
  echo "bind as Administrator@IDSYNC.TEST (or idsync-reader@IDSYNC.TEST); base DC=idsync,DC=test; Ctrl-C stops it"
  wait "$pid"
else
  . scripts/lib/scim2-server.sh
  start_scim2_server
  cargo test -q --locked -p idsync-connectors --test ad_source -- --ignored
  cargo test -q --locked -p idsync --test ldap_cli -- --ignored active_directory
fi
