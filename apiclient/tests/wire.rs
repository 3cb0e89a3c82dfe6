//! What `apiclient` puts on the wire, checked against a fake keeld: a tiny HTTP/1.1
//! server on a temporary Unix socket that records every request and answers from a
//! script. Drives the CLI in-process (same code path as the binary) and, for exit codes
//! and stderr, the binary itself.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use apiclient::cli::{self, Cli, Output};
use clap::Parser;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

/// One request as the fake server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Seen {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap()
    }
    fn query(&self) -> Vec<(String, String)> {
        let query = self.target.split_once('?').map(|(_, q)| q).unwrap_or("");
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }
}

/// Answers: (status, body) for a request.
type Script = fn(&Seen) -> (u16, String);

/// Answers: (status, extra response headers, body) for a request.
type HeaderScript = fn(&Seen) -> (u16, Vec<(&'static str, String)>, String);

struct FakeKeeld {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeKeeld {
    fn start(script: Script) -> Self {
        Self::start_boxed(Arc::new(move |request: &Seen| {
            let (status, body) = script(request);
            (status, Vec::new(), body)
        }))
    }

    fn start_with_headers(script: HeaderScript) -> Self {
        Self::start_boxed(Arc::new(script))
    }

    #[allow(clippy::type_complexity)]
    fn start_boxed(
        script: Arc<dyn Fn(&Seen) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let request = read_request(&mut stream).await;
                log.lock().unwrap().push(request.clone());
                let (status, headers, body) = script(&request);
                let reason = match status {
                    200 => "OK",
                    204 => "No Content",
                    _ => "Error",
                };
                let mut answer = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
                for (name, value) in headers {
                    answer.push_str(&format!("{name}: {value}\r\n"));
                }
                if status != 204 {
                    answer.push_str(&format!(
                        "Content-Type: application/json\r\nContent-Length: {}\r\n",
                        body.len()
                    ));
                }
                answer.push_str("\r\n");
                if status != 204 {
                    answer.push_str(&body);
                }
                stream.write_all(answer.as_bytes()).await.unwrap();
                stream.shutdown().await.unwrap();
            }
        });
        Self {
            _dir: dir,
            socket,
            seen,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn socket(&self) -> &Path {
        &self.socket
    }
}

async fn read_request(stream: &mut tokio::net::UnixStream) -> Seen {
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside the request head");
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buffer[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap().split(' ');
    let method = request_line.next().unwrap().to_owned();
    let target = request_line.next().unwrap().to_owned();
    assert_eq!(request_line.next(), Some("HTTP/1.1"));
    let headers: BTreeMap<String, String> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let length: usize = headers
        .get("content-length")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside the request body");
        body.extend_from_slice(&chunk[..n]);
    }
    Seen {
        method,
        target,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

/// A keeld that accepts every change.
fn accepting(request: &Seen) -> (u16, String) {
    match (request.method.as_str(), request.path()) {
        ("PATCH", _) => (204, String::new()),
        ("POST", "/tx/commit_and_apply") => (200, r#"["settings.motd"]"#.to_owned()),
        ("DELETE", "/tx") => (200, "[]".to_owned()),
        ("GET", "/") => {
            let prefix = request.query()[0].1.clone();
            let answer = match prefix.as_str() {
                "settings.motd" => json!({"settings": {"motd": "hi"}}),
                "os" => json!({"os": {"arch": "x86_64"}}),
                "settings.ntp" => json!({"settings": {"ntp": {"time-servers": ["a"]}}}),
                _ => json!({}),
            };
            (200, answer.to_string())
        }
        _ => (404, r#"{"error":"no such resource"}"#.to_owned()),
    }
}

/// A keeld that refuses every PATCH.
fn refusing_patches(request: &Seen) -> (u16, String) {
    match request.method.as_str() {
        "PATCH" => (
            400,
            r#"{"error":"settings.motd: must be a string","key":"settings.motd"}"#.to_owned(),
        ),
        _ => accepting(request),
    }
}

async fn run_cli(server: &FakeKeeld, args: &[&str]) -> Result<Output, cli::CliError> {
    let mut argv = vec!["apiclient", "-s", server.socket().to_str().unwrap()];
    argv.extend_from_slice(args);
    cli::run(Cli::try_parse_from(argv).unwrap()).await
}

fn assert_json_request(request: &Seen) {
    assert_eq!(request.headers["content-type"], "application/json");
    assert_eq!(request.headers["host"], "localhost");
}

/// Returns the random transaction name after checking its shape.
fn tx_of(request: &Seen, kind: &str) -> String {
    let query = request.query();
    assert_eq!(query.len(), 1, "{query:?}");
    assert_eq!(query[0].0, "tx");
    let name = query[0].1.clone();
    let suffix = name
        .strip_prefix(&format!("apiclient-{kind}-"))
        .unwrap_or_else(|| panic!("{name}"));
    assert_eq!(suffix.len(), 16, "{name}");
    assert!(suffix.chars().all(|c| c.is_ascii_alphanumeric()), "{name}");
    name
}

#[tokio::test]
async fn set_sends_keypairs_then_commits_the_same_transaction() {
    let server = FakeKeeld::start(accepting);
    let output = run_cli(&server, &["set", "motd=hi"]).await.unwrap();
    assert_eq!(output, Output::Nothing);

    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    let (patch, commit) = (&seen[0], &seen[1]);

    assert_eq!(patch.method, "PATCH");
    assert_eq!(patch.path(), "/settings/keypair");
    let tx = tx_of(patch, "set");
    assert_json_request(patch);
    assert_eq!(patch.body, r#"{"request_payload":["motd=hi"]}"#);

    assert_eq!(commit.method, "POST");
    assert_eq!(commit.path(), "/tx/commit_and_apply");
    assert_eq!(tx_of(commit, "set"), tx);
    assert_json_request(commit);
}

#[tokio::test]
async fn set_keeps_pairs_as_typed_and_in_order() {
    let server = FakeKeeld::start(accepting);
    run_cli(
        &server,
        &[
            "set",
            "motd=42",
            "kernel.sysctl.\"vm.max_map_count\"=262144",
        ],
    )
    .await
    .unwrap();
    let patch: Value = serde_json::from_str(&server.seen()[0].body).unwrap();
    assert_eq!(
        patch,
        json!({"request_payload": ["motd=42", "kernel.sysctl.\"vm.max_map_count\"=262144"]})
    );
}

#[tokio::test]
async fn set_json_patches_settings_without_wrapper() {
    let server = FakeKeeld::start(accepting);
    run_cli(&server, &["set", "-j", r#"{"settings":{"motd":"hi"}}"#])
        .await
        .unwrap();
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "PATCH");
    assert_eq!(seen[0].path(), "/settings");
    let tx = tx_of(&seen[0], "set");
    assert_eq!(seen[0].body, r#"{"motd":"hi"}"#);
    assert_eq!(seen[1].path(), "/tx/commit_and_apply");
    assert_eq!(tx_of(&seen[1], "set"), tx);
}

#[tokio::test]
async fn a_refused_patch_discards_the_transaction_and_reports_the_status() {
    let server = FakeKeeld::start(refusing_patches);
    let error = run_cli(&server, &["set", "motd=hi"]).await.unwrap_err();

    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    let tx = tx_of(&seen[0], "set");
    assert_eq!(seen[1].method, "DELETE");
    assert_eq!(seen[1].path(), "/tx");
    assert_eq!(tx_of(&seen[1], "set"), tx);
    assert_eq!(
        error.to_string(),
        format!(
            "Status 400 when PATCHing /settings/keypair?tx={tx}: \
             {{\"error\":\"settings.motd: must be a string\",\"key\":\"settings.motd\"}}"
        )
    );
}

#[tokio::test]
async fn apply_patches_each_source_into_one_transaction() {
    let server = FakeKeeld::start(accepting);
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.json");
    let second = dir.path().join("second.json");
    std::fs::write(&first, r#"{"settings": {"motd": "one"}}"#).unwrap();
    std::fs::write(&second, r#"{"settings": {"motd": "two"}}"#).unwrap();
    let first_uri = format!("file://{}", first.display());
    run_cli(&server, &["apply", &first_uri, second.to_str().unwrap()])
        .await
        .unwrap();

    let seen = server.seen();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    let tx = tx_of(&seen[0], "apply");
    for (request, body) in seen[..2]
        .iter()
        .zip([r#"{"motd":"one"}"#, r#"{"motd":"two"}"#])
    {
        assert_eq!(request.method, "PATCH");
        assert_eq!(request.path(), "/settings");
        assert_eq!(tx_of(request, "apply"), tx);
        assert_eq!(request.body, body);
        assert_json_request(request);
    }
    assert_eq!(seen[2].method, "POST");
    assert_eq!(seen[2].path(), "/tx/commit_and_apply");
    assert_eq!(tx_of(&seen[2], "apply"), tx);
}

#[tokio::test]
async fn apply_checks_every_source_before_sending_anything() {
    let server = FakeKeeld::start(accepting);
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(&good, r#"{"settings": {"motd": "one"}}"#).unwrap();
    let missing = dir.path().join("missing.toml");
    let error = run_cli(
        &server,
        &["apply", good.to_str().unwrap(), missing.to_str().unwrap()],
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("missing.toml"), "{error}");
    assert!(server.seen().is_empty());
}

#[tokio::test]
async fn unset_patches_nulls() {
    let server = FakeKeeld::start(accepting);
    run_cli(&server, &["unset", "motd", "settings.ntp.time-servers"])
        .await
        .unwrap();
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path(), "/settings");
    tx_of(&seen[0], "unset");
    let patch: Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(patch, json!({"motd": null, "ntp": {"time-servers": null}}));
}

#[tokio::test]
async fn get_merges_one_request_per_prefix() {
    let server = FakeKeeld::start(accepting);
    let output = run_cli(&server, &["get", "settings.motd", "os", "settings.ntp"])
        .await
        .unwrap();
    let targets: Vec<String> = server.seen().iter().map(|s| s.target.clone()).collect();
    assert_eq!(
        targets,
        [
            "/?prefix=settings.motd",
            "/?prefix=os",
            "/?prefix=settings.ntp"
        ]
    );
    assert_eq!(
        output.render(),
        "{\n  \"settings\": {\n    \"motd\": \"hi\",\n    \"ntp\": {\n      \"time-servers\": [\n        \"a\"\n      ]\n    }\n  },\n  \"os\": {\n    \"arch\": \"x86_64\"\n  }\n}\n"
    );
}

#[tokio::test]
async fn rollback_posts_the_generation() {
    let server = FakeKeeld::start(|_| (200, r#"["settings.motd"]"#.to_owned()));
    let output = run_cli(&server, &["rollback", "7"]).await.unwrap();
    assert_eq!(output, Output::Json(json!(["settings.motd"])));
    let seen = server.seen();
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].target, "/history/rollback?generation=7");
}

/// Runs the real binary; (exit code, stdout, stderr).
async fn run_binary(args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_apiclient"))
        .args(args)
        .env_remove("APICLIENT_SOCKET")
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test]
async fn binary_reports_status_errors_on_stderr_with_exit_1() {
    let server = FakeKeeld::start(accepting);
    let socket = server.socket().to_str().unwrap();
    let (code, stdout, stderr) = run_binary(&["-s", socket, "raw", "-u", "/nope"]).await;
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        "Status 404 when GETing /nope: {\"error\":\"no such resource\"}\n"
    );

    let (code, stdout, _) = run_binary(&[
        "raw",
        "-s",
        socket,
        "-m",
        "post",
        "-u",
        "/tx/commit_and_apply?tx=x",
    ])
    .await;
    assert_eq!(code, 0);
    assert_eq!(stdout, "[\n  \"settings.motd\"\n]\n");
}

#[tokio::test]
async fn binary_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("api.sock");
    let (code, _, stderr) = run_binary(&["-s", missing.to_str().unwrap(), "get"]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with(&format!("cannot connect to {}: ", missing.display())),
        "{stderr}"
    );

    let (code, _, _) = run_binary(&["set"]).await;
    assert_eq!(code, 2, "set without pairs is a usage error");
    let (code, _, _) = run_binary(&["set", "motd"]).await;
    assert_eq!(code, 2, "a pair without = is a usage error");
    let (code, _, _) = run_binary(&["frobnicate"]).await;
    assert_eq!(code, 2);
    // Command-line mistakes found after parsing, before anything is sent: 2 as well.
    for args in [
        &["-s", missing.to_str().unwrap(), "-u", "settings"][..],
        &["-s", missing.to_str().unwrap(), "get", "-u", "os"],
        &["-s", missing.to_str().unwrap(), "unset", "a.\"b"],
        &[
            "-s",
            missing.to_str().unwrap(),
            "apply",
            "s3://bucket/user-data.toml",
        ],
        &[
            "-s",
            missing.to_str().unwrap(),
            "apply",
            "file://elsewhere/user-data.toml",
        ],
    ] {
        let (code, _, stderr) = run_binary(args).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
    }
    let (code, stdout, _) = run_binary(&["--help"]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("Examples:"), "{stdout}");
    let (code, stdout, _) = run_binary(&["schema"]).await;
    assert_eq!(code, 0);
    assert!(serde_json::from_str::<Value>(&stdout).unwrap().is_object());
}

const MOTD_DIFF: &str = "--- a/etc/motd\n+++ b/etc/motd\n@@ -1 +1 @@\n-a\n+b\n";

/// A keeld whose dry run reports one changed setting and one file.
fn dry_running(request: &Seen) -> (u16, String) {
    match (request.method.as_str(), request.path()) {
        ("POST", "/tx/dry-run") => {
            let tx = request.query()[0].1.clone();
            let answer = json!({
                "tx": tx,
                "changed-keys": ["settings.motd"],
                "settings": {"settings.motd": {"old": "a", "new": "b"}},
                "services": {"motd": ["settings.motd"]},
                "files": [{"name": "motd", "path": "/etc/motd", "diff": MOTD_DIFF}]
            });
            (200, answer.to_string())
        }
        ("DELETE", "/tx") => (200, r#"["settings.motd"]"#.to_owned()),
        _ => accepting(request),
    }
}

/// Checks the dry-run sequence: the fills, `POST /tx/dry-run`, `DELETE /tx`, all in the
/// same transaction, and nothing committed.
fn assert_dry_run_sequence(seen: &[Seen], fills: usize, kind: &str) -> String {
    assert_eq!(seen.len(), fills + 2, "{seen:#?}");
    let tx = tx_of(&seen[0], kind);
    for fill in &seen[..fills] {
        assert_eq!(fill.method, "PATCH");
        assert_eq!(tx_of(fill, kind), tx);
    }
    let (dry, delete) = (&seen[fills], &seen[fills + 1]);
    assert_eq!((dry.method.as_str(), dry.path()), ("POST", "/tx/dry-run"));
    assert_eq!(tx_of(dry, kind), tx);
    assert_json_request(dry);
    assert_eq!((delete.method.as_str(), delete.path()), ("DELETE", "/tx"));
    assert_eq!(tx_of(delete, kind), tx);
    tx
}

#[tokio::test]
async fn set_dry_run_patches_dry_runs_and_discards_the_same_transaction() {
    let server = FakeKeeld::start(dry_running);
    let output = run_cli(&server, &["set", "--dry-run", "motd=b"])
        .await
        .unwrap();
    let seen = server.seen();
    assert_dry_run_sequence(&seen, 1, "set");
    assert_eq!(seen[0].path(), "/settings/keypair");
    assert_eq!(seen[0].body, r#"{"request_payload":["motd=b"]}"#);
    assert_eq!(
        output.render(),
        "~ settings.motd: \"a\" → \"b\"\n\
         \n\
         === file motd (/etc/motd)\n\
         --- a/etc/motd\n\
         +++ b/etc/motd\n\
         @@ -1 +1 @@\n\
         -a\n\
         +b\n\
         \n\
         1 setting, 1 file would change; services affected: motd\n"
    );
}

#[tokio::test]
async fn dry_run_json_prints_keelds_answer() {
    let server = FakeKeeld::start(dry_running);
    let output = run_cli(
        &server,
        &[
            "set",
            "--dry-run",
            "--output",
            "json",
            "-j",
            r#"{"motd":"b"}"#,
        ],
    )
    .await
    .unwrap();
    let tx = assert_dry_run_sequence(&server.seen(), 1, "set");
    let Output::Json(answer) = output else {
        panic!("{output:?}")
    };
    assert_eq!(answer["tx"], json!(tx));
    assert_eq!(answer["files"][0]["diff"], json!(MOTD_DIFF));
}

#[tokio::test]
async fn apply_and_unset_dry_run_too() {
    let server = FakeKeeld::start(dry_running);
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.json");
    let second = dir.path().join("second.toml");
    std::fs::write(&first, r#"{"settings": {"motd": "one"}}"#).unwrap();
    std::fs::write(&second, "[settings]\nmotd = \"b\"\n").unwrap();
    let output = run_cli(
        &server,
        &[
            "apply",
            "--dry-run",
            first.to_str().unwrap(),
            second.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    assert_dry_run_sequence(&server.seen(), 2, "apply");
    assert!(output
        .render()
        .starts_with("~ settings.motd: \"a\" → \"b\"\n"));

    let server = FakeKeeld::start(dry_running);
    run_cli(&server, &["unset", "--dry-run", "motd"])
        .await
        .unwrap();
    let seen = server.seen();
    assert_dry_run_sequence(&seen, 1, "unset");
    assert_eq!(seen[0].body, r#"{"motd":null}"#);
}

#[tokio::test]
async fn dry_run_says_when_nothing_would_change() {
    let server = FakeKeeld::start(|request| match request.path() {
        "/tx/dry-run" => (
            200,
            r#"{"tx":"t","changed-keys":[],"settings":{},"services":{},"files":[]}"#.to_owned(),
        ),
        _ => accepting(request),
    });
    let output = run_cli(&server, &["set", "--dry-run", "motd=hi"])
        .await
        .unwrap();
    assert_eq!(output.render(), "Nothing would change.\n");
}

/// An answer the report cannot read is an error, never "Nothing would change.".
#[tokio::test]
async fn a_dry_run_answer_that_is_no_object_is_an_error() {
    for (body, found) in [
        ("[]", "[]"),
        ("", "empty or null"),
        ("null", "empty or null"),
    ] {
        let server = FakeKeeld::start_boxed(Arc::new(move |request: &Seen| match request.path() {
            "/tx/dry-run" => (200, Vec::new(), body.to_owned()),
            _ => {
                let (status, body) = accepting(request);
                (status, Vec::new(), body)
            }
        }));
        let error = run_cli(&server, &["set", "--dry-run", "motd=hi"])
            .await
            .unwrap_err();
        let tx = assert_dry_run_sequence(&server.seen(), 1, "set");
        assert_eq!(
            error.to_string(),
            format!("the answer to POST /tx/dry-run?tx={tx} is not a JSON object: {found}")
        );
    }
}

#[tokio::test]
async fn a_refused_dry_run_still_discards_the_transaction() {
    let server = FakeKeeld::start(|request| match request.path() {
        "/tx/dry-run" => (
            422,
            r#"{"error":"template motd: undefined value"}"#.to_owned(),
        ),
        _ => accepting(request),
    });
    let error = run_cli(&server, &["set", "--dry-run", "motd=hi"])
        .await
        .unwrap_err();
    let tx = assert_dry_run_sequence(&server.seen(), 1, "set");
    assert_eq!(
        error.to_string(),
        format!(
            "Status 422 when POSTing /tx/dry-run?tx={tx}: \
             {{\"error\":\"template motd: undefined value\"}}"
        )
    );

    let server = FakeKeeld::start(refusing_patches);
    run_cli(&server, &["set", "--dry-run", "motd=hi"])
        .await
        .unwrap_err();
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(seen[1].method, "DELETE");
    assert_eq!(tx_of(&seen[1], "set"), tx_of(&seen[0], "set"));
}

#[tokio::test]
async fn output_json_needs_dry_run() {
    let argv = ["apiclient", "set", "--output", "json", "motd=hi"];
    assert!(Cli::try_parse_from(argv).is_err());
}

/// The apply log keeld keeps after apply 3 failed.
fn failed_apply_log() -> Value {
    json!({
        "reboot-required": false,
        "applies": [{
            "id": 3,
            "time": "2024-05-01T10:00:00Z",
            "keys": ["settings.motd"],
            "services": {"motd": ["settings.motd"]},
            "files": [
                {"name": "motd", "path": "/etc/motd", "result": "written"},
                {"name": "issue", "path": "/etc/issue", "result": "failed", "error": "read-only file system"}
            ],
            "commands": [{
                "service": "motd", "argv": ["systemctl", "restart", "motd.service"],
                "exit-code": 1, "success": false, "timed-out": false, "duration-ms": 20,
                "stdout": "", "stderr": "Job for motd.service failed.\nSee 'journalctl -xe'.\n"
            }],
            "success": false,
            "reboot-required": false,
            "duration-ms": 25
        }]
    })
}

/// A keeld whose applies fail (apply 3).
fn failing_apply(request: &Seen) -> (u16, Vec<(&'static str, String)>, String) {
    let failed = vec![
        ("x-keel-apply-status", "failed".to_owned()),
        ("x-keel-apply-id", "3".to_owned()),
    ];
    match (request.method.as_str(), request.path()) {
        ("POST", "/tx/commit_and_apply") | ("POST", "/history/rollback") => {
            (200, failed, r#"["settings.motd"]"#.to_owned())
        }
        ("GET", "/apply/log") => (200, Vec::new(), failed_apply_log().to_string()),
        _ => {
            let (status, body) = accepting(request);
            (status, Vec::new(), body)
        }
    }
}

const FAILED_APPLY_STDERR: &str = "\
settings committed, but applying them failed (apply 3):
  file issue (/etc/issue): read-only file system
  service motd: systemctl restart motd.service: exit code 1: Job for motd.service failed.
";

#[tokio::test]
async fn binary_reports_a_failed_apply_with_exit_1() {
    let server = FakeKeeld::start_with_headers(failing_apply);
    let socket = server.socket().to_str().unwrap();
    let (code, stdout, stderr) = run_binary(&["-s", socket, "set", "motd=hi"]).await;
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    assert_eq!(stderr, FAILED_APPLY_STDERR);

    let seen = server.seen();
    let requests: Vec<(&str, &str)> = seen.iter().map(|s| (s.method.as_str(), s.path())).collect();
    assert_eq!(
        requests,
        [
            ("PATCH", "/settings/keypair"),
            ("POST", "/tx/commit_and_apply"),
            ("GET", "/apply/log")
        ]
    );
    assert_eq!(seen[2].target, "/apply/log?limit=1");

    // The same for apply, unset and rollback.
    let dir = tempfile::tempdir().unwrap();
    let user_data = dir.path().join("user-data.toml");
    std::fs::write(&user_data, "[settings]\nmotd = \"hi\"\n").unwrap();
    for args in [
        vec!["apply", user_data.to_str().unwrap()],
        vec!["unset", "motd"],
        vec!["rollback", "2"],
    ] {
        let mut argv = vec!["-s", socket];
        argv.extend(args.iter().copied());
        let (code, _, stderr) = run_binary(&argv).await;
        assert_eq!(code, 1, "{args:?}");
        assert_eq!(stderr, FAILED_APPLY_STDERR, "{args:?}");
    }
}

#[tokio::test]
async fn a_failed_apply_is_found_in_the_log_even_if_not_the_newest() {
    let server = FakeKeeld::start_with_headers(|request| match request.target.as_str() {
        "/apply/log?limit=1" => (
            200,
            Vec::new(),
            r#"{"reboot-required":false,"applies":[{"id":4,"success":true}]}"#.to_owned(),
        ),
        _ => failing_apply(request),
    });
    let error = run_cli(&server, &["set", "motd=hi"]).await.unwrap_err();
    assert!(matches!(error, cli::CliError::ApplyFailed(_)), "{error:?}");
    assert_eq!(format!("{error}\n"), FAILED_APPLY_STDERR);
    let targets: Vec<String> = server.seen().iter().map(|s| s.target.clone()).collect();
    assert_eq!(targets[2..], ["/apply/log?limit=1", "/apply/log"]);
}

#[tokio::test]
async fn a_successful_apply_needs_no_log() {
    let server = FakeKeeld::start_with_headers(|request| {
        let (status, body) = accepting(request);
        let headers = match request.path() {
            "/tx/commit_and_apply" => vec![
                ("x-keel-apply-status", "ok".to_owned()),
                ("x-keel-apply-id", "9".to_owned()),
            ],
            _ => Vec::new(),
        };
        (status, headers, body)
    });
    let output = run_cli(&server, &["set", "motd=hi"]).await.unwrap();
    assert_eq!(output, Output::Nothing);
    assert_eq!(server.seen().len(), 2);
}

#[tokio::test]
async fn apply_log_gets_the_log() {
    let server = FakeKeeld::start(|_| (200, failed_apply_log().to_string()));
    let output = run_cli(&server, &["apply-log", "--limit", "2"])
        .await
        .unwrap();
    assert_eq!(output, Output::Json(failed_apply_log()));
    run_cli(&server, &["apply-log"]).await.unwrap();
    let seen = server.seen();
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].target, "/apply/log?limit=2");
    assert_eq!(seen[1].target, "/apply/log");
}

#[tokio::test]
async fn help_texts_mention_dry_run() {
    for command in ["set", "apply", "unset"] {
        let (code, stdout, _) = run_binary(&[command, "--help"]).await;
        assert_eq!(code, 0);
        assert!(stdout.contains("--dry-run"), "{stdout}");
        assert!(stdout.contains("--output <FORMAT>"), "{stdout}");
        assert!(
            stdout.contains(&format!("apiclient {command} --dry-run")),
            "{stdout}"
        );
    }
    let (code, stdout, _) = run_binary(&["apply-log", "--help"]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("--limit <N>"), "{stdout}");
}

/// A status answer that is no JSON object fails the update command at once, naming the
/// request, instead of being read as "no news" until the command's timeout.
#[tokio::test]
async fn an_update_status_that_is_no_json_object_fails_at_once() {
    for (body, found) in [("oops", "no JSON"), ("[1]", "[1]"), ("", "empty")] {
        let server = FakeKeeld::start_boxed(Arc::new(move |request: &Seen| {
            match (request.method.as_str(), request.path()) {
                ("GET", "/updates/status") => (200, Vec::new(), body.to_owned()),
                _ => (204, Vec::new(), String::new()),
            }
        }));
        let started = std::time::Instant::now();
        let error = run_cli(&server, &["update", "check"]).await.unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with(&format!(
                "the answer to GET /updates/status is not a JSON object: {found}"
            )),
            "{text}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
