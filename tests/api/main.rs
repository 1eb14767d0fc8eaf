//! The gate's HTTP contract, proven through HTTP: one integration binary, a fresh gate, database
//! and stand-in exchange per test, a manual clock, and software passkeys as the users'
//! authenticators.

#[path = "../common/openapi_check.rs"]
mod openapi_check;
#[path = "../common/testdb.rs"]
mod testdb;

/// Runs each listed test once on SQLite and once on PostgreSQL, each on a fresh database: the
/// HTTP contract must hold on both backends. A multi-threaded runtime, so concurrency tests
/// really race.
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

mod approval;
mod concurrency;
mod connections;
mod helpers;
mod hold;
mod identity;
mod openapi;
mod pages;
mod passthrough;
mod refusals;
mod shutdown;
mod story;
mod upstream_failures;
mod wire;
