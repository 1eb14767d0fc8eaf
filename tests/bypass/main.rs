//! Attacks on the gate, as tables: one module per class of published auth-proxy bypass (paths,
//! bodies, methods, headers, limits). Every row is one attack request and the outcome the gate
//! must produce, run against a real gate in front of a stand-in exchange that records what
//! reached it. Beside the tables: property tests on the classifier (`classifier_props`) and the
//! fuzz targets' assertions run over their seed corpus (`fuzz_seeds`), so CI exercises them on
//! stable Rust without `cargo fuzz`.

#[path = "../common/testdb.rs"]
mod testdb;

/// The fuzz targets' assertions, shared byte for byte with `fuzz/fuzz_targets/`.
#[path = "../../fuzz/checks.rs"]
mod fuzz_checks;

mod bodies;
mod classifier_props;
mod fuzz_seeds;
mod headers;
mod helpers;
mod limits;
mod methods;
mod paths;
