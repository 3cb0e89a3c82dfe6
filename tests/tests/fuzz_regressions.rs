//! The fuzz corpus under `cargo test`.
//!
//! Every committed seed in `fuzz/corpus/<target>/` runs through the same check the fuzz
//! target runs (`fuzz/src/lib.rs`, included below, so the two cannot drift apart): a
//! panic here is a parser bug or a broken property, exactly as the fuzzer would report.
//! Inputs of crashes the fuzzer found go into the corpus of their target, and, when the
//! bug is worth naming, into a test of their own at the end of this file.
//! Fuzzing itself: `packaging/dev/fuzz.sh [SECONDS_PER_TARGET]`.

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Runs every file of `target`'s corpus through its check; names the file that fails.
fn replay(target: &str) {
    let (_, check) = checks::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz target named {target}"));
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "the corpus of {target} is empty: {}",
        dir.display()
    );
    for file in &files {
        let data =
            std::fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "fuzz target {target} fails on {} (see the panic above)",
            file.display()
        );
    }
}

#[test]
fn every_target_has_a_corpus() {
    for (target, _) in checks::TARGETS {
        assert!(
            corpus_dir(target).is_dir(),
            "fuzz/corpus/{target} is missing"
        );
    }
}

/// Every target's corpus, so a new target is replayed without anyone remembering to
/// add it here.
#[test]
fn every_corpus_replays() {
    for (target, _) in checks::TARGETS {
        replay(target);
    }
}
