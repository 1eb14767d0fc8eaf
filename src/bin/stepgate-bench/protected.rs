//! The protected path's figures: holds, confirmations and releases per second, on SQLite and
//! on PostgreSQL, with durable commits. The gate runs in this process on a `ManualClock`
//! (the only way to move a release build's time: it has no clock back door), so the
//! cooling-off can be skipped between the confirm and release phases. Clients are testkit
//! `VirtualUser`s with software passkeys, also in this process: their HTTP and ECDSA signing
//! share the machine with the gate, so these rates include the client's cost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use http::{Method, StatusCode};
use serde_json::json;
use sqlx::Connection;
use stepgate::clock::ManualClock;
use stepgate::config::Config;
use stepgate::server::Server;
use stepgate::testkit::{ApiRequest, VirtualUser};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Which database the gate stores changes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn label(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

/// Rate and client-side latency of one operation.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpFigures {
    pub count: usize,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Default)]
pub struct ProtectedFigures {
    pub holds: OpFigures,
    pub confirms: OpFigures,
    pub releases: OpFigures,
    /// What "durable" is on this backend, read from the database itself.
    pub durability: String,
}

/// How hard and how long to push.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Concurrent users, each doing one operation at a time.
    pub users: usize,
    pub phase: Duration,
}

/// A database for one run, dropped (PostgreSQL) or deleted with the scratch dir (SQLite).
struct Database {
    url: String,
    drop_with: Option<(String, String)>,
}

async fn create_database(
    backend: Backend,
    dir: &std::path::Path,
    postgres_admin: &str,
) -> anyhow::Result<Database> {
    match backend {
        Backend::Sqlite => Ok(Database {
            url: format!("sqlite://{}", dir.join("protected.db").display()),
            drop_with: None,
        }),
        Backend::Postgres => {
            let name = format!("stepgate_bench_{}", std::process::id());
            let mut admin = sqlx::PgConnection::connect(postgres_admin)
                .await
                .with_context(|| format!("connect to PostgreSQL at {postgres_admin}"))?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\""))
                .execute(&mut admin)
                .await?;
            sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                .execute(&mut admin)
                .await?;
            let _ = admin.close().await;
            let base = postgres_admin
                .rsplit_once('/')
                .map(|(base, _)| base)
                .context("the PostgreSQL URL names no database")?;
            Ok(Database {
                url: format!("{base}/{name}"),
                drop_with: Some((postgres_admin.to_string(), name)),
            })
        }
    }
}

async fn drop_database(database: Database) -> anyhow::Result<()> {
    if let Some((admin, name)) = database.drop_with {
        let mut admin = sqlx::PgConnection::connect(&admin).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
        let _ = admin.close().await;
    }
    Ok(())
}

/// What the database promises about a commit, in its own words.
async fn durability(backend: Backend, url: &str) -> anyhow::Result<String> {
    Ok(match backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(url).await?;
            // The gate sets these per connection; report what a connection of ours sees
            // after setting them the same way, so a change in the gate shows here.
            let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(&mut conn)
                .await?;
            let _ = conn.close().await;
            format!(
                "journal_mode={journal}, gate sets synchronous=FULL (fsync per commit; writes \
                 group-committed, each answered after its commit)"
            )
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            let fsync: String = sqlx::query_scalar("SHOW fsync")
                .fetch_one(&mut conn)
                .await?;
            let commit: String = sqlx::query_scalar("SHOW synchronous_commit")
                .fetch_one(&mut conn)
                .await?;
            let _ = conn.close().await;
            format!("fsync={fsync}, synchronous_commit={commit}")
        }
    })
}

/// Holds, then confirms, then (after moving the clock past cooling-off and quarantine)
/// releases, each phase for `plan.phase` with `plan.users` concurrent users.
pub async fn run(
    backend: Backend,
    dir: &std::path::Path,
    postgres_admin: &str,
    upstream_port: u16,
    plan: Plan,
) -> anyhow::Result<ProtectedFigures> {
    let database = create_database(backend, dir, postgres_admin).await?;
    let result = run_on(backend, &database.url, upstream_port, plan).await;
    drop_database(database).await?;
    result
}

