//! WebAuthn ceremonies with webauthn-rs: registering a user's passkeys and checking a passkey
//! assertion. Ceremony state lives in the database, bound to the user and the browser
//! session, and is consumed atomically before it is finished, because webauthn-rs itself
//! would accept the same state twice. User verification is always required. On top of
//! webauthn-rs this module checks what it leaves to the relying party: `crossOrigin`, an
//! exact origin, a signature counter that goes backwards (the credential is disabled), and the
//! credential policy of the change being confirmed.

pub mod policy;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;
use webauthn_rs::prelude::{
    CreationChallengeResponse, Credential, PasskeyAuthentication, PasskeyRegistration,
    PublicKeyCredential, RegisterPublicKeyCredential, RequestChallengeResponse, WebauthnError,
};
use webauthn_rs::{Webauthn, WebauthnBuilder};

pub use policy::{CredentialPolicy, NotAllowed};

use crate::config::{Config, WebauthnSettings};
use crate::error::GateError;
use crate::identity::{base64url, UserId};
use crate::notify::Notifier;
use crate::policy::sanitize_for_display;
use crate::store::{
    CeremonyKind, CeremonyRecord, Effects, PasskeyRecord, PasskeyState, Store, StoreError,
};

/// The passkey of a successful assertion.
#[derive(Debug, Clone)]
pub struct VerifiedPasskey {
    pub id: Uuid,
    pub name: String,
    pub created_at: OffsetDateTime,
}

/// What registration enforces and how ceremonies are bounded.
#[derive(Debug, Clone)]
pub struct CeremonySettings {
    pub ceremony_ttl: Duration,
    pub max_ceremonies_per_minute: u32,
    /// The model checks (AAGUID lists, attestation) every new passkey must pass.
    pub registration_policy: CredentialPolicy,
    /// Ask authenticators for a direct attestation, because some policy checks one.
    pub request_attestation: bool,
    /// The only origin assertions may come from (`public_url`).
    pub public_origin: String,
}

#[derive(Clone)]
pub struct Passkeys {
    webauthn: Arc<Webauthn>,
    store: Store,
    settings: Arc<CeremonySettings>,
    notifier: Notifier,
}

/// Builds the relying party from the config; `public_url` is the only accepted origin.
pub fn build_webauthn(settings: &WebauthnSettings, config: &Config) -> Result<Webauthn, String> {
    WebauthnBuilder::new(&settings.rp_id, &config.public_url)
        .and_then(|b| b.rp_name(&settings.rp_name).build())
        .map_err(|e| format!("webauthn settings rejected: {e}"))
}

/// The parts of clientDataJSON that webauthn-rs does not check on assertions.
#[derive(Deserialize)]
struct ClientData {
    origin: String,
    #[serde(rename = "crossOrigin", default)]
    cross_origin: bool,
}

impl Passkeys {
    pub fn new(
        webauthn: Webauthn,
        store: Store,
        settings: CeremonySettings,
        notifier: Notifier,
    ) -> Self {
        Self {
            webauthn: Arc::new(webauthn),
            store,
            settings: Arc::new(settings),
            notifier,
        }
    }

    pub async fn list(&self, user: &UserId) -> Result<Vec<PasskeyRecord>, GateError> {
        Ok(self.store.passkeys_of(user.as_str()).await?)
    }

    /// Refuses a new ceremony when the user started too many in the last minute: each start
    /// stores state, so an unbounded stream of starts would be unbounded storage.
    async fn check_ceremony_rate(
        &self,
        user: &UserId,
        now: OffsetDateTime,
    ) -> Result<(), GateError> {
        let since = now - Duration::from_secs(60);
        let started = self
            .store
            .ceremonies_started_since(user.as_str(), since)
            .await?;
        if started >= i64::from(self.settings.max_ceremonies_per_minute) {
            return Err(GateError::TooManyCeremonies);
        }
        Ok(())
    }

