//! The gate's pages in a real browser: headless Chromium (Debian's package) driven through
//! chromedriver from Rust, with a WebDriver virtual authenticator standing in for the user's
//! passkey. Each test gets a fresh browser, profile, gate and demo exchange.
//!
//! Without Chromium and chromedriver, plain `cargo test` still passes and prints a loud
//! `SKIPPED` line for each browser test; with `CI=true` a missing browser fails the run
//! (scripts/install-browser installs it). The header checks in `headers` need no browser.
//! `STEPGATE_WRITE_SCREENSHOTS=1` writes the screenshots to docs/screenshots/.

mod cancel;
mod flows;
mod harness;
mod headers;
mod refusals;
mod site;
mod story;
