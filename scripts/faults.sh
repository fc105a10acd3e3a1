#!/usr/bin/env bash
# The fault suite (issue #15; RELIABILITY.md holds its table): the real idsync binary against the
# emulators, killed with SIGKILL at every write boundary of an apply (and of a rollback), through
# 5xx/429 storms, HTML error pages, truncated bodies and dropped connections, raced by two and three
# concurrent runs with the state in a folder, on moto (S3), Azurite and the GCS emulator, with its
# lease taken over and its disk full. Each case must end with the target as a clean run leaves it,
# nothing twice, a readable state and a next run that writes nothing. Everything on 127.0.0.1.
#
#   scripts/faults.sh            # the CI size: every write boundary of a plan of about 100 writes
#   scripts/faults.sh full       # a plan of over 1,000 operations, in release mode (long)
#   scripts/faults.sh full 10    # ... at every 10th write boundary
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/servers.sh faults "${1:-ci}" "${2:-1}"
