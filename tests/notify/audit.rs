//! The tamper-evident audit log: a story leaves one hash-chained row per security-relevant
//! event; `stepgate audit verify` (the real binary, on the same config and database) passes
//! on the untouched log and, after one row is edited, deleted or swapped with plain SQL,
//! fails with exit code 2 and names that row; `stepgate audit export` writes one JSON line
//! per row. Refusals and identity failures on gate routes are rows too, with their reason.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row};

use crate::gate_client::{enable_withdrawals, expect_error, expect_json, GateUser};
use crate::harness::{status_and_text, GateOptions, TestGate, COOLING_OFF};
use crate::on_both_backends;
use crate::testdb::Backend;

on_both_backends!(
    an_untouched_log_verifies_and_exports_one_line_per_row,
    editing_deleting_or_swapping_a_row_is_named_by_verify,
    refusals_are_audited_with_their_reason,
    identity_failures_on_gate_routes_are_audited,
);

const STEPGATE: &str = env!("CARGO_BIN_EXE_stepgate");

/// A story that touches every kind of change event: a passkey, a change held, confirmed,
/// refused an early release, released and applied; one cancelled; one expired; a freeze.
async fn story(gate: &TestGate, alice: &GateUser) {
    alice.register_passkey(&gate.address).await;
    let api = enable_withdrawals("k1");
    let released = alice.hold(&gate.address, &api).await;
    alice.confirm(&gate.address, &released).await;
    let early = alice.release(&gate.address, &api, &released).await;
    expect_error(early, StatusCode::FORBIDDEN, "cooling_off").await;
    let cancelled = alice.hold(&gate.address, &enable_withdrawals("k2")).await;
    expect_json(
        alice.cancel(&gate.address, &cancelled).await,
        StatusCode::OK,
    )
    .await;
    let lapsing = alice.hold(&gate.address, &enable_withdrawals("k3")).await;
    gate.advance(COOLING_OFF + Duration::from_secs(1));
    let response = alice.release(&gate.address, &api, &released).await;
    expect_json(response, StatusCode::OK).await;
    assert_eq!(alice.change_state(&gate.address, &lapsing).await, "expired");
    let response = alice
        .request(&gate.address, Method::POST, "/_stepgate/api/account/freeze")
        .send()
        .await
        .expect("send freeze");
    expect_json(response, StatusCode::OK).await;
}

