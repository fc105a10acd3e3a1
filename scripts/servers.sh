#!/usr/bin/env bash
# Runs the tests that need real servers, on 127.0.0.1: the state backends' conformance suite
# against moto server (S3 and STS, from PyPI) and Azurite (Azure Blob, from npm, with
# --disableTelemetry), and the generic SCIM target against scim2-server (PyPI). They are installed on
# first use (into .venv and .services/), started on free ports, given a bucket and a container, and
# stopped by their pids on exit. The GCS backend runs against idsync's own emulator inside
# `cargo test` (no emulator in the registries honours GCS preconditions).
#
# Then the fault suite (scripts/faults.sh) at the size CI can afford, with state on moto and
# Azurite too. `scripts/servers.sh faults [ci|full] [STRIDE]` runs only the fault suite.
#
# Environment: IDSYNC_VENV (default .venv); IDSYNC_FAULTS_ONLY (only the fault cases whose name
# contains it).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-all}"

for tool in python3 npm curl; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "error: $tool is required for the tests against real servers (Python 3.10+, Node.js 20+ with npm, curl)" >&2
    exit 1
  fi
done

venv="${IDSYNC_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r tests/servers/requirements.txt

# Azurite 3.35.0: the last release that runs on Node 20 (3.36 needs 21, 3.37 needs 22).
if [ ! -x .services/node_modules/.bin/azurite-blob ]; then
  mkdir -p .services
  npm install --silent --no-audit --no-fund --prefix .services azurite@3.35.0 >/dev/null
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  "$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_for() { # url name log [curl options]
  for _ in $(seq 300); do
    if curl -s -o /dev/null "${@:4}" "$1"; then return 0; fi
    sleep 0.1
  done
  echo "$2 did not start:"; cat "$3"; exit 1
}

moto_port=$(free_port)
"$venv/bin/moto_server" -H 127.0.0.1 -p "$moto_port" > "$work/moto.log" 2>&1 &
pids+=($!)
azurite_port=$(free_port)
.services/node_modules/.bin/azurite-blob --blobHost 127.0.0.1 --blobPort "$azurite_port" \
  --location "$work/azurite" --skipApiVersionCheck --disableTelemetry --silent > "$work/azurite.log" 2>&1 &
pids+=($!)

# A second Azurite over HTTPS with OAuth ("basic": it reads a bearer token's issuer, audience and
# lifetime, not its signature), for the Azure state paths that sign in with Entra ID: a service
# principal, workload identity, a managed identity. Its certificate (CA:FALSE, for 127.0.0.1) is
# made with Python's cryptography, which azure-storage-blob already installs.
"$venv/bin/python" - "$work" <<'PY'
import datetime, ipaddress, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
open(sys.argv[1] + "/azurite-cert.pem", "wb").write(cert.public_bytes(serialization.Encoding.PEM))
open(sys.argv[1] + "/azurite-key.pem", "wb").write(key.private_bytes(serialization.Encoding.PEM,
     serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
PY
azurite_tls_port=$(free_port)
.services/node_modules/.bin/azurite-blob --blobHost 127.0.0.1 --blobPort "$azurite_tls_port" \
  --location "$work/azurite-tls" --cert "$work/azurite-cert.pem" --key "$work/azurite-key.pem" \
  --oauth basic --skipApiVersionCheck --disableTelemetry --silent > "$work/azurite-tls.log" 2>&1 &
pids+=($!)

scim_port=$(free_port)
scim_token="idsync-test-$RANDOM$RANDOM"
"$venv/bin/scim2-server" --hostname 127.0.0.1 --port "$scim_port" --bearer-token "$scim_token" \
  > "$work/scim.log" 2>&1 &
pids+=($!)

wait_for "http://127.0.0.1:$moto_port/" moto "$work/moto.log"
wait_for "http://127.0.0.1:$scim_port/ServiceProviderConfig" scim2-server "$work/scim.log"
wait_for "http://127.0.0.1:$azurite_port/devstoreaccount1?comp=list" Azurite "$work/azurite.log"
wait_for "https://127.0.0.1:$azurite_tls_port/devstoreaccount1?comp=list" "Azurite (HTTPS)" \
  "$work/azurite-tls.log" --cacert "$work/azurite-cert.pem"

# The bucket and the container (object stores are not asked to create them).
curl -sf -X PUT "http://127.0.0.1:$moto_port/idsync-state" > /dev/null
# A container SAS (read, add, create, write, delete, list) for the SAS variant of the suite.
sas=$("$venv/bin/python" - "$azurite_port" <<'PY'
import datetime, sys
from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas
key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
cs = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=" + key +
      ";BlobEndpoint=http://127.0.0.1:%s/devstoreaccount1;" % sys.argv[1])
BlobServiceClient.from_connection_string(cs).create_container("idsync-state")
print(generate_container_sas("devstoreaccount1", "idsync-state", account_key=key,
      permission=ContainerSasPermissions(read=True, add=True, create=True, write=True, delete=True, list=True),
      expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=2)))
PY
)
"$venv/bin/python" - "$azurite_tls_port" "$work/azurite-cert.pem" <<'PY'
import sys
from azure.storage.blob import BlobServiceClient
key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
cs = ("DefaultEndpointsProtocol=https;AccountName=devstoreaccount1;AccountKey=" + key +
      ";BlobEndpoint=https://127.0.0.1:%s/devstoreaccount1;" % sys.argv[1])
