//! The auto-release worker, for rules with `release = "auto"`: every instance looks for due
//! changes every `auto_release_interval` and forwards each one's stored request itself, for
//! exchanges whose clients cannot repeat a request. Exactly once across instances, because a
//! change is taken by the same conditional move to `applying` a client release makes; forwarded
//! with the same `Idempotency-Key` and `Stepgate-Approval`; its outcome recorded by the same
//! transitions (an unknown outcome leaves the lease to run out, and the next round forwards it
//! again with the same key). The user hears `change.auto_released` or `change.auto_release_failed`.

use axum::body::Body;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use tokio::sync::watch;

use crate::approval::ReceivedRequest;
use crate::error::GateError;
use crate::metrics::Outcome;
use crate::policy::ReleaseMode;
use crate::proxy::Outgoing;
use crate::stepup::{Change, Event};
use crate::web::AppState;

/// How many due changes one round takes at most; the rest wait for the next round.
const BATCH: i64 = 20;

/// Runs rounds until `stop` turns true. Returns at once when no rule is `release = "auto"`.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    if auto_rules(&state).is_empty() {
        return;
    }
    let mut ticks = tokio::time::interval(state.config.limits.auto_release_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        match release_due(&state, &stop).await {
            Ok(0) => {}
            Ok(count) => tracing::info!(count, "auto-released due changes"),
            // A database outage is reported by the requests that need it; keep trying.
            Err(error) => {
                if matches!(error, GateError::Store(_)) {
                    state.metrics.record_database_error();
                }
                tracing::warn!(%error, "auto-release round failed");
            }
        }
    }
}

fn auto_rules(state: &AppState) -> Vec<String> {
    state
        .config
        .rules
        .rules()
        .iter()
        .filter(|rule| rule.release == ReleaseMode::Auto)
        .map(|rule| rule.name.clone())
        .collect()
}

/// One round: takes every due change this instance can win and forwards it. Returns how many
/// it forwarded. Changes another instance (or a client release) took are skipped.
pub async fn release_due(
    state: &AppState,
    stop: &watch::Receiver<bool>,
) -> Result<usize, GateError> {
    let rules = auto_rules(state);
    let due = state
        .stepup
        .store()
        .due_auto_releases(&rules, state.clock.now(), BATCH)
        .await?;
    let mut forwarded = 0;
    for change in due {
        if *stop.borrow() {
            break;
        }
        let id = change.id;
        let taken = match state.stepup.take_for_auto_release(change).await {
            Ok(taken) => taken,
            // Someone else won it, or it was cancelled, expired or frozen meanwhile.
            Err(GateError::Refused(_) | GateError::AccountFrozen | GateError::NotFound) => {
                tracing::debug!(change = %id, "a due change was not ours to auto-release");
                continue;
            }
            Err(error) => return Err(error),
        };
        tracing::info!(change = %id, user = %taken.user_id, rule = %taken.rule, attempt = taken.release_attempts, "auto-releasing a confirmed change");
        forward_taken(state, taken).await;
        forwarded += 1;
    }
    Ok(forwarded)
}

/// Forwards a change this instance has taken, and records the outcome.
async fn forward_taken(state: &AppState, change: Change) {
    let id = change.id;
    let approval = match state.approvals.sign(&change).await {
        Ok(approval) => approval,
        Err(error) => {
            tracing::error!(change = %id, %error, "cannot sign an auto-release; not forwarded");
            record(state, change, Event::Undelivered).await;
            return;
        }
    };
    let outgoing = match rebuild(state, &change, approval) {
        Ok(outgoing) => outgoing,
        Err(why) => {
            // Not forwarded. The lease is kept, so this is retried (and logged) only once per
            // lease, not every round.
            tracing::error!(change = %id, why, "cannot rebuild a held request; not forwarded");
            return;
        }
    };
    let started = std::time::Instant::now();
    let forwarded = state
        .upstream
        .forward(outgoing)
        .await
        .map_err(GateError::Upstream);
    // Counted like a client's release, so `released` means the same whoever forwarded it.
    match &forwarded {
        Ok(_) => state
            .metrics
            .record_request(Outcome::Released, None, started.elapsed()),
        Err(error) => {
            tracing::warn!(change = %id, %error, "an auto-release did not get an answer");
            let code = error.status_and_code().1;
            state
                .metrics
                .record_request(Outcome::UpstreamError, Some(code), started.elapsed());
        }
    }
    if let Some(outcome) = crate::web::gateway::release_outcome(&forwarded) {
        record(state, change, outcome).await;
    }
}

async fn record(state: &AppState, change: Change, outcome: Event) {
    let id = change.id;
    if let Err(error) = state.stepup.record_auto_outcome(change, outcome).await {
        // The lease runs out and the next round forwards again with the same key.
        tracing::error!(change = %id, %error, "could not record an auto-release's outcome");
    }
}

/// The held request as the client sent it: method, canonical path, raw query, the kept
/// headers and body bytes, plus the verified user in `upstream_header` when configured.
/// Refused unless its digest is the confirmed one, so the worker can only forward what the
/// user confirmed (and the upstream's own digest check will agree).
fn rebuild(state: &AppState, change: &Change, approval: String) -> Result<Outgoing, String> {
    let method = Method::from_bytes(change.method.as_bytes()).map_err(|e| e.to_string())?;
    let path_and_query = match &change.query {
        Some(query) => format!("{}?{query}", change.path),
        None => change.path.clone(),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &change.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_str(value).map_err(|e| e.to_string())?;
        headers.append(name, value);
    }
    if let Some(header) = &state.config.upstream_identity_header {
        let user = HeaderValue::from_str(&change.user_id).map_err(|e| e.to_string())?;
        headers.insert(header.clone(), user);
    }
    let rebuilt = ReceivedRequest {
        method: &change.method,
        path_and_query: &path_and_query,
        headers: &headers,
        body: &change.body,
    };
    if rebuilt.digest() != change.digest {
        return Err("the rebuilt request's digest is not the confirmed one".into());
    }
    Ok(Outgoing {
        method,
        path_and_query: PathAndQuery::try_from(path_and_query).map_err(|e| e.to_string())?,
        headers,
        body: Body::from(change.body.clone()),
        client_ip: None,
        idempotency_key: Some(change.id.to_string()),
        approval: Some(approval),
    })
}
