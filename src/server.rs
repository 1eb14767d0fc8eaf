//! Running a gate: bind, serve, shut down gracefully. What `stepgate serve`, the demo and the
//! tests all use, so they exercise the same code.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;

use crate::app;
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
        let local_addr = listener.local_addr()?;
        let (router, state) = app::build(config, clock).await?;
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

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let service = self
            .router
            .into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(self.listener, service)
            .with_graceful_shutdown(shutdown)
            .await
    }
}
