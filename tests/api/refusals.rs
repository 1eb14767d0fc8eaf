//! Every way a confirmation or a release is refused, one test each, and what the refusal
//! leaves behind (the exchange never sees a refused request; the change keeps its state
//! unless the refusal is the deadline itself).

use crate::testdb::Backend;

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{
    enable_withdrawals, expect_error, expect_json, spawn_app, spawn_app_with, AppOptions,
};

const DAY: Duration = Duration::from_secs(24 * 3600);

// ---------------------------------------------------------------------------------------------
// Release refusals.

async fn a_release_that_differs_from_the_held_request_is_change_mismatch(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let change = enable_withdrawals("k1").with_path("/api/v1/api-keys/k1?source=settings");
    let (id, release_at) = alice.hold_and_confirm(&change).await;
    app.clock.set(release_at);

    let mut other_content_type = change.clone();
    other_content_type.content_type = "application/json; charset=utf-8".into();
    let mut other_method = change.clone();
    other_method.method = Method::PATCH;
    let mut extra_space = change.body.clone();
    extra_space.push(b' ');
    let variants = [
        (
            "one more byte of whitespace in the body",
            change.with_body(std::str::from_utf8(&extra_space).expect("utf-8")),
        ),
        (
            "another permission set",
            change.with_body(r#"{"permissions":["withdraw"]}"#),
        ),
        (
            "another API key",
            change.with_path("/api/v1/api-keys/k2?source=settings"),
        ),
        (
            "another query",
            change.with_path("/api/v1/api-keys/k1?source=phone"),
        ),
        ("no query", change.with_path("/api/v1/api-keys/k1")),
        ("another Content-Type", other_content_type),
        ("another method", other_method),
    ];
    for (what, variant) in &variants {
        let response = alice.release(variant, &id).await;
        let (status, body) = (response.status(), response.text().await.expect("body"));
        let body: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
        assert!(
            status == StatusCode::FORBIDDEN && body["error"] == "change_mismatch",
            "{what}: expected 403 change_mismatch, got {status} {body}"
        );
    }
    // Headers that change how the exchange reads the request are part of it too.
    for (name, value) in [
        ("x-http-method-override", "DELETE"),
        ("content-encoding", "identity"),
    ] {
        let response = alice
            .request(change.method.clone(), &change.path_and_query)
            .header("content-type", &change.content_type)
            .header("stepgate-change", id.as_str())
            .header(name, value)
            .body(change.body.clone())
            .send()
            .await
            .expect("send the release");
        let status = response.status();
        let body: Value = response.json().await.expect("JSON");
        assert!(
            status == StatusCode::FORBIDDEN && body["error"] == "change_mismatch",
            "a release adding {name}: expected 403 change_mismatch, got {status} {body}"
        );
    }
    app.upstream.assert_saw_nothing("after mismatched releases");

    // A mismatch does not use the change up: the identical request still goes through.
    expect_json(alice.release(&change, &id).await, StatusCode::OK).await;
    let received = app.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].path_and_query, "/api/v1/api-keys/k1?source=settings",
        "the query is forwarded as held"
    );
    assert_eq!(received[0].body.as_ref(), change.body.as_slice());
}

async fn a_release_before_confirmation_is_not_confirmed(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let change = enable_withdrawals("k1");
    let held = alice.hold(&change).await;

    // Even a day later: time alone never releases a held change.
    app.clock.advance(DAY * 2);
    let response = alice.release(&change, &held.change_id).await;
    let status = response.status();
    let body: Value = response.json().await.expect("a JSON refusal");
    assert!(
        status == StatusCode::FORBIDDEN
            && (body["error"] == "not_confirmed" || body["error"] == "change_expired"),
        "an unconfirmed change is never released: {status} {body}"
    );

    // Within the confirmation window the answer is exactly not_confirmed.
    let fresh = alice.hold(&enable_withdrawals("k2")).await;
    let response = alice
        .release(&enable_withdrawals("k2"), &fresh.change_id)
        .await;
    expect_error(response, StatusCode::FORBIDDEN, "not_confirmed").await;

    app.upstream
        .assert_saw_nothing("after releases of unconfirmed changes");
}

