//! The event stream end to end: `GET /events` and `apiclient events` against the real
//! keeld: commits then applies, resuming with `?since=`, a reader that falls behind the
//! buffer, bad queries, followers across a keeld stop and restart, and (with a private
//! containerd, as root) container state changes and boot phases.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_e2e::containerd::Containerd;
use keel_e2e::image::ImageBuilder;
use keel_e2e::{bin, Keeld, KeeldOptions};
use serde_json::{json, Value};

/// A client reading `GET /events?...` as it comes (chunked NDJSON).
struct Follower {
    reader: BufReader<UnixStream>,
    /// Bytes of lines not yet complete.
    pending: Vec<u8>,
    lines: std::collections::VecDeque<Value>,
    /// The stream's last chunk arrived: it ended cleanly.
    ended: bool,
}

impl Follower {
    fn open(socket: &Path, query: &str) -> Follower {
        let mut stream = UnixStream::connect(socket).unwrap();
        write!(
            stream,
            "GET /events?{query} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let mut chunked = false;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            if header == "\r\n" {
                break;
            }
            let lower = header.to_ascii_lowercase();
            chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
            if lower.starts_with("content-type:") {
                assert!(lower.contains("application/x-ndjson"), "{header}");
            }
        }
        assert!(chunked, "a stream is chunked");
        Follower {
            reader,
            pending: Vec::new(),
            lines: Default::default(),
            ended: false,
        }
    }

    /// The next event, waiting up to `timeout`; `None` once the stream ended cleanly.
    fn next(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines.pop_front() {
                return Some(line);
            }
            if self.ended {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no event within {timeout:?}");
            self.reader.get_ref().set_read_timeout(Some(left)).unwrap();
            self.read_chunk();
        }
    }

    /// Every event until one satisfies `pred` (included).
    fn until(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .next(left)
                .unwrap_or_else(|| panic!("the stream ended; seen: {seen:#?}"));
            let done = pred(&event);
            seen.push(event);
            if done {
                return seen;
            }
        }
    }

    fn read_chunk(&mut self) {
        let mut size = String::new();
        self.reader
            .read_line(&mut size)
            .expect("reading the stream");
        assert!(
            size.ends_with("\r\n"),
            "the stream was cut without its last chunk: {size:?}"
        );
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        let mut data = vec![0; size + 2];
        self.reader.read_exact(&mut data).unwrap();
        if size == 0 {
            self.ended = true;
            return;
        }
        self.pending.extend_from_slice(&data[..size]);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.lines
                .push_back(serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!("not a JSON line ({e}): {}", String::from_utf8_lossy(&line))
                }));
        }
    }
}

/// The events `GET /events?<query>` answers without following.
fn events(keeld: &Keeld, query: &str) -> Vec<Value> {
    let r = keeld.raw("GET", &format!("/events?{query}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    r.text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The niceness of the first thread of `pid` named `name`, from `/proc`.
fn thread_niceness(pid: u32, name: &str) -> Option<i64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    tasks.flatten().find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        if comm.trim_end() != name {
            return None;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        // After the name in parentheses: field 3 (state) onwards; niceness is field 19.
        let (_, rest) = stat.rsplit_once(')')?;
        rest.split_whitespace().nth(16)?.parse().ok()
    })
}

fn latest(keeld: &Keeld) -> u64 {
    events(keeld, "")
        .last()
        .and_then(|e| e["cursor"].as_u64())
        .unwrap_or(0)
}

fn cursors(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["cursor"].as_u64().unwrap())
        .collect()
}

