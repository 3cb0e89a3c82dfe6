//! Keel OS booted under qemu: the image `packaging/image/build.sh` builds, with keeld as
//! the host's agent under real systemd, on a read-only root verified by dm-verity.
//!
//! Each test boots the image (35–45 s under TCG), so there are few, and each checks a
//! lot. The harness sees the guest only as a user does: the serial console, the boot
//! report port (keel-report.service), the metadata service it serves, qemu's power
//! button and the disk. Inside the guest, checks run as the admin container's user-data
//! script (the admin image runs its user-data when it starts with `#!`), which prints
//! `KEEL-PROBE key=value` lines on the console; no test code is in keeld or the image.
//!
//! The tests are `#[ignore]`d so that `cargo test --workspace` does not boot VMs beside
//! the other tests; packaging/dev/test.sh runs them after everything else, alone:
//! `cargo test -p keel-e2e --test vm -- --ignored --test-threads 1`. Needs
//! root, qemu-system-x86 and the image tools (packaging/image/deps.sh installs them).
//! A failing test prints the serial console.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use keel_e2e::http_server::{Fault, FileServer};
use keel_e2e::tuf::TufRepo;
use keel_e2e::vm::{
    image_version, image_version_with, publish, report_json, report_phase, update_artifacts,
    update_host, update_keys, update_user_data, Firmware, Image, UserData, Vm, VmConfig,
};

/// One boot's budget: TCG takes 40–60 s to `configured` on an idle 2-core machine, and
/// over 2 minutes when builds share the CPUs.
const BOOT: Duration = Duration::from_secs(420);

/// Version N of the tests.
fn image() -> Image {
    image_version(N)
}

const N: &str = "1.0.0";
const N1: &str = "1.1.0";
const N2: &str = "1.2.0";

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The probe the admin container runs at every start. It counts its boots in its
/// persistent directory and checks, from inside the host, what a user would check.
const PROBE: &str = r#"#!/bin/sh
say() { echo "KEEL-PROBE $*" > /dev/console; }
host() { nsenter -t 1 -m -u -i -n -p -- "$@"; }
state=/.bottlerocket/host-containers/admin/boots
n=$(( $(cat $state 2>/dev/null || echo 0) + 1 ))
echo $n > $state.tmp && sync && mv $state.tmp $state && sync
say "boot=$n"
say "findmnt=$(host findmnt -n -o SOURCE,FSTYPE,OPTIONS / | tr -s ' ' ' ')"
say "verity=$(host veritysetup status keel-root | tr -s ' \n' ' ')"
say "usr-write=$(host touch /usr/keel-probe 2>&1 | tr -d '\n')"
say "etc-motd=$(host cat /etc/motd | tr '\n' ' ')"
say "etc-hostname=$(host cat /etc/hostname)"
# keel-hostname.service sets the kernel's name once the boot is configured, beside this
# container's start: give it a moment.
i=0
while [ "$(host cat /proc/sys/kernel/hostname)" != "$(host cat /etc/hostname)" ] && [ $i -lt 30 ]; do
    sleep 1; i=$((i + 1))
done
say "kernel-hostname=$(host cat /proc/sys/kernel/hostname)"
say "sysctl=$(host cat /proc/sys/vm/max_map_count)"
say "capeff=$(grep CapEff /proc/self/status | tr -d '\t' )"
say "apiclient-motd=$(apiclient get settings.motd | tr -d '\n ')"
say "bootstrap-runs=$(cat /.bottlerocket/rootfs/local/bootstrap-containers/setup/runs 2>/dev/null | tr '\n' ' ')"
say "history=$(apiclient raw -u /history | tr -d '\n' | grep -o '"generation"' | wc -l)"
say "machine-id=$(host cat /etc/machine-id)"
say "esp-fsck=$(host journalctl -b -o cat -u 'systemd-fsck@dev-disk-keel\x2dboot-keel\x2defi.service' | tr '\n' ' ')"
say "data-fsck=$(host systemctl show -P ActiveState 'systemd-fsck@dev-disk-keel\x2dboot-keel\x2ddata.service')"
say "os=$(apiclient raw -u /os | tr -d "\n ")"
wd=/sys/class/watchdog/watchdog0
say "watchdog=$(host cat $wd/identity)/$(host cat $wd/state)/$(host cat $wd/timeout)"
if [ "$n" = 1 ]; then
    say "rebooting"
    apiclient reboot
    exit 0
fi
if [ "$n" = 2 ]; then
    say "containers-before=$(apiclient raw -u /containers | tr -d '\n')"
    old=$(host pidof keeld)
    say "keeld-before=$old"
    kill -9 $old
    i=0
    while [ $i -lt 120 ]; do
        new=$(host pidof keeld)
        if [ -n "$new" ] && [ "$new" != "$old" ] && apiclient get settings.motd >/dev/null 2>&1; then
            break
        fi
        sleep 1; i=$((i + 1))
    done
    say "keeld-after=$(host pidof keeld)"
    say "apiclient-after=$(apiclient get settings.motd | tr -d '\n ')"
    say "containers-after=$(apiclient raw -u /containers | tr -d '\n')"
    # A name unset, then a new one set, reaches the kernel without a reboot.
    apiclient unset network.hostname >/dev/null
    say "hostname-unset=$? $(host systemctl is-active keel-hostname.service)"
    apiclient set network.hostname=keel-vm-renamed >/dev/null
    i=0
    while [ "$(host cat /proc/sys/kernel/hostname)" != keel-vm-renamed ] && [ $i -lt 30 ]; do
        sleep 1; i=$((i + 1))
    done
    say "renamed=$(host cat /proc/sys/kernel/hostname)"
    say "done"
fi
"#;

/// The `once` essential bootstrap container: counts its runs in its persistent directory
/// (`/local/bootstrap-containers/setup` on the host's data partition).
const SETUP: &str = r#"#!/bin/sh
dir=/.bottlerocket/bootstrap-containers/setup
date +%s >> $dir/runs && sync
"#;

fn user_data(motd: &str) -> String {
    format!(
        r#"[settings]
motd = "{motd}"

[settings.network]
hostname = "keel-vm-test"

[settings.kernel.sysctl]
"vm.max_map_count" = "262144"

[settings.bootstrap-containers.setup]
source = "oci-archive:/usr/share/keel/images/admin.tar"
mode = "once"
essential = true
user-data = "{setup}"

[settings.host-containers.admin]
enabled = true
superpowered = true
user-data = "{probe}"
"#,
        setup = b64(SETUP),
        probe = b64(PROBE),
    )
}

/// What the initramfs logs (after `keel-initrd: first boot of disk <name>: `) when it has
/// given a disk at its first boot new UUIDs.
const FIRST_BOOT: &str = "the disk and its partitions have new UUIDs of their own";