/// What a `stepgate` process printed and how it ended.
struct CliRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `stepgate audit <action> --config <the gate's config file>`.
async fn audit_cli(gate: &TestGate, action: &str) -> CliRun {
    let config = gate.config_path.clone();
    let action = action.to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(STEPGATE)
            .args(["audit", &action, "--config"])
            .arg(&config)
            .output()
    })
    .await
    .expect("the CLI task panicked")
    .expect("run the stepgate binary");
    CliRun {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `audit verify` must pass and count `rows`.
async fn assert_intact(gate: &TestGate, rows: usize, context: &str) {
    let run = audit_cli(gate, "verify").await;
    assert_eq!(
        run.code,
        Some(0),
        "{context}: audit verify must pass\nstdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    let expected = format!("audit log intact: {rows} rows verified");
    assert!(
        run.stdout.contains(&expected),
        "{context}: expected `{expected}`, got stdout: {}",
        run.stdout
    );
}

/// `audit verify` must fail with exit code 2 and name row `seq`.
async fn assert_broken_at(gate: &TestGate, seq: i64, context: &str) {
    let run = audit_cli(gate, "verify").await;
    assert_eq!(
        run.code,
        Some(2),
        "{context}: audit verify must fail with exit code 2\nstdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    let expected = format!("audit log broken at row {seq}:");
    assert!(
        run.stderr.contains(&expected),
        "{context}: expected `{expected}` on stderr, got: {}",
        run.stderr
    );
}

/// Plain SQL on the gate's database, as someone covering their tracks would use.
struct Tamperer {
    pool: AnyPool,
}

/// One audit row's stored columns, apart from its sequence number.
#[derive(Debug, Clone, PartialEq)]
struct StoredRow {
    occurred_at: i64,
    user_id: String,
    kind: String,
    change_id: Option<String>,
    detail: String,
    prev_hash: String,
    hash: String,
}

impl Tamperer {
    async fn connect(gate: &TestGate) -> Self {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect(&gate.database_url)
            .await
            .expect("connect to the gate's database");
        Self { pool }
    }

    async fn count(&self) -> i64 {
        sqlx::query("SELECT COUNT(*) AS n FROM audit_log")
            .fetch_one(&self.pool)
            .await
            .expect("count audit rows")
            .try_get("n")
            .expect("a count")
    }

    async fn row(&self, seq: i64) -> StoredRow {
        let row = sqlx::query(
            "SELECT occurred_at, user_id, kind, change_id, detail, prev_hash, hash \
             FROM audit_log WHERE seq = $1",
        )
        .bind(seq)
        .fetch_one(&self.pool)
        .await
        .unwrap_or_else(|e| panic!("read audit row {seq}: {e}"));
        StoredRow {
            occurred_at: row.try_get("occurred_at").expect("occurred_at"),
            user_id: row.try_get("user_id").expect("user_id"),
            kind: row.try_get("kind").expect("kind"),
            change_id: row.try_get("change_id").expect("change_id"),
            detail: row.try_get("detail").expect("detail"),
            prev_hash: row.try_get("prev_hash").expect("prev_hash"),
            hash: row.try_get("hash").expect("hash"),
        }
    }

    async fn overwrite(&self, seq: i64, with: &StoredRow) {
        let done = sqlx::query(
            "UPDATE audit_log SET occurred_at = $1, user_id = $2, kind = $3, change_id = $4, \
             detail = $5, prev_hash = $6, hash = $7 WHERE seq = $8",
        )
        .bind(with.occurred_at)
        .bind(&with.user_id)
        .bind(&with.kind)
        .bind(with.change_id.clone())
        .bind(&with.detail)
        .bind(&with.prev_hash)
        .bind(&with.hash)
        .bind(seq)
        .execute(&self.pool)
        .await
        .unwrap_or_else(|e| panic!("overwrite audit row {seq}: {e}"));
        assert_eq!(done.rows_affected(), 1);
    }

    async fn delete(&self, seq: i64) {
        let done = sqlx::query("DELETE FROM audit_log WHERE seq = $1")
            .bind(seq)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("delete audit row {seq}: {e}"));
        assert_eq!(done.rows_affected(), 1);
    }

    async fn insert(&self, seq: i64, row: &StoredRow) {
        sqlx::query(
            "INSERT INTO audit_log (seq, occurred_at, user_id, kind, change_id, detail, \
             prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(seq)
        .bind(row.occurred_at)
        .bind(&row.user_id)
        .bind(&row.kind)
        .bind(row.change_id.clone())
        .bind(&row.detail)
        .bind(&row.prev_hash)
        .bind(&row.hash)
        .execute(&self.pool)
        .await
        .unwrap_or_else(|e| panic!("insert audit row {seq}: {e}"));
    }
}

async fn an_untouched_log_verifies_and_exports_one_line_per_row(backend: Backend) {
    let Some(mut gate) = TestGate::start(backend, GateOptions::default()).await else {
        return;
    };
    let alice = gate.user("alice");
    story(&gate, &alice).await;
    // The CLI reads the log as an operator would, with the gate stopped; nothing may append
    // in the middle of the checks.
    gate.stop().await;
    let rows = gate.audit_rows().await;
    let tamperer = Tamperer::connect(&gate).await;
    assert_eq!(tamperer.count().await, rows.len() as i64);
    assert_intact(&gate, rows.len(), "the untouched log").await;

    let run = audit_cli(&gate, "export").await;
    assert_eq!(run.code, Some(0), "audit export: {}", run.stderr);
    let lines: Vec<Value> = run
        .stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("an export line is not JSON ({e}): {line}"))
        })
        .collect();
    assert_eq!(lines.len(), rows.len(), "one JSON line per row");
    let mut prev_hash = stepgate::audit::GENESIS.to_string();
    for (i, line) in lines.iter().enumerate() {
        for key in [
            "seq",
            "occurred_at",
            "user_id",
            "kind",
            "change_id",
            "detail",
            "prev_hash",
            "hash",
        ] {
            assert!(
                line.get(key).is_some(),
                "export line without `{key}`: {line}"
            );
        }
        assert_eq!(line["seq"], i + 1, "export lines in order: {line}");
        assert_eq!(
            line["prev_hash"],
            prev_hash.as_str(),
            "the chain links: {line}"
        );
        assert_eq!(line["hash"], rows[i].hash.as_str());
        prev_hash = line["hash"].as_str().expect("a hash").to_string();
    }
    let kinds: HashSet<&str> = lines.iter().filter_map(|l| l["kind"].as_str()).collect();
    for kind in [
        "passkey.added",
        "change.held",
        "change.confirmed",
        "change.release_refused",
        "change.cancelled",
        "change.releasing",
        "change.applied",
        "change.expired",
        "account.frozen",
    ] {
        assert!(
            kinds.contains(kind),
            "no `{kind}` row in the audit log: {kinds:?}"
        );
    }
}

