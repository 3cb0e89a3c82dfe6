//! The binary users run is built with the release profile: the guarantees that rest on
//! unwinding (the store writer survives a panicking batch, a panicking apply task is
//! reported as a failed apply; both tested in the unit tests) hold only if that profile
//! unwinds. And the declared minimum Rust version is one every dependency accepts.

#![allow(clippy::unwrap_used)]

fn workspace_manifest() -> toml::Table {
    let text = std::fs::read_to_string(keel_e2e::repo_root().join("Cargo.toml")).unwrap();
    toml::from_str(&text).unwrap()
}

#[test]
fn release_builds_unwind_on_panic() {
    let manifest = workspace_manifest();
    let panic = manifest
        .get("profile")
        .and_then(|p| p.get("release"))
        .and_then(|r| r.get("panic"))
        .and_then(toml::Value::as_str)
        .unwrap_or("unwind");
    assert_eq!(
        panic, "unwind",
        "profile.release.panic = {panic:?}: the writer's catch_unwind would be dead code in the binary users run"
    );
}

/// `rust-version` is at least the `rust-version` of every dependency in the lock file
/// (`cargo metadata`), so a toolchain that satisfies ours builds the whole tree.
/// (Clippy's `incompatible_msrv` lint checks our own code against it.)
#[test]
fn rust_version_covers_every_dependency() {
    let manifest = workspace_manifest();
    let ours = manifest["workspace"]["package"]["rust-version"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--filter-platform",
            "x86_64-unknown-linux-gnu",
        ])
        .current_dir(keel_e2e::repo_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let parse = |v: &str| -> Vec<u64> { v.split('.').map(|n| n.parse().unwrap_or(0)).collect() };
    let ours_parsed = parse(&ours);
    let mut needs_more = Vec::new();
    for package in metadata["packages"].as_array().unwrap() {
        if let Some(theirs) = package["rust_version"].as_str() {
            if parse(theirs) > ours_parsed {
                needs_more.push(format!(
                    "{} {} needs {theirs}",
                    package["name"], package["version"]
                ));
            }
        }
    }
    assert!(
        needs_more.is_empty(),
        "rust-version = {ours}, but: {needs_more:?}"
    );
}