/// The `KEEL-PROBE` values on the console, in order (a key seen twice keeps both).
fn probe_values(serial: &str) -> Vec<(String, String)> {
    serial
        .lines()
        .filter_map(|l| l.split_once("KEEL-PROBE ").map(|(_, rest)| rest))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The values printed in the probe's `boot=n` run.
fn probe_boot(serial: &str, n: usize) -> BTreeMap<String, String> {
    let mut current = 0;
    let mut out = BTreeMap::new();
    for (k, v) in probe_values(serial) {
        if k == "boot" {
            current = v.parse().unwrap_or(0);
            continue;
        }
        if current == n {
            out.insert(k, v);
        }
    }
    out
}

struct Booted {
    vm: Vm,
    _dir: tempfile::TempDir,
}

fn boot(image: &Image, user_data: UserData, dir: tempfile::TempDir) -> Booted {
    let disk = dir.path().join("disk.qcow2");
    if !disk.exists() {
        image.overlay_disk(&disk, "4G");
    }
    let vm = Vm::boot(&VmConfig {
        image: image.clone(),
        disk,
        other_disks: Vec::new(),
        user_data,
        firmware: Firmware::DirectKernel,
        memory_mib: 1024,
        dir: dir.path().to_owned(),
        interactive: false,
        imds_port: None,
        repo_port: None,
    });
    Booted { vm, _dir: dir }
}

/// Panics with the serial console attached.
fn check(vm: &Vm, ok: bool, what: &str) {
    if !ok {
        panic!("{what}\n--- serial console ---\n{}", vm.serial());
    }
}

/// First boot from IMDSv2 user-data, a reboot through `apiclient reboot`, and keeld
/// killed: the host's whole first day. Its ESP starts with a lost cluster (what a power
/// cut during a FAT write leaves), which the boot's fsck repairs before /efi is mounted.
#[test]
#[ignore = "boots qemu: packaging/dev/test.sh runs it after the other tests, alone"]
fn first_boot_reboot_and_a_killed_keeld() {
    let image = image();
    let motd = "hello from the vm test";
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.qcow2");
    image.overlay_disk(&disk, "4G");
    lose_a_cluster_on_the_esp(&disk, &image.dir.join("disk.raw"));
    let mut booted = boot(&image, UserData::Imds(user_data(motd).into_bytes()), dir);
    let vm = &mut booted.vm;

    // Boot 1: configured from IMDS.
    let report = vm.wait_report(1, BOOT);
    check(vm, report.is_ok(), &format!("first boot: {report:?}"));
    let report = report.unwrap_or_default();
    check(
        vm,
        report_phase(&report).as_deref() == Some("configured"),
        &format!("first boot not configured:\n{report}"),
    );
    let settings = report_json(&report, "settings").unwrap_or_default();
    check(
        vm,
        settings["settings"]["motd"] == motd,
        &format!("settings in the report:\n{report}"),
    );
    let imds = vm.imds.as_ref().expect("imds");
    let seen = imds.seen();
    check(
        vm,
        seen.first()
            .is_some_and(|s| s.path == "/latest/api/token" && s.method == "PUT"),
        &format!("IMDSv2 token first: {seen:?}"),
    );
    check(
        vm,
        imds.user_data_reads() == 1,
        &format!("user-data read once: {seen:?}"),
    );

    let waited = vm.wait_serial("KEEL-PROBE rebooting", 1, BOOT);
    check(vm, waited.is_ok(), &format!("{waited:?}"));
    let one = probe_boot(&vm.serial(), 1);
    let findmnt = one.get("findmnt").cloned().unwrap_or_default();
    check(
        vm,
        findmnt.starts_with("/dev/mapper/keel-root erofs ro"),
        &format!("/ is not the verity-backed erofs, read-only: {findmnt:?}"),
    );
    check(
        vm,
        one.get("verity")
            .is_some_and(|v| v.contains("type: VERITY") && v.contains("status: verified")),
        &format!("keel-root is not an active, verified dm-verity mapping: {one:?}"),
    );
    check(
        vm,
        one.get("usr-write")
            .is_some_and(|w| w.contains("Read-only file system")),
        &format!("a write to /usr must fail with EROFS: {one:?}"),
    );
    check(
        vm,
        one.get("etc-motd").is_some_and(|m| m.contains(motd)),
        &format!("/etc/motd: {one:?}"),
    );
    check(
        vm,
        one.get("etc-hostname").map(String::as_str) == Some("keel-vm-test"),
        &format!("/etc/hostname: {one:?}"),
    );
    check(
        vm,
        one.get("kernel-hostname").map(String::as_str) == Some("keel-vm-test"),
        &format!("the kernel's host name: {one:?}"),
    );
    check(
        vm,
        one.get("sysctl").map(String::as_str) == Some("262144"),
        &format!("vm.max_map_count: {one:?}"),
    );
    // systemd holds the watchdog open with the image's RuntimeWatchdogSec=2min: a hung
    // PID 1 resets the host.
    check(
        vm,
        one.get("watchdog").map(String::as_str) == Some("Software Watchdog/active/120"),
        &format!("the watchdog systemd pets: {one:?}"),
    );
    // Superpowered: the host tier's full capability set (CapEff 000001ffffffffff on 6.1).
    check(
        vm,
        one.get("capeff")
            .is_some_and(|c| c.trim_start_matches("CapEff:") == "000001ffffffffff"),
        &format!("the superpowered admin container's capabilities: {one:?}"),
    );
    check(
        vm,
        one.get("apiclient-motd")
            .is_some_and(|m| m.contains(&format!("\"{}\"", motd.replace(' ', "")))),
        &format!("apiclient get inside the admin container: {one:?}"),
    );
    check(
        vm,
        one.get("bootstrap-runs")
            .is_some_and(|r| r.split_whitespace().count() == 1),
        &format!("the once bootstrap container ran once: {one:?}"),
    );
    check(
        vm,
        one.get("esp-fsck")
            .is_some_and(|f| f.contains("Reclaimed 1 unused cluster")),
        &format!("the ESP's lost cluster was repaired before /efi was mounted: {one:?}"),
    );
    check(
        vm,
        one.get("data-fsck").map(String::as_str) == Some("active"),
        &format!("the data partition was checked before /local was mounted: {one:?}"),
    );

    // GET /os: the image's own version, variant and build id (its manifest).
    let manifest = std::fs::read_to_string(image.dir.join("manifest")).expect("manifest");
    let field = |key: &str| {
        manifest
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_default()
            .to_owned()
    };
    let os: serde_json::Value =
        serde_json::from_str(one.get("os").map(String::as_str).unwrap_or("null"))
            .unwrap_or_default();
    check(
        vm,
        os["variant_id"] == field("variant")
            && os["version_id"] == field("version")
            && os["build_id"] == field("build_id"),
        &format!("GET /os does not report the image: {os} vs its manifest"),
    );

    // Boot 2: after `apiclient reboot`: nothing fetched or run again, state kept.
    let report = vm.wait_report(2, BOOT);
    check(vm, report.is_ok(), &format!("second boot: {report:?}"));
    let report = report.unwrap_or_default();
    check(
        vm,
        report_phase(&report).as_deref() == Some("configured"),
        &format!("second boot not configured:\n{report}"),
    );
    let waited = vm.wait_serial("KEEL-PROBE done", 1, BOOT);
    check(vm, waited.is_ok(), &format!("{waited:?}"));
    let two = probe_boot(&vm.serial(), 2);
    let imds = vm.imds.as_ref().expect("imds");
    check(
        vm,
        imds.user_data_reads() == 1,
        &format!(
            "user-data fetched again after the reboot: {:?}",
            imds.seen()
        ),
    );
    check(
        vm,
        two.get("bootstrap-runs")
            .is_some_and(|r| r.split_whitespace().count() == 1),
        &format!("the once bootstrap container ran again: {two:?}"),
    );
    check(
        vm,
        two.get("etc-motd").is_some_and(|m| m.contains(motd)),
        &format!("settings lost across the reboot: {two:?}"),
    );
    check(
        vm,
        two.get("history") == one.get("history"),
        &format!("history changed across the reboot: {one:?} {two:?}"),
    );
    check(
        vm,
        two.get("machine-id") == one.get("machine-id")
            && two.get("machine-id").is_some_and(|m| m.len() == 32),
        &format!("the machine id changed across the reboot: {one:?} {two:?}"),
    );
    // Booted without systemd-boot (the one disk with the root's label), the disk still
    // gets UUIDs of its own at its first boot, and only then.
    check(
        vm,
        vm.serial()
            .matches(&format!(
                "keel-initrd: first boot of disk vda: {FIRST_BOOT}"
            ))
            .count()
            == 1,
        "the disk got new UUIDs at its first boot, and only at its first",
    );

    // keeld SIGKILLed: systemd restarts it, the admin container keeps its pid, and the
    // API answers inside it again.
    check(
        vm,
        two.get("keeld-before") != two.get("keeld-after")
            && two.get("keeld-after").is_some_and(|p| !p.is_empty()),
        &format!("keeld was not restarted: {two:?}"),
    );
    check(
        vm,
        two.get("apiclient-after")
            .is_some_and(|m| m.contains(&format!("\"{}\"", motd.replace(' ', "")))),
        &format!("apiclient inside the admin container after keeld's restart: {two:?}"),
    );
    let pid_of = |key: &str| -> Option<u64> {
        let list: serde_json::Value = serde_json::from_str(two.get(key)?).ok()?;
        list.as_array()?
            .iter()
            .find(|c| c["name"] == "admin")?
            .get("pid")?
            .as_u64()
    };
    check(
        vm,
        pid_of("containers-before").is_some()
            && pid_of("containers-before") == pid_of("containers-after"),
        &format!("the admin container's pid changed across keeld's restart: {two:?}"),
    );
    // keel-hostname.service stays active with the name unset, so a name set afterwards
    // is applied by its try-restart.
    check(
        vm,
        two.get("hostname-unset").map(String::as_str) == Some("0 active"),
        &format!("keel-hostname.service after the name was unset: {two:?}"),
    );
    check(
        vm,
        two.get("renamed").map(String::as_str) == Some("keel-vm-renamed"),
        &format!("a host name set after it was unset: {two:?}"),
    );

    vm.shutdown(Duration::from_secs(90));
}

/// One byte changed in the root partition: the boot stops in the initramfs, with the
/// reason on the console, and the host powers off instead of booting it.
#[test]
#[ignore = "boots qemu: packaging/dev/test.sh runs it after the other tests, alone"]
fn a_tampered_root_does_not_boot() {
    let image = image();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.qcow2");
    image.overlay_disk(&disk, "4G");
    flip_byte_in_partition(&disk, &image.dir.join("disk.raw"), "keel-root-a", 0.6);
    let mut booted = boot(&image, UserData::None, dir);
    let vm = &mut booted.vm;
    let waited = vm.wait_serial("keel-initrd: FATAL: dm-verity", 1, BOOT);
    check(vm, waited.is_ok(), &format!("{waited:?}"));
    let exited = vm.wait_exit(Duration::from_secs(120));
    check(
        vm,
        exited.is_ok(),
        &format!("the host did not power off: {exited:?}"),
    );
    check(
        vm,
        !vm.serial().contains("Welcome to") && !vm.serial().contains("Reached target"),
        "systemd started on a tampered root",
    );
}

/// User-data keeld refuses: the boot ends `failed` with the reason, and the API is up
/// (the report itself comes from apiclient).
#[test]
#[ignore = "boots qemu: packaging/dev/test.sh runs it after the other tests, alone"]
fn bad_user_data_fails_the_boot_with_the_reason() {
    let image = image();
    let bad =
        "[settings]\nmotd = \"fine\"\n\n[settings.kernel.sysctl]\n\"vm.max_map_count\" = 262144\n";
    let mut booted = boot(
        &image,
        UserData::Imds(bad.as_bytes().to_vec()),
        tempfile::tempdir().expect("tempdir"),
    );
    let vm = &mut booted.vm;
    let report = vm.wait_report(1, BOOT);
    check(vm, report.is_ok(), &format!("{report:?}"));
    let report = report.unwrap_or_default();
    check(
        vm,
        report_phase(&report).as_deref() == Some("failed"),
        &format!("expected a failed boot:\n{report}"),
    );
    let status = report_json(&report, "boot status").unwrap_or_default();
    let reason = status.to_string();
    check(
        vm,
        reason.contains("vm.max_map_count") || reason.contains("sysctl"),
        &format!("the failure does not name the key:\n{report}"),
    );
    vm.shutdown(Duration::from_secs(90));
}

/// What the admin container reports of the host's disks: each disk's serial number,
/// the partitions under the verified root, the sources of /efi and /local, and where
/// each /dev/disk/keel-boot link leads.
const DISKS_PROBE: &str = r#"#!/bin/sh
say() { echo "KEEL-PROBE $*" > /dev/console; }
host() { nsenter -t 1 -m -u -i -n -p -- "$@"; }
say "disks=$(host sh -c 'for d in /sys/block/vd*; do printf "%s=%s " "${d##*/}" "$(cat "$d/serial")"; done')"
say "root-under=$(host sh -c 'ls /sys/dev/block/$(mountpoint -d /)/slaves' | tr '\n' ' ')"
say "efi=$(host findmnt -n -o SOURCE /efi)"
say "local=$(host findmnt -n -o SOURCE /local)"
say "links=$(host sh -c 'for l in /dev/disk/keel-boot/*; do printf "%s=%s " "${l##*/}" "$(readlink -f "$l")"; done')"
say "disks-done"
"#;

/// A raw copy of the image's disk at `to` (sparse). With `new_uuids` it gets a disk
/// UUID and partition UUIDs of its own, as another build of Keel OS has; without, it is
/// an exact copy, as the root volume of another host made from the same image is.
fn copy_image_disk(image: &Image, to: &Path, new_uuids: bool) {
    let status = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(image.dir.join("disk.raw"))
        .arg(to)
        .status()
        .expect("cp");
    assert!(status.success(), "cp disk.raw failed");
    if !new_uuids {
        return;
    }
    let uuid = || {
        std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .expect("random uuid")
            .trim()
            .to_owned()
    };
    let mut sfdisk: Vec<Vec<String>> = vec![vec!["--disk-id".into(), String::new(), uuid()]];
    for n in 1..=5 {
        sfdisk.push(vec![
            "--part-uuid".into(),
            String::new(),
            n.to_string(),
            uuid(),
        ]);
    }
    for mut args in sfdisk {
        args[1] = to.display().to_string();
        let out = std::process::Command::new("sfdisk")
            .args(&args)
            .output()
            .expect("sfdisk");
        assert!(
            out.status.success(),
            "sfdisk {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn sha256_of(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A second disk carrying Keel's labels (another host's root volume, attached to read its
/// data) is never used. Three UEFI boots of one host, each with a second disk attached
/// ahead of its own (so the guest names it first, and by-label lookups would find it
/// first):
/// 1. The host's never-booted disk and an exact copy of the image: the two carry the same
///    UUIDs, the disk systemd-boot started from cannot be told, and the boot stops with
///    both disks named instead of guessing; the host's disk is not given new UUIDs.
/// 2. A copy with UUIDs of its own: the host boots from its disk, which, at its first
///    boot, gets UUIDs of its own.
/// 3. The exact copy again: the host's disk is now told apart from it, and the host boots
///    from its own.
///
/// In 2 and 3 the host takes its root, hash tree, ESP and data partition from its own
/// disk, links only that disk's partitions under /dev/disk/keel-boot, and writes nothing
/// to the other one (byte for byte the same after the boot).
#[test]
#[ignore = "boots qemu: packaging/dev/test.sh runs it after the other tests, alone"]
fn a_second_keel_disk_is_left_alone() {
    let image = image();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.qcow2");
    image.overlay_disk(&disk, "4G");
    let copy = dir.path().join("copy.raw");
    copy_image_disk(&image, &copy, false);
    let copy_before = sha256_of(&copy);
    let user_data = format!(
        "[settings.host-containers.admin]\nenabled = true\nsuperpowered = true\nuser-data = \"{}\"\n",
        b64(DISKS_PROBE)
    );
    let mut config = VmConfig {
        image: image.clone(),
        disk,
        other_disks: vec![copy.clone()],
        user_data: UserData::Imds(user_data.into_bytes()),
        firmware: Firmware::Uefi,
        memory_mib: 1024,
        dir: dir.path().join("vm"),
        interactive: false,
        imds_port: None,
        repo_port: None,
    };

    // 1. Two never-booted copies of the image: the other disk is vda, the host's vdb.
    let mut vm = Vm::boot(&config);
    let waited = vm.wait_serial("keel-initrd: FATAL:", 1, BOOT);
    check(&vm, waited.is_ok(), &format!("{waited:?}"));
    check(
        &vm,
        vm.serial().contains(
            "keel-initrd: FATAL: disks vda, vdb all carry the EFI system partition the boot loader was started from",
        ),
        "the refusal names both disks and why",
    );
    let exited = vm.wait_exit(Duration::from_secs(120));
    check(
        &vm,
        exited.is_ok(),
        &format!("the host did not power off: {exited:?}"),
    );
    let serial = vm.serial();
    check(
        &vm,
        !serial.contains("Welcome to") && !serial.contains(FIRST_BOOT),
        "systemd started, or the host's disk was changed, although the boot disk could not be told",
    );
    drop(vm);

    // 2. Another host's volume (UUIDs of its own) beside this host's first boot.
    let other = dir.path().join("other.raw");
    copy_image_disk(&image, &other, true);
    let other_before = sha256_of(&other);
    config.other_disks = vec![other.clone()];
    let mut vm = Vm::boot(&config);
    let own = boots_from_its_own_disk(&mut vm);
    check(
        &vm,
        vm.serial().contains(&format!(
            "keel-initrd: first boot of disk {own}: {FIRST_BOOT}"
        )),
        "the host's disk got UUIDs of its own at its first boot",
    );
    vm.shutdown(Duration::from_secs(90));
    assert_eq!(
        sha256_of(&other),
        other_before,
        "the other disk was written to"
    );

    // 3. The never-booted copy again: the host's disk is its own now.
    config.other_disks = vec![copy.clone()];
    let mut vm = Vm::boot(&config);
    boots_from_its_own_disk(&mut vm);
    check(
        &vm,
        !vm.serial().contains(FIRST_BOOT),
        "the host's disk was given new UUIDs again: its data partition was not seen",
    );
    vm.shutdown(Duration::from_secs(90));
    assert_eq!(
        sha256_of(&copy),
        copy_before,
        "the copy of the image was written to"
    );
}

/// Waits for [`DISKS_PROBE`]'s report and checks that the host booted from its own disk
/// (serial `keel-boot-disk`), named after the other one: the verified root's partitions,
/// /efi, /local and every /dev/disk/keel-boot link are on it. Answers its name (vdb).
fn boots_from_its_own_disk(vm: &mut Vm) -> String {
    let waited = vm.wait_serial("KEEL-PROBE disks-done", 1, BOOT);
    check(vm, waited.is_ok(), &format!("{waited:?}"));
    let seen: BTreeMap<String, String> = probe_values(&vm.serial()).into_iter().collect();
    let value = |key: &str| seen.get(key).cloned().unwrap_or_default();
    let name_of = |serial: &str| {
        value("disks")
            .split_whitespace()
            .find_map(|kv| kv.split_once('=').filter(|(_, s)| *s == serial))
            .map(|(name, _)| name.to_owned())
    };
    let (Some(own), Some(foreign)) = (name_of("keel-boot-disk"), name_of("keel-other-0")) else {
        panic!("the guest's disks: {seen:?}\n{}", vm.serial());
    };
    check(
        vm,
        foreign < own,
        &format!("the other disk is named first ({foreign} < {own}): {seen:?}"),
    );
    let on_own = |dev: &str| {
        dev.trim_start_matches("/dev/")
            .strip_prefix(own.as_str())
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let under: Vec<String> = value("root-under")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    check(
        vm,
        under.len() == 2 && under.iter().all(|p| on_own(p)),
        &format!("the verified root is on {own}: {seen:?}"),
    );
    check(
        vm,
        value("efi") == format!("/dev/{own}1") && on_own(&value("local")),
        &format!("/efi and /local are on {own}: {seen:?}"),
    );
    let links: BTreeMap<String, String> = value("links")
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let labels: Vec<&str> = links.keys().map(String::as_str).collect();
    check(
        vm,
        labels
            == [
                "keel-data",
                "keel-efi",
                "keel-root-a",
                "keel-root-b",
                "keel-verity-a",
                "keel-verity-b",
            ]
            && links.values().all(|dev| on_own(dev)),
        &format!("/dev/disk/keel-boot links {own}'s six partitions: {seen:?}"),
    );
    own
}

/// Where partition `label` of the disk image `raw` starts, and its size, in bytes.
fn partition_in(raw: &Path, label: &str) -> (u64, u64) {
    let out = std::process::Command::new("sfdisk")
        .arg("--json")
        .arg(raw)
        .output()
        .expect("sfdisk");
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sfdisk json");
    let part = table["partitiontable"]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| p["name"] == label)
        .unwrap_or_else(|| panic!("no partition {label}"));
    let sectors = |key: &str| part[key].as_u64().unwrap_or_else(|| panic!("{key}")) * 512;
    (sectors("start"), sectors("size"))
}

/// Marks a free cluster of the ESP as in use, in both FATs, through the overlay: a lost
/// cluster, which `fsck.vfat -a` reclaims. The ESP is FAT16 (build.sh's mkfs.vfat for
/// its size), read from its boot sector.
fn lose_a_cluster_on_the_esp(overlay: &Path, raw: &Path) {
    use std::os::unix::fs::FileExt;
    let (esp, _) = partition_in(raw, "keel-efi");
    let image = std::fs::File::open(raw).expect("disk.raw");
    let mut boot = [0u8; 512];
    image
        .read_exact_at(&mut boot, esp)
        .expect("the ESP's boot sector");
    let u16_at = |o: usize| u64::from(u16::from_le_bytes([boot[o], boot[o + 1]]));
    assert_eq!(&boot[54..62], b"FAT16   ", "the ESP is FAT16");
    let (sector, reserved, fats, fat_sectors) =
        (u16_at(11), u16_at(14), u64::from(boot[16]), u16_at(22));
    // A cluster far past the image's files (about 10,000 of 49,000 clusters are used),
    // checked to be in the file system and free.
    let cluster = 40_000u64;
    let (root_entries, per_cluster) = (u16_at(17), u64::from(boot[13]));
    let total = match u16_at(19) {
        0 => u64::from(u32::from_le_bytes([boot[32], boot[33], boot[34], boot[35]])),
        small => small,
    };
    let data_start = reserved + fats * fat_sectors + (root_entries * 32).div_ceil(sector);
    assert!(
        cluster < (total - data_start) / per_cluster + 2,
        "cluster {cluster} is past the ESP's end"
    );
    let mut entry = [0u8; 2];
    image
        .read_exact_at(&mut entry, esp + reserved * sector + cluster * 2)
        .expect("the FAT entry");
    assert_eq!(entry, [0, 0], "cluster {cluster} of the ESP is in use");
    for fat in 0..fats {
        let offset = esp + (reserved + fat * fat_sectors) * sector + cluster * 2;
        let status = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P 0xff {offset} 2"))
            .arg(overlay)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("qemu-io write");
        assert!(status.success(), "qemu-io write failed");
    }
}

/// Writes one changed byte into the overlay disk, inside partition `label` at `fraction`
/// of its length (qemu-io writes through the qcow2 overlay; the image stays pristine).
fn flip_byte_in_partition(overlay: &Path, raw: &Path, label: &str, fraction: f64) {
    let (start, size) = partition_in(raw, label);
    // Inside the erofs image itself (not the unused tail of the partition).
    let used = std::fs::metadata(raw.parent().expect("dir").join("root.erofs"))
        .expect("root.erofs")
        .len()
        .min(size);
    let offset = start + (used as f64 * fraction) as u64;
    let read = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("read -v {offset} 1"))
        .arg(overlay)
        .output()
        .expect("qemu-io read");
    let text = String::from_utf8_lossy(&read.stdout).into_owned();
    // "00000000:  ab  ." → the byte.
    let byte = text
        .split_whitespace()
        .nth(1)
        .and_then(|h| u8::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| panic!("qemu-io read: {text}"));
    let status = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P {} {offset} 1", byte ^ 0xff))
        .arg(overlay)
        .status()
        .expect("qemu-io write");
    assert!(status.success(), "qemu-io write failed");
}

/// The admin container's script in the update test: prints what it sees at every boot
/// and drives the update from inside the host, as an operator with `apiclient` would.
/// `@N@`, `@N1@`, `@N2@` are the three versions.
const UPDATER: &str = r#"#!/bin/sh
say() { echo "KEEL-PROBE $*" > /dev/console; }
dir=/.bottlerocket/host-containers/admin
# The status once keeld answers it (423 while it reads the slots at start or runs a
# command) and a boot on trial is over (it ends when the host is configured).
status() {
    i=0
    while [ $i -lt 120 ]; do
        s=$(apiclient raw -u /updates/status 2>/dev/null | tr -d '\n ')
        case "$s" in
            *'"outcome":"on-trial"'*) ;;
            *'"update_state"'*) echo "$s"; return;;
        esac
        sleep 1; i=$((i + 1))
    done
}
# Apply and reboot; retried while refused (a slot booted on trial is blessed only once
# the host is configured: until then its fallback may not be overwritten).
apply() {
    n=0
    until out=$(apiclient update apply --check --reboot 2>&1); do
        n=$((n + 1))
        say "apply-refused=$(echo "$out" | tail -n 1)"
        [ $n -lt 24 ] || break
        sleep 5
    done
    say "apply=$(echo "$out" | tail -n 2 | tr '\n' ' ')"
}
# Bottlerocket's update operator (brupop) drives a node with `apiclient raw`, call by
# call, retrying a call answered "Status 423" (another update command runs); each 423 it
# met is a line of $dir/locked.
raw() {
    n=0
    until out=$(apiclient raw "$@" 2>&1); do
        case "$out" in
            *'Status 423'*) echo 423 >> $dir/locked;;
            *) echo "$out"; return 1;;
        esac
        n=$((n + 1)); [ $n -lt 900 ] || return 1
        sleep 1
    done
    echo "$out"
}
# The operator's get_update_status: refresh, then the status.
op_status() {
    raw -u /actions/refresh-updates -m POST >/dev/null || return 1
    raw -u /updates/status | tr -d '\n '
}
# The operator's sequence: status (an update chosen), prepare, status (Staged), activate,
# status (Ready), reboot.
operator() {
    : > $dir/locked
    n=0
    while :; do
        s=$(op_status)
        case "$s" in *'"chosen_update":{'*) ;; *) say "operator=nothing-chosen $s"; return;; esac
        if raw -u /actions/prepare-update -m POST >/dev/null; then
            s=$(op_status)
            case "$s" in *'"update_state":"Staged"'*) break;; esac
        fi
        n=$((n + 1))
        [ $n -lt 24 ] || { say "operator=not-staged $s"; return; }
        sleep 5
    done
    raw -u /actions/activate-update -m POST >/dev/null
    s=$(op_status)
    case "$s" in *'"update_state":"Ready"'*) ;; *) say "operator=not-ready $s"; return;; esac
    say "operator=ready locked=$(wc -l < $dir/locked)"
    raw -u /actions/reboot -m POST >/dev/null
}
v=$(apiclient raw -u /os | tr -d '\n ' | sed -n 's/.*"version_id":"\([^"]*\)".*/\1/p')
say "boot-of=$v"
say "slot=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^keel.slot=//p')"
say "boot-params=$(tr ' ' '\n' < /proc/cmdline | grep -x -e 'keeltest.kernel=on' -e '--' -e 'keeltest.init=on' | tr '\n' ' ')"
say "init-argv=$(tr '\0' ' ' < /proc/1/cmdline)"
# The host's df, by its path: busybox runs its own applet for a bare `df`.
say "local-size=$(nsenter -t 1 -m -- /usr/bin/df -B1 --output=size /local 2>&1 | tail -n 1 | tr -d ' ')"
say "starts=$(cat $dir/starts 2>/dev/null | wc -l)"
date +%s >> $dir/starts && sync
say "motd=$(apiclient get settings.motd | tr -d '\n ')"
say "metrics=$(apiclient get settings.metrics 2>&1 | tr -d '\n ')"
say "status=$(status)"
case "$v" in
@N@)
    if [ ! -e $dir/cut ]; then
        touch $dir/cut && sync
        say "check=$(apiclient update check 2>&1 | tr -d '\n ')"
        apiclient update apply >/dev/null 2>&1 &
        i=0
        while [ $i -lt 600 ]; do
            case "$(apiclient raw -u /updates/status 2>&1 | tr -d '\n ')" in
                *'"bytes_done":'[1-9]*) say "cut-now=writing"; break;;
            esac
            sleep 1; i=$((i + 1))
        done
        sleep 100000
    fi
    apply
    ;;
