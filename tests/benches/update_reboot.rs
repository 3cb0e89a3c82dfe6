//! Time from a reboot to Keel's `configured` on a booted Keel OS host under UEFI with
//! systemd-boot: plain reboots of version N (slot a) against the reboot into an
//! activated N+1 (slot b, on trial: its loader entry counts tries, then blessed), in the
//! same VM, same run, same accelerator. The update is downloaded, written and activated
//! before the reboot (`apiclient update apply` without `--reboot`): only the reboot is
//! timed, from the guest's last word before `apiclient reboot` to
//! `keel-configured.target` on the console.
//!
//! `cargo bench -p keel-e2e --bench update_reboot` (root; builds two image versions,
//! then 4 boots of 35–90 s each under TCG: run it on an otherwise idle machine).
//! Prints figures; asserts nothing about time.

use std::time::{Duration, Instant};

use keel_e2e::http_server::FileServer;
use keel_e2e::tuf::TufRepo;
use keel_e2e::vm::{
    image_version, publish, update_artifacts, update_host, update_keys, update_user_data, Vm,
};

const BOOT: Duration = Duration::from_secs(600);
const N: &str = "1.0.0";
const N1: &str = "1.1.0";
/// Plain reboots before the update.
const PLAIN: usize = 2;
const CONFIGURED: &str = "Reached target keel-configured.target";

/// The admin container at each start: counts its boots; reboots plainly `PLAIN` times,
/// then writes and activates N+1 and reboots into it. Each reboot comes after the same
/// settling pause.
const SCRIPT: &str = r#"#!/bin/sh
say() { echo "KEEL-BENCH $*" > /dev/console; }
dir=/.bottlerocket/host-containers/admin
n=$(( $(cat $dir/boots 2>/dev/null || echo 0) + 1 ))
echo $n > $dir/boots.tmp && sync && mv $dir/boots.tmp $dir/boots && sync
v=$(apiclient raw -u /os | tr -d '\n ' | sed -n 's/.*"version_id":"\([^"]*\)".*/\1/p')
say "boot=$n version=$v"
if [ "$n" -le @PLAIN@ ]; then
    sleep 10
    say "reboot-now=plain"
    apiclient reboot
elif [ "$v" = "@N@" ]; then
    i=0
    until apiclient update check >/dev/null 2>&1 || [ $i -ge 60 ]; do sleep 2; i=$((i + 1)); done
    out=$(apiclient update apply 2>&1) || say "apply-failed=$(echo "$out" | tail -n 1)"
    sync
    sleep 10
    say "reboot-now=activated"
    apiclient reboot
else
    say "done"
fi
"#;

fn main() {
    assert_eq!(rustix::process::geteuid().as_raw(), 0, "run as root");
    let n = image_version(N);
    let n1 = update_artifacts(&image_version(N1), N1);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut repo = TufRepo::create_with_keys(&dir.path().join("repo"), &update_keys());
    publish(&mut repo, dir.path(), &[&n1]);
    let server = FileServer::start("127.0.0.1", repo.dir.clone());
    let script = SCRIPT
        .replace("@PLAIN@", &PLAIN.to_string())
        .replace("@N@", N);
    let (_imds, config) = update_host(
        &n,
        dir.path(),
        update_user_data("", &script),
        server.addr.port(),
    );
    let mut vm = Vm::boot(&config);
    let accel = keel_e2e::vm::accel(&n);
    let fail = |vm: &Vm, why: String| -> ! { panic!("{why}\n{}", vm.serial()) };

    // Each reboot: from the guest's "reboot-now" to the next `configured`.
    let reboot = |vm: &mut Vm, kind: &str, nth: usize, configured: usize| -> Duration {
        if let Err(why) = vm.wait_serial(&format!("KEEL-BENCH reboot-now={kind}"), nth, BOOT * 2) {
            fail(vm, why);
        }
        let started = Instant::now();
        if let Err(why) = vm.wait_serial(CONFIGURED, configured, BOOT) {
            fail(vm, why);
        }
        started.elapsed()
    };
    let plain: Vec<Duration> = (1..=PLAIN)
        .map(|i| reboot(&mut vm, "plain", i, i + 1))
        .collect();
    let activated = reboot(&mut vm, "activated", 1, PLAIN + 2);
    if let Err(why) = vm.wait_serial("KEEL-BENCH done", 1, BOOT) {
        fail(&vm, why);
    }
    let serial = vm.serial();
    let resets = vm.resets.len();
    vm.power_cut();
    let came_up_on = format!("boot={} version={N1}", PLAIN + 2);
    assert!(
        serial.contains(&format!("KEEL-BENCH {came_up_on}")),
        "the host did not come up on {N1} after the activated reboot:\n{serial}"
    );
    for line in serial.lines().filter(|l| l.contains("apply-failed=")) {
        println!("guest: {line}");
    }

    let mean = plain.iter().sum::<Duration>().as_secs_f64() / plain.len() as f64;
    println!();
    println!(
        "reboot to configured, UEFI + systemd-boot, accelerator {accel}, watchdog resets {resets}"
    );
    for (i, d) in plain.iter().enumerate() {
        println!(
            "  plain reboot {} of {N} (slot a):        {:.1} s",
            i + 1,
            d.as_secs_f64()
        );
    }
    println!(
        "  activate-update + reboot into {N1} (slot b, on trial): {:.1} s",
        activated.as_secs_f64()
    );
    println!(
        "  ratio activated / plain (mean of {}): {:.2} (goal <= 1.10)",
        plain.len(),
        activated.as_secs_f64() / mean
    );
    println!(
        "BENCH_JSON {{\"plain_s\":{:?},\"activated_s\":{:.3},\"ratio\":{:.3},\"accel\":\"{accel}\",\"resets\":{resets}}}",
        plain.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        activated.as_secs_f64(),
        activated.as_secs_f64() / mean
    );
}
