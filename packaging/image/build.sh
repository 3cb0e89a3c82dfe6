#!/usr/bin/env bash
# Builds Keel OS: a bootable GPT disk image whose root is a read-only erofs verified by
# dm-verity, with keeld as the host agent. One command:
#
#   bash packaging/image/build.sh [--version V] [--variant NAME] [--out DIR]
#                                 [--update-root ROOT.JSON] [--migrations FILE]
#                                 [--update-lock]
#
# prints the directory of the built image (disk.raw, vmlinuz, initrd.img, cmdline,
# roothash, root.erofs, root.verity, manifest). The output is cached by a hash of every
# input (the pinned package set, Keel's binaries, units, templates, this directory): an
# unchanged rebuild only recomputes that hash. See packaging/image/README.md.
#
# Inputs:
#   packaging/image/packages.txt   the Debian packages the root is made of
#   packaging/image/packages.lock  every package in the root with its version (pinned;
#                                  --update-lock rewrites it from what the mirror has)
#   packaging/image/rootfs/        files laid over the root (units, mounts, configs)
#   packaging/image/initramfs/init the initramfs that verifies and mounts the root
#   packaging/image/defaults.toml  the variant's OS defaults
#   units/, packaging/{services.toml,templates/}, Keel's release binaries
#   --update-root: the update repository's trusted TUF root.json (docs/updates.md);
#                  without it the image has none and `apiclient update` says so
#   --migrations:  the image's settings migrations (default packaging/migrations.toml):
#                  a release that adds or renames settings ships its steps here
set -euo pipefail
# The same bytes whatever the caller's locale and umask: sort orders (packages.lock, the
# input hash, the initramfs's cpio) are C's, and files made here are not group-writable.
export LC_ALL=C
umask 022

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
variant=keel-qemu
out_root="$repo/target/image"
update_lock=0
update_root=""
migrations="$repo/packaging/migrations.toml"
mirror=${KEEL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
cache=${KEEL_IMAGE_CACHE:-/var/cache/keel/image}

while (($#)); do
    case "$1" in
        --version) version=$2; shift 2 ;;
        --variant) variant=$2; shift 2 ;;
        --out) out_root=$2; shift 2 ;;
        --update-lock) update_lock=1; shift ;;
        --update-root) update_root=$(realpath "$2"); shift 2 ;;
        --migrations) migrations=$(realpath "$2"); shift 2 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "build.sh: --version must be MAJOR.MINOR.PATCH, got $version" >&2; exit 2; }
[[ $variant =~ ^[a-z0-9][a-z0-9-]*$ ]] || { echo "build.sh: --variant must be lowercase letters, digits and -" >&2; exit 2; }
if [[ -n $update_root ]]; then
    jq -e '.signed._type == "root"' "$update_root" >/dev/null 2>&1 \
        || { echo "build.sh: --update-root $update_root is not a TUF root.json" >&2; exit 2; }
fi

# Partition sizes (MiB). Two root slots for A/B updates; the data partition is made by
# systemd-repart on first boot from the rest of the disk.
ESP_MIB=96
ROOT_MIB=384
VERITY_MIB=32

log() { echo "build.sh: $*" >&2; }

bash "$here/deps.sh"
mkdir -p "$cache/apt" "$out_root"

# --- Keel's binaries -------------------------------------------------------------------
log "building keeld, keel-slot-writer, apiclient and keel-logger (release) and the OCI image tool"
(cd "$repo" && cargo build --release --quiet -p keel-agent -p apiclient \
    && cargo build --quiet -p keel-e2e --example oci-image)
rel="${CARGO_TARGET_DIR:-$repo/target}/release"
oci_image="${CARGO_TARGET_DIR:-$repo/target}/debug/examples/oci-image"

