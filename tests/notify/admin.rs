//! The admin API: its own listener, every route behind the bearer token; support can look
//! (changes, passkeys, the audit log, dead webhooks), stop (freeze) and start an unfreeze that
//! only the user can confirm. No route, on either listener, approves a change, confirms it or
//! shortens its cooling-off: a fraudster who talks their way past support still faces the
//! user's passkey and the wait.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::freeze::request_unfreeze;
use crate::gate_client::{enable_withdrawals, expect_error, expect_json, GateUser};
use crate::harness::{
    parse_time, sorted_ids, status_and_text, GateOptions, TestGate, ADMIN_TOKEN, COOLING_OFF,
};
use crate::on_both_backends;
use crate::testdb::Backend;

on_both_backends!(
    every_admin_route_needs_the_token,
    no_route_approves_or_shortens_a_cooling_off,
    support_can_look_and_freeze_but_only_the_user_can_unfreeze,
);

fn admin_gate() -> GateOptions {
    GateOptions {
        admin: true,
        ..GateOptions::default()
    }
}

/// Every admin route, with a harmless body.
fn admin_routes() -> Vec<(Method, String)> {
    let some_id = uuid::Uuid::new_v4();
    vec![
        (Method::GET, "/admin/users/alice/changes".into()),
        (Method::GET, "/admin/users/alice/passkeys".into()),
        (Method::GET, "/admin/audit".into()),
        (Method::POST, "/admin/users/alice/freeze".into()),
        (Method::POST, "/admin/users/alice/unfreeze".into()),
        (Method::GET, "/admin/webhooks/dead".into()),
        (Method::POST, format!("/admin/webhooks/{some_id}/retry")),
    ]
}

/// Routes that would approve, confirm, release or hurry `change_id` if they existed.
fn shortcut_routes(change_id: &str) -> Vec<(Method, String, Value)> {
    let now_ish = json!({ "state": "applied", "release_at": "2000-01-01T00:00:00Z" });
    let mut routes = Vec::new();
    for prefix in ["/admin/changes", "/admin/users/alice/changes"] {
        for verb in [
            "approve",
            "release",
            "confirm",
            "expedite",
            "apply",
            "skip-cooling-off",
        ] {
            routes.push((
                Method::POST,
                format!("{prefix}/{change_id}/{verb}"),
                json!({}),
            ));
        }
        routes.push((
            Method::PATCH,
            format!("{prefix}/{change_id}"),
            now_ish.clone(),
        ));
        routes.push((
            Method::PUT,
            format!("{prefix}/{change_id}"),
            now_ish.clone(),
        ));
    }
    routes
}

/// The same shortcuts on the public listener's own API.
fn public_shortcut_routes(change_id: &str) -> Vec<(Method, String, Value)> {
    let mut routes = shortcut_routes(change_id);
    for verb in ["approve", "release", "expedite", "apply"] {
        routes.push((
            Method::POST,
            format!("/_stepgate/api/changes/{change_id}/{verb}"),
            json!({}),
        ));
    }
    routes.push((
        Method::PATCH,
        format!("/_stepgate/api/changes/{change_id}"),
        json!({ "state": "applied", "release_at": "2000-01-01T00:00:00Z" }),
    ));
    routes
}

/// The change as its owner sees it.
async fn change_of(gate: &TestGate, user: &GateUser, change_id: &str) -> Value {
    user.change(&gate.address, change_id).await
}

