#!/usr/bin/env bash
# Installs what building and testing Keel needs on Debian 12. Idempotent: installs only
# what is missing, and runs `apt-get update` only when it has to install something.
set -euo pipefail

# containerd, runc, busybox-static, skopeo and docker-registry: the container tests
# run a private containerd, build images from busybox and push them to a local registry.
# systemd: `systemd-analyze verify` checks the units.
packages=(build-essential pkg-config protobuf-compiler jq curl containerd runc busybox-static skopeo docker-registry iproute2 util-linux systemd cryptsetup-bin erofs-utils)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "deps: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true
