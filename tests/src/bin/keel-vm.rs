//! keel-vm: boots a built Keel OS image under qemu; what `packaging/image/run.sh` runs.
//!
//! ```text
//! keel-vm --image DIR [--user-data FILE] [--fw-cfg] [--until configured]
//!         [--disk FILE] [--firmware direct|uefi] [--memory MIB] [--timeout SECS]
//! ```
//!
//! Without --until: the serial console on this terminal (Ctrl-A X stops the VM).
//! With --until configured: boots, waits for the boot to end, prints the guest's
//! `apiclient boot status` and `apiclient get settings`, powers the VM off, and exits
//! 0 only when the boot was configured (1 when it failed, 3 on a timeout).

use std::path::PathBuf;
use std::time::Duration;

use keel_e2e::vm::{report_phase, Firmware, Image, UserData, Vm, VmConfig};

fn usage() -> ! {
    eprintln!(
        "usage: keel-vm --image DIR [--user-data FILE] [--fw-cfg] [--until configured] \
         [--disk FILE] [--firmware direct|uefi] [--memory MIB] [--timeout SECS]"
    );
    std::process::exit(2)
}

fn main() {
    let mut image = None;
    let mut user_data: Option<PathBuf> = None;
    let mut fw_cfg = false;
    let mut until = false;
    let mut disk: Option<PathBuf> = None;
    let mut firmware = Firmware::DirectKernel;
    let mut memory = 1024;
    let mut timeout = 600u64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--image" => image = Some(PathBuf::from(value())),
            "--user-data" => user_data = Some(PathBuf::from(value())),
            "--fw-cfg" => fw_cfg = true,
            "--until" => {
                if value() != "configured" {
                    usage()
                }
                until = true;
            }
            "--disk" => disk = Some(PathBuf::from(value())),
            "--firmware" => {
                firmware = match value().as_str() {
                    "direct" => Firmware::DirectKernel,
                    "uefi" => Firmware::Uefi,
                    _ => usage(),
                }
            }
            "--memory" => memory = value().parse().unwrap_or_else(|_| usage()),
            "--timeout" => timeout = value().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let Some(image) = image else { usage() };
    let image = Image::at(&image);
    let dir = tempfile::Builder::new()
        .prefix("keel-vm.")
        .tempdir()
        .unwrap_or_else(|e| {
            eprintln!("keel-vm: cannot make a temporary directory: {e}");
            std::process::exit(1)
        });
    let disk = disk.unwrap_or_else(|| dir.path().join("disk.qcow2"));
    if !disk.exists() {
        image.overlay_disk(&disk, "4G");
    }
    let user_data = match user_data {
        None => UserData::None,
        Some(path) if fw_cfg => UserData::FwCfg(path),
        Some(path) => match std::fs::read(&path) {
            Ok(bytes) => UserData::Imds(bytes),
            Err(e) => {
                eprintln!("keel-vm: cannot read {}: {e}", path.display());
                std::process::exit(2)
            }
        },
    };
    let config = VmConfig {
        image,
        disk: disk.clone(),
        other_disks: Vec::new(),
        user_data,
        firmware,
        memory_mib: memory,
        dir: dir.path().to_owned(),
        interactive: !until,
        imds_port: None,
        repo_port: None,
    };
    let mut vm = Vm::boot(&config);
    eprintln!(
        "keel-vm: booting under qemu ({}), disk {}",
        vm.accel,
        disk.display()
    );
    if !until {
        eprintln!("keel-vm: serial console follows; Ctrl-A X stops the VM");
        let status = vm.wait();
        std::process::exit(status.code().unwrap_or(1));
    }
    let report = match vm.wait_report(1, Duration::from_secs(timeout)) {
        Ok(report) => report,
        Err(why) => {
            eprintln!("keel-vm: {why}; the serial console:\n{}", vm.serial());
            vm.power_cut();
            std::process::exit(3);
        }
    };
    let body = report.trim_end().trim_end_matches("=== end").trim_end();
    println!("{body}");
    vm.shutdown(Duration::from_secs(60));
    match report_phase(&report).as_deref() {
        Some("configured") => {}
        phase => {
            eprintln!(
                "keel-vm: the boot ended {}",
                phase.unwrap_or("in an unknown phase")
            );
            std::process::exit(1);
        }
    }
}
