//! Where each request goes: a path in the gate's namespace (`/_stepgate…`) to the router of the
//! gate's own routes, everything else straight to the proxy pipeline. Every gate route lives
//! under `/_stepgate/` (a test in `web::routes` checks), so no other path could match one and
//! the router would only send it to its fallback, the same pipeline; going there directly
//! skips the routing and the router's boxed layers on every pass-through request.
//! Both ways are watched by `web::observe`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use axum::Router;
use tower::ServiceExt;

use super::{gateway, observe, AppState};

/// The prefix every gate route has. A raw path with it may still end up in the proxy pipeline
/// (through the router's fallback), which canonicalises it before deciding anything.
pub const NAMESPACE: &str = "/_stepgate";

/// One gate: its routes and the state behind them. Cheap to clone (one reference count).
#[derive(Clone)]
pub struct Gate(Arc<GateInner>);

struct GateInner {
    routes: Router,
    state: AppState,
}

impl Gate {
    /// `routes` must already carry the observe layer and the proxy pipeline as its fallback.
    pub fn new(routes: Router, state: AppState) -> Gate {
        Gate(Arc::new(GateInner { routes, state }))
    }

    pub fn state(&self) -> &AppState {
        &self.0.state
    }

    /// Answers one request from `peer`.
    pub async fn serve(&self, peer: SocketAddr, mut request: Request) -> Response {
        let GateInner { routes, state } = &*self.0;
        if request.uri().path().starts_with(NAMESPACE) {
            request.extensions_mut().insert(ConnectInfo(peer));
            // Boxed, so the pass-through request's future below stays small.
            let answer: Result<Response, Infallible> =
                Box::pin(routes.clone().oneshot(request)).await;
            return match answer {
                Ok(response) => response,
                Err(never) => match never {},
            };
        }
        observe::watch(state, None, request, |request| {
            gateway::answer(state, peer, request)
        })
        .await
    }
}