async fn every_admin_route_needs_the_token(backend: Backend) {
    let Some(gate) = TestGate::start(backend, admin_gate()).await else {
        return;
    };
    assert_ne!(
        gate.admin_address(),
        gate.address,
        "the admin API has a listener of its own"
    );
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    let pending = alice.hold(&gate.address, &enable_withdrawals("k1")).await;

    let wrong_credentials = [
        None,
        Some("Bearer not-the-admin-token-but-just-as-long-0123456789".to_string()),
        Some(format!("Bearer {ADMIN_TOKEN}x")),
        Some(format!("Bearer {}", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])),
        Some(format!("Basic {ADMIN_TOKEN}")),
        Some(ADMIN_TOKEN.to_string()),
        Some("Bearer ".to_string()),
    ];
    for (method, path) in admin_routes() {
        for credential in &wrong_credentials {
            let mut request = gate
                .stranger()
                .request(method.clone(), format!("{}{path}", gate.admin_address()));
            if let Some(credential) = credential {
                request = request.header("authorization", credential);
            }
            let response = request.send().await.expect("send to the admin API");
            let (status, text) = status_and_text(response).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {credential:?} must be 401, got {status}: {text}"
            );
            let body: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{method} {path}: the 401 is not JSON ({e}): {text}"));
            assert!(body["error"].is_string(), "{method} {path}: {text}");
        }
    }
    // None of that did anything.
    assert!(!gate.is_frozen(&alice).await);
    assert_eq!(alice.change_state(&gate.address, &pending).await, "held");
    assert!(alice
        .change(&gate.address, &pending)
        .await
        .get("id")
        .is_some());

    // The public listener does not serve the admin API, token or not.
    for (method, path) in admin_routes() {
        let response = gate
            .stranger()
            .request(method.clone(), format!("{}{path}", gate.address))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .send()
            .await
            .expect("send an admin path to the public listener");
        let (_, text) = status_and_text(response).await;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(
            body.get("rows").is_none() && body.get("deliveries").is_none(),
            "{method} {path} on the public listener answered like the admin API: {text}"
        );
    }
    assert!(
        !gate.is_frozen(&alice).await,
        "a freeze through the public listener's /admin path took effect"
    );
    assert_eq!(alice.change_state(&gate.address, &pending).await, "held");

    // With the token, it answers.
    let response = gate
        .admin(Method::GET, "/admin/audit")
        .send()
        .await
        .expect("GET audit");
    let body = expect_json(response, StatusCode::OK).await;
    assert!(
        body["rows"].as_array().is_some_and(|rows| !rows.is_empty()),
        "{body}"
    );
}

async fn no_route_approves_or_shortens_a_cooling_off(backend: Backend) {
    let Some(gate) = TestGate::start(backend, admin_gate()).await else {
        return;
    };
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    let cooling_api = enable_withdrawals("k1");
    let cooling = alice.hold(&gate.address, &cooling_api).await;
    alice.confirm(&gate.address, &cooling).await;
    let held_api = enable_withdrawals("k2");
    let held = alice.hold(&gate.address, &held_api).await;
    let cooling_before = change_of(&gate, &alice, &cooling).await;
    let held_before = change_of(&gate, &alice, &held).await;
    let audit_before = gate.audit_rows().await.len();

    for change_id in [&cooling, &held] {
        for (method, path, body) in shortcut_routes(change_id) {
            let response = gate
                .admin(method.clone(), &path)
                .json(&body)
                .send()
                .await
                .expect("send a shortcut to the admin API");
            let (status, text) = status_and_text(response).await;
            assert!(
                status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} on the admin API must not exist (404/405), got {status}: {text}"
            );
        }
        for (method, path, body) in public_shortcut_routes(change_id) {
            // Unknown paths may be passed through to the exchange; what matters is that the
            // gate did nothing with them.
            gate.user("alice")
                .request(&gate.address, method, &path)
                .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                .json(&body)
                .send()
                .await
                .expect("send a shortcut to the public listener");
        }
    }

    assert_eq!(
        change_of(&gate, &alice, &cooling).await,
        cooling_before,
        "a cooling-off change was changed by a shortcut"
    );
    assert_eq!(
        change_of(&gate, &alice, &held).await,
        held_before,
        "a held change was changed by a shortcut"
    );
    let audit_after = gate.audit_rows().await;
    assert_eq!(
        audit_after.len(),
        audit_before,
        "the shortcuts left audit rows (something happened): {:#?}",
        &audit_after[audit_before..]
    );
    // The release is still early, and nothing reached the exchange as a release.
    let response = alice.release(&gate.address, &cooling_api, &cooling).await;
    expect_error(response, StatusCode::FORBIDDEN, "cooling_off").await;
    let response = alice.release(&gate.address, &held_api, &held).await;
    expect_error(response, StatusCode::FORBIDDEN, "not_confirmed").await;
    assert!(
        !gate
            .upstream
            .received()
            .iter()
            .any(|line| line.contains("/api/v1/api-keys/")),
        "a held change reached the exchange: {:?}",
        gate.upstream.received()
    );

    // The real way still works: the user's passkey and the whole wait.
    let release_at = parse_time(&cooling_before["release_at"]);
    gate.clock.set(release_at + Duration::from_secs(1));
    let response = alice.release(&gate.address, &cooling_api, &cooling).await;
    expect_json(response, StatusCode::OK).await;
}

