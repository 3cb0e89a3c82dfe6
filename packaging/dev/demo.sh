#!/usr/bin/env bash
# A Keel demo on this machine: starts keeld on a temporary socket and state directory,
# applies example user-data, drives it with apiclient, restarts keeld to show that state
# is durable, and cleans up after itself.
# Usage: packaging/dev/demo.sh   (as root on Debian 12; installs what it needs)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash packaging/dev/deps.sh
cargo build --workspace --bins --quiet

work="$(mktemp -d /tmp/keel-demo.XXXXXX)"
sock="$work/api.sock"
keeld_pid=""
cleanup() {
  if [[ -n "$keeld_pid" ]] && kill -0 "$keeld_pid" 2>/dev/null; then
    kill "$keeld_pid" && wait "$keeld_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# This machine's own services must not be restarted by the demo: every restart command
# is prefixed with `echo would-run`, and files render under $work/root instead of /.
sed -E '/^restart-commands/ s#\["/#["/bin/echo", "would-run", "/#g' packaging/services.toml > "$work/services.toml"

start_keeld() {
  ./target/debug/keeld --socket "$sock" --state-dir "$work/state" --socket-group 0 \
    --services "$work/services.toml" --templates packaging/templates \
    --render-root "$work/root" 2>>"$work/keeld.log" &
  keeld_pid=$!
  for _ in $(seq 200); do
    ./target/debug/apiclient -s "$sock" raw -u /os >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "keeld did not start; log:" >&2; cat "$work/keeld.log" >&2; exit 1
}
api() { echo "\$ apiclient $*"; ./target/debug/apiclient -s "$sock" "$@"; }

start_keeld
echo "== keeld is serving on $sock (state in $work/state)"
echo
cat > "$work/user-data.toml" <<'TOML'
[settings]
motd = "Welcome to Keel"

[settings.host-containers.admin]
enabled = true
source = "public.ecr.aws/bottlerocket/bottlerocket-admin:v0.11.13"
superpowered = true

[settings.kernel.sysctl]
"vm.max_map_count" = "262144"

[settings.kubernetes.node-labels]
"node.example.com/role" = "demo"
TOML
echo "== apply example user-data (one transaction, committed durably)"
api apply "$work/user-data.toml"
api get settings
echo
echo "== files rendered into the render root ($work/root)"
find "$work/root" -type f | sed "s#$work/root##" | sort
echo "\$ cat /etc/motd"; cat "$work/root/etc/motd"
echo
echo "== dry run: what would change, settings and files, without committing"
api set --dry-run 'ntp.time-servers=["time.example.com"]'
echo
echo "== set is typed by the model: motd=42 is the string \"42\""
api set motd=42 'kernel.sysctl."net.core.somaxconn"=1024'
api get settings.motd settings.kernel
echo
echo "== bad input is refused, naming the key, and nothing changes"
api set host-containers.admin.source=MY-CONTAINER-URI || true
api get settings.host-containers.admin.source
echo
echo "== unset removes a setting (Bottlerocket cannot)"
api unset 'kernel.sysctl."net.core.somaxconn"'
echo
echo "== what the last apply did (files written, restart commands run)"
api apply-log --limit 1 | head -40
echo
echo "== history: who changed what"
api history --limit 3
echo
echo "== rollback to generation 1 (a new generation equal to it)"
api rollback 1
api get settings.motd
echo
echo "== restart keeld: state is durable"
kill "$keeld_pid"; wait "$keeld_pid" 2>/dev/null || true
start_keeld
api get settings.motd
echo
echo "Demo finished; keeld stopped and $work removed."
