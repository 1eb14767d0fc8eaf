//! Webhooks: each event of a story reaches the receiver exactly once with a valid signature;
//! a receiver that fails is retried with backoff and gets the event once; a restart in the
//! middle of the retries loses nothing and doubles nothing; what keeps failing is
//! dead-lettered, and the admin API puts it back in the queue.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::gate_client::{enable_withdrawals, expect_json, GateUser};
use crate::harness::{
    parse_time, status_and_text, Attempt, GateOptions, TestGate, ANTI_PHISHING_HEADER, COOLING_OFF,
    QUIET,
};
use crate::on_both_backends;
use crate::testdb::Backend;

on_both_backends!(
    every_event_of_a_story_is_delivered_once_and_signed,
    with_an_anti_phishing_code_every_delivery_carries_it,
    expiries_and_passkey_removals_are_announced_once,
    a_failing_receiver_gets_the_event_once_after_backoff,
    each_webhook_gets_each_event_once_and_fails_on_its_own,
    a_restart_in_the_middle_of_retries_loses_and_doubles_nothing,
    what_keeps_failing_is_dead_lettered_and_can_be_retried,
);

/// Registers a passkey, holds and confirms `enable_withdrawals(key)`, waits out the
/// cooling-off and releases it. Returns the change id and the `release_at` the confirmation
/// answered.
async fn full_story(gate: &TestGate, user: &GateUser, key: &str) -> (String, Value) {
    let api = enable_withdrawals(key);
    let change_id = user.hold(&gate.address, &api).await;
    let confirmed = user.confirm(&gate.address, &change_id).await;
    gate.advance(COOLING_OFF + Duration::from_secs(1));
    let response = user.release(&gate.address, &api, &change_id).await;
    expect_json(response, StatusCode::OK).await;
    (change_id, confirmed["release_at"].clone())
}

/// What every delivery must look like, whatever its event: JSON, signed over exactly its
/// body, with an event id, an RFC 3339 time and the user.
fn assert_well_formed(attempt: &Attempt, gate: &TestGate, user: &str) {
    let payload = &attempt.payload;
    assert!(
        attempt.signature_valid,
        "the Stepgate-Signature {:?} does not verify against the body {}",
        attempt.signature, attempt.body
    );
    assert!(
        attempt
            .content_type
            .as_deref()
            .is_some_and(|ct| ct.starts_with("application/json")),
        "a webhook body is JSON: content-type {:?}",
        attempt.content_type
    );
    assert_eq!(payload["user_id"], user, "user_id of {payload}");
    assert!(
        uuid::Uuid::parse_str(attempt.event_id()).is_ok(),
        "event_id is a UUID: {payload}"
    );
    let occurred_at = parse_time(&payload["occurred_at"]);
    // Signed when sent: not before the event happened, not after the gate's clock now.
    let signed_at = attempt.signed_at.expect("the signature has a t=");
    assert!(
        signed_at >= occurred_at.unix_timestamp() - 1
            && signed_at <= gate.now().unix_timestamp() + 1,
        "the signature's t={signed_at} is not between the event ({occurred_at}) and now ({})",
        gate.now()
    );
}

/// The cancel link of a pending change: on the public origin, naming that change, with a token.
fn assert_cancel_url(payload: &Value, gate: &TestGate, change_id: &str) {
    let url = payload["cancel_url"]
        .as_str()
        .unwrap_or_else(|| panic!("{} without a cancel_url: {payload}", payload["event"]));
    let prefix = format!("{}/_stepgate/cancel/{change_id}?token=", gate.origin);
    assert!(
        url.starts_with(&prefix) && url.len() > prefix.len(),
        "cancel_url {url} is not {prefix}<token>"
    );
}

