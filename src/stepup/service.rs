//! The step-up services: hold a request, confirm it with a passkey, release it once, cancel
//! it; and the gate's own protected changes to passkeys (adding one when the user already has
//! one, removing one). Each takes the caller's identity and reads `now` from the injected
//! clock; every move goes through the pure state machine and then a conditional update in the
//! store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use time::OffsetDateTime;
use uuid::Uuid;
use webauthn_rs::prelude::{
    PublicKeyCredential, RegisterPublicKeyCredential, RequestChallengeResponse,
};

use super::digest::{request_digest, CanonicalRequest};
use super::state::{transition, Change, Event, Refusal, State};
use crate::clock::Clock;
use crate::config::PasskeySettings;
use crate::error::GateError;
use crate::identity::UserId;
use crate::notify::Notifier;
use crate::passkeys::{CredentialPolicy, Passkeys};
use crate::policy::Rule;
use crate::store::{Effects, PasskeyRecord, PasskeyState, Store};

/// How many changes a list answer returns at most.
const LIST_LIMIT: i64 = 100;

/// The built-in change that activates an added passkey.
pub const ADD_PASSKEY: &str = "passkey-add";
/// The built-in change that removes a passkey.
pub const REMOVE_PASSKEY: &str = "passkey-remove";
/// The built-in change that lifts an emergency freeze.
pub const UNFREEZE: &str = "account-unfreeze";

/// Built-in changes are carried out by the gate itself when they complete; they are never
/// forwarded and no client release applies to them. Their release window is long so that
/// they are completed, not expired, however late the next look at them comes.
const BUILT_IN_RELEASE_WITHIN: Duration = Duration::from_secs(3650 * 24 * 3600);

pub fn is_built_in(rule: &str) -> bool {
    rule == ADD_PASSKEY || rule == REMOVE_PASSKEY || rule == UNFREEZE
}

/// A protected request as the gate will store and later compare it.
#[derive(Debug, Clone)]
pub struct HeldRequest {
    pub method: String,
    /// Canonical path.
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<Vec<u8>>,
    /// Headers that change how the upstream reads the request (coding, method overrides).
    pub reading_headers: Vec<(String, Vec<u8>)>,
    /// End-to-end headers worth keeping (no credentials).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl HeldRequest {
    pub fn digest(&self) -> String {
        request_digest(&CanonicalRequest {
            method: &self.method,
            path: &self.path,
            query: self.query.as_deref(),
            content_type: self.content_type.as_deref(),
            reading_headers: &self.reading_headers,
            body: &self.body,
        })
    }
}

/// What a finished registration led to.
pub enum Registration {
    /// The user's first passkey: usable at once, but quarantined.
    Active(PasskeyRecord),
    /// The user already had one: this one waits for its own confirmed, cooled-off change.
    Pending(PasskeyRecord, Box<Change>),
}

/// What a removal request led to.
pub enum Removal {
    /// An active passkey: removing it must be confirmed with a passkey (then it is immediate).
    NeedsConfirmation(Box<Change>),
    /// A pending passkey: it never became usable, so it is dropped at once.
    Dropped,
}

/// Limits and settings the services need.
#[derive(Debug, Clone)]
pub struct StepUpSettings {
    /// A forward owns a release this long; must outlast connect plus upstream timeout.
    pub release_lease: Duration,
    pub max_pending_per_user: u32,
    pub passkeys: PasskeySettings,
    /// Each rule's effective credential policy.
    pub rule_policies: HashMap<String, CredentialPolicy>,
}

#[derive(Clone)]
pub struct StepUp {
    store: Store,
    passkeys: Passkeys,
    notifier: Notifier,
    clock: Arc<dyn Clock>,
    settings: Arc<StepUpSettings>,
}

