//! Route registration that remembers what it registered: the gate's and the admin API's routers
//! are built only through [`Routes`], which returns the router together with the list of
//! `(listener, method, path template)` it added. That list is the single source of truth the
//! OpenAPI test compares the document with, so a route cannot be added without the test
//! noticing. Building the list needs no database and no state: an axum `Router<S>` can be
//! built before `.with_state`.

use axum::handler::Handler;
use axum::routing::{on, MethodFilter};
use axum::Router;

/// Which listener serves a route: the public gate (`listen`) or the admin API
/// (`admin_listen`, bearer token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Listener {
    Gate,
    Admin,
}

/// One registered route. `GET` routes also answer `HEAD` (axum does that); the list names
/// `GET` only, as OpenAPI does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegisteredRoute {
    pub listener: Listener,
    /// Upper case: `GET`, `POST`.
    pub method: &'static str,
    /// The axum path template, which is also the OpenAPI path template (`/x/{id}`).
    pub path: &'static str,
}

/// A router under construction that records every route added to it.
pub struct Routes<S> {
    listener: Listener,
    router: Router<S>,
    registered: Vec<RegisteredRoute>,
}

impl<S> Routes<S>
where
    S: Clone + Send + Sync + 'static,
{
    pub fn new(listener: Listener) -> Self {
        Self {
            listener,
            router: Router::new(),
            registered: Vec::new(),
        }
    }

    pub fn get<H, T>(self, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.add(path, "GET", MethodFilter::GET, handler)
    }

    pub fn post<H, T>(self, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.add(path, "POST", MethodFilter::POST, handler)
    }

    fn add<H, T>(
        mut self,
        path: &'static str,
        method: &'static str,
        filter: MethodFilter,
        handler: H,
    ) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        // axum merges a second method on a path already routed (it panics only on the same
        // method twice, which is a programming error caught by every test that builds a router).
        self.router = self.router.route(path, on(filter, handler));
        self.registered.push(RegisteredRoute {
            listener: self.listener,
            method,
            path,
        });
        self
    }

    /// The router (layers and state still to add) and what was registered on it.
    pub fn finish(self) -> (Router<S>, Vec<RegisteredRoute>) {
        (self.router, self.registered)
    }
}

/// Every route of both listeners, in registration order: what the OpenAPI document must
/// describe, no more and no less.
pub fn all_registered() -> Vec<RegisteredRoute> {
    let mut routes = crate::app::gate_routes().registered;
    routes.extend(super::admin::admin_routes().1);
    routes.extend(super::ops::ops_routes().1);
    routes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The tripwire behind "single source of truth": outside this module, nothing in the
    /// crate adds a route to a router directly, so every route of the gate and the admin API
    /// goes through [`Routes`] and is listed. The demo exchange is another server (the
    /// stand-in upstream of `stepgate demo`), not the gate, so it may route as it likes.
    #[test]
    fn no_route_is_added_outside_the_registry() {
        const ALLOWED: &[&str] = &["src/web/routes.rs", "src/demo/"];
        const ROUTING_CALLS: &[&str] = &[".route(", ".route_service(", ".nest(", ".nest_service("];
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut offenders = Vec::new();
        let mut stack = vec![root.join("src")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("read a source directory") {
                let path = entry.expect("a directory entry").path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let relative = path
                    .strip_prefix(root)
                    .expect("under the crate root")
                    .to_string_lossy()
                    .replace('\\', "/");
                if !relative.ends_with(".rs") || ALLOWED.iter().any(|a| relative.starts_with(a)) {
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("read a source file");
                for (number, line) in text.lines().enumerate() {
                    if ROUTING_CALLS.iter().any(|call| line.contains(call)) {
                        offenders.push(format!("{relative}:{}: {}", number + 1, line.trim()));
                    }
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "routes must be registered through web::routes::Routes so the OpenAPI test sees \
             them; found direct routing calls:\n{}",
            offenders.join("\n")
        );
    }

    /// `web::dispatch` hands only paths in the gate's namespace to the router; a gate route
    /// outside it would never be reached.
    #[test]
    fn every_gate_route_is_in_the_gate_namespace() {
        let prefix = format!("{}/", crate::web::dispatch::NAMESPACE);
        let outside: Vec<RegisteredRoute> = all_registered()
            .into_iter()
            .filter(|route| route.listener == Listener::Gate && !route.path.starts_with(&prefix))
            .collect();
        assert!(
            outside.is_empty(),
            "gate routes outside {prefix}: {outside:?}"
        );
    }

    #[test]
    fn the_registry_lists_each_route_once_per_method() {
        let routes = all_registered();
        let mut unique = routes.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), routes.len(), "a route registered twice");
        assert!(routes.iter().any(|r| r.listener == Listener::Admin));
        assert!(routes
            .iter()
            .any(|r| r.method == "POST" && r.path == "/_stepgate/cancel/{id}"));
        assert!(routes
            .iter()
            .any(|r| r.method == "GET" && r.path == "/_stepgate/cancel/{id}"));
    }
}
