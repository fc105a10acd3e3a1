#!/usr/bin/env bash
# Benchmarks idsync against the emulators (issue #7): builds the release binaries, then runs the
# driver at a size (small, medium, large, xlarge) with a latency per request (default 20 ms), and
# writes bench/results-SIZE.json (results-SIZE-rate-limits.json with --rate-limits) beside the
# table it prints. Options after the latency go to idsync-bench (--targets, --workers, --changes,
# --rate-limits, --rounds, --setup-latency-ms). Everything runs on 127.0.0.1.
#
#   scripts/bench.sh medium            # 10k users
#   scripts/bench.sh large 20          # 100k users, 10k groups, 1M memberships, 20 ms per request
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-small}"
latency="${2:-20}"
cargo build --release --locked -q -p idsync -p idsync-emulators --bin idsync --bin idsync-bench
out="bench/results-$size.json"
case " ${*:3} " in *" --rate-limits "*) out="bench/results-$size-rate-limits.json" ;; esac
target/release/idsync-bench --size "$size" --idsync target/release/idsync --latency-ms "$latency" "${@:3}" \
  --json "$out"
