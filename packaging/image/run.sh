#!/usr/bin/env bash
# Boots Keel OS under qemu, building the image first if needed.
#
#   bash packaging/image/run.sh [--user-data FILE] [--fw-cfg] [--until configured]
#                               [--disk FILE] [--firmware direct|uefi]
#
# --user-data FILE    user-data for the guest, served by an EC2-like metadata service
#                     (IMDSv2) at 169.254.169.254; with --fw-cfg, passed through qemu's
#                     fw_cfg instead (the `qemu` provider)
# --until configured  boot, wait for the boot to end, print the guest's
#                     `apiclient boot status` and `apiclient get settings`, power off;
#                     exit 0 only when the boot was configured (1: failed, 3: timeout)
# --disk FILE         keep the VM's disk in FILE (made from the image if missing), so
#                     a later run boots the same host again; default: a fresh disk
# --firmware          direct (qemu loads slot a's kernel; the default) or uefi (OVMF and
#                     systemd-boot, as the A/B slots need)
#
# Without --until the serial console is on this terminal: Ctrl-A X stops the VM.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
image=$(bash "$here/build.sh")
(cd "$repo" && cargo build --quiet -p keel-e2e --bin keel-vm --bin keel-imds)
exec "${CARGO_TARGET_DIR:-$repo/target}/debug/keel-vm" --image "$image" "$@"
