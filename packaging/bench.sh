#!/usr/bin/env bash
# Every Keel performance figure beside its baseline, measured in one run: builds in
# release mode, runs each benchmark (they start their own keeld, private containerd and
# images, and clean up), repeats the short ones, and prints one table of medians with
# min/max, then writes the same figures as JSON.
#
# Usage: packaging/bench.sh            (as root on Debian 12; about 5 minutes)
#   KEEL_BENCH_RUNS=N     repetitions of the API and apply benchmarks (default 5)
#   KEEL_BENCH_SECS=S     seconds per API measurement (default 2)
#   KEEL_BENCH_ITERS=N    starts/boots per side in the container benchmarks (default 7)
#   KEEL_BENCH_JSON=path  where the JSON goes (default target/bench/keel-bench.json)
#   KEEL_BENCH_IMAGE=1    also the Keel OS image figures (builds the image, boots it twice
#                         under qemu: 3-5 more minutes under TCG; tests/benches/image.rs)
#                         and reboot-to-configured of an activated update against plain
#                         reboots (two image versions, four UEFI boots: 6-10 more
#                         minutes; tests/benches/update_reboot.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
bash packaging/dev/deps.sh
runs="${KEEL_BENCH_RUNS:-5}"
export KEEL_BENCH_SECS="${KEEL_BENCH_SECS:-2}"
export KEEL_BENCH_ITERS="${KEEL_BENCH_ITERS:-7}"
out_json="${KEEL_BENCH_JSON:-target/bench/keel-bench.json}"
raw="$(mktemp -d /tmp/keel-bench.XXXXXX)"
trap 'rm -rf "$raw"' EXIT
mkdir -p "$(dirname "$out_json")"

echo "== building (release)"
cargo build --release --bins --quiet
cargo bench -p keel-e2e --no-run --quiet 2>/dev/null

started=$(date +%s)
bench() { # name, run number: runs one bench binary, keeps its BENCH_JSON line
  local name=$1 n=$2
  if ! cargo bench -q -p keel-e2e --bench "$name" >"$raw/$name.$n.log" 2>&1; then
    echo "bench $name failed:" >&2; tail -30 "$raw/$name.$n.log" >&2; exit 1
  fi
  grep '^BENCH_JSON ' "$raw/$name.$n.log" | tail -1 | cut -d' ' -f2- >"$raw/$name.$n.json"
}
for n in $(seq "$runs"); do
  echo "== run $n/$runs: API, apply"
  bench api "$n"
  bench apply "$n"
done
echo "== host container start (keeld vs ctr run, $KEEL_BENCH_ITERS each)"
bench containers 1
echo "== boot with 3 bootstrap containers (keeld vs ctr run, $KEEL_BENCH_ITERS each)"
bench boot 1
echo "== update: download + verify + write of a root image (keeld vs dd, $KEEL_BENCH_ITERS each)"
bench updates 1
echo "== exec: round trip and throughput (apiclient exec vs ctr task exec)"
bench exec 1
echo "== events: commit to 100 followers, commit throughput with and without them"
bench events 1
echo "== render of the largest model the limits accept"
bench render_max 1
if [ "${KEEL_BENCH_IMAGE:-0}" = 1 ]; then
  echo "== Keel OS image: build, size, boot to configured vs Keel masked (qemu)"
  cargo bench -q -p keel-e2e --bench image 2>/dev/null | grep -v '^build.sh' >"$raw/image.txt"
  echo "== Keel OS update: activate-update + reboot vs plain reboots, to configured (qemu, UEFI)"
  cargo bench -q -p keel-e2e --bench update_reboot 2>/dev/null | grep -v '^build.sh' >>"$raw/image.txt"
fi

