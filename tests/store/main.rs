//! The store conformance suite: every test runs once on SQLite and once on PostgreSQL, each on
//! a fresh database, so the two backends cannot drift apart. The guarantees checked here are
//! the ones the gate's correctness rests on: a ceremony is taken once, a transition is applied
//! once, a credential id is unique, and what is written reads back exactly.

#[path = "../common/testdb.rs"]
mod testdb;

use std::time::Duration;

use stepgate::clock::{Clock, ManualClock};
use stepgate::stepup::state::transition;
use stepgate::stepup::{Change, Event, State};
use stepgate::store::sessions::DbSessionStore;
use stepgate::store::{
    AuditEntry, CeremonyKind, CeremonyRecord, Effects, OutboxItem, PasskeyRecord, PasskeyState,
    Store, StoreError,
};
use testdb::{Backend, TestDb};
use time::OffsetDateTime;
use tower_sessions::session::{Id, Record};
use tower_sessions::SessionStore;
use uuid::Uuid;
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_authenticator_rs::WebauthnAuthenticator;
use webauthn_rs::prelude::{Passkey, Url};
use webauthn_rs::WebauthnBuilder;

/// Runs each listed test on both backends.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Postgres).await } )*
        }
    };
}

on_both_backends!(
    user_handles_are_stable_and_distinct,
    credential_ids_are_unique_across_users,
    ceremonies_are_taken_once_by_their_owner_only,
    changes_round_trip_exactly,
    a_transition_is_applied_once_under_contention,
    changes_are_listed_newest_first_per_user,
    expired_ceremonies_are_removed,
    sessions_are_saved_loaded_and_expire,
    passkey_use_is_recorded,
    a_release_lease_is_taken_by_one_instance_only,
    lapsed_changes_expire_once_across_instances,
    concurrent_audited_moves_keep_one_linear_chain,
    outbox_claims_do_not_overlap_and_dead_letters_can_be_requeued,
);

fn no_effects(_: &Change) -> Effects {
    Effects::default()
}

async fn store(backend: Backend) -> Option<(Store, TestDb)> {
    let db = TestDb::new(backend).await?;
    let store = Store::connect(&db.url).await.expect("connect");
    store.migrate().await.expect("migrate");
    Some((store, db))
}

fn now() -> OffsetDateTime {
    ManualClock::starting_now().now()
}

fn make_passkey() -> Passkey {
    let origin = Url::parse("http://localhost:8080").expect("origin");
    let webauthn = WebauthnBuilder::new("localhost", &origin)
        .expect("builder")
        .build()
        .expect("webauthn");
    let (challenge, state) = webauthn
        .start_passkey_registration(Uuid::new_v4(), "u", "u", None)
        .expect("start");
    let mut authenticator = SoftPasskey::new(true);
    let credential = authenticator
        .do_registration(origin, challenge)
        .expect("register");
    webauthn
        .finish_passkey_registration(&credential, &state)
        .expect("finish")
}

fn passkey_record(user: &str, passkey: Passkey, credential_id: &str) -> PasskeyRecord {
    PasskeyRecord {
        id: Uuid::new_v4(),
        user_id: user.to_string(),
        credential_id: credential_id.to_string(),
        name: "key".into(),
        passkey,
        backup_eligible: false,
        created_at: now(),
        last_used_at: None,
        state: PasskeyState::Active,
        aaguid: None,
        activation_change_id: None,
    }
}

fn held_change(user: &str, at: OffsetDateTime) -> Change {
    Change {
        id: Uuid::new_v4(),
        user_id: user.into(),
        rule: "enable-withdrawals".into(),
        method: "PUT".into(),
        path: "/api/v1/api-keys/k1".into(),
        query: Some("a=1&b=%20".into()),
        headers: vec![("content-type".into(), "application/json".into())],
        // Bytes that are not UTF-8 must survive too.
        body: vec![b'{', 0xff, 0x00, b'}'],
        digest: "abc".into(),
        summary: "Enable withdrawals on API key k1".into(),
        state: State::Held,
        cooling_off: Duration::from_secs(86_400),
        release_within: Duration::from_secs(7 * 86_400),
        created_at: at,
        confirm_before: at + Duration::from_secs(600),
        confirmed_at: None,
        release_at: None,
        release_before: None,
        finished_at: None,
        lease_until: None,
        release_attempts: 0,
        outcome_status: None,
        quarantined_until: None,
    }
}