impl StepUp {
    pub fn new(
        store: Store,
        passkeys: Passkeys,
        notifier: Notifier,
        clock: Arc<dyn Clock>,
        settings: StepUpSettings,
    ) -> Self {
        Self {
            store,
            passkeys,
            notifier,
            clock,
            settings: Arc::new(settings),
        }
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// The audit row and event for a passkey (added, removed, disabled, dropped).
    fn passkey_effects(
        &self,
        kind: &str,
        passkey: &PasskeyRecord,
        notify: bool,
        code: Option<&str>,
    ) -> Effects {
        let detail = serde_json::json!({
            "passkey_id": passkey.id,
            "name": passkey.name,
            "backup_eligible": passkey.backup_eligible,
            "aaguid": passkey.aaguid,
        });
        self.notifier.effects(
            kind,
            &passkey.user_id,
            None,
            detail,
            notify,
            code,
            self.now(),
        )
    }

    /// Records a refusal with its reason in the audit log (not a user notification).
    async fn audit_refusal(&self, kind: &str, user: &UserId, change_id: Uuid, error: &GateError) {
        let (status, code) = error.status_and_code();
        if status.is_server_error() {
            return;
        }
        let detail = serde_json::json!({ "change_id": change_id, "reason": code });
        let effects =
            self.notifier
                .effects(kind, user.as_str(), None, detail, false, None, self.now());
        if let Err(failure) = self.store.append_effects(&effects, self.now()).await {
            tracing::error!(%failure, "could not record a refusal in the audit log");
        }
    }

    /// Records a request to a gate route that carried no valid identity.
    pub async fn audit_identity_failure(&self, reason: &str) {
        let detail = serde_json::json!({ "reason": reason });
        let effects = self.notifier.effects(
            "identity.refused",
            "",
            None,
            detail,
            false,
            None,
            self.now(),
        );
        if let Err(failure) = self.store.append_effects(&effects, self.now()).await {
            tracing::error!(%failure, "could not record an identity failure in the audit log");
        }
    }

    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    pub fn passkeys(&self) -> &Passkeys {
        &self.passkeys
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stores a protected request as a held change. The upstream never sees it.
    pub async fn hold(
        &self,
        user: &UserId,
        rule: &Rule,
        params: &[(String, String)],
        request: HeldRequest,
        anti_phishing_code: Option<&str>,
    ) -> Result<Change, GateError> {
        let now = self.now();
        self.refuse_if_frozen(user).await?;
        if let Some(code) = anti_phishing_code {
            self.store
                .set_anti_phishing_code(user.as_str(), code, now)
                .await?;
        }
        let change = new_change(
            user,
            &rule.name,
            rule.summary_for(params),
            &request,
            rule.cooling_off,
            rule.confirm_within,
            rule.release_within,
            now,
        );
        self.insert_held(change).await
    }

    /// Bounded per user, so a flood of protected requests cannot grow the store without end.
    /// Approximate under concurrency (count, then insert), which is enough for that.
    async fn insert_held(&self, change: Change) -> Result<Change, GateError> {
        let limit = self.settings.max_pending_per_user;
        let pending = self.store.pending_changes_of(&change.user_id).await?;
        if pending >= i64::from(limit) {
            return Err(GateError::TooManyPendingChanges { limit });
        }
        let code = self.store.anti_phishing_code(&change.user_id).await?;
        let effects = self
            .notifier
            .change_effects(&change, code.as_deref(), change.created_at);
        self.store.insert_change(&change, &effects).await?;
        Ok(change)
    }

    /// One of the caller's changes, settled: a passed deadline turns it `expired`, a due
    /// built-in change is carried out. Another user's change is indistinguishable from a
    /// missing one.
    pub async fn get(&self, user: &UserId, id: Uuid) -> Result<Change, GateError> {
        let change = self.owned(user, id).await?;
        self.settle(change).await
    }

    pub async fn list(&self, user: &UserId) -> Result<Vec<Change>, GateError> {
        let changes = self.store.changes_of(user.as_str(), LIST_LIMIT).await?;
        let mut settled = Vec::with_capacity(changes.len());
        for change in changes {
            settled.push(self.settle(change).await?);
        }
        Ok(settled)
    }

    /// The credential policy a change is confirmed under.
    fn policy_for(&self, change: &Change) -> &CredentialPolicy {
        self.settings
            .rule_policies
            .get(&change.rule)
            .unwrap_or(&self.settings.passkeys.policy)
    }

    pub async fn start_confirm(
        &self,
        user: &UserId,
        id: Uuid,
        session_binding: &str,
    ) -> Result<(Uuid, RequestChallengeResponse), GateError> {
        let now = self.now();
        self.settle_passkeys(user).await?;
        let change = self.confirmable(user, id, now).await?;
        // While frozen only the unfreeze itself can be confirmed.
        if change.rule != UNFREEZE {
            self.refuse_if_frozen(user).await?;
        }
        let policy = self.policy_for(&change);
        self.passkeys
            .start_assertion(
                user,
                change.id,
                &change.digest,
                session_binding,
                policy,
                now,
                change.confirm_before,
            )
            .await
    }

    /// Checks the passkey assertion and moves the change to `cooling_off`. A passkey still in
    /// quarantine may confirm, but then the release waits until the quarantine is over. A
    /// built-in change whose cooling-off is zero (removing a passkey) is carried out at once.
    pub async fn finish_confirm(
        &self,
        user: &UserId,
        id: Uuid,
        ceremony_id: Uuid,
        session_binding: &str,
        credential: &PublicKeyCredential,
    ) -> Result<Change, GateError> {
        let result = self
            .finish_confirm_inner(user, id, ceremony_id, session_binding, credential)
            .await;
        if let Err(error) = &result {
            self.audit_refusal("change.confirm_refused", user, id, error)
                .await;
        }
        result
    }

    async fn finish_confirm_inner(
        &self,
        user: &UserId,
        id: Uuid,
        ceremony_id: Uuid,
        session_binding: &str,
        credential: &PublicKeyCredential,
    ) -> Result<Change, GateError> {
        let now = self.now();
        let change = self.owned(user, id).await?;
        // A deadline that passed wins over everything else: the change expires now.
        if change.lapsed(now) {
            self.expire(change, now).await?;
            return Err(GateError::Refused(Refusal::Expired));
        }
        // The ceremony is consumed before anything else is decided, so a used ceremony id is
        // always `ceremony_invalid`, whatever became of the change since.
        let policy = self.policy_for(&change).clone();
        let (ceremony, passkey) = self
            .passkeys
            .finish_assertion(user, ceremony_id, session_binding, credential, &policy, now)
            .await?;
        // The assertion must have been started for this very change and request.
        if ceremony.change_id != Some(change.id)
            || ceremony.change_digest.as_deref() != Some(change.digest.as_str())
        {
            return Err(GateError::CeremonyInvalid);
        }
        // Quarantine protects loosening changes; the gate's own passkey changes have their
        // own cooling-off (adding) or must be immediate (removing).
        let not_before = (!is_built_in(&change.rule))
            .then(|| passkey.created_at + self.settings.passkeys.quarantine);
        let confirmed = self
            .apply(change, Event::Confirm { not_before }, now)
            .await?;
        self.settle(confirmed).await
    }

    /// Takes a due change for forwarding (`applying`, with a lease) if `digest` is the held
    /// request's. Exactly one caller wins; it forwards the request and then reports the
    /// outcome with [`StepUp::record_outcome`]. A change left `applying` by a crashed instance
    /// can be taken again once its lease has run out.
    pub async fn release(
        &self,
        user: &UserId,
        id: Uuid,
        digest: &str,
    ) -> Result<Change, GateError> {
        let result = self.release_inner(user, id, digest).await;
        if let Err(error) = &result {
            self.audit_refusal("change.release_refused", user, id, error)
                .await;
        }
        result
    }

    async fn release_inner(
        &self,
        user: &UserId,
        id: Uuid,
        digest: &str,
    ) -> Result<Change, GateError> {
        let now = self.now();
        self.refuse_if_frozen(user).await?;
        let change = self.owned(user, id).await?;
        // The gate's own changes are never forwarded (their digest names no real request).
        if change.digest != digest || is_built_in(&change.rule) {
            return Err(GateError::ChangeMismatch);
        }
        let lease_until = now + self.settings.release_lease;
        self.apply(change, Event::Release { lease_until }, now)
            .await
    }

    /// Records what became of a forward: `Delivered` makes the change `applied`,
    /// `Undelivered` gives the lease back so the client can retry at once.
    pub async fn record_outcome(
        &self,
        change: Change,
        outcome: Event,
    ) -> Result<Change, GateError> {
        let now = self.now();
        self.apply(change, outcome, now).await
    }

    /// Takes a due change of a `release = "auto"` rule for the auto-release worker, by the
    /// same conditional move to `applying` (with a lease) that a client release makes: of all
    /// instances' workers and any client release, exactly one wins; the others get the
    /// refusal (`Applying`, `AlreadyApplied`, ...). The gate's own changes are never forwarded.
    pub async fn take_for_auto_release(&self, change: Change) -> Result<Change, GateError> {
        let now = self.now();
        if is_built_in(&change.rule) {
            return Err(GateError::ChangeMismatch);
        }
        // Freezing cancels pending changes; this covers a freeze racing the worker.
        let user = UserId::parse(&change.user_id).map_err(|_| GateError::NotFound)?;
        self.refuse_if_frozen(&user).await?;
        let lease_until = now + self.settings.release_lease;
        self.apply(change, Event::Release { lease_until }, now)
            .await
    }

    /// Records an auto-release's outcome through the same transitions as a client release,
    /// but tells the user in words of its own, since no client is there to show the answer:
    /// `change.auto_released` when the exchange answered 2xx, `change.auto_release_failed`
    /// when it answered anything else (the change is still `applied`: the exchange decided).
    pub async fn record_auto_outcome(
        &self,
        change: Change,
        outcome: Event,
    ) -> Result<Change, GateError> {
        let now = self.now();
        let code = self.store.anti_phishing_code(&change.user_id).await?;
        let effects_of = |moved: &Change| match (outcome, moved.state) {
            (Event::Delivered { status }, State::Applied) => {
                let kind = if (200..300).contains(&status) {
                    "change.auto_released"
                } else {
                    "change.auto_release_failed"
                };
                self.notifier
                    .change_event_effects(kind, true, moved, code.as_deref(), now)
            }
            _ => self.notifier.change_effects(moved, code.as_deref(), now),
        };
        self.apply_with(change, outcome, now, &effects_of).await
    }

    /// The change a one-click cancel link names, if its token is valid and unexpired. An
    /// invalid token is indistinguishable from an unknown change.
    pub async fn change_by_cancel_token(&self, id: Uuid, token: &str) -> Result<Change, GateError> {
        if !self.notifier.check_cancel_token(id, token, self.now()) {
            return Err(GateError::NotFound);
        }
        let change = self.store.change(id).await?.ok_or(GateError::NotFound)?;
        self.settle(change).await
    }

    /// Cancels the change a one-click cancel link names: the token is the authorisation.
    pub async fn cancel_by_token(&self, id: Uuid, token: &str) -> Result<Change, GateError> {
        let change = self.change_by_cancel_token(id, token).await?;
        let user = UserId::parse(&change.user_id).map_err(|_| GateError::NotFound)?;
        self.cancel(&user, id).await
    }

    /// Cancels a pending change; cancelling a cancelled change answers the same again.
    /// Cancelling the addition of a passkey drops that passkey.
    pub async fn cancel(&self, user: &UserId, id: Uuid) -> Result<Change, GateError> {
        let now = self.now();
        let change = self.owned(user, id).await?;
        let cancelled = match self.apply(change, Event::Cancel, now).await {
            Err(GateError::Refused(Refusal::Cancelled)) => self.owned(user, id).await?,
            other => other?,
        };
        if cancelled.rule == ADD_PASSKEY {
            self.settle_passkeys(user).await?;
        }
        Ok(cancelled)
    }

    /// Background upkeep, safe to run on every instance at once: expires lapsed changes,
    /// activates added passkeys whose cooling-off is over, removes dead ceremonies and
    /// sessions. Returns the ids it expired.
    pub async fn sweep(&self) -> Result<Vec<Uuid>, GateError> {
        let now = self.now();
        let codes = self.store.codes_of_users_with_lapsed_changes(now).await?;
        let effects_of = |change: &Change| {
            let code = codes.get(&change.user_id).map(String::as_str);
            self.notifier.change_effects(change, code, now)
        };
        let mut expired = Vec::new();
        loop {
            let batch = self.store.expire_lapsed(now, 100, &effects_of).await?;
            let done = batch.len() < 100;
            expired.extend(batch);
            if done {
                break;
            }
        }
        for user in self.store.users_with_pending_passkeys(100).await? {
            if let Ok(user) = UserId::parse(&user) {
                self.settle_passkeys(&user).await?;
            }
        }
        self.store.delete_expired_ceremonies(now).await?;
        self.store
            .delete_expired_sessions(crate::clock::wall_now())
            .await?;
        Ok(expired)
    }

    // -- freeze ---------------------------------------------------------------------------

    async fn refuse_if_frozen(&self, user: &UserId) -> Result<(), GateError> {
        if self.store.frozen_at(user.as_str()).await?.is_some() {
            return Err(GateError::AccountFrozen);
        }
        Ok(())
    }

    /// Whether the user is frozen now (settling a due unfreeze first).
    pub async fn frozen_at(&self, user: &UserId) -> Result<Option<OffsetDateTime>, GateError> {
        self.list(user).await?;
        Ok(self.store.frozen_at(user.as_str()).await?)
    }

    /// Emergency freeze, by the user (no passkey: stopping must be easy) or the exchange:
    /// every held or cooling-off change is cancelled at once and new protected requests are
    /// refused until an unfreeze has been confirmed and cooled off. Returns what it cancelled.
    pub async fn freeze(&self, user: &UserId) -> Result<Vec<Uuid>, GateError> {
        let now = self.now();
        let code = self.store.anti_phishing_code(user.as_str()).await?;
        let effects = self.notifier.effects(
            "account.frozen",
            user.as_str(),
            None,
            serde_json::json!({}),
            true,
            code.as_deref(),
            now,
        );
        // Freeze first, so nothing new can be held while the pending ones are cancelled.
        self.store
            .set_frozen(user.as_str(), true, now, &effects)
            .await?;
        let mut cancelled = Vec::new();
        for change in self.store.changes_of(user.as_str(), i64::MAX).await? {
            if change.state.is_pending() && change.rule != UNFREEZE {
                let id = change.id;
                if self.apply(change, Event::Cancel, now).await.is_ok() {
                    cancelled.push(id);
                }
            }
        }
        self.settle_passkeys(user).await?;
        Ok(cancelled)
    }

    /// Starts lifting a freeze: loosening, so it is a protected change of its own that the
    /// user confirms with a passkey and that then cools off. The exchange can start it, but
    /// only the user can confirm it.
    pub async fn request_unfreeze(&self, user: &UserId) -> Result<Change, GateError> {
        let now = self.now();
        if self.frozen_at(user).await?.is_none() {
            return Err(GateError::BadRequest("this account is not frozen".into()));
        }
        let pending = self
            .store
            .changes_of(user.as_str(), i64::MAX)
            .await?
            .into_iter()
            .find(|c| c.rule == UNFREEZE && c.state.is_pending());
        if let Some(existing) = pending {
            return Ok(existing);
        }
        let summary = "Unfreeze your account so sensitive changes are possible again".to_string();
        let cooling_off = self.settings.passkeys.unfreeze_cooling_off;
        let body = serde_json::json!({ "unfreeze": user.as_str() });
        self.hold_built_in(
            user,
            UNFREEZE,
            summary,
            "/_stepgate/account/unfreeze".into(),
            body,
            cooling_off,
            now,
        )
        .await
    }

    /// Passkey registration is refused while frozen: a frozen account gains no new keys.
    pub async fn start_registration(
        &self,
        user: &UserId,
        session_binding: &str,
    ) -> Result<(Uuid, webauthn_rs::prelude::CreationChallengeResponse), GateError> {
        self.refuse_if_frozen(user).await?;
        self.passkeys
            .start_registration(user, session_binding, self.now())
            .await
    }

    // -- passkeys -------------------------------------------------------------------------

    /// The user's passkeys, with added ones activated or dropped as their changes decided.
    pub async fn list_passkeys(&self, user: &UserId) -> Result<Vec<PasskeyRecord>, GateError> {
        self.settle_passkeys(user).await?;
        self.passkeys.list(user).await
    }

    /// Finishes a registration. The user's first passkey is active at once (and quarantined);
    /// any further passkey is a protected change of its own: it must be confirmed with an
    /// existing passkey and then cool off before it can be used.
    pub async fn register_passkey(
        &self,
        user: &UserId,
        ceremony_id: Uuid,
        session_binding: &str,
        credential: &RegisterPublicKeyCredential,
        name: &str,
    ) -> Result<Registration, GateError> {
        let now = self.now();
        let existing = self.list_passkeys(user).await?;
        let has_active = existing.iter().any(|p| p.state == PasskeyState::Active);
        let state = if has_active {
            PasskeyState::Pending
        } else {
            PasskeyState::Active
        };
        let code = self.store.anti_phishing_code(user.as_str()).await?;
        // A first passkey is added now (users are told); a further one only when it activates.
        let effects_of = |passkey: &PasskeyRecord| match passkey.state {
            PasskeyState::Active => {
                self.passkey_effects("passkey.added", passkey, true, code.as_deref())
            }
            _ => self.passkey_effects("passkey.registered", passkey, false, None),
        };
        let mut passkey = self
            .passkeys
            .finish_registration(
                user,
                ceremony_id,
                session_binding,
                credential,
                name,
                state,
                now,
                &effects_of,
            )
            .await?;
        if !has_active {
            return Ok(Registration::Active(passkey));
        }
        let summary = format!(
            "Add a new passkey \u{201c}{}\u{201d} to your account",
            passkey.name
        );
        let (path, body) = passkey_subject(&passkey, "add");
        let cooling_off = self.settings.passkeys.add_cooling_off;
        let change = self
            .hold_built_in(user, ADD_PASSKEY, summary, path, body, cooling_off, now)
            .await;
        let change = match change {
            Ok(change) => change,
            Err(error) => {
                // Without its change the passkey could never activate: do not keep it.
                let effects = self.passkey_effects("passkey.dropped", &passkey, false, None);
                self.store
                    .delete_passkey(user.as_str(), passkey.id, &effects, now)
                    .await?;
                return Err(error);
            }
        };
        self.store
            .set_activation_change(passkey.id, change.id)
            .await?;
        passkey.activation_change_id = Some(change.id);
        Ok(Registration::Pending(passkey, Box::new(change)))
    }

    pub async fn rename_passkey(
        &self,
        user: &UserId,
        passkey_id: Uuid,
        name: &str,
    ) -> Result<String, GateError> {
        let name = crate::passkeys::passkey_name(name)?;
        if !self
            .store
            .rename_passkey(user.as_str(), passkey_id, &name)
            .await?
        {
            return Err(GateError::NotFound);
        }
        Ok(name)
    }

    /// Starts removing a passkey. Removal is tightening, so once confirmed it is immediate;
    /// the confirmation keeps someone holding only the session from deleting the user's keys.
    pub async fn request_passkey_removal(
        &self,
        user: &UserId,
        passkey_id: Uuid,
    ) -> Result<Removal, GateError> {
        let now = self.now();
        let passkeys = self.list_passkeys(user).await?;
        let passkey = passkeys
            .into_iter()
            .find(|p| p.id == passkey_id)
            .ok_or(GateError::NotFound)?;
        if passkey.state == PasskeyState::Pending {
            if let Some(change_id) = passkey.activation_change_id {
                let change = self.owned(user, change_id).await?;
                let _ = self.apply(change, Event::Cancel, now).await;
            }
            let effects = self.passkey_effects("passkey.dropped", &passkey, false, None);
            self.store
                .delete_passkey(user.as_str(), passkey.id, &effects, now)
                .await?;
            return Ok(Removal::Dropped);
        }
        let summary = format!(
            "Remove the passkey \u{201c}{}\u{201d} from your account",
            passkey.name
        );
        let (path, body) = passkey_subject(&passkey, "remove");
        let change = self
            .hold_built_in(
                user,
                REMOVE_PASSKEY,
                summary,
                path,
                body,
                Duration::ZERO,
                now,
            )
            .await?;
        Ok(Removal::NeedsConfirmation(Box::new(change)))
    }

    #[allow(clippy::too_many_arguments)]
    async fn hold_built_in(
        &self,
        user: &UserId,
        rule: &str,
        summary: String,
        path: String,
        body: serde_json::Value,
        cooling_off: Duration,
        now: OffsetDateTime,
    ) -> Result<Change, GateError> {
        let request = HeldRequest {
            method: "POST".into(),
            path,
            query: None,
            content_type: Some(b"application/json".to_vec()),
            reading_headers: Vec::new(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body.to_string()),
        };
        let change = new_change(
            user,
            rule,
            summary,
            &request,
            cooling_off,
            self.settings.passkeys.confirm_within,
            BUILT_IN_RELEASE_WITHIN,
            now,
        );
        self.insert_held(change).await
    }

    /// Brings the user's pending passkeys up to date with their changes: activated once the
    /// change is done, dropped when it was cancelled or expired. Safe to repeat and to run on
    /// several instances: every step is conditional.
    async fn settle_passkeys(&self, user: &UserId) -> Result<(), GateError> {
        let now = self.now();
        let code = self.store.anti_phishing_code(user.as_str()).await?;
        for passkey in self.store.passkeys_of(user.as_str()).await? {
            if passkey.state != PasskeyState::Pending {
                continue;
            }
            let change = match passkey.activation_change_id {
                Some(id) => self.store.change(id).await?,
                None => None,
            };
            let Some(change) = change else {
                // A pending passkey without its change can never activate.
                let effects = self.passkey_effects("passkey.dropped", &passkey, false, None);
                self.store
                    .delete_passkey(user.as_str(), passkey.id, &effects, now)
                    .await?;
                continue;
            };
            let change = self.complete_if_due(change, now).await?;
            match change.state {
                // Normally completing the change activated it; this covers a crash in between.
                State::Applied => self.activate(&passkey, code.as_deref(), now).await?,
                State::Cancelled | State::Expired => {
                    let effects = self.passkey_effects("passkey.dropped", &passkey, false, None);
                    self.store
                        .delete_passkey(user.as_str(), passkey.id, &effects, now)
                        .await?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Completes a built-in change whose cooling-off is over and carries out its effect.
    async fn complete_if_due(
        &self,
        change: Change,
        now: OffsetDateTime,
    ) -> Result<Change, GateError> {
        if !is_built_in(&change.rule) || change.state != State::CoolingOff {
            return Ok(change);
        }
        if !matches!(change.release_at, Some(at) if now >= at) {
            return Ok(change);
        }
        let code = self.store.anti_phishing_code(&change.user_id).await?;
        if change.rule == REMOVE_PASSKEY {
            // Tightening first: the passkey is gone even if the bookkeeping below fails.
            if let Some(passkey) = self.built_in_passkey(&change).await? {
                let effects =
                    self.passkey_effects("passkey.removed", &passkey, true, code.as_deref());
                self.store
                    .delete_passkey(&change.user_id, passkey.id, &effects, now)
                    .await?;
            }
        }
        let completed = match self.apply(change.clone(), Event::Complete, now).await {
            Ok(completed) => completed,
            // Someone else completed or cancelled it meanwhile: report what it is now.
            Err(GateError::Refused(_)) => self
                .store
                .change(change.id)
                .await?
                .ok_or(GateError::NotFound)?,
            Err(other) => return Err(other),
        };
        if completed.rule == UNFREEZE && completed.state == State::Applied {
            let effects = self.notifier.effects(
                "account.unfrozen",
                &completed.user_id,
                Some(&completed),
                serde_json::json!({}),
                true,
                code.as_deref(),
                now,
            );
            self.store
                .set_frozen(&completed.user_id, false, now, &effects)
                .await?;
        }
        if completed.rule == ADD_PASSKEY && completed.state == State::Applied {
            if let Some(passkey) = self.built_in_passkey(&completed).await? {
                self.activate(&passkey, code.as_deref(), now).await?;
            }
        }
        Ok(completed)
    }

    // -- shared ---------------------------------------------------------------------------

    /// Makes a pending passkey active (a no-op if it is not pending any more).
    async fn activate(
        &self,
        passkey: &PasskeyRecord,
        code: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(), GateError> {
        let effects = self.passkey_effects("passkey.added", passkey, true, code);
        self.store
            .set_passkey_state(
                passkey.id,
                PasskeyState::Pending,
                PasskeyState::Active,
                now,
                &effects,
            )
            .await?;
        Ok(())
    }

    /// The passkey a built-in change is about, if it still exists.
    async fn built_in_passkey(&self, change: &Change) -> Result<Option<PasskeyRecord>, GateError> {
        let Some(passkey_id) = built_in_passkey_id(change) else {
            return Ok(None);
        };
        let passkeys = self.store.passkeys_of(&change.user_id).await?;
        Ok(passkeys.into_iter().find(|p| p.id == passkey_id))
    }

    async fn owned(&self, user: &UserId, id: Uuid) -> Result<Change, GateError> {
        match self.store.change(id).await? {
            Some(change) if change.user_id == user.as_str() => Ok(change),
            _ => Err(GateError::NotFound),
        }
    }

    /// The caller's change, if a confirmation could move it now.
    async fn confirmable(
        &self,
        user: &UserId,
        id: Uuid,
        now: OffsetDateTime,
    ) -> Result<Change, GateError> {
        let change = self.owned(user, id).await?;
        match transition(&change, Event::Confirm { not_before: None }, now) {
            Ok(_) => Ok(change),
            Err(Refusal::Lapsed) => {
                self.expire(change, now).await?;
                Err(GateError::Refused(Refusal::Expired))
            }
            Err(refusal) => Err(GateError::Refused(refusal)),
        }
    }

    /// Applies `event` with a conditional update. When another caller moved the change first,
    /// re-reads it and decides again, so the answer reflects what actually happened.
    async fn apply(
        &self,
        change: Change,
        event: Event,
        now: OffsetDateTime,
    ) -> Result<Change, GateError> {
        let code = self.store.anti_phishing_code(&change.user_id).await?;
        let effects_of = |moved: &Change| self.notifier.change_effects(moved, code.as_deref(), now);
        self.apply_with(change, event, now, &effects_of).await
    }

    /// [`StepUp::apply`] with the move's audit rows and events chosen by `effects_of`.
    async fn apply_with(
        &self,
        mut change: Change,
        event: Event,
        now: OffsetDateTime,
        effects_of: &(dyn Fn(&Change) -> Effects + Sync),
    ) -> Result<Change, GateError> {
        // Each retry follows a real move by someone else, and a change moves only a few times
        // in its life, so this loop is short.
        for _ in 0..5 {
            match transition(&change, event, now) {
                Ok(t) => {
                    if self.store.apply_transition(&change, &t, effects_of).await? {
                        return Ok(change.after(&t));
                    }
                }
                Err(Refusal::Lapsed) => {
                    self.expire(change, now).await?;
                    return Err(GateError::Refused(Refusal::Expired));
                }
                Err(refusal) => return Err(GateError::Refused(refusal)),
            }
            change = self
                .store
                .change(change.id)
                .await?
                .ok_or(GateError::NotFound)?;
        }
        Err(GateError::Internal(
            "the change kept moving under us".into(),
        ))
    }

    /// Moves a change whose deadline has passed to `expired` (no-op if someone else did).
    async fn expire(&self, change: Change, now: OffsetDateTime) -> Result<(), GateError> {
        if let Ok(t) = transition(&change, Event::Expire, now) {
            let code = self.store.anti_phishing_code(&change.user_id).await?;
            let effects_of =
                |moved: &Change| self.notifier.change_effects(moved, code.as_deref(), now);
            self.store
                .apply_transition(&change, &t, &effects_of)
                .await?;
        }
        Ok(())
    }

    /// Shows a change as it stands now: a lapsed one becomes `expired`, a due built-in one
    /// is carried out.
    async fn settle(&self, change: Change) -> Result<Change, GateError> {
        let now = self.now();
        if change.lapsed(now) {
            let id = change.id;
            self.expire(change, now).await?;
            return self.store.change(id).await?.ok_or(GateError::NotFound);
        }
        self.complete_if_due(change, now).await
    }
}

/// The synthetic target and body that identify a built-in passkey change (never forwarded).
fn passkey_subject(passkey: &PasskeyRecord, verb: &str) -> (String, serde_json::Value) {
    (
        format!("/_stepgate/passkeys/{}/{verb}", passkey.id),
        serde_json::json!({ "passkey_id": passkey.id, "name": passkey.name }),
    )
}

/// The passkey a built-in change is about (stored in its body when it was created).
fn built_in_passkey_id(change: &Change) -> Option<Uuid> {
    let body: serde_json::Value = serde_json::from_slice(&change.body).ok()?;
    Uuid::parse_str(body.get("passkey_id")?.as_str()?).ok()
}

#[allow(clippy::too_many_arguments)]
fn new_change(
    user: &UserId,
    rule: &str,
    summary: String,
    request: &HeldRequest,
    cooling_off: Duration,
    confirm_within: Duration,
    release_within: Duration,
    now: OffsetDateTime,
) -> Change {
    Change {
        id: Uuid::new_v4(),
        user_id: user.as_str().to_string(),
        rule: rule.to_string(),
        digest: request.digest(),
        method: request.method.clone(),
        path: request.path.clone(),
        query: request.query.clone(),
        headers: request.headers.clone(),
        body: request.body.to_vec(),
        summary,
        state: State::Held,
        cooling_off,
        release_within,
        created_at: now,
        confirm_before: now + confirm_within,
        confirmed_at: None,
        release_at: None,
        release_before: None,
        finished_at: None,
        lease_until: None,
        release_attempts: 0,
        outcome_status: None,
        quarantined_until: None,
    }
}
