//! docs/orchestrator.md holds: its example DaemonSet is valid YAML that mounts the API
//! socket and apiclient as the contract says, and its `apiclient` lines and HTTP
//! sequence do what it says against a real keeld.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use keel_e2e::{bin_dir, repo_root, Keeld};
use serde_json::{json, Value};

fn doc() -> String {
    std::fs::read_to_string(repo_root().join("docs/orchestrator.md")).unwrap()
}

#[test]
fn the_example_daemonset_mounts_the_socket_and_apiclient() {
    let text = std::fs::read_to_string(repo_root().join("docs/examples/node-agent-daemonset.yaml"))
        .unwrap();
    let documents: Vec<Value> = text
        .split("\n---\n")
        .map(|document| serde_norway::from_str(document).unwrap())
        .collect();
    let kinds: Vec<&str> = documents
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Namespace", "ServiceAccount", "DaemonSet"]);
    let daemonset = &documents[2];
    assert_eq!(daemonset["apiVersion"], "apps/v1");
    let spec = &daemonset["spec"];
    assert_eq!(
        spec["selector"]["matchLabels"],
        spec["template"]["metadata"]["labels"]
    );
    let pod = &spec["template"]["spec"];
    let volumes = pod["volumes"].as_array().unwrap();
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    assert_eq!(
        volume("api-socket")["hostPath"],
        json!({"path": "/run/api.sock", "type": "Socket"})
    );
    assert_eq!(
        volume("apiclient")["hostPath"],
        json!({"path": "/usr/bin/apiclient", "type": "File"})
    );
    let container = &pod["containers"][0];
    let mounts = container["volumeMounts"].as_array().unwrap();
    assert!(mounts
        .iter()
        .any(|m| m["name"] == "api-socket" && m["mountPath"] == "/run/api.sock"));
    assert!(mounts.iter().any(|m| m["name"] == "apiclient"));
    // Allowed by keeld: root on the host (no user namespace).
    assert_eq!(container["securityContext"]["runAsUser"], 0);
    assert_eq!(pod["hostUsers"], true);
    // The agent's script uses commands that exist: each parses (`--help` of each).
    let script = container["args"][0].as_str().unwrap();
    for words in script
        .lines()
        .filter_map(|l| l.trim().split_once("apiclient ").map(|(_, rest)| rest))
    {
        let subcommand = words.split_whitespace().next().unwrap();
        let help = Command::new(keel_e2e::bin("apiclient"))
            .args([subcommand, "--help"])
            .output()
            .unwrap();
        assert!(
            help.status.success(),
            "apiclient {subcommand} does not exist"
        );
    }
    assert!(doc().contains("examples/node-agent-daemonset.yaml"));
}

