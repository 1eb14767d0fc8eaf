//! Out-of-band notifications, one-click cancel, emergency freeze, the tamper-evident audit log
//! and the admin API (issue 6), proven from outside: a real webhook receiver on loopback that
//! checks every signature, a recording stand-in exchange, the `stepgate audit` commands run as
//! a process, and plain SQL to tamper with the audit table. Every test runs on SQLite and on
//! PostgreSQL; time moves through a manual clock, never by sleeping through a delay.

#[path = "../common/gate_client.rs"]
mod gate_client;
#[path = "../common/openapi_check.rs"]
mod openapi_check;
#[path = "../common/testdb.rs"]
mod testdb;

mod harness;

mod admin;
mod audit;
mod auto_release;
mod cancel_link;
mod freeze;
mod openapi;
mod webhooks;

/// Runs each listed test once on SQLite and once on PostgreSQL, each on a fresh database.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::testdb::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::testdb::Backend::Postgres).await
                }
            )*
        }
    };
}
