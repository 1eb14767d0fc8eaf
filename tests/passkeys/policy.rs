//! Credential policy, globally under `[passkeys]` and per rule: `device_bound` (no synced
//! passkeys may confirm), AAGUID allow and deny lists, and attestation chained to trusted roots.
//! Global lists and attestation are enforced at registration; a rule's policy when confirming.

use std::path::PathBuf;

use reqwest::StatusCode;
use time::OffsetDateTime;
use webauthn_authenticator_rs::softtoken::{SoftToken, AAGUID as SOFT_TOKEN_AAGUID};

use crate::flag_authenticator::{aaguid, certificate_pem, FlagAuthenticator};
use crate::helpers::{
    enable_withdrawals, expect_error, raise_limits, spawn_gate, try_confirm_forcing, GateOptions,
    Session,
};

const MODEL_A: &str = "ee882879-721c-4913-9775-3dfcce97072a";
const MODEL_B: &str = "ea9b8d66-4d01-1d21-3ce4-b6b48cb575d4";

/// Confirms `change_id` with `authenticator` (forcing its credential, so the refusal must come
/// from the gate's policy and not from the options leaving it out) and expects
/// `403 passkey_not_allowed`; returns the message.
async fn expect_not_allowed(
    session: &Session,
    change_id: &str,
    authenticator: &mut FlagAuthenticator,
) -> String {
    let body = expect_error(
        try_confirm_forcing(session, change_id, authenticator).await,
        StatusCode::FORBIDDEN,
        "passkey_not_allowed",
    )
    .await;
    assert_eq!(
        session.change_state(change_id).await,
        "held",
        "a refused confirmation leaves the change held"
    );
    body["message"].as_str().unwrap_or_default().to_lowercase()
}

// ---------------------------------------------------------------------------------------------
// device_bound

#[tokio::test]
async fn a_device_bound_rule_refuses_a_synced_passkey_and_accepts_a_device_bound_one() {
    let gate = spawn_gate(GateOptions::rule_policy("device_bound = true")).await;

    // The synced passkey still registers: it is good for changes without this policy.
    let alice = gate.session("alice");
    let mut synced = FlagAuthenticator::synced();
    alice.register_first(&mut synced, "Cloud passkey").await;

    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let message = expect_not_allowed(&alice, &withdrawal, &mut synced).await;
    assert!(
        message.contains("synced") || message.contains("device"),
        "the refusal explains that synced passkeys cannot confirm this change: {message}"
    );
    let limits = alice.hold(&raise_limits("acc-1")).await;
    let confirmed = alice.confirm(&limits, &mut synced).await;
    assert_eq!(
        confirmed["state"], "cooling_off",
        "a rule without device_bound accepts it: {confirmed}"
    );

    let bob = gate.session("bob");
    let mut hardware = FlagAuthenticator::new();
    bob.register_first(&mut hardware, "Security key").await;
    let withdrawal = bob.hold(&enable_withdrawals("k2")).await;
    let confirmed = bob.confirm(&withdrawal, &mut hardware).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
}

#[tokio::test]
async fn a_backup_eligible_passkey_is_refused_even_when_it_is_not_backed_up_right_now() {
    // BE is what makes a passkey synced; BS (backed up right now) may be clear on a fresh one.
    let gate = spawn_gate(GateOptions::rule_policy("device_bound = true")).await;
    let alice = gate.session("alice");
    let mut fresh = FlagAuthenticator::synced();
    fresh.backup_state = false;
    alice.register_first(&mut fresh, "Fresh passkey").await;
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    expect_not_allowed(&alice, &withdrawal, &mut fresh).await;
}

