//! Running a gate: accept connections, serve them, sweep, shut down gracefully. What
//! `stepgate serve`, the demo and the tests all use, so they exercise the same code.
//!
//! The accept loop is our own rather than `axum::serve` because the connection limits live
//! here: a client gets `header_timeout` to send its request head (slow-loris), and a head
//! larger than `max_header_bytes` is answered 431 by hyper before any of our code runs.
//!
//! Connections are served thread-per-core, as nginx's workers are: each accepted connection is
//! handed to one of the process's serving threads, a single-threaded runtime per core, and
//! everything it starts (its upstream connections included, see `proxy`) stays on that thread.
//! The threads live as long as the process: database connections opened from a request are
//! registered with their runtime and must stay usable after a server stops. On one shared
//! work-stealing runtime a proxied request hopped between threads several times (client
//! connection task ↔ upstream connection task), and those wake-ups cost more than the proxying
//! itself (BENCHMARKS.md).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::app::{self, Migrations};
use crate::clock::Clock;
use crate::config::Config;
use crate::express::{Ended, Prefixed};
use crate::web::dispatch::Gate;
use crate::web::AppState;

pub struct Server {
    listener: TcpListener,
    gate: Gate,
    local_addr: SocketAddr,
    admin: Option<(TcpListener, SocketAddr)>,
}

impl Server {
    /// Connects the database, applies migrations and prepares the router on `listener`.
    pub async fn bind(
        config: Config,
        clock: Arc<dyn Clock>,
        listener: TcpListener,
    ) -> anyhow::Result<Server> {
        Self::bind_with(config, clock, listener, Migrations::Apply).await
    }

    /// As [`Server::bind`], choosing whether to apply migrations.
    pub async fn bind_with(
        config: Config,
        clock: Arc<dyn Clock>,
        listener: TcpListener,
        migrations: Migrations,
    ) -> anyhow::Result<Server> {
        let local_addr = listener.local_addr()?;
        let admin_listen = config.admin.as_ref().map(|admin| admin.listen);
        let gate = app::build(config, clock, migrations).await?;
        let admin = match admin_listen {
            Some(addr) => {
                let admin_listener = TcpListener::bind(addr).await.map_err(|e| {
                    anyhow::anyhow!("cannot listen for the admin API on {addr}: {e}")
                })?;
                let admin_addr = admin_listener.local_addr()?;
                Some((admin_listener, admin_addr))
            }
            None => None,
        };
        Ok(Server {
            listener,
            gate,
            local_addr,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn state(&self) -> &AppState {
        self.gate.state()
    }

    /// Where the admin API listens, when configured.
    pub fn admin_local_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, addr)| *addr)
    }

    /// Serves until the process ends.
    pub async fn run(self) -> std::io::Result<()> {
        self.run_until(std::future::pending()).await
    }

    /// Serves until `shutdown` completes, then stops accepting and lets in-flight requests
    /// finish for up to `limits.shutdown_grace` (idle keep-alive connections are closed at
    /// once). Nothing about changes lives in memory, so a held or cooling-off change is
    /// picked up by the next process as it was. Meanwhile the instance sweeps lapsed changes
    /// every `sweep_interval`; every instance may do so, and each change is expired exactly
    /// once.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.gate.state().clone();
        let sweeper = tokio::spawn(sweep_forever(state.clone()));
        let sender = tokio::spawn(deliver_forever(state.clone()));
        // Told to stop rather than aborted, so a forward in flight records its outcome.
        let (stop_auto_release, auto_release_stop) = tokio::sync::watch::channel(false);
        let auto_releaser =
            tokio::spawn(crate::auto_release::run(state.clone(), auto_release_stop));
        // The admin API has its own listener so it can stay off the public network.
        // The operator endpoints (health, readiness, metrics) share it, without the token.
        let admin = self.admin.map(|(listener, _)| {
            let router = crate::web::admin::router(state.clone())
                .merge(crate::web::ops::router(state.clone()));
            tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, router).await {
                    tracing::error!(%error, "the admin API stopped");
                }
            })
        });
        let limits = &state.config.limits;
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_header_bytes)
            .keep_alive(true);
        // Turns true when shutting down; every connection holds a receiver, so the sender
        // sees when the last one has ended.
        let (drain, draining) = tokio::sync::watch::channel(false);
        drop(draining);
        let serving = serving_threads()?;
        let mut next_thread = 0usize;
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = &mut shutdown => break,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // Re-registered on the serving thread below, so its readiness events are that
            // thread's own.
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::debug!(%error, %peer, "could not hand a connection over");
                    continue;
                }
            };
            let gate = self.gate.clone();
            let http = http.clone();
            let drain = drain.subscribe();
            next_thread = (next_thread + 1) % serving.len();
            serving[next_thread].spawn(async move {
                let stream = match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::debug!(%error, %peer, "could not serve a connection");
                        return;
                    }
                };
                match crate::express::serve(&gate, stream, peer).await {
                    Ended::Closed => {}
                    Ended::HandOver(connection) => {
                        serve_with_hyper(gate, connection, peer, &http, drain).await;
                    }
                }
            });
        }
        drop(self.listener);
        // No new auto-releases from now on; one in flight may finish (bounded below).
        let _ = stop_auto_release.send(true);
        state
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let grace = state.config.limits.shutdown_grace;
        tracing::info!(
            grace_seconds = grace.as_secs_f64(),
            "shutting down: no new connections; finishing requests in flight"
        );
        drain.send_replace(true);
        // Idle express-lane connections wait on their thread, not on the channel: wake them.
        for thread in serving {
            thread.spawn(async { crate::express::wake_parked() });
        }
        if tokio::time::timeout(grace, drain.closed()).await.is_err() {
            tracing::warn!(
                grace_seconds = grace.as_secs_f64(),
                "the shutdown grace period ended with requests still in flight; they are cut off"
            );
        } else {
            tracing::info!("every request in flight finished");
        }
        // A forward takes at most connect + upstream timeout; past that, abort it: the change
        // stays `applying` and its lease lets another instance forward it with the same key.
        let auto_release_abort = auto_releaser.abort_handle();
        let forward_bound = limits.connect_timeout + limits.upstream_timeout;
        if tokio::time::timeout(forward_bound, auto_releaser)
            .await
            .is_err()
        {
            auto_release_abort.abort();
        }
        sweeper.abort();
        sender.abort();
        if let Some(admin) = admin {
            admin.abort();
        }
        Ok(())
    }
}