/// The first `sh` block of the contract, run line by line as written.
#[test]
fn the_contract_s_apiclient_lines_run_as_written() {
    let doc = doc();
    let block = doc
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap();
    let keeld = Keeld::start();
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut outputs = Vec::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let out = Command::new("sh")
            .args(["-c", line])
            .env("PATH", &path)
            .env("APICLIENT_SOCKET", &keeld.socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`{line}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let settings = keeld.raw("GET", "/settings", None).json();
    let kubernetes = &settings["kubernetes"];
    assert_eq!(kubernetes["node-labels"]["example.com/pool"], "blue");
    assert_eq!(kubernetes["node-taints"].get("dedicated"), None, "unset");
    assert_eq!(
        kubernetes.get("max-pods"),
        None,
        "a dry run changes nothing"
    );
    assert!(outputs.iter().any(|o| o.contains("kubernetes.max-pods")));
    let last: Value = serde_json::from_str(outputs.last().unwrap()).unwrap();
    assert_eq!(
        last,
        json!({"settings": {"kubernetes": {"node-labels": {"example.com/pool": "blue"}}}})
    );
}

/// The HTTP sequence of "Changing labels, taints and kubelet settings".
#[test]
fn the_contract_s_http_sequence() {
    let keeld = Keeld::start();
    let tx = "node-agent";
    let patch = |body: &str| {
        let r = keeld.raw(
            "PATCH",
            &format!("/settings?tx={tx}"),
            Some(body.as_bytes()),
        );
        assert_eq!(r.status, 204, "{}", r.text());
    };
    patch(r#"{"kubernetes": {"node-labels": {"example.com/pool": "blue"}}}"#);
    patch(r#"{"kubernetes": {"node-taints": {"example.com/draining": "true:NoSchedule"}}}"#);
    let dry = keeld.raw("POST", &format!("/tx/dry-run?tx={tx}"), None);
    assert_eq!(dry.status, 200, "{}", dry.text());
    let dry = dry.json();
    let files: Vec<&str> = dry["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert!(files.contains(&"/etc/kubernetes/kubelet/env"), "{files:?}");
    let commit = keeld.raw("POST", &format!("/tx/commit_and_apply?tx={tx}"), None);
    assert_eq!(commit.status, 200, "{}", commit.text());
    assert_eq!(commit.header("x-keel-apply-status"), Some("ok"));
    assert!(commit.header("x-keel-apply-id").is_some());
    assert_eq!(
        commit.json(),
        json!([
            "settings.kubernetes.node-labels.\"example.com/pool\"",
            "settings.kubernetes.node-taints.\"example.com/draining\""
        ])
    );
    let env =
        std::fs::read_to_string(keeld.render_root().join("etc/kubernetes/kubelet/env")).unwrap();
    assert!(env.contains("example.com/pool=blue"), "{env}");
    assert!(
        env.contains("example.com/draining=true:NoSchedule"),
        "{env}"
    );
    // A null removes the taint.
    patch(r#"{"kubernetes": {"node-taints": {"example.com/draining": null}}}"#);
    let commit = keeld.raw("POST", &format!("/tx/commit_and_apply?tx={tx}"), None);
    assert_eq!(commit.status, 200, "{}", commit.text());
    let read = keeld.raw(
        "GET",
        "/settings?keys=settings.kubernetes.node-labels,settings.kubernetes.node-taints",
        None,
    );
    assert_eq!(
        read.json(),
        json!({"kubernetes": {"node-labels": {"example.com/pool": "blue"}, "node-taints": {}}})
    );
    // Nothing left to commit: 422, and the agent discards.
    let empty = keeld.raw("POST", &format!("/tx/commit_and_apply?tx={tx}"), None);
    assert_eq!(empty.status, 422, "{}", empty.text());

    // "Watching the node": the commits and applies are in the event stream, with the
    // changed keys, and resuming after the last cursor seen gives nothing twice.
    let events = |query: &str| -> Vec<Value> {
        let r = keeld.raw("GET", &format!("/events?{query}"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    let seen = events("kinds=commit,apply");
    let commits: Vec<&Value> = seen
        .iter()
        .filter(|e| e["kind"] == "commit" && e["tx"] == tx)
        .collect();
    assert_eq!(commits.len(), 2, "{seen:#?}");
    assert!(commits[0]["changed-keys"]
        .as_array()
        .unwrap()
        .contains(&json!(
            "settings.kubernetes.node-labels.\"example.com/pool\""
        )));
    let applied = seen
        .iter()
        .find(|e| e["kind"] == "apply" && e["generation"] == commits[0]["generation"])
        .expect("the apply of the first commit");
    assert_eq!(applied["success"], true);
    let last = seen.last().unwrap();
    let (cursor, stream) = (last["cursor"].clone(), last["stream"].as_str().unwrap());
    assert!(events(&format!(
        "since={cursor}&stream={stream}&kinds=commit,apply"
    ))
    .is_empty());
    // A cursor from another keeld start: an explicit gap, never a silent hole.
    let other = "0".repeat(32);
    let after_restart = events(&format!("since=1&stream={other}"));
    assert_eq!(after_restart[0]["kind"], "gap");
    assert_eq!(after_restart[0]["reason"], "new-stream");
}