async fn every_event_of_a_story_is_delivered_once_and_signed(backend: Backend) {
    let Some(gate) = TestGate::start(backend, GateOptions::default()).await else {
        return;
    };
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    let (change_id, release_at) = full_story(&gate, &alice, "k1").await;
    assert_eq!(
        gate.upstream.received(),
        vec!["PUT /api/v1/api-keys/k1".to_string()],
        "the release reached the exchange once"
    );
    gate.deliver_all().await;

    let attempts = gate.receiver.attempts();
    let mut events: Vec<&str> = attempts.iter().map(Attempt::event).collect();
    events.sort_unstable();
    assert_eq!(
        events,
        [
            "change.applied",
            "change.confirmed",
            "change.held",
            "passkey.added"
        ],
        "each event of the story is sent exactly once (one webhook configured)"
    );
    let event_ids: HashSet<&str> = attempts.iter().map(Attempt::event_id).collect();
    assert_eq!(event_ids.len(), 4, "each event has its own event_id");
    for attempt in &attempts {
        assert!(attempt.succeeded());
        assert_well_formed(attempt, &gate, "alice");
        assert!(
            attempt.payload.get("anti_phishing_code").is_none(),
            "no anti-phishing code was ever passed, so none is sent: {}",
            attempt.payload
        );
    }

    let summary = "Enable withdrawals on API key k1";
    let held = gate.receiver.the_delivery("change.held", &change_id);
    assert_eq!(held.payload["change"]["summary"], summary);
    assert_eq!(held.payload["change"]["state"], "held");
    assert_cancel_url(&held.payload, &gate, &change_id);

    let confirmed = gate.receiver.the_delivery("change.confirmed", &change_id);
    assert_eq!(confirmed.payload["change"]["summary"], summary);
    assert_eq!(confirmed.payload["change"]["state"], "cooling_off");
    assert_eq!(
        parse_time(&confirmed.payload["change"]["release_at"]),
        parse_time(&release_at),
        "change.confirmed says when the change takes effect: {}",
        confirmed.payload
    );
    assert_cancel_url(&confirmed.payload, &gate, &change_id);

    let applied = gate.receiver.the_delivery("change.applied", &change_id);
    assert_eq!(applied.payload["change"]["state"], "applied");
    assert!(
        applied.payload.get("cancel_url").is_none(),
        "an applied change can no longer be cancelled, so no link: {}",
        applied.payload
    );

    let added = gate.receiver.delivered_events("passkey.added");
    assert_eq!(added.len(), 1, "the first passkey is announced once");

    // Nothing is sent again, however much later the sender looks.
    gate.advance(Duration::from_secs(2 * 3600));
    gate.deliver_once().await;
    tokio::time::sleep(QUIET).await;
    gate.deliver_once().await;
    assert_eq!(gate.receiver.attempts().len(), 4, "no event was sent twice");
    assert_eq!(gate.outbox("delivered").await.len(), 4);
    assert!(gate.outbox("pending").await.is_empty());
    assert!(gate.outbox("dead").await.is_empty());
}

async fn with_an_anti_phishing_code_every_delivery_carries_it(backend: Backend) {
    let options = GateOptions {
        anti_phishing: true,
        ..GateOptions::default()
    };
    let Some(gate) = TestGate::start(backend, options).await else {
        return;
    };
    let code = "BLUE-HERON-42";
    let alice = gate.user("alice");
    // The exchange passes the code on protected requests; the first one comes before the
    // passkey exists, so the passkey's own event can carry it too.
    let first = gate
        .hold_with_code(&alice, &enable_withdrawals("k1"), code)
        .await;
    alice.register_passkey(&gate.address).await;
    let second_api = enable_withdrawals("k2");
    let second = gate.hold_with_code(&alice, &second_api, code).await;
    alice.confirm(&gate.address, &second).await;
    let cancelled = alice.cancel(&gate.address, &first).await;
    expect_json(cancelled, StatusCode::OK).await;
    gate.advance(COOLING_OFF + Duration::from_secs(1));
    let released = alice
        .release_request(&gate.address, &second_api, &second)
        .header(ANTI_PHISHING_HEADER, code)
        .send()
        .await
        .expect("send the release");
    expect_json(released, StatusCode::OK).await;
    gate.deliver_all().await;

    let attempts = gate.receiver.attempts();
    let mut events: Vec<&str> = attempts.iter().map(Attempt::event).collect();
    events.sort_unstable();
    assert_eq!(
        events,
        [
            "change.applied",
            "change.cancelled",
            "change.confirmed",
            "change.held",
            "change.held",
            "passkey.added"
        ]
    );
    for attempt in &attempts {
        assert_well_formed(attempt, &gate, "alice");
        assert_eq!(
            attempt.payload["anti_phishing_code"], code,
            "every delivery carries the user's anti-phishing code: {}",
            attempt.payload
        );
    }
}

