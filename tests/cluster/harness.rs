//! The cluster test kit: a recording stand-in exchange (in this process), a clock file shared
//! by the gate processes, real `stepgate` processes started from the built binary, and a
//! cluster of them on one fresh PostgreSQL database.
//!
//! Gate processes log to a file in their own temporary directory; a failing test prints those
//! logs, so a failure in a child process is not silent.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::gate_client::GateUser;
use crate::testdb::{Backend, TestDb};

const STEPGATE: &str = env!("CARGO_BIN_EXE_stepgate");

/// Far enough past a confirmation that its 24 h cooling-off is over (25 hours).
pub const COOLING_OFF_PASSED: i64 = 25 * 3600;

/// The gates' upstream timeouts. The upstream timeout is long so that a gate forwarding to a
/// hung upstream is still waiting when the crash test kills it.
const CONNECT_TIMEOUT_SECS: i64 = 2;
const UPSTREAM_TIMEOUT_SECS: i64 = 30;
/// How long a gate lets requests in flight finish after SIGTERM.
pub const SHUTDOWN_GRACE_SECS: u64 = 20;
/// The admin API's bearer token in every test gate.
pub const ADMIN_TOKEN: &str = "cluster-admin-token-0123456789abcdef";
/// A release's lease as the gate computes it: connect + upstream timeout + 10 s.
pub const RELEASE_LEASE_SECS: i64 = CONNECT_TIMEOUT_SECS + UPSTREAM_TIMEOUT_SECS + 10;

/// How long anything that polls waits before it gives up: generous, for a loaded machine.
pub const PATIENCE: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------
// The stand-in exchange.

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct UpstreamState {
    received: Mutex<Vec<Received>>,
    /// Paths whose next request is recorded and then never answered.
    hang_next: Mutex<HashSet<String>>,
    /// Paths whose next request is recorded and then has its connection closed unanswered.
    break_next: Mutex<HashSet<String>>,
    /// Paths whose requests are answered only after this long (a slow upstream).
    slow: Mutex<HashMap<String, Duration>>,
}

/// The exchange API on 127.0.0.1:0: records every request, answers 200 JSON, and can be told
/// to leave the next request on a path unanswered forever (to crash a gate mid-forward).
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        let state = Arc::new(UpstreamState::default());
        let router = Router::new()
            .fallback(record_and_answer)
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stand-in upstream");
        let addr = listener.local_addr().expect("upstream address");
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .await
                .expect("the stand-in upstream failed");
        });
        Self { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything received so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Everything received on `path`, oldest first.
    pub fn received_on(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path_and_query == path)
            .collect()
    }

    /// The next request on `path` is recorded and then left without an answer.
    pub fn hang_next(&self, path: &str) {
        self.state
            .hang_next
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.to_string());
    }

    /// The next request on `path` is recorded and then its connection is closed without an
    /// answer (the gate sees a broken upstream).
    pub fn break_next(&self, path: &str) {
        self.state
            .break_next
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.to_string());
    }

    /// Requests on `path` are recorded at once and answered after `delay`.
    pub fn slow_down(&self, path: &str, delay: Duration) {
        self.state
            .slow
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.to_string(), delay);
    }

    /// Waits until at least `count` requests on `path` have been recorded.
    pub async fn wait_for(&self, path: &str, count: usize) -> Vec<Received> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let seen = self.received_on(path);
            if seen.len() >= count {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "the upstream saw {} request(s) on {path} after {PATIENCE:?}, expected {count}",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts that nothing has reached `path` yet.
    pub fn assert_saw_nothing_on(&self, path: &str) {
        let seen = self.received_on(path);
        assert!(
            seen.is_empty(),
            "the upstream must not have been reached on {path}: {seen:?}"
        );
    }

    pub fn assert_saw_nothing(&self, context: &str) {
        let received = self.received();
        assert!(
            received.is_empty(),
            "{context}: the upstream must not have been reached, but it received {:?}",
            received
                .iter()
                .map(|r| format!("{} {}", r.method, r.path_and_query))
                .collect::<Vec<_>>()
        );
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record_and_answer(State(state): State<Arc<UpstreamState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("the upstream reads the whole request body");
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_default();
    state
        .received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Received {
            method: parts.method,
            path_and_query: path_and_query.clone(),
            headers: parts.headers,
            body,
        });
    let hang = state
        .hang_next
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&path_and_query);
    if hang {
        // Never answer: the gate is killed while it waits, so its outcome stays unknown.
        std::future::pending::<()>().await;
    }
    let broken = state
        .break_next
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&path_and_query);
    if broken {
        // Unwinding out of the handler makes hyper drop the connection with no answer;
        // `resume_unwind` skips the panic hook, so nothing is printed.
        std::panic::resume_unwind(Box::new("the stand-in upstream breaks this connection"));
    }
    let delay = state
        .slow
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&path_and_query)
        .copied();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    axum::Json(json!({"upstream": "ok", "path": path_and_query})).into_response()
}