fn ceremony(user: &str, binding: &str, at: OffsetDateTime) -> CeremonyRecord {
    CeremonyRecord {
        id: Uuid::new_v4(),
        kind: CeremonyKind::Confirm,
        user_id: user.into(),
        change_id: Some(Uuid::new_v4()),
        change_digest: Some("digest".into()),
        session_binding: binding.into(),
        state_json: "{\"s\":1}".into(),
        created_at: at,
        expires_at: at + Duration::from_secs(300),
    }
}

async fn user_handles_are_stable_and_distinct(backend: Backend) {
    let Some((store, _db)) = store(backend).await else {
        return;
    };
    let alice = store.user_handle("alice", now()).await.expect("alice");
    assert_eq!(
        store.user_handle("alice", now()).await.expect("again"),
        alice
    );
    assert_ne!(store.user_handle("bob", now()).await.expect("bob"), alice);
}

async fn credential_ids_are_unique_across_users(backend: Backend) {
    let Some((store, _db)) = store(backend).await else {
        return;
    };
    store.user_handle("alice", now()).await.expect("alice");
    store.user_handle("bob", now()).await.expect("bob");
    let passkey = make_passkey();
    store
        .insert_passkey(
            &passkey_record("alice", passkey.clone(), "cred-1"),
            &Effects::default(),
        )
        .await
        .expect("first registration");
    let second = store
        .insert_passkey(
            &passkey_record("bob", passkey, "cred-1"),
            &Effects::default(),
        )
        .await;
    assert!(matches!(second, Err(StoreError::Duplicate)), "{second:?}");
    assert_eq!(store.passkeys_of("alice").await.expect("list").len(), 1);
    assert!(store.passkeys_of("bob").await.expect("list").is_empty());
}

async fn ceremonies_are_taken_once_by_their_owner_only(backend: Backend) {
    let Some((store, _db)) = store(backend).await else {
        return;
    };
    let record = ceremony("alice", "session-a", now());
    store.insert_ceremony(&record).await.expect("insert");
    let kind = CeremonyKind::Confirm;
    // Another user, another session or another kind cannot take it, and it stays.
    assert!(store
        .take_ceremony(record.id, kind, "bob", "session-a", now())
        .await
        .expect("bob")
        .is_none());
    assert!(store
        .take_ceremony(record.id, kind, "alice", "session-b", now())
        .await
        .expect("b")
        .is_none());
    assert!(store
        .take_ceremony(
            record.id,
            CeremonyKind::Register,
            "alice",
            "session-a",
            now()
        )
        .await
        .expect("kind")
        .is_none());
    // Concurrent takes by the owner: exactly one gets it.
    let takes = (0..16).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .take_ceremony(record.id, kind, "alice", "session-a", now())
                .await
        })
    });
    let mut taken = Vec::new();
    for take in takes {
        if let Some(c) = take.await.expect("join").expect("take") {
            taken.push(c);
        }
    }
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].state_json, record.state_json);
    assert_eq!(taken[0].change_id, record.change_id);
    assert_eq!(taken[0].change_digest.as_deref(), Some("digest"));
}

async fn changes_round_trip_exactly(backend: Backend) {
    let Some((store, _db)) = store(backend).await else {
        return;
    };
    let change = held_change("alice", now());
    store
        .insert_change(&change, &Effects::default())
        .await
        .expect("insert");
    let read = store
        .change(change.id)
        .await
        .expect("read")
        .expect("present");
    assert_eq!(read.body, change.body);
    assert_eq!(read.query, change.query);
    assert_eq!(read.headers, change.headers);
    assert_eq!(read.state, State::Held);
    assert_eq!(read.created_at, change.created_at);
    assert_eq!(read.confirm_before, change.confirm_before);
    assert_eq!(read.cooling_off, change.cooling_off);
    assert_eq!(read.release_within, change.release_within);
    assert_eq!(read.release_at, None);
    assert!(store.change(Uuid::new_v4()).await.expect("read").is_none());
}