async fn run_on(
    backend: Backend,
    database_url: &str,
    upstream_port: u16,
    plan: Plan,
) -> anyhow::Result<ProtectedFigures> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let public_url = format!("http://localhost:{}", addr.port());
    // The per-user limits are lifted: the bench's few users stand for many real ones.
    let config = format!(
        r#"listen = "{addr}"
public_url = "{public_url}"
upstream = "http://127.0.0.1:{upstream_port}"
database_url = "{database_url}"

[webauthn]
rp_id = "localhost"
rp_name = "Bench Exchange"

[identity]
mode = "header"
header = "x-user-id"

[limits]
max_pending_per_user = 1000000
max_ceremonies_per_minute = 1000000

[[rules]]
name = "enable-withdrawals"
methods = ["PUT", "PATCH"]
path = "/api/v1/api-keys/{{key_id}}"
when = [{{ pointer = "/permissions", contains = "withdraw" }}]
cooling_off = "24h"
confirm_within = "1h"
summary = "Enable withdrawals on API key {{key_id}}"
"#
    );
    let config = Config::from_toml_str(&config, "bench gate", &[])
        .map_err(|e| anyhow::anyhow!("bench gate config: {e}"))?;
    let clock = ManualClock::starting_now();
    let server = Server::bind(config, Arc::new(clock.clone()), listener).await?;
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(server.run_until(async {
        let _ = stopped.await;
    }));

    let gate_url = format!("http://{addr}");
    let mut users = Vec::with_capacity(plan.users);
    for n in 0..plan.users {
        let user = VirtualUser::new(&gate_url, [("x-user-id", format!("bench-user-{n}"))])?
            .with_public_url(&public_url)?;
        user.register_passkey("bench key").await?;
        users.push(Arc::new(user));
    }

    // Unique key ids per user, so each hold is its own change.
    let sequences = users.iter().map(|_| numbers()).collect();
    let holds = run_phase(&users, sequences, plan.phase, |user, n| async move {
        let request = withdraw_request(n);
        let hold = user.hold(&request).await?;
        Ok((request, hold.change_id))
    })
    .await?;
    let held: Vec<Vec<(ApiRequest, String)>> = holds.outputs;

    let held = held.into_iter().map(into_items).collect();
    let confirms = run_phase(&users, held, plan.phase, |user, item| async move {
        let confirmed = user.confirm(&item.1).await?;
        if confirmed.state != "cooling_off" {
            bail!("a confirmation left the change {}", confirmed.state);
        }
        Ok(item)
    })
    .await?;

    // Past the cooling-off (24 h) and the first passkey's quarantine (24 h).
    clock.advance(Duration::from_secs(49 * 3600));
    let releases = run_phase(
        &users,
        confirms.outputs.into_iter().map(into_items).collect(),
        plan.phase,
        |user, item| async move {
            let answer = user.release(&item.0, &item.1).await?;
            if answer.status != StatusCode::OK {
                bail!(
                    "a release was answered {}: {}",
                    answer.status,
                    answer.text()
                );
            }
            Ok(item)
        },
    )
    .await?;

    drop(users);
    let _ = stop.send(());
    serving.await??;
    Ok(ProtectedFigures {
        holds: holds.figures,
        confirms: confirms.figures,
        releases: releases.figures,
        durability: durability(backend, database_url).await?,
    })
}

/// A request the rule holds; `n` makes its key id, so each change is its own.
fn withdraw_request(n: usize) -> ApiRequest {
    ApiRequest::json(
        Method::PUT,
        &format!("/api/v1/api-keys/k{n}"),
        &json!({"permissions": ["read", "trade", "withdraw"]}),
    )
}

/// One user's work for a phase.
type Items<I> = Box<dyn Iterator<Item = I> + Send>;

fn numbers() -> Items<usize> {
    Box::new(0..)
}

fn into_items<I: Send + 'static>(items: Vec<I>) -> Items<I> {
    Box::new(items.into_iter())
}

struct Phase<T> {
    figures: OpFigures,
    /// Per user, what each operation produced, in order.
    outputs: Vec<Vec<T>>,
}

/// Every user works through its own items, one operation at a time, until they run out or
/// `length` has passed. The rate is over the phase's wall time, slowest user included.
async fn run_phase<I, T, F, Fut>(
    users: &[Arc<VirtualUser>],
    inputs: Vec<Items<I>>,
    length: Duration,
    op: F,
) -> anyhow::Result<Phase<T>>
where
    I: Send + 'static,
    T: Send + 'static,
    F: Fn(Arc<VirtualUser>, I) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send,
{
    let started = Instant::now();
    let deadline = started + length;
    let mut tasks = Vec::with_capacity(users.len());
    for (user, mut items) in users.iter().cloned().zip(inputs) {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut outputs = Vec::new();
            while Instant::now() < deadline {
                let Some(item) = items.next() else { break };
                let t = Instant::now();
                outputs.push(op(user.clone(), item).await?);
                latencies.push(t.elapsed());
            }
            anyhow::Ok((latencies, outputs))
        }));
    }
    let mut latencies = Vec::new();
    let mut outputs = Vec::new();
    for task in tasks {
        let (mut l, o) = task.await??;
        latencies.append(&mut l);
        outputs.push(o);
    }
    let wall = started.elapsed().as_secs_f64();
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Ok(Phase {
        figures: OpFigures {
            count: latencies.len(),
            per_second: latencies.len() as f64 / wall,
            p50_ms: pick(0.50),
            p99_ms: pick(0.99),
        },
        outputs,
    })
}
