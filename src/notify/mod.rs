//! Out-of-band notifications. Each event becomes one outbox row per configured webhook, written
//! in the same transaction as the state change that caused it; a background sender on every
//! instance delivers due rows (a lease keeps two instances off the same row), signs each body,
//! retries with exponential backoff and jitter, and dead-letters what keeps failing. This
//! module also makes and checks the signed one-click cancel links the events carry.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hmac::{Hmac, Mac};
use http::{header, HeaderValue, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use serde_json::{json, Value};
use sha2::Sha256;
use time::OffsetDateTime;
use url::Url;
use uuid::Uuid;

use crate::clock::{rfc3339, Clock};
use crate::stepup::Change;
use crate::store::{AuditEntry, Effects, OutboxItem, Store, StoreError};

/// The `[notifications]` settings.
#[derive(Clone, Default)]
pub struct NotifySettings {
    pub webhooks: Vec<Url>,
    /// Signs webhook bodies and (through a derived key) one-click cancel links.
    pub signing_secret: Option<Vec<u8>>,
    pub max_attempts: u32,
    pub retry_base: Duration,
    /// The header in which the exchange passes the user's anti-phishing code.
    pub anti_phishing_header: Option<http::HeaderName>,
    /// Or the claim of its session JWT that carries the code (jwt identity mode).
    pub anti_phishing_claim: Option<String>,
}

impl std::fmt::Debug for NotifySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifySettings")
            .field("webhooks", &self.webhooks)
            .field("signed", &self.signing_secret.is_some())
            .field("max_attempts", &self.max_attempts)
            .field("retry_base", &self.retry_base)
            .field("anti_phishing_header", &self.anti_phishing_header)
            .finish()
    }
}

/// Builds outbox rows and cancel links, and delivers webhooks.
#[derive(Clone)]
pub struct Notifier {
    settings: Arc<NotifySettings>,
    public_origin: String,
    client: Client<HttpConnector, Body>,
}

/// The signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "stepgate-signature";

/// Signs a webhook body at `timestamp` (unix seconds).
pub fn sign_webhook(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mac = hmac_sha256(secret, &[timestamp.to_string().as_bytes(), b".", body]);
    format!("t={timestamp},v1={}", hex(&mac))
}

