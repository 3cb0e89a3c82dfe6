//! The boot's sequencing and resume against the fake container engine
//! (`containers::fake`), a real store in a temp dir and a real applier (an empty
//! services file), with tokio's paused clock: no root, no containerd, and timeouts of
//! minutes in milliseconds. A keeld restart is the boot's future dropped mid-run (what
//! SIGKILL leaves: the record in the runtime directory, containers still running) and a
//! new [`Boot`] on the same directories.

use std::path::PathBuf;

use serde_json::json;
use tokio::time::Instant;

use super::*;
use crate::apply::render::Templates;
use crate::apply::{ApplyConfig, ServicesMeta};
use crate::containers::fake::Fake;
use crate::containers::status::ContainerKind;

/// One host: its directories, store, applier and container engine, kept across keeld
/// restarts (and reboots: a reboot is a new runtime directory).
struct Node {
    dir: tempfile::TempDir,
    store: Store,
    applier: Applier,
    fake: Arc<Fake>,
    board: StatusBoard,
    /// `--reboot-command`.
    reboot_command: Vec<String>,
    /// Time since this node's kernel booted: tokio's (paused) clock since the node was
    /// made, shared by every keeld of the node.
    clock: BootClock,
}

/// A boot under way, and what it publishes.
struct Running {
    task: tokio::task::JoinHandle<()>,
    record: watch::Receiver<BootRecord>,
    gate: watch::Receiver<BootGate>,
}

impl Node {
    fn new(user_data: &str) -> Node {
        Self::with_boot_loader(user_data, false)
    }

    /// A node whose boot loader entries Keel manages (`boot_loader`): what they were last
    /// given is the file `boot-parameters` (no slot writer is reached: the empty services
    /// file has no boot parameters to hand it).
    fn with_boot_loader(user_data: &str, boot_loader: bool) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        for sub in ["state", "run", "render"] {
            std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        std::fs::write(dir.path().join("user-data.toml"), user_data).expect("user-data");
        let services = dir.path().join("services.toml");
        std::fs::write(&services, "").expect("services");
        let applier = Applier::new(
            ServicesMeta::load(&services).expect("an empty services file"),
            Templates::from_sources([]).expect("no templates"),
            ApplyConfig {
                render_root: dir.path().join("render"),
                restart_timeout: Duration::from_secs(1),
                journal_dir: None,
                events: Default::default(),
                boot_loader: boot_loader.then(|| crate::apply::BootLoader {
                    writer: crate::updates::writer_client::WriterEndpoint::Command(vec![
                        "/nonexistent/keel-slot-writer".to_owned(),
                    ]),
                    staged: dir.path().join("boot-parameters"),
                    failed: dir.path().join("boot-parameters.failed"),
                }),
            },
            json!({}),
        );
        let store = Store::open(&dir.path().join("state"), 10).expect("store");
        Node {
            dir,
            store,
            applier,
            fake: Arc::new(Fake::default()),
            board: StatusBoard::default(),
            reboot_command: Vec::new(),
            clock: {
                let booted = Instant::now();
                BootClock::from_fn(move || booted.elapsed())
            },
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts keeld's boot (and the host containers waiting on it).
    fn start(&self) -> Running {
        let (publish, record) = watch::channel(BootRecord::new(false));
        let (configured, gate) = watch::channel(BootGate::Pending);
        let boot = Boot {
            config: BootConfig {
                state_dir: self.path("state"),
                runtime_dir: self.path("run"),
                os_defaults: self.path("no-defaults.toml"),
                providers: vec![Provider::File(self.path("user-data.toml"))],
                user_data_every_boot: false,
                apiclient: self.path("no-apiclient"),
                socket: self.path("api.sock"),
                reboot_command: self.reboot_command.clone(),
                clock: self.clock.clone(),
            },
            store: self.store.clone(),
            applier: self.applier.clone(),
            runtime: self.fake.clone(),
            board: self.board.clone(),
            publish,
            events: Default::default(),
            configured,
        };
        tokio::spawn(crate::containers::run_host_containers(
            self.store.clone(),
            self.fake.clone(),
            self.board.clone(),
            crate::containers::supervisor::SupervisorConfig::default(),
            gate.clone(),
        ));
        Running {
            task: tokio::spawn(boot.run()),
            record,
            gate,
        }
    }

    /// Runs a boot to its end.
    async fn boot(&self) -> (BootRecord, BootGate) {
        let mut running = self.start();
        (&mut running.task).await.expect("the boot panicked");
        let gate = *running.gate.borrow();
        let record = running.record.borrow().clone();
        (record, gate)
    }

    /// What the runtime directory holds for the next keeld.
    fn record_on_disk(&self) -> BootRecord {
        let bytes = std::fs::read(self.path("run/boot.json")).expect("boot.json");
        serde_json::from_slice(&bytes).expect("a boot record")
    }

    /// A reboot: the runtime directory is a fresh tmpfs.
    fn reboot(&self) {
        std::fs::remove_file(self.path("run/boot.json")).expect("boot.json");
    }

    fn settings(&self) -> serde_json::Value {
        self.store.snapshot().live_settings().clone()
    }

    fn mode(&self, name: &str) -> String {
        self.settings()["bootstrap-containers"][name]["mode"]
            .as_str()
            .unwrap_or("(unset)")
            .to_owned()
    }

    fn started(&self) -> Vec<String> {
        self.fake.with(|s| s.started.clone())
    }

    fn bootstrap_state(&self, name: &str) -> Option<(RunState, Option<i32>)> {
        self.board
            .get(ContainerKind::Bootstrap, name)
            .map(|s| (s.state, s.last_exit_code))
    }
}

fn step<'r>(record: &'r BootRecord, name: &str) -> &'r status::BootStep {
    record
        .step(name)
        .unwrap_or_else(|| panic!("no step {name}: {record:#?}"))
}