async fn a_transition_is_applied_once_under_contention(backend: Backend) {
    let Some((store, _db)) = store(backend).await else {
        return;
    };
    let t0 = now();
    let change = held_change("alice", t0);
    store
        .insert_change(&change, &Effects::default())
        .await
        .expect("insert");
    let confirm = transition(&change, Event::Confirm { not_before: None }, t0).expect("confirm");
    let attempts = (0..32).map(|_| {
        let store = store.clone();
        let confirm = confirm.clone();
        let change = change.clone();
        tokio::spawn(async move { store.apply_transition(&change, &confirm, &no_effects).await })
    });
    let mut wins = 0;
    for attempt in attempts {
        if attempt.await.expect("join").expect("apply") {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
    let read = store
        .change(change.id)
        .await
        .expect("read")
        .expect("present");
    assert_eq!(read.state, State::CoolingOff);
    assert_eq!(read.confirmed_at, Some(t0));
    assert_eq!(read.release_at, Some(t0 + Duration::from_secs(86_400)));
    // A transition from a state the row is no longer in does nothing.
    assert!(!store
        .apply_transition(&change, &confirm, &no_effects)
        .await
        .expect("stale"));
}

async fn a_release_lease_is_taken_by_one_instance_only(backend: Backend) {
    let Some((store, _db)) = store(backend).await else {
        return;
    };
    let t0 = now();
    let mut change = held_change("alice", t0);
    change.cooling_off = Duration::ZERO;
    store
        .insert_change(&change, &Effects::default())
        .await
        .expect("insert");
    let confirm = transition(&change, Event::Confirm { not_before: None }, t0).expect("confirm");
    assert!(store
        .apply_transition(&change, &confirm, &no_effects)
        .await
        .expect("confirm"));
    let confirmed = store
        .change(change.id)
        .await
        .expect("read")
        .expect("present");
    assert_eq!(confirmed.state, State::CoolingOff);

    // Two instances read the same cooling-off change and both try to take it.
    let lease = Duration::from_secs(40);
    let release = |at: OffsetDateTime| Event::Release {
        lease_until: at + lease,
    };
    let taken = transition(&confirmed, release(t0), t0).expect("release");
    assert!(store
        .apply_transition(&confirmed, &taken, &no_effects)
        .await
        .expect("first"));
    assert!(!store
        .apply_transition(&confirmed, &taken, &no_effects)
        .await
        .expect("second"));
    let applying = store
        .change(change.id)
        .await
        .expect("read")
        .expect("present");
    assert_eq!(applying.state, State::Applying);
    assert_eq!(applying.release_attempts, 1);
    assert_eq!(applying.lease_until, Some(t0 + lease));

    // After the lease ran out, two instances retry from the same read: one wins.
    let later = t0 + lease + Duration::from_secs(1);
    let retry = transition(&applying, release(later), later).expect("retry");
    assert!(store
        .apply_transition(&applying, &retry, &no_effects)
        .await
        .expect("retry 1"));
    assert!(!store
        .apply_transition(&applying, &retry, &no_effects)
        .await
        .expect("retry 2"));
    let read = store
        .change(change.id)
        .await
        .expect("read")
        .expect("present");
    assert_eq!(read.release_attempts, 2);
    assert_eq!(read.lease_until, Some(later + lease));

    // The first forward's late outcome, reported with the stale lease, does not land.
    let stale_outcome = transition(&applying, Event::Delivered { status: 200 }, later).expect("o");
    assert!(!store
        .apply_transition(&applying, &stale_outcome, &no_effects)
        .await
        .expect("stale"));
    let delivered = transition(&read, Event::Delivered { status: 201 }, later).expect("outcome");
    assert!(store
        .apply_transition(&read, &delivered, &no_effects)
        .await
        .expect("deliver"));
    let done = store
        .change(change.id)
        .await
        .expect("read")
        .expect("present");
    assert_eq!(done.state, State::Applied);
    assert_eq!(done.outcome_status, Some(201));
    assert_eq!(done.finished_at, Some(later));
}

async fn lapsed_changes_expire_once_across_instances(backend: Backend) {
    let Some((store, db)) = store(backend).await else {
        return;
    };
    // A second pool on the same database stands in for a second gate instance.
    let other = Store::connect(&db.url).await.expect("second instance");
    let t0 = now();
    let mut lapsed = Vec::new();
    for i in 0..250u64 {
        let change = held_change("alice", t0 - Duration::from_secs(3600 + i));
        store
            .insert_change(&change, &Effects::default())
            .await
            .expect("insert");
        lapsed.push(change.id);
    }
    let fresh = held_change("alice", t0);
    store
        .insert_change(&fresh, &Effects::default())
        .await
        .expect("insert");
    let sweep = |store: Store| {
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = store
                    .expire_lapsed(t0, 20, &no_effects)
                    .await
                    .expect("sweep");
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(batch);
            }
        })
    };
    let (a, b) = (sweep(store.clone()), sweep(other));
    let mut expired = a.await.expect("join a");
    expired.extend(b.await.expect("join b"));
    let total = expired.len();
    expired.sort();
    expired.dedup();
    assert_eq!(expired.len(), total, "a change was expired twice");
    lapsed.sort();
    assert_eq!(expired, lapsed);
    let read = store
        .change(fresh.id)
        .await
        .expect("read")
        .expect("present");
    assert_eq!(read.state, State::Held);
    let one = store
        .change(lapsed[0])
        .await
        .expect("read")
        .expect("present");
    assert_eq!(one.state, State::Expired);
    assert_eq!(one.finished_at, Some(t0));
}