/// HMAC-SHA256 over the concatenated parts. (HMAC takes keys of any length; the error arm of
/// the library's constructor cannot happen and yields an empty MAC that matches nothing.)
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return Vec::new();
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Notifier {
    pub fn new(settings: NotifySettings, public_origin: String) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Self {
            settings: Arc::new(settings),
            public_origin,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    pub fn settings(&self) -> &NotifySettings {
        &self.settings
    }

    /// The key for cancel links, derived from the signing secret so a leaked link key would
    /// not sign webhooks and vice versa.
    fn cancel_key(&self) -> Option<Vec<u8>> {
        let secret = self.settings.signing_secret.as_ref()?;
        Some(hmac_sha256(
            secret,
            &[b"stepgate one-click cancel links v1"],
        ))
    }

    fn cancel_mac(&self, key: &[u8], change_id: Uuid, expires: i64) -> String {
        hex(&hmac_sha256(
            key,
            &[format!("cancel:{change_id}:{expires}").as_bytes()],
        ))
    }

    /// A link that can cancel this one change, and nothing else, until the change can no
    /// longer be cancelled. `None` without a signing secret.
    pub fn cancel_url(&self, change: &Change) -> Option<String> {
        let key = self.cancel_key()?;
        let until = change.release_before.unwrap_or(change.confirm_before);
        let expires = until.unix_timestamp();
        let token = format!("{expires}.{}", self.cancel_mac(&key, change.id, expires));
        Some(format!(
            "{}/_stepgate/cancel/{}?token={token}",
            self.public_origin, change.id
        ))
    }

    /// Whether `token` is a valid, unexpired cancel token for `change_id`.
    pub fn check_cancel_token(&self, change_id: Uuid, token: &str, now: OffsetDateTime) -> bool {
        let Some(key) = self.cancel_key() else {
            return false;
        };
        let Some((expires, mac)) = token.split_once('.') else {
            return false;
        };
        let Ok(expires) = expires.parse::<i64>() else {
            return false;
        };
        if now.unix_timestamp() > expires {
            return false;
        }
        let expected = self.cancel_mac(&key, change_id, expires);
        // Constant-time comparison of the two hex strings.
        expected.len() == mac.len()
            && expected
                .bytes()
                .zip(mac.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// The audit row for an event, plus its webhook deliveries when it is one users are told
    /// about (`notify`).
    #[allow(clippy::too_many_arguments)]
    pub fn effects(
        &self,
        kind: &str,
        user_id: &str,
        change: Option<&Change>,
        detail: Value,
        notify: bool,
        anti_phishing_code: Option<&str>,
        now: OffsetDateTime,
    ) -> Effects {
        let outbox = if notify {
            self.outbox_items(kind, user_id, change, anti_phishing_code, now)
        } else {
            Vec::new()
        };
        Effects {
            audit: vec![AuditEntry {
                user_id: user_id.to_string(),
                kind: kind.to_string(),
                change_id: change.map(|c| c.id),
                detail,
            }],
            outbox,
        }
    }

    /// The audit row and event recording that `change` is now in its state.
    pub fn change_effects(
        &self,
        change: &Change,
        anti_phishing_code: Option<&str>,
        now: OffsetDateTime,
    ) -> Effects {
        use crate::stepup::State;
        let (kind, notify) = match change.state {
            State::Held => ("change.held", true),
            State::CoolingOff => ("change.confirmed", true),
            // Taking a release is recorded; users hear about the outcome.
            State::Applying => ("change.releasing", false),
            State::Applied => ("change.applied", true),
            State::Cancelled => ("change.cancelled", true),
            State::Expired => ("change.expired", true),
        };
        self.change_event_effects(kind, notify, change, anti_phishing_code, now)
    }

    /// The audit row, and when `notify` the event, `kind` about `change` as it is now.
    pub fn change_event_effects(
        &self,
        kind: &str,
        notify: bool,
        change: &Change,
        anti_phishing_code: Option<&str>,
        now: OffsetDateTime,
    ) -> Effects {
        let detail = json!({
            "rule": change.rule,
            "summary": change.summary,
            "state": change.state.as_str(),
            "release_at": change.release_at.map(rfc3339),
            "quarantined_until": change.quarantined_until.map(rfc3339),
            "release_attempts": change.release_attempts,
            "upstream_status": change.outcome_status,
        });
        self.effects(
            kind,
            &change.user_id,
            Some(change),
            detail,
            notify,
            anti_phishing_code,
            now,
        )
    }

    /// The outbox rows for one event: one per webhook, all with the same event id.
    pub fn outbox_items(
        &self,
        event: &str,
        user_id: &str,
        change: Option<&Change>,
        anti_phishing_code: Option<&str>,
        now: OffsetDateTime,
    ) -> Vec<OutboxItem> {
        if self.settings.webhooks.is_empty() {
            return Vec::new();
        }
        let event_id = Uuid::new_v4();
        let mut payload = json!({
            "event": event,
            "event_id": event_id,
            "occurred_at": rfc3339(now),
            "user_id": user_id,
        });
        if let Some(change) = change {
            payload["change"] = json!({
                "id": change.id,
                "summary": change.summary,
                "state": change.state.as_str(),
                "release_at": change.release_at.map(rfc3339),
            });
            // What the exchange answered, once it has (applied changes).
            if let Some(status) = change.outcome_status {
                payload["change"]["upstream_status"] = json!(status);
            }
            if change.state.is_pending() {
                if let Some(url) = self.cancel_url(change) {
                    payload["cancel_url"] = Value::String(url);
                }
            }
        }
        if let Some(code) = anti_phishing_code {
            payload["anti_phishing_code"] = Value::String(code.to_string());
        }
        let payload = payload.to_string();
        self.settings
            .webhooks
            .iter()
            .map(|url| OutboxItem {
                event_id,
                event: event.to_string(),
                webhook_url: url.to_string(),
                payload: payload.clone(),
            })
            .collect()
    }

    /// Delivers what is due: claims rows under a lease, POSTs them, records each outcome.
    /// Returns how many were delivered. Every instance may run this at once.
    pub async fn deliver_due(&self, store: &Store, clock: &dyn Clock) -> Result<usize, StoreError> {
        let Some(secret) = self.settings.signing_secret.as_ref() else {
            return Ok(0);
        };
        let now = clock.now();
        let lease = Duration::from_secs(60);
        let due = store.claim_outbox(now, now + lease, 20).await?;
        let mut delivered = 0;
        for row in due {
            let outcome = self.post(&row.webhook_url, &row.payload, secret, now).await;
            let now = clock.now();
            match outcome {
                Ok(()) => {
                    store.outbox_delivered(&row.id, now).await?;
                    delivered += 1;
                }
                Err(error) => {
                    let attempts = row.attempts + 1;
                    if attempts >= i64::from(self.settings.max_attempts) {
                        tracing::warn!(row = %row.id, %error, "webhook dead-lettered");
                        store.outbox_dead(&row.id, attempts, &error).await?;
                    } else {
                        let next = now + self.backoff(attempts);
                        store.outbox_retry(&row.id, attempts, next, &error).await?;
                    }
                }
            }
        }
        Ok(delivered)
    }

    /// Exponential backoff from `retry_base`, capped at an hour, with ±20 % jitter so many
    /// failed deliveries do not retry in lockstep.
    fn backoff(&self, attempts: i64) -> Duration {
        let exponent = u32::try_from(attempts.saturating_sub(1))
            .unwrap_or(0)
            .min(16);
        let base = self
            .settings
            .retry_base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(Duration::from_secs(3600));
        let jitter = rand::thread_rng().gen_range(0.8..1.2);
        base.mul_f64(jitter)
    }

    async fn post(
        &self,
        url: &str,
        payload: &str,
        secret: &[u8],
        now: OffsetDateTime,
    ) -> Result<(), String> {
        let signature = sign_webhook(secret, now.unix_timestamp(), payload.as_bytes());
        let request = Request::post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                SIGNATURE_HEADER,
                HeaderValue::from_str(&signature).map_err(|e| e.to_string())?,
            )
            .body(Body::from(payload.to_string()))
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .map_err(|_| "the webhook did not answer within 10 s".to_string())?
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("the webhook answered {}", response.status()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_cover_timestamp_and_body() {
        let a = sign_webhook(b"secret", 100, b"{}");
        assert!(a.starts_with("t=100,v1="));
        assert_ne!(a, sign_webhook(b"secret", 101, b"{}"));
        assert_ne!(a, sign_webhook(b"secret", 100, b"{ }"));
        assert_ne!(a, sign_webhook(b"other", 100, b"{}"));
    }
}
