//! The whole product loop: a change that enables withdrawals is held, confirmed with a passkey,
//! waits out its cooling-off and is then released to the exchange exactly once.

use crate::testdb::Backend;

use std::time::Duration;

use axum::http::StatusCode;

use crate::helpers::{
    assert_close, enable_withdrawals, expect_error, expect_json, header_text, parse_rfc3339,
    spawn_app,
};

async fn a_withdrawal_change_is_held_confirmed_cooled_off_and_released_exactly_once(
    backend: Backend,
) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let alice = app.user("alice");
    alice.register_passkey().await;

    // Alice, on the phone with "support", enables withdrawals. The gate holds it.
    let change = enable_withdrawals("k1");
    let held = alice.hold(&change).await;
    let id = held.change_id.clone();
    app.upstream.assert_saw_nothing("after the hold");
    assert_eq!(alice.change_state(&id).await, "held");

    // She confirms it with her passkey: the cooling-off starts now.
    let confirmed = alice.confirm(&id).await;
    let release_at = parse_rfc3339(&confirmed["release_at"]);
    assert_close(
        release_at,
        app.now() + Duration::from_secs(24 * 3600),
        "release_at is the confirmation time plus the 24h cooling-off",
    );
    assert_eq!(alice.change_state(&id).await, "cooling_off");

    // Repeating the request at once is refused, and says how long to wait.
    let early = alice.release(&change, &id).await;
    let retry_after = header_text(&early, "retry-after").expect("cooling_off has Retry-After");
    let body = expect_error(early, StatusCode::FORBIDDEN, "cooling_off").await;
    let retry_after: u64 = retry_after.parse().expect("Retry-After is whole seconds");
    assert!(
        (86_399..=86_400).contains(&retry_after),
        "Retry-After should be about 24h, got {retry_after}"
    );
    assert_eq!(parse_rfc3339(&body["release_at"]), release_at);

    // Half-way through, the wait shrinks with the (manual) clock.
    app.clock.advance(Duration::from_secs(12 * 3600));
    let halfway = alice.release(&change, &id).await;
    let retry_after: u64 = header_text(&halfway, "retry-after")
        .expect("cooling_off has Retry-After")
        .parse()
        .expect("Retry-After is whole seconds");
    expect_error(halfway, StatusCode::FORBIDDEN, "cooling_off").await;
    assert!(
        (43_199..=43_200).contains(&retry_after),
        "Retry-After should be about 12h, got {retry_after}"
    );

    // One second short of the end is still too early.
    app.clock.set(release_at - Duration::from_secs(1));
    let almost = alice.release(&change, &id).await;
    expect_error(almost, StatusCode::FORBIDDEN, "cooling_off").await;
    app.upstream
        .assert_saw_nothing("while the change was cooling off");

    // At release_at the identical request goes through, once.
    app.clock.set(release_at);
    let released = alice.release(&change, &id).await;
    let answer = expect_json(released, StatusCode::OK).await;
    assert_eq!(
        answer["upstream"], "ok",
        "the exchange's own answer: {answer}"
    );

    let received = app.upstream.received();
    assert_eq!(
        received.len(),
        1,
        "exactly one request reaches the exchange"
    );
    let forwarded = &received[0];
    assert_eq!(forwarded.method, change.method);
    assert_eq!(forwarded.path_and_query, change.path_and_query);
    assert_eq!(
        forwarded.body.as_ref(),
        change.body.as_slice(),
        "the forwarded body is byte-identical to the held one"
    );
    assert_eq!(forwarded.header("content-type"), Some("application/json"));
    assert_eq!(
        forwarded.header("idempotency-key"),
        Some(id.as_str()),
        "the exchange gets the change id as Idempotency-Key"
    );
    assert!(
        forwarded.headers.get("stepgate-change").is_none(),
        "Stepgate-Change is the gate's business, not the exchange's"
    );

    // Once is once.
    let again = alice.release(&change, &id).await;
    expect_error(again, StatusCode::CONFLICT, "change_already_applied").await;
    assert_eq!(app.upstream.received().len(), 1, "still exactly one");

    assert_eq!(alice.change_state(&id).await, "applied");
    let listed = alice.list_changes().await;
    assert_eq!(listed.len(), 1, "one change in the list: {listed:?}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["state"], "applied");
    assert_eq!(listed[0]["summary"], "Enable withdrawals on API key k1");
}

crate::on_both_backends!(
    a_withdrawal_change_is_held_confirmed_cooled_off_and_released_exactly_once
);