#[tokio::test]
async fn a_rule_overrides_the_global_device_bound_policy() {
    let gate = spawn_gate(GateOptions {
        passkeys: "device_bound = true".into(),
        rule_policy: "device_bound = false".into(),
        ..GateOptions::default()
    })
    .await;
    let alice = gate.session("alice");
    let mut synced = FlagAuthenticator::synced();
    // device_bound is only enforced when confirming: registration still works.
    alice.register_first(&mut synced, "Cloud passkey").await;

    let limits = alice.hold(&raise_limits("acc-1")).await;
    expect_not_allowed(&alice, &limits, &mut synced).await;
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let confirmed = alice.confirm(&withdrawal, &mut synced).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
}

// ---------------------------------------------------------------------------------------------
// AAGUID lists

#[tokio::test]
async fn a_rule_allow_list_admits_only_the_listed_models() {
    let gate = spawn_gate(GateOptions::rule_policy(&format!(
        "aaguid_allow = [\"{MODEL_A}\"]"
    )))
    .await;
    let alice = gate.session("alice");
    let mut model_a = FlagAuthenticator::new().with_aaguid(aaguid(MODEL_A));
    alice.register_first(&mut model_a, "Model A").await;
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let confirmed = alice.confirm(&withdrawal, &mut model_a).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");

    let bob = gate.session("bob");
    let mut model_b = FlagAuthenticator::new().with_aaguid(aaguid(MODEL_B));
    bob.register_first(&mut model_b, "Model B").await;
    let withdrawal = bob.hold(&enable_withdrawals("k2")).await;
    expect_not_allowed(&bob, &withdrawal, &mut model_b).await;

    // An authenticator that does not say what it is (the all-zero AAGUID) is not on the list.
    let carol = gate.session("carol");
    let mut anonymous = FlagAuthenticator::new();
    carol.register_first(&mut anonymous, "Unknown model").await;
    let withdrawal = carol.hold(&enable_withdrawals("k3")).await;
    expect_not_allowed(&carol, &withdrawal, &mut anonymous).await;
}

#[tokio::test]
async fn a_rule_deny_list_refuses_the_listed_models() {
    let gate = spawn_gate(GateOptions::rule_policy(&format!(
        "aaguid_deny = [\"{MODEL_B}\"]"
    )))
    .await;
    let alice = gate.session("alice");
    let mut model_a = FlagAuthenticator::new().with_aaguid(aaguid(MODEL_A));
    alice.register_first(&mut model_a, "Model A").await;
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let confirmed = alice.confirm(&withdrawal, &mut model_a).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");

    let bob = gate.session("bob");
    let mut model_b = FlagAuthenticator::new().with_aaguid(aaguid(MODEL_B));
    bob.register_first(&mut model_b, "Model B").await;
    let withdrawal = bob.hold(&enable_withdrawals("k2")).await;
    expect_not_allowed(&bob, &withdrawal, &mut model_b).await;
    // Other rules do not share the rule's list.
    let limits = bob.hold(&raise_limits("acc-2")).await;
    let confirmed = bob.confirm(&limits, &mut model_b).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
}

#[tokio::test]
async fn global_aaguid_lists_are_enforced_at_registration() {
    let gate = spawn_gate(GateOptions::passkeys(&format!(
        "aaguid_allow = [\"{MODEL_A}\"]"
    )))
    .await;
    let bob = gate.session("bob");
    let mut model_b = FlagAuthenticator::new().with_aaguid(aaguid(MODEL_B));
    expect_error(
        bob.register(&mut model_b, "Model B").await,
        StatusCode::FORBIDDEN,
        "passkey_not_allowed",
    )
    .await;
    assert!(bob.passkeys().await.is_empty(), "nothing registered");
    let alice = gate.session("alice");
    let mut model_a = FlagAuthenticator::new().with_aaguid(aaguid(MODEL_A));
    alice.register_first(&mut model_a, "Model A").await;

    let gate = spawn_gate(GateOptions::passkeys(&format!(
        "aaguid_deny = [\"{MODEL_B}\"]"
    )))
    .await;
    let bob = gate.session("bob");
    expect_error(
        bob.register(
            &mut FlagAuthenticator::new().with_aaguid(aaguid(MODEL_B)),
            "Model B",
        )
        .await,
        StatusCode::FORBIDDEN,
        "passkey_not_allowed",
    )
    .await;
    assert!(bob.passkeys().await.is_empty(), "nothing registered");
    let alice = gate.session("alice");
    alice
        .register_first(
            &mut FlagAuthenticator::new().with_aaguid(aaguid(MODEL_A)),
            "Model A",
        )
        .await;
}