// ---------------------------------------------------------------------------------------------
// Time, as the gate processes see it.

/// The file named by `STEPGATE_TEST_CLOCK_FILE`: the gates' "now" is the wall clock plus the
/// number of seconds in it. Shared by every gate of a test, so they agree on the time.
pub struct TestClock {
    dir: tempfile::TempDir,
}

impl TestClock {
    pub fn new() -> Self {
        let clock = Self {
            dir: tempfile::tempdir().expect("a directory for the clock file"),
        };
        clock.set_offset(0);
        clock
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("offset")
    }

    /// Moves every gate's clock to wall clock + `seconds`.
    pub fn set_offset(&self, seconds: i64) {
        // Test and binary share the profile, so this tells whether the binary has the clock.
        assert!(
            seconds == 0 || cfg!(debug_assertions),
            "the cluster tests move time through STEPGATE_TEST_CLOCK_FILE, which only debug \
             builds of stepgate read: run them without --release"
        );
        // Write then rename, so a gate never reads a half-written (empty = 0) file.
        let partial = self.dir.path().join("offset.partial");
        std::fs::write(&partial, seconds.to_string()).expect("write the clock file");
        std::fs::rename(&partial, self.path()).expect("replace the clock file");
    }
}

// ---------------------------------------------------------------------------------------------
// Gate processes.

/// What every gate of one test shares: the config apart from `listen`.
#[derive(Debug, Clone)]
pub struct GateSettings {
    /// The origin users see and the WebAuthn origin: the same for every instance.
    pub public_url: String,
    pub upstream: String,
    pub database_url: String,
    pub clock_file: PathBuf,
    pub database_timeout: &'static str,
    /// Appended to the config file: more `[[rules]]`, `[notifications]`, ...
    pub extra_toml: String,
}

impl GateSettings {
    fn config_toml(&self, port: u16, admin_port: u16) -> String {
        format!(
            r#"
listen = "127.0.0.1:{port}"
public_url = "{public_url}"
upstream = "{upstream}"
database_url = "{database_url}"
admin_listen = "127.0.0.1:{admin_port}"
admin_token = "{ADMIN_TOKEN}"

[webauthn]
rp_id = "localhost"
rp_name = "Test Exchange"

[identity]
mode = "header"
header = "x-user-id"

[limits]
connect_timeout = "{CONNECT_TIMEOUT_SECS}s"
upstream_timeout = "{UPSTREAM_TIMEOUT_SECS}s"
database_timeout = "{database_timeout}"
# Every instance sweeps often, so the sweeps run alongside everything the tests do.
sweep_interval = "1s"
shutdown_grace = "{SHUTDOWN_GRACE_SECS}s"
# Auto-release workers (only with a `release = "auto"` rule) look often, so they race.
auto_release_interval = "200ms"

[[rules]]
name = "enable-withdrawals"
methods = ["PUT", "PATCH"]
path = "/api/v1/api-keys/{{key_id}}"
when = [{{ pointer = "/permissions", contains = "withdraw" }}]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on API key {{key_id}}"
{extra_toml}
"#,
            extra_toml = self.extra_toml,
            public_url = self.public_url,
            upstream = self.upstream,
            database_url = self.database_url,
            database_timeout = self.database_timeout,
        )
    }

    /// Writes the config for a gate listening on `port` (admin API on `admin_port`) into
    /// `dir`.
    fn write_config(&self, dir: &Path, port: u16, admin_port: u16) -> PathBuf {
        let path = dir.join("stepgate.toml");
        std::fs::write(&path, self.config_toml(port, admin_port)).expect("write the gate config");
        path
    }

