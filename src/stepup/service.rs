//! The step-up services: hold a request, confirm it with a passkey, release it once, cancel
//! it. Each takes the caller's identity and reads `now` from the injected clock; every move
//! goes through the pure state machine and then a conditional update in the store.

use std::sync::Arc;

use bytes::Bytes;
use time::OffsetDateTime;
use uuid::Uuid;
use webauthn_rs::prelude::{PublicKeyCredential, RequestChallengeResponse};

use super::digest::{request_digest, CanonicalRequest};
use super::state::{transition, Change, Event, Refusal, State};
use crate::clock::Clock;
use crate::error::GateError;
use crate::identity::UserId;
use crate::passkeys::Passkeys;
use crate::policy::Rule;
use crate::store::Store;

/// How many changes a list answer returns at most.
const LIST_LIMIT: i64 = 100;

/// A protected request as the gate will store and later compare it.
#[derive(Debug, Clone)]
pub struct HeldRequest {
    pub method: String,
    /// Canonical path.
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<Vec<u8>>,
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
            body: &self.body,
        })
    }
}

#[derive(Clone)]
pub struct StepUp {
    store: Store,
    passkeys: Passkeys,
    clock: Arc<dyn Clock>,
}

impl StepUp {
    pub fn new(store: Store, passkeys: Passkeys, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            passkeys,
            clock,
        }
    }

    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    pub fn passkeys(&self) -> &Passkeys {
        &self.passkeys
    }

    /// Stores a protected request as a held change. The upstream never sees it.
    pub async fn hold(
        &self,
        user: &UserId,
        rule: &Rule,
        params: &[(String, String)],
        request: HeldRequest,
    ) -> Result<Change, GateError> {
        let now = self.now();
        let change = Change {
            id: Uuid::new_v4(),
            user_id: user.as_str().to_string(),
            rule: rule.name.clone(),
            digest: request.digest(),
            method: request.method,
            path: request.path,
            query: request.query,
            headers: request.headers,
            body: request.body.to_vec(),
            summary: rule.summary_for(params),
            state: State::Held,
            cooling_off: rule.cooling_off,
            release_within: rule.release_within,
            created_at: now,
            confirm_before: now + rule.confirm_within,
            confirmed_at: None,
            release_at: None,
            release_before: None,
            finished_at: None,
        };
        self.store.insert_change(&change).await?;
        Ok(change)
    }

    /// One of the caller's changes, with a passed deadline turned into `expired` first.
    /// Another user's change is indistinguishable from a missing one.
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

    pub async fn start_confirm(
        &self,
        user: &UserId,
        id: Uuid,
        session_binding: &str,
    ) -> Result<(Uuid, RequestChallengeResponse), GateError> {
        let now = self.now();
        let change = self.confirmable(user, id, now).await?;
        self.passkeys
            .start_assertion(
                user,
                change.id,
                &change.digest,
                session_binding,
                now,
                change.confirm_before,
            )
            .await
    }

    /// Checks the passkey assertion and moves the change to `cooling_off`.
    pub async fn finish_confirm(
        &self,
        user: &UserId,
        id: Uuid,
        ceremony_id: Uuid,
        session_binding: &str,
        credential: &PublicKeyCredential,
    ) -> Result<Change, GateError> {
        let now = self.now();
        // Refuse before consuming the ceremony when the change cannot be confirmed anyway.
        let change = self.confirmable(user, id, now).await?;
        let (ceremony, _passkey) = self
            .passkeys
            .finish_assertion(user, ceremony_id, session_binding, credential, now)
            .await?;
        // The assertion must have been started for this very change and request.
        if ceremony.change_id != Some(change.id)
            || ceremony.change_digest.as_deref() != Some(change.digest.as_str())
        {
            return Err(GateError::CeremonyInvalid);
        }
        self.apply(change, Event::Confirm, now).await
    }

    /// Marks a due change `applied` if `digest` is the held request's. Exactly one caller
    /// wins; the caller then forwards the request once.
    pub async fn release(
        &self,
        user: &UserId,
        id: Uuid,
        digest: &str,
    ) -> Result<Change, GateError> {
        let now = self.now();
        let change = self.owned(user, id).await?;
        if change.digest != digest {
            return Err(GateError::ChangeMismatch);
        }
        self.apply(change, Event::Release, now).await
    }

    /// Cancels a pending change; cancelling a cancelled change answers the same again.
    pub async fn cancel(&self, user: &UserId, id: Uuid) -> Result<Change, GateError> {
        let now = self.now();
        let change = self.owned(user, id).await?;
        match self.apply(change, Event::Cancel, now).await {
            Err(GateError::Refused(Refusal::Cancelled)) => self.owned(user, id).await,
            other => other,
        }
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
        match transition(&change, Event::Confirm, now) {
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
        mut change: Change,
        event: Event,
        now: OffsetDateTime,
    ) -> Result<Change, GateError> {
        // Each retry follows a real move by someone else, and a change moves at most four
        // times in its life, so this loop is short.
        for _ in 0..5 {
            match transition(&change, event, now) {
                Ok(t) => {
                    if self.store.apply_transition(change.id, &t).await? {
                        change.state = t.to;
                        change.confirmed_at = t.confirmed_at.or(change.confirmed_at);
                        change.release_at = t.release_at.or(change.release_at);
                        change.release_before = t.release_before.or(change.release_before);
                        if !t.to.is_pending() {
                            change.finished_at = Some(now);
                        }
                        return Ok(change);
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
            self.store.apply_transition(change.id, &t).await?;
        }
        Ok(())
    }

    /// Shows a change as it stands now: a lapsed one becomes `expired` on read.
    async fn settle(&self, change: Change) -> Result<Change, GateError> {
        let now = self.now();
        if !change.lapsed(now) {
            return Ok(change);
        }
        let id = change.id;
        self.expire(change, now).await?;
        self.store.change(id).await?.ok_or(GateError::NotFound)
    }
}
