//! The passkey lifecycle and credential policy, proven through HTTP: several passkeys per user,
//! a second passkey held and cooled off, quarantine, removal, device-bound / AAGUID / attestation
//! policy, clone detection, origin discipline, and the fraud story of a session-holding attacker
//! enrolling a passkey of their own. One gate with a fresh SQLite database and a manual clock per
//! test; authenticators are software ones whose flags each test chooses.

#[path = "../common/flag_authenticator.rs"]
mod flag_authenticator;
#[path = "../common/testdb.rs"]
mod testdb;

mod authenticator;
mod clones;
mod duplicates;
mod fraud;
mod helpers;
mod lifecycle;
mod origin;
mod policy;
mod quarantine;
mod sessions;