fn set(keeld: &Keeld, assignment: &str) {
    let out = keeld.apiclient(&["set", assignment]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// PATCH + POST /tx/commit (no apply): one commit event.
fn commit(keeld: &Keeld, tx: &str, patch: &Value) {
    let r = keeld.raw(
        "PATCH",
        &format!("/settings?tx={tx}"),
        Some(patch.to_string().as_bytes()),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let r = keeld.raw("POST", &format!("/tx/commit?tx={tx}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_commit_is_a_commit_event_then_an_apply_event() {
    let keeld = Keeld::start();
    let since = latest(&keeld);
    let mut follower = Follower::open(&keeld.socket, &format!("since={since}&follow=true"));
    set(&keeld, "motd=hello from the events test");
    let seen = follower.until(Duration::from_secs(20), |e| e["kind"] == "apply");
    assert_eq!(seen.len(), 2, "{seen:#?}");
    // Streams are served by a thread of their own, below keeld's priority (inside
    // keeld's sandbox, which lets it renice only itself).
    assert_eq!(
        thread_niceness(keeld.pid(), "keel-events"),
        Some((thread_niceness(keeld.pid(), "keeld").expect("keeld's main thread") + 10).min(19)),
        "no keel-events thread at keeld's niceness + 10"
    );
    let (commit, apply) = (&seen[0], &seen[1]);
    let stream = commit["stream"].as_str().unwrap();
    assert_eq!(stream.len(), 32);
    assert_eq!(apply["stream"], stream);
    assert_eq!(commit["cursor"], since + 1);
    assert_eq!(apply["cursor"], since + 2);
    assert_eq!(commit["kind"], "commit");
    assert!(
        commit["tx"].as_str().unwrap().starts_with("apiclient-set-"),
        "{commit}"
    );
    assert_eq!(commit["changed-keys"], json!(["settings.motd"]));
    assert_eq!(commit["caller"]["uid"], 0);
    assert_eq!(commit["caller"]["comm"], "apiclient");
    assert!(commit["caller"]["pid"].as_u64().unwrap() > 0);
    let generation = commit["generation"].as_u64().unwrap();
    let history = keeld.raw("GET", "/history?limit=1", None).json();
    assert_eq!(history[0]["generation"], generation);
    assert_eq!(apply["generation"], generation);
    assert_eq!(apply["keys"], json!(["settings.motd"]));
    assert_eq!(apply["success"], true);
    assert_eq!(apply["services"], json!(["motd"]));
    let motd = apply["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "motd")
        .unwrap_or_else(|| panic!("{apply:#}"));
    assert_eq!(motd["result"], "written");
    assert_eq!(motd["path"], "/etc/motd");
    assert_eq!(apply["commands"], json!([]), "motd restarts nothing");
    // A service with a restart command: the command's outcome, not its output.
    let r = keeld.raw(
        "PATCH",
        "/settings?tx=ntp",
        Some(br#"{"ntp": {"time-servers": ["pool.example.org"]}}"#),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let r = keeld.raw("POST", "/tx/commit_and_apply?tx=ntp", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = follower.until(Duration::from_secs(20), |e| e["kind"] == "apply");
    let apply = seen.last().unwrap();
    let command = &apply["commands"][0];
    assert_eq!(command["service"], "chronyd", "{apply:#}");
    assert_eq!(command["success"], true);
    assert_eq!(command["exit-code"], 0);
    assert_eq!(command["timed-out"], false);
    assert!(command["argv"].as_array().unwrap().len() > 1);
    assert!(command.get("stdout").is_none(), "no output in events");
    let generation = apply["generation"].as_u64().unwrap();
    // A rollback is a commit event too, naming what it rolled back to.
    let r = keeld.raw(
        "POST",
        &format!("/history/rollback?generation={}", generation - 1),
        None,
    );
    assert!(r.status < 300, "{}", r.text());
    let seen = follower.until(Duration::from_secs(20), |e| e["kind"] == "commit");
    let rollback = seen.last().unwrap();
    assert_eq!(rollback["rollback-of"], generation - 1);
    assert_eq!(rollback["tx"], format!("rollback-to-{}", generation - 1));
}

#[test]
fn the_boot_is_in_the_stream_from_the_start() {
    let keeld = Keeld::start();
    let all = events(&keeld, "kinds=boot-phase,commit");
    let phases: Vec<(Value, Value)> = all
        .iter()
        .filter(|e| e["kind"] == "boot-phase")
        .map(|e| (e["from"].clone(), e["to"].clone()))
        .collect();
    assert_eq!(phases[0].0, Value::Null, "{phases:?}");
    assert_eq!(phases.last().unwrap().1, "configured", "{phases:?}");
    for pair in phases.windows(2) {
        assert_eq!(
            pair[0].1, pair[1].0,
            "one phase leads to the next: {phases:?}"
        );
    }
    assert_eq!(all[0]["cursor"], 1, "cursors start at 1");
    assert!(all.iter().all(|e| e["kind"] != "apply"), "filtered");
}

#[test]
fn since_resumes_with_exactly_the_missed_events() {
    let keeld = Keeld::start();
    let before = events(&keeld, "");
    let stream = before[0]["stream"].as_str().unwrap().to_owned();
    let since = cursors(&before).last().copied().unwrap();
    for n in 0..3 {
        set(&keeld, &format!("motd=resume-{n}"));
    }
    let missed = events(&keeld, &format!("since={since}"));
    assert_eq!(
        cursors(&missed),
        ((since + 1)..=(since + 6)).collect::<Vec<_>>()
    );
    let kinds: Vec<&str> = missed.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["commit", "apply", "commit", "apply", "commit", "apply"]
    );
    // Naming the stream changes nothing while it is this keeld's.
    let half = events(&keeld, &format!("since={}&stream={stream}", since + 3));
    assert_eq!(half, missed[3..].to_vec());
    // The header names the stream, even with nothing to read.
    let r = keeld.raw("GET", &format!("/events?since={}", since + 6), None);
    assert_eq!(r.header("x-keel-event-stream"), Some(stream.as_str()));
    assert!(r.body.is_empty());
    // Another stream's cursor: a gap says so, then everything kept.
    let other = events(&keeld, &format!("since={since}&stream={}", "0".repeat(32)));
    assert_eq!(other[0]["kind"], "gap");
    assert_eq!(other[0]["reason"], "new-stream");
    assert_eq!(other[1..].to_vec(), events(&keeld, ""));
}

#[test]
fn a_restarted_keeld_is_a_new_stream() {
    let mut keeld = Keeld::start();
    set(&keeld, "motd=before the restart");
    let before = events(&keeld, "");
    let old_stream = before[0]["stream"].as_str().unwrap().to_owned();
    let last = cursors(&before).last().copied().unwrap();
    assert_eq!(keeld.stop().code(), Some(0));
    keeld.spawn();
    let after = events(&keeld, "");
    assert_ne!(after[0]["stream"], old_stream.as_str());
    assert_eq!(after[0]["cursor"], 1, "cursors start again");
    let resumed = events(&keeld, &format!("since={last}&stream={old_stream}"));
    assert_eq!(resumed[0]["kind"], "gap");
    assert_eq!(resumed[0]["reason"], "new-stream");
    assert_eq!(resumed[0]["cursor"], 0);
    assert_eq!(resumed[1..].to_vec(), after);
}

/// A reader asking for more than the buffer holds, and a follower that stops reading
/// while events go by, are each told what they lost, with a gap.
#[test]
fn a_reader_behind_the_buffer_gets_a_gap() {
    let keeld = Keeld::start_with(KeeldOptions {
        extra_args: vec!["--event-buffer".into(), "8".into()],
        ..Default::default()
    });
    // Connected, then not read from while many events go by: keeld writes until the
    // socket is full, then the ring moves on without it.
    let since = latest(&keeld);
    let mut sleeper = Follower::open(&keeld.socket, &format!("since={since}&follow=true"));
    // Commits of 64 keys each (4 writers × 64: the 256 sysctl keys the model allows) make
    // events of a few KiB: a few hundred fill the socket.
    let commits = 400;
    std::thread::scope(|scope| {
        for t in 0..4 {
            let keeld = &keeld;
            scope.spawn(move || {
                for n in 0..commits / 4 {
                    let sysctl: serde_json::Map<String, Value> = (0..64)
                        .map(|k| (format!("vm.t{t}k{k}"), json!(format!("{n}"))))
                        .collect();
                    commit(
                        keeld,
                        &format!("t{t}"),
                        &json!({"kernel": {"sysctl": sysctl}}),
                    );
                }
            });
        }
    });
    let newest = latest(&keeld);
    assert_eq!(newest, since + commits);
    // Asking for all of it: the oldest are gone.
    let all = events(&keeld, "since=0");
    assert_eq!(all[0]["kind"], "gap");
    assert_eq!(all[0]["reason"], "fell-behind");
    assert_eq!(all[0]["first-lost"], 1);
    assert_eq!(all[0]["last-lost"], newest - 8);
    assert_eq!(all[0]["lost"], newest - 8);
    assert_eq!(
        cursors(&all[1..]),
        ((newest - 7)..=newest).collect::<Vec<_>>()
    );
    // The sleeper wakes: in order, every cursor either read or inside a gap, and at least
    // one gap.
    let mut next = since + 1;
    let mut gaps = 0;
    while next <= newest {
        let event = sleeper.next(Duration::from_secs(30)).expect("stream open");
        if event["kind"] == "gap" {
            assert_eq!(event["first-lost"], next, "{event}");
            next = event["last-lost"].as_u64().unwrap() + 1;
            assert_eq!(event["cursor"], next - 1);
            gaps += 1;
        } else {
            assert_eq!(event["cursor"], next, "{event}");
            next += 1;
        }
    }
    assert!(gaps > 0, "the sleeper was never told it fell behind");
}

#[test]
fn bad_queries_are_refused_naming_the_parameter() {
    let keeld = Keeld::start();
    let before = events(&keeld, "");
    // The query, the parameter the error names, and whether it is also the `key`.
    for (query, name, keyed) in [
        ("since=abc", "since", true),
        ("since=-1", "since", true),
        ("since=", "since", true),
        ("since=1.5", "since", true),
        ("since=%2B1", "since", true),
        ("since=%201", "since", true),
        ("since=99999999999999999999999", "since", true),
        ("since=1&since=2", "since", false),
        ("since=%FF", "since", false),
        ("follow=yes", "follow", true),
        ("follow=", "follow", true),
        ("stream=not-hex", "stream", true),
        ("since=1&stream=", "stream", true),
        ("kinds=commit,nope", "kinds", true),
        ("kinds=", "kinds", true),
        ("cursor=1", "cursor", false),
    ] {
        let r = keeld.raw("GET", &format!("/events?{query}"), None);
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        let body = r.json();
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(name), "{query}: {error}");
        if keyed {
            assert_eq!(body["key"], name, "{query}: {body}");
        }
    }
    let r = keeld.raw("POST", "/events", None);
    assert_eq!(r.status, 405, "{}", r.text());
    // Nothing happened, and keeld is fine.
    assert_eq!(events(&keeld, ""), before);
    set(&keeld, "motd=still fine");
}

/// A follower's stream ends cleanly (its last chunk sent) when keeld stops, so that the
/// shutdown drains at once instead of waiting out its grace.
#[test]
fn followers_end_cleanly_when_keeld_stops() {
    let mut keeld = Keeld::start();
    let mut followers: Vec<Follower> = (0..3)
        .map(|_| Follower::open(&keeld.socket, "follow=true"))
        .collect();
    for f in &mut followers {
        f.until(Duration::from_secs(10), |e| e["to"] == "configured");
    }
    let started = Instant::now();
    assert_eq!(keeld.stop().code(), Some(0));
    let took = started.elapsed();
    for mut f in followers {
        assert!(f.next(Duration::from_secs(5)).is_none(), "the stream ends");
    }
    assert!(
        keeld.log().contains("drained=true"),
        "keeld did not drain in {took:?}:\n{}",
        keeld.log()
    );
}

/// An `apiclient` child with its stdout piped, read line by line.
struct ApiclientFollower {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl ApiclientFollower {
    fn start(keeld: &Keeld, args: &[&str]) -> ApiclientFollower {
        let mut child = Command::new(bin("apiclient"))
            .arg("--socket-path")
            .arg(&keeld.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ApiclientFollower { child, lines }
    }

    fn until(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = pred(&line);
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(e) => panic!("{e}: no such line in {timeout:?}; seen: {seen:#?}"),
            }
        }
    }
}

impl Drop for ApiclientFollower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn apiclient_events_prints_reads_and_follows_across_a_restart() {
    let mut keeld = Keeld::start();
    set(&keeld, "motd=for apiclient events");
    // People: a header, one line per event.
    let out = keeld.apiclient(&["events", "--kind", "commit,apply"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("CURSOR"), "{text}");
    let last_commit = lines
        .iter()
        .rev()
        .find(|l| l.contains(" commit "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        last_commit.contains("by apiclient (uid 0") && last_commit.ends_with("settings.motd"),
        "{text}"
    );
    assert!(lines.last().unwrap().contains(" apply "), "{text}");
    assert!(lines.last().unwrap().contains(" ok: "), "{text}");
    // Scripts: one JSON object per line, the same as the API's.
    let out = keeld.apiclient(&["events", "-o", "json"]);
    assert!(out.status.success());
    let json: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(json, events(&keeld, ""));
    let newest = json.last().unwrap()["cursor"].as_u64().unwrap();
    let out = keeld.apiclient(&["events", "--since", &newest.to_string()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no events\n");
    // A refusal is apiclient's error, with the API's reason.
    let out = keeld.apiclient(&["events", "--since", "1", "--stream", "zz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Status 400"));

    // Following: new events as they happen, and across a keeld restart, a gap saying
    // the stream is new, then the new keeld's events.
    let follower = ApiclientFollower::start(
        &keeld,
        &[
            "events",
            "--follow",
            "-o",
            "json",
            "--since",
            &newest.to_string(),
        ],
    );
    set(&keeld, "motd=followed");
    let seen = follower.until(Duration::from_secs(20), |l| {
        l.contains("\"kind\":\"apply\"")
    });
    let commit: Value = serde_json::from_str(&seen[0]).unwrap();
    assert_eq!(commit["cursor"], newest + 1);
    assert_eq!(commit["kind"], "commit");
    assert_eq!(keeld.stop().code(), Some(0));
    keeld.spawn();
    let seen = follower.until(Duration::from_secs(30), |l| l.contains("configured"));
    let gap: Value = serde_json::from_str(&seen[0]).unwrap();
    assert_eq!(gap["kind"], "gap", "{seen:#?}");
    assert_eq!(gap["reason"], "new-stream");
    let first: Value = serde_json::from_str(&seen[1]).unwrap();
    assert_eq!(first["cursor"], 1);
    assert_ne!(first["stream"], commit["stream"]);

    // Output that cannot be written (a full disk) ends a follow with an error; reading
    // the stream again would not help, so it is not retried for ever.
    let mut full = Command::new(bin("apiclient"))
        .arg("--socket-path")
        .arg(&keeld.socket)
        .args(["events", "--follow"])
        .stdin(Stdio::null())
        .stdout(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = full.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = full.kill();
            panic!("apiclient events --follow > /dev/full still runs after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut full.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write the events"), "{stderr}");
    assert!(!stderr.contains("reconnecting"), "{stderr}");
}

fn require_root() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "this test runs containers and needs root"
    );
}

/// With a real containerd: a host container that exits is seen going from starting to
/// running to exited (with its exit code) and back, and when disabled, stopped and no
/// longer tracked; a bootstrap container's run is there too, beside the boot's phases.
#[test]
fn container_states_and_boot_phases_are_events() {
    require_root();
    let containerd = Containerd::start();
    let work = tempfile::tempdir().unwrap();
    let image = |name: &str, script: &str| {
        let path = work.path().join(format!("{name}.tar"));
        ImageBuilder::busybox()
            .cmd(&["/bin/sh", "-c", script])
            .write_oci_archive(&path, "v1");
        format!("oci-archive:{}", path.display())
    };
    let setup = image("setup", "echo setting up");
    let flaky = image("flaky", "sleep 1; exit 3");
    let user_data =
        format!("[settings.bootstrap-containers.setup]\nsource = \"{setup}\"\nmode = \"once\"\n");
    std::fs::write(work.path().join("user-data.toml"), user_data).unwrap();
    let keeld = Keeld::start_with(KeeldOptions {
        containerd: Some((
            containerd.socket().to_path_buf(),
            containerd.namespace().to_owned(),
        )),
        extra_args: vec![
            "--user-data-file".into(),
            work.path().join("user-data.toml").display().to_string(),
            "--restart-backoff".into(),
            "200ms".into(),
            "--stop-grace".into(),
            "2s".into(),
        ],
        ..Default::default()
    });
    let boot = events(&keeld, "");
    let phases: Vec<&str> = boot
        .iter()
        .filter(|e| e["kind"] == "boot-phase")
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    assert!(phases.contains(&"bootstrap-containers"), "{phases:?}");
    assert_eq!(phases.last(), Some(&"configured"));
    let setup_states: Vec<&str> = boot
        .iter()
        .filter(|e| e["kind"] == "container" && e["name"] == "setup")
        .map(|e| e["to"].as_str().unwrap_or("gone"))
        .collect();
    assert_eq!(setup_states.last(), Some(&"succeeded"), "{boot:#?}");
    assert!(boot
        .iter()
        .filter(|e| e["name"] == "setup")
        .all(|e| e["container-kind"] == "bootstrap"));
    // The bootstrap container ran before the boot was configured.
    let succeeded = boot
        .iter()
        .position(|e| e["name"] == "setup" && e["to"] == "succeeded")
        .unwrap();
    let configured = boot.iter().position(|e| e["to"] == "configured").unwrap();
    assert!(succeeded < configured);

    let since = latest(&keeld);
    let mut follower = Follower::open(
        &keeld.socket,
        &format!("since={since}&follow=true&kinds=container"),
    );
    let patch = json!({"host-containers": {"flaky": {"enabled": true, "source": flaky}}});
    commit(&keeld, "c", &patch);
    let seen = follower.until(Duration::from_secs(60), |e| {
        e["to"] == "starting" && e["from"] == "exited"
    });
    let states: Vec<(Value, Value)> = seen
        .iter()
        .map(|e| (e["from"].clone(), e["to"].clone()))
        .collect();
    assert!(
        states.starts_with(&[
            (Value::Null, json!("starting")),
            (json!("starting"), json!("running")),
            (json!("running"), json!("exited")),
        ]),
        "{seen:#?}"
    );
    let exited = seen.iter().find(|e| e["to"] == "exited").unwrap();
    assert_eq!(exited["last-exit-code"], 3);
    assert_eq!(exited["container-kind"], "host");
    assert_eq!(exited["name"], "flaky");
    let patch = json!({"host-containers": {"flaky": {"enabled": false}}});
    commit(&keeld, "c", &patch);
    let seen = follower.until(Duration::from_secs(60), |e| e["to"].is_null());
    assert_eq!(seen.last().unwrap()["name"], "flaky", "{seen:#?}");
}
