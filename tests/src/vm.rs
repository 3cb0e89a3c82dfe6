//! Booting Keel OS images under qemu, for the VM tests, the image benchmark and
//! `packaging/image/run.sh` (through the `keel-vm` binary).
//!
//! The harness sees the guest only as a user does: its serial console (journald copies
//! the log there), the report port (`keel-report.service` writes `apiclient boot status`
//! and `apiclient get settings` to the virtio-serial port `org.keel.report` once the
//! boot has ended), the instance metadata service it serves ([`crate::imds`]), qemu's
//! monitor (power button, power cut) and the disk image.
//!
//! The accelerator is KVM when it can boot the image's kernel (probed once with a 20 s
//! limit and remembered beside the image), else TCG (software emulation).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::imds::{Imds, Instance};

/// How user-data reaches the guest.
#[derive(Debug, Clone)]
pub enum UserData {
    /// None at all (the IMDS still answers, with 404 for user-data).
    None,
    /// From the metadata service at 169.254.169.254, as on EC2.
    Imds(Vec<u8>),
    /// From qemu's fw_cfg (`opt/keel/user-data`): the `qemu` provider.
    FwCfg(PathBuf),
}

/// How the VM boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// qemu loads slot a's kernel and initrd itself, with the image's command line.
    DirectKernel,
    /// UEFI firmware (OVMF) runs systemd-boot from the ESP, which picks the slot.
    Uefi,
}

/// A built image: `packaging/image/build.sh`'s output directory.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
}

impl Image {
    /// The image at `dir` (must hold disk.raw, vmlinuz, initrd.img, cmdline).
    pub fn at(dir: &Path) -> Image {
        for file in ["disk.raw", "vmlinuz", "initrd.img", "cmdline", "manifest"] {
            assert!(
                dir.join(file).is_file(),
                "{} has no {file}: not a built Keel OS image",
                dir.display()
            );
        }
        Image {
            dir: dir.canonicalize().expect("image directory"),
        }
    }

    /// Builds the image (cached by its inputs) with `packaging/image/build.sh` and
    /// returns it. `extra` are build.sh arguments (e.g. `--version 0.9.0`).
    pub fn build(extra: &[&str]) -> Image {
        let repo = repo_root();
        let out = Command::new("bash")
            .arg(repo.join("packaging/image/build.sh"))
            .args(extra)
            .stderr(Stdio::inherit())
            .output()
            .expect("run packaging/image/build.sh");
        assert!(out.status.success(), "packaging/image/build.sh failed");
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Image::at(Path::new(&dir))
    }

    pub fn cmdline(&self) -> String {
        std::fs::read_to_string(self.dir.join("cmdline"))
            .expect("read cmdline")
            .trim()
            .to_owned()
    }

    /// A copy-on-write disk over the image (qcow2 backed by disk.raw), `size` bytes: the
    /// image stays pristine, and the data partition fills what is beyond it.
    pub fn overlay_disk(&self, path: &Path, size: &str) {
        let _ = std::fs::remove_file(path);
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(self.dir.join("disk.raw"))
            .arg(path)
            .arg(size)
            .status()
            .expect("run qemu-img");
        assert!(status.success(), "qemu-img create failed");
    }
}

/// The repository (for build.sh), from this crate's manifest directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo")
        .to_owned()
}

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub image: Image,
    /// The VM's disk (see [`Image::overlay_disk`]); kept across boots. The guest sees it
    /// with the serial number `keel-boot-disk` (`/sys/block/vdX/serial`).
    pub disk: PathBuf,
    /// More disks (raw or qcow2), attached ahead of `disk` (so the guest names them
    /// first: vda, …), with the serial numbers `keel-other-0`, …; the firmware boots
    /// `disk`.
    pub other_disks: Vec<PathBuf>,
    pub user_data: UserData,
    pub firmware: Firmware,
    pub memory_mib: u32,
    /// Files of this VM: serial.log, report.log, the monitor socket.
    pub dir: PathBuf,
    /// Serial console on this process's terminal (run.sh without --until).
    pub interactive: bool,
    /// The metadata service to relay to, when the caller runs one across boots.
    pub imds_port: Option<u16>,
    /// An HTTP server on the host's loopback (an update repository) the guest reaches at
    /// `http://169.254.169.254:8080/`, through the same kind of relay as the metadata
    /// service; no other address or port is reachable.
    pub repo_port: Option<u16>,
}