    /// Starts registering a new passkey for `user`. Their existing credentials are excluded so
    /// an authenticator is not registered twice.
    pub async fn start_registration(
        &self,
        user: &UserId,
        session_binding: &str,
        now: OffsetDateTime,
    ) -> Result<(Uuid, CreationChallengeResponse), GateError> {
        self.check_ceremony_rate(user, now).await?;
        let handle = self.store.user_handle(user.as_str(), now).await?;
        let existing = self.store.passkeys_of(user.as_str()).await?;
        let exclude = existing
            .iter()
            .map(|p| p.passkey.cred_id().clone())
            .collect::<Vec<_>>();
        let (mut challenge, state) = self
            .webauthn
            .start_passkey_registration(handle, user.as_str(), user.as_str(), Some(exclude))
            .map_err(|e| GateError::Internal(format!("start registration: {e}")))?;
        if self.settings.request_attestation {
            // The registration state does not depend on the preference: webauthn-rs verifies
            // whatever statement comes back, and the chain is judged against each policy's
            // roots (here for registration, later per rule).
            challenge.public_key.attestation =
                Some(webauthn_rs_core::proto::AttestationConveyancePreference::Direct);
        }
        let id = self
            .save_ceremony(
                CeremonyKind::Register,
                user,
                None,
                None,
                session_binding,
                &state,
                now,
                None,
            )
            .await?;
        Ok((id, challenge))
    }

    /// Finishes a registration and stores the passkey in `state` (active, or pending its own
    /// confirmation when the user already has one).
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_registration(
        &self,
        user: &UserId,
        ceremony_id: Uuid,
        session_binding: &str,
        credential: &RegisterPublicKeyCredential,
        name: &str,
        state: PasskeyState,
        now: OffsetDateTime,
        effects_of: &(dyn Fn(&PasskeyRecord) -> Effects + Sync),
    ) -> Result<PasskeyRecord, GateError> {
        let name = passkey_name(name)?;
        let ceremony = self
            .take_live_ceremony(
                CeremonyKind::Register,
                user,
                ceremony_id,
                session_binding,
                now,
            )
            .await?;
        let registration: PasskeyRegistration = serde_json::from_str(&ceremony.state_json)
            .map_err(|e| GateError::Internal(format!("registration state: {e}")))?;
        let passkey = match self
            .webauthn
            .finish_passkey_registration(credential, &registration)
        {
            Ok(passkey) => passkey,
            // webauthn-rs refuses a credential on the exclude list with a misleading error;
            // an already registered credential is a duplicate, said plainly.
            Err(error) => {
                let credential_id = base64url(credential.raw_id.as_ref());
                if self.store.credential_exists(&credential_id).await? {
                    return Err(GateError::DuplicateCredential);
                }
                return Err(GateError::RegistrationFailed(error.to_string()));
            }
        };
        // Whether the credential may be synced to other devices (BE flag).
        let backup_eligible = Credential::from(passkey.clone()).backup_eligible;
        let record = PasskeyRecord {
            id: Uuid::new_v4(),
            user_id: user.as_str().to_string(),
            credential_id: base64url(passkey.cred_id().as_ref()),
            name,
            passkey,
            backup_eligible,
            created_at: now,
            last_used_at: None,
            state,
            aaguid: policy::aaguid_of(credential.response.attestation_object.as_ref()),
            activation_change_id: None,
        };
        self.settings
            .registration_policy
            .admits_model(&record)
            .map_err(|NotAllowed(why)| GateError::PasskeyNotAllowed(why))?;
        match self
            .store
            .insert_passkey(&record, &effects_of(&record))
            .await
        {
            Ok(()) => Ok(record),
            Err(StoreError::Duplicate) => Err(GateError::DuplicateCredential),
            Err(other) => Err(other.into()),
        }
    }

