//! Start-up in two steps, as a deploy does it: `stepgate migrate` once, then every instance
//! with `serve --no-migrate`.

use sqlx::Connection;

use crate::gate_client::{enable_withdrawals, GateUser};
use crate::harness::{free_ports, Gate, GateSettings, StartUp, TestClock, Upstream};
use crate::testdb::{Backend, TestDb};

/// How many migrations ran successfully, or `None` when there is no migrations table.
async fn applied_migrations(database_url: &str) -> Option<i64> {
    let mut conn = sqlx::PgConnection::connect(database_url)
        .await
        .expect("connect to the test database");
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
            .fetch_one(&mut conn)
            .await
            .expect("look for the migrations table");
    let applied = if exists {
        Some(
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&mut conn)
                .await
                .expect("count the applied migrations"),
        )
    } else {
        None
    };
    let _ = conn.close().await;
    applied
}

fn postgres_migration_files() -> i64 {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres");
    let count = std::fs::read_dir(dir)
        .expect("read migrations/postgres")
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count();
    i64::try_from(count).expect("a small number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_then_serve_without_migrating() {
    let Some(database) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let upstream = Upstream::start().await;
    let clock = TestClock::new();
    let port = free_ports(1)[0];
    let settings = GateSettings {
        public_url: format!("http://localhost:{port}"),
        upstream: upstream.url(),
        database_url: database.url.clone(),
        clock_file: clock.path(),
        database_timeout: "30s",
        extra_toml: String::new(),
    };

    // `--no-migrate` really leaves a fresh database alone.
    let unmigrated = Gate::start("unmigrated", &settings, port, StartUp::NoMigrate).await;
    assert_eq!(
        applied_migrations(&database.url).await,
        None,
        "serve --no-migrate must not touch the schema"
    );
    drop(unmigrated);

    let output = settings.migrate().await;
    assert!(
        output.status.success(),
        "stepgate migrate failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        applied_migrations(&database.url).await,
        Some(postgres_migration_files()),
        "every migration under migrations/postgres applied"
    );
    let again = settings.migrate().await;
    assert!(
        again.status.success(),
        "migrating an up-to-date database is a no-op: {}",
        String::from_utf8_lossy(&again.stderr)
    );

    let gate = Gate::start("A", &settings, port, StartUp::NoMigrate).await;
    let alice = GateUser::new("alice", &settings.public_url);
    let change_id = alice.hold(&gate.url, &enable_withdrawals("k1")).await;
    assert_eq!(alice.change_state(&gate.url, &change_id).await, "held");
    upstream.assert_saw_nothing("a held change");
}
