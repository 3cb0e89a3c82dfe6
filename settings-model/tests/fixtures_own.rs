//! Keel's own user-data fixtures: every file in `fixtures/accept` must parse and
//! round-trip; every file in `fixtures/reject` must fail with the message on its first
//! line (`# expect: <substring>`).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use settings_model::userdata::parse_user_data;

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

fn name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn accepted_fixtures_parse_and_round_trip() {
    for path in fixtures("accept") {
        let file = name(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        let patch = parse_user_data(&file, &text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_ne!(patch, serde_json::json!({}), "{file}: no settings");
        let canonical = settings_model::validate(&patch).unwrap();
        assert_eq!(canonical, patch, "{file}");
    }
}

#[test]
fn rejected_fixtures_fail_with_the_expected_message() {
    for path in fixtures("reject") {
        let file = name(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        let (first, rest) = text.split_once('\n').unwrap();
        let expect = first
            .strip_prefix("# expect: ")
            .unwrap_or_else(|| panic!("{file}: first line must be `# expect: ...`"));
        // A JSON document cannot carry the comment line.
        let document = if rest.trim_start().starts_with('{') {
            rest
        } else {
            &text
        };
        let err = match parse_user_data(&file, document) {
            Ok(v) => panic!("{file}: should be rejected, got {v}"),
            Err(e) => e,
        };
        assert!(
            err.to_string().contains(expect),
            "{file}: error {:?} does not contain {expect:?}",
            err.to_string()
        );
    }
}

#[test]
fn every_group_has_fixtures_both_ways() {
    let groups = [
        "motd",
        "host-containers",
        "bootstrap-containers",
        "bootstrap-commands",
        "kubernetes",
        "ntp",
        "network",
        "dns",
        "container-registry",
        "container-runtime",
        "kernel",
        "boot",
        "pki",
        "aws",
    ];
    for kind in ["accept", "reject"] {
        let names: Vec<String> = fixtures(kind).iter().map(|p| name(p)).collect();
        for group in groups {
            assert!(
                names.iter().any(|n| n.starts_with(group)),
                "no {kind} fixture for {group}"
            );
        }
    }
}
