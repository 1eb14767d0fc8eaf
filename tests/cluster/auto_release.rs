//! `release = "auto"` across two real instances: once the cooling-off is over, both instances'
//! workers race for the same due changes, and the exchange receives each held request exactly
//! once, with `Idempotency-Key: <change id>` and an approval that verifies against the JWKS
//! both instances publish; each change ends `applied` with one `change.auto_released` event.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use sqlx::Connection;
use stepgate::approval;

use crate::assert_is_release_of;
use crate::gate_client::{expect_error, ApiRequest};
use crate::harness::{Cluster, COOLING_OFF_PASSED, PATIENCE};

const AUTO_RULE: &str = r#"
[[rules]]
name = "auto-withdrawals"
methods = ["PUT"]
path = "/api/v1/auto-keys/{key_id}"
when = [{ pointer = "/permissions", contains = "withdraw" }]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on API key {key_id}"
release = "auto"

[notifications]
webhooks = ["{upstream}/hooks"]
signing_secret = "cluster-tests-sign-webhooks-with-this-secret"
"#;

/// Several changes, so that the two workers' rounds overlap on some of them.
const CHANGES: usize = 6;

fn auto_withdrawals(key_id: &str) -> ApiRequest {
    ApiRequest {
        method: Method::PUT,
        path_and_query: format!("/api/v1/auto-keys/{key_id}"),
        content_type: "application/json".into(),
        body: format!("{{\"permissions\": [\"read\", \"withdraw\"], \"label\": \"{key_id}\"}}")
            .into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_release_forwards_each_due_change_exactly_once_across_two_instances() {
    let Some(cluster) = Cluster::start_with(2, AUTO_RULE).await else {
        return;
    };
    let (a, b) = (cluster.a(), cluster.b());
    let alice = cluster.user("alice");
    alice.register_passkey(&a).await;
    let mut changes = Vec::new();
    for i in 0..CHANGES {
        let api = auto_withdrawals(&format!("auto{i}"));
        let change_id = alice.hold(&a, &api).await;
        alice.confirm(&b, &change_id).await;
        changes.push((api, change_id));
    }

    // Cooling off: both workers look every 200 ms and forward nothing.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for (api, _) in &changes {
        cluster.upstream.assert_saw_nothing_on(&api.path_and_query);
    }

    cluster.clock.set_offset(COOLING_OFF_PASSED);
    for (api, _) in &changes {
        cluster.upstream.wait_for(&api.path_and_query, 1).await;
    }
    // Give both workers many more rounds in which a second forward would show.
    tokio::time::sleep(Duration::from_millis(2000)).await;

    let jwks_a = fetch_jwks(&a).await;
    assert_eq!(
        jwks_a,
        fetch_jwks(&b).await,
        "both instances publish the same key"
    );
    let gate_now = time::OffsetDateTime::now_utc() + Duration::from_secs(COOLING_OFF_PASSED as u64);
    let mut outbox = sqlx::PgConnection::connect(&cluster.settings.database_url)
        .await
        .expect("connect to the cluster's database");
    for (api, change_id) in &changes {
        let seen = cluster.upstream.received_on(&api.path_and_query);
        assert_eq!(
            seen.len(),
            1,
            "change {change_id} must be forwarded exactly once: {seen:?}"
        );
        let forwarded = &seen[0];
        assert_is_release_of(forwarded, api, change_id);
        let token = forwarded
            .header("stepgate-approval")
            .expect("an auto-release carries Stepgate-Approval");
        let claims = approval::verify_with(
            token,
            &jwks_a,
            &approval::ReceivedRequest {
                method: forwarded.method.as_str(),
                path_and_query: &forwarded.path_and_query,
                headers: &forwarded.headers,
                body: &forwarded.body,
            },
            gate_now,
            &approval::VerifyOptions {
                issuer: Some(cluster.settings.public_url.clone()),
                ..approval::VerifyOptions::default()
            },
        )
        .expect("the approval verifies against the published JWKS");
        assert_eq!(&claims.jti, change_id);
        assert_eq!(claims.rule, "auto-withdrawals");
        assert_eq!(claims.sub, "alice");

        let change = alice.change(&a, change_id).await;
        assert_eq!(change["state"], "applied", "{change}");

        // One notification of the outcome (one outbox row for the one webhook), and no
        // generic `change.applied` besides it.
        let events: Vec<String> = sqlx::query_scalar(
            "SELECT event FROM outbox WHERE payload LIKE $1 AND event IN \
             ('change.auto_released', 'change.auto_release_failed', 'change.applied')",
        )
        .bind(format!("%{change_id}%"))
        .fetch_all(&mut outbox)
        .await
        .expect("read the outbox");
        assert_eq!(
            events,
            vec!["change.auto_released".to_string()],
            "{change_id}"
        );
    }

    // The user is told: the webhook delivery arrives, saying what the exchange answered.
    let first = &changes[0].1;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let delivered = cluster
            .upstream
            .received_on("/hooks")
            .into_iter()
            .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
            .find(|event| {
                event["event"] == "change.auto_released" && event["change"]["id"] == first.as_str()
            });
        if let Some(event) = delivered {
            assert_eq!(event["change"]["upstream_status"], 200, "{event}");
            assert_eq!(event["change"]["state"], "applied", "{event}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no change.auto_released delivery"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A client release of an auto-released change is answered like any applied change.
    let (api, change_id) = &changes[1];
    expect_error(
        alice.release(&b, api, change_id).await,
        StatusCode::CONFLICT,
        "change_already_applied",
    )
    .await;
    assert_eq!(cluster.upstream.received_on(&api.path_and_query).len(), 1);
}

async fn fetch_jwks(gate: &str) -> String {
    let response = reqwest::get(format!("{gate}/_stepgate/jwks.json"))
        .await
        .expect("fetch the JWKS");
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.expect("read the JWKS")
}
