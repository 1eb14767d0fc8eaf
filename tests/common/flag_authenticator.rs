//! A software authenticator whose every flag the test chooses: backup eligibility and state (a
//! synced passkey vs. a device-bound one), user verification, the AAGUID (the authenticator
//! model), the signature counter (to play a cloned credential), and what the client writes into
//! clientDataJSON (`crossOrigin`, a foreign origin).
//!
//! webauthn-authenticator-rs's `SoftPasskey` and `SoftToken` never set the backup flags and always
//! build clientDataJSON themselves, so this one implements `AuthenticatorBackend` directly: it
//! plays both the browser (clientDataJSON) and the authenticator (authenticator data, ES256
//! signature). Registration answers with `"none"` attestation, as passkey providers do.
//!
//! [`certificate_pem`] writes a `SoftToken`'s attestation CA as PEM, for tests that need a real
//! attestation chain (`SoftToken::new(true)` returns that CA as an X.509 `Certificate`).

#![allow(dead_code)]

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use crypto_glue::ecdsa_p256::{
    self, EcdsaP256PublicSec1Point, EcdsaP256Signature, EcdsaP256SigningKey,
};
use crypto_glue::traits::{EncodePem, LineEndingPem, Signer};
use crypto_glue::x509::Certificate;
use serde_cbor_2::value::Value as Cbor;
use sha2::{Digest, Sha256};
use url::Url;
use webauthn_authenticator_rs::error::WebauthnCError;
use webauthn_authenticator_rs::AuthenticatorBackend;
use webauthn_rs_core::proto::{
    AuthenticationExtensionsClientOutputs, AuthenticatorAssertionResponseRaw,
    AuthenticatorAttestationResponseRaw, PublicKeyCredential, PublicKeyCredentialCreationOptions,
    PublicKeyCredentialRequestOptions, RegisterPublicKeyCredential,
    RegistrationExtensionsClientOutputs,
};

/// Authenticator data flag: the user was present (always set: a test never plays an absent user).
const FLAG_UP: u8 = 0x01;
/// Authenticator data flag: the user was verified (PIN, biometrics).
const FLAG_UV: u8 = 0x04;
/// Authenticator data flag: the credential may be backed up (synced), set once at creation.
const FLAG_BE: u8 = 0x08;
/// Authenticator data flag: the credential is backed up right now.
const FLAG_BS: u8 = 0x10;
/// Authenticator data flag: attested credential data follows (registration only).
const FLAG_AT: u8 = 0x40;

/// A software authenticator with test-chosen flags. `Clone` copies the private keys and the
/// counter: the clone is a cloned authenticator, exactly what clone detection must catch.
#[derive(Clone)]
pub struct FlagAuthenticator {
    /// BE: the credential is backup-eligible (a synced passkey). Reported at registration and in
    /// every assertion.
    pub backup_eligible: bool,
    /// BS: the credential is currently backed up.
    pub backup_state: bool,
    /// UV: the user was verified. UP is always set.
    pub user_verified: bool,
    /// The authenticator model, written into the attested credential data at registration.
    pub aaguid: [u8; 16],
    /// Writes `"crossOrigin":true` into clientDataJSON, as a browser does for a ceremony run in a
    /// cross-origin iframe.
    pub cross_origin: bool,
    /// Writes this origin into clientDataJSON instead of the real one.
    pub origin_override: Option<String>,
    /// Signs with this credential even when the relying party does not offer it in
    /// `allowCredentials` (a client that ignores the list, e.g. to force a pending or disabled
    /// passkey on the gate).
    pub force_credential: Option<Vec<u8>>,
    /// Registers this existing credential (same id, same key) again instead of creating a new
    /// one, and ignores `excludeCredentials` while doing so: a correctly signed registration of a
    /// credential id the relying party already knows.
    pub reuse_credential: Option<Vec<u8>>,
    /// The signature counter: one per authenticator (as most hardware keys keep it), incremented
    /// before each assertion.
    counter: u32,
    /// Credential id → private key.
    keys: BTreeMap<Vec<u8>, EcdsaP256SigningKey>,
    /// Credential ids in the order they were created.
    created: Vec<Vec<u8>>,
}

impl Default for FlagAuthenticator {
    fn default() -> Self {
        Self::new()
    }
}