async fn expiries_and_passkey_removals_are_announced_once(backend: Backend) {
    let Some(gate) = TestGate::start(backend, GateOptions::default()).await else {
        return;
    };
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    let lapsing = alice.hold(&gate.address, &enable_withdrawals("k1")).await;
    gate.advance(crate::harness::CONFIRM_WITHIN + Duration::from_secs(1));
    assert_eq!(alice.change_state(&gate.address, &lapsing).await, "expired");

    // Removing the passkey: confirmed with that passkey, then immediate (tightening).
    let response = alice
        .request(&gate.address, Method::GET, "/_stepgate/api/passkeys")
        .send()
        .await
        .expect("GET passkeys");
    let body = expect_json(response, StatusCode::OK).await;
    let passkey_id = body["passkeys"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no passkey listed: {body}"))
        .to_string();
    let response = alice
        .request(
            &gate.address,
            Method::POST,
            &format!("/_stepgate/api/passkeys/{passkey_id}/remove"),
        )
        .send()
        .await
        .expect("POST remove");
    let body = expect_json(response, StatusCode::ACCEPTED).await;
    let removal = body["change_id"]
        .as_str()
        .unwrap_or_else(|| panic!("remove answer without a change_id: {body}"))
        .to_string();
    let options = alice.start_confirmation(&gate.address, &removal).await;
    let credential = alice.sign(&options);
    let response = alice
        .finish_confirmation(&gate.address, &removal, &options, &credential)
        .await;
    expect_json(response, StatusCode::OK).await;
    let response = alice
        .request(&gate.address, Method::GET, "/_stepgate/api/passkeys")
        .send()
        .await
        .expect("GET passkeys");
    let body = expect_json(response, StatusCode::OK).await;
    assert_eq!(body["passkeys"], serde_json::json!([]), "{body}");

    gate.deliver_all().await;
    let expired = gate.receiver.the_delivery("change.expired", &lapsing);
    assert_eq!(expired.payload["change"]["state"], "expired");
    assert!(
        expired.payload.get("cancel_url").is_none(),
        "an expired change cannot be cancelled, so no link: {}",
        expired.payload
    );
    let removed = gate.receiver.delivered_events("passkey.removed");
    assert_eq!(removed.len(), 1, "passkey.removed is sent once");
    assert_well_formed(&removed[0], &gate, "alice");
    for attempt in gate.receiver.attempts() {
        assert!(attempt.signature_valid, "{}", attempt.body);
    }
    tokio::time::sleep(QUIET).await;
    gate.deliver_once().await;
    assert_eq!(
        gate.receiver
            .attempts()
            .iter()
            .filter(|a| a.event() == "change.expired")
            .count(),
        1,
        "an expiry is announced once, whoever noticed it (a read or the sweep)"
    );
}

async fn a_failing_receiver_gets_the_event_once_after_backoff(backend: Backend) {
    let Some(gate) = TestGate::start(backend, GateOptions::default()).await else {
        return;
    };
    gate.receiver.fail_next(2);
    let alice = gate.user("alice");
    let change_id = alice.hold(&gate.address, &enable_withdrawals("k1")).await;

    gate.deliver_until("the first attempt", |a| !a.is_empty())
        .await;
    let rows = gate
        .wait_for_outbox("pending", "the first failure to be recorded", |rows| {
            rows.len() == 1 && rows[0].attempts == 1
        })
        .await;
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("500")),
        "the failure is recorded with its reason: {:?}",
        rows[0]
    );

    // retry_base is 2 s: the first retry is due 1.6-2.4 s later (±20 % jitter), not before.
    gate.advance(Duration::from_secs(1));
    gate.deliver_once().await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        gate.receiver.attempts().len(),
        1,
        "a retry must wait for its backoff"
    );
    gate.advance(Duration::from_secs(2));
    gate.deliver_until("the second attempt", |a| a.len() >= 2)
        .await;
    gate.wait_for_outbox("pending", "the second failure to be recorded", |rows| {
        rows.len() == 1 && rows[0].attempts == 2
    })
    .await;

    // The backoff doubles: the second retry is due 3.2-4.8 s after the second failure.
    gate.advance(Duration::from_secs(2));
    gate.deliver_once().await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        gate.receiver.attempts().len(),
        2,
        "the backoff grows exponentially"
    );
    gate.advance(Duration::from_secs(4));
    gate.deliver_until("the third attempt", |a| a.len() >= 3)
        .await;
    gate.wait_for_outbox("delivered", "the delivery to be recorded", |rows| {
        rows.len() == 1
    })
    .await;

    let attempts = gate.receiver.attempts();
    let answered: Vec<u16> = attempts.iter().map(|a| a.answered.as_u16()).collect();
    assert_eq!(
        answered,
        [500, 500, 200],
        "three attempts, the last accepted"
    );
    for attempt in &attempts {
        assert_well_formed(attempt, &gate, "alice");
        assert_eq!(attempt.event(), "change.held");
        assert_eq!(attempt.payload["change"]["id"], change_id.as_str());
        assert_eq!(
            attempt.body, attempts[0].body,
            "a retry sends the same event, byte for byte"
        );
    }
    assert!(gate.outbox("pending").await.is_empty());
    assert!(gate.outbox("dead").await.is_empty());

    // Delivered once: nothing more, however much later the sender looks.
    gate.advance(Duration::from_secs(2 * 3600));
    gate.deliver_once().await;
    tokio::time::sleep(QUIET).await;
    gate.deliver_once().await;
    assert_eq!(
        gate.receiver.attempts().len(),
        3,
        "sent again after a success"
    );
}