fn outcome(record: &BootRecord, name: &str) -> (StepOutcome, String) {
    let s = step(record, name);
    (s.outcome, s.detail.clone().unwrap_or_default())
}

/// A bootstrap container entry of user-data.
fn bootstrap(name: &str, mode: &str, essential: bool, extra: &str) -> String {
    format!(
        "[settings.bootstrap-containers.{name}]\nsource = \"oci-archive:/images/{name}.tar\"\n\
         mode = \"{mode}\"\nessential = {essential}\n{extra}\n"
    )
}

const ADMIN: &str = "[settings.host-containers.admin]\nenabled = true\n\
                     source = \"oci-archive:/images/admin.tar\"\n";

#[tokio::test(start_paused = true)]
async fn bootstrap_containers_run_by_name_once_is_switched_off_and_host_containers_start_after() {
    let user_data = [
        bootstrap("b-always", "always", false, ""),
        bootstrap("a-once", "once", true, ""),
        bootstrap("c-off", "off", true, ""),
        ADMIN.to_owned(),
    ]
    .concat();
    let node = Node::new(&user_data);
    node.fake
        .script("bootstrap-a-once", Some(Duration::from_secs(2)), 0);
    node.fake
        .script("bootstrap-b-always", Some(Duration::from_secs(1)), 0);

    let (record, gate) = node.boot().await;
    assert_eq!(
        (record.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    assert!(record.first_boot);
    for name in ["user-data:file", "commit", "render"] {
        assert_eq!(
            step(&record, name).outcome,
            StepOutcome::Succeeded,
            "{name}"
        );
    }
    assert_eq!(
        outcome(&record, "bootstrap-container:a-once"),
        (StepOutcome::Succeeded, "exited 0".into())
    );
    assert_eq!(
        outcome(&record, "bootstrap-container:b-always"),
        (StepOutcome::Succeeded, "exited 0".into())
    );
    assert_eq!(
        outcome(&record, "bootstrap-container:c-off"),
        (StepOutcome::Skipped, "mode off".into())
    );
    // One after another, by name; the host container only once the boot is configured.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        node.started(),
        ["bootstrap-a-once", "bootstrap-b-always", "host-admin"]
    );
    // The images of those that run were made ready ahead; not the `off` one's.
    let mut prefetched = node.fake.with(|s| s.prefetched.clone());
    prefetched.sort();
    assert_eq!(
        prefetched,
        [
            "oci-archive:/images/a-once.tar",
            "oci-archive:/images/b-always.tar"
        ]
    );
    // Each ran to its end and was cleaned up; its status stays.
    assert_eq!(
        node.fake.with(|s| s.removes.clone()),
        ["bootstrap-a-once", "bootstrap-b-always"]
    );
    assert!(!node.fake.has_task("bootstrap-a-once"));
    assert_eq!(
        node.bootstrap_state("a-once"),
        Some((RunState::Succeeded, Some(0)))
    );
    // `once` became `off` by a committed transaction of its own; the others kept theirs.
    assert_eq!(
        (
            node.mode("a-once"),
            node.mode("b-always"),
            node.mode("c-off")
        ),
        ("off".into(), "always".into(), "off".into())
    );
    let history = node.store.snapshot().history.clone();
    let switched = history
        .iter()
        .find(|g| g.tx == "boot-bootstrap-containers-a-once")
        .expect("the switch to off is in the history");
    assert_eq!(
        switched.changed_keys,
        ["settings.bootstrap-containers.a-once.mode"]
    );

    // The next boot: no user-data again, the `once` one stays off, `always` runs again.
    node.reboot();
    let (record, gate) = node.boot().await;
    assert_eq!(
        (record.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    assert!(!record.first_boot);
    assert!(record.step("user-data:file").is_none(), "{record:#?}");
    assert_eq!(
        outcome(&record, "bootstrap-container:a-once"),
        (StepOutcome::Skipped, "mode off".into())
    );
    assert_eq!(
        node.started()
            .iter()
            .filter(|id| id.starts_with("bootstrap-"))
            .collect::<Vec<_>>(),
        [
            "bootstrap-a-once",
            "bootstrap-b-always",
            "bootstrap-b-always"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_essential_failure_halts_the_boot_and_host_containers_are_not_started() {
    let user_data = [
        bootstrap("a-setup", "once", true, ""),
        bootstrap("b-later", "always", false, ""),
        ADMIN.to_owned(),
    ]
    .concat();
    let node = Node::new(&user_data);
    node.fake
        .script("bootstrap-a-setup", Some(Duration::from_secs(1)), 1);

    let (record, gate) = node.boot().await;
    assert_eq!((record.phase, gate), (BootPhase::Failed, BootGate::Failed));
    assert_eq!(
        record.reason.as_deref(),
        Some("essential bootstrap-container:a-setup failed: exited 1")
    );
    assert_eq!(
        outcome(&record, "bootstrap-container:a-setup"),
        (StepOutcome::Failed, "exited 1".into())
    );
    assert!(step(&record, "bootstrap-container:a-setup").essential);
    // Nothing after it ran, and no host container starts in this boot.
    assert!(record.step("bootstrap-container:b-later").is_none());
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(node.started(), ["bootstrap-a-setup"]);
    let admin = node
        .board
        .get(ContainerKind::Host, "admin")
        .expect("admin status");
    assert_eq!(admin.state, RunState::NotStarted);
    assert_eq!(
        node.bootstrap_state("a-setup"),
        Some((RunState::Failed, Some(1)))
    );
    // A failed `once` stays `once`: the next boot tries it again.
    assert_eq!(node.mode("a-setup"), "once");
    // A keeld restart stays failed and starts nothing.
    let (again, gate) = node.boot().await;
    assert_eq!((again.phase, gate), (BootPhase::Failed, BootGate::Failed));
    assert_eq!(node.started(), ["bootstrap-a-setup"]);
}

#[tokio::test(start_paused = true)]
async fn a_non_essential_failure_is_recorded_and_the_boot_goes_on() {
    let user_data = [
        bootstrap("a-optional", "once", false, ""),
        bootstrap("b-needed", "once", true, ""),
        ADMIN.to_owned(),
    ]
    .concat();
    let node = Node::new(&user_data);
    node.fake
        .script("bootstrap-a-optional", Some(Duration::from_secs(1)), 2);
    node.fake
        .script("bootstrap-b-needed", Some(Duration::from_secs(1)), 0);

    let (record, gate) = node.boot().await;
    assert_eq!(
        (record.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    assert_eq!(record.reason, None);
    let failed = step(&record, "bootstrap-container:a-optional");
    assert_eq!(
        (failed.outcome, failed.essential, failed.detail.as_deref()),
        (StepOutcome::Failed, false, Some("exited 2"))
    );
    assert_eq!(
        step(&record, "bootstrap-container:b-needed").outcome,
        StepOutcome::Succeeded
    );
    assert_eq!(
        node.bootstrap_state("a-optional"),
        Some((RunState::Failed, Some(2)))
    );
    // Only the one that succeeded is switched off.
    assert_eq!(
        (node.mode("a-optional"), node.mode("b-needed")),
        ("once".into(), "off".into())
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        node.started(),
        ["bootstrap-a-optional", "bootstrap-b-needed", "host-admin"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_timeout_kills_the_container_before_the_next_one_starts() {
    let user_data = [
        bootstrap("a-hangs", "always", false, "timeout = \"30s\""),
        bootstrap("b-next", "always", true, "timeout = \"1h\""),
    ]
    .concat();
    let node = Node::new(&user_data);
    // a-hangs never exits on its own; b-next is well within its limit.
    node.fake
        .script("bootstrap-b-next", Some(Duration::from_secs(5)), 0);

    let began = Instant::now();
    let (record, gate) = node.boot().await;
    let took = began.elapsed();
    assert_eq!(
        (record.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    assert_eq!(
        outcome(&record, "bootstrap-container:a-hangs"),
        (StepOutcome::Failed, "timed out after 30s".into())
    );
    assert_eq!(
        node.bootstrap_state("a-hangs"),
        Some((RunState::Failed, None))
    );
    // Killed at once (no grace) when its 30 s were up, and cleaned up; then b-next ran
    // its 5 s.
    let starts = node.fake.with(|s| s.starts.clone());
    let kills: Vec<_> = node.fake.with(|s| {
        s.stop_log
            .iter()
            .filter(|stop| stop.ended_a_run)
            .map(|stop| (stop.id.clone(), stop.grace, stop.at - starts[0]))
            .collect()
    });
    assert_eq!(
        kills,
        [(
            "bootstrap-a-hangs".to_owned(),
            Duration::ZERO,
            Duration::from_secs(30)
        )]
    );
    assert!(!node.fake.has_task("bootstrap-a-hangs"));
    assert!(node
        .fake
        .with(|s| s.removes.contains(&"bootstrap-a-hangs".to_owned())));
    assert_eq!(node.started(), ["bootstrap-a-hangs", "bootstrap-b-next"]);
    assert_eq!(starts[1] - starts[0], Duration::from_secs(30));
    assert!(
        took >= Duration::from_secs(35) && took < Duration::from_secs(36),
        "{took:?}"
    );
}

/// A timeout the model accepts in a form humantime does not read (more than nine
/// decimals: its "number overflow") is honoured, not taken as "no timeout".
#[tokio::test(start_paused = true)]
async fn a_fractional_timeout_is_honoured() {
    let node = Node::new(&bootstrap(
        "hangs",
        "always",
        false,
        "timeout = \"0.5000000000m\"",
    ));
    let boot = tokio::time::timeout(Duration::from_secs(3600), node.boot()).await;
    let (record, gate) = boot.expect("the boot never ended: the timeout was not honoured");
    assert_eq!(
        (record.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    assert_eq!(
        outcome(&record, "bootstrap-container:hangs"),
        (StepOutcome::Failed, "timed out after 30s".into())
    );
}

/// A timed-out container that cannot be killed is reported so, not as killed.
#[tokio::test(start_paused = true)]
async fn a_timed_out_container_that_cannot_be_killed_says_so() {
    let node = Node::new(&bootstrap("hangs", "always", false, "timeout = \"30s\""));
    node.fake.with(|s| s.stop_failures = 1);
    let (record, _) = node.boot().await;
    let (outcome, reason) = outcome(&record, "bootstrap-container:hangs");
    assert_eq!(outcome, StepOutcome::Failed);
    assert!(
        reason.starts_with("timed out after 30s, and could not be killed (it may still run): ")
            && reason.contains("the fake refused to stop bootstrap-hangs"),
        "{reason}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_essential_timeout_fails_the_boot() {
    let node = Node::new(&bootstrap("hangs", "once", true, "timeout = \"2m\""));
    let (record, gate) = node.boot().await;
    assert_eq!((record.phase, gate), (BootPhase::Failed, BootGate::Failed));
    assert_eq!(
        record.reason.as_deref(),
        Some("essential bootstrap-container:hangs failed: timed out after 2m")
    );
    assert!(!node.fake.has_task("bootstrap-hangs"));
    assert_eq!(node.mode("hangs"), "once");
}

/// keeld killed while bootstrap container `slow` runs.
async fn killed_while_slow_runs(node: &Node) {
    let running = node.start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(node.started(), ["bootstrap-slow"]);
    running.task.abort();
    assert!(running.task.await.is_err_and(|e| e.is_cancelled()));
    // What the next keeld finds: the step running, the container too.
    let left = node.record_on_disk();
    assert_eq!(left.phase, BootPhase::BootstrapContainers);
    assert_eq!(
        step(&left, "bootstrap-container:slow").outcome,
        StepOutcome::Running
    );
    assert_eq!(step(&left, "commit").outcome, StepOutcome::Succeeded);
}

fn slow_node() -> Node {
    let node = Node::new(&[bootstrap("slow", "once", true, ""), ADMIN.to_owned()].concat());
    node.fake
        .script("bootstrap-slow", Some(Duration::from_secs(10)), 0);
    node
}

#[tokio::test(start_paused = true)]
async fn after_a_keeld_restart_the_running_container_is_waited_for_not_started_again() {
    let node = slow_node();
    let began = Instant::now();
    killed_while_slow_runs(&node).await;
    assert!(
        node.fake.has_task("bootstrap-slow"),
        "the container runs on"
    );

    let (record, gate) = node.boot().await;
    assert_eq!(
        (record.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    // The same run was waited for to its end (10 s from its start), not a second one.
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(11),
        "{took:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(node.started(), ["bootstrap-slow", "host-admin"]);
    assert_eq!(
        outcome(&record, "bootstrap-container:slow"),
        (StepOutcome::Succeeded, "exited 0".into())
    );
    assert_eq!(node.mode("slow"), "off");
    // The steps before it were not run again: the user-data was committed once.
    let launches = node
        .store
        .snapshot()
        .history
        .iter()
        .filter(|g| g.tx == LAUNCH_TX)
        .count();
    assert_eq!(launches, 1);
}

/// The timeout counts from the container's start, not from the keeld that resumed
/// waiting for it: `slow` (10 s) with a 5 s limit, keeld killed after 3 s, is killed
/// 5 s after its start, and its step's duration says 5 s.
#[tokio::test(start_paused = true)]
async fn a_timeout_resumed_after_a_keeld_restart_counts_from_the_start() {
    let node = Node::new(
        &[
            bootstrap("slow", "once", false, "timeout = \"5s\""),
            ADMIN.to_owned(),
        ]
        .concat(),
    );
    node.fake
        .script("bootstrap-slow", Some(Duration::from_secs(10)), 0);
    let began = Instant::now();
    killed_while_slow_runs(&node).await;

    let (record, _) = node.boot().await;
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(6),
        "killed {took:?} after its start"
    );
    assert_eq!(
        outcome(&record, "bootstrap-container:slow"),
        (StepOutcome::Failed, "timed out after 5s".into())
    );
    let duration = step(&record, "bootstrap-container:slow").duration_ms;
    assert!(
        duration.is_some_and(|ms| (5000..6000).contains(&ms)),
        "{duration:?}"
    );
    assert!(!node.fake.has_task("bootstrap-slow"));
    assert_eq!(node.started(), ["bootstrap-slow", "host-admin"]);
}

#[tokio::test(start_paused = true)]
async fn a_container_that_ended_while_keeld_was_away_counts_with_its_exit_code() {
    let node = slow_node();
    killed_while_slow_runs(&node).await;
    // It exits while no keeld watches.
    tokio::time::sleep(Duration::from_secs(20)).await;
    node.fake.with(|s| {
        if let Some((_, Some(task))) = s.records.get_mut("bootstrap-slow") {
            task.running = false;
            task.exit_status = 0;
        }
    });

    let (record, gate) = node.boot().await;
    assert_eq!(
        (record.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    assert_eq!(
        outcome(&record, "bootstrap-container:slow"),
        (StepOutcome::Succeeded, "exited 0".into())
    );
    assert_eq!(node.mode("slow"), "off");
    assert_eq!(
        node.started().first().map(String::as_str),
        Some("bootstrap-slow")
    );
    assert_eq!(
        node.started()
            .iter()
            .filter(|id| *id == "bootstrap-slow")
            .count(),
        1
    );
    assert!(node
        .fake
        .with(|s| s.removes.contains(&"bootstrap-slow".to_owned())));
}

/// keeld crashes right after deleting the exited task: its outcome was recorded
/// before, so the next keeld finds the step done (not "task gone") and finishes it.
#[tokio::test(start_paused = true)]
async fn a_crash_while_cleaning_up_keeps_the_outcome() {
    let node = slow_node();
    node.fake
        .with(|s| s.crash_after_deleting_task = Some("bootstrap-slow".into()));
    let running = node.start();
    let crashed = running.task.await;
    assert!(crashed.is_err_and(|e| e.is_panic()));
    assert_eq!(
        outcome(&node.record_on_disk(), "bootstrap-container:slow"),
        (StepOutcome::Succeeded, "exited 0".into())
    );

    let (record, gate) = node.boot().await;
    assert_eq!(
        (record.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    assert_eq!(node.mode("slow"), "off");
    assert!(
        node.fake
            .with(|s| !s.records.contains_key("bootstrap-slow")),
        "the record left behind is removed"
    );
    assert_eq!(
        node.started()
            .iter()
            .filter(|id| *id == "bootstrap-slow")
            .count(),
        1
    );
}

/// `--accept-state-loss` left an empty store on a host that booted before: the OS
/// defaults and user-data are staged again at the next boot, as at the first one, and
/// the boot after is an ordinary one.
#[tokio::test]
async fn a_store_recovered_to_nothing_gets_its_user_data_again() {
    let mut node = Node::new("[settings]\nmotd = \"from user-data\"\n");
    // A host that booted before, whose store lost both slots; keeld was started once
    // with --accept-state-loss.
    let state = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(state.path(), 10).expect("store");
        store
            .patch("t", json!({"motd": "set through the API"}))
            .await
            .expect("patch");
        store.commit("t", Caller::keeld()).await.expect("commit");
    }
    for name in ["generations.0", "generations.1"] {
        std::fs::remove_file(state.path().join(name)).expect("remove");
    }
    let recovered = Store::recover(state.path())
        .expect("recover")
        .expect("damage recovered");
    assert_eq!(recovered.continued_from, 0);
    node.store = Store::open(state.path(), 10).expect("store");
    std::fs::write(node.path("state").join(FIRST_BOOT_DONE), "").expect("marker");

    let (record, gate) = node.boot().await;
    assert_eq!(
        (record.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    assert!(record.first_boot, "{record:#?}");
    assert_eq!(node.settings()["motd"], "from user-data");

    node.reboot();
    let (record, _) = node.boot().await;
    assert!(!record.first_boot, "{record:#?}");
}

/// A power cut while a `once` container that succeeded is cleaned up: the boot's record
/// (tmpfs) is gone at the next boot, so only the switch to `off`, committed before the
/// clean-up, keeps it from running again; the container left behind is removed.
#[tokio::test(start_paused = true)]
async fn a_power_cut_while_cleaning_up_does_not_run_a_once_container_again() {
    let node = slow_node();
    node.fake
        .with(|s| s.crash_after_deleting_task = Some("bootstrap-slow".into()));
    let running = node.start();
    let crashed = running.task.await;
    assert!(crashed.is_err_and(|e| e.is_panic()));
    assert_eq!(node.mode("slow"), "off", "switched off before the clean-up");
    assert!(node.fake.with(|s| s.records.contains_key("bootstrap-slow")));

    node.reboot();
    let (record, gate) = node.boot().await;
    assert_eq!(
        (record.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    assert_eq!(
        outcome(&record, "bootstrap-container:slow").0,
        StepOutcome::Skipped
    );
    assert_eq!(
        node.started()
            .iter()
            .filter(|id| *id == "bootstrap-slow")
            .count(),
        1,
        "run once"
    );
    assert!(
        node.fake
            .with(|s| !s.records.contains_key("bootstrap-slow")),
        "the record left behind is removed"
    );
}

/// The same crash after an essential container failed: the failure was recorded, the
/// boot not yet ended. The next keeld must fail the boot again, not take the recorded
/// step as done and go on to `configured`.
#[tokio::test(start_paused = true)]
async fn a_crash_while_cleaning_up_a_failed_essential_container_still_fails_the_boot() {
    let node = Node::new(&[bootstrap("slow", "once", true, ""), ADMIN.to_owned()].concat());
    node.fake
        .script("bootstrap-slow", Some(Duration::from_secs(10)), 1);
    node.fake
        .with(|s| s.crash_after_deleting_task = Some("bootstrap-slow".into()));
    let running = node.start();
    assert!(running.task.await.is_err_and(|e| e.is_panic()));
    let on_disk = node.record_on_disk();
    assert_eq!(
        on_disk.phase,
        BootPhase::BootstrapContainers,
        "not ended yet"
    );
    assert_eq!(
        step(&on_disk, "bootstrap-container:slow").outcome,
        StepOutcome::Failed
    );

    let (record, gate) = node.boot().await;
    assert_eq!((record.phase, gate), (BootPhase::Failed, BootGate::Failed));
    let reason = record.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("essential bootstrap-container:slow failed"),
        "{reason}"
    );
    assert!(
        node.fake
            .with(|s| !s.records.contains_key("bootstrap-slow")),
        "the record left behind is removed"
    );
    assert_eq!(node.started(), ["bootstrap-slow"], "not run again");
    assert_eq!(
        node.mode("slow"),
        "once",
        "a failed once container stays once"
    );
}

#[tokio::test(start_paused = true)]
async fn a_container_gone_after_a_keeld_restart_fails_and_is_not_run_again() {
    let node = slow_node();
    killed_while_slow_runs(&node).await;
    // containerd lost it (say, restarted without its state) while keeld was away.
    node.fake.with(|s| s.records.remove("bootstrap-slow"));

    let (record, gate) = node.boot().await;
    assert_eq!((record.phase, gate), (BootPhase::Failed, BootGate::Failed));
    let (outcome, detail) = outcome(&record, "bootstrap-container:slow");
    assert_eq!(outcome, StepOutcome::Failed);
    assert!(detail.contains("not run again in this boot"), "{detail}");
    assert_eq!(node.started(), ["bootstrap-slow"]);
    assert_eq!(node.mode("slow"), "once");
}

/// A `once` container's success is recorded, then its `mode = off` committed: a keeld
/// killed in between finds the step done and the settings still `once`. The resume
/// commits the switch, or the next boot would run it again.
#[tokio::test(start_paused = true)]
async fn a_once_container_whose_switch_off_was_cut_short_is_switched_off_at_the_resume() {
    let node = Node::new(
        &[
            bootstrap("a-quick", "once", false, ""),
            bootstrap("slow", "once", true, ""),
            ADMIN.to_owned(),
        ]
        .concat(),
    );
    node.fake
        .script("bootstrap-a-quick", Some(Duration::from_secs(1)), 0);
    node.fake
        .script("bootstrap-slow", Some(Duration::from_secs(10)), 0);
    let running = node.start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.task.abort();
    assert!(running.task.await.is_err_and(|e| e.is_cancelled()));
    assert_eq!(
        step(&node.record_on_disk(), "bootstrap-container:a-quick").outcome,
        StepOutcome::Succeeded
    );
    // As if the kill had come before the switch was committed.
    node.store
        .patch(
            "undo",
            json!({"bootstrap-containers": {"a-quick": {"mode": "once"}}}),
        )
        .await
        .expect("patch");
    node.store
        .commit("undo", Caller::keeld())
        .await
        .expect("commit");
    assert_eq!(node.mode("a-quick"), "once");

    let (record, gate) = node.boot().await;
    assert_eq!(
        (record.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    assert_eq!(node.mode("a-quick"), "off");
    assert_eq!(node.mode("slow"), "off");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        node.started(),
        ["bootstrap-a-quick", "bootstrap-slow", "host-admin"],
        "nothing ran twice"
    );
}

/// A bootstrap container set to run with no `source` is a failed step that names the
/// setting (essential: the boot fails), not a container silently left out.
#[tokio::test(start_paused = true)]
async fn a_bootstrap_container_without_a_source_fails_its_step() {
    for essential in [false, true] {
        let user_data = format!(
            "[settings.bootstrap-containers.setup]\nmode = \"once\"\nessential = {essential}\n{ADMIN}"
        );
        let node = Node::new(&user_data);
        let (record, gate) = node.boot().await;
        let (outcome, detail) = outcome(&record, "bootstrap-container:setup");
        assert_eq!(outcome, StepOutcome::Failed, "{detail}");
        assert_eq!(
            detail,
            "settings.bootstrap-containers.setup.source is not set: there is no image to run"
        );
        if essential {
            assert_eq!(gate, BootGate::Failed, "{record:?}");
        } else {
            assert_eq!(
                (record.phase, gate),
                (BootPhase::Configured, BootGate::Configured)
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_restart_after_the_boot_changes_nothing() {
    let node = slow_node();
    let (record, _) = node.boot().await;
    assert_eq!(record.phase, BootPhase::Configured);
    let generations = node.store.snapshot().history.len();
    let (again, gate) = node.boot().await;
    assert_eq!(
        (again.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    assert_eq!(again.boot_id, record.boot_id);
    assert_eq!(node.store.snapshot().history.len(), generations);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The host container's supervisor of the second keeld re-attached to the first one's.
    assert_eq!(node.started(), ["bootstrap-slow", "host-admin"]);
}

/// reboot-to-reconcile: a bootstrap container changes the boot parameters (here: what
/// the loader entries were given) during the boot, so the boot reboots instead of
/// reaching `configured`, host containers never start, and a keeld restart in that boot
/// neither reboots again nor starts them; a reboot command that fails fails the boot.
#[tokio::test]
async fn changed_boot_parameters_reboot_once_before_host_containers() {
    let user_data = [
        "[settings.boot]\nreboot-to-reconcile = true\n".to_owned(),
        bootstrap("change", "always", true, ""),
        ADMIN.to_owned(),
    ]
    .concat();
    let mut node = Node::with_boot_loader(&user_data, true);
    let reboots = node.path("reboots");
    node.reboot_command = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        format!("echo reboot >> {}", reboots.display()),
    ];
    node.fake
        .script("bootstrap-change", Some(Duration::from_millis(500)), 0);
    let staged = node.path("boot-parameters");
    std::fs::write(&staged, "quiet").expect("staged");

    let mut running = node.start();
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.bootstrap_state("change").map(|s| s.0) != Some(RunState::Running) {
        assert!(Instant::now() < deadline, "{:#?}", running.record.borrow());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // What `apiclient set boot.kernel-parameters…` in the container would leave.
    std::fs::write(&staged, "quiet nosmt").expect("staged");
    (&mut running.task).await.expect("the boot panicked");
    let record = running.record.borrow().clone();
    assert_eq!(record.phase, BootPhase::Rebooting, "{record:#?}");
    assert_eq!(record.booted_parameters.as_deref(), Some("quiet"));
    assert!(
        record.reason.as_deref().is_some_and(
            |r| r.contains("the kernel got \"quiet\", the next boot gets \"quiet nosmt\"")
        ),
        "{record:#?}"
    );
    assert_eq!(outcome(&record, RECONCILE_STEP).0, StepOutcome::Succeeded);
    assert_eq!(*running.gate.borrow(), BootGate::Pending);
    assert_eq!(
        std::fs::read_to_string(&reboots).expect("reboots"),
        "reboot\n"
    );
    assert!(
        !node.started().iter().any(|s| s.contains("admin")),
        "{:?}",
        node.started()
    );

    // keeld restarted before the reboot took the host down: nothing more happens.
    let (again, gate) = node.boot().await;
    assert_eq!(
        (again.phase, gate),
        (BootPhase::Rebooting, BootGate::Pending)
    );
    assert_eq!(
        std::fs::read_to_string(&reboots).expect("reboots"),
        "reboot\n"
    );

    // The boot after got them: configured, no second reboot.
    node.reboot();
    let (after, gate) = node.boot().await;
    assert_eq!(
        (after.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    assert_eq!(after.booted_parameters.as_deref(), Some("quiet nosmt"));
    assert_eq!(
        std::fs::read_to_string(&reboots).expect("reboots"),
        "reboot\n"
    );
}

#[tokio::test]
async fn a_reboot_to_reconcile_that_cannot_run_fails_the_boot_with_the_reason() {
    let user_data = [
        "[settings.boot]\nreboot-to-reconcile = true\n".to_owned(),
        bootstrap("change", "always", false, ""),
    ]
    .concat();
    let mut node = Node::with_boot_loader(&user_data, true);
    node.reboot_command = vec!["/nonexistent/reboot".to_owned()];
    node.fake
        .script("bootstrap-change", Some(Duration::from_millis(500)), 0);
    std::fs::write(node.path("boot-parameters"), "nosmt").expect("staged");
    let mut running = node.start();
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.bootstrap_state("change").map(|s| s.0) != Some(RunState::Running) {
        assert!(Instant::now() < deadline, "{:#?}", running.record.borrow());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    std::fs::write(node.path("boot-parameters"), "").expect("staged");
    (&mut running.task).await.expect("the boot panicked");
    let record = running.record.borrow().clone();
    assert_eq!(record.phase, BootPhase::Failed, "{record:#?}");
    assert!(
        record
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("the next boot gets none")
                && r.contains("the reboot failed")
                && r.contains("/nonexistent/reboot")),
        "{record:#?}"
    );
    assert_eq!(outcome(&record, RECONCILE_STEP).0, StepOutcome::Failed);
}

/// containerd goes away while an essential bootstrap container runs and comes back: the
/// container ran on (its shim holds it), so keeld waits it out and waits for it again;
/// it is not killed, not started again, and the boot does not fail for it.
#[tokio::test(start_paused = true)]
async fn containerd_going_away_while_a_bootstrap_container_runs_is_waited_out() {
    let node = slow_node();
    let began = Instant::now();
    let running = node.start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(node.started(), ["bootstrap-slow"]);
    node.fake.with(|s| s.down = true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!running.task.is_finished(), "the boot waits for containerd");
    node.fake.with(|s| s.down = false);
    running.task.await.expect("the boot panicked");
    let record = node.record_on_disk();
    assert_eq!(record.phase, BootPhase::Configured, "{record:#?}");
    assert_eq!(
        outcome(&record, "bootstrap-container:slow"),
        (StepOutcome::Succeeded, "exited 0".into())
    );
    assert_eq!(slow_starts(&node), 1);
    assert!(
        node.fake
            .with(|s| s.stop_log.iter().all(|stop| !stop.ended_a_run)),
        "nothing was killed"
    );
    // It ended when its script says (10 s from its start), seen within a back-off.
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "{:?}",
        began.elapsed()
    );
}

/// containerd not up yet when a bootstrap container is due: it starts once containerd
/// answers, instead of failing the boot.
#[tokio::test(start_paused = true)]
async fn a_bootstrap_container_due_while_containerd_is_down_starts_once_it_answers() {
    let node = slow_node();
    node.fake.with(|s| s.down = true);
    let running = node.start();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(node.started().is_empty());
    node.fake.with(|s| s.down = false);
    running.task.await.expect("the boot panicked");
    let record = node.record_on_disk();
    assert_eq!(record.phase, BootPhase::Configured, "{record:#?}");
    assert_eq!(slow_starts(&node), 1);
}

/// A keeld that died between creating the task and starting it left a task that never
/// ran: the resume starts it afresh, instead of waiting for a process that never runs.
#[tokio::test(start_paused = true)]
async fn a_task_created_and_never_started_is_started_at_the_resume() {
    let node = slow_node();
    killed_while_slow_runs(&node).await;
    node.fake.with(|s| {
        if let Some((_, Some(task))) = s.records.get_mut("bootstrap-slow") {
            task.created_only = true;
        }
    });
    let (record, gate) = tokio::time::timeout(Duration::from_secs(60), node.boot())
        .await
        .expect("the resume does not wait for a task that never runs");
    assert_eq!(
        (record.phase, gate),
        (BootPhase::Configured, BootGate::Configured)
    );
    assert_eq!(slow_starts(&node), 2);
}

fn slow_starts(node: &Node) -> usize {
    slow_starts_of(node, "bootstrap-slow")
}

/// The timeout counts from the container's start: containerd not answering for 10 s
/// before it starts does not use up its 5 s.
#[tokio::test(start_paused = true)]
async fn a_wait_for_containerd_before_the_start_does_not_count_against_the_timeout() {
    let node = Node::new(
        &[
            bootstrap("quick", "always", true, "timeout = \"5s\""),
            ADMIN.to_owned(),
        ]
        .concat(),
    );
    node.fake
        .script("bootstrap-quick", Some(Duration::from_secs(2)), 0);
    node.fake.with(|s| s.down = true);
    let running = node.start();
    tokio::time::sleep(Duration::from_secs(10)).await;
    node.fake.with(|s| s.down = false);
    running.task.await.expect("the boot panicked");
    let record = node.record_on_disk();
    assert_eq!(record.phase, BootPhase::Configured, "{record:#?}");
    assert_eq!(
        outcome(&record, "bootstrap-container:quick"),
        (StepOutcome::Succeeded, "exited 0".into())
    );
}

/// Started, then containerd stops answering for good: when its 5 s are up the step ends
/// as timed out, saying it could not be killed, instead of waiting for ever.
#[tokio::test(start_paused = true)]
async fn a_timeout_that_passes_while_containerd_is_down_ends_the_step() {
    let node = Node::new(
        &[
            bootstrap("hangs", "always", false, "timeout = \"5s\""),
            ADMIN.to_owned(),
        ]
        .concat(),
    );
    let began = Instant::now();
    let running = node.start();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(slow_starts_of(&node, "bootstrap-hangs"), 1);
    node.fake.with(|s| s.down = true);
    tokio::time::timeout(Duration::from_secs(60), async {
        while node.bootstrap_state("hangs").map(|s| s.0) != Some(RunState::Failed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the step ends");
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    node.fake.with(|s| s.down = false);
    running.task.await.expect("the boot panicked");
    let record = node.record_on_disk();
    let (outcome, detail) = outcome(&record, "bootstrap-container:hangs");
    assert_eq!(outcome, StepOutcome::Failed);
    assert!(
        detail.starts_with("timed out after 5s, and could not be killed"),
        "{detail}"
    );
}

fn slow_starts_of(node: &Node, id: &str) -> usize {
    node.started().iter().filter(|s| *s == id).count()
}

/// A step that panics (a bug, which keeld outlives): the boot ends `failed` with a
/// reason instead of staying in its phase for ever (host containers waiting for it,
/// `apiclient boot wait` hanging), and the host containers are not started.
#[tokio::test(start_paused = true)]
async fn a_step_that_panics_fails_the_boot_with_a_reason() {
    let node = Node::new(&[bootstrap("slow", "once", false, ""), ADMIN.to_owned()].concat());
    node.fake
        .script("bootstrap-slow", Some(Duration::from_secs(1)), 0);
    node.fake
        .with(|s| s.bug_after_deleting_task = Some("bootstrap-slow".into()));
    let (record, gate) = node.boot().await;
    assert_eq!((record.phase, gate), (BootPhase::Failed, BootGate::Failed));
    let reason = record.reason.clone().unwrap_or_default();
    assert!(reason.contains("a bug"), "{reason}");
    assert_eq!(
        node.record_on_disk().phase,
        BootPhase::Failed,
        "and recorded"
    );
}