async fn a_cancelled_change_is_never_released(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;

    // Cancelled while cooling off (the user got the notification and said "that wasn't me").
    let confirmed = enable_withdrawals("k1");
    let (id, release_at) = alice.hold_and_confirm(&confirmed).await;
    let body = expect_json(alice.cancel(&id).await, StatusCode::OK).await;
    assert_eq!(body["state"], "cancelled");
    let again = expect_json(alice.cancel(&id).await, StatusCode::OK).await;
    assert_eq!(again["state"], "cancelled", "cancelling twice is fine");
    assert_eq!(alice.change_state(&id).await, "cancelled");

    // Cancelled before it was ever confirmed.
    let held_only = enable_withdrawals("k2");
    let held = alice.hold(&held_only).await;
    let body = expect_json(alice.cancel(&held.change_id).await, StatusCode::OK).await;
    assert_eq!(body["state"], "cancelled");

    app.clock.set(release_at + Duration::from_secs(60));
    expect_error(
        alice.release(&confirmed, &id).await,
        StatusCode::FORBIDDEN,
        "change_cancelled",
    )
    .await;
    expect_error(
        alice.release(&held_only, &held.change_id).await,
        StatusCode::FORBIDDEN,
        "change_cancelled",
    )
    .await;
    app.upstream
        .assert_saw_nothing("after releases of cancelled changes");
    assert_eq!(alice.change_state(&id).await, "cancelled");
}

async fn an_applied_change_cannot_be_cancelled(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let change = enable_withdrawals("k1");
    let (id, release_at) = alice.hold_and_confirm(&change).await;
    app.clock.set(release_at);
    expect_json(alice.release(&change, &id).await, StatusCode::OK).await;

    expect_error(
        alice.cancel(&id).await,
        StatusCode::CONFLICT,
        "change_already_applied",
    )
    .await;
    assert_eq!(alice.change_state(&id).await, "applied");
}

async fn a_release_after_the_release_window_is_change_expired(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let early_bird = enable_withdrawals("k1");
    let late_comer = enable_withdrawals("k2");
    let (early_id, release_at) = alice.hold_and_confirm(&early_bird).await;
    let (late_id, late_release_at) = alice.hold_and_confirm(&late_comer).await;
    assert_eq!(release_at, late_release_at, "the clock did not move");

    // A release is allowed until release_at + 7 days...
    app.clock
        .set(release_at + DAY * 7 - Duration::from_secs(60));
    expect_json(alice.release(&early_bird, &early_id).await, StatusCode::OK).await;

    // ...and not after.
    app.clock.set(release_at + DAY * 7 + Duration::from_secs(1));
    expect_error(
        alice.release(&late_comer, &late_id).await,
        StatusCode::FORBIDDEN,
        "change_expired",
    )
    .await;
    assert_eq!(app.upstream.received().len(), 1, "only the timely release");
    assert_eq!(alice.change_state(&late_id).await, "expired");
    assert_eq!(alice.change_state(&early_id).await, "applied");
}

// ---------------------------------------------------------------------------------------------
// The confirmation deadline.

async fn a_change_not_confirmed_within_confirm_within_expires(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let change = enable_withdrawals("k1");
    let held = alice.hold(&change).await;

    app.clock.advance(Duration::from_secs(10 * 60 + 1));
    expect_error(
        alice.try_confirm(&held.change_id).await,
        StatusCode::FORBIDDEN,
        "change_expired",
    )
    .await;
    assert_eq!(alice.change_state(&held.change_id).await, "expired");

    app.clock.advance(DAY * 2);
    expect_error(
        alice.release(&change, &held.change_id).await,
        StatusCode::FORBIDDEN,
        "change_expired",
    )
    .await;
    app.upstream.assert_saw_nothing("after an expired change");
}

async fn a_confirmation_finished_after_confirm_within_is_refused_and_expires_the_change(
    backend: Backend,
) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let held = alice.hold(&enable_withdrawals("k1")).await;

    // Started in time (at 9 minutes), finished too late (10 minutes and a second), while
    // the ceremony itself (5 minutes) is still fresh.
    app.clock.advance(Duration::from_secs(9 * 60));
    let ceremony = alice.start_confirmation(&held.change_id).await;
    let credential = alice.sign(&ceremony.options);
    app.clock.advance(Duration::from_secs(61));
    let response = alice
        .confirm_finish(&held.change_id, &ceremony.ceremony_id, &credential)
        .await;
    expect_error(response, StatusCode::FORBIDDEN, "change_expired").await;
    assert_eq!(alice.change_state(&held.change_id).await, "expired");
}

