//! The fuzz corpus (fuzz/corpus/<target>/) run through the same entry points as the
//! fuzz targets, on stable: every input a fuzzer ever found interesting, crashes
//! included once fixed, stays a regression test (README, "Security").

use std::path::{Path, PathBuf};

use micro8gents::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

#[test]
fn every_corpus_input_runs_without_a_panic() {
    for (target, run) in TARGETS {
        let inputs = inputs(target);
        assert!(!inputs.is_empty(), "fuzz/corpus/{target} has no seed");
        for (path, data) in inputs {
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target} panicked on {}", path.display());
        }
    }
}

#[test]
fn every_fuzz_target_is_listed_and_every_listed_target_has_a_binary() {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut binaries: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    binaries.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
    listed.sort();
    assert_eq!(binaries, listed);
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for name in &listed {
        assert!(manifest.contains(&format!("name = \"{name}\"")), "fuzz/Cargo.toml has no [[bin]] {name}");
    }
}

/// Seeds that do not reach the interesting code are worth little: the envelopes must decode.
#[test]
fn the_envelope_seeds_are_real_envelopes() {
    for name in ["call_status", "booking"] {
        let data = std::fs::read(fuzz_dir().join("corpus/envelope").join(name)).unwrap();
        let env = micro8gents::events::Envelope::from_json(&data);
        assert!(env.is_ok(), "{name}: {env:?}");
    }
}