async fn editing_deleting_or_swapping_a_row_is_named_by_verify(backend: Backend) {
    let Some(mut gate) = TestGate::start(backend, GateOptions::default()).await else {
        return;
    };
    let alice = gate.user("alice");
    story(&gate, &alice).await;
    gate.stop().await;
    let tamperer = Tamperer::connect(&gate).await;
    let total = tamperer.count().await;
    assert!(total >= 8, "the story should leave a few rows, got {total}");
    let total_rows = usize::try_from(total).expect("a row count");
    assert_intact(&gate, total_rows, "before tampering").await;

    // Editing one row's detail (say, the reason of a refusal or a summary).
    let original = tamperer.row(3).await;
    let mut edited = original.clone();
    edited.detail = r#"{"note":"nothing happened here"}"#.to_string();
    tamperer.overwrite(3, &edited).await;
    assert_broken_at(&gate, 3, "row 3's detail edited").await;
    tamperer.overwrite(3, &original).await;
    assert_intact(&gate, total_rows, "row 3 restored").await;

    // Editing who it was about.
    let original = tamperer.row(5).await;
    let mut edited = original.clone();
    edited.user_id = "mallory".to_string();
    tamperer.overwrite(5, &edited).await;
    assert_broken_at(&gate, 5, "row 5's user edited").await;
    tamperer.overwrite(5, &original).await;
    assert_intact(&gate, total_rows, "row 5 restored").await;

    // Deleting one row.
    let original = tamperer.row(4).await;
    tamperer.delete(4).await;
    assert_broken_at(&gate, 4, "row 4 deleted").await;
    tamperer.insert(4, &original).await;
    assert_intact(&gate, total_rows, "row 4 put back").await;

    // Swapping two rows' contents (reordering what happened).
    let sixth = tamperer.row(6).await;
    let seventh = tamperer.row(7).await;
    tamperer.overwrite(6, &seventh).await;
    tamperer.overwrite(7, &sixth).await;
    assert_broken_at(&gate, 6, "rows 6 and 7 swapped").await;
    tamperer.overwrite(6, &sixth).await;
    tamperer.overwrite(7, &seventh).await;
    assert_intact(&gate, total_rows, "rows 6 and 7 back in order").await;

    // Deleting the last row (the most recent event) is caught too.
    let last = tamperer.row(total).await;
    tamperer.delete(total).await;
    assert_broken_at(&gate, total, "the last row deleted").await;
    tamperer.insert(total, &last).await;
    assert_intact(&gate, total_rows, "the last row put back").await;

    // Editing a row and recomputing its own hash still breaks the link to the next row.
    let original = tamperer.row(3).await;
    let mut forged = original.clone();
    forged.detail = r#"{"note":"rehashed"}"#.to_string();
    forged.hash = stepgate::audit::row_hash(
        &forged.prev_hash,
        3,
        forged.occurred_at,
        &forged.user_id,
        &forged.kind,
        forged.change_id.as_deref(),
        &forged.detail,
    );
    tamperer.overwrite(3, &forged).await;
    assert_broken_at(&gate, 4, "row 3 edited and rehashed").await;
    tamperer.overwrite(3, &original).await;
    assert_intact(&gate, total_rows, "row 3 restored again").await;
}

