//! Keel OS image figures: build time with a warm package cache and the root's size; boot
//! to Keel's `configured` against the same image with Keel's units masked reaching
//! `multi-user.target` (same run, same accelerator); Keel's units in the guest's
//! `systemd-analyze blame`.
//!
//! `cargo bench -p keel-e2e --bench image` (root; each boot is 35–90 s under TCG: run it
//! on an otherwise idle machine). Prints figures; asserts nothing about time.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use keel_e2e::vm::{Firmware, Image, UserData, Vm, VmConfig};

const BOOT: Duration = Duration::from_secs(600);

/// Prints the guest's own view of the boot once it is configured.
const PROBE: &str = r#"#!/bin/sh
host() { nsenter -t 1 -m -u -i -n -p -- "$@"; }
host systemd-analyze time | sed 's/^/KEEL-BENCH time: /' > /dev/console
host systemd-analyze blame | grep -E 'keel|containerd|repart|local.mount|var-lib' | sed 's/^/KEEL-BENCH blame: /' > /dev/console
echo "KEEL-BENCH done" > /dev/console
"#;

fn boot_until(image: &Image, masked: bool, needle: &str) -> (Duration, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.qcow2");
    image.overlay_disk(&disk, "4G");
    let mut image = image.clone();
    if masked {
        // The same image and accelerator, with Keel's units masked on the kernel command
        // line: the Debian host underneath, booting to multi-user.target.
        let cmdline = image.cmdline();
        let copy = dir.path().join("image");
        std::fs::create_dir(&copy).expect("mkdir");
        for f in ["disk.raw", "vmlinuz", "initrd.img", "manifest"] {
            std::os::unix::fs::symlink(image.dir.join(f), copy.join(f)).expect("symlink");
        }
        std::fs::write(
            copy.join("cmdline"),
            format!(
                "{cmdline} systemd.mask=keeld.socket systemd.mask=keeld.service \
                 systemd.mask=keel-boot.service systemd.mask=keel-report.service"
            ),
        )
        .expect("cmdline");
        if let Ok(accel) = std::fs::read(image.dir.parent().expect("dir").join("accel")) {
            let _ = std::fs::write(dir.path().join("accel"), accel);
        }
        image = Image {
            dir: copy.canonicalize().expect("copy"),
        };
    }
    let user_data = format!(
        "[settings.host-containers.admin]\nenabled = true\nsuperpowered = true\nuser-data = \"{}\"\n",
        base64::engine::general_purpose::STANDARD.encode(PROBE)
    );
    let started = Instant::now();
    let mut vm = Vm::boot(&VmConfig {
        image,
        disk,
        other_disks: Vec::new(),
        user_data: UserData::Imds(user_data.into_bytes()),
        firmware: Firmware::DirectKernel,
        memory_mib: 1024,
        dir: dir.path().to_owned(),
        interactive: false,
        imds_port: None,
        repo_port: None,
    });
    if let Err(why) = vm.wait_serial(needle, 1, BOOT) {
        panic!("{why}\n{}", vm.serial());
    }
    let took = started.elapsed();
    if !masked {
        let _ = vm.wait_serial("KEEL-BENCH done", 1, BOOT);
    }
    let serial = vm.serial();
    vm.power_cut();
    (took, serial)
}

fn main() {
    assert_eq!(rustix::process::geteuid().as_raw(), 0, "run as root");
    // Build time with a warm package cache: a fresh output directory forces the image
    // itself to be rebuilt; the Debian root and the binaries come from their caches.
    let scratch = tempfile::tempdir().expect("tempdir");
    Image::build(&[]); // warm every cache first
    let started = Instant::now();
    let image = Image::build(&["--out", &scratch.path().display().to_string()]);
    let build = started.elapsed();
    let root = std::fs::metadata(image.dir.join("root.erofs"))
        .expect("root.erofs")
        .len();
    println!(
        "image build (warm package cache, binaries built): {:.1} s",
        build.as_secs_f64()
    );
    println!(
        "root filesystem (erofs, lz4hc): {:.1} MiB (goal <= 200 MiB)",
        root as f64 / (1 << 20) as f64
    );
    print_modules(&image.dir);

    let accel = keel_e2e::vm::accel(&image);
    let (keel, serial) = boot_until(&image, false, "Reached target keel-configured.target");
    let (plain, _) = boot_until(&image, true, "Reached target multi-user.target");
    println!("accelerator: {accel}");
    println!(
        "boot to Keel's configured: {:.1} s; Keel masked, to multi-user.target: {:.1} s; ratio {:.2} (goal <= 1.15)",
        keel.as_secs_f64(),
        plain.as_secs_f64(),
        keel.as_secs_f64() / plain.as_secs_f64()
    );
    for line in serial.lines() {
        if let Some((_, rest)) = line.split_once("KEEL-BENCH ") {
            if rest != "done" {
                println!("guest {rest}");
            }
        }
    }
}

fn print_modules(dir: &Path) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zcat {} | cpio -t --quiet | grep -c '\\.ko$'",
            dir.join("initrd.img").display()
        ))
        .output();
    if let Ok(out) = out {
        println!(
            "kernel modules in the initramfs: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
}