    /// A `stepgate` command with this test's clock and a quiet log, and no `STEPGATE_*`
    /// variables inherited from the environment (they would override the config).
    fn command(&self) -> Command {
        let mut command = Command::new(STEPGATE);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STEPGATE_") {
                command.env_remove(key);
            }
        }
        command
            .env("STEPGATE_TEST_CLOCK_FILE", &self.clock_file)
            .env("STEPGATE_LOG", "warn")
            .stdin(Stdio::null());
        command
    }

    /// Runs `stepgate migrate` to completion.
    pub async fn migrate(&self) -> std::process::Output {
        let dir = tempfile::tempdir().expect("a directory for the migrate config");
        // `listen` is not used by `migrate`; any port will do.
        let config = self.write_config(dir.path(), 9, 10);
        let mut command = self.command();
        command.arg("migrate").arg("--config").arg(&config);
        tokio::task::spawn_blocking(move || {
            let output = command.output().expect("run stepgate migrate");
            drop(dir);
            output
        })
        .await
        .expect("the migrate runner panicked")
    }
}

/// Whether `serve` applies the migrations at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartUp {
    Migrate,
    NoMigrate,
}

/// How a gate process is launched beyond its config.
#[derive(Debug, Clone, Copy)]
pub struct Launch {
    pub start_up: StartUp,
    /// `STEPGATE_LOG`.
    pub log_level: &'static str,
    pub json_logs: bool,
}

impl Launch {
    pub fn quiet(start_up: StartUp) -> Launch {
        Launch {
            start_up,
            log_level: "warn",
            json_logs: false,
        }
    }
}

/// One `stepgate serve` process. Killed (SIGKILL) when dropped.
pub struct Gate {
    pub name: &'static str,
    pub port: u16,
    /// Where tests send requests: `http://127.0.0.1:PORT`.
    pub url: String,
    /// The admin listener (admin API, health, metrics): `http://127.0.0.1:PORT`.
    pub admin_url: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Gate {
    /// Starts a gate on `port` and waits until it answers HTTP.
    pub async fn start(
        name: &'static str,
        settings: &GateSettings,
        port: u16,
        start_up: StartUp,
    ) -> Gate {
        Gate::launch(name, settings, port, Launch::quiet(start_up)).await
    }

    /// Starts a gate as `launch` says and waits until it answers HTTP.
    pub async fn launch(
        name: &'static str,
        settings: &GateSettings,
        port: u16,
        launch: Launch,
    ) -> Gate {
        let dir = tempfile::tempdir().expect("a directory for the gate");
        let admin_port = free_ports(1)[0];
        let config = settings.write_config(dir.path(), port, admin_port);
        let log = std::fs::File::create(dir.path().join("stderr.log")).expect("create the log");
        let stdout = log.try_clone().expect("share the log file");
        let mut command = settings.command();
        command
            .env("STEPGATE_LOG", launch.log_level)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdout(stdout)
            .stderr(log);
        if launch.start_up == StartUp::NoMigrate {
            command.arg("--no-migrate");
        }
        if launch.json_logs {
            command.args(["--log-format", "json"]);
        }
        let child = command.spawn().expect("start stepgate serve");
        let mut gate = Gate {
            name,
            port,
            url: format!("http://127.0.0.1:{port}"),
            admin_url: format!("http://127.0.0.1:{admin_port}"),
            child,
            dir,
        };
        gate.wait_until_answering().await;
        gate
    }

    /// Polls a route that needs neither identity nor database until the gate answers it.
    async fn wait_until_answering(&mut self) {
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("build the probe client");
        let url = format!("{}/_stepgate/static/stepgate.css", self.url);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "gate {} exited ({status}) before it answered HTTP; its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            if let Ok(response) = probe.get(&url).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "gate {} did not answer HTTP within {PATIENCE:?}; its log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process with SIGKILL (no shutdown code runs) and returns how it ended.
    pub fn sigkill(&mut self) -> ExitStatus {
        self.child.kill().expect("send SIGKILL to the gate");
        self.child.wait().expect("reap the killed gate")
    }

    /// Sends SIGTERM and waits (at most [`PATIENCE`]) for the process to exit.
    pub async fn sigterm(&mut self) -> ExitStatus {
        self.send_sigterm();
        self.wait_for_exit().await
    }

    /// Sends SIGTERM without waiting.
    pub fn send_sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits (at most [`PATIENCE`]) for the process to exit by itself.
    pub async fn wait_for_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the gate process") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gate {} did not exit within {PATIENCE:?}; its log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- log of gate {} (port {}) -----\n{}----- end of log -----",
                self.name,
                self.port,
                self.log()
            );
        }
        // Already dead after `sigkill`: both calls then fail harmlessly.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` distinct free ports on 127.0.0.1 (all listeners held until every port is chosen, so
/// no two are the same).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A cluster: gates on one PostgreSQL database in front of one upstream.

/// Gates on one fresh PostgreSQL database, sharing a clock file and a stand-in upstream.
/// Field order is drop order: gates stop before the database is dropped.
pub struct Cluster {
    pub gates: Vec<Gate>,
    /// Killed processes that were replaced, kept so a failing test still prints their logs.
    retired: Vec<Gate>,
    pub settings: GateSettings,
    pub upstream: Upstream,
    pub clock: TestClock,
    /// Held only so the database outlives the gates; dropping it drops the database.
    _database: TestDb,
}

impl Cluster {
    /// `instances` gates on a fresh PostgreSQL database; `None` when PostgreSQL is unreachable
    /// outside CI (announced by `TestDb`).
    pub async fn start(instances: usize) -> Option<Cluster> {
        let database = TestDb::new(Backend::Postgres).await?;
        let url = database.url.clone();
        Some(Cluster::start_on(database, url, instances, "30s").await)
    }

