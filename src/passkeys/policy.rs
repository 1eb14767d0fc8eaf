//! Which passkeys may confirm what. A rule (or the global `[passkeys]` section) can demand a
//! device-bound credential (not synced), an authenticator model on an allow list and off a
//! deny list, or an attestation that chains to a trusted root. User verification is always
//! required and is not part of this policy: it cannot be configured down.

use std::sync::Arc;

use uuid::Uuid;
use webauthn_rs::prelude::{AttestationCaList, Credential};

use crate::store::PasskeyRecord;

/// One effective credential policy.
#[derive(Clone, Default)]
pub struct CredentialPolicy {
    pub device_bound: bool,
    pub aaguid_allow: Vec<Uuid>,
    pub aaguid_deny: Vec<Uuid>,
    /// `Some`: attestation is required and must chain to one of these roots.
    pub attestation_roots: Option<Arc<AttestationCaList>>,
}

impl std::fmt::Debug for CredentialPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialPolicy")
            .field("device_bound", &self.device_bound)
            .field("aaguid_allow", &self.aaguid_allow)
            .field("aaguid_deny", &self.aaguid_deny)
            .field(
                "attestation_roots",
                &self.attestation_roots.as_ref().map(|roots| roots.len()),
            )
            .finish()
    }
}

/// Why a passkey may not be used here, in words for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAllowed(pub String);

impl CredentialPolicy {
    /// The model checks, which also apply when a passkey is registered: AAGUID lists and
    /// attestation. (Device-bound is only checked when confirming: a synced passkey may still
    /// be registered for other uses.)
    pub fn admits_model(&self, passkey: &PasskeyRecord) -> Result<(), NotAllowed> {
        let model_refused = || {
            NotAllowed(
                "this kind of authenticator is not accepted here by the exchange; use another \
                 passkey or security key"
                    .into(),
            )
        };
        if !self.aaguid_allow.is_empty()
            && !passkey
                .aaguid
                .is_some_and(|aaguid| self.aaguid_allow.contains(&aaguid))
        {
            return Err(model_refused());
        }
        if passkey
            .aaguid
            .is_some_and(|aaguid| self.aaguid_deny.contains(&aaguid))
        {
            return Err(model_refused());
        }
        if let Some(roots) = &self.attestation_roots {
            let credential = Credential::from(passkey.passkey.clone());
            // Judged as of registration, when the attestation was presented: attestation
            // certificates may be short-lived (days), and the credential does not change.
            let presented_at = std::time::SystemTime::from(passkey.created_at);
            let trusted = webauthn_rs_core::attestation::verify_attestation_ca_chain(
                &credential.attestation.data,
                roots,
                presented_at,
            );
            if !matches!(trusted, Ok(Some(_))) {
                return Err(NotAllowed(
                    "this change needs a passkey from an authenticator model the exchange trusts \
                     (with a verified attestation); this passkey does not have one"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// Whether `passkey` may confirm under this policy; `backup_eligible` is the credential's
    /// current BE flag (from the assertion when there is one).
    pub fn admits(&self, passkey: &PasskeyRecord, backup_eligible: bool) -> Result<(), NotAllowed> {
        if self.device_bound && backup_eligible {
            return Err(NotAllowed(
                "this change can only be confirmed with a passkey bound to one device, such as a \
                 security key; passkeys that sync between devices cannot confirm it"
                    .into(),
            ));
        }
        self.admits_model(passkey)
    }
}

/// The AAGUID (authenticator model) from a registration's attestation object: the 16 bytes
/// after the RP id hash, flags and counter in the authenticator data, present when the
/// attested-credential-data flag is set. webauthn-rs keeps it only for some attestation
/// formats, so it is read here for all of them.
pub fn aaguid_of(attestation_object: &[u8]) -> Option<Uuid> {
    let value: serde_cbor_2::Value = serde_cbor_2::from_slice(attestation_object).ok()?;
    let serde_cbor_2::Value::Map(map) = value else {
        return None;
    };
    let auth_data = map.iter().find_map(|(key, value)| match (key, value) {
        (serde_cbor_2::Value::Text(key), serde_cbor_2::Value::Bytes(bytes))
            if key == "authData" =>
        {
            Some(bytes)
        }
        _ => None,
    })?;
    const ATTESTED_CREDENTIAL_DATA: u8 = 0x40;
    let flags = *auth_data.get(32)?;
    if flags & ATTESTED_CREDENTIAL_DATA == 0 {
        return None;
    }
    let bytes: [u8; 16] = auth_data.get(37..53)?.try_into().ok()?;
    Some(Uuid::from_bytes(bytes))
}