// ---------------------------------------------------------------------------------------------
// Attestation

/// Two soft tokens, each with its own attestation CA; only the first CA is written to a PEM
/// file (returned with the directory that holds it).
fn trusted_and_untrusted_tokens() -> (SoftToken, SoftToken, tempfile::TempDir, PathBuf) {
    let (trusted, trusted_ca) = SoftToken::new(true).expect("a soft token");
    let (untrusted, _other_ca) = SoftToken::new(true).expect("another soft token");
    let dir = tempfile::tempdir().expect("a directory for the roots");
    let pem = dir.path().join("trusted-root.pem");
    std::fs::write(&pem, certificate_pem(&trusted_ca)).expect("write the root PEM");
    (trusted, untrusted, dir, pem)
}

/// The soft tokens' certificates are valid from the wall clock's now: the gate's clock starts
/// there for these tests (certificate time checks use the gate's clock).
fn attestation_gate(passkeys: String, rule_policy: String) -> GateOptions {
    GateOptions {
        passkeys,
        rule_policy,
        clock_start: Some(OffsetDateTime::now_utc() + time::Duration::minutes(1)),
    }
}

#[tokio::test]
async fn global_attestation_admits_only_authenticators_chained_to_a_trusted_root() {
    let (mut trusted, mut untrusted, _dir, pem) = trusted_and_untrusted_tokens();
    let gate = spawn_gate(attestation_gate(
        format!(
            "attestation = \"required\"\nattestation_roots = [{:?}]",
            pem.display().to_string()
        ),
        String::new(),
    ))
    .await;

    let alice = gate.session("alice");
    let registered = alice.register_first(&mut trusted, "Trusted token").await;
    let listed = alice
        .passkey(registered["id"].as_str().expect("id"))
        .await
        .expect("listed");
    assert_eq!(
        listed["aaguid"],
        SOFT_TOKEN_AAGUID.to_string(),
        "the attested model is listed: {listed}"
    );
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let confirmed = alice.confirm(&withdrawal, &mut trusted).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");

    let bob = gate.session("bob");
    expect_error(
        bob.register(&mut untrusted, "Untrusted token").await,
        StatusCode::FORBIDDEN,
        "passkey_not_allowed",
    )
    .await;
    let carol = gate.session("carol");
    expect_error(
        carol
            .register(&mut FlagAuthenticator::new(), "No attestation")
            .await,
        StatusCode::FORBIDDEN,
        "passkey_not_allowed",
    )
    .await;
    assert!(bob.passkeys().await.is_empty() && carol.passkeys().await.is_empty());
}

#[tokio::test]
async fn a_rule_requiring_attestation_refuses_untrusted_and_unattested_passkeys() {
    let (mut trusted, mut untrusted, _dir, pem) = trusted_and_untrusted_tokens();
    let gate = spawn_gate(attestation_gate(
        String::new(),
        format!(
            "attestation = \"required\"\nattestation_roots = [{:?}]",
            pem.display().to_string()
        ),
    ))
    .await;

    let alice = gate.session("alice");
    alice.register_first(&mut trusted, "Trusted token").await;
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let confirmed = alice.confirm(&withdrawal, &mut trusted).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");

    // Both register (the global policy asks nothing), neither may confirm this rule.
    let bob = gate.session("bob");
    bob.register_first(&mut untrusted, "Untrusted token").await;
    let withdrawal = bob.hold(&enable_withdrawals("k2")).await;
    let response = bob.try_confirm(&withdrawal, &mut untrusted).await;
    expect_error(response, StatusCode::FORBIDDEN, "passkey_not_allowed").await;
    assert_eq!(bob.change_state(&withdrawal).await, "held");

    let carol = gate.session("carol");
    let mut unattested = FlagAuthenticator::new();
    carol
        .register_first(&mut unattested, "No attestation")
        .await;
    let withdrawal = carol.hold(&enable_withdrawals("k3")).await;
    expect_not_allowed(&carol, &withdrawal, &mut unattested).await;
    let limits = carol.hold(&raise_limits("acc-3")).await;
    let confirmed = carol.confirm(&limits, &mut unattested).await;
    assert_eq!(
        confirmed["state"], "cooling_off",
        "rules without the requirement accept it: {confirmed}"
    );
}

