//! Bottlerocket's documented user-data examples, with the verdicts in EXPECTED.tsv.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

use settings_model::userdata::parse_user_data;
use settings_model::Error;

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/fixtures/user-data/bottlerocket-docs"
);

#[test]
fn bottlerocket_docs_fixtures_match_expected_verdicts() {
    let dir = Path::new(DIR);
    if !dir.is_dir() {
        skip("../shared/fixtures not present");
        return;
    }
    let expected = std::fs::read_to_string(dir.join("EXPECTED.tsv")).expect("EXPECTED.tsv");
    let mut seen = BTreeSet::new();
    let mut checked = 0;
    for line in expected.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let mut columns = line.splitn(3, '\t');
        let file = columns.next().unwrap();
        let verdict = columns.next().expect("verdict column");
        let what = columns.next().unwrap_or("");
        seen.insert(file.to_owned());
        if verdict == "n/a" {
            continue;
        }
        let text = std::fs::read_to_string(dir.join(file)).expect(file);
        let result = parse_user_data(file, &text);
        match verdict {
            "accept" => {
                let patch = result.unwrap_or_else(|e| panic!("{file} should be accepted: {e}"));
                let canonical = settings_model::validate(&patch)
                    .unwrap_or_else(|e| panic!("{file} does not validate: {e}"));
                assert_eq!(
                    canonical, patch,
                    "{file}: canonical JSON differs from input"
                );
            }
            "reject" => {
                let err = match result {
                    Ok(v) => panic!("{file} should be rejected, got {v}"),
                    Err(e) => e,
                };
                let text = err.to_string();
                if let Some(key) = what
                    .split(": ")
                    .next()
                    .filter(|k| k.starts_with("settings."))
                {
                    assert!(
                        text.contains(key),
                        "{file}: error {text:?} does not name {key}"
                    );
                    assert_eq!(err.key(), Some(key), "{file}: {text}");
                } else {
                    assert!(
                        matches!(err, Error::Toml { line, .. } if line > 0),
                        "{file}: expected a TOML error with a line: {text}"
                    );
                    assert!(text.contains("line "), "{file}: {text}");
                }
            }
            other => panic!("{file}: unknown verdict {other:?}"),
        }
        checked += 1;
    }
    assert!(checked > 0, "no fixture was checked");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".toml") {
            assert!(seen.contains(&name), "{name} has no row in EXPECTED.tsv");
        }
    }
}

/// Prints every verdict with its message, for eyeballing with `--nocapture`.
#[test]
fn bottlerocket_docs_fixture_messages_are_readable() {
    let dir = Path::new(DIR);
    if !dir.is_dir() {
        skip("../shared/fixtures not present");
        return;
    }
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if let Err(e) = parse_user_data(&name, &text) {
            assert!(!e.to_string().is_empty());
            println!("{e}");
        }
    }
}

/// A proof that cannot run here. The README's test command (and so CI) sets
/// `KEEL_REQUIRE_ALL_TESTS=1`, where a skip would hide a missing proof: it fails there.
fn skip(reason: &str) {
    assert!(
        std::env::var_os("KEEL_REQUIRE_ALL_TESTS").is_none(),
        "cannot run: {reason} (KEEL_REQUIRE_ALL_TESTS is set, so this is a failure, not a skip)"
    );
    println!("SKIPPED: {reason}");
}