@N1@)
    case "$(status)" in
        *'"outcome":"rolled-back"'*) say "done=rolled-back"; exit 0;;
    esac
    say "waiting-for=@N2@"
    i=0
    while [ $i -lt 300 ]; do
        case "$(apiclient update check 2>&1 | tr -d '\n ')" in *'"@N2@"'*) break;; esac
        sleep 2; i=$((i + 1))
    done
    operator
    ;;
esac
"#;

/// An essential bootstrap container that refuses to let version `@N2@` reach
/// `configured`: the broken release the rollback is for.
const GATE: &str = r#"#!/bin/sh
v=$(apiclient raw -u /os | tr -d '\n ' | sed -n 's/.*"version_id":"\([^"]*\)".*/\1/p')
if [ "$v" = "@N2@" ]; then
    echo "KEEL-PROBE gate-metrics=$(apiclient get settings.metrics 2>&1 | tr -d '\n ')" > /dev/console
    echo "KEEL-PROBE gate=refused $v" > /dev/console
    exit 1
fi
"#;

/// N+1's settings migration: it adds `settings.metrics.send-metrics`.
const STEP_2: &str = r#"
[[step]]
from = 1
to = 2
up = [{ op = "set-default", key = "settings.metrics.send-metrics", value = false }]
down = [{ op = "remove", key = "settings.metrics.send-metrics" }]
"#;