/// A running VM. Dropping it kills qemu.
pub struct Vm {
    child: Child,
    pub serial_log: PathBuf,
    pub report_log: PathBuf,
    monitor: PathBuf,
    /// The metadata service this VM's guest reaches (when it was started here).
    pub imds: Option<Imds>,
    pub accel: String,
    /// Resets the watchdog made (see [`Vm::watchdog`]), with why.
    pub resets: Vec<String>,
    /// The boot being watched: where it starts in the serial log, and since when.
    watched: Option<(usize, Instant)>,
}

/// How long a boot may go without the initramfs's first line before the harness resets
/// the VM. The initramfs speaks 10–30 s after a (re)boot starts under TCG.
const HUNG_BOOT: Duration = Duration::from_secs(150);

/// The accelerator: `KEEL_QEMU_ACCEL` if set, else the remembered probe, else a probe.
pub fn accel(image: &Image) -> String {
    if let Ok(forced) = std::env::var("KEEL_QEMU_ACCEL") {
        return forced;
    }
    // Remembered beside the images: the answer depends on the machine, not the image.
    let memo = image.dir.parent().unwrap_or(&image.dir).join("accel");
    if let Ok(known) = std::fs::read_to_string(&memo) {
        return known.trim().to_owned();
    }
    let found = if Path::new("/dev/kvm").exists() && probe_kvm(image) {
        "kvm"
    } else {
        "tcg"
    };
    let _ = std::fs::write(&memo, found);
    found.to_owned()
}