async fn each_webhook_gets_each_event_once_and_fails_on_its_own(backend: Backend) {
    let options = GateOptions {
        second_webhook: true,
        ..GateOptions::default()
    };
    let Some(gate) = TestGate::start(backend, options).await else {
        return;
    };
    let second = gate.second_receiver.as_ref().expect("a second receiver");
    second.fail_always();
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    let change_id = alice.hold(&gate.address, &enable_withdrawals("k1")).await;
    alice.confirm(&gate.address, &change_id).await;

    // passkey.added, change.held, change.confirmed: one delivery per webhook per event.
    gate.deliver_until_gate("one attempt of each event on each webhook", |gate| {
        gate.receiver.delivered().len() >= 3
            && gate
                .second_receiver
                .as_ref()
                .is_some_and(|r| r.attempts().len() >= 3)
    })
    .await;
    gate.wait_for_outbox("pending", "the second webhook's failures", |rows| {
        rows.len() == 3 && rows.iter().all(|r| r.attempts == 1)
    })
    .await;
    let first_events: Vec<Attempt> = gate.receiver.delivered();
    let mut names: Vec<&str> = first_events.iter().map(Attempt::event).collect();
    names.sort_unstable();
    assert_eq!(names, ["change.confirmed", "change.held", "passkey.added"]);
    for row in gate.outbox("pending").await {
        assert_eq!(
            row.webhook_url,
            second.url(),
            "only the failing webhook is owed: {row:?}"
        );
    }
    for row in gate.outbox("delivered").await {
        assert_eq!(row.webhook_url, gate.receiver.url(), "{row:?}");
    }

    // The second receiver recovers and gets the same events, once each.
    second.succeed();
    gate.advance(Duration::from_secs(10));
    gate.deliver_until_gate("the second webhook's retries", |gate| {
        gate.second_receiver
            .as_ref()
            .is_some_and(|r| r.delivered().len() >= 3)
    })
    .await;
    gate.wait_for_outbox("delivered", "all six deliveries", |rows| rows.len() == 6)
        .await;
    let mut first_bodies: Vec<(String, String)> = first_events
        .iter()
        .map(|a| (a.event_id().to_string(), a.body.clone()))
        .collect();
    let mut second_bodies: Vec<(String, String)> = second
        .delivered()
        .iter()
        .map(|a| (a.event_id().to_string(), a.body.clone()))
        .collect();
    first_bodies.sort();
    second_bodies.sort();
    assert_eq!(
        first_bodies, second_bodies,
        "both webhooks get the same events with the same ids and bodies"
    );
    assert!(second.delivered().iter().all(|a| a.signature_valid));
    tokio::time::sleep(QUIET).await;
    gate.deliver_once().await;
    assert_eq!(
        gate.receiver.attempts().len(),
        3,
        "the working webhook is not sent anything again because the other one failed"
    );
    assert_eq!(second.delivered().len(), 3);
}

async fn a_restart_in_the_middle_of_retries_loses_and_doubles_nothing(backend: Backend) {
    let Some(mut gate) = TestGate::start(backend, GateOptions::default()).await else {
        return;
    };
    gate.receiver.fail_next(1);
    let alice = gate.user("alice");
    let change_id = alice.hold(&gate.address, &enable_withdrawals("k1")).await;
    gate.deliver_until("the first attempt", |a| !a.is_empty())
        .await;
    gate.wait_for_outbox("pending", "the failure to be recorded", |rows| {
        rows.len() == 1 && rows[0].attempts == 1
    })
    .await;

    gate.restart().await;
    // The restarted gate serves the same change...
    assert_eq!(alice.change_state(&gate.address, &change_id).await, "held");
    // ...and, once the backoff has passed, sends the event that is still owed.
    gate.advance(Duration::from_secs(10));
    gate.deliver_until("the retry after the restart", |a| a.len() >= 2)
        .await;
    gate.wait_for_outbox("delivered", "the delivery to be recorded", |rows| {
        rows.len() == 1
    })
    .await;

    let attempts = gate.receiver.attempts();
    let answered: Vec<u16> = attempts.iter().map(|a| a.answered.as_u16()).collect();
    assert_eq!(answered, [500, 200]);
    assert_eq!(attempts[0].event_id(), attempts[1].event_id());
    assert_eq!(attempts[1].event(), "change.held");
    assert!(attempts[1].signature_valid);

    gate.advance(Duration::from_secs(2 * 3600));
    gate.deliver_once().await;
    tokio::time::sleep(QUIET).await;
    gate.deliver_once().await;
    assert_eq!(
        gate.receiver.delivered().len(),
        1,
        "delivered exactly once across the restart"
    );
    assert!(gate.outbox("pending").await.is_empty());
}