async fn a_confirmation_just_inside_confirm_within_succeeds(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let held = alice.hold(&enable_withdrawals("k1")).await;
    app.clock.advance(Duration::from_secs(10 * 60 - 1));
    alice.confirm(&held.change_id).await;
    assert_eq!(alice.change_state(&held.change_id).await, "cooling_off");
}

// ---------------------------------------------------------------------------------------------
// Other people's changes and passkeys.

async fn another_users_change_is_not_found(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    let mallory = app.user("mallory");
    alice.register_passkey().await;
    mallory.register_passkey().await;
    let change = enable_withdrawals("k1");
    let held = alice.hold(&change).await;
    let id = &held.change_id;

    expect_error(
        mallory.get_change(id).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        mallory.confirm_start(id).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(mallory.cancel(id).await, StatusCode::NOT_FOUND, "not_found").await;
    assert!(
        mallory.list_changes().await.is_empty(),
        "mallory's list does not show alice's change"
    );
    assert_eq!(
        alice.change_state(id).await,
        "held",
        "mallory changed nothing"
    );

    // Confirmed and due: still not mallory's to release.
    let confirmed = alice.confirm(id).await;
    app.clock
        .set(crate::helpers::parse_rfc3339(&confirmed["release_at"]));
    expect_error(
        mallory.release(&change, id).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(mallory.cancel(id).await, StatusCode::NOT_FOUND, "not_found").await;
    app.upstream.assert_saw_nothing("after mallory's attempts");

    expect_json(alice.release(&change, id).await, StatusCode::OK).await;
    assert_eq!(app.upstream.received().len(), 1);
}

async fn an_unknown_change_id_is_not_found(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let unknown = uuid::Uuid::new_v4().to_string();

    expect_error(
        alice.get_change(&unknown).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        alice.confirm_start(&unknown).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        alice.cancel(&unknown).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        alice.release(&enable_withdrawals("k1"), &unknown).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    app.upstream
        .assert_saw_nothing("after releasing an unknown change");
}

async fn another_users_passkey_cannot_confirm_a_change(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    let mallory = app.user("mallory");
    alice.register_passkey().await;
    mallory.register_passkey().await;
    let held = alice.hold(&enable_withdrawals("k1")).await;

    // Alice's ceremony, answered by mallory's authenticator (a valid signature by a key the
    // gate knows, but not one of alice's).
    let ceremony = alice.start_confirmation(&held.change_id).await;
    let mut options = ceremony.options.clone();
    options["publicKey"]["allowCredentials"] =
        json!([{"type": "public-key", "id": mallory.credential_id()}]);
    let credential = mallory.sign(&options);
    let response = alice
        .confirm_finish(&held.change_id, &ceremony.ceremony_id, &credential)
        .await;
    expect_error(response, StatusCode::FORBIDDEN, "assertion_invalid").await;
    assert_eq!(alice.change_state(&held.change_id).await, "held");

    // Alice's own passkey still works afterwards.
    alice.confirm(&held.change_id).await;
}

// ---------------------------------------------------------------------------------------------
// Ceremonies and assertions.

async fn a_replayed_assertion_is_refused(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;

    let first = alice.hold(&enable_withdrawals("k1")).await;
    let ceremony = alice.start_confirmation(&first.change_id).await;
    let credential = alice.sign(&ceremony.options);
    expect_json(
        alice
            .confirm_finish(&first.change_id, &ceremony.ceremony_id, &credential)
            .await,
        StatusCode::OK,
    )
    .await;

    // The same assertion, captured and sent to a fresh ceremony for another change.
    let second = alice.hold(&enable_withdrawals("k2")).await;
    let fresh = alice.start_confirmation(&second.change_id).await;
    let response = alice
        .confirm_finish(&second.change_id, &fresh.ceremony_id, &credential)
        .await;
    expect_error(response, StatusCode::FORBIDDEN, "assertion_invalid").await;
    assert_eq!(alice.change_state(&second.change_id).await, "held");
}

async fn a_confirmation_ceremony_is_single_use(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let held = alice.hold(&enable_withdrawals("k1")).await;

    let ceremony = alice.start_confirmation(&held.change_id).await;
    let credential = alice.sign(&ceremony.options);
    expect_json(
        alice
            .confirm_finish(&held.change_id, &ceremony.ceremony_id, &credential)
            .await,
        StatusCode::OK,
    )
    .await;

    let response = alice
        .confirm_finish(&held.change_id, &ceremony.ceremony_id, &credential)
        .await;
    expect_error(response, StatusCode::BAD_REQUEST, "ceremony_invalid").await;
}

async fn a_registration_ceremony_is_single_use(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");

    let ceremony = alice.start_registration().await;
    let credential = alice.create_credential(&ceremony.options);
    expect_json(
        alice
            .finish_registration(&ceremony.ceremony_id, &credential)
            .await,
        StatusCode::OK,
    )
    .await;
    let response = alice
        .finish_registration(&ceremony.ceremony_id, &credential)
        .await;
    expect_error(response, StatusCode::BAD_REQUEST, "ceremony_invalid").await;
}

async fn a_ceremony_finished_from_another_session_is_invalid(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let held = alice.hold(&enable_withdrawals("k1")).await;

    let ceremony = alice.start_confirmation(&held.change_id).await;
    let credential = alice.sign(&ceremony.options);
    // Same user id, same passkey, but not the browser session that started the ceremony.
    let elsewhere = alice.in_another_session();
    let response = elsewhere
        .confirm_finish(&held.change_id, &ceremony.ceremony_id, &credential)
        .await;
    expect_error(response, StatusCode::BAD_REQUEST, "ceremony_invalid").await;
    assert_eq!(alice.change_state(&held.change_id).await, "held");
}

async fn an_unknown_or_expired_ceremony_is_invalid(backend: Backend) {
    let Some(app) = spawn_app_with(AppOptions {
        backend,
        ceremony_ttl: "5m",
        ..AppOptions::default()
    })
    .await
    else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let held = alice.hold(&enable_withdrawals("k1")).await;

    let ceremony = alice.start_confirmation(&held.change_id).await;
    let credential = alice.sign(&ceremony.options);
    let unknown = uuid::Uuid::new_v4().to_string();
    expect_error(
        alice
            .confirm_finish(&held.change_id, &unknown, &credential)
            .await,
        StatusCode::BAD_REQUEST,
        "ceremony_invalid",
    )
    .await;

    // Still inside confirm_within (10m), but past the ceremony's own lifetime (5m).
    let ceremony = alice.start_confirmation(&held.change_id).await;
    let credential = alice.sign(&ceremony.options);
    app.clock.advance(Duration::from_secs(6 * 60));
    expect_error(
        alice
            .confirm_finish(&held.change_id, &ceremony.ceremony_id, &credential)
            .await,
        StatusCode::BAD_REQUEST,
        "ceremony_invalid",
    )
    .await;
    assert_eq!(alice.change_state(&held.change_id).await, "held");
}

async fn a_confirmation_without_user_verification_is_refused(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let held = alice.hold(&enable_withdrawals("k1")).await;

    // The authenticator is asked for presence only, so it signs without the UV flag.
    let ceremony = alice.start_confirmation(&held.change_id).await;
    assert_eq!(
        ceremony.options["publicKey"]["userVerification"], "required",
        "the gate asks for user verification: {}",
        ceremony.options
    );
    let mut options = ceremony.options.clone();
    options["publicKey"]["userVerification"] = json!("discouraged");
    let credential = alice.sign(&options);
    let response = alice
        .confirm_finish(&held.change_id, &ceremony.ceremony_id, &credential)
        .await;
    expect_error(response, StatusCode::FORBIDDEN, "user_not_verified").await;
    assert_eq!(alice.change_state(&held.change_id).await, "held");
}

async fn a_passkey_registered_without_user_verification_is_refused(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");

    let ceremony = alice.start_registration().await;
    let mut options = ceremony.options.clone();
    options["publicKey"]["authenticatorSelection"]["userVerification"] = json!("discouraged");
    let credential = alice.create_credential(&options);
    let response = alice
        .finish_registration(&ceremony.ceremony_id, &credential)
        .await;
    let status = response.status();
    let body = response.text().await.expect("body");
    assert!(
        status.is_client_error(),
        "registering without user verification must be refused, got {status} {body}"
    );

    // So alice still has no passkey.
    let held = alice.hold(&enable_withdrawals("k1")).await;
    expect_error(
        alice.confirm_start(&held.change_id).await,
        StatusCode::CONFLICT,
        "no_passkey",
    )
    .await;
}

async fn confirming_without_a_registered_passkey_is_no_passkey(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    let held = alice.hold(&enable_withdrawals("k1")).await;
    expect_error(
        alice.confirm_start(&held.change_id).await,
        StatusCode::CONFLICT,
        "no_passkey",
    )
    .await;
    assert_eq!(alice.change_state(&held.change_id).await, "held");
}

async fn confirming_a_change_that_is_no_longer_held_is_change_not_held(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let held = alice.hold(&enable_withdrawals("k1")).await;
    let first = alice.confirm(&held.change_id).await;

    expect_error(
        alice.try_confirm(&held.change_id).await,
        StatusCode::CONFLICT,
        "change_not_held",
    )
    .await;
    // The second attempt did not restart the cooling-off.
    let change = expect_json(alice.get_change(&held.change_id).await, StatusCode::OK).await;
    assert_eq!(change["state"], "cooling_off");
    assert_eq!(change["release_at"], first["release_at"]);
}

// ---------------------------------------------------------------------------------------------
// Cross-site requests.

async fn state_changing_calls_from_another_origin_are_refused(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;
    let held = alice.hold(&enable_withdrawals("k1")).await;
    let id = &held.change_id;

    for origin in ["http://evil.example", "http://127.0.0.1:1", "null"] {
        for path in [
            format!("/_stepgate/api/changes/{id}/cancel"),
            format!("/_stepgate/api/changes/{id}/confirm/start"),
            "/_stepgate/api/passkeys/register/start".to_string(),
        ] {
            let response = alice
                .request(Method::POST, &path)
                .header("origin", origin)
                .json(&json!({}))
                .send()
                .await
                .expect("send a cross-origin POST");
            expect_error(response, StatusCode::FORBIDDEN, "cross_origin").await;
        }
    }
    assert_eq!(
        alice.change_state(id).await,
        "held",
        "nothing was cancelled"
    );

    // From the gate's own origin the same call works.
    let response = alice
        .request(Method::POST, &format!("/_stepgate/api/changes/{id}/cancel"))
        .header("origin", &app.origin)
        .send()
        .await
        .expect("send a same-origin cancel");
    expect_json(response, StatusCode::OK).await;
    assert_eq!(alice.change_state(id).await, "cancelled");
}

crate::on_both_backends!(
    a_release_that_differs_from_the_held_request_is_change_mismatch,
    a_release_before_confirmation_is_not_confirmed,
    a_cancelled_change_is_never_released,
    an_applied_change_cannot_be_cancelled,
    a_release_after_the_release_window_is_change_expired,
    a_change_not_confirmed_within_confirm_within_expires,
    a_confirmation_finished_after_confirm_within_is_refused_and_expires_the_change,
    a_confirmation_just_inside_confirm_within_succeeds,
    another_users_change_is_not_found,
    an_unknown_change_id_is_not_found,
    another_users_passkey_cannot_confirm_a_change,
    a_replayed_assertion_is_refused,
    a_confirmation_ceremony_is_single_use,
    a_registration_ceremony_is_single_use,
    a_ceremony_finished_from_another_session_is_invalid,
    an_unknown_or_expired_ceremony_is_invalid,
    a_confirmation_without_user_verification_is_refused,
    a_passkey_registered_without_user_verification_is_refused,
    confirming_without_a_registered_passkey_is_no_passkey,
    confirming_a_change_that_is_no_longer_held_is_change_not_held,
    state_changing_calls_from_another_origin_are_refused
);