/// N+1 as the update test builds it (the same inputs: the same cached image).
fn image_n1(dir: &Path) -> Image {
    let migrations = dir.join("migrations-n1.toml");
    std::fs::write(&migrations, STEP_2).expect("write migrations");
    image_version_with(N1, Some(&migrations))
}

fn versions(script: &str) -> String {
    script
        .replace("@N@", N)
        .replace("@N1@", N1)
        .replace("@N2@", N2)
}

/// The `KEEL-PROBE` values of the run that printed `boot-of=<version>` for the `nth`
/// time (1-based).
fn probe_run(serial: &str, version: &str, nth: usize) -> BTreeMap<String, String> {
    boot_run(serial, Some(version), nth)
}

/// The `KEEL-PROBE` values of the run whose `boot-of=` line is the `nth` (1-based) of
/// those naming `version` (any version: `None`), that line included; a run ends at the
/// next `boot-of=` line.
fn boot_run(serial: &str, version: Option<&str>, nth: usize) -> BTreeMap<String, String> {
    let mut seen = 0;
    let mut out = BTreeMap::new();
    let mut inside = false;
    for (k, v) in probe_values(serial) {
        if k == "boot-of" {
            if inside {
                break;
            }
            if version.is_none_or(|version| v == version) {
                seen += 1;
                inside = seen == nth;
            }
        }
        if inside {
            out.insert(k, v);
        }
    }
    out
}