async fn what_keeps_failing_is_dead_lettered_and_can_be_retried(backend: Backend) {
    let options = GateOptions {
        max_attempts: 2,
        admin: true,
        ..GateOptions::default()
    };
    let Some(gate) = TestGate::start(backend, options).await else {
        return;
    };
    gate.receiver.fail_always();
    let alice = gate.user("alice");
    alice.hold(&gate.address, &enable_withdrawals("k1")).await;
    gate.deliver_until("the first attempt", |a| !a.is_empty())
        .await;
    gate.wait_for_outbox("pending", "the first failure", |rows| {
        rows.len() == 1 && rows[0].attempts == 1
    })
    .await;
    gate.advance(Duration::from_secs(10));
    gate.deliver_until("the second attempt", |a| a.len() >= 2)
        .await;
    let dead = gate
        .wait_for_outbox("dead", "the delivery to be dead-lettered", |rows| {
            rows.len() == 1
        })
        .await;
    let row = &dead[0];
    assert_eq!(row.attempts, 2, "dead after max_attempts: {row:?}");
    assert_eq!(row.event, "change.held");
    assert!(row.last_error.as_deref().is_some_and(|e| e.contains("500")));
    assert!(gate.outbox("pending").await.is_empty());

    // Dead means dead: no more attempts, however late.
    gate.advance(Duration::from_secs(2 * 3600));
    gate.deliver_once().await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(gate.receiver.attempts().len(), 2);

    // The admin API shows it...
    let response = gate
        .admin(Method::GET, "/admin/webhooks/dead")
        .send()
        .await
        .expect("GET dead webhooks");
    let body = expect_json(response, StatusCode::OK).await;
    let deliveries = body["deliveries"]
        .as_array()
        .unwrap_or_else(|| panic!("no deliveries array: {body}"));
    assert_eq!(deliveries.len(), 1, "{body}");
    let listed = &deliveries[0];
    assert_eq!(listed["id"], row.id.as_str());
    assert_eq!(listed["event"], "change.held");
    assert_eq!(listed["webhook_url"], gate.receiver.url().as_str());
    assert_eq!(listed["attempts"], 2);
    assert!(
        listed["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{listed}"
    );

    // ...and, once the receiver works again, puts it back in the queue.
    gate.receiver.succeed();
    let response = gate
        .admin(Method::POST, &format!("/admin/webhooks/{}/retry", row.id))
        .send()
        .await
        .expect("POST retry");
    assert_eq!(response.status(), StatusCode::OK);
    gate.deliver_until("the requeued delivery", |a| a.len() >= 3)
        .await;
    gate.wait_for_outbox(
        "delivered",
        "the requeued delivery to be recorded",
        |rows| rows.len() == 1,
    )
    .await;
    assert!(gate.outbox("dead").await.is_empty());
    let answered: Vec<u16> = gate
        .receiver
        .attempts()
        .iter()
        .map(|a| a.answered.as_u16())
        .collect();
    assert_eq!(answered, [500, 500, 200]);

    // A delivered row is not dead: retrying it again is refused and sends nothing.
    let response = gate
        .admin(Method::POST, &format!("/admin/webhooks/{}/retry", row.id))
        .send()
        .await
        .expect("POST retry again");
    let (status, text) = status_and_text(response).await;
    assert!(
        status.is_client_error(),
        "retrying a delivered webhook must be refused, got {status}: {text}"
    );
    let body = expect_json(
        gate.admin(Method::GET, "/admin/webhooks/dead")
            .send()
            .await
            .expect("GET dead webhooks"),
        StatusCode::OK,
    )
    .await;
    assert_eq!(body["deliveries"], serde_json::json!([]));
    gate.advance(Duration::from_secs(2 * 3600));
    gate.deliver_once().await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(gate.receiver.delivered().len(), 1, "delivered exactly once");
}