/// Serves the rest of a connection the express lane handed over with hyper and the router
/// (`web::dispatch`), until it ends or, once `drain` turns true, its request in flight is done.
async fn serve_with_hyper(
    gate: Gate,
    connection: Prefixed,
    peer: SocketAddr,
    http: &hyper::server::conn::http1::Builder,
    mut drain: tokio::sync::watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let gate = gate.clone();
        async move {
            let response = gate.serve(peer, request.map(Body::new)).await;
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let serving = http.serve_connection(TokioIo::new(connection), service);
    tokio::pin!(serving);
    // The first poll reads the handed-over request, so a shutdown already under way finishes
    // that request rather than dropping it as an idle connection's.
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(serving.as_mut().poll(cx))).await;
    let ended = match first {
        std::task::Poll::Ready(ended) => ended,
        std::task::Poll::Pending => loop {
            tokio::select! {
                biased;
                ended = serving.as_mut() => break ended,
                changed = drain.changed() => {
                    if changed.is_err() || *drain.borrow() {
                        serving.as_mut().graceful_shutdown();
                        break serving.as_mut().await;
                    }
                }
            }
        },
    };
    if let Err(error) = ended {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}

/// The process's serving threads: one single-threaded runtime per core, started on first use
/// and shared by every server in the process (tests run many), each taking connections in turn.
fn serving_threads() -> std::io::Result<&'static [tokio::runtime::Handle]> {
    static THREADS: std::sync::OnceLock<Vec<tokio::runtime::Handle>> = std::sync::OnceLock::new();
    if let Some(handles) = THREADS.get() {
        return Ok(handles);
    }
    let count = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut handles = Vec::with_capacity(count);
    for n in 0..count {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(runtime.handle().clone());
        std::thread::Builder::new()
            .name(format!("stepgate-serve-{n}"))
            .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    }
    // Two servers starting at once may both get here; the loser's threads idle, harmlessly.
    Ok(THREADS.get_or_init(|| handles))
}

/// Delivers queued webhooks, every second; every instance may, each row goes out under a lease.
async fn deliver_forever(state: AppState) {
    if state.config.notifications.webhooks.is_empty() {
        return;
    }
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let notifier = state.stepup.notifier();
        if let Err(error) = notifier
            .deliver_due(state.stepup.store(), state.clock.as_ref())
            .await
        {
            state.metrics.record_database_error();
            tracing::warn!(%error, "webhook delivery round failed");
        }
    }
}

async fn sweep_forever(state: AppState) {
    let mut ticks = tokio::time::interval(state.config.limits.sweep_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match state.stepup.sweep().await {
            Ok(expired) if !expired.is_empty() => {
                tracing::info!(
                    count = expired.len(),
                    "expired changes whose deadline passed"
                );
            }
            Ok(_) => {}
            // A database outage is reported by the requests that need it; keep sweeping.
            Err(error) => {
                if matches!(error, crate::error::GateError::Store(_)) {
                    state.metrics.record_database_error();
                }
                tracing::warn!(%error, "sweep failed");
            }
        }
    }
}
