#!/usr/bin/env bash
# The demo node: a private containerd, keeld booting from example user-data, a `once`
# bootstrap container and the admin host container, both from images built here from
# busybox-static; then apiclient shows the result. Everything lives under one temporary
# directory and is stopped and removed at the end.
#
# Usage (as root, Debian 12; installs what it needs):
#   packaging/dev/demo.sh            # runs, prints, and (on a terminal) waits for Enter
#   KEEL_DEMO_WAIT=0 packaging/dev/demo.sh   # never waits (CI, scripts)
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"
bash packaging/dev/deps.sh
echo "== building keeld, apiclient, keel-logger and the image builder"
cargo build --workspace --bins --quiet
cargo build -p keel-e2e --example oci-image --quiet
bin="$repo/target/debug"

work="$(mktemp -d /tmp/keel-demo.XXXXXX)"
ns=keel-demo
cd_sock="$work/containerd/containerd.sock"
sock="$work/run/api.sock"
keeld_pid="" containerd_pid=""
ctr() { command ctr --address "$cd_sock" --namespace "$ns" "$@"; }
api() { echo "\$ apiclient $*"; "$bin/apiclient" -s "$sock" "$@"; }

cleanup() {
  set +e
  echo
  echo "== stopping the demo node"
  if [[ -n "$keeld_pid" ]]; then kill "$keeld_pid" 2>/dev/null; wait "$keeld_pid" 2>/dev/null; fi
  if [[ -n "$containerd_pid" ]]; then
    for task in $(ctr tasks ls -q 2>/dev/null); do ctr tasks kill -s SIGKILL "$task" >/dev/null 2>&1; done
    sleep 0.5
    for task in $(ctr tasks ls -q 2>/dev/null); do ctr tasks delete --force "$task" >/dev/null 2>&1; done
    for c in $(ctr containers ls -q 2>/dev/null); do ctr containers delete "$c" >/dev/null 2>&1; done
    kill "$containerd_pid" 2>/dev/null; wait "$containerd_pid" 2>/dev/null
  fi
  # Anything still mounted under the work directory (rootfs of a killed task).
  awk -v w="$work" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$work"
  echo "stopped; $work removed"
}
trap cleanup EXIT

echo "== building demo images (OCI archives) from busybox-static"
mkdir -p "$work/images"
"$bin/examples/oci-image" "$work/images/admin.tar" --with "$bin/apiclient" -- /bin/sh -c '
  echo "admin container up; user-data: $(cat /.bottlerocket/host-containers/admin/user-data)"
  echo "motd through the API: $(apiclient get settings.motd)"
  exec sleep 2147483647'
"$bin/examples/oci-image" "$work/images/setup.tar" -- /bin/sh -c '
  echo "setup ran at boot $(cat /proc/sys/kernel/random/boot_id)" > /.bottlerocket/bootstrap-containers/setup/ran
  echo "setup: done"'

echo "== starting a private containerd ($cd_sock, namespace $ns)"
mkdir -p "$work/containerd"
cat > "$work/containerd/config.toml" <<EOF
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.internal.v1.opt", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
address = "$cd_sock"
[ttrpc]
address = "$cd_sock.ttrpc"
EOF
containerd --config "$work/containerd/config.toml" >"$work/containerd/log" 2>&1 &
containerd_pid=$!
for _ in $(seq 200); do [[ -S "$cd_sock" ]] && break; sleep 0.05; done
[[ -S "$cd_sock" ]] || { echo "containerd did not start:"; cat "$work/containerd/log"; exit 1; }

cat > "$work/user-data.toml" <<TOML
[settings]
motd = "Welcome to the Keel demo node"

# A bootstrap container that runs at the next boot only, then switches itself off.
[settings.bootstrap-containers.setup]
source = "oci-archive:$work/images/setup.tar"
mode = "once"
essential = true

[settings.host-containers.admin]
enabled = true
superpowered = true
source = "oci-archive:$work/images/admin.tar"
user-data = "$(printf 'ssh keys would go here' | base64 -w0)"

# The OS defaults enable the control container from a public registry; this demo
# machine has no internet, so user-data turns it off.
[settings.host-containers.control]
enabled = false
TOML

# This machine's own services must not be restarted by the demo: restart commands are
# prefixed with `echo would-run`, and files render under $work/root instead of /.
sed -E '/^restart-commands/ s#\["/#["/bin/echo", "would-run", "/#g' packaging/services.toml > "$work/services.toml"

echo "== starting keeld: first boot with example user-data ($work/user-data.toml)"
"$bin/keeld" --socket "$sock" --socket-group 0 \
  --state-dir "$work/state" --runtime-dir "$work/run" --persistent-dir "$work/local" \
  --render-root "$work/root" --services "$work/services.toml" --templates packaging/templates \
  --os-defaults packaging/defaults.toml --user-data-providers defaults,file,overrides \
  --user-data-defaults "$work/none.toml" --user-data-file "$work/user-data.toml" \
  --user-data-overrides "$work/none.toml" \
  --containerd-socket "$cd_sock" --containerd-namespace "$ns" 2>"$work/keeld.log" &
keeld_pid=$!

echo
api boot wait --timeout 120s || { echo "keeld log:"; tail -50 "$work/keeld.log"; exit 1; }
echo
echo "\$ apiclient boot status   # summarized with jq"
"$bin/apiclient" -s "$sock" boot status | jq -r '"phase: \(.phase)   first boot: \(."first-boot")   took \(."duration-ms") ms",
  (.steps[] | "  \(.name | . + " " * (34 - length)) \(.outcome | . + " " * (10 - length)) \(."duration-ms" // 0) ms  \(.detail // "")")'
echo
# Host containers start once the boot is configured; give admin a moment.
for _ in $(seq 100); do
  "$bin/apiclient" -s "$sock" containers -o json | jq -e '.[] | select(.name=="admin" and .state=="running")' >/dev/null && break
  sleep 0.1
done
api containers
echo
api get settings.bootstrap-containers.setup.mode
echo "\$ cat $work/local/bootstrap-containers/setup/ran"
cat "$work/local/bootstrap-containers/setup/ran"
echo
echo "\$ apiclient history --limit 3 | jq …"
"$bin/apiclient" -s "$sock" history --limit 3 | jq -c '.[] | {generation, tx, time}' 
echo
sleep 0.5
api logs admin
echo
echo "== rendered configuration ($work/root):"
find "$work/root" -type f | sed "s#$work/root##" | sort | head -30

if [[ "${KEEL_DEMO_WAIT:-1}" != 0 && -t 0 ]]; then
  cat <<EOF

The demo node is running. Poke at it from another shell:
  $bin/apiclient -s $sock containers
  $bin/apiclient -s $sock logs admin
  $bin/apiclient -s $sock set host-containers.admin.environment.GREETING=hi   # restarts admin only
  $bin/apiclient -s $sock boot status
  ctr --address $cd_sock --namespace $ns tasks ls
Press Enter here to stop it (everything under $work is removed).
EOF
  read -r _
fi
