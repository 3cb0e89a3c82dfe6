#!/usr/bin/env bash
# API throughput/latency benchmark of the release keeld over its Unix socket, next to the
# physical floor (write + fsync + rename + fsync dir) on the same file system.
# Usage: packaging/dev/bench.sh   (from anywhere; KEEL_BENCH_SECS=N sets seconds per row)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash packaging/dev/deps.sh
# The bench starts the real keeld found next to it, in target/release: build it first.
cargo build --release --bins
cargo bench -p keel-e2e --bench api
cargo bench -p keel-e2e --bench apply
# Host-container start latency, keeld next to `ctr run` (needs root, containerd, runc).
cargo bench -p keel-e2e --bench containers
# Boot to `configured` with three bootstrap containers, keeld next to three `ctr run --rm`.
cargo bench -p keel-e2e --bench boot
# Update download + verify + write of a root image, keeld next to dd conv=fsync.
cargo bench -p keel-e2e --bench updates