# --- The pinned Debian root --------------------------------------------------------------
packages=$(grep -v '^\s*#' "$here/packages.txt" | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
bootstrap() { # $1 = output tarball, $2 = extra mmdebstrap args
    log "mmdebstrap $suite ($packages)"
    # shellcheck disable=SC2086
    mmdebstrap --quiet --variant=minbase --include="$packages" $2 \
        --skip=essential/unlink \
        --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
        --setup-hook="sync-in $cache/apt /var/cache/apt/archives/" \
        --customize-hook="sync-out /var/cache/apt/archives $cache/apt" \
        --customize-hook='chroot "$1" dpkg-query -W -f "\${Package}=\${Version}\n" > "$1/tmp/keel-packages"' \
        --customize-hook="copy-out /tmp/keel-packages $cache" \
        "$suite" "$1" "$mirror"
}
if ((update_lock)); then
    tmp_tar="$cache/update-lock.tar"
    bootstrap "$tmp_tar" ""
    sort "$cache/keel-packages" > "$here/packages.lock"
    rm -f "$tmp_tar"
    log "wrote packaging/image/packages.lock ($(wc -l < "$here/packages.lock") packages)"
fi
lock_hash=$( (cat "$here/packages.txt" "$here/packages.lock"; echo "$mirror $suite") | sha256sum | cut -c1-16)
root_tar="$cache/debian-$lock_hash.tar"
if [[ ! -s $root_tar ]]; then
    # Every package of the lock is asked for at its locked version; apt fails if the
    # mirror no longer has one (then: --update-lock, and review the diff).
    pinned=$(tr '\n' ',' < "$here/packages.lock" | sed 's/,$//')
    # (mmdebstrap picks the output format from the name: it must end in .tar.)
    bootstrap "$cache/partial.tar" "--include=$pinned"
    if ! diff -u "$here/packages.lock" <(sort "$cache/keel-packages"); then
        rm -f "$cache/partial.tar"
        log "the built root differs from packages.lock (above); run with --update-lock and review"
        exit 1
    fi
    mv "$cache/partial.tar" "$root_tar"
fi

# --- The admin container image ------------------------------------------------------------
# busybox and apiclient. At start it runs its user-data as a script when that starts with
# `#!` (see packaging/image/README.md); as a host container it then stays up for
# `apiclient exec`, as a bootstrap container it ends with the script's exit status.
work=$(mktemp -d /tmp/keel-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
admin_tar="$work/admin.tar"
"$oci_image" "$admin_tar" --with "$rel/apiclient" -- /bin/sh -c '
if [ -d /.bottlerocket/bootstrap-containers ]; then
    for ud in /.bottlerocket/bootstrap-containers/*/user-data; do
        [ -s "$ud" ] && [ "$(head -c 2 "$ud")" = "#!" ] || exit 0
        cp "$ud" /tmp/startup && chmod 0700 /tmp/startup && exec /tmp/startup
    done
    exit 0
fi
for ud in /.bottlerocket/host-containers/*/user-data; do
    [ -s "$ud" ] && [ "$(head -c 2 "$ud")" = "#!" ] || break
    cp "$ud" /tmp/startup && chmod 0700 /tmp/startup && /tmp/startup
done
exec sleep 2147483647' >/dev/null

# --- The input hash: the image is rebuilt only when one of these changes ----------------------
input_hash=$( {
    echo "version=$version variant=$variant esp=$ESP_MIB root=$ROOT_MIB verity=$VERITY_MIB"
    echo "$lock_hash"
    (cd "$repo" && find packaging/image units packaging/services.toml packaging/templates \
        packaging/dev/cli-assets.sh \
        -type f ! -name '*.md' -print0 | sort -z | xargs -0 sha256sum)
    sha256sum "$rel/keeld" "$rel/keel-slot-writer" "$rel/apiclient" "$rel/keel-logger" | cut -d' ' -f1
    [[ -z $update_root ]] || sha256sum "$update_root" | cut -d' ' -f1
    sha256sum "$migrations" | cut -d' ' -f1
    # The archive's manifest digest names its content (the tar itself has timestamps).
    tar -xOf "$admin_tar" index.json
} | sha256sum | cut -c1-16)
out="$out_root/$variant-$version-$input_hash"
if [[ -s $out/disk.raw && -s $out/manifest ]]; then
    log "up to date: $out"
    ln -sfn "$(basename "$out")" "$out_root/latest"
    echo "$out"
    exit 0
fi
log "building $out"
started=$(date +%s)

# --- Assemble the root ------------------------------------------------------------------------
root="$work/root"
mkdir "$root"
tar -xf "$root_tar" -C "$root"
kver=$(ls "$root/usr/lib/modules")
[[ $(wc -w <<<"$kver") == 1 ]] || { log "expected one kernel, found: $kver"; exit 1; }

# Kernel and the Debian initrd leave the root: they live on the ESP, one pair per slot.
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
rm -rf "$root/boot/"* "$root/initrd.img"* "$root/vmlinuz"*

# Only the kernel modules this variant needs, with their dependencies.
modules_keep() {
    local want=() seen=() dep
    mapfile -t want < <(grep -v '^\s*#' "$here/modules.txt" | tr -s ' ' '\n' | sed '/^$/d')
    local depfile="$root/usr/lib/modules/$kver/modules.dep"
    local queue=("${want[@]}")
    while ((${#queue[@]})); do
        local name=${queue[0]}; queue=("${queue[@]:1}")
        local norm=${name//-/_}
        [[ " ${seen[*]} " == *" $norm "* ]] && continue
        seen+=("$norm")
        local line
        line=$(awk -v n="$norm" -F: '{ f=$1; sub(/.*\//, "", f); sub(/\.ko(\.[a-z]+)?$/, "", f); gsub(/-/, "_", f); if (f == n) { print; exit } }' "$depfile")
        if [[ -z $line ]]; then
            # Built into the kernel: nothing to copy.
            grep -q "/${name}.ko\|/${norm}.ko" "$root/usr/lib/modules/$kver/modules.builtin" \
                || { log "module $name: neither a module nor built in"; exit 1; }
            continue
        fi
        echo "${line%%:*}"
        for dep in ${line#*:}; do
            dep=${dep##*/}; dep=${dep%%.ko*}
            queue+=("$dep")
        done
    done
}
mods="$work/modules"
mkdir -p "$mods/$kver"
while read -r path; do
    mkdir -p "$mods/$kver/$(dirname "$path")"
    cp "$root/usr/lib/modules/$kver/$path" "$mods/$kver/$path"
done < <(modules_keep | sort -u)
cp "$root/usr/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$mods/$kver/"
rm -rf "$root/usr/lib/modules/$kver"
mv "$mods/$kver" "$root/usr/lib/modules/$kver"
depmod -b "$root" "$kver"

# What a host never uses.
rm -rf "$root"/usr/share/{doc,man,info,locale,lintian,linda} "$root"/var/cache/apt/* \
    "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/usr/lib/firmware \
    "$root"/etc/machine-id "$root"/var/lib/dbus/machine-id "$root"/etc/hostname
mkdir -p "$root/usr/share/locale"
# Mount points: the root is read-only, so every one must exist in the image.
mkdir -p "$root/local" "$root/efi"
# An empty machine-id: systemd makes one at first boot (keel-data-setup.service keeps it).
: > "$root/etc/machine-id"

# Keel.
# Owned by root whoever owns the checkout (cp -a would carry its uid onto /, /etc, /usr).
cp -a --no-preserve=ownership "$here/rootfs/." "$root/"
# cp -a carries the checkout's modes too, onto directories that exist already: a checkout
# made under umask 002 would make /, /etc and /usr group-writable, and change the root
# hash. Group and other write are cleared on everything copied (exec bits stay).
chmod go-w "$root"
(cd "$here/rootfs" && find . -mindepth 1 -print0) | (cd "$root" && xargs -0 chmod go-w)
install -m 0755 "$rel/keeld" "$rel/keel-slot-writer" "$rel/apiclient" "$rel/keel-logger" "$root/usr/bin/"
if [[ -n $update_root ]]; then
    install -D -m 0644 "$update_root" "$root/usr/share/keel/updates/root.json"
fi
# apiclient's shell completions and man pages, generated from the binary the image ships.
APICLIENT="$rel/apiclient" bash "$repo/packaging/dev/cli-assets.sh" "$root/usr" >/dev/null
install -d "$root/usr/share/keel/images"
install -m 0644 "$admin_tar" "$root/usr/share/keel/images/admin.tar"
# The variant's services: a restart command whose program or systemd unit this image
# does not have (kubelet, chronyd, update-ca-trust on this Debian root) is dropped, so
# an apply does not fail on a service the variant cannot run; the manifest lists them.
: > "$work/dropped"
while IFS= read -r line; do
    if [[ $line =~ ^restart-commands\ =\ \[\[\"([^\"]+)\" ]]; then
        prog=${BASH_REMATCH[1]} why=""
        [[ -x $root$prog ]] || why="$prog is not in the image"
        if [[ -z $why && $line =~ \"try-restart\",\ \"([^\"]+)\" ]]; then
            unit=${BASH_REMATCH[1]}
            [[ -e $root/usr/lib/systemd/system/$unit ]] || why="$unit is not in the image"
        fi
        if [[ -n $why ]]; then
            echo "# $variant: dropped, $why: ${line#restart-commands = }"
            echo "restart-commands = []"
            echo "dropped_restart_command=${line#restart-commands = } ($why)" >> "$work/dropped"
            continue
        fi
    fi
    printf '%s\n' "$line"
done < "$repo/packaging/services.toml" > "$root/usr/share/keel/services.toml"
install -m 0644 "$here/defaults.toml" "$root/usr/share/keel/defaults.toml"
install -m 0644 "$migrations" "$root/usr/share/keel/migrations.toml"
cp -r "$repo/packaging/templates" "$root/usr/share/keel/templates"
for unit in keeld.service keeld.socket keel-boot.service keel-configured.target \
    keel-slot-writer.socket keel-slot-writer@.service; do
    install -m 0644 "$repo/units/$unit" "$root/usr/lib/systemd/system/$unit"
done
install -m 0644 "$repo/units/keel.sysusers" "$root/usr/lib/sysusers.d/keel.conf"
install -m 0644 "$repo/units/keel.tmpfiles" "$root/usr/lib/tmpfiles.d/keel.conf"

build_id=$input_hash
cat > "$root/usr/lib/os-release" <<EOF
NAME="Keel OS"
ID=keel
PRETTY_NAME="Keel OS $version ($variant)"
VERSION_ID=$version
VARIANT_ID=$variant
BUILD_ID=$build_id
HOME_URL="https://github.com/keel-os/keel"
EOF
ln -sf ../usr/lib/os-release "$root/etc/os-release"

# Units: Keel's, the host containerd, the data partition; nothing Debian enables that a
# host does not need; no login prompt on the serial console (the console shows the log).
chroot_systemctl() { systemctl --root="$root" --quiet "$@"; }
chroot_systemctl disable containerd.service e2scrub_reap.service remote-fs.target getty@tty1.service 2>/dev/null || true
chroot_systemctl enable keeld.socket keeld.service keel-configured.target host-containerd.service \
    keel-slot-writer.socket \
    local.mount var-lib.mount keel-data-setup.service keel-report.service systemd-networkd.service \
    efi.mount keel-boot-assess.service keel-emergency-reboot.service keel-hostname.service \
    keel-growfs.service
mkdir -p "$root/etc/systemd/system/sysinit.target.wants"
ln -sf /usr/lib/systemd/system/systemd-repart.service "$root/etc/systemd/system/sysinit.target.wants/"
chroot_systemctl mask serial-getty@ttyS0.service getty@tty1.service console-getty.service \
    apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer
systemd-sysusers --root="$root" >/dev/null
chroot_systemctl set-default multi-user.target

# The manifest: what this image is made of.
{
    echo "# Keel OS image manifest"
    echo "version=$version"
    echo "variant=$variant"
    echo "build_id=$build_id"
    echo "kernel=$kver"
    echo "keeld_sha256=$(sha256sum "$rel/keeld" | cut -d' ' -f1)"
    echo "apiclient_sha256=$(sha256sum "$rel/apiclient" | cut -d' ' -f1)"
    echo "keel_slot_writer_sha256=$(sha256sum "$rel/keel-slot-writer" | cut -d' ' -f1)"
    if [[ -n $update_root ]]; then
        echo "update_root_sha256=$(sha256sum "$update_root" | cut -d' ' -f1)"
    else
        echo "update_root=none (no update repository is trusted)"
    fi
    echo "admin_image=$(tar -xOf "$admin_tar" index.json | grep -o 'sha256:[0-9a-f]*' | head -n1)"
    cat "$work/dropped"
    echo "# packages (Debian $suite, $mirror)"
    cat "$here/packages.lock"
} > "$root/usr/share/keel/manifest"
cp "$root/usr/share/keel/manifest" "$work/manifest"

# --- The verified root ----------------------------------------------------------------------------
# A fixed timestamp and UUID: the same inputs give the same root and the same root hash.

mkfs.erofs -zlz4hc -T 0 -U 6b65656c-0000-4000-8000-000000000001 "$work/root.erofs" "$root" >/dev/null
root_bytes=$(stat -c %s "$work/root.erofs")
if ((root_bytes > ROOT_MIB * 1024 * 1024)); then
    log "the root is $root_bytes bytes, larger than its $ROOT_MIB MiB slot"; exit 1
fi
roothash=$(veritysetup format --salt=- --uuid=6b65656c-0000-4000-8000-000000000002 \
    "$work/root.erofs" "$work/root.verity" | sed -n 's/^Root hash:[[:space:]]*//p')
[[ $roothash =~ ^[0-9a-f]{64}$ ]] || { log "veritysetup gave no root hash"; exit 1; }

# --- The initramfs ----------------------------------------------------------------------------------
ird="$work/initramfs"
mkdir -p "$ird"/{bin,dev,proc,sys,run,etc,usr/lib,usr/lib64}
ln -s usr/lib "$ird/lib"
ln -s usr/lib64 "$ird/lib64"
cp "$root/usr/bin/busybox" "$ird/bin/busybox"
install -m 0755 "$here/initramfs/init" "$ird/init"
# veritysetup, util-linux's blkid (partition UUIDs, to find the boot disk: busybox's
# blkid has none; busybox --install leaves the real one in place), sfdisk (a disk's own
# UUIDs at its first boot) and the libraries they load, from the image's own root.
copy_with_libs() {
    local bin=$1
    cp "$root$bin" "$ird/bin/"
    chroot "$root" ldd "$bin" | awk '/=>/ { print $3 } /ld-linux/ { print $1 }' | while read -r lib; do
        [[ -n $lib ]] || continue
        mkdir -p "$ird$(dirname "$lib")"
        cp -L "$root$lib" "$ird$lib"
    done
}
copy_with_libs /usr/sbin/veritysetup
copy_with_libs /usr/sbin/blkid
copy_with_libs /usr/sbin/sfdisk
mkdir -p "$ird/usr/lib/modules"
cp -a "$root/usr/lib/modules/$kver" "$ird/usr/lib/modules/"
grep -v '^\s*#' "$here/initramfs/modules.txt" | tr -s ' ' '\n' | sed '/^$/d' > "$ird/etc/keel-initrd-modules"
(cd "$ird" && find . -print0 | sort -z | cpio --null --create --format=newc --quiet --reproducible) \
    | gzip -9n > "$work/initrd.img"

# fsck.repair=yes: systemd-fsck repairs whatever fsck can (`-y`) instead of stopping in
# emergency mode, where a host with no login would stay; the flags after Keel's keys are
# carried into every entry an update writes.
cmdline="keel.slot=a keel.root=PARTLABEL=keel-root-a keel.verity=PARTLABEL=keel-verity-a keel.roothash=$roothash ro console=ttyS0,115200 systemd.gpt_auto=0 systemd.show_status=error fsck.repair=yes quiet panic=10"
echo "$cmdline" > "$work/cmdline"
echo "$roothash" > "$work/roothash"

# --- The EFI system partition: systemd-boot and slot a's kernel, initrd and entry ------------------------
esp="$work/esp.img"
mkfs.vfat -C -n KEEL-EFI "$esp" $((ESP_MIB * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/loader ::/loader/entries ::/keel ::/keel/a
mcopy -i "$esp" "$root/usr/lib/systemd/boot/efi/systemd-bootx64.efi" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" "$root/usr/lib/systemd/boot/efi/systemd-bootx64.efi" ::/EFI/systemd/systemd-bootx64.efi
mcopy -i "$esp" "$work/vmlinuz" ::/keel/a/vmlinuz
mcopy -i "$esp" "$work/initrd.img" ::/keel/a/initrd.img
# No `default`: systemd-boot's own order picks the slot (sort-key, then version, newest
# first, entries with no tries left last), which is what updates and rollback rely on.
printf 'timeout 0\neditor no\nconsole-mode keep\n' > "$work/loader.conf"
mcopy -i "$esp" "$work/loader.conf" ::/loader/loader.conf
cat > "$work/keel-a.conf" <<EOF
# keel-os-version $version
title Keel OS $version (slot a)
sort-key keel
version 1
linux /keel/a/vmlinuz
initrd /keel/a/initrd.img
options $cmdline
EOF
mcopy -i "$esp" "$work/keel-a.conf" ::/loader/entries/keel-a.conf

# --- The disk ---------------------------------------------------------------------------------------------
disk="$work/disk.raw"
total_mib=$((1 + ESP_MIB + 2 * (ROOT_MIB + VERITY_MIB) + 1))
truncate -s "${total_mib}M" "$disk"
sfdisk --quiet "$disk" <<EOF
label: gpt
first-lba: 2048
size=${ESP_MIB}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=keel-efi
size=${ROOT_MIB}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=keel-root-a
size=${VERITY_MIB}MiB, type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5, name=keel-verity-a
size=${ROOT_MIB}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=keel-root-b
size=${VERITY_MIB}MiB, type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5, name=keel-verity-b
EOF
write_part() { # $1 = partition number, $2 = file
    local start
    start=$(sfdisk --json "$disk" | jq ".partitiontable.partitions[$(($1 - 1))].start")
    dd if="$2" of="$disk" bs=512 seek="$start" conv=notrunc,sparse status=none
}
write_part 1 "$esp"
write_part 2 "$work/root.erofs"
write_part 3 "$work/root.verity"

# --- Publish atomically: a half-written output directory never looks built ----------------------------
staged="$out.tmp"
rm -rf "$staged"
mkdir -p "$staged"
mv "$disk" "$work/vmlinuz" "$work/initrd.img" "$work/cmdline" "$work/roothash" \
    "$work/root.erofs" "$work/root.verity" "$work/manifest" "$staged/"
sync "$staged"/*
rm -rf "$out"
mv "$staged" "$out"
ln -sfn "$(basename "$out")" "$out_root/latest"
# Earlier builds of this variant and version (other inputs) are superseded: remove them.
for old in "$out_root/$variant-$version"-*; do
    [[ $old == "$out" || ! -d $old ]] || rm -rf "$old"
done
log "built in $(($(date +%s) - started)) s: root $((root_bytes / 1024 / 1024)) MiB (erofs, lz4hc), root hash $roothash"
echo "$out"