impl FlagAuthenticator {
    /// A device-bound authenticator (BE and BS clear) that verifies the user, with the all-zero
    /// AAGUID, a counter at 0, and an honest client (own origin, not cross-origin).
    pub fn new() -> Self {
        Self {
            backup_eligible: false,
            backup_state: false,
            user_verified: true,
            aaguid: [0; 16],
            cross_origin: false,
            origin_override: None,
            force_credential: None,
            reuse_credential: None,
            counter: 0,
            keys: BTreeMap::new(),
            created: Vec::new(),
        }
    }

    /// A synced passkey: backup-eligible and backed up (BE and BS set).
    pub fn synced() -> Self {
        Self {
            backup_eligible: true,
            backup_state: true,
            ..Self::new()
        }
    }

    /// The same authenticator with another model id.
    pub fn with_aaguid(mut self, aaguid: [u8; 16]) -> Self {
        self.aaguid = aaguid;
        self
    }

    /// The counter value the last assertion carried (0 before the first).
    pub fn counter(&self) -> u32 {
        self.counter
    }

    /// Sets the counter: the next assertion carries `value + 1`. Setting it to or below a value
    /// the relying party has already seen replays an old counter, as a cloned key would.
    pub fn set_counter(&mut self, value: u32) {
        self.counter = value;
    }

    /// Moves the counter back by `by` (not below 0).
    pub fn rewind_counter(&mut self, by: u32) {
        self.counter = self.counter.saturating_sub(by);
    }

    /// The raw ids of the credentials this authenticator created, oldest first.
    pub fn credential_ids(&self) -> &[Vec<u8>] {
        &self.created
    }

    /// The raw id of the newest credential.
    pub fn last_credential_id(&self) -> Option<Vec<u8>> {
        self.created.last().cloned()
    }

    /// `backup_eligible`, `backup_state`, `user_verified` and UP as the authenticator data's
    /// flags byte.
    fn flags(&self) -> u8 {
        let mut flags = FLAG_UP;
        if self.user_verified {
            flags |= FLAG_UV;
        }
        if self.backup_eligible {
            flags |= FLAG_BE;
        }
        if self.backup_state {
            flags |= FLAG_BS;
        }
        flags
    }

    /// clientDataJSON as a browser serialises it. The origin is the ASCII serialisation (no
    /// trailing slash), and `crossOrigin` is always present, as Chromium sends it.
    fn client_data(&self, kind: &str, origin: &Url, challenge: &[u8]) -> Vec<u8> {
        let origin = self
            .origin_override
            .clone()
            .unwrap_or_else(|| origin.origin().ascii_serialization());
        let client_data = serde_json::json!({
            "type": kind,
            "challenge": URL_SAFE_NO_PAD.encode(challenge),
            "origin": origin,
            "crossOrigin": self.cross_origin,
        });
        serde_json::to_vec(&client_data).expect("clientDataJSON serialises")
    }
}

/// An ES256 signature (ASN.1 DER) over `authenticator_data || SHA-256(client_data_json)`.
fn sign(key: &EcdsaP256SigningKey, authenticator_data: &[u8], client_data_json: &[u8]) -> Vec<u8> {
    let mut signed = authenticator_data.to_vec();
    signed.extend_from_slice(&Sha256::digest(client_data_json));
    let signature: EcdsaP256Signature = key.sign(&signed);
    signature.to_der().as_bytes().to_vec()
}

/// The credential public key as a COSE_Key map (EC2, ES256, P-256).
fn cose_key(key: &EcdsaP256SigningKey) -> Result<Vec<u8>, WebauthnCError> {
    let point = EcdsaP256PublicSec1Point::from(key.verifying_key().as_affine().to_owned());
    let x = point.x().ok_or(WebauthnCError::Internal)?.to_vec();
    let y = point.y().ok_or(WebauthnCError::Internal)?.to_vec();
    let map = BTreeMap::from([
        (Cbor::Integer(1), Cbor::Integer(2)),  // kty: EC2
        (Cbor::Integer(3), Cbor::Integer(-7)), // alg: ES256
        (Cbor::Integer(-1), Cbor::Integer(1)), // crv: P-256
        (Cbor::Integer(-2), Cbor::Bytes(x)),
        (Cbor::Integer(-3), Cbor::Bytes(y)),
    ]);
    serde_cbor_2::to_vec(&Cbor::Map(map)).map_err(|_| WebauthnCError::Cbor)
}

