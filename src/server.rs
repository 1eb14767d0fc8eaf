//! Running a gate: bind, serve, sweep, shut down gracefully. What `stepgate serve`, the demo
//! and the tests all use, so they exercise the same code.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;

use crate::app::{self, Migrations};
use crate::clock::Clock;
use crate::config::Config;
use crate::web::AppState;

pub struct Server {
    listener: TcpListener,
    router: Router,
    state: AppState,
    local_addr: SocketAddr,
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
        let (router, state) = app::build(config, clock, migrations).await?;
        Ok(Server {
            listener,
            router,
            state,
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until the process ends.
    pub async fn run(self) -> std::io::Result<()> {
        self.run_until(std::future::pending()).await
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish. Meanwhile the
    /// instance sweeps lapsed changes every `sweep_interval`; every instance may do so, and
    /// each change is expired exactly once.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let sweeper = tokio::spawn(sweep_forever(self.state.clone()));
        let service = self
            .router
            .into_make_service_with_connect_info::<SocketAddr>();
        let served = axum::serve(self.listener, service)
            .with_graceful_shutdown(shutdown)
            .await;
        sweeper.abort();
        served
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
            Err(error) => tracing::warn!(%error, "sweep failed"),
        }
    }
}
