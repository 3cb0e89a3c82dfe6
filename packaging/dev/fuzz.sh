#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz / libFuzzer) of Keel's parsers: every target in
# fuzz/fuzz_targets for SECONDS_PER_TARGET seconds each, then one line per target with
# the number of executions and whether it crashed.
# Usage: packaging/dev/fuzz.sh [SECONDS_PER_TARGET]   (default 60; from anywhere)
# Exits non-zero when a target crashed; the crashing input is in fuzz/artifacts/<target>/
# (replay: cargo +nightly fuzz run <target> <file>; shrink: cargo +nightly fuzz tmin ...).
# The committed seeds in fuzz/corpus/<target>/ are only read: what the fuzzer finds goes
# to fuzz/target/corpus/<target>/, which persists between runs and is not committed.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET]   (a positive whole number; default 60)" >&2
    exit 2
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: cargo-fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# Longest input per target: enough for real documents, short enough to stay fast.
declare -A max_len=(
    [user_data]=16384
    [settings_patch]=16384
    [key_path]=512
    [key_value]=2048
    [image_ref]=8192
    [imds_response]=65536
)
# Bottlerocket's documented user-data examples, when this checkout sits next to them
# (CI has them): read as extra seeds, never copied into the project.
shared_fixtures="../../shared/fixtures/user-data/bottlerocket-docs"   # from fuzz/

cd fuzz
# Build every target once, so a build failure stops here and no fuzzing time goes to it.
cargo +nightly fuzz build

targets=$(cargo +nightly fuzz list)
logs="target/fuzz-logs"
mkdir -p "$logs"
summary=()
crashed=0
for target in $targets; do
    work="target/corpus/$target"
    mkdir -p "$work"
    seeds=("$work" "corpus/$target")
    if [[ "$target" == user_data && -d "$shared_fixtures" ]]; then
        seeds+=("$shared_fixtures")
    fi
    log="$logs/$target.log"
    echo "fuzz.sh: $target for ${seconds}s (log: fuzz/$log)" >&2
    status=0
    cargo +nightly fuzz run "$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" \
        -max_len="${max_len[$target]:-4096}" \
        -rss_limit_mb=2048 \
        -timeout=10 \
        -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    # libFuzzer's final "Done N runs"; after a crash there is none: the last "#N" status.
    runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | tail -n 1 | grep -Eo '[0-9]+' || true)
    if [[ -z "$runs" ]]; then
        runs=$(grep -Eo '^#[0-9]+' "$log" | tail -n 1 | tr -d '#' || true)
    fi
    artifact=$(grep -Eo '(Test unit|artifact) written to [^ ]+' "$log" | tail -n 1 | awk '{print $NF}' || true)
    if [[ $status -ne 0 || -n "$artifact" ]]; then
        crashed=1
        result="CRASH (exit $status)${artifact:+ input: $artifact}"
        # The panic message and the top of the backtrace, for the impatient.
        grep -E -m 5 "panicked at|^==[0-9]+==ERROR|SUMMARY" "$log" >&2 || true
    else
        result="no crash"
    fi
    summary+=("$(printf '%-16s %12s runs  %s' "$target" "${runs:-?}" "$result")")
done

echo
echo "fuzz.sh: ${seconds}s per target"
printf '%s\n' "${summary[@]}"
if [[ $crashed -ne 0 ]]; then
    echo "fuzz.sh: at least one target crashed; see fuzz/$logs/ and fuzz/artifacts/" >&2
    exit 1
fi