#[test]
fn a_boot_run_is_its_boot_of_line_up_to_the_next() {
    let serial = "KEEL-PROBE boot-of=1\nKEEL-PROBE slot=a\nKEEL-PROBE boot-of=2\n\
                  KEEL-PROBE slot=b\nKEEL-PROBE boot-of=1\nKEEL-PROBE slot=a2\n";
    let run = |version, nth| boot_run(serial, version, nth);
    assert_eq!(run(Some("1"), 2)["slot"], "a2");
    assert_eq!(run(Some("2"), 1)["slot"], "b");
    assert_eq!(run(None, 2)["slot"], "b");
    assert_eq!(run(None, 3)["boot-of"], "1");
    assert!(run(Some("2"), 2).is_empty());
}

/// A/B updates on a booted host, under UEFI with systemd-boot: version N is told of
/// N+1 by a signed repository on the host's loopback; a power cut while N+1 is being
/// written leaves N booting; `apiclient update apply --reboot` brings the host up on
/// N+1 in the other slot with its settings and admin container data, and the setting
/// N+1 adds (a settings migration it ships); N+1 goes to N+2 the way Bottlerocket's
/// update operator drives a node (its `apiclient raw` calls, each retried on 423); N+2,
/// which cannot reach `configured` (an essential bootstrap container refuses it), uses
/// up its tries and the boot loader goes back to N+1, whose status says it rolled back
/// and whose settings are carried back down from N+2's format.
#[test]
#[ignore = "boots qemu: packaging/dev/test.sh runs it after the other tests, alone"]
fn update_power_cut_and_rollback() {
    let dir = tempfile::tempdir().expect("tempdir");
    // N has no settings migrations (format 1); N+1 adds a setting (format 2), N+2 another
    // (format 3). N+1 must come up with its new setting, and after the rollback from N+2
    // without N+2's, carried back by the step N+2 recorded.
    let step_2 = STEP_2;
    let step_3 = r#"
[[step]]
from = 2
to = 3
up = [{ op = "set-default", key = "settings.metrics.metrics-url", value = "https://metrics.keel.example/" }]
down = [{ op = "remove", key = "settings.metrics.metrics-url" }]
"#;
    let migrations_n2 = dir.path().join("migrations-n2.toml");
    std::fs::write(&migrations_n2, format!("{step_2}{step_3}")).expect("write migrations");
    let n = image_version(N);
    let n1 = update_artifacts(&image_n1(dir.path()), N1);
    let n2 = update_artifacts(&image_version_with(N2, Some(&migrations_n2)), N2);
    let mut repo = TufRepo::create_with_keys(&dir.path().join("repo"), &update_keys());
    publish(&mut repo, dir.path(), &[&n1]);
    let server = FileServer::start("127.0.0.1", repo.dir.clone());
    // The first download is slow enough to be cut in the middle of its write.
    server.set_faults(vec![Fault::Throttle {
        suffix: "root.erofs".to_owned(),
        chunk: 1 << 20,
        pause: Duration::from_millis(100),
    }]);

    let motd = "updated host";
    let user_data = format!(
        r#"[settings]
motd = "{motd}"

[settings.boot.kernel-parameters]
"keeltest.kernel" = ["on"]

[settings.boot.init-parameters]
"keeltest.init" = ["on"]

[settings.updates]
metadata-base-url = "http://169.254.169.254:8080/metadata/"
targets-base-url = "http://169.254.169.254:8080/targets/"

[settings.bootstrap-containers.gate]
source = "oci-archive:/usr/share/keel/images/admin.tar"
mode = "always"
essential = true
user-data = "{gate}"

[settings.host-containers.admin]
enabled = true
superpowered = true
user-data = "{updater}"
"#,
        gate = b64(&versions(GATE)),
        updater = b64(&versions(UPDATER)),
    );
    let (_imds, config) = update_host(&n, dir.path(), user_data, server.addr.port());

    // Power 1: N is told of N+1 and starts writing it; the plug is pulled mid-write.
    let mut vm = Vm::boot(&config);
    let waited = vm.wait_serial("KEEL-PROBE cut-now=writing", 1, BOOT * 2);
    check(&vm, waited.is_ok(), &format!("{waited:?}"));
    let first = probe_run(&vm.serial(), N, 1);
    check(
        &vm,
        first.get("slot").map(String::as_str) == Some("a")
            && first.get("check").is_some_and(|c| c.contains(N1)),
        &format!("N on slot a, told of N+1 by `apiclient update check`: {first:?}"),
    );
    check(
        &vm,
        first
            .get("metrics")
            .is_some_and(|m| m.starts_with('{') && !m.contains("send-metrics")),
        &format!("N (settings format 1) has no settings.metrics: {first:?}"),
    );
    // settings.boot is in the user-data: the image's entry has no parameters, so this
    // first boot's command line has none of them.
    check(
        &vm,
        first.get("boot-params").map(String::as_str) == Some(""),
        &format!("the first boot's command line has no settings.boot parameters: {first:?}"),
    );
    vm.power_cut();
    let cut_log = vm.serial();
    server.set_faults(Vec::new());
    // While the host is off, its disk grows by 2 GiB (an EBS volume modified to a larger
    // size): the data partition and its file system grow with it at the next boot.
    let resized = std::process::Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&config.disk)
        .arg("6G")
        .status()
        .expect("qemu-img");
    assert!(resized.success(), "qemu-img resize: {resized}");

    // Power 2: N again, the interrupted write on record; then the update, for real.
    let mut vm = Vm::boot(&config);
    let waited = vm.wait_serial(&format!("KEEL-PROBE boot-of={N1}"), 1, BOOT * 3);
    check(
        &vm,
        waited.is_ok(),
        &format!("{waited:?}\n--- before the power cut ---\n{cut_log}"),
    );
    let serial = vm.serial();
    let after_cut = probe_run(&serial, N, 1);
    check(
        &vm,
        after_cut.get("slot").map(String::as_str) == Some("a")
            && after_cut
                .get("status")
                .is_some_and(|s| s.contains("prepare")),
        &format!("after the power cut: N on slot a, the cut prepare on record: {after_cut:?}"),
    );
    let local_size = |run: &BTreeMap<String, String>| -> u64 {
        run.get("local-size")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    check(
        &vm,
        local_size(&first) > 0
            && local_size(&after_cut) >= local_size(&first) + (2u64 << 30) * 95 / 100,
        &format!(
            "/local did not grow with the disk (4 GiB to 6 GiB): {:?} then {:?} bytes",
            first.get("local-size"),
            after_cut.get("local-size")
        ),
    );
    // The first boot's apply wrote settings.boot into slot a's loader entry: the kernel
    // has them now, init's after `--`, and init (PID 1) got those as arguments.
    let boot_params = |run: &BTreeMap<String, String>| {
        run.get("boot-params").map(String::as_str) == Some("keeltest.kernel=on -- keeltest.init=on")
            && run
                .get("init-argv")
                .is_some_and(|a| a.split_whitespace().any(|w| w == "keeltest.init=on"))
    };
    check(
        &vm,
        boot_params(&after_cut),
        &format!("settings.boot on the second boot's command line: {after_cut:?}"),
    );
    let waited = vm.wait_serial(&format!("KEEL-PROBE waiting-for={N2}"), 1, BOOT);
    check(&vm, waited.is_ok(), &format!("{waited:?}"));
    let on_n1 = probe_run(&vm.serial(), N1, 1);
    let status: serde_json::Value =
        serde_json::from_str(on_n1.get("status").map(String::as_str).unwrap_or("null"))
            .unwrap_or_default();
    check(
        &vm,
        on_n1.get("slot").map(String::as_str) == Some("b")
            && status["last_boot"]["outcome"] == "updated"
            && status["active_partition"]["image"]["version"] == N1,
        &format!("N+1 on slot b, its status says updated: {on_n1:?}"),
    );
    check(
        &vm,
        on_n1
            .get("motd")
            .is_some_and(|m| m.contains(&motd.replace(' ', "")))
            && on_n1
                .get("starts")
                .is_some_and(|s| s.parse::<u32>().unwrap_or(0) >= 2),
        &format!("settings and the admin container's data survive the update: {on_n1:?}"),
    );
    check(
        &vm,
        boot_params(&on_n1),
        &format!("activation carried settings.boot into slot b's entry: {on_n1:?}"),
    );
    let n1_metrics = |m: &str| m.contains("\"send-metrics\":false") && !m.contains("metrics-url");
    check(
        &vm,
        on_n1.get("metrics").is_some_and(|m| n1_metrics(m)),
        &format!("N+1 migrated the settings up to its format 2: its new setting: {on_n1:?}"),
    );

    // N+2 cannot reach `configured`: three tries, then N+1 again, which says so. N+1
    // goes to N+2 as Bottlerocket's update operator drives a node: its `apiclient raw`
    // calls, retried on 423.
    publish(&mut repo, dir.path(), &[&n1, &n2]);
    let waited = vm.wait_serial("KEEL-PROBE done=rolled-back", 1, BOOT * 5);
    check(&vm, waited.is_ok(), &format!("{waited:?}"));
    let serial = vm.serial();
    let operator = probe_run(&serial, N1, 1);
    check(
        &vm,
        operator
            .get("operator")
            .and_then(|o| o.strip_prefix("ready locked="))
            .and_then(|n| n.trim().parse::<u32>().ok())
            .is_some_and(|n| n > 0),
        &format!(
            "the operator's call sequence reached Ready on N+1, retrying on 423: {operator:?}"
        ),
    );
    let refused = serial
        .matches(&format!("KEEL-PROBE gate=refused {N2}"))
        .count();
    // A boot the harness's watchdog reset (a TCG hang) used up a try of its own.
    check(
        &vm,
        (1..=3).contains(&refused) && refused + vm.resets.len() >= 3,
        &format!(
            "N+2 should have been tried 3 times: refused {refused} times, resets {:?}",
            vm.resets
        ),
    );
    let gate_metrics: Vec<&str> = serial
        .lines()
        .filter_map(|l| l.split("KEEL-PROBE gate-metrics=").nth(1))
        .collect();
    check(
        &vm,
        !gate_metrics.is_empty()
            && gate_metrics.iter().all(|m| {
                m.contains("\"send-metrics\":false")
                    && m.contains("\"metrics-url\":\"https://metrics.keel.example/\"")
            }),
        &format!("N+2 migrated the settings up to its format 3: {gate_metrics:?}"),
    );
    let back = probe_run(&serial, N1, 2);
    let status: serde_json::Value =
        serde_json::from_str(back.get("status").map(String::as_str).unwrap_or("null"))
            .unwrap_or_default();
    check(
        &vm,
        back.get("slot").map(String::as_str) == Some("b")
            && status["last_boot"]["outcome"] == "rolled-back"
            && status["active_partition"]["image"]["version"] == N1,
        &format!("back on N+1 in slot b, the status says rolled back: {back:?}"),
    );
    check(
        &vm,
        back.get("metrics").is_some_and(|m| n1_metrics(m)),
        &format!(
            "back on N+1, the settings were carried down to format 2 by the step N+2 \
             recorded (N+1 does not ship it): {back:?}"
        ),
    );
    vm.shutdown(Duration::from_secs(90));
}

