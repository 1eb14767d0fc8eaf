//! Self-tests of the flag authenticator against webauthn-rs directly (no gate): if these fail,
//! a failure elsewhere in the suite says nothing about the gate.

use webauthn_authenticator_rs::softtoken::SoftToken;
use webauthn_authenticator_rs::WebauthnAuthenticator;
use webauthn_rs::prelude::{
    Credential, Passkey, Url, Uuid, Webauthn, WebauthnBuilder, WebauthnError,
};

use crate::flag_authenticator::{aaguid, certificate_pem, FlagAuthenticator};

const ORIGIN: &str = "http://localhost:8080";

fn relying_party() -> Webauthn {
    let origin = Url::parse(ORIGIN).expect("origin");
    WebauthnBuilder::new("localhost", &origin)
        .expect("a valid relying party")
        .build()
        .expect("a valid relying party")
}

fn register(rp: &Webauthn, authenticator: &mut FlagAuthenticator) -> Passkey {
    let (options, state) = rp
        .start_passkey_registration(Uuid::new_v4(), "alice", "Alice", None)
        .expect("start registration");
    let credential = authenticator
        .do_registration(Url::parse(ORIGIN).expect("origin"), options)
        .expect("the authenticator registers");
    rp.finish_passkey_registration(&credential, &state)
        .expect("webauthn-rs accepts the registration")
}

/// One assertion of `passkey` by `authenticator`, with webauthn-rs's verdict.
fn authenticate(
    rp: &Webauthn,
    passkey: &Passkey,
    authenticator: &mut FlagAuthenticator,
) -> Result<webauthn_rs::prelude::AuthenticationResult, WebauthnError> {
    let (options, state) = rp
        .start_passkey_authentication(std::slice::from_ref(passkey))
        .expect("start authentication");
    let assertion = authenticator
        .do_authentication(Url::parse(ORIGIN).expect("origin"), options)
        .expect("the authenticator signs");
    rp.finish_passkey_authentication(&assertion, &state)
}

#[test]
fn a_device_bound_credential_registers_and_authenticates() {
    let rp = relying_party();
    let model = aaguid("6d44ba9b-f6ec-2e49-b930-0c8fe920cb73");
    let mut authenticator = FlagAuthenticator::new().with_aaguid(model);
    let mut passkey = register(&rp, &mut authenticator);

    let credential = Credential::from(passkey.clone());
    assert!(!credential.backup_eligible, "BE was not set");
    assert!(!credential.backup_state, "BS was not set");
    assert!(credential.user_verified, "UV was set");
    assert!(
        matches!(
            credential.attestation.data,
            webauthn_rs::prelude::ParsedAttestationData::None
        ),
        "none attestation: {:?}",
        credential.attestation.data
    );

    let result = authenticate(&rp, &passkey, &mut authenticator).expect("a valid assertion");
    assert!(result.user_verified());
    assert!(!result.backup_eligible());
    assert_eq!(result.counter(), 1, "the counter starts at 1");
    passkey.update_credential(&result);

    let result = authenticate(&rp, &passkey, &mut authenticator).expect("a second assertion");
    assert_eq!(result.counter(), 2, "the counter increments per assertion");
}

#[test]
fn a_synced_credential_reports_its_backup_flags() {
    let rp = relying_party();
    let mut authenticator = FlagAuthenticator::synced();
    let passkey = register(&rp, &mut authenticator);
    let credential = Credential::from(passkey.clone());
    assert!(credential.backup_eligible, "BE was set");
    assert!(credential.backup_state, "BS was set");

    let result = authenticate(&rp, &passkey, &mut authenticator).expect("a valid assertion");
    assert!(result.backup_eligible() && result.backup_state());
}

#[test]
fn a_rewound_counter_is_a_possible_compromise() {
    let rp = relying_party();
    let mut authenticator = FlagAuthenticator::new();
    let mut passkey = register(&rp, &mut authenticator);
    for _ in 0..2 {
        let result = authenticate(&rp, &passkey, &mut authenticator).expect("a valid assertion");
        passkey.update_credential(&result);
    }
    assert_eq!(authenticator.counter(), 2);

    // A clone taken now and the original both go on from 2: the first assertion of whichever
    // is second repeats a counter the relying party has seen.
    let mut clone = authenticator.clone();
    let result = authenticate(&rp, &passkey, &mut authenticator).expect("the original signs");
    passkey.update_credential(&result);
    assert!(matches!(
        authenticate(&rp, &passkey, &mut clone),
        Err(WebauthnError::CredentialPossibleCompromise)
    ));

    authenticator.rewind_counter(2);
    assert!(matches!(
        authenticate(&rp, &passkey, &mut authenticator),
        Err(WebauthnError::CredentialPossibleCompromise)
    ));
}

#[test]
fn client_data_carries_the_cross_origin_flag_and_the_overridden_origin() {
    let rp = relying_party();
    let mut authenticator = FlagAuthenticator::new();
    let passkey = register(&rp, &mut authenticator);
    let (options, _) = rp
        .start_passkey_authentication(std::slice::from_ref(&passkey))
        .expect("start authentication");

    authenticator.cross_origin = true;
    authenticator.origin_override = Some("http://evil.example".into());
    let assertion = authenticator
        .do_authentication(Url::parse(ORIGIN).expect("origin"), options)
        .expect("the authenticator signs");
    let client_data: serde_json::Value =
        serde_json::from_slice(assertion.response.client_data_json.as_ref())
            .expect("clientDataJSON is JSON");
    assert_eq!(client_data["crossOrigin"], true);
    assert_eq!(client_data["origin"], "http://evil.example");
    assert_eq!(client_data["type"], "webauthn.get");
}

#[test]
fn webauthn_rs_refuses_a_foreign_origin() {
    // The gate relies on webauthn-rs for the origin (plus its own check); prove the authenticator
    // really puts the foreign origin where webauthn-rs reads it.
    let rp = relying_party();
    let mut authenticator = FlagAuthenticator::new();
    let passkey = register(&rp, &mut authenticator);
    authenticator.origin_override = Some("http://evil.example".into());
    assert!(authenticate(&rp, &passkey, &mut authenticator).is_err());
}

#[test]
fn without_user_verification_a_passkey_assertion_is_refused() {
    let rp = relying_party();
    let mut authenticator = FlagAuthenticator::new();
    let passkey = register(&rp, &mut authenticator);
    authenticator.user_verified = false;
    assert!(authenticate(&rp, &passkey, &mut authenticator).is_err());
}

#[test]
fn a_soft_token_attests_with_a_chain_to_its_ca() {
    let (mut token, ca) = SoftToken::new(true).expect("a soft token with its own CA");
    let pem = certificate_pem(&ca);
    assert!(
        pem.starts_with("-----BEGIN CERTIFICATE-----\n")
            && pem.trim_end().ends_with("-----END CERTIFICATE-----"),
        "PEM: {pem}"
    );

    let rp = relying_party();
    let (options, state) = rp
        .start_passkey_registration(Uuid::new_v4(), "alice", "Alice", None)
        .expect("start registration");
    let credential = token
        .do_registration(Url::parse(ORIGIN).expect("origin"), options)
        .expect("the soft token registers");
    let passkey = rp
        .finish_passkey_registration(&credential, &state)
        .expect("webauthn-rs accepts the packed attestation");
    let credential = Credential::from(passkey);
    assert!(
        !matches!(
            credential.attestation.data,
            webauthn_rs::prelude::ParsedAttestationData::None
                | webauthn_rs::prelude::ParsedAttestationData::Self_
        ),
        "a full attestation chain: {:?}",
        credential.attestation.data
    );
}
