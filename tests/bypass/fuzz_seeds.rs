//! The fuzz targets' assertions on stable Rust: every seed in `fuzz/seeds/` (the corpus the
//! `cargo fuzz` runs start from) and every path and body in the attack tables goes through the
//! same checks libFuzzer runs, so a regression shows up in CI without nightly or libFuzzer.

use std::path::PathBuf;

use crate::fuzz_checks::{check_canonical_path, check_strict_body};
use crate::helpers::Attack;

/// Every file in `fuzz/seeds/{target}`, by name.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a directory entry").path();
            let bytes =
                std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            (path.display().to_string(), bytes)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Runs `check` on `input`, naming the input if it panics.
fn run(check: fn(&[u8]), name: &str, input: &[u8]) {
    if std::panic::catch_unwind(|| check(input)).is_err() {
        panic!(
            "the fuzz check failed on {name}: {:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn canonical_path_checks_hold_on_the_seeds_and_the_path_table() {
    for (name, bytes) in seeds("canonical_path") {
        run(check_canonical_path, &name, &bytes);
    }
    for row in crate::paths::ROWS {
        if let Attack::Http { target, .. } = row.attack {
            let path = target.split('?').next().unwrap_or(target);
            run(check_canonical_path, row.name, path.as_bytes());
        }
    }
}

#[test]
fn strict_body_checks_hold_on_the_seeds_and_the_body_table() {
    for (name, bytes) in seeds("strict_body") {
        run(check_strict_body, &name, &bytes);
    }
    for row in crate::bodies::ROWS {
        if let Attack::Http { body, .. } = row.attack {
            run(check_strict_body, row.name, body);
        }
    }
}