# One JSON document: per figure, median/min/max over the runs (the container benches
# report their own medians over their iterations).
jq -n \
  --slurpfile api <(cat "$raw"/api.*.json) \
  --slurpfile apply <(cat "$raw"/apply.*.json) \
  --slurpfile containers "$raw/containers.1.json" \
  --slurpfile boot "$raw/boot.1.json" \
  --slurpfile updates "$raw/updates.1.json" \
  --slurpfile exec "$raw/exec.1.json" \
  --slurpfile events "$raw/events.1.json" \
  --slurpfile render_max "$raw/render_max.1.json" \
  --argjson runs "$runs" --argjson secs "$KEEL_BENCH_SECS" '
  def stats: sort as $s | {median: (if ($s|length) % 2 == 1 then $s[($s|length)/2|floor] else ($s[($s|length)/2 - 1] + $s[($s|length)/2]) / 2 end), min: $s[0], max: $s[-1]};
  def over($runs; f): [$runs[] | f] | stats;
  {
    runs: $runs, secs_per_measurement: $secs, cpus: $api[0].cpus,
    get_settings: {
      c1: {per_sec: over($api; .runs.get_settings_c1.per_sec), p50_ms: over($api; .runs.get_settings_c1.p50_ms), p99_ms: over($api; .runs.get_settings_c1.p99_ms)},
      c8: {per_sec: over($api; .runs.get_settings_c8.per_sec), p50_ms: over($api; .runs.get_settings_c8.p50_ms), p99_ms: over($api; .runs.get_settings_c8.p99_ms)}
    },
    set_commit: {
      c1: {per_sec: over($api; .runs.set_commit_c1.per_sec), p50_ms: over($api; .runs.set_commit_c1.p50_ms), p99_ms: over($api; .runs.set_commit_c1.p99_ms), ratio_to_floor: over($api; .ratio_set_commit_c1_to_floor)},
      c8: {per_sec: over($api; .runs.set_commit_c8.per_sec), p50_ms: over($api; .runs.set_commit_c8.p50_ms), p99_ms: over($api; .runs.set_commit_c8.p99_ms), ratio_to_floor: over($api; .ratio_set_commit_c8_to_floor)},
      floor: {per_sec: over($api; .floor.per_sec), p50_ms: over($api; .floor.p50_ms)}
    },
    commit_to_file_ms: {p50: over($apply; .commit_to_file_ms.p50), p99: over($apply; .commit_to_file_ms.p99), beyond_commit_p50: over($apply; .beyond_commit_p50_ms)},
    full_render_ms: {p50: over($apply; .full_render_ms.p50), files: $apply[0].full_render_ms.files},
    host_container_start: $containers[0],
    boot: $boot[0],
    update: $updates[0],
    exec: $exec[0],
    events: $events[0],
    render_max_ms: $render_max[0].render_max_ms,
    rss_kib: {idle: over($api; .rss_kib.idle), after_load: over($api; .rss_kib.after_load)},
    binary_bytes: $api[0].binary_bytes
  }' >"$out_json"

