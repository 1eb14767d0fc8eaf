//! Fuzzes `stepgate::policy::canonical_path`: no panics, idempotent, and nothing it accepts
//! holds a spelling the gate promises to refuse (`//`, dot segments, `;`, `\`, `%2F`, `%5C`,
//! `%00`). The assertions live in `fuzz/checks.rs`, shared with the `bypass` test binary.

#![no_main]

use libfuzzer_sys::fuzz_target;

// Each target uses half of the shared checks.
#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_canonical_path(data));
