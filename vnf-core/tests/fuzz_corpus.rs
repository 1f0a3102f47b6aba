//! Every committed fuzz corpus file (`fuzz/corpus/<target>/*`) replayed through the entry
//! point its fuzz target calls, so an input that once crashed a target fails CI if the bug
//! comes back. A new target plugs in with one line in `entry_point`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// The function a fuzz target (`fuzz/fuzz_targets/<target>.rs`) feeds its bytes to.
fn entry_point(target: &str) -> Option<fn(&[u8])> {
    match target {
        "dhcp_decode" => Some(vnf_core::fuzzing::dhcp_decode),
        _ => None,
    }
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The names of the entries of `dir`, sorted; panics naming the directory when unreadable.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    paths.sort();
    paths
}

#[test]
fn every_corpus_file_replays_through_its_target_without_a_panic() {
    let mut replayed = 0;
    let mut panicked = Vec::new();
    for corpus in entries(&fuzz_dir().join("corpus")) {
        let target = corpus
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let Some(run) = entry_point(&target) else {
            panic!(
                "{} has no known fuzz target: add `{target:?} => Some(…)` to entry_point in {}",
                corpus.display(),
                file!()
            );
        };
        let inputs = entries(&corpus);
        assert!(!inputs.is_empty(), "{} holds no input", corpus.display());
        for input in inputs {
            let bytes = std::fs::read(&input)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", input.display()));
            if catch_unwind(AssertUnwindSafe(|| run(&bytes))).is_err() {
                panicked.push(input.display().to_string());
            }
            replayed += 1;
        }
    }
    assert!(
        replayed > 0,
        "no corpus file found under {}",
        fuzz_dir().display()
    );
    assert!(panicked.is_empty(), "these inputs panic: {panicked:#?}");
}

#[test]
fn every_fuzz_target_has_an_entry_point_and_a_corpus() {
    for source in entries(&fuzz_dir().join("fuzz_targets")) {
        let target = source
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(
            entry_point(target).is_some(),
            "{} has no entry in entry_point ({})",
            source.display(),
            file!()
        );
        assert!(
            fuzz_dir().join("corpus").join(target).is_dir(),
            "fuzz target {target} has no committed corpus (fuzz/corpus/{target})"
        );
    }
}