    /// As [`Cluster::start`], with `extra_toml` appended to every gate's config; `upstream`
    /// in it is replaced by the stand-in upstream's URL.
    pub async fn start_with(instances: usize, extra_toml: &str) -> Option<Cluster> {
        let database = TestDb::new(Backend::Postgres).await?;
        let url = database.url.clone();
        Some(Cluster::start_configured(database, url, instances, "30s", extra_toml).await)
    }

    /// `instances` gates on `database`, reaching it through `database_url` (which may lead
    /// through a forwarder), with that `database_timeout`.
    pub async fn start_on(
        database: TestDb,
        database_url: String,
        instances: usize,
        database_timeout: &'static str,
    ) -> Cluster {
        Cluster::start_configured(database, database_url, instances, database_timeout, "").await
    }

    async fn start_configured(
        database: TestDb,
        database_url: String,
        instances: usize,
        database_timeout: &'static str,
        extra_toml: &str,
    ) -> Cluster {
        let upstream = Upstream::start().await;
        let clock = TestClock::new();
        let ports = free_ports(instances);
        let settings = GateSettings {
            // One origin for all instances, as behind one load balancer.
            public_url: format!("http://localhost:{}", ports[0]),
            upstream: upstream.url(),
            database_url,
            clock_file: clock.path(),
            database_timeout,
            extra_toml: extra_toml.replace("{upstream}", &upstream.url()),
        };
        let names = ["A", "B", "C", "D"];
        let mut gates = Vec::new();
        // One after the other: both would migrate the same database at start-up.
        for (i, port) in ports.into_iter().enumerate() {
            gates.push(Gate::start(names[i], &settings, port, StartUp::Migrate).await);
        }
        Cluster {
            gates,
            retired: Vec::new(),
            settings,
            upstream,
            clock,
            _database: database,
        }
    }

    /// Instance A's base URL.
    pub fn a(&self) -> String {
        self.gates[0].url.clone()
    }

    /// Instance B's base URL.
    pub fn b(&self) -> String {
        self.gates[1].url.clone()
    }

    /// A user whose passkey signs for the cluster's public origin.
    pub fn user(&self, name: &str) -> GateUser {
        GateUser::new(name, &self.settings.public_url)
    }

    /// Instance A.
    pub fn gate_a(&self) -> &Gate {
        &self.gates[0]
    }

    /// Replaces instance `index` (already killed) by a new process on the same port.
    pub async fn restart(&mut self, index: usize) {
        let old = &self.gates[index];
        let (name, port) = (old.name, old.port);
        let fresh = Gate::start(name, &self.settings, port, StartUp::Migrate).await;
        let old = std::mem::replace(&mut self.gates[index], fresh);
        self.retired.push(old);
    }
}