async fn changes_are_listed_newest_first_per_user(backend: Backend) {
    let Some((store, _db)) = store(backend).await else {
        return;
    };
    let t0 = now();
    let older = held_change("alice", t0);
    let newer = held_change("alice", t0 + Duration::from_secs(5));
    let other = held_change("bob", t0 + Duration::from_secs(10));
    for change in [&older, &newer, &other] {
        store
            .insert_change(change, &Effects::default())
            .await
            .expect("insert");
    }
    let listed: Vec<Uuid> = store
        .changes_of("alice", 100)
        .await
        .expect("list")
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(listed, vec![newer.id, older.id]);
    assert_eq!(store.changes_of("alice", 1).await.expect("list").len(), 1);
}

async fn expired_ceremonies_are_removed(backend: Backend) {
    let Some((store, _db)) = store(backend).await else {
        return;
    };
    let t0 = now();
    let record = ceremony("alice", "s", t0);
    store.insert_ceremony(&record).await.expect("insert");
    assert_eq!(store.delete_expired_ceremonies(t0).await.expect("sweep"), 0);
    let later = t0 + Duration::from_secs(301);
    assert_eq!(
        store.delete_expired_ceremonies(later).await.expect("sweep"),
        1
    );
    let taken = store
        .take_ceremony(record.id, CeremonyKind::Confirm, "alice", "s", now())
        .await
        .expect("take");
    assert!(taken.is_none());
}

async fn sessions_are_saved_loaded_and_expire(backend: Backend) {
    let Some((store, _db)) = store(backend).await else {
        return;
    };
    // Session expiry follows the wall clock, as tower-sessions stamps it.
    let sessions = DbSessionStore::new(store);
    let mut record = Record {
        id: Id::default(),
        data: Default::default(),
        expiry_date: stepgate::clock::wall_now() + Duration::from_secs(3600),
    };
    record
        .data
        .insert("ceremony_binding".into(), serde_json::json!("b1"));
    sessions.create(&mut record).await.expect("create");
    let loaded = sessions
        .load(&record.id)
        .await
        .expect("load")
        .expect("present");
    assert_eq!(loaded.data, record.data);
    record
        .data
        .insert("ceremony_binding".into(), serde_json::json!("b2"));
    sessions.save(&record).await.expect("save");
    let loaded = sessions
        .load(&record.id)
        .await
        .expect("load")
        .expect("present");
    assert_eq!(loaded.data["ceremony_binding"], "b2");
    // A session whose expiry has passed is not loaded.
    record.expiry_date = stepgate::clock::wall_now() - Duration::from_secs(1);
    sessions.save(&record).await.expect("save");
    assert!(sessions.load(&record.id).await.expect("load").is_none());
    sessions.delete(&record.id).await.expect("delete");
}

async fn passkey_use_is_recorded(backend: Backend) {
    let Some((store, _db)) = store(backend).await else {
        return;
    };
    store.user_handle("alice", now()).await.expect("user");
    let record = passkey_record("alice", make_passkey(), "cred-x");
    store
        .insert_passkey(&record, &Effects::default())
        .await
        .expect("insert");
    let used_at = now() + Duration::from_secs(42);
    store
        .record_passkey_use(record.id, &record.passkey, used_at)
        .await
        .expect("use");
    let read = store.passkeys_of("alice").await.expect("list");
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].last_used_at, Some(used_at));
    assert_eq!(read[0].credential_id, "cred-x");
}

