//! The gate's HTTP contract, proven through HTTP: one integration binary, a fresh gate, database
//! and stand-in exchange per test, a manual clock, and software passkeys as the users'
//! authenticators.

mod concurrency;
mod helpers;
mod hold;
mod identity;
mod passthrough;
mod refusals;
mod story;
mod upstream_failures;
