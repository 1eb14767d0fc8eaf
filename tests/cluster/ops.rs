//! What operators rely on, checked against real `stepgate serve` processes: the Prometheus
//! counters after a scripted story, `/readyz` following the database down and back up,
//! request ids on every log line with no secret header in any, and SIGTERM finishing the
//! request in flight, exiting 0 and leaving held and cooling-off changes as they were.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::assert_is_release_of;
use crate::gate_client::{enable_withdrawals, expect_error, expect_json};
use crate::harness::{Cluster, Gate, Launch, StartUp, COOLING_OFF_PASSED, PATIENCE};
use crate::outage::cluster_behind_forwarder;

/// The metric samples of one exposition, by their full name with labels.
fn scrape_samples(exposition: &str) -> BTreeMap<String, f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (name, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("a sample line is `name value`: {line}"));
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("a sample value is a number: {line}"));
            (name.to_string(), value)
        })
        .collect()
}

async fn scrape(gate: &Gate) -> BTreeMap<String, f64> {
    let response = reqwest::get(format!("{}/metrics", gate.admin_url))
        .await
        .expect("scrape /metrics");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.expect("read /metrics");
    scrape_samples(&text)
}

fn sample(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples
        .get(name)
        .unwrap_or_else(|| panic!("no sample {name} in {samples:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_a_scripted_story_did() {
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let a = cluster.a();
    let gate = cluster.gate_a();
    let alice = cluster.user("alice");

    let before = scrape(gate).await;
    assert_eq!(
        sample(&before, "stepgate_requests_total{outcome=\"passed\"}"),
        0.0
    );
    assert_eq!(sample(&before, "stepgate_database_up"), 1.0);

    // Registration: one start, one finish.
    alice.register_passkey(&a).await;
    // Three pass-through reads.
    for _ in 0..3 {
        let ticker = alice
            .request(&a, Method::GET, "/api/v1/ticker")
            .send()
            .await
            .expect("send a pass-through GET");
        expect_json(ticker, StatusCode::OK).await;
    }
    // One hold, confirmed; released too early once, then on time.
    let api = enable_withdrawals("k1");
    let change = alice.hold(&a, &api).await;
    alice.confirm(&a, &change).await;
    expect_error(
        alice.release(&a, &api, &change).await,
        StatusCode::FORBIDDEN,
        "cooling_off",
    )
    .await;
    cluster.clock.set_offset(COOLING_OFF_PASSED);
    expect_json(alice.release(&a, &api, &change).await, StatusCode::OK).await;
    // Refusals: a smuggled path separator, and a protected request without identity.
    let smuggled = alice
        .request(&a, Method::GET, "/api/v1/api-keys%2Fk1")
        .send()
        .await
        .expect("send an encoded-slash path");
    expect_error(smuggled, StatusCode::BAD_REQUEST, "invalid_path").await;
    let anonymous = reqwest::Client::new()
        .put(format!("{a}{}", api.path_and_query))
        .header("content-type", &api.content_type)
        .body(api.body.clone())
        .send()
        .await
        .expect("send an anonymous protected request");
    expect_error(anonymous, StatusCode::UNAUTHORIZED, "unauthenticated").await;
    // An upstream that drops the connection: 502.
    cluster.upstream.break_next("/api/v1/broken");
    let broken = alice
        .request(&a, Method::GET, "/api/v1/broken")
        .send()
        .await
        .expect("send a request the upstream breaks");
    expect_error(broken, StatusCode::BAD_GATEWAY, "upstream_failed").await;

    let after = scrape(gate).await;
    let expected = [
        ("stepgate_requests_total{outcome=\"passed\"}", 3.0),
        ("stepgate_requests_total{outcome=\"held\"}", 1.0),
        ("stepgate_requests_total{outcome=\"released\"}", 1.0),
        ("stepgate_requests_total{outcome=\"refused\"}", 3.0),
        ("stepgate_requests_total{outcome=\"upstream_error\"}", 1.0),
        ("stepgate_requests_refused_total{reason=\"cooling_off\"}", 1.0),
        ("stepgate_requests_refused_total{reason=\"invalid_path\"}", 1.0),
        (
            "stepgate_requests_refused_total{reason=\"unauthenticated\"}",
            1.0,
        ),
        (
            "stepgate_upstream_errors_total{reason=\"upstream_failed\"}",
            1.0,
        ),
        (
            "stepgate_ceremonies_total{ceremony=\"registration\",outcome=\"started\"}",
            1.0,
        ),
        (
            "stepgate_ceremonies_total{ceremony=\"registration\",outcome=\"success\"}",
            1.0,
        ),
        (
            "stepgate_ceremonies_total{ceremony=\"confirmation\",outcome=\"started\"}",
            1.0,
        ),
        (
            "stepgate_ceremonies_total{ceremony=\"confirmation\",outcome=\"success\"}",
            1.0,
        ),
        ("stepgate_passthrough_duration_seconds_count", 3.0),
        ("stepgate_protected_duration_seconds_count", 2.0),
        (
            "stepgate_gate_request_duration_seconds_count{route=\"/_stepgate/api/changes/{id}/confirm/finish\"}",
            1.0,
        ),
        ("stepgate_changes{state=\"applied\"}", 1.0),
        ("stepgate_changes{state=\"held\"}", 0.0),
        ("stepgate_changes{state=\"cooling_off\"}", 0.0),
        ("stepgate_webhook_outbox_backlog", 0.0),
        ("stepgate_webhook_dead_letters", 0.0),
        ("stepgate_database_errors_total", 0.0),
        ("stepgate_database_up", 1.0),
    ];
    for (name, value) in expected {
        assert_eq!(sample(&after, name), value, "{name}");
    }
    // The histograms' buckets add up: +Inf holds every observation.
    assert_eq!(
        sample(
            &after,
            "stepgate_passthrough_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        3.0
    );
    // The upstream saw the release once and the reads, nothing refused.
    assert_eq!(cluster.upstream.received_on(&api.path_and_query).len(), 1);
    assert_is_release_of(
        &cluster.upstream.received_on(&api.path_and_query)[0],
        &api,
        &change,
    );
}

async fn readyz(gate: &Gate) -> (StatusCode, Value) {
    let response = reqwest::get(format!("{}/readyz", gate.admin_url))
        .await
        .expect("ask /readyz");
    let status = response.status();
    (status, response.json().await.expect("/readyz answers JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_unready_without_the_database_and_ready_again_after() {
    let Some((cluster, mut forwarder)) = cluster_behind_forwarder().await else {
        return;
    };
    let gate = cluster.gate_a();

    let (status, body) = readyz(gate).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ready");
    for check in ["database", "migrations", "upstream", "shutdown"] {
        assert_eq!(body["checks"][check]["ok"], true, "{check}: {body}");
    }

    forwarder.cut().await;
    let (status, body) = readyz(gate).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "unready");
    assert_eq!(body["checks"]["database"]["ok"], false, "{body}");
    assert!(
        body["checks"]["database"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "the answer says what is wrong: {body}"
    );
    assert_eq!(body["checks"]["migrations"]["ok"], false, "{body}");
    assert_eq!(body["checks"]["upstream"]["ok"], true, "{body}");
    // Alive all the same: a liveness probe must not restart a gate for its database.
    let health = reqwest::get(format!("{}/healthz", gate.admin_url))
        .await
        .expect("ask /healthz");
    assert_eq!(health.status(), StatusCode::OK);
    let down = scrape(gate).await;
    assert_eq!(sample(&down, "stepgate_database_up"), 0.0);
    assert!(sample(&down, "stepgate_database_errors_total") >= 1.0);

    forwarder.restore().await;
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let (status, body) = readyz(gate).await;
        if status == StatusCode::OK {
            assert_eq!(body["status"], "ready");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still unready after the database came back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_unapplied_migrations_and_a_dead_upstream() {
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    // A second process on a database it did not migrate: a fresh one.
    let Some(fresh) = crate::testdb::TestDb::new(crate::testdb::Backend::Postgres).await else {
        return;
    };
    let mut settings = cluster.settings.clone();
    settings.database_url = fresh.url.clone();
    // And an upstream nothing listens on.
    settings.upstream = format!("http://127.0.0.1:{}", crate::harness::free_ports(1)[0]);
    let port = crate::harness::free_ports(1)[0];
    let gate = Gate::launch(
        "unmigrated",
        &settings,
        port,
        Launch::quiet(StartUp::NoMigrate),
    )
    .await;
    let (status, body) = readyz(&gate).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["checks"]["database"]["ok"], true, "{body}");
    assert_eq!(body["checks"]["migrations"]["ok"], false, "{body}");
    assert!(
        body["checks"]["migrations"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("stepgate migrate")),
        "{body}"
    );
    assert_eq!(body["checks"]["upstream"]["ok"], false, "{body}");
}

/// Every JSON log line of the process.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|line| line.trim_start().starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_log_line_of_a_request_has_its_id_and_no_secret_header() {
    let Some(mut cluster) = Cluster::start(1).await else {
        return;
    };
    // Replace the quiet gate by one logging JSON at debug level, the most talkative setting.
    cluster.gates[0].sigkill();
    let port = cluster.gates[0].port;
    let launch = Launch {
        start_up: StartUp::Migrate,
        log_level: "debug",
        json_logs: true,
    };
    let gate = Gate::launch("json", &cluster.settings, port, launch).await;
    let a = gate.url.clone();
    let alice = cluster.user("alice");
    alice.register_passkey(&a).await;

    const SECRETS: [(&str, &str); 4] = [
        ("cookie", "session=SECRET-COOKIE-VALUE"),
        ("authorization", "Bearer SECRET-BEARER-VALUE"),
        ("proxy-authorization", "Basic SECRET-PROXY-VALUE"),
        ("stepgate-signature", "t=1,v1=SECRET-SIGNATURE-VALUE"),
    ];
    let with_secrets = |builder: reqwest::RequestBuilder| {
        SECRETS.iter().fold(builder, |builder, (name, value)| {
            builder.header(*name, *value)
        })
    };

    // A hold, with the edge's request id.
    let api = enable_withdrawals("k1");
    let hold = with_secrets(alice.request(&a, api.method.clone(), &api.path_and_query))
        .header("x-request-id", "edge-hold-0001")
        .header("content-type", &api.content_type)
        .body(api.body.clone())
        .send()
        .await
        .expect("send the hold");
    assert_eq!(hold.headers()["x-request-id"], "edge-hold-0001");
    let held = expect_error(hold, StatusCode::FORBIDDEN, "step_up_required").await;
    let change = held["change_id"].as_str().expect("a change id").to_string();
    // A pass-through without an id: the gate makes one and tells the upstream.
    let ticker = with_secrets(alice.request(&a, Method::GET, "/api/v1/ticker"))
        .send()
        .await
        .expect("send a pass-through GET");
    let generated = ticker.headers()["x-request-id"]
        .to_str()
        .expect("ASCII id")
        .to_string();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    expect_json(ticker, StatusCode::OK).await;
    let upstream_saw = cluster.upstream.received_on("/api/v1/ticker");
    assert_eq!(
        upstream_saw[0].header("x-request-id"),
        Some(generated.as_str())
    );
    // An error page shows the id so the user can quote it.
    let page = with_secrets(alice.request(
        &a,
        Method::GET,
        &format!("/_stepgate/changes/{}", uuid::Uuid::new_v4()),
    ))
    .header("accept", "text/html")
    .header("x-request-id", "edge-page-0002")
    .send()
    .await
    .expect("ask for a page that does not exist");
    assert_eq!(page.status(), StatusCode::NOT_FOUND);
    let html = page.text().await.expect("read the error page");
    assert!(html.contains("edge-page-0002"), "{html}");

    // The log lines are written as the requests finish; give the writer a moment.
    let deadline = std::time::Instant::now() + PATIENCE;
    let log = loop {
        let log = gate.log();
        if log.contains(&generated) && log.contains("edge-page-0002") {
            break log;
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (name, value) in SECRETS {
        let secret = value
            .split_once("SECRET")
            .map(|(_, rest)| rest)
            .unwrap_or(value);
        assert!(
            !log.contains(secret),
            "the {name} header leaked into the log"
        );
    }
    assert!(
        !log.to_ascii_lowercase().contains("x-user-id"),
        "the identity header appears in the log"
    );

    let lines = json_lines(&log);
    let id_of = |line: &Value| {
        line["spans"].as_array().and_then(|spans| {
            spans
                .iter()
                .find_map(|span| span["request_id"].as_str().map(str::to_string))
        })
    };
    // Every line logged inside a request carries its id: a line with spans but no request
    // span can only come from a background task (the sweeper), never from a request.
    for line in &lines {
        let in_a_request = line["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(|span| span["name"] == "request"));
        if in_a_request {
            assert!(
                id_of(line).is_some(),
                "a request line without request_id: {line}"
            );
        }
    }
    let request_lines = lines.iter().filter(|line| id_of(line).is_some()).count();
    assert!(
        request_lines >= 6,
        "{request_lines} lines carry a request id"
    );
    // …and each request's own lines are there, with the right id.
    let lines_with = |id: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|line| id_of(line).as_deref() == Some(id))
            .collect()
    };
    let hold_lines = lines_with("edge-hold-0001");
    let messages: Vec<&str> = hold_lines
        .iter()
        .filter_map(|line| line["fields"]["message"].as_str())
        .collect();
    assert!(
        messages.contains(&"held a protected change"),
        "{messages:?}"
    );
    assert!(messages.contains(&"request finished"), "{messages:?}");
    // The access line says what the request was (method and path; never the query).
    let finished = hold_lines
        .iter()
        .find(|line| line["fields"]["message"] == "request finished")
        .expect("the hold's access line");
    assert_eq!(finished["fields"]["method"], "PUT", "{finished}");
    assert_eq!(
        finished["fields"]["path"],
        api.path_and_query.as_str(),
        "{finished}"
    );
    assert_eq!(finished["fields"]["outcome"], "held", "{finished}");
    // Whatever mentions the change was logged inside the hold's request.
    for line in &lines {
        if line.to_string().contains(&change)
            && line["fields"]["message"] == "held a protected change"
        {
            assert_eq!(id_of(line).as_deref(), Some("edge-hold-0001"), "{line}");
        }
    }
    // The database work done for the hold, deep in the store, is logged under its id too.
    let change_inserts: Vec<&Value> = lines
        .iter()
        .filter(|line| {
            line["fields"]["summary"]
                .as_str()
                .is_some_and(|summary| summary.starts_with("INSERT INTO changes"))
        })
        .collect();
    assert_eq!(change_inserts.len(), 1, "{change_inserts:?}");
    assert_eq!(
        id_of(change_inserts[0]).as_deref(),
        Some("edge-hold-0001"),
        "{}",
        change_inserts[0]
    );
    assert!(
        !lines_with(&generated).is_empty(),
        "the pass-through's debug line"
    );
    assert!(!lines_with("edge-page-0002").is_empty());
    drop(gate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_then_exits_0() {
    let Some(mut cluster) = Cluster::start(1).await else {
        return;
    };
    let a = cluster.a();
    let alice = cluster.user("alice");
    cluster
        .upstream
        .slow_down("/api/v1/slow", Duration::from_secs(2));
    let in_flight = tokio::spawn(
        alice
            .request(&a, Method::GET, "/api/v1/slow")
            .timeout(PATIENCE)
            .send(),
    );
    cluster.upstream.wait_for("/api/v1/slow", 1).await;
    cluster.gates[0].send_sigterm();
    let response = in_flight
        .await
        .expect("the request task")
        .expect("the request in flight is answered, not cut off");
    let body = expect_json(response, StatusCode::OK).await;
    assert_eq!(body["path"], "/api/v1/slow");
    let status = cluster.gates[0].wait_for_exit().await;
    assert_eq!(status.code(), Some(0), "{}", cluster.gates[0].log());
    // Not accepting any more.
    assert!(
        reqwest::get(format!("{a}/api/v1/ticker")).await.is_err(),
        "a stopped gate must not answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_leaves_held_and_cooling_off_changes_as_they_were() {
    let Some(mut cluster) = Cluster::start(1).await else {
        return;
    };
    let a = cluster.a();
    let alice = cluster.user("alice");
    alice.register_passkey(&a).await;
    let waiting_api = enable_withdrawals("k1");
    let waiting = alice.hold(&a, &waiting_api).await;
    let cooling_api = enable_withdrawals("k2");
    let cooling = alice.hold(&a, &cooling_api).await;
    alice.confirm(&a, &cooling).await;

    let status = cluster.gates[0].sigterm().await;
    assert_eq!(status.code(), Some(0));
    cluster.restart(0).await;

    assert_eq!(alice.change_state(&a, &waiting).await, "held");
    assert_eq!(alice.change_state(&a, &cooling).await, "cooling_off");
    expect_error(
        alice.release(&a, &cooling_api, &cooling).await,
        StatusCode::FORBIDDEN,
        "cooling_off",
    )
    .await;
    // The held one can still be confirmed, and the cooling one released once it is due.
    alice.confirm(&a, &waiting).await;
    cluster.clock.set_offset(COOLING_OFF_PASSED);
    expect_json(
        alice.release(&a, &cooling_api, &cooling).await,
        StatusCode::OK,
    )
    .await;
    let received = cluster.upstream.received_on(&cooling_api.path_and_query);
    assert_eq!(received.len(), 1);
    assert_is_release_of(&received[0], &cooling_api, &cooling);
    assert!(
        cluster
            .upstream
            .received_on(&waiting_api.path_and_query)
            .is_empty(),
        "a change that is only confirmed now is not released"
    );
}
