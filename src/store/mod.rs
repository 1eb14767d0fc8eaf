//! Durable state: users, passkeys, held changes, ceremonies and browser sessions. The only
//! module that knows SQL. One set of queries (with `$N` placeholders, which SQLite and
//! PostgreSQL both accept) runs on sqlx's `Any` driver; the backend is chosen by the URL
//! scheme. Every state change is a conditional update whose affected-row count is checked.

mod batch;
pub mod health;
pub mod sessions;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use time::OffsetDateTime;
use uuid::Uuid;
use webauthn_rs::prelude::Passkey;

use crate::clock::{from_millis, to_millis};
use crate::stepup::{Change, State, Transition};

/// Cloneable (the sqlx error is shared) because a failed group commit (`batch`) is every one
/// of its writes' failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached: fail closed with 503.
    #[error("database unavailable: {0}")]
    Unavailable(Arc<sqlx::Error>),
    /// A unique constraint refused the write.
    #[error("already exists")]
    Duplicate,
    /// A row that we wrote cannot be read back: a bug or tampering.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Other(Arc<sqlx::Error>),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Duplicate,
            // PostgreSQL's "connection exception" (08) and "operator intervention" (57: admin
            // shutdown, crash recovery) classes mean the database is away, not that we erred.
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|code| code.starts_with("08") || code.starts_with("57")) =>
            {
                StoreError::Unavailable(Arc::new(error))
            }
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(Arc::new(error)),
            _ => StoreError::Other(Arc::new(error)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Whether a passkey may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasskeyState {
    Active,
    /// Added while the user had another passkey: waits for its own confirmed change.
    Pending,
    /// Its signature counter went backwards: possibly cloned, never used again.
    Disabled,
}

impl PasskeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            PasskeyState::Active => "active",
            PasskeyState::Pending => "pending",
            PasskeyState::Disabled => "disabled",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "active" => Ok(PasskeyState::Active),
            "pending" => Ok(PasskeyState::Pending),
            "disabled" => Ok(PasskeyState::Disabled),
            other => Err(StoreError::Corrupt(format!(
                "unknown passkey state {other}"
            ))),
        }
    }
}

/// A registered passkey.
#[derive(Debug, Clone)]
pub struct PasskeyRecord {
    pub id: Uuid,
    pub user_id: String,
    /// Base64url credential id, unique across all users.
    pub credential_id: String,
    pub name: String,
    pub passkey: Passkey,
    pub backup_eligible: bool,
    pub created_at: OffsetDateTime,
    pub last_used_at: Option<OffsetDateTime>,
    pub state: PasskeyState,
    /// The authenticator model, from the registration's authenticator data.
    pub aaguid: Option<Uuid>,
    /// For a pending passkey: the change that must be confirmed and cool off to activate it.
    pub activation_change_id: Option<Uuid>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CeremonyKind {
    Register,
    Confirm,
}

impl CeremonyKind {
    fn as_str(self) -> &'static str {
        match self {
            CeremonyKind::Register => "register",
            CeremonyKind::Confirm => "confirm",
        }
    }
}

/// A started passkey ceremony, kept server-side until it is finished once.
#[derive(Debug, Clone)]
pub struct CeremonyRecord {
    pub id: Uuid,
    pub kind: CeremonyKind,
    pub user_id: String,
    pub change_id: Option<Uuid>,
    pub change_digest: Option<String>,
    pub session_binding: String,
    /// The serialised webauthn-rs ceremony state.
    pub state_json: String,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

/// An audit row to append (its sequence number and hashes are filled in by the store).
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub user_id: String,
    pub kind: String,
    pub change_id: Option<Uuid>,
    pub detail: serde_json::Value,
}

/// A webhook delivery to queue.
#[derive(Debug, Clone)]
pub struct OutboxItem {
    pub event_id: Uuid,
    pub event: String,
    pub webhook_url: String,
    pub payload: String,
}

/// What a state change leaves behind: audit rows and webhook deliveries, written in the same
/// transaction as the change itself, so none is lost and none exists without its change.
#[derive(Debug, Clone, Default)]
pub struct Effects {
    pub audit: Vec<AuditEntry>,
    pub outbox: Vec<OutboxItem>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.audit.is_empty() && self.outbox.is_empty()
    }
}