/// The admin container's script in the refusals test: runs, in order, the command the
/// harness posts as `control/<k>` on the repository's server (`check`: `apiclient update
/// check`; `apply`: `apiclient update apply`; `done`: the status, and stop), and prints
/// `step-<k> rc=<exit code> out=<its output on one line>` for each.
const REFUSALS: &str = r#"#!/bin/sh
say() { echo "KEEL-PROBE $*" > /dev/console; }
base=http://169.254.169.254:8080/control
# keeld answers the update API once it has read the slots (423 until then).
i=0
until apiclient raw -u /updates/status >/dev/null 2>&1; do
    sleep 1; i=$((i + 1)); [ $i -lt 300 ] || break
done
say "refusals-ready"
k=1
while [ $k -lt 50 ]; do
    i=0
    until cmd=$(wget -q -O - "$base/$k" 2>/dev/null); do
        sleep 1; i=$((i + 1)); [ $i -lt 900 ] || { say "step-$k gave-up"; exit 1; }
    done
    case "$cmd" in
        check) out=$(apiclient update check 2>&1); rc=$?;;
        apply) out=$(apiclient update apply 2>&1); rc=$?;;
        done) say "refusals-done status=$(apiclient raw -u /updates/status | tr -d '\n ')"; exit 0;;
        *) out="unknown command $cmd"; rc=99;;
    esac
    say "step-$k rc=$rc out=$(echo "$out" | tr '\n' ' ' | tr -s ' ')"
    k=$((k + 1))
done
"#;

/// The harness side of [`REFUSALS`]: posts each command and reads back what the host
/// printed for it.
struct Steps<'a> {
    vm: &'a mut Vm,
    control: std::path::PathBuf,
    next: usize,
}

impl Steps<'_> {
    /// Runs `command` in the guest; answers its exit code and output.
    fn run(&mut self, command: &str) -> (i32, String) {
        let k = self.next;
        self.next += 1;
        std::fs::write(self.control.join(k.to_string()), command).expect("write control");
        let marker = format!("KEEL-PROBE step-{k} ");
        let waited = self.vm.wait_serial(&marker, 1, Duration::from_secs(300));
        check(
            self.vm,
            waited.is_ok(),
            &format!("step {k} ({command}): {waited:?}"),
        );
        let serial = self.vm.serial();
        let line = serial
            .lines()
            .find_map(|l| {
                l.split_once(&marker)
                    .map(|(_, rest)| rest.trim_end().to_owned())
            })
            .unwrap_or_default();
        let (rc, out) = line
            .strip_prefix("rc=")
            .and_then(|rest| rest.split_once(" out="))
            .unwrap_or(("", ""));
        (rc.parse().unwrap_or(-1), out.trim().to_owned())
    }

    /// Ends the script; answers the update status it printed last.
    fn finish(&mut self) -> String {
        std::fs::write(self.control.join(self.next.to_string()), "done").expect("done");
        let marker = "KEEL-PROBE refusals-done status=";
        let waited = self.vm.wait_serial(marker, 1, Duration::from_secs(120));
        check(self.vm, waited.is_ok(), &format!("{waited:?}"));
        self.vm
            .serial()
            .lines()
            .find_map(|l| l.split_once(marker).map(|(_, s)| s.trim_end().to_owned()))
            .unwrap_or_default()
    }

    /// Runs `command`, which must fail with `expected` in what the user sees.
    fn refused(&mut self, command: &str, expected: &str) {
        let (rc, out) = self.run(command);
        check(
            self.vm,
            rc == 1 && out.contains(expected),
            &format!("`apiclient update {command}`: rc {rc}, expected {expected:?} in: {out}"),
        );
    }

    /// Runs `command`, which must succeed with `expected` in its output.
    fn ok(&mut self, command: &str, expected: &str) {
        let (rc, out) = self.run(command);
        check(
            self.vm,
            rc == 0 && out.contains(expected),
            &format!("`apiclient update {command}`: rc {rc}, expected {expected:?} in: {out}"),
        );
    }
}

/// The repository's refusals seen from inside a booted host, with the words the user
/// reads from `apiclient update`: a target whose hash or length is not the signed one,
/// metadata with a bad signature, expired metadata, metadata older than what the host
/// trusted, a repository that stalls, and a version older than the running one. Every
/// publication has higher metadata versions than the last one the host trusted, so one
/// host sees them all in turn; the running slot stays the boot choice throughout.
#[test]
#[ignore = "boots qemu: packaging/dev/test.sh runs it after the other tests, alone"]
fn update_refusals_in_a_booted_host() {
    let n = image();
    let dir = tempfile::tempdir().expect("tempdir");
    let good = keel_e2e::tuf::build_update(dir.path(), N1, 1 << 20);
    let older = keel_e2e::tuf::build_update(dir.path(), "0.9.0", 1 << 20);
    let mut repo = TufRepo::create_with_keys(&dir.path().join("repo"), &update_keys());
    let control = repo.dir.join("control");
    std::fs::create_dir_all(&control).expect("control dir");
    publish(&mut repo, dir.path(), &[&good]);
    let server = FileServer::start("127.0.0.1", repo.dir.clone());
    let user_data = update_user_data("[settings]\nmotd = \"refusals\"\n\n", REFUSALS);
    let (_imds, config) = update_host(&n, dir.path(), user_data, server.addr.port());
    let mut vm = Vm::boot(&config);
    let waited = vm.wait_serial("KEEL-PROBE refusals-ready", 1, BOOT);
    check(&vm, waited.is_ok(), &format!("{waited:?}"));
    let mut steps = Steps {
        vm: &mut vm,
        control,
        next: 1,
    };
    let apply_failed = "Failed to apply update: prepare attempt failed with status 'Failed' (1): ";
    let check_failed =
        "Failed to check for updates: refresh attempt failed with status 'Failed' (1): ";

    // Offered and chosen.
    steps.ok("check", &format!("\"{N1}\""));
    // The root image with one byte changed, then longer than signed.
    let name = good.names("keel-qemu")[0].0.clone();
    let served = repo.target_file(&name);
    let bytes = std::fs::read(&served).expect("read target");
    let mut bad = bytes.clone();
    bad[4096] ^= 0xff;
    std::fs::write(&served, &bad).expect("tamper");
    let sha = |b: &[u8]| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b))
    };
    steps.refused(
        "apply",
        &format!(
            "{apply_failed}target {name}: its sha256 is {}, but the signed metadata says {}: \
             refused",
            sha(&bad),
            sha(&bytes)
        ),
    );
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"more");
    std::fs::write(&served, &longer).expect("tamper");
    steps.refused(
        "apply",
        &format!(
            "{apply_failed}target {name}: it is longer than its signed length of {} bytes: \
             refused",
            bytes.len()
        ),
    );
    std::fs::write(&served, &bytes).expect("restore");
    // Signed content changed after signing.
    publish(&mut repo, dir.path(), &[&good]);
    let timestamp = repo.metadata_dir().join("timestamp.json");
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&timestamp).expect("read")).expect("json");
    doc["signed"]["expires"] = serde_json::json!("2099-01-01T00:00:00Z");
    std::fs::write(&timestamp, serde_json::to_vec(&doc).expect("json")).expect("write");
    steps.refused(
        "check",
        &format!("{check_failed}the repository's timestamp metadata is not validly signed: "),
    );
    // Expired yesterday.
    keel_e2e::vm::publish_expiring(
        &mut repo,
        dir.path(),
        &[&good],
        keel_e2e::tuf::days_from_now(-1),
    );
    steps.refused(
        "check",
        &format!(
            "{check_failed}the repository's timestamp metadata has expired: refusing stale \
             metadata"
        ),
    );
    // A mirror replays a timestamp older than the one the host trusted last.
    publish(&mut repo, dir.path(), &[&good]);
    let old = std::fs::read(&timestamp).expect("read");
    let old_version = repo.version();
    publish(&mut repo, dir.path(), &[&good]);
    steps.ok("check", &format!("\"{N1}\""));
    std::fs::write(&timestamp, &old).expect("replay");
    steps.refused(
        "check",
        &format!(
            "{check_failed}the repository offers timestamp metadata version {old_version}, \
             older than version {} this host already trusted: refusing a rollback",
            repo.version()
        ),
    );
    // A repository that stops sending in the middle of a file (keeld's read limit: 30 s).
    publish(&mut repo, dir.path(), &[&good]);
    server.set_faults(vec![Fault::StallAfter {
        suffix: "timestamp.json".to_owned(),
        bytes: 16,
    }]);
    steps.refused("check", "the repository stalled: nothing received for 30s");
    server.set_faults(Vec::new());
    // Only an older version on offer: nothing is chosen.
    publish(&mut repo, dir.path(), &[&older]);
    steps.ok("check", &format!("no update newer than the running {N}"));
    // And the repository put right: offered again, and the host never left slot a.
    publish(&mut repo, dir.path(), &[&good]);
    steps.ok("check", &format!("\"{N1}\""));
    let status = steps.finish();
    check(
        &vm,
        status.contains("\"update_state\":\"Available\"") && !status.contains("\"Ready\""),
        &format!("after the refusals: {status}"),
    );
    vm.shutdown(Duration::from_secs(90));
}

