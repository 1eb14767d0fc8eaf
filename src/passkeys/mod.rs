//! WebAuthn ceremonies with webauthn-rs: registering a user's passkeys and checking a passkey
//! assertion. Ceremony state lives in the database, bound to the user and the browser
//! session, and is consumed atomically before it is finished, because webauthn-rs itself
//! would accept the same state twice. User verification is always required.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;
use webauthn_rs::prelude::{
    CreationChallengeResponse, PasskeyAuthentication, PasskeyRegistration, PublicKeyCredential,
    RegisterPublicKeyCredential, RequestChallengeResponse, WebauthnError,
};
use webauthn_rs::{Webauthn, WebauthnBuilder};

use crate::config::{Config, WebauthnSettings};
use crate::error::GateError;
use crate::identity::{base64url, UserId};
use crate::policy::sanitize_for_display;
use crate::store::{CeremonyKind, CeremonyRecord, PasskeyRecord, Store, StoreError};

/// The passkey of a successful assertion.
#[derive(Debug, Clone)]
pub struct VerifiedPasskey {
    pub id: Uuid,
    pub name: String,
}

#[derive(Clone)]
pub struct Passkeys {
    webauthn: Arc<Webauthn>,
    store: Store,
    ceremony_ttl: Duration,
    max_ceremonies_per_minute: u32,
}

/// Builds the relying party from the config; `public_url` is the only accepted origin.
pub fn build_webauthn(settings: &WebauthnSettings, config: &Config) -> Result<Webauthn, String> {
    WebauthnBuilder::new(&settings.rp_id, &config.public_url)
        .and_then(|b| b.rp_name(&settings.rp_name).build())
        .map_err(|e| format!("webauthn settings rejected: {e}"))
}

impl Passkeys {
    pub fn new(
        webauthn: Webauthn,
        store: Store,
        ceremony_ttl: Duration,
        max_ceremonies_per_minute: u32,
    ) -> Self {
        Self {
            webauthn: Arc::new(webauthn),
            store,
            ceremony_ttl,
            max_ceremonies_per_minute,
        }
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
        if started >= i64::from(self.max_ceremonies_per_minute) {
            return Err(GateError::TooManyCeremonies);
        }
        Ok(())
    }

    pub async fn list(&self, user: &UserId) -> Result<Vec<PasskeyRecord>, GateError> {
        Ok(self.store.passkeys_of(user.as_str()).await?)
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
        let (challenge, state) = self
            .webauthn
            .start_passkey_registration(handle, user.as_str(), user.as_str(), Some(exclude))
            .map_err(|e| GateError::Internal(format!("start registration: {e}")))?;
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

    pub async fn finish_registration(
        &self,
        user: &UserId,
        ceremony_id: Uuid,
        session_binding: &str,
        credential: &RegisterPublicKeyCredential,
        name: &str,
        now: OffsetDateTime,
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
        let state: PasskeyRegistration = serde_json::from_str(&ceremony.state_json)
            .map_err(|e| GateError::Internal(format!("registration state: {e}")))?;
        let passkey = self
            .webauthn
            .finish_passkey_registration(credential, &state)
            .map_err(|e| GateError::RegistrationFailed(e.to_string()))?;
        // Whether the credential may be synced to other devices (BE flag). Later policy uses it.
        let backup_eligible =
            webauthn_rs::prelude::Credential::from(passkey.clone()).backup_eligible;
        let record = PasskeyRecord {
            id: Uuid::new_v4(),
            user_id: user.as_str().to_string(),
            credential_id: base64url(passkey.cred_id().as_ref()),
            name,
            passkey,
            backup_eligible,
            created_at: now,
            last_used_at: None,
        };
        match self.store.insert_passkey(&record).await {
            Ok(()) => Ok(record),
            Err(StoreError::Duplicate) => Err(GateError::DuplicateCredential),
            Err(other) => Err(other.into()),
        }
    }

    /// Starts an assertion by one of `user`'s passkeys, bound to a change and its digest.
    pub async fn start_assertion(
        &self,
        user: &UserId,
        change_id: Uuid,
        change_digest: &str,
        session_binding: &str,
        now: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(Uuid, RequestChallengeResponse), GateError> {
        let passkeys = self.store.passkeys_of(user.as_str()).await?;
        if passkeys.is_empty() {
            return Err(GateError::NoPasskey);
        }
        self.check_ceremony_rate(user, now).await?;
        let credentials: Vec<_> = passkeys.into_iter().map(|p| p.passkey).collect();
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
        let state: PasskeyAuthentication = serde_json::from_str(&ceremony.state_json)
            .map_err(|e| GateError::Internal(format!("authentication state: {e}")))?;
        let result = self
            .webauthn
            .finish_passkey_authentication(credential, &state)
            .map_err(|e| match e {
                WebauthnError::UserNotVerified => GateError::UserNotVerified,
                other => GateError::AssertionInvalid(other.to_string()),
            })?;
        // webauthn-rs enforces this for passkeys already; a second look costs nothing.
        if !result.user_verified() {
            return Err(GateError::UserNotVerified);
        }
        // The credential must be one of this user's, as stored now (not only as listed when
        // the ceremony started).
        let mut passkeys = self.store.passkeys_of(user.as_str()).await?;
        let passkey = passkeys
            .iter_mut()
            .find(|p| p.passkey.cred_id() == result.cred_id())
            .ok_or_else(|| GateError::AssertionInvalid("not one of your passkeys".into()))?;
        passkey.passkey.update_credential(&result);
        self.store
            .record_passkey_use(passkey.id, &passkey.passkey, now)
            .await?;
        Ok((
            ceremony,
            VerifiedPasskey {
                id: passkey.id,
                name: passkey.name.clone(),
            },
        ))
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
        let expires_at = not_after.map_or(now + self.ceremony_ttl, |limit| {
            limit.min(now + self.ceremony_ttl)
        });
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
fn passkey_name(raw: &str) -> Result<String, GateError> {
    let name = sanitize_for_display(raw.trim());
    if name.is_empty() || name.chars().count() > 64 {
        return Err(GateError::BadRequest(
            "a passkey name must be 1 to 64 characters".into(),
        ));
    }
    Ok(name)
}