# The table.
jq -r '
  def f1: . * 10 | round / 10;
  def f2: . * 100 | round / 100;
  def s($x; fmt): "\($x.median | fmt)  [\($x.min | fmt) – \($x.max | fmt)]";
  def row($a; $b; $c): "\($a | . + " " * ([44 - length, 1] | max))\($b | . + " " * ([40 - length, 1] | max))\($c)";
  row("figure"; "median [min – max]"; "baseline (same run)"),
  row("GET /settings, 1 client, req/s"; s(.get_settings.c1.per_sec; round); "—"),
  row("  p50 / p99 ms"; "\(.get_settings.c1.p50_ms.median | f2) / \(.get_settings.c1.p99_ms.median | f2)"; "—"),
  row("GET /settings, 8 clients, req/s"; s(.get_settings.c8.per_sec; round); "—"),
  row("  p50 / p99 ms"; "\(.get_settings.c8.p50_ms.median | f2) / \(.get_settings.c8.p99_ms.median | f2)"; "—"),
  row("set+commit, 1 client, cycles/s"; s(.set_commit.c1.per_sec; round); "fsync floor \(.set_commit.floor.per_sec.median | round)/s; ratio \(.set_commit.c1.ratio_to_floor.median | f2)"),
  row("  p50 / p99 ms"; "\(.set_commit.c1.p50_ms.median | f2) / \(.set_commit.c1.p99_ms.median | f2)"; "floor p50 \(.set_commit.floor.p50_ms.median | f2) ms"),
  row("set+commit, 8 clients, cycles/s"; s(.set_commit.c8.per_sec; round); "ratio to floor \(.set_commit.c8.ratio_to_floor.median | f2)"),
  row("  p50 / p99 ms"; "\(.set_commit.c8.p50_ms.median | f2) / \(.set_commit.c8.p99_ms.median | f2)"; ""),
  row("commit → rendered motd, p50 ms"; s(.commit_to_file_ms.p50; f2); "beyond the commit: \(.commit_to_file_ms.beyond_commit_p50.median | f2) ms"),
  row("full render of all files, p50 ms"; s(.full_render_ms.p50; f2); "\(.full_render_ms.files) files"),
  row("host container start, keeld, ms"; "\(.host_container_start.keeld_start_ms.median | f1)  [\(.host_container_start.keeld_start_ms.min | f1) – \(.host_container_start.keeld_start_ms.max | f1)]"; "ctr run \(.host_container_start.ctr_start_ms.median | f1) ms; ratio \(.host_container_start.ratio_keeld_to_ctr | f2)"),
  row("boot to configured (3 bootstrap), ms"; "\(.boot.keeld_boot_ms.median | f1)  [\(.boot.keeld_boot_ms.min | f1) – \(.boot.keeld_boot_ms.max | f1)]"; "3× ctr run \(.boot.ctr_three_ms.median | f1) ms; ratio \(.boot.ratio_keeld_to_ctr | f2)"),
  row("update prepare (download+verify+write), MB/s"; "\(.update.prepare_mb_per_s.median | f1)  [\(.update.prepare_mb_per_s.min | f1) – \(.update.prepare_mb_per_s.max | f1)]"; "dd conv=fsync \(.update.dd_mb_per_s.median | f1) MB/s; ratio \(.update.ratio_prepare_to_dd | f2)"),
  row("exec round trip (true), ms"; "\(.exec.round_trip_ms.apiclient.median | f1)  [\(.exec.round_trip_ms.apiclient.min | f1) – \(.exec.round_trip_ms.apiclient.max | f1)]"; "ctr task exec \(.exec.round_trip_ms.ctr.median | f1) ms; ratio \(.exec.round_trip_ms.ratio | f2)"),
  row("exec throughput, MB/s"; "\(.exec.throughput_mb_s.apiclient.median | f1)  [\(.exec.throughput_mb_s.apiclient.min | f1) – \(.exec.throughput_mb_s.apiclient.max | f1)]"; "ctr task exec \(.exec.throughput_mb_s.ctr.median | f1) MB/s; ratio \(.exec.throughput_mb_s.ratio | f2)"),
  row("commit → event at 100 followers, p99 ms"; "\(.events.event_all_p99_ms | f2)  (p50 \(.events.event_all_p50_ms | f2))"; "commit round trip p99 \(.events.commit_p99_ms | f2) ms"),
  row("commits/s with 100 followers"; "\(.events.throughput_followers | sort | .[length/2|floor] | round)"; "none \(.events.throughput_none | sort | .[length/2|floor] | round)/s; ratio \(.events.throughput_ratio | f2)"),
  row("render of the largest model, worst ms"; "\(.render_max_ms.max | f1)"; "\(.render_max_ms.bytes) bytes rendered"),
  row("keeld RSS idle / after load, MiB"; "\(.rss_kib.idle.median / 1024 | f1) / \(.rss_kib.after_load.median / 1024 | f1)"; "—"),
  row("binary sizes, MiB"; "keeld \(.binary_bytes.keeld / 1048576 | f1), apiclient \(.binary_bytes.apiclient / 1048576 | f1)"; "—")
' "$out_json"
if [ -s "$raw/image.txt" ]; then
  echo
  cat "$raw/image.txt"
fi
echo
echo "JSON: $out_json   ($(( $(date +%s) - started )) s of measuring, $runs runs of the short benches)"