/// The admin container's script in the activation test: at every boot it prints the
/// version, slot and update status; on N it prepares N+1 if nothing is staged, then
/// waits for the harness's `control/<boot>` and activates (the harness may pull the
/// plug while it does). Boots are counted by the kernel's boot id, so that a restart of
/// the container in one boot is not taken for a boot.
const ACTIVATION: &str = r#"#!/bin/sh
say() { echo "KEEL-PROBE $*" > /dev/console; }
dir=/.bottlerocket/host-containers/admin
base=http://169.254.169.254:8080/control
id=$(cat /proc/sys/kernel/random/boot_id)
grep -qx "$id" $dir/boot-ids 2>/dev/null || { echo "$id" >> $dir/boot-ids && sync; }
boot=$(wc -l < $dir/boot-ids)
# The status once keeld answers it and a boot on trial is over.
status() {
    i=0
    while [ $i -lt 300 ]; do
        s=$(apiclient raw -u /updates/status 2>/dev/null | tr -d '\n ')
        case "$s" in
            *'"outcome":"on-trial"'*) ;;
            *'"update_state"'*) echo "$s"; return;;
        esac
        sleep 1; i=$((i + 1))
    done
}
v=$(apiclient raw -u /os | tr -d '\n ' | sed -n 's/.*"version_id":"\([^"]*\)".*/\1/p')
say "boot-of=$v"
say "slot=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^keel.slot=//p')"
s=$(status)
say "status=$s"
[ "$v" = "@N@" ] || exec sleep 1000000
case "$s" in
    *'"update_state":"Staged"'*) ;;
    *)
        apiclient update check >/dev/null 2>&1
        apiclient raw -m POST -u /actions/prepare-update >/dev/null 2>&1
        i=0
        until [ $i -ge 600 ]; do
            case "$(apiclient raw -u /updates/status 2>/dev/null | tr -d '\n ')" in
                *'"update_state":"Staged"'*) break;;
            esac
            sleep 1; i=$((i + 1))
        done
        ;;
esac
say "staged=$boot"
until [ "$(wget -q -O - "$base/$boot" 2>/dev/null)" = go ]; do sleep 1; done
say "activating=$boot"
# The action starts the command; its end shows in the status.
apiclient raw -m POST -u /actions/activate-update >/dev/null 2>&1
i=0
until [ $i -ge 600 ]; do
    s=$(apiclient raw -u /updates/status 2>/dev/null | tr -d '\n ')
    case "$s" in
        *'"update_state":"Ready"'*|*'"cmd_status":"Failed"'*) break;;
    esac
    sleep 1; i=$((i + 1))
done
say "activated=$boot $s"
exec sleep 1000000
"#;

/// A host of version N whose admin container runs [`ACTIVATION`], N+1 published in a
/// signed repository it reaches; `control` is where the harness posts each boot's "go".
struct ActivationHost {
    n: Image,
    config: VmConfig,
    control: std::path::PathBuf,
    _server: FileServer,
    _imds: keel_e2e::imds::Imds,
}

impl ActivationHost {
    fn new(dir: &Path, motd: &str) -> ActivationHost {
        ActivationHost::with_settings(dir, &format!("[settings]\nmotd = \"{motd}\"\n\n"))
    }

    /// The host with `settings` (TOML, ending in a blank line) in its user-data.
    fn with_settings(dir: &Path, settings: &str) -> ActivationHost {
        let n = image_version(N);
        let n1 = update_artifacts(&image_n1(dir), N1);
        let mut repo = TufRepo::create_with_keys(&dir.join("repo"), &update_keys());
        let control = repo.dir.join("control");
        std::fs::create_dir_all(&control).expect("control dir");
        publish(&mut repo, dir, &[&n1]);
        let server = FileServer::start("127.0.0.1", repo.dir.clone());
        let user_data = update_user_data(settings, &versions(ACTIVATION));
        let (imds, config) = update_host(&n, dir, user_data, server.addr.port());
        ActivationHost {
            n,
            config,
            control,
            _server: server,
            _imds: imds,
        }
    }
}

/// Power cuts during activation: with N+1 staged in slot b, the harness slows the disk's
/// writes (qemu's I/O throttle) so that the activation's writes (keeld's record, the
/// loader entry on the ESP: temporary file, fsync, rename, fsync) come one at a time,
/// and pulls the plug after a few of them. Each time the host boots again whole: N in
/// slot a with N+1 still staged, or, when the entry was complete, N+1 in slot b on
/// trial, then updated. After the cuts an uninterrupted activation takes the host to
/// N+1.
#[test]
#[ignore = "boots qemu: packaging/dev/test.sh runs it after the other tests, alone"]
fn activation_power_cut_boots_one_whole_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = ActivationHost::new(dir.path(), "activation");
    let (config, control) = (&host.config, &host.control);
    let mut vm = Vm::boot(config);
    let mut log = String::new();
    // Writes after which the plug is pulled, one boot each; then no cut.
    let cuts = [3u64, 8];
    for (i, cut) in cuts.iter().map(Some).chain([None]).enumerate() {
        let boot = i + 1;
        let waited = vm.wait_serial(&format!("KEEL-PROBE staged={boot}"), 1, BOOT * 2);
        check(&vm, waited.is_ok(), &format!("{waited:?}\n{log}"));
        let this = boot_run(&vm.serial(), None, 1);
        check(
            &vm,
            this.get("boot-of").map(String::as_str) == Some(N)
                && this.get("slot").map(String::as_str) == Some("a"),
            &format!("boot {boot}: N in slot a: {this:?}\n{log}"),
        );
        if i > 0 {
            check(
                &vm,
                this.get("status")
                    .is_some_and(|s| s.contains("\"update_state\":\"Staged\"")),
                &format!("boot {boot}: after the cut, N+1 is still staged: {this:?}\n{log}"),
            );
        }
        let before = vm.writes_done().expect("blockstats");
        if cut.is_some() {
            vm.throttle_writes(2).expect("throttle");
        }
        std::fs::write(control.join(boot.to_string()), "go").expect("go");
        let Some(&cut) = cut else {
            let waited = vm.wait_serial(&format!("KEEL-PROBE activated={boot}"), 1, BOOT);
            check(&vm, waited.is_ok(), &format!("{waited:?}\n{log}"));
            let this = boot_run(&vm.serial(), None, 1);
            check(
                &vm,
                this.get("activated")
                    .is_some_and(|s| s.contains("\"update_state\":\"Ready\"")),
                &format!("boot {boot}: the activation ran whole: {this:?}\n{log}"),
            );
            break;
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        loop {
            let done = vm.writes_done().expect("blockstats");
            if done >= before + cut {
                break;
            }
            check(
                &vm,
                std::time::Instant::now() < deadline,
                &format!("boot {boot}: only {} writes after the go", done - before),
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vm.power_cut();
        let serial = vm.serial();
        let activated = serial.contains(&format!("KEEL-PROBE activated={boot}"));
        log.push_str(&format!(
            "--- boot {boot}: cut after {cut} writes (activation answered before: {activated}) ---\n{serial}\n"
        ));
        vm = Vm::boot(config);
        // The next boot is N again (the entry was not complete) or N+1 on slot b.
        let waited = vm.wait_serial("KEEL-PROBE status=", 1, BOOT * 2);
        check(&vm, waited.is_ok(), &format!("{waited:?}\n{log}"));
        let next = boot_run(&vm.serial(), None, 1);
        if next.get("boot-of").map(String::as_str) == Some(N1) {
            check(
                &vm,
                next.get("slot").map(String::as_str) == Some("b")
                    && next
                        .get("status")
                        .is_some_and(|s| s.contains("\"outcome\":\"updated\"")),
                &format!("after the cut, N+1 booted whole in slot b: {next:?}\n{log}"),
            );
            eprintln!("activation cut after {cut} writes: the entry was complete, N+1 booted");
            vm.shutdown(Duration::from_secs(90));
            return;
        }
        // N again: the loop checks it is whole, with N+1 still staged. (A fresh VM's
        // serial log starts empty: this boot is its first.)
        eprintln!("activation cut after {cut} writes: N booted again");
    }
    // The activation ran whole: the next boot is N+1 in slot b.
    vm.power_button().ok();
    let _ = vm.wait_exit(Duration::from_secs(120));
    vm.power_cut();
    let mut vm = Vm::boot(config);
    let waited = vm.wait_serial(&format!("KEEL-PROBE boot-of={N1}"), 1, BOOT * 2);
    check(&vm, waited.is_ok(), &format!("{waited:?}\n{log}"));
    let waited = vm.wait_serial("KEEL-PROBE status=", 1, BOOT);
    check(&vm, waited.is_ok(), &format!("{waited:?}\n{log}"));
    let last = boot_run(&vm.serial(), None, 1);
    check(
        &vm,
        last.get("slot").map(String::as_str) == Some("b")
            && last
                .get("status")
                .is_some_and(|s| s.contains("\"outcome\":\"updated\"")),
        &format!("N+1 in slot b, updated: {last:?}\n{log}"),
    );
    vm.shutdown(Duration::from_secs(90));
}

/// A slot on trial whose root does not verify: N+1 is staged and activated in slot b,
/// the harness then changes one byte of slot b's root while the host is off. Each try
/// of slot b stops in the initramfs (`keel-initrd: FATAL: dm-verity`), which reboots
/// rather than powering off because systemd-boot is counting the entry's tries; once
/// they are used up the boot loader goes back to N in slot a, whose status says the
/// update rolled back. (A blessed slot that does not verify powers off instead:
/// [`a_tampered_root_does_not_boot`].)
#[test]
#[ignore = "boots qemu: packaging/dev/test.sh runs it after the other tests, alone"]
fn a_trial_slot_that_does_not_verify_rolls_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = ActivationHost::new(dir.path(), "trial");
    let (config, control) = (&host.config, &host.control);

    let mut vm = Vm::boot(config);
    let waited = vm.wait_serial("KEEL-PROBE staged=1", 1, BOOT * 2);
    check(&vm, waited.is_ok(), &format!("{waited:?}"));
    std::fs::write(control.join("1"), "go").expect("go");
    let waited = vm.wait_serial("KEEL-PROBE activated=1", 1, BOOT);
    check(&vm, waited.is_ok(), &format!("{waited:?}"));
    let first = boot_run(&vm.serial(), None, 1);
    check(
        &vm,
        first
            .get("activated")
            .is_some_and(|s| s.contains("\"update_state\":\"Ready\"")),
        &format!("N+1 activated in slot b: {first:?}"),
    );
    vm.shutdown(Duration::from_secs(90));
    let before = vm.serial();

    flip_byte_in_partition(
        &config.disk,
        &host.n.dir.join("disk.raw"),
        "keel-root-b",
        0.3,
    );
    let mut vm = Vm::boot(config);
    let waited = vm.wait_serial("KEEL-PROBE status=", 1, BOOT * 5);
    check(
        &vm,
        waited.is_ok(),
        &format!("{waited:?}\n--- before ---\n{before}"),
    );
    let serial = vm.serial();
    let refused = serial.matches("keel-initrd: FATAL: dm-verity").count();
    // A boot the harness's watchdog reset (a TCG hang) used up a try of its own.
    check(
        &vm,
        (1..=3).contains(&refused) && refused + vm.resets.len() >= 3,
        &format!(
            "slot b should have been tried 3 times: refused {refused} times, resets {:?}",
            vm.resets
        ),
    );
    check(
        &vm,
        serial.matches("rebooting in 10 s").count() == refused,
        "each refused try of the slot on trial rebooted",
    );
    let back = boot_run(&serial, None, 1);
    let status: serde_json::Value =
        serde_json::from_str(back.get("status").map(String::as_str).unwrap_or("null"))
            .unwrap_or_default();
    check(
        &vm,
        back.get("boot-of").map(String::as_str) == Some(N)
            && back.get("slot").map(String::as_str) == Some("a")
            && status["last_boot"]["outcome"] == "rolled-back"
            && status["active_partition"]["image"]["version"] == N,
        &format!("back on N in slot a, the status says rolled back: {back:?}"),
    );
    vm.shutdown(Duration::from_secs(90));
}

/// The console line keel-emergency-reboot.service writes before it reboots.
const EMERGENCY_REBOOT: &str = "keel: this boot is a counted try and fell into emergency mode";

/// The admin container's script in the parameter-trial test: prints what it sees at
/// every boot, and changes `settings.boot` as an operator would.
const PARAMETERS: &str = r#"#!/bin/sh
say() { echo "KEEL-PROBE $*" > /dev/console; }
host() { nsenter -t 1 -m -u -i -n -p -- "$@"; }
dir=/.bottlerocket/host-containers/admin
n=$(( $(cat $dir/boots 2>/dev/null || echo 0) + 1 ))
echo $n > $dir/boots.tmp && sync && mv $dir/boots.tmp $dir/boots && sync
entries() { host ls /efi/loader/entries | tr '\n' ' '; }
say "boot=$n"
say "cmdline=$(cat /proc/cmdline)"
say "entries=$(entries)"
say "record=$(apiclient raw -u /boot | tr -d '\n ')"
say "kept=$(host grep '^options' /efi/loader/entries/keel-a.conf | tr '\n' ' ')"
case $n in
1) ;;
2)
    apiclient set -j '{"boot":{"kernel-parameters":null}}' >/dev/null || say "error=unset"
    apiclient set -j '{"boot":{"kernel-parameters":{"keeltest.kernel":["on"]}}}' >/dev/null || say "error=set"
    say "staged=$(entries)"
    ;;
