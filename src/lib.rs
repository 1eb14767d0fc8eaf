//! stepgate: a WebAuthn step-up gate for sensitive account changes, run as a reverse proxy in
//! front of an exchange's API. Requests that loosen a protected permission are held until the
//! user confirms that exact change with a passkey and a cooling-off delay has passed; every
//! other request streams through untouched.
//!
//! The public surface: [`config::Config`] to describe a gate, [`server::Server`] to run one,
//! [`clock`] to inject time, [`approval`] for exchanges to verify the gate's signed approvals,
//! and [`demo`] for the built-in walkthrough.

pub mod app;
pub mod approval;
pub mod audit;
pub mod auto_release;
pub mod clock;
pub mod config;
pub mod demo;
pub mod error;
pub mod express;
pub mod identity;
pub mod metrics;
pub mod notify;
pub mod passkeys;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod stepup;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod web;
