//! What operators ask of the database: is it reachable, are all migrations applied, and the
//! figures the metrics report (changes by state, webhook backlog and dead letters). Read-only,
//! cheap queries answered on demand by `/readyz` and `/metrics`.

use std::collections::HashSet;

use sqlx::Row;

use super::{Backend, Store, StoreError, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
use crate::metrics::StoredFigures;
use crate::stepup::State;

/// Every state a change can be in, so each gauge is reported, zero included.
const STATES: [State; 6] = [
    State::Held,
    State::CoolingOff,
    State::Applying,
    State::Applied,
    State::Cancelled,
    State::Expired,
];

/// How the database's migrations compare with the ones this binary carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Versions this binary expects that the database has not applied successfully.
    pub missing: Vec<i64>,
}

impl Store {
    /// A round trip to the database.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(self.pool()).await?;
        Ok(())
    }

    /// Which of this binary's migrations the database lacks. A database that was never
    /// migrated (no bookkeeping table) lacks all of them.
    pub async fn migration_status(&self) -> Result<MigrationStatus, StoreError> {
        let migrator = match self.backend() {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        let applied: HashSet<i64> =
            match sqlx::query("SELECT version FROM _sqlx_migrations WHERE success = TRUE")
                .fetch_all(self.pool())
                .await
            {
                Ok(rows) => rows
                    .iter()
                    .map(|row| row.try_get::<i64, _>("version"))
                    .collect::<Result<_, _>>()?,
                // No bookkeeping table yet: nothing is applied. Any other failure is an outage.
                Err(sqlx::Error::Database(error))
                    if error.message().contains("_sqlx_migrations") =>
                {
                    HashSet::new()
                }
                Err(error) => return Err(error.into()),
            };
        let missing = migrator
            .iter()
            .map(|migration| migration.version)
            .filter(|version| !applied.contains(version))
            .collect();
        Ok(MigrationStatus { missing })
    }

    /// The figures `/metrics` reports from the database.
    pub async fn stored_figures(&self) -> Result<StoredFigures, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM changes GROUP BY state")
            .fetch_all(self.pool())
            .await?;
        let mut counts = Vec::with_capacity(rows.len());
        for row in &rows {
            let state: String = row.try_get("state")?;
            let n: i64 = row.try_get("n")?;
            counts.push((state, n));
        }
        let changes_by_state = STATES
            .iter()
            .map(|state| {
                let n = counts
                    .iter()
                    .find(|(name, _)| name == state.as_str())
                    .map_or(0, |(_, n)| *n);
                (state.as_str(), n)
            })
            .collect();
        let outbox = sqlx::query(
            "SELECT \
               COALESCE(SUM(CASE WHEN state = 'pending' THEN 1 ELSE 0 END), 0) AS backlog, \
               COALESCE(SUM(CASE WHEN state = 'dead' THEN 1 ELSE 0 END), 0) AS dead \
             FROM outbox",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(StoredFigures {
            changes_by_state,
            outbox_backlog: outbox.try_get("backlog")?,
            dead_letters: outbox.try_get("dead")?,
        })
    }
}