async fn support_can_look_and_freeze_but_only_the_user_can_unfreeze(backend: Backend) {
    let Some(gate) = TestGate::start(backend, admin_gate()).await else {
        return;
    };
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    let cooling = alice.hold(&gate.address, &enable_withdrawals("k1")).await;
    alice.confirm(&gate.address, &cooling).await;

    // Looking.
    let response = gate
        .admin(Method::GET, "/admin/users/alice/changes")
        .send()
        .await
        .expect("GET changes");
    let body = expect_json(response, StatusCode::OK).await;
    let changes = body["changes"].as_array().expect("a changes array");
    assert_eq!(changes.len(), 1, "{body}");
    assert_eq!(changes[0]["id"], cooling.as_str());
    assert_eq!(changes[0]["state"], "cooling_off");
    let response = gate
        .admin(Method::GET, "/admin/users/alice/passkeys")
        .send()
        .await
        .expect("GET passkeys");
    let body = expect_json(response, StatusCode::OK).await;
    let passkeys = body["passkeys"].as_array().expect("a passkeys array");
    assert_eq!(passkeys.len(), 1, "{body}");
    assert_eq!(passkeys[0]["state"], "active");
    let response = gate
        .admin(Method::GET, "/admin/audit")
        .send()
        .await
        .expect("GET audit");
    let body = expect_json(response, StatusCode::OK).await;
    let rows = body["rows"].as_array().expect("a rows array");
    assert!(
        rows.iter()
            .any(|r| r["kind"] == "change.confirmed" && r["change_id"] == cooling.as_str()),
        "the audit log records the confirmation: {body}"
    );
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["seq"], i + 1, "audit rows in order: {row}");
        assert!(
            row["hash"].is_string() && row["prev_hash"].is_string(),
            "{row}"
        );
    }

    // Stopping: support freezes the account.
    let response = gate
        .admin(Method::POST, "/admin/users/alice/freeze")
        .send()
        .await
        .expect("POST freeze");
    let body = expect_json(response, StatusCode::OK).await;
    assert_eq!(body["frozen"], true, "{body}");
    assert_eq!(
        sorted_ids(&body["cancelled"]),
        vec![cooling.clone()],
        "{body}"
    );
    assert!(gate.is_frozen(&alice).await);
    assert_eq!(
        alice.change_state(&gate.address, &cooling).await,
        "cancelled"
    );
    let response = alice.send(&gate.address, &enable_withdrawals("k2")).await;
    expect_error(response, StatusCode::FORBIDDEN, "account_frozen").await;
    gate.deliver_all().await;
    assert_eq!(gate.receiver.delivered_events("account.frozen").len(), 1);

    // Support can start an unfreeze, but it is the user's change to confirm.
    let response = gate
        .admin(Method::POST, "/admin/users/alice/unfreeze")
        .send()
        .await
        .expect("POST unfreeze");
    let body = expect_json(response, StatusCode::ACCEPTED).await;
    let unfreeze = body["change_id"]
        .as_str()
        .unwrap_or_else(|| panic!("admin unfreeze without a change_id: {body}"))
        .to_string();
    assert_eq!(
        body["confirm_url"],
        format!("{}/_stepgate/changes/{unfreeze}", gate.origin),
        "the confirm link is the user's page: {body}"
    );
    let change = alice.change(&gate.address, &unfreeze).await;
    assert_eq!(change["state"], "held", "{change}");
    assert_eq!(change["rule"], "account-unfreeze", "{change}");
    for (method, path, body) in shortcut_routes(&unfreeze) {
        let response = gate
            .admin(method.clone(), &path)
            .json(&body)
            .send()
            .await
            .expect("send a shortcut to the admin API");
        let status = response.status();
        assert!(
            status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path} must not exist, got {status}"
        );
    }
    // Without the user's passkey it never takes effect, however long support waits.
    gate.advance(COOLING_OFF + Duration::from_secs(3600));
    assert!(
        gate.is_frozen(&alice).await,
        "an unfreeze the user never confirmed lifted the freeze"
    );

    // The user confirms one with her passkey; after its cooling-off she is unfrozen.
    let own = request_unfreeze(&gate, &alice).await;
    alice.confirm(&gate.address, &own).await;
    gate.advance(COOLING_OFF + Duration::from_secs(1));
    assert!(!gate.is_frozen(&alice).await);
    alice.hold(&gate.address, &enable_withdrawals("k3")).await;
}