/// The audit rows of `kind`, with their detail parsed.
async fn rows_of(gate: &TestGate, kind: &str) -> Vec<(String, Value)> {
    gate.audit_rows()
        .await
        .into_iter()
        .filter(|row| row.kind == kind)
        .map(|row| {
            let detail = serde_json::from_str(&row.detail)
                .unwrap_or_else(|e| panic!("audit detail is not JSON ({e}): {}", row.detail));
            (row.user_id, detail)
        })
        .collect()
}

async fn refusals_are_audited_with_their_reason(backend: Backend) {
    let Some(gate) = TestGate::start(backend, GateOptions::default()).await else {
        return;
    };
    let alice = gate.user("alice");
    alice.register_passkey(&gate.address).await;
    let api = enable_withdrawals("k1");
    let change_id = alice.hold(&gate.address, &api).await;

    // A confirmation with a forged assertion.
    let options = alice.start_confirmation(&gate.address, &change_id).await;
    let mut forged = alice.sign(&options);
    let signature = forged["response"]["signature"]
        .as_str()
        .expect("an assertion has a signature")
        .to_string();
    let mut bytes = signature.into_bytes();
    let middle = bytes.len() / 2;
    bytes[middle] = if bytes[middle] == b'A' { b'B' } else { b'A' };
    forged["response"]["signature"] = Value::String(String::from_utf8(bytes).expect("ASCII"));
    let response = alice
        .finish_confirmation(&gate.address, &change_id, &options, &forged)
        .await;
    let (status, text) = status_and_text(response).await;
    assert!(status.is_client_error(), "{status}: {text}");
    let refused: Value = serde_json::from_str(&text).expect("a JSON error");
    let rows = rows_of(&gate, "change.confirm_refused").await;
    assert_eq!(rows.len(), 1, "one confirm_refused row: {rows:?}");
    assert_eq!(rows[0].0, "alice");
    assert_eq!(rows[0].1["change_id"], change_id.as_str(), "{:?}", rows[0]);
    assert_eq!(
        rows[0].1["reason"], refused["error"],
        "the row says why, as the user was told: {:?}",
        rows[0]
    );

    // Releases refused for being early and for not being the held request.
    alice.confirm(&gate.address, &change_id).await;
    let response = alice.release(&gate.address, &api, &change_id).await;
    expect_error(response, StatusCode::FORBIDDEN, "cooling_off").await;
    let other = api.clone();
    let mut other = other;
    other.body = b"{\"permissions\": [\"withdraw\"]}".to_vec();
    let response = alice.release(&gate.address, &other, &change_id).await;
    expect_error(response, StatusCode::FORBIDDEN, "change_mismatch").await;
    let rows = rows_of(&gate, "change.release_refused").await;
    let reasons: Vec<&str> = rows
        .iter()
        .map(|(_, detail)| detail["reason"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(reasons, ["cooling_off", "change_mismatch"], "{rows:?}");
    for (user, detail) in &rows {
        assert_eq!(user, "alice");
        assert_eq!(detail["change_id"], change_id.as_str());
    }
    assert!(gate.upstream.received().is_empty());
    assert_intact(&gate, gate.audit_rows().await.len(), "after the refusals").await;
}

async fn identity_failures_on_gate_routes_are_audited(backend: Backend) {
    let Some(gate) = TestGate::start(backend, GateOptions::default()).await else {
        return;
    };
    let some_change = uuid::Uuid::new_v4();
    let attempts = [
        (Method::GET, "/_stepgate/api/changes".to_string()),
        (Method::POST, "/_stepgate/api/account/freeze".to_string()),
        (
            Method::POST,
            format!("/_stepgate/api/changes/{some_change}/confirm/start"),
        ),
    ];
    for (method, path) in &attempts {
        let response = gate
            .stranger()
            .request(method.clone(), format!("{}{path}", gate.address))
            .json(&serde_json::json!({}))
            .send()
            .await
            .expect("send without identity");
        expect_error(response, StatusCode::UNAUTHORIZED, "unauthenticated").await;
    }
    let rows = rows_of(&gate, "identity.refused").await;
    assert_eq!(
        rows.len(),
        attempts.len(),
        "each identity failure on a gate route is an audit row: {rows:?}"
    );
    for (_, detail) in &rows {
        assert!(
            detail["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "identity.refused says why: {detail}"
        );
    }
}