3)
    # systemd-bless-boot marks the trial good once the boot is configured.
    i=0
    until entries | grep -q 'keel-a-trial.conf' || [ $i -ge 120 ]; do sleep 1; i=$((i + 1)); done
    say "blessed=$(entries)"
    ;;
*) say "done"; exec sleep 1000000;;
esac
sync
apiclient reboot
"#;

/// A kernel parameter that stops the boot (`systemd.unit=emergency.target`: the boot
/// never starts keeld) costs one boot, not the host: the first boot's apply writes it into
/// a trial entry, the kept entry keeps the old line; the trial boot falls into emergency
/// mode, where keel-emergency-reboot.service reboots it (a counted try); the boot loader
/// then goes back to the kept entry, and keeld reports the parameters as failed and does
/// not hand them over again. Parameters that boot are kept: their trial reaches
/// `configured`, is blessed, and the next boot (from the blessed trial) folds them into the
/// slot's own entry and removes the trial.
/// The words of `text`, sorted (an `ls` listing in whatever collation the host has).
fn words(text: &str) -> Vec<&str> {
    let mut words: Vec<&str> = text.split_whitespace().collect();
    words.sort_unstable();
    words
}

#[test]
#[ignore = "boots qemu: packaging/dev/test.sh runs it after the other tests, alone"]
fn a_boot_parameter_that_stops_the_boot_is_tried_once_and_not_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = image_version(N);
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).expect("repo dir");
    let _server = FileServer::start("127.0.0.1", repo);
    let user_data = update_user_data(
        "[settings]\nmotd = \"parameters\"\n\n\
         [settings.boot.kernel-parameters]\n\"systemd.unit\" = [\"emergency.target\"]\n\n",
        PARAMETERS,
    );
    let (_imds, config) = update_host(&n, dir.path(), user_data, _server.addr.port());
    let mut vm = Vm::boot(&config);
    let waited = vm.wait_serial("KEEL-PROBE done", 1, BOOT * 6);
    check(&vm, waited.is_ok(), &format!("{waited:?}"));
    let serial = vm.serial();
    let first = probe_boot(&serial, 1);
    check(
        &vm,
        first.get("entries").map(|e| words(e)) == Some(words("keel-a-trial+1.conf keel-a.conf"))
            && first
                .get("cmdline")
                .is_some_and(|c| !c.contains("systemd.unit")),
        &format!("the first boot wrote a trial entry and kept its own: {first:?}"),
    );
    // The trial boot: emergency mode, then the reboot that uses up its try.
    let after_first = serial.find("KEEL-PROBE boot=1").unwrap_or(0);
    let second_at = serial.find("KEEL-PROBE boot=2").unwrap_or(serial.len());
    check(
        &vm,
        serial[after_first..second_at].contains(EMERGENCY_REBOOT),
        "the trial boot fell into emergency mode and rebooted",
    );
    let second = probe_boot(&serial, 2);
    let record: serde_json::Value =
        serde_json::from_str(second.get("record").map(String::as_str).unwrap_or("null"))
            .unwrap_or_default();
    check(
        &vm,
        second
            .get("cmdline")
            .is_some_and(|c| !c.contains("systemd.unit") && !c.contains("keel.parameters-trial"))
            && second.get("entries").map(|e| e.trim()) == Some("keel-a.conf")
            && record["phase"] == "configured"
            && record["failed-parameters"] == "systemd.unit=emergency.target"
            && record["booted-parameters"] == "",
        &format!("back on the kept entry, the failed parameters reported: {second:?}"),
    );
    check(
        &vm,
        second.get("staged").map(|e| words(e)) == Some(words("keel-a-trial+1.conf keel-a.conf"))
            && !second.contains_key("error"),
        &format!("a parameter that boots is staged as a trial: {second:?}"),
    );
    let third = probe_boot(&serial, 3);
    check(
        &vm,
        third.get("cmdline").is_some_and(|c| {
            c.contains("keel.parameters-trial=2") && c.contains("keeltest.kernel=on")
        }) && third.get("blessed").map(|e| words(e))
            == Some(words("keel-a-trial.conf keel-a.conf")),
        &format!("the trial boot has them and is blessed once configured: {third:?}"),
    );
    let fourth = probe_boot(&serial, 4);
    let record: serde_json::Value =
        serde_json::from_str(fourth.get("record").map(String::as_str).unwrap_or("null"))
            .unwrap_or_default();
    check(
        &vm,
        fourth
            .get("cmdline")
            .is_some_and(|c| c.contains("keeltest.kernel=on"))
            && fourth.get("entries").map(|e| e.trim()) == Some("keel-a.conf")
            && fourth
                .get("kept")
                .is_some_and(|k| k.contains("options keeltest.kernel=on"))
            && record["booted-parameters"] == "keeltest.kernel=on"
            && record.get("failed-parameters").is_none(),
        &format!("kept: the slot's own entry has them, the trial is gone: {fourth:?}"),
    );
    eprintln!(
        "a failing parameter cost one boot; a good one was kept: {} emergency reboot(s), {} harness reset(s)",
        serial.matches(EMERGENCY_REBOOT).count(),
        vm.resets.len()
    );
    vm.shutdown(Duration::from_secs(90));
}
