#!/usr/bin/env bash
# Kills keeld with SIGKILL at random moments during a stream of commits, N times
# (default 300), and checks after each restart that every acknowledged commit is there.
# The run prints its RNG seed; KEEL_CRASH_SEED=<seed> replays a failing run's kill delays.
# Usage: [KEEL_CRASH_SEED=<seed>] packaging/dev/crash-soak.sh [N]
set -euo pipefail
cd "$(dirname "$0")/../.."
n="${1:-300}"
cargo build --workspace --bins
KEEL_CRASH_ITERATIONS="$n" cargo test -p keel-e2e --test crash -- --nocapture 2>&1 | grep -E '^crash:|test result|panicked'