#[tokio::test]
async fn an_attested_passkey_keeps_confirming_after_its_attestation_certificate_expires() {
    // Attestation describes the authenticator that created the credential, checked when it was
    // registered. Attestation leaf certificates can be short-lived (the soft token's lives five
    // days; Apple's anonymous attestation ones a few days): re-checking the chain against "now"
    // at every confirmation would lock such passkeys out of the rule days after enrolment.
    let (mut trusted, _untrusted, _dir, pem) = trusted_and_untrusted_tokens();
    let gate = spawn_gate(attestation_gate(
        String::new(),
        format!(
            "attestation = \"required\"\nattestation_roots = [{:?}]",
            pem.display().to_string()
        ),
    ))
    .await;
    let alice = gate.session("alice");
    alice.register_first(&mut trusted, "Trusted token").await;

    gate.advance(std::time::Duration::from_secs(7 * 24 * 3600));
    let alice = gate.session("alice");
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    let confirmed = alice.confirm(&withdrawal, &mut trusted).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
}

#[tokio::test]
async fn a_passkey_that_becomes_synced_is_refused_by_a_device_bound_rule() {
    // Registered device-bound; later its provider makes it syncable (BE goes 0 → 1, which
    // webauthn-rs accepts for passkeys as long as BS is still clear). The policy must follow the
    // flag the assertion carries, and the stored flag must follow it too.
    let gate = spawn_gate(GateOptions::rule_policy("device_bound = true")).await;
    let alice = gate.session("alice");
    let mut key = FlagAuthenticator::new();
    let id = alice.register_first(&mut key, "Phone").await["id"]
        .as_str()
        .expect("id")
        .to_string();

    key.backup_eligible = true;
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    expect_not_allowed(&alice, &withdrawal, &mut key).await;

    let limits = alice.hold(&raise_limits("acc-1")).await;
    let confirmed = alice.confirm(&limits, &mut key).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
    // Now backed up as well (webauthn-rs allows BS only because the stored BE was updated).
    key.backup_state = true;
    let limits = alice.hold(&raise_limits("acc-2")).await;
    let confirmed = alice.confirm(&limits, &mut key).await;
    assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");
    expect_not_allowed(&alice, &withdrawal, &mut key).await;

    // And the list tells the user what the passkey is now.
    let listed = alice.passkey(&id).await.expect("listed");
    assert_eq!(
        listed["backup_eligible"], true,
        "backup state is updated after a successful assertion: {listed}"
    );
}

#[tokio::test]
async fn another_users_passkey_cannot_confirm() {
    let gate = spawn_gate(GateOptions::default()).await;
    let alice = gate.session("alice");
    let mut alices_key = FlagAuthenticator::new();
    alice.register_first(&mut alices_key, "Alice's key").await;
    let bob = gate.session("bob");
    let mut bobs_key = FlagAuthenticator::new();
    bob.register_first(&mut bobs_key, "Bob's key").await;

    // Bob's valid, user-verified assertion over alice's ceremony.
    let withdrawal = alice.hold(&enable_withdrawals("k1")).await;
    expect_error(
        try_confirm_forcing(&alice, &withdrawal, &mut bobs_key).await,
        StatusCode::FORBIDDEN,
        "assertion_invalid",
    )
    .await;
    assert_eq!(alice.change_state(&withdrawal).await, "held");
}
