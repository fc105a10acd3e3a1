#!/usr/bin/env bash
# The LDAP source's tests against a real OpenLDAP: installs slapd and ldap-utils from Debian when
# they are missing (apt-get, as root or through sudo), starts a private slapd on 127.0.0.1 from a
# temporary folder with its own slapd.conf, runs the tests, and stops it by its pid.
#
# The server has two databases:
#   dc=idsync,dc=test  with syncprov (RFC 4533, a session log so deletions are sent as such) and
#                      refint (a renamed or deleted user leaves its groups' member values), like a
#                      production directory idsync reads incrementally;
#   dc=nosync,dc=test  without syncprov, to check the message and the fallback to full reads.
# It listens on ldap:// (StartTLS) and ldaps:// with a certificate from a private CA made here, and
# has the memberof overlay, as production directories do, and an account with a size limit.
# Each test makes its own organizational unit, so the tests share one server.
#
# The command-line test (crates/cli/tests/ldap_cli.rs) also syncs into a real SCIM server:
# scim2-server from PyPI, installed into .venv (IDSYNC_VENV) and started on 127.0.0.1 beside slapd.
#
#   scripts/ldap.sh            # the tests
#   scripts/ldap.sh serve      # start it and print the environment, until Ctrl-C (for a person)
#   scripts/ldap.sh bench [USERS GROUPS PER_GROUP]
#                              # the LDAP source's benchmark (crates/connectors/benches/ldap.rs;
#                              # default 10,000 users, 1,000 groups of 20), results in bench/RESULTS.md
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-test}"

if ! command -v slapd >/dev/null 2>&1 && [ ! -x /usr/sbin/slapd ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "== installing slapd and ldap-utils (Debian packages)"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slapd ldap-utils >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slapd ldap-utils >/dev/null; }
fi
if ! command -v openssl >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "== installing openssl (Debian package), for the test server's certificates"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssl >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssl >/dev/null; }
fi
slapd=$(command -v slapd || echo /usr/sbin/slapd)

work=$(mktemp -d)
pid=""
scim_pid=""
cleanup() {
  for p in $pid $scim_pid; do
    kill "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
password="idsync-admin-$RANDOM$RANDOM"
mkdir -p "$work/db" "$work/nosync"
modules=/usr/lib/ldap
# A private CA and a certificate for 127.0.0.1, for StartTLS and ldaps:// (the CA goes to the tests
# as ca_bundle).
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=idsync test CA" \
  -keyout "$work/ca.key" -out "$work/ca.pem" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>"$work/openssl.log" \
  || { cat "$work/openssl.log"; exit 1; }
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$work/server.key" -out "$work/server.csr" 2>"$work/openssl.log" \
  || { cat "$work/openssl.log"; exit 1; }
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n' > "$work/server.ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
  -days 2 -extfile "$work/server.ext" -out "$work/server.pem" 2>"$work/openssl.log" \
  || { cat "$work/openssl.log"; exit 1; }
tls_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
limited_password="idsync-limited-$RANDOM$RANDOM"
cat > "$work/slapd.conf" <<EOF
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/nis.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath $modules
moduleload back_mdb
moduleload syncprov
moduleload refint
moduleload memberof
TLSCACertificateFile $work/ca.pem
TLSCertificateFile $work/server.pem
TLSCertificateKeyFile $work/server.key
pidfile $work/slapd.pid
argsfile $work/slapd.args
sizelimit size.soft=1000 size.hard=unlimited size.prtotal=unlimited

database mdb
maxsize 1073741824
suffix "dc=idsync,dc=test"
rootdn "cn=admin,dc=idsync,dc=test"
rootpw $password
directory $work/db
index objectClass,entryUUID,entryCSN,uid,cn eq
index member,uniqueMember,memberUid eq
# An account whose searches stop at 3 entries, paged or not: the size-limit test binds as it.
limits dn.exact="cn=limited,dc=idsync,dc=test" size.soft=3 size.hard=3 size.prtotal=3
overlay memberof
overlay syncprov
syncprov-checkpoint 100 1
syncprov-sessionlog 10000
overlay refint
refint_attributes member uniqueMember
refint_nothing "cn=nobody"

database mdb
maxsize 104857600
suffix "dc=nosync,dc=test"
rootdn "cn=admin,dc=nosync,dc=test"
rootpw $password
directory $work/nosync
index objectClass,entryUUID eq
EOF

"$slapd" -f "$work/slapd.conf" -h "ldap://127.0.0.1:$port/ ldaps://127.0.0.1:$tls_port/" -d 0 > "$work/slapd.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  if ldapsearch -x -H "ldap://127.0.0.1:$port" -b "" -s base "(objectClass=*)" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then echo "slapd did not start:"; cat "$work/slapd.log"; exit 1; fi
  sleep 0.1
done

for suffix in idsync nosync; do
  ldapadd -x -H "ldap://127.0.0.1:$port" -D "cn=admin,dc=$suffix,dc=test" -w "$password" >/dev/null <<EOF
dn: dc=$suffix,dc=test
objectClass: dcObject
objectClass: organization
o: $suffix
dc: $suffix
EOF
done

if [ "$mode" = test ]; then
  . scripts/lib/scim2-server.sh
  start_scim2_server
fi

ldapadd -x -H "ldap://127.0.0.1:$port" -D "cn=admin,dc=idsync,dc=test" -w "$password" >/dev/null <<LDIF
dn: cn=limited,dc=idsync,dc=test
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: limited
userPassword: $limited_password
LDIF

export IDSYNC_TEST_LDAP="ldap://127.0.0.1:$port"
export IDSYNC_TEST_LDAPS="ldaps://127.0.0.1:$tls_port"
export IDSYNC_TEST_LDAP_CA="$work/ca.pem"
export IDSYNC_TEST_LDAP_LIMITED_PASSWORD="$limited_password"
export IDSYNC_TEST_LDAP_PASSWORD="$password"
if [ "$mode" = bench ]; then
  shift
  cargo bench -q --locked -p idsync-connectors --bench ldap -- "$@"
elif [ "$mode" = serve ]; then
  echo "IDSYNC_TEST_LDAP=$IDSYNC_TEST_LDAP IDSYNC_TEST_LDAP_PASSWORD=$IDSYNC_TEST_LDAP_PASSWORD"
  echo "admin DNs: cn=admin,dc=idsync,dc=test (syncprov) and cn=admin,dc=nosync,dc=test; Ctrl-C stops it"
  wait "$pid"
else
  cargo test -q --locked -p idsync-connectors --test ldap_source -- --ignored
  cargo test -q --locked -p idsync --test ldap_cli -- --ignored openldap
fi
