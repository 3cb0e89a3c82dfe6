#!/usr/bin/env bash
# Installs what building and booting Keel OS needs on Debian 12. Idempotent.
# qemu-system-x86 comes from bookworm-backports, to match the backports qemu-utils some
# machines have (bookworm's qemu-system-x86 conflicts with it).
set -euo pipefail
bash "$(dirname "$0")/../dev/deps.sh"
packages=(mmdebstrap erofs-utils cryptsetup-bin dosfstools mtools fdisk e2fsprogs cpio gzip jq ovmf kmod)
# qemu-img (the tests' copy-on-write disks): qemu-system-x86 only recommends it. It comes
# from backports with qemu-system-x86, whose version it must match.
qemu=(qemu-system-x86 qemu-utils)
missing=()
for p in "${packages[@]}" "${qemu[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
export DEBIAN_FRONTEND=noninteractive
backports=/etc/apt/sources.list.d/bookworm-backports.sources
if [[ ! -e $backports ]] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > "$backports" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
# On stderr: build.sh's caller reads the image path from its stdout.
echo "image deps: installing ${missing[*]}" >&2
apt-get update -qq
apt-get install -y -qq --no-install-recommends -t bookworm-backports "${qemu[@]}" >/dev/null
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