fn audited(kind: &'static str) -> impl Fn(&Change) -> Effects + Sync {
    move |change: &Change| Effects {
        audit: vec![AuditEntry {
            user_id: change.user_id.clone(),
            kind: kind.into(),
            change_id: Some(change.id),
            detail: serde_json::json!({ "state": change.state.as_str() }),
        }],
        outbox: vec![],
    }
}

async fn concurrent_audited_moves_keep_one_linear_chain(backend: Backend) {
    let Some((store, db)) = store(backend).await else {
        return;
    };
    let other = Store::connect(&db.url).await.expect("second instance");
    let t0 = now();
    // 12 changes, each confirmed by two racing instances: 12 moves, 12 audit rows.
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let change = held_change("alice", t0);
        store
            .insert_change(&change, &Effects::default())
            .await
            .expect("insert");
        let confirm =
            transition(&change, Event::Confirm { not_before: None }, t0).expect("confirm");
        for instance in [store.clone(), other.clone()] {
            let (change, confirm) = (change.clone(), confirm.clone());
            tasks.push(tokio::spawn(async move {
                instance
                    .apply_transition(&change, &confirm, &audited("change.confirmed"))
                    .await
            }));
        }
    }
    let mut moves = 0;
    for task in tasks {
        if task.await.expect("join").expect("apply") {
            moves += 1;
        }
    }
    assert_eq!(moves, 12, "each change moved once");
    let (rows, (head_seq, head_hash)) = store.audit_log().await.expect("audit log");
    assert_eq!(
        rows.len(),
        12,
        "a move that lost the race wrote no audit row"
    );
    assert_eq!(
        stepgate::audit::verify_chain(rows.clone(), (head_seq, &head_hash)),
        Ok(12)
    );
    // Editing any row is caught and named.
    let mut edited = rows;
    edited[4].detail = "{}".into();
    let broken = stepgate::audit::verify_chain(edited, (head_seq, &head_hash)).unwrap_err();
    assert_eq!(broken.seq, 5);
}

async fn outbox_claims_do_not_overlap_and_dead_letters_can_be_requeued(backend: Backend) {
    let Some((store, db)) = store(backend).await else {
        return;
    };
    let other = Store::connect(&db.url).await.expect("second instance");
    let t0 = now();
    let items: Vec<OutboxItem> = (0..30)
        .map(|i| OutboxItem {
            event_id: Uuid::new_v4(),
            event: "change.held".into(),
            webhook_url: "http://127.0.0.1:1/hook".into(),
            payload: format!("{{\"n\":{i}}}"),
        })
        .collect();
    store
        .append_effects(
            &Effects {
                audit: vec![],
                outbox: items,
            },
            t0,
        )
        .await
        .expect("queue");
    let lease = t0 + Duration::from_secs(60);
    let (a, b) = tokio::join!(
        store.claim_outbox(t0, lease, 20),
        other.claim_outbox(t0, lease, 20)
    );
    let (a, b) = (a.expect("claim a"), b.expect("claim b"));
    assert_eq!(a.len() + b.len(), 30, "every due row was claimed once");
    let mut ids: Vec<&str> = a.iter().chain(b.iter()).map(|r| r.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 30, "no row was claimed twice");
    // Leased rows are not claimed again until the lease runs out.
    assert!(store
        .claim_outbox(t0, lease, 50)
        .await
        .expect("claim")
        .is_empty());
    store
        .outbox_delivered(&a[0].id, t0)
        .await
        .expect("delivered");
    store.outbox_dead(&a[1].id, 8, "boom").await.expect("dead");
    store
        .outbox_retry(&a[2].id, 1, t0 + Duration::from_secs(5), "503")
        .await
        .expect("retry");
    let after_lease = lease + Duration::from_secs(1);
    let again = store
        .claim_outbox(after_lease, after_lease + Duration::from_secs(60), 50)
        .await
        .expect("claim");
    assert_eq!(
        again.len(),
        28,
        "delivered and dead rows are not sent again"
    );
    let dead = store.outbox_in_state("dead").await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error.as_deref(), Some("boom"));
    assert!(store
        .outbox_requeue(&dead[0].id, after_lease)
        .await
        .expect("requeue"));
    assert!(store
        .outbox_in_state("dead")
        .await
        .expect("dead letters")
        .is_empty());
    assert_eq!(
        store
            .outbox_in_state("delivered")
            .await
            .expect("delivered")
            .len(),
        1
    );
}