impl AuthenticatorBackend for FlagAuthenticator {
    fn perform_register(
        &mut self,
        origin: Url,
        options: PublicKeyCredentialCreationOptions,
        _timeout_ms: u32,
    ) -> Result<RegisterPublicKeyCredential, WebauthnCError> {
        if !options
            .pub_key_cred_params
            .iter()
            .any(|param| param.type_ == "public-key" && param.alg == -7)
        {
            return Err(WebauthnCError::NotSupported);
        }

        let (credential_id, key) = match &self.reuse_credential {
            Some(id) => {
                let key = self.keys.get(id).ok_or(WebauthnCError::Internal)?.clone();
                (id.clone(), key)
            }
            None => {
                // A real authenticator refuses to create a second credential for an account that
                // already holds one of its credentials (the browser's InvalidStateError).
                let excluded = options.exclude_credentials.iter().flatten();
                if excluded.into_iter().any(|c| self.keys.contains_key(&c.id)) {
                    return Err(WebauthnCError::Security);
                }
                let mut id = vec![0u8; 32];
                id[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
                id[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
                let key = EcdsaP256SigningKey::from(&ecdsa_p256::new_key());
                self.keys.insert(id.clone(), key.clone());
                self.created.push(id.clone());
                (id, key)
            }
        };

        let id_len = u16::try_from(credential_id.len()).map_err(|_| WebauthnCError::Internal)?;
        let mut auth_data = Sha256::digest(options.rp.id.as_bytes()).to_vec();
        auth_data.push(self.flags() | FLAG_AT);
        auth_data.extend_from_slice(&self.counter.to_be_bytes());
        auth_data.extend_from_slice(&self.aaguid);
        auth_data.extend_from_slice(&id_len.to_be_bytes());
        auth_data.extend_from_slice(&credential_id);
        auth_data.extend_from_slice(&cose_key(&key)?);

        let attestation_object = BTreeMap::from([
            (Cbor::Text("fmt".into()), Cbor::Text("none".into())),
            (Cbor::Text("attStmt".into()), Cbor::Map(BTreeMap::new())),
            (Cbor::Text("authData".into()), Cbor::Bytes(auth_data)),
        ]);
        let attestation_object = serde_cbor_2::to_vec(&Cbor::Map(attestation_object))
            .map_err(|_| WebauthnCError::Cbor)?;

        Ok(RegisterPublicKeyCredential {
            id: URL_SAFE_NO_PAD.encode(&credential_id),
            raw_id: credential_id,
            response: AuthenticatorAttestationResponseRaw {
                attestation_object,
                client_data_json: self.client_data("webauthn.create", &origin, &options.challenge),
                transports: None,
            },
            type_: "public-key".to_string(),
            extensions: RegistrationExtensionsClientOutputs::default(),
        })
    }

    fn perform_auth(
        &mut self,
        origin: Url,
        options: PublicKeyCredentialRequestOptions,
        _timeout_ms: u32,
    ) -> Result<PublicKeyCredential, WebauthnCError> {
        let credential_id = match &self.force_credential {
            Some(id) => id.clone(),
            None => options
                .allow_credentials
                .iter()
                .map(|allowed| allowed.id.to_vec())
                .find(|id| self.keys.contains_key(id))
                // As a browser would: none of this authenticator's credentials was asked for.
                .ok_or(WebauthnCError::NoSelectedToken)?,
        };
        let key = self
            .keys
            .get(&credential_id)
            .ok_or(WebauthnCError::Internal)?
            .clone();

        self.counter = self.counter.wrapping_add(1);
        let mut auth_data = Sha256::digest(options.rp_id.as_bytes()).to_vec();
        auth_data.push(self.flags());
        auth_data.extend_from_slice(&self.counter.to_be_bytes());

        let client_data_json = self.client_data("webauthn.get", &origin, &options.challenge);
        let signature = sign(&key, &auth_data, &client_data_json);

        Ok(PublicKeyCredential {
            id: URL_SAFE_NO_PAD.encode(&credential_id),
            raw_id: credential_id,
            response: AuthenticatorAssertionResponseRaw {
                authenticator_data: auth_data,
                client_data_json,
                signature,
                user_handle: None,
            },
            type_: "public-key".to_string(),
            extensions: AuthenticationExtensionsClientOutputs::default(),
        })
    }
}

/// An X.509 certificate (such as the attestation CA `SoftToken::new` returns) as PEM, the form
/// the gate's `attestation_roots` files take.
pub fn certificate_pem(certificate: &Certificate) -> String {
    certificate
        .to_pem(LineEndingPem::LF)
        .expect("the certificate encodes as PEM")
}

/// A UUID's 16 bytes from its text form, for `aaguid` knobs next to config text.
pub fn aaguid(text: &str) -> [u8; 16] {
    *uuid::Uuid::parse_str(text)
        .expect("an AAGUID in UUID form")
        .as_bytes()
}
