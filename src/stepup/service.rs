//! The step-up services: hold a request, confirm it with a passkey, release it once, cancel
//! it. Each takes the caller's identity and reads `now` from the injected clock; every move
//! goes through the pure state machine and then a conditional update in the store.

use std::sync::Arc;
use std::time::Duration;

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
    release_lease: Duration,
    max_pending_per_user: u32,
}

impl StepUp {
    /// `release_lease` must outlast one forward (connect plus upstream timeout), so no other
    /// instance retries a forward that is still under way.
    pub fn new(
        store: Store,
        passkeys: Passkeys,
        clock: Arc<dyn Clock>,
        release_lease: Duration,
        max_pending_per_user: u32,
    ) -> Self {
        Self {
            store,
            passkeys,
            clock,
            release_lease,
            max_pending_per_user,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
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
        // Bounded per user, so a flood of protected requests cannot grow the store without
        // end. Approximate under concurrency (count, then insert), which is enough for that.
        let pending = self.store.pending_changes_of(user.as_str()).await?;
        if pending >= i64::from(self.max_pending_per_user) {
            return Err(GateError::TooManyPendingChanges {
                limit: self.max_pending_per_user,
            });
        }
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
            lease_until: None,
            release_attempts: 0,
            outcome_status: None,
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
        let change = self.owned(user, id).await?;
        // A deadline that passed wins over everything else: the change expires now.
        if change.lapsed(now) {
            self.expire(change, now).await?;
            return Err(GateError::Refused(Refusal::Expired));
        }
        // The ceremony is consumed before anything else is decided, so a used ceremony id is
        // always `ceremony_invalid`, whatever became of the change since.
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
        let now = self.now();
        let change = self.owned(user, id).await?;
        if change.digest != digest {
            return Err(GateError::ChangeMismatch);
        }
        let lease_until = now + self.release_lease;
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

    /// Background upkeep, safe to run on every instance at once: expires lapsed changes and
    /// removes dead ceremonies and sessions. Returns the ids it expired.
    pub async fn sweep(&self) -> Result<Vec<Uuid>, GateError> {
        let now = self.now();
        let mut expired = Vec::new();
        loop {
            let batch = self.store.expire_lapsed(now, 100).await?;
            let done = batch.len() < 100;
            expired.extend(batch);
            if done {
                break;
            }
        }
        self.store.delete_expired_ceremonies(now).await?;
        self.store.delete_expired_sessions(now).await?;
        Ok(expired)
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
        // Each retry follows a real move by someone else, and a change moves only a few times
        // in its life, so this loop is short.
        for _ in 0..5 {
            match transition(&change, event, now) {
                Ok(t) => {
                    if self.store.apply_transition(&change, &t).await? {
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
            self.store.apply_transition(&change, &t).await?;
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