BlobServiceClient.from_connection_string(cs, connection_verify=sys.argv[2]).create_container("idsync-state")
PY

if [ "$mode" != faults ]; then
  IDSYNC_TEST_MOTO="http://127.0.0.1:$moto_port" \
  IDSYNC_TEST_AZURITE="http://127.0.0.1:$azurite_port/devstoreaccount1" \
  IDSYNC_TEST_AZURITE_SAS="$sas" \
  AZURE_STORAGE_ACCOUNT_NAME=devstoreaccount1 \
  AZURE_STORAGE_ACCOUNT_KEY="Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==" \
  AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 \
    cargo test -q --locked -p idsync-state --test backends -- --ignored --test-threads 1
  # The real binary with S3 state on moto, signed in from Azure (web_identity = "entra") and as a
  # role on top of the container and instance roles (STS: idsync's AWS emulator).
  IDSYNC_TEST_MOTO="http://127.0.0.1:$moto_port" \
    cargo test -q --locked -p idsync --test aws_state -- --ignored
  # The real binary with Azure state signed in through Entra ID (the Graph emulator): a service
  # principal, workload identity, a managed identity, on Azurite over HTTPS with OAuth.
  IDSYNC_TEST_AZURITE_TLS="https://127.0.0.1:$azurite_tls_port/devstoreaccount1" \
  IDSYNC_TEST_AZURITE_CA="$work/azurite-cert.pem" \
    cargo test -q --locked -p idsync --test azure_state -- --ignored
  IDSYNC_TEST_SCIM="http://127.0.0.1:$scim_port" IDSYNC_TEST_SCIM_TOKEN="$scim_token" \
    cargo test -q --locked -p idsync-connectors --test scim_target -- --ignored
fi

# The fault suite: the real idsync binary killed, stormed and raced against the emulators, with
# state in a folder, on moto, on Azurite and on idsync's GCS emulator. CI runs the small size
# (every write boundary of a plan of about a hundred writes); `full` is a plan of over 1,000
# operations, built in release mode, for a person to run.
size="${2:-ci}"
stride="${3:-1}"
profile=debug
if [ "$size" = full ]; then
  profile=release
  cargo build --release --locked -q -p idsync -p idsync-emulators --bin idsync --bin idsync-faults
else
  cargo build --locked -q -p idsync -p idsync-emulators --bin idsync --bin idsync-faults
fi
echo "== the fault suite ($size, every ${stride} write boundary)"
"target/$profile/idsync-faults" --idsync "target/$profile/idsync" --size "$size" --stride "$stride" \
  --moto "http://127.0.0.1:$moto_port" \
  --azurite "http://127.0.0.1:$azurite_port/devstoreaccount1" \
  --gcs-key tests/fixtures/entra-test-client.pem \
  --markdown "target/faults-$size.md" ${IDSYNC_FAULTS_ONLY:+--only "$IDSYNC_FAULTS_ONLY"}