/// Boots the kernel under KVM with no disk: the initramfs prints `keel-initrd:` within
/// a few seconds if KVM works. Some nested KVMs hang the kernel before that.
fn probe_kvm(image: &Image) -> bool {
    let log = image.dir.join("accel-probe.log");
    let _ = std::fs::remove_file(&log);
    let mut child = match Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "512",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(image.dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.dir.join("initrd.img"))
        .args(["-append", "console=ttyS0 panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .args(["-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(_) => return false,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ok = false;
    while Instant::now() < deadline {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("keel-initrd:")) {
            ok = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    ok
}

/// OVMF's firmware code and a fresh copy of its variable store for `dir`.
fn ovmf(dir: &Path) -> (PathBuf, PathBuf) {
    let code = PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd");
    let vars_template = PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd");
    let vars = dir.join("OVMF_VARS.fd");
    if !vars.exists() {
        std::fs::copy(&vars_template, &vars).expect("copy OVMF variables (package ovmf)");
    }
    (code, vars)
}

impl Vm {
    /// Starts qemu. Returns once qemu runs; the guest boots in the background.
    pub fn boot(config: &VmConfig) -> Vm {
        std::fs::create_dir_all(&config.dir).expect("vm dir");
        let serial_log = config.dir.join("serial.log");
        let report_log = config.dir.join("report.log");
        let monitor = config.dir.join("monitor.sock");
        let _ = std::fs::remove_file(&monitor);
        let accel = accel(&config.image);

        // The metadata service, reached at 169.254.169.254 through a per-connection relay.
        let (imds, imds_port) = match (&config.user_data, config.imds_port) {
            (_, Some(port)) => (None, port),
            (UserData::Imds(data), None) => {
                let imds = Imds::start(Instance::with_user_data(Some(data.clone())))
                    .expect("start the metadata service");
                let port = imds.addr.port();
                (Some(imds), port)
            }
            (_, None) => {
                let imds = Imds::start(Instance::with_user_data(None))
                    .expect("start the metadata service");
                let port = imds.addr.port();
                (Some(imds), port)
            }
        };
        let relay = imds_binary();

        let mut qemu = Command::new("qemu-system-x86_64");
        match accel.as_str() {
            "kvm" => qemu.args(["-accel", "kvm", "-cpu", "host"]),
            _ => qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
        };
        qemu.args(["-smp", "2", "-m", &config.memory_mib.to_string()])
            .args(["-nographic", "-nodefaults"])
            .args(["-machine", "q35"]);
        match config.firmware {
            Firmware::DirectKernel => {
                qemu.arg("-kernel")
                    .arg(config.image.dir.join("vmlinuz"))
                    .arg("-initrd")
                    .arg(config.image.dir.join("initrd.img"))
                    .arg("-append")
                    .arg(config.image.cmdline());
            }
            Firmware::Uefi => {
                let (code, vars) = ovmf(&config.dir);
                qemu.arg("-drive")
                    .arg(format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        code.display()
                    ))
                    .arg("-drive")
                    .arg(format!(
                        "if=pflash,format=raw,unit=1,file={}",
                        vars.display()
                    ));
            }
        }
        let format = |path: &Path| if is_qcow2(path) { "qcow2" } else { "raw" };
        for (i, other) in config.other_disks.iter().enumerate() {
            qemu.arg("-drive").arg(format!(
                "if=none,id=other{i},format={},file={},cache=unsafe",
                format(other),
                other.display()
            ));
            qemu.arg("-device").arg(format!(
                "virtio-blk-pci,drive=other{i},serial=keel-other-{i}"
            ));
        }
        qemu.arg("-drive").arg(format!(
            "if=none,id=disk0,format={},file={},cache=unsafe",
            format(&config.disk),
            config.disk.display()
        ));
        // With other disks the firmware must still boot this one (its boot order).
        let bootindex = if config.other_disks.is_empty() {
            ""
        } else {
            ",bootindex=0"
        };
        qemu.arg("-device").arg(format!(
            "virtio-blk-pci,drive=disk0,serial=keel-boot-disk{bootindex}"
        ));
        qemu.args(["-device", "virtio-rng-pci"]);
        let mut netdev = format!(
            "user,id=n0,restrict=on,net=169.254.0.0/16,host=169.254.0.2,dhcpstart=169.254.0.15,\
             guestfwd=tcp:169.254.169.254:80-cmd:{} relay 127.0.0.1:{imds_port}",
            relay.display()
        );
        if let Some(port) = config.repo_port {
            netdev.push_str(&format!(
                ",guestfwd=tcp:169.254.169.254:8080-cmd:{} relay 127.0.0.1:{port}",
                relay.display()
            ));
        }
        qemu.arg("-netdev").arg(netdev);
        // No option ROM: nothing boots from the network, and iPXE costs seconds under TCG.
        qemu.args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
        if let UserData::FwCfg(path) = &config.user_data {
            qemu.arg("-fw_cfg")
                .arg(format!("name=opt/keel/user-data,file={}", path.display()));
        }
        // The report port keel-report.service writes to.
        qemu.args(["-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!("file,id=report,path={}", report_log.display()))
            .args([
                "-device",
                "virtserialport,chardev=report,name=org.keel.report",
            ]);
        qemu.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()));
        if config.interactive {
            qemu.args(["-serial", "mon:stdio"]);
        } else {
            let _ = std::fs::remove_file(&serial_log);
            qemu.arg("-serial")
                .arg(format!("file:{}", serial_log.display()));
            qemu.stdin(Stdio::null()).stdout(Stdio::null());
        }
        let child = qemu.spawn().expect("start qemu-system-x86_64");
        Vm {
            child,
            serial_log,
            report_log,
            monitor,
            imds,
            accel,
            resets: Vec::new(),
            watched: None,
        }
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read(&self.serial_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The report port so far (one report per boot that ended).
    pub fn reports(&self) -> Vec<String> {
        let text = std::fs::read(&self.report_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        text.split_inclusive("=== end\n")
            .filter(|r| r.ends_with("=== end\n"))
            .map(str::to_owned)
            .collect()
    }

    /// Waits for the `n`th boot report (1-based).
    pub fn wait_report(&mut self, n: usize, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(report) = self.reports().get(n - 1) {
                return Ok(report.clone());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("qemu exited ({status}) before boot report {n}"));
            }
            if Instant::now() > deadline {
                return Err(format!("no boot report {n} within {timeout:?}"));
            }
            let serial = self.serial();
            self.watchdog(&serial);
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until the serial console has printed `needle` `count` times in all, each in a
    /// line that has ended (see `complete_lines`).
    pub fn wait_serial(
        &mut self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial();
            if complete_lines(&serial).matches(needle).count() >= count {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("qemu exited ({status}) before {needle:?} x{count}"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{needle:?} x{count} not on the console within {timeout:?}"
                ));
            }
            self.watchdog(&serial);
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// A hardware watchdog for the start of a boot, which this emulated machine lacks
    /// (the guest's own, softdog, runs only once its systemd has opened it). Under TCG a
    /// warm reset now and then leaves the next kernel hung before its initramfs runs (RCU
    /// stall reports: "timer wakeup didn't happen", no other output); seen once in about
    /// ten reboots on this machine, never on a cold start. A boot whose initramfs has not
    /// spoken within [`HUNG_BOOT`] is reset, as a watchdog or an operator's BMC would; the
    /// reset is recorded in [`Vm::resets`] (a test counting boot tries must count it: the
    /// boot loader had already counted the try). A boot begins after the last reboot the
    /// kernel announced, by reboot(2) or by softdog's reset. Called by the waits above.
    fn watchdog(&mut self, serial: &str) {
        let start = [
            "reboot: Restarting system",
            "softdog: Initiating system reboot",
        ]
        .iter()
        .filter_map(|marker| serial.rfind(marker).map(|i| i + marker.len()))
        .max()
        .unwrap_or(0);
        if serial[start..].contains("keel-initrd:") {
            self.watched = None;
            return;
        }
        match self.watched {
            Some((watched, since)) if watched == start => {
                if since.elapsed() > HUNG_BOOT {
                    let why = format!(
                        "no initramfs output {HUNG_BOOT:?} after the boot began (byte {start} of the serial log)"
                    );
                    eprintln!("keel-vm: {why}: resetting the VM");
                    let _ = self.qmp("system_reset");
                    self.resets.push(why);
                    self.watched = Some((start, Instant::now()));
                }
            }
            _ => self.watched = Some((start, Instant::now())),
        }
    }

    /// Presses the power button (ACPI): the guest shuts down cleanly.
    pub fn power_button(&self) -> Result<(), String> {
        self.qmp("system_powerdown")
    }

    /// Limits the disk's writes to `iops` requests a second (0: no limit), as qemu's
    /// `block_set_io_throttle` does: each write waits its turn, so the writes of a step
    /// in the guest spread out in time and can be counted.
    pub fn throttle_writes(&self, iops: u64) -> Result<(), String> {
        self.qmp_call(
            "block_set_io_throttle",
            serde_json::json!({
                "device": "disk0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
                "iops": 0, "iops_rd": 0, "iops_wr": iops,
            }),
        )
        .map(|_| ())
    }

    /// Write requests the disk has completed since qemu started (`query-blockstats`).
    pub fn writes_done(&self) -> Result<u64, String> {
        let stats = self.qmp_call("query-blockstats", serde_json::json!({}))?;
        stats
            .as_array()
            .and_then(|all| all.iter().find(|d| d["device"] == "disk0"))
            .and_then(|d| d["stats"]["wr_operations"].as_u64())
            .ok_or_else(|| format!("query-blockstats: no disk0 in {stats}"))
    }

    /// Runs one QMP command with `arguments`; answers its `return` value.
    fn qmp_call(
        &self,
        execute: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let stream = UnixStream::connect(&self.monitor).map_err(|e| format!("monitor: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| e.to_string())?; // greeting
        let commands = [
            serde_json::json!({"execute": "qmp_capabilities"}),
            serde_json::json!({"execute": execute, "arguments": arguments}),
        ];
        let mut answer = serde_json::Value::Null;
        for command in commands {
            writeln!(writer, "{command}").map_err(|e| e.to_string())?;
            loop {
                line.clear();
                reader.read_line(&mut line).map_err(|e| e.to_string())?;
                let reply: serde_json::Value = serde_json::from_str(&line)
                    .map_err(|e| format!("monitor: {execute}: {e}: {line:?}"))?;
                if let Some(value) = reply.get("return") {
                    answer = value.clone();
                    break;
                }
                if reply.get("error").is_some() {
                    return Err(format!("monitor: {execute}: {line}"));
                }
            }
        }
        Ok(answer)
    }

    fn qmp(&self, command: &str) -> Result<(), String> {
        self.qmp_call(command, serde_json::json!({})).map(|_| ())
    }

    /// Waits for qemu to exit (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("qemu still running after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Power off cleanly (power button, then a hard stop after `grace`).
    pub fn shutdown(&mut self, grace: Duration) {
        if self.power_button().is_ok() && self.wait_exit(grace).is_ok() {
            return;
        }
        self.power_cut();
    }

    /// Pulls the plug: qemu is killed, the disk keeps what reached it.
    pub fn power_cut(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for qemu to exit on its own (interactive use).
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait for qemu")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.power_cut();
    }
}

/// keel-imds: beside this program (keel-vm), or in the build's bin directory (tests).
fn imds_binary() -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("keel-imds")));
    match beside {
        Some(path) if path.exists() => path,
        _ => crate::bin("keel-imds"),
    }
}

fn is_qcow2(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb"
}

/// The serial console up to the end of its last complete line. A marker is looked for
/// only there: qemu writes the console as the guest sends it (a 500-byte line takes tens
/// of milliseconds under TCG), so a marker found in a line still arriving would have a
/// caller read the line's text cut short.
fn complete_lines(serial: &str) -> &str {
    serial.rfind('\n').map_or("", |end| &serial[..=end])
}

/// A section of a boot report (`boot status` or `settings`) as the JSON apiclient printed.
pub fn report_json(report: &str, section: &str) -> Option<serde_json::Value> {
    let start = report.find(&format!("=== {section}\n"))? + section.len() + 5;
    let rest = &report[start..];
    let end = rest.find("\n=== ").map_or(rest.len(), |e| e + 1);
    serde_json::from_str(&rest[..end]).ok()
}

/// The boot `phase` in a boot report (`configured`, `failed`, ...).
pub fn report_phase(report: &str) -> Option<String> {
    report_json(report, "boot status")?
        .get("phase")?
        .as_str()
        .map(str::to_owned)
}

/// The update repository's key and trusted root for the VM tests and benchmarks, kept
/// beside the built images so that a rebuild with unchanged inputs is a cache hit.
pub fn update_keys() -> PathBuf {
    repo_root().join("target/image/test-update-keys")
}

/// Version `version` of the test image, built with the test repository's `root.json`
/// as its trusted update root. Needs root (mmdebstrap, chroot).
pub fn image_version(version: &str) -> Image {
    image_version_with(version, None)
}

/// [`image_version`] shipping the settings migrations in `migrations` (a
/// `packaging/migrations.toml` of its own) instead of the repository's.
pub fn image_version_with(version: &str, migrations: Option<&Path>) -> Image {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "building an image (mmdebstrap, chroot) needs root"
    );
    let root = crate::tuf::ensure_keys(&update_keys());
    let mut args = vec![
        "--version",
        version,
        "--update-root",
        root.to_str().expect("utf-8 path"),
    ];
    if let Some(path) = migrations {
        args.extend(["--migrations", path.to_str().expect("utf-8 path")]);
    }
    Image::build(&args)
}

/// A built image as an update: its root, hash tree, kernel and initrd, and root hash.
pub fn update_artifacts(image: &Image, version: &str) -> crate::tuf::UpdateArtifacts {
    crate::tuf::UpdateArtifacts {
        version: version.to_owned(),
        root: image.dir.join("root.erofs"),
        hash: image.dir.join("root.verity"),
        kernel: image.dir.join("vmlinuz"),
        initrd: image.dir.join("initrd.img"),
        root_hash: std::fs::read_to_string(image.dir.join("roothash"))
            .expect("roothash")
            .trim()
            .to_owned(),
    }
}

/// User-data for an updatable host: `extra` (more TOML), the test repository's URLs (the
/// harness serves it to the guest through qemu's guestfwd, see [`VmConfig::repo_port`])
/// and a superpowered admin container whose user-data is `admin_script`.
pub fn update_user_data(extra: &str, admin_script: &str) -> String {
    use base64::Engine as _;
    format!(
        r#"{extra}[settings.updates]
metadata-base-url = "http://169.254.169.254:8080/metadata/"
targets-base-url = "http://169.254.169.254:8080/targets/"

[settings.host-containers.admin]
enabled = true
superpowered = true
user-data = "{}"
"#,
        base64::engine::general_purpose::STANDARD.encode(admin_script)
    )
}

/// An updatable host to boot under UEFI: a fresh overlay of `image` in `dir`, its
/// `user_data` from a metadata service (answered with the config: keep it as long as the
/// VM runs) and the update repository served on `repo_port`.
pub fn update_host(
    image: &Image,
    dir: &Path,
    user_data: String,
    repo_port: u16,
) -> (Imds, VmConfig) {
    let disk = dir.join("disk.qcow2");
    image.overlay_disk(&disk, "4G");
    let imds = Imds::start(Instance::with_user_data(Some(user_data.into_bytes())))
        .expect("metadata service");
    let config = VmConfig {
        image: image.clone(),
        disk,
        other_disks: Vec::new(),
        user_data: UserData::None,
        firmware: Firmware::Uefi,
        memory_mib: 1024,
        dir: dir.join("vm"),
        interactive: false,
        imds_port: Some(imds.addr.port()),
        repo_port: Some(repo_port),
    };
    (imds, config)
}

/// Signs `updates` (of the test image's variant) into `repo` with their manifest, whose
/// file is written in `dir`.
pub fn publish(
    repo: &mut crate::tuf::TufRepo,
    dir: &Path,
    updates: &[&crate::tuf::UpdateArtifacts],
) {
    publish_expiring(repo, dir, updates, crate::tuf::days_from_now(7));
}

/// [`publish`] with metadata that expires at `expires`.
pub fn publish_expiring(
    repo: &mut crate::tuf::TufRepo,
    dir: &Path,
    updates: &[&crate::tuf::UpdateArtifacts],
    expires: jiff::Timestamp,
) {
    const VARIANT: &str = "keel-qemu";
    let entries: Vec<serde_json::Value> = updates
        .iter()
        .map(|u| u.manifest_entry(VARIANT, serde_json::json!({})))
        .collect();
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        serde_json::to_vec_pretty(&serde_json::json!({"updates": entries, "migrations": {}}))
            .expect("manifest"),
    )
    .expect("write manifest");
    let mut files = vec![("manifest.json".to_owned(), manifest)];
    for update in updates {
        for (name, path) in update.names(VARIANT) {
            files.push((name, path.to_owned()));
        }
    }
    let refs: Vec<(&str, &Path)> = files
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    repo.publish(&refs, expires);
}

#[cfg(test)]
mod tests {
    use super::complete_lines;

    #[test]
    fn a_marker_counts_once_its_line_has_ended() {
        assert_eq!(complete_lines(""), "");
        assert_eq!(complete_lines("KEEL-PROBE step-9 rc=0 out=no upd"), "");
        assert_eq!(
            complete_lines("boot\nKEEL-PROBE step-9 rc=0 out=no upd"),
            "boot\n"
        );
        assert_eq!(complete_lines("a\r\nb\n"), "a\r\nb\n");
    }
}