    /// Starts an assertion by one of `user`'s active passkeys that `policy` admits, bound to a
    /// change and its digest.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_assertion(
        &self,
        user: &UserId,
        change_id: Uuid,
        change_digest: &str,
        session_binding: &str,
        policy: &CredentialPolicy,
        now: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(Uuid, RequestChallengeResponse), GateError> {
        let active: Vec<PasskeyRecord> = self
            .store
            .passkeys_of(user.as_str())
            .await?
            .into_iter()
            .filter(|p| p.state == PasskeyState::Active)
            .collect();
        if active.is_empty() {
            return Err(GateError::NoPasskey);
        }
        let mut refusal = None;
        let mut credentials = Vec::new();
        for passkey in active {
            let backup_eligible = Credential::from(passkey.passkey.clone()).backup_eligible;
            match policy.admits(&passkey, backup_eligible) {
                Ok(()) => credentials.push(passkey.passkey),
                Err(NotAllowed(why)) => refusal = Some(why),
            }
        }
        if credentials.is_empty() {
            return Err(GateError::PasskeyNotAllowed(refusal.unwrap_or_default()));
        }
        self.check_ceremony_rate(user, now).await?;
        let (challenge, state) = self
            .webauthn
            .start_passkey_authentication(&credentials)
            .map_err(|e| GateError::Internal(format!("start authentication: {e}")))?;
        let id = self
            .save_ceremony(
                CeremonyKind::Confirm,
                user,
                Some(change_id),
                Some(change_digest.to_string()),
                session_binding,
                &state,
                now,
                Some(not_after),
            )
            .await?;
        Ok((id, challenge))
    }

    /// Consumes the ceremony and checks the assertion. Returns the ceremony (so the caller
    /// can check what it was bound to) and the passkey that signed.
    pub async fn finish_assertion(
        &self,
        user: &UserId,
        ceremony_id: Uuid,
        session_binding: &str,
        credential: &PublicKeyCredential,
        policy: &CredentialPolicy,
        now: OffsetDateTime,
    ) -> Result<(CeremonyRecord, VerifiedPasskey), GateError> {
        let ceremony = self
            .take_live_ceremony(
                CeremonyKind::Confirm,
                user,
                ceremony_id,
                session_binding,
                now,
            )
            .await?;
        self.check_client_data(credential)?;
        let authentication: PasskeyAuthentication = serde_json::from_str(&ceremony.state_json)
            .map_err(|e| GateError::Internal(format!("authentication state: {e}")))?;
        let result = match self
            .webauthn
            .finish_passkey_authentication(credential, &authentication)
        {
            Ok(result) => result,
            Err(WebauthnError::UserNotVerified) => return Err(GateError::UserNotVerified),
            Err(WebauthnError::CredentialPossibleCompromise) => {
                return Err(self.disable_cloned(user, credential, now).await);
            }
            Err(other) => return Err(GateError::AssertionInvalid(other.to_string())),
        };
        // webauthn-rs enforces this for passkeys already; a second look costs nothing.
        if !result.user_verified() {
            return Err(GateError::UserNotVerified);
        }
        // The credential must be one of this user's active passkeys, as stored now (not only
        // as listed when the ceremony started).
        let mut passkeys = self.store.passkeys_of(user.as_str()).await?;
        let passkey = passkeys
            .iter_mut()
            .find(|p| p.passkey.cred_id() == result.cred_id())
            .filter(|p| p.state == PasskeyState::Active)
            .ok_or_else(|| GateError::AssertionInvalid("not one of your active passkeys".into()))?;
        // Counters and backup state are kept current after every successful assertion.
        passkey.passkey.update_credential(&result);
        self.store
            .record_passkey_use(passkey.id, &passkey.passkey, now)
            .await?;
        policy
            .admits(passkey, result.backup_eligible())
            .map_err(|NotAllowed(why)| GateError::PasskeyNotAllowed(why))?;
        Ok((
            ceremony,
            VerifiedPasskey {
                id: passkey.id,
                name: passkey.name.clone(),
                created_at: passkey.created_at,
            },
        ))
    }

    /// webauthn-rs checks the origin against the allowed list but not `crossOrigin` on
    /// assertions; an assertion made inside a frame of another site must not count.
    fn check_client_data(&self, credential: &PublicKeyCredential) -> Result<(), GateError> {
        let client_data: ClientData =
            serde_json::from_slice(credential.response.client_data_json.as_ref())
                .map_err(|_| GateError::AssertionInvalid("the client data is malformed".into()))?;
        if client_data.cross_origin {
            return Err(GateError::AssertionInvalid(
                "the passkey was used from inside another site's frame".into(),
            ));
        }
        // Compared as origins (scheme, host, port), the way browsers and webauthn-rs do.
        let origin = url::Url::parse(&client_data.origin)
            .map(|url| url.origin().ascii_serialization())
            .unwrap_or_default();
        if origin != self.settings.public_origin {
            return Err(GateError::AssertionInvalid(
                "the passkey was used on another site".into(),
            ));
        }
        Ok(())
    }