/// A queued webhook delivery, claimed for sending.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: String,
    pub event: String,
    pub webhook_url: String,
    pub payload: String,
    pub attempts: i64,
    pub state: String,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Store {
    /// Reads (and, on PostgreSQL, everything).
    pool: AnyPool,
    /// Every write: on SQLite a pool of one connection, so this process's writers queue for
    /// it in order instead of meeting SQLite's write lock, whose busy handler makes the loser
    /// sleep for milliseconds at a time (the bench's holds had a 100 ms p99 from that alone).
    /// On PostgreSQL, and for an in-memory SQLite database, the same pool as `pool`.
    writer: AnyPool,
    /// SQLite only: group commit of the writes that matter for throughput (see `batch`).
    batcher: Option<batch::Batcher>,
    backend: Backend,
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

const CHANGE_COLUMNS: &str = "id, user_id, rule_name, method, path, query, headers_json, body, \
     digest, summary, state, cooling_off_ms, release_within_ms, created_at, confirm_before, \
     confirmed_at, release_at, release_before, finished_at, lease_until, release_attempts, \
     outcome_status, quarantined_until";

const PASSKEY_COLUMNS: &str = "id, user_id, credential_id, name, passkey_json, backup_eligible, \
     created_at, last_used_at, state, aaguid, activation_change_id";

impl Store {
    /// Connects to `sqlite:...` or `postgres://...` with the default 5 s acquire timeout.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Self::connect_with_timeout(url, Duration::from_secs(5)).await
    }

    /// Connects; a request waits at most `timeout` for a connection before failing closed.
    /// The pool connects lazily, so a gate starts (and passes traffic through) while its
    /// database is down, and recovers by itself when it returns.
    pub async fn connect_with_timeout(url: &str, timeout: Duration) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::Corrupt(format!(
                "unsupported database URL scheme in {url}"
            )));
        };
        let options = || {
            AnyPoolOptions::new()
                .acquire_timeout(timeout)
                // A connection that died while idle (database restarted) is noticed before use.
                .test_before_acquire(true)
        };
        let (pool, writer) = match backend {
            Backend::Postgres => {
                let pool = options().connect_lazy(url)?;
                (pool.clone(), pool)
            }
            Backend::Sqlite => {
                let url = sqlite_url_creating_file(url);
                if is_sqlite_memory(&url) {
                    // Every connection to `:memory:` is a separate empty database, so keep
                    // exactly one, forever, for reads and writes alike.
                    let pool = sqlite_options(options())
                        .max_connections(1)
                        .min_connections(1)
                        .idle_timeout(None)
                        .max_lifetime(None)
                        .connect_lazy(&url)?;
                    (pool.clone(), pool)
                } else {
                    (
                        sqlite_options(options()).connect_lazy(&url)?,
                        sqlite_options(options())
                            .max_connections(1)
                            .connect_lazy(&url)?,
                    )
                }
            }
        };
        let batcher = match backend {
            Backend::Sqlite => Some(batch::Batcher::start(writer.clone())),
            Backend::Postgres => None,
        };
        Ok(Store {
            pool,
            writer,
            batcher,
            backend,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator
            .run(&self.writer)
            .await
            .map_err(|e| StoreError::Other(Arc::new(sqlx::Error::Migrate(Box::new(e)))))
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The pool every write goes to (see the `writer` field).
    pub(crate) fn writer(&self) -> &AnyPool {
        &self.writer
    }

    /// Runs `job` in a transaction of its own (PostgreSQL) or in SQLite's next group commit,
    /// and returns its result once committed. A job that fails leaves nothing behind.
    async fn write<T: Send + 'static>(&self, job: batch::Job<T>) -> Result<T, StoreError> {
        if let Some(batcher) = &self.batcher {
            return batcher.write(job).await;
        }
        let mut tx = self.writer.begin().await?;
        let result = job(&mut tx).await?;
        tx.commit().await?;
        Ok(result)
    }

    // -- users -----------------------------------------------------------------------------

    /// The user's WebAuthn user handle, created on first use. Random, so the authenticator
    /// never learns the exchange's user id.
    pub async fn user_handle(
        &self,
        user_id: &str,
        now: OffsetDateTime,
    ) -> Result<Uuid, StoreError> {
        sqlx::query(
            "INSERT INTO users (user_id, webauthn_handle, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(user_id)
        .bind(Uuid::new_v4().to_string())
        .bind(to_millis(now))
        .execute(&self.writer)
        .await?;
        let row = sqlx::query("SELECT webauthn_handle FROM users WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&self.pool)
            .await?;
        parse_uuid(&row.try_get::<String, _>("webauthn_handle")?)
    }

    // -- passkeys --------------------------------------------------------------------------

    pub async fn passkeys_of(&self, user_id: &str) -> Result<Vec<PasskeyRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {PASSKEY_COLUMNS} FROM passkeys WHERE user_id = $1 ORDER BY created_at, id"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(passkey_from_row).collect()
    }

    /// Fails with [`StoreError::Duplicate`] when the credential id is registered already
    /// (to anyone).
    pub async fn insert_passkey(
        &self,
        passkey: &PasskeyRecord,
        effects: &Effects,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO passkeys ({PASSKEY_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(passkey.id.to_string())
        .bind(&passkey.user_id)
        .bind(&passkey.credential_id)
        .bind(&passkey.name)
        .bind(to_json(&passkey.passkey)?)
        .bind(i64::from(passkey.backup_eligible))
        .bind(to_millis(passkey.created_at))
        .bind(passkey.last_used_at.map(to_millis))
        .bind(passkey.state.as_str())
        .bind(passkey.aaguid.map(|id| id.to_string()))
        .bind(passkey.activation_change_id.map(|id| id.to_string()))
        .execute(&mut *tx)
        .await?;
        Self::write_effects(&mut tx, effects, passkey.created_at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Links a pending passkey to the change that activates it.
    pub async fn set_activation_change(
        &self,
        passkey_id: Uuid,
        change_id: Uuid,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE passkeys SET activation_change_id = $1 WHERE id = $2")
            .bind(change_id.to_string())
            .bind(passkey_id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Moves a passkey from one state to another; `false` if it was not in `from`.
    pub async fn set_passkey_state(
        &self,
        passkey_id: Uuid,
        from: PasskeyState,
        to: PasskeyState,
        now: OffsetDateTime,
        effects: &Effects,
    ) -> Result<bool, StoreError> {
        let disabled_at = (to == PasskeyState::Disabled).then_some(to_millis(now));
        let query = sqlx::query(
            "UPDATE passkeys SET state = $1, disabled_at = COALESCE($2, disabled_at) \
             WHERE id = $3 AND state = $4",
        )
        .bind(to.as_str())
        .bind(disabled_at)
        .bind(passkey_id.to_string())
        .bind(from.as_str());
        self.write_once_with_effects(query, effects, now).await
    }

    /// Runs one conditional write and, only if it changed exactly one row, the effects, all in
    /// one transaction. Returns whether the write happened; if not, nothing is written.
    async fn write_once_with_effects(
        &self,
        query: sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments<'static>>,
        effects: &Effects,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let effects = effects.clone();
        self.write(Box::new(move |conn| {
            Box::pin(async move {
                match query.execute(&mut *conn).await?.rows_affected() {
                    0 => Ok(false),
                    1 => {
                        Self::write_effects(conn, &effects, now).await?;
                        Ok(true)
                    }
                    // Ids are unique: more than one row means the write was not what it
                    // meant to be, and it is undone.
                    rows => Err(StoreError::Corrupt(format!(
                        "a write meant for one row changed {rows}"
                    ))),
                }
            })
        }))
        .await
    }

    /// Deletes one of `user_id`'s passkeys; `false` if there was none.
    pub async fn delete_passkey(
        &self,
        user_id: &str,
        passkey_id: Uuid,
        effects: &Effects,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let query = sqlx::query("DELETE FROM passkeys WHERE id = $1 AND user_id = $2")
            .bind(passkey_id.to_string())
            .bind(user_id.to_string());
        self.write_once_with_effects(query, effects, now).await
    }

    /// The anti-phishing codes of users who have changes lapsed at `now`, for the sweep's
    /// expiry events.
    pub async fn codes_of_users_with_lapsed_changes(
        &self,
        now: OffsetDateTime,
    ) -> Result<HashMap<String, String>, StoreError> {
        let rows = sqlx::query(
            "SELECT DISTINCT u.user_id, u.anti_phishing_code FROM users u JOIN changes c \
             ON c.user_id = u.user_id WHERE u.anti_phishing_code IS NOT NULL AND \
             ((c.state = 'held' AND c.confirm_before < $1) \
             OR (c.state = 'cooling_off' AND c.release_before < $1))",
        )
        .bind(to_millis(now))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("user_id")?, row.try_get("anti_phishing_code")?)))
            .collect()
    }

    /// Renames one of `user_id`'s passkeys; `false` if there was none.
    pub async fn rename_passkey(
        &self,
        user_id: &str,
        passkey_id: Uuid,
        name: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE passkeys SET name = $1 WHERE id = $2 AND user_id = $3")
            .bind(name)
            .bind(passkey_id.to_string())
            .bind(user_id)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Users with pending passkeys, for the sweep to settle their activation.
    pub async fn users_with_pending_passkeys(&self, limit: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT DISTINCT user_id FROM passkeys WHERE state = 'pending' ORDER BY user_id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok(row.try_get("user_id")?)).collect()
    }

    /// Records a security event (for example a signature counter that went backwards).
    pub async fn record_security_event(
        &self,
        user_id: &str,
        kind: &str,
        passkey_id: Option<Uuid>,
        detail: &str,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO security_events (id, user_id, kind, passkey_id, detail, occurred_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(user_id)
        .bind(kind)
        .bind(passkey_id.map(|id| id.to_string()))
        .bind(detail)
        .bind(to_millis(now))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The kinds and passkeys of the user's security events, newest first.
    pub async fn security_events_of(
        &self,
        user_id: &str,
    ) -> Result<Vec<(String, Option<Uuid>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, passkey_id FROM security_events WHERE user_id = $1 ORDER BY occurred_at DESC",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let passkey: Option<String> = row.try_get("passkey_id")?;
                Ok((
                    row.try_get("kind")?,
                    passkey.as_deref().map(parse_uuid).transpose()?,
                ))
            })
            .collect()
    }

    /// Whether a credential id is registered to anyone.
    pub async fn credential_exists(&self, credential_id: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 AS one FROM passkeys WHERE credential_id = $1")
            .bind(credential_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// Records a successful assertion: the updated credential (counter, backup state) and
    /// when it was used.
    pub async fn record_passkey_use(
        &self,
        id: Uuid,
        passkey: &Passkey,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        // The listed flag follows the credential: a passkey can become synced later.
        let backup_eligible =
            webauthn_rs::prelude::Credential::from(passkey.clone()).backup_eligible;
        let query = sqlx::query(
            "UPDATE passkeys SET passkey_json = $1, last_used_at = $2, backup_eligible = $4 \
             WHERE id = $3",
        )
        .bind(to_json(passkey)?)
        .bind(to_millis(now))
        .bind(id.to_string())
        .bind(i64::from(backup_eligible));
        self.write(Box::new(move |conn| {
            Box::pin(async move {
                query.execute(conn).await?;
                Ok(())
            })
        }))
        .await
    }

    // -- ceremonies ------------------------------------------------------------------------

    pub async fn insert_ceremony(&self, ceremony: &CeremonyRecord) -> Result<(), StoreError> {
        let query = sqlx::query(
            "INSERT INTO ceremonies (id, kind, user_id, change_id, change_digest, \
             session_binding, state_json, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(ceremony.id.to_string())
        .bind(ceremony.kind.as_str())
        .bind(ceremony.user_id.clone())
        .bind(ceremony.change_id.map(|id| id.to_string()))
        .bind(ceremony.change_digest.clone())
        .bind(ceremony.session_binding.clone())
        .bind(ceremony.state_json.clone())
        .bind(to_millis(ceremony.created_at))
        .bind(to_millis(ceremony.expires_at));
        self.write(Box::new(move |conn| {
            Box::pin(async move {
                query.execute(conn).await?;
                Ok(())
            })
        }))
        .await
    }

    /// Consumes a ceremony: marks it consumed and returns it in one conditional statement, so
    /// of two concurrent finishes exactly one gets it. Only the user and session that started
    /// it can take it; anyone else gets `None` and leaves it in place.
    pub async fn take_ceremony(
        &self,
        id: Uuid,
        kind: CeremonyKind,
        user_id: &str,
        session_binding: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CeremonyRecord>, StoreError> {
        let query = sqlx::query(
            "UPDATE ceremonies SET consumed_at = $5 WHERE id = $1 AND kind = $2 AND user_id = $3 \
             AND session_binding = $4 AND consumed_at IS NULL \
             RETURNING change_id, change_digest, state_json, created_at, expires_at",
        )
        .bind(id.to_string())
        .bind(kind.as_str())
        .bind(user_id.to_string())
        .bind(session_binding.to_string())
        .bind(to_millis(now));
        let (user_id, session_binding) = (user_id.to_string(), session_binding.to_string());
        self.write(Box::new(move |conn| {
            Box::pin(async move {
                let Some(row) = query.fetch_optional(conn).await? else {
                    return Ok(None);
                };
                Ok(Some(CeremonyRecord {
                    id,
                    kind,
                    user_id,
                    change_id: row
                        .try_get::<Option<String>, _>("change_id")?
                        .as_deref()
                        .map(parse_uuid)
                        .transpose()?,
                    change_digest: row.try_get("change_digest")?,
                    session_binding,
                    state_json: row.try_get("state_json")?,
                    created_at: from_millis(row.try_get("created_at")?),
                    expires_at: from_millis(row.try_get("expires_at")?),
                }))
            })
        }))
        .await
    }

    /// How many ceremonies `user_id` started after `since` (consumed or not).
    pub async fn ceremonies_started_since(
        &self,
        user_id: &str,
        since: OffsetDateTime,
    ) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM ceremonies WHERE user_id = $1 AND created_at > $2",
        )
        .bind(user_id)
        .bind(to_millis(since))
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    /// How many of `user_id`'s changes are held or cooling off.
    pub async fn pending_changes_of(&self, user_id: &str) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM changes WHERE user_id = $1 \
             AND state IN ('held', 'cooling_off')",
        )
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    /// Removes ceremonies that can no longer be finished.
    pub async fn delete_expired_ceremonies(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM ceremonies WHERE expires_at < $1")
            .bind(to_millis(now))
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    // -- changes ---------------------------------------------------------------------------

    /// Stores a new change and its effects in one transaction.
    pub async fn insert_change(
        &self,
        change: &Change,
        effects: &Effects,
    ) -> Result<(), StoreError> {
        let headers = serde_json::to_string(&change.headers)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let change = change.clone();
        let effects = effects.clone();
        self.write(Box::new(move |conn| {
            Box::pin(async move {
                sqlx::query(&format!(
                    "INSERT INTO changes ({CHANGE_COLUMNS}, updated_at) VALUES \
                     ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
                     $17, $18, $19, $20, $21, $22, $23, $24)"
                ))
                .bind(change.id.to_string())
                .bind(&change.user_id)
                .bind(&change.rule)
                .bind(&change.method)
                .bind(&change.path)
                .bind(&change.query)
                .bind(headers)
                .bind(change.body.clone())
                .bind(&change.digest)
                .bind(&change.summary)
                .bind(change.state.as_str())
                .bind(duration_millis(change.cooling_off))
                .bind(duration_millis(change.release_within))
                .bind(to_millis(change.created_at))
                .bind(to_millis(change.confirm_before))
                .bind(change.confirmed_at.map(to_millis))
                .bind(change.release_at.map(to_millis))
                .bind(change.release_before.map(to_millis))
                .bind(change.finished_at.map(to_millis))
                .bind(change.lease_until.map(to_millis))
                .bind(change.release_attempts)
                .bind(change.outcome_status.map(i64::from))
                .bind(change.quarantined_until.map(to_millis))
                .bind(to_millis(change.created_at))
                .execute(&mut *conn)
                .await?;
                Self::write_effects(conn, &effects, change.created_at).await
            })
        }))
        .await
    }

    pub async fn change(&self, id: Uuid) -> Result<Option<Change>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CHANGE_COLUMNS} FROM changes WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(change_from_row).transpose()
    }

    /// The user's changes, newest first (at most `limit`).
    pub async fn changes_of(&self, user_id: &str, limit: i64) -> Result<Vec<Change>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CHANGE_COLUMNS} FROM changes WHERE user_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        ))
        .bind(user_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(change_from_row).collect()
    }

    /// Applies a transition only if the change is still as it was read: in `t.from`, with the
    /// same lease. Returns whether this call made the move; `false` means someone else moved
    /// it first.
    pub async fn apply_transition(
        &self,
        change: &Change,
        t: &Transition,
        effects_of: &(dyn Fn(&Change) -> Effects + Sync),
    ) -> Result<bool, StoreError> {
        let finished_at = (!t.to.is_pending()).then_some(to_millis(t.at));
        // The effects describe the change as the move leaves it; they are written in the
        // same transaction as the move, and only if the move happened.
        let effects = effects_of(&change.clone().after(t));
        let query = sqlx::query(
            "UPDATE changes SET state = $1, \
             confirmed_at = COALESCE($2, confirmed_at), \
             release_at = COALESCE($3, release_at), \
             release_before = COALESCE($4, release_before), \
             finished_at = COALESCE($5, finished_at), \
             lease_until = COALESCE($6, lease_until), \
             release_attempts = release_attempts + $7, \
             outcome_status = COALESCE($8, outcome_status), \
             quarantined_until = COALESCE($13, quarantined_until), \
             updated_at = $9 \
             WHERE id = $10 AND state = $11 AND COALESCE(lease_until, -1) = $12",
        )
        .bind(t.to.as_str())
        .bind(t.confirmed_at.map(to_millis))
        .bind(t.release_at.map(to_millis))
        .bind(t.release_before.map(to_millis))
        .bind(finished_at)
        .bind(t.lease_until.map(to_millis))
        .bind(i64::from(t.counts_attempt))
        .bind(t.outcome_status.map(i64::from))
        .bind(to_millis(t.at))
        .bind(change.id.to_string())
        .bind(t.from.as_str())
        .bind(change.lease_until.map_or(-1, to_millis))
        .bind(t.quarantined_until.map(to_millis));
        self.write_once_with_effects(query, &effects, t.at).await
    }

    /// Expires pending changes whose deadline passed before `now` (at most `limit`), and
    /// returns their ids. Safe to run on every instance at once: each change is expired by
    /// exactly one call. PostgreSQL skips rows another instance has locked; SQLite serialises
    /// writers. The conditions mirror `Change::lapsed`.
    pub async fn expire_lapsed(
        &self,
        now: OffsetDateTime,
        limit: i64,
        effects_of: &(dyn Fn(&Change) -> Effects + Sync),
    ) -> Result<Vec<Uuid>, StoreError> {
        const LAPSED: &str = "((state = 'held' AND confirm_before < $1) \
             OR (state = 'cooling_off' AND release_before < $1))";
        let lock = match self.backend {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let mut tx = self.writer.begin().await?;
        let rows = sqlx::query(&format!(
            "UPDATE changes SET state = 'expired', finished_at = $1, updated_at = $1 \
             WHERE id IN (SELECT id FROM changes WHERE {LAPSED} ORDER BY created_at LIMIT $2 {lock}) \
             AND {LAPSED} RETURNING {CHANGE_COLUMNS}"
        ))
        .bind(to_millis(now))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let expired = rows
            .iter()
            .map(change_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        for change in &expired {
            Self::write_effects(&mut tx, &effects_of(change), now).await?;
        }
        tx.commit().await?;
        Ok(expired.iter().map(|change| change.id).collect())
    }

    /// Changes of the `rules` (the auto-release ones) that are due for forwarding at `now`:
    /// cooling off with `release_at` reached, or left `applying` by a forward whose lease ran
    /// out (a crash or an unknown outcome). Only candidates: each is then taken with the same
    /// conditional transition a client release uses, so only one instance forwards it.
    pub async fn due_auto_releases(
        &self,
        rules: &[String],
        now: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<Change>, StoreError> {
        if rules.is_empty() {
            return Ok(Vec::new());
        }
        let names = (0..rules.len())
            .map(|i| format!("${}", i + 3))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {CHANGE_COLUMNS} FROM changes WHERE rule_name IN ({names}) AND \
             ((state = 'cooling_off' AND release_at <= $1) \
             OR (state = 'applying' AND lease_until <= $1)) \
             ORDER BY release_at, id LIMIT $2"
        );
        let mut query = sqlx::query(&sql).bind(to_millis(now)).bind(limit);
        for rule in rules {
            query = query.bind(rule.as_str());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(change_from_row).collect()
    }

    /// The approval signing key kept in the database (PKCS#8 PEM), storing `generated` first
    /// if there is none yet. Of instances starting at once, the first insert wins and all of
    /// them read that one key.
    pub async fn approval_key_or_insert(
        &self,
        generated: &str,
        now: OffsetDateTime,
    ) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO approval_keys (id, private_key_pem, created_at) VALUES ('default', $1, $2) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(generated)
        .bind(to_millis(now))
        .execute(&self.writer)
        .await?;
        let row = sqlx::query("SELECT private_key_pem FROM approval_keys WHERE id = 'default'")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("private_key_pem")?)
    }

    /// Removes browser sessions that expired before `now`.
    pub async fn delete_expired_sessions(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM sessions WHERE expiry_date < $1")
            .bind(to_millis(now))
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }
}

impl Store {
    /// Appends `effects` inside an open transaction.
    async fn write_effects(
        conn: &mut sqlx::AnyConnection,
        effects: &Effects,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let at = to_millis(now);
        for entry in &effects.audit {
            // Taking the head row serialises appends across instances: the chain stays linear.
            let head =
                sqlx::query("UPDATE audit_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash")
                    .fetch_one(&mut *conn)
                    .await?;
            let seq: i64 = head.try_get("seq")?;
            let prev_hash: String = head.try_get("hash")?;
            let change_id = entry.change_id.map(|id| id.to_string());
            let detail = entry.detail.to_string();
            let hash = crate::audit::row_hash(
                &prev_hash,
                seq,
                at,
                &entry.user_id,
                &entry.kind,
                change_id.as_deref(),
                &detail,
            );
            sqlx::query(
                "INSERT INTO audit_log (seq, occurred_at, user_id, kind, change_id, detail, prev_hash, hash) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(seq)
            .bind(at)
            .bind(&entry.user_id)
            .bind(&entry.kind)
            .bind(change_id)
            .bind(detail)
            .bind(prev_hash)
            .bind(&hash)
            .execute(&mut *conn)
            .await?;
            sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1")
                .bind(hash)
                .execute(&mut *conn)
                .await?;
        }
        for item in &effects.outbox {
            sqlx::query(
                "INSERT INTO outbox (id, event_id, event, webhook_url, payload, state, attempts, \
                 next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6)",
            )
            .bind(Uuid::new_v4().to_string())
            .bind(item.event_id.to_string())
            .bind(&item.event)
            .bind(&item.webhook_url)
            .bind(&item.payload)
            .bind(at)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// Records effects that accompany no row change of their own (refusals, identity
    /// failures, passkey events).
    pub async fn append_effects(
        &self,
        effects: &Effects,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        if effects.is_empty() {
            return Ok(());
        }
        let effects = effects.clone();
        self.write(Box::new(move |conn| {
            Box::pin(async move { Self::write_effects(conn, &effects, now).await })
        }))
        .await
    }

    /// The audit log in order, and the head (last sequence number and hash).
    pub async fn audit_log(
        &self,
    ) -> Result<(Vec<crate::audit::AuditRow>, (i64, String)), StoreError> {
        let rows = sqlx::query(
            "SELECT seq, occurred_at, user_id, kind, change_id, detail, prev_hash, hash \
             FROM audit_log ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await?;
        let rows = rows
            .iter()
            .map(|row| {
                Ok(crate::audit::AuditRow {
                    seq: row.try_get("seq")?,
                    occurred_at: row.try_get("occurred_at")?,
                    user_id: row.try_get("user_id")?,
                    kind: row.try_get("kind")?,
                    change_id: row.try_get("change_id")?,
                    detail: row.try_get("detail")?,
                    prev_hash: row.try_get("prev_hash")?,
                    hash: row.try_get("hash")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok((rows, (head.try_get("seq")?, head.try_get("hash")?)))
    }

    /// Claims up to `limit` due deliveries until `lease_until`, so no other instance sends
    /// them meanwhile.
    pub async fn claim_outbox(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let lock = match self.backend {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let rows = sqlx::query(&format!(
            "UPDATE outbox SET lease_until = $2 WHERE id IN (SELECT id FROM outbox \
             WHERE state = 'pending' AND next_attempt_at <= $1 \
             AND (lease_until IS NULL OR lease_until < $1) ORDER BY created_at LIMIT $3 {lock}) \
             AND state = 'pending' \
             RETURNING id, event, webhook_url, payload, attempts, state, last_error"
        ))
        .bind(to_millis(now))
        .bind(to_millis(lease_until))
        .bind(limit)
        .fetch_all(&self.writer)
        .await?;
        rows.iter().map(outbox_from_row).collect()
    }

    pub async fn outbox_delivered(&self, id: &str, now: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET state = 'delivered', delivered_at = $2, lease_until = NULL \
             WHERE id = $1 AND state = 'pending'",
        )
        .bind(id)
        .bind(to_millis(now))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn outbox_retry(
        &self,
        id: &str,
        attempts: i64,
        next_attempt_at: OffsetDateTime,
        error: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET attempts = $2, next_attempt_at = $3, last_error = $4, \
             lease_until = NULL WHERE id = $1 AND state = 'pending'",
        )
        .bind(id)
        .bind(attempts)
        .bind(to_millis(next_attempt_at))
        .bind(error)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn outbox_dead(
        &self,
        id: &str,
        attempts: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET state = 'dead', attempts = $2, last_error = $3, lease_until = NULL \
             WHERE id = $1 AND state = 'pending'",
        )
        .bind(id)
        .bind(attempts)
        .bind(error)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Deliveries in `state` (`pending`, `delivered` or `dead`), oldest first.
    pub async fn outbox_in_state(&self, state: &str) -> Result<Vec<OutboxRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, event, webhook_url, payload, attempts, state, last_error FROM outbox \
             WHERE state = $1 ORDER BY created_at, id",
        )
        .bind(state)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outbox_from_row).collect()
    }

    /// Puts a dead-lettered delivery back in the queue, due now.
    pub async fn outbox_requeue(&self, id: &str, now: OffsetDateTime) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = $2, \
             lease_until = NULL WHERE id = $1 AND state = 'dead'",
        )
        .bind(id)
        .bind(to_millis(now))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Freezes or unfreezes a user (creating the user row if needed), with its effects in the
    /// same transaction. Returns whether the state changed.
    pub async fn set_frozen(
        &self,
        user_id: &str,
        frozen: bool,
        now: OffsetDateTime,
        effects: &Effects,
    ) -> Result<bool, StoreError> {
        self.user_handle(user_id, now).await?;
        let query = if frozen {
            sqlx::query("UPDATE users SET frozen_at = $1 WHERE user_id = $2 AND frozen_at IS NULL")
                .bind(to_millis(now))
                .bind(user_id.to_string())
        } else {
            sqlx::query(
                "UPDATE users SET frozen_at = NULL WHERE user_id = $1 AND frozen_at IS NOT NULL",
            )
            .bind(user_id.to_string())
        };
        self.write_once_with_effects(query, effects, now).await
    }

    /// When the user was frozen, if they are.
    pub async fn frozen_at(&self, user_id: &str) -> Result<Option<OffsetDateTime>, StoreError> {
        let row = sqlx::query("SELECT frozen_at FROM users WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(row) => row.try_get::<Option<i64>, _>("frozen_at")?.map(from_millis),
            None => None,
        })
    }

    /// Remembers the anti-phishing code the exchange passed for a user.
    pub async fn set_anti_phishing_code(
        &self,
        user_id: &str,
        code: &str,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.user_handle(user_id, now).await?;
        sqlx::query("UPDATE users SET anti_phishing_code = $1 WHERE user_id = $2")
            .bind(code)
            .bind(user_id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    pub async fn anti_phishing_code(&self, user_id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT anti_phishing_code FROM users WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(row) => row.try_get("anti_phishing_code")?,
            None => None,
        })
    }
}

fn outbox_from_row(row: &AnyRow) -> Result<OutboxRow, StoreError> {
    Ok(OutboxRow {
        id: row.try_get("id")?,
        event: row.try_get("event")?,
        webhook_url: row.try_get("webhook_url")?,
        payload: row.try_get("payload")?,
        attempts: row.try_get("attempts")?,
        state: row.try_get("state")?,
        last_error: row.try_get("last_error")?,
    })
}

/// The settings every SQLite connection gets.
fn sqlite_options(options: AnyPoolOptions) -> AnyPoolOptions {
    options
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                // WAL lets readers and one writer work at once; FULL makes a committed
                // "consumed" or "applied" mark survive a power loss.
                for pragma in [
                    "PRAGMA busy_timeout = 10000",
                    "PRAGMA journal_mode = WAL",
                    "PRAGMA synchronous = FULL",
                    "PRAGMA foreign_keys = ON",
                ] {
                    sqlx::query(pragma).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        // A SQLite connection is a file handle: it cannot die while idle the way a socket to
        // a restarted server can, so the ping before every acquire (one more round trip to
        // sqlx's SQLite thread for every query) buys nothing here.
        .test_before_acquire(false)
}

fn is_sqlite_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

/// `sqlite://stepgate.db` should create the file on first start, as users expect.
fn sqlite_url_creating_file(url: &str) -> String {
    if is_sqlite_memory(url) || url.contains("mode=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    }
}

fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn parse_uuid(text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text).map_err(|e| StoreError::Corrupt(format!("bad id {text}: {e}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn millis_to_duration(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn change_from_row(row: &AnyRow) -> Result<Change, StoreError> {
    let state: String = row.try_get("state")?;
    let headers: String = row.try_get("headers_json")?;
    Ok(Change {
        id: parse_uuid(&row.try_get::<String, _>("id")?)?,
        user_id: row.try_get("user_id")?,
        rule: row.try_get("rule_name")?,
        method: row.try_get("method")?,
        path: row.try_get("path")?,
        query: row.try_get("query")?,
        headers: serde_json::from_str(&headers)
            .map_err(|e| StoreError::Corrupt(format!("headers_json: {e}")))?,
        body: row.try_get("body")?,
        digest: row.try_get("digest")?,
        summary: row.try_get("summary")?,
        state: State::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown state {state}")))?,
        cooling_off: millis_to_duration(row.try_get("cooling_off_ms")?),
        release_within: millis_to_duration(row.try_get("release_within_ms")?),
        created_at: from_millis(row.try_get("created_at")?),
        confirm_before: from_millis(row.try_get("confirm_before")?),
        confirmed_at: row
            .try_get::<Option<i64>, _>("confirmed_at")?
            .map(from_millis),
        release_at: row
            .try_get::<Option<i64>, _>("release_at")?
            .map(from_millis),
        release_before: row
            .try_get::<Option<i64>, _>("release_before")?
            .map(from_millis),
        finished_at: row
            .try_get::<Option<i64>, _>("finished_at")?
            .map(from_millis),
        lease_until: row
            .try_get::<Option<i64>, _>("lease_until")?
            .map(from_millis),
        release_attempts: row.try_get("release_attempts")?,
        outcome_status: row
            .try_get::<Option<i64>, _>("outcome_status")?
            .and_then(|status| u16::try_from(status).ok()),
        quarantined_until: row
            .try_get::<Option<i64>, _>("quarantined_until")?
            .map(from_millis),
    })
}

fn passkey_from_row(row: &AnyRow) -> Result<PasskeyRecord, StoreError> {
    let json: String = row.try_get("passkey_json")?;
    Ok(PasskeyRecord {
        id: parse_uuid(&row.try_get::<String, _>("id")?)?,
        user_id: row.try_get("user_id")?,
        credential_id: row.try_get("credential_id")?,
        name: row.try_get("name")?,
        passkey: serde_json::from_str(&json)
            .map_err(|e| StoreError::Corrupt(format!("passkey_json: {e}")))?,
        backup_eligible: row.try_get::<i64, _>("backup_eligible")? != 0,
        created_at: from_millis(row.try_get("created_at")?),
        last_used_at: row
            .try_get::<Option<i64>, _>("last_used_at")?
            .map(from_millis),
        state: PasskeyState::parse(&row.try_get::<String, _>("state")?)?,
        aaguid: row
            .try_get::<Option<String>, _>("aaguid")?
            .as_deref()
            .map(parse_uuid)
            .transpose()?,
        activation_change_id: row
            .try_get::<Option<String>, _>("activation_change_id")?
            .as_deref()
            .map(parse_uuid)
            .transpose()?,
    })
}
