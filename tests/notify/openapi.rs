//! The OpenAPI document against the admin API and the one-click cancel link: every answer's
//! status is documented for its operation, and every JSON body fits the documented schema
//! (a dead-lettered delivery included, so its shape is proven too).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::gate_client::{enable_withdrawals, GateUser};
use crate::harness::{GateOptions, TestGate, ADMIN_TOKEN};
use crate::openapi_check::OpenApi;
use crate::testdb::Backend;

async fn admin_call(
    api: &OpenApi,
    gate: &TestGate,
    method: Method,
    template: &str,
    path: &str,
) -> (u16, Value) {
    let response = gate
        .admin(method.clone(), path)
        .send()
        .await
        .expect("send to the admin API");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("the admin API answers JSON");
    api.assert_answer(method.as_str(), template, status, &body);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_and_cancel_link_answers_fit_the_document() {
    let options = GateOptions {
        admin: true,
        max_attempts: 1,
        ..GateOptions::default()
    };
    let Some(gate) = TestGate::start(Backend::Sqlite, options).await else {
        return;
    };
    let api = OpenApi::new(stepgate::web::openapi::document());
    let alice: GateUser = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    // Deliveries fail once and are dead-lettered at once (max_attempts = 1).
    gate.receiver.fail_always();
    let held = alice.hold(&gate.address, &enable_withdrawals("k1")).await;
    alice.confirm(&gate.address, &held).await;
    gate.wait_for_outbox("dead", "change.confirmed dead-lettered", |rows| {
        rows.iter().any(|row| row.event == "change.confirmed")
    })
    .await;

    // Without the token: 401 in the documented shape.
    let response = gate
        .stranger()
        .get(format!("{}/admin/audit", gate.admin_address()))
        .send()
        .await
        .expect("send to the admin API");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(status, 401);
    api.assert_answer("GET", "/admin/audit", status, &body);
    assert!(!ADMIN_TOKEN.is_empty());

    for (template, path) in [
        ("/admin/users/{user}/changes", "/admin/users/alice/changes"),
        (
            "/admin/users/{user}/passkeys",
            "/admin/users/alice/passkeys",
        ),
        ("/admin/audit", "/admin/audit"),
        ("/admin/webhooks/dead", "/admin/webhooks/dead"),
    ] {
        let (status, body) = admin_call(&api, &gate, Method::GET, template, path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // Retry every dead delivery (so the mailed cancel link arrives below).
    gate.receiver.succeed();
    let (_, dead) = admin_call(
        &api,
        &gate,
        Method::GET,
        "/admin/webhooks/dead",
        "/admin/webhooks/dead",
    )
    .await;
    let dead = dead["deliveries"].as_array().cloned().unwrap_or_default();
    assert!(!dead.is_empty(), "dead deliveries are listed");
    for delivery in dead {
        let id = delivery["id"].as_str().expect("a dead delivery's id");
        let (status, _) = admin_call(
            &api,
            &gate,
            Method::POST,
            "/admin/webhooks/{id}/retry",
            &format!("/admin/webhooks/{id}/retry"),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (status, _) = admin_call(
        &api,
        &gate,
        Method::POST,
        "/admin/webhooks/{id}/retry",
        &format!("/admin/webhooks/{}/retry", uuid::Uuid::new_v4()),
    )
    .await;
    assert_eq!(status, 404);

    // The cancel link, from the delivery the exchange would mail: HTML, documented statuses.
    gate.advance(Duration::from_secs(1));
    gate.deliver_all().await;
    let link = gate
        .receiver
        .the_delivery("change.confirmed", &held)
        .payload["cancel_url"]
        .as_str()
        .map(|url| gate.reachable(url))
        .expect("change.confirmed carries cancel_url");
    let operations = &api.document()["paths"]["/_stepgate/cancel/{id}"];
    for method in [Method::GET, Method::POST] {
        let mut request = gate.stranger().request(method.clone(), &link);
        if method == Method::POST {
            // The page's own form post, as the browser sends it.
            request = request.header("origin", &gate.origin);
        }
        let response = request.send().await.expect("open the cancel link");
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let documented = &operations[method.as_str().to_ascii_lowercase()]["responses"]
            [status.as_u16().to_string()];
        assert!(
            documented["content"]["text/html"].is_object(),
            "{method} cancel link answered {status}, which the document does not list as HTML"
        );
        assert_eq!(status, StatusCode::OK, "{method} cancel link");
        assert!(content_type.starts_with("text/html"), "{content_type}");
    }

    // Freeze and unfreeze by support: the documented shapes.
    let (status, _) = admin_call(
        &api,
        &gate,
        Method::POST,
        "/admin/users/{user}/freeze",
        "/admin/users/alice/freeze",
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = admin_call(
        &api,
        &gate,
        Method::POST,
        "/admin/users/{user}/unfreeze",
        "/admin/users/alice/unfreeze",
    )
    .await;
    assert_eq!(status, 202);
}