    /// A signature counter went backwards: the credential may have been cloned. It is
    /// disabled for good and a security event is recorded.
    async fn disable_cloned(
        &self,
        user: &UserId,
        credential: &PublicKeyCredential,
        now: OffsetDateTime,
    ) -> GateError {
        let raw_id: &[u8] = credential.raw_id.as_ref();
        let passkeys = match self.store.passkeys_of(user.as_str()).await {
            Ok(passkeys) => passkeys,
            Err(error) => return error.into(),
        };
        let Some(passkey) = passkeys.iter().find(|p| {
            let id: &[u8] = p.passkey.cred_id().as_ref();
            id == raw_id
        }) else {
            return GateError::AssertionInvalid("not one of your passkeys".into());
        };
        let code = match self.store.anti_phishing_code(user.as_str()).await {
            Ok(code) => code,
            Err(error) => return error.into(),
        };
        let effects = self.notifier.effects(
            "passkey.disabled",
            user.as_str(),
            None,
            serde_json::json!({ "passkey_id": passkey.id, "name": passkey.name, "reason": "signature counter went backwards" }),
            true,
            code.as_deref(),
            now,
        );
        if let Err(error) = self
            .store
            .set_passkey_state(
                passkey.id,
                PasskeyState::Active,
                PasskeyState::Disabled,
                now,
                &effects,
            )
            .await
        {
            return error.into();
        }
        let detail = format!(
            "the signature counter of passkey \"{}\" went backwards; it was disabled",
            passkey.name
        );
        if let Err(error) = self
            .store
            .record_security_event(
                user.as_str(),
                "passkey.disabled",
                Some(passkey.id),
                &detail,
                now,
            )
            .await
        {
            return error.into();
        }
        tracing::warn!(user = %user, passkey = %passkey.id, "possible cloned passkey disabled");
        GateError::PasskeyDisabled
    }

    #[allow(clippy::too_many_arguments)]
    async fn save_ceremony<S: serde::Serialize>(
        &self,
        kind: CeremonyKind,
        user: &UserId,
        change_id: Option<Uuid>,
        change_digest: Option<String>,
        session_binding: &str,
        state: &S,
        now: OffsetDateTime,
        not_after: Option<OffsetDateTime>,
    ) -> Result<Uuid, GateError> {
        let ttl = self.settings.ceremony_ttl;
        let expires_at = not_after.map_or(now + ttl, |limit| limit.min(now + ttl));
        let record = CeremonyRecord {
            id: Uuid::new_v4(),
            kind,
            user_id: user.as_str().to_string(),
            change_id,
            change_digest,
            session_binding: session_binding.to_string(),
            state_json: serde_json::to_string(state)
                .map_err(|e| GateError::Internal(format!("ceremony state: {e}")))?,
            created_at: now,
            expires_at,
        };
        self.store.insert_ceremony(&record).await?;
        Ok(record.id)
    }

    async fn take_live_ceremony(
        &self,
        kind: CeremonyKind,
        user: &UserId,
        id: Uuid,
        session_binding: &str,
        now: OffsetDateTime,
    ) -> Result<CeremonyRecord, GateError> {
        let ceremony = self
            .store
            .take_ceremony(id, kind, user.as_str(), session_binding, now)
            .await?
            .ok_or(GateError::CeremonyInvalid)?;
        if now > ceremony.expires_at {
            return Err(GateError::CeremonyInvalid);
        }
        Ok(ceremony)
    }
}

/// A passkey's name as the user typed it: trimmed, 1 to 64 characters, nothing that hides text.
pub fn passkey_name(raw: &str) -> Result<String, GateError> {
    let name = sanitize_for_display(raw.trim());
    if name.is_empty() || name.chars().count() > 64 {
        return Err(GateError::BadRequest(
            "a passkey name must be 1 to 64 characters".into(),
        ));
    }
    Ok(name)
}
