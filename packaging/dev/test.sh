#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, end-to-end tests.
# Usage: packaging/dev/test.sh   (from anywhere; installs what it needs)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash packaging/dev/deps.sh
bash packaging/image/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Licenses, banned/duplicate crates and sources (deny.toml). cargo-deny is built from
# crates.io the first time (about 10 minutes on two cores).
command -v cargo-deny >/dev/null 2>&1 || cargo install --locked cargo-deny
cargo deny --log-level error check licenses bans sources
if [ -d "${CARGO_HOME:-$HOME/.cargo}/advisory-dbs" ]; then
  cargo deny --log-level error check --disable-fetch advisories
else
  echo "cargo deny: advisories not checked: the RustSec database is fetched from GitHub, which this machine cannot reach"
fi
# The end-to-end tests run the real binaries: build them first, with the features the
# tests use (a `--bins` build resolves features without dev-dependencies and would
# compile many dependencies a second time).
cargo build --workspace --all-targets
# A proof that cannot run here fails instead of printing SKIPPED (root, ../shared).
export KEEL_REQUIRE_ALL_TESTS=1
cargo test --workspace -- --test-threads=2
# Keel OS under qemu (tests/tests/vm.rs): the image is built (cached by its inputs) and
# booted a few times, after every other test so that no build shares the CPUs with a
# boot, one VM at a time.
cargo test -p keel-e2e --test vm -- --ignored --test-threads=1
