//! Fuzzes the strict body readers (`policy::json::parse_strict`, `policy::form::
//! parse_form_strict`, `policy::json::fold_case`): no panics, and what they accept survives a
//! round trip unchanged. The assertions live in `fuzz/checks.rs`, shared with the `bypass`
//! test binary.

#![no_main]

use libfuzzer_sys::fuzz_target;

// Each target uses half of the shared checks.
#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_strict_body(data));
