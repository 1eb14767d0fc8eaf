//! Assembles the gate from a [`Config`]: connects and migrates the store, builds the
//! relying party and the upstream, and wires the router into a [`Gate`]. Layer order matters
//! and is commented where it does.

use std::sync::Arc;
use std::time::Duration;

use axum::middleware::{from_fn, from_fn_with_state};
use axum::Router;
use tower_sessions::cookie::SameSite;
use tower_sessions::{Expiry, SessionManagerLayer};

use crate::approval::Approvals;
use crate::clock::Clock;
use crate::config::Config;
use crate::notify::Notifier;
use crate::passkeys::{build_webauthn, CeremonySettings, Passkeys};
use crate::proxy::Upstream;
use crate::stepup::service::StepUpSettings;
use crate::stepup::StepUp;
use crate::store::sessions::DbSessionStore;
use crate::store::Store;
use crate::web::routes::{Listener, RegisteredRoute, Routes};
use crate::web::{
    api, assets, cancel_link, dispatch::Gate, gateway, jwks, observe, openapi, pages,
    same_origin_only, security_headers, AppInner, AppState,
};

/// Whether start-up applies database migrations (`serve --no-migrate` turns it off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrations {
    Apply,
    Skip,
}

/// The gate's own routes before layers and state, and the list of what they are.
pub struct GateRoutes {
    /// Pages and the JSON API: wrapped in the session, cross-site and page-security layers.
    pub browser: Router<AppState>,
    /// Routes outside those layers (no session, cacheable): the OpenAPI document.
    pub public: Router<AppState>,
    /// Every route of both routers, for the OpenAPI test.
    pub registered: Vec<RegisteredRoute>,
}

/// Every route the gate serves itself (the rest goes to the proxy pipeline). A new route is
/// one line here plus its entry in `web::openapi`, or the OpenAPI test fails.
pub fn gate_routes() -> GateRoutes {
    let (browser, mut registered) = Routes::new(Listener::Gate)
        .get("/_stepgate/passkeys", pages::passkeys_page)
        .get("/_stepgate/changes", pages::changes_page)
        .get("/_stepgate/changes/{id}", pages::change_page)
        .get("/_stepgate/static/{name}", assets::asset)
        .post(
            "/_stepgate/api/passkeys/register/start",
            api::register_start,
        )
        .post(
            "/_stepgate/api/passkeys/register/finish",
            api::register_finish,
        )
        .get("/_stepgate/api/passkeys", api::list_passkeys)
        .get("/_stepgate/api/account", api::account)
        .post("/_stepgate/api/account/freeze", api::freeze)
        .post("/_stepgate/api/account/unfreeze", api::unfreeze)
        .get("/_stepgate/cancel/{id}", cancel_link::show)
        .post("/_stepgate/cancel/{id}", cancel_link::cancel)
        .post("/_stepgate/api/passkeys/{id}/rename", api::rename_passkey)
        .post("/_stepgate/api/passkeys/{id}/remove", api::remove_passkey)
        .get("/_stepgate/api/changes", api::list_changes)
        .get("/_stepgate/api/changes/{id}", api::get_change)
        .post(
            "/_stepgate/api/changes/{id}/confirm/start",
            api::confirm_start,
        )
        .post(
            "/_stepgate/api/changes/{id}/confirm/finish",
            api::confirm_finish,
        )
        .post("/_stepgate/api/changes/{id}/cancel", api::cancel)
        .finish();
    let (public, public_registered) = Routes::new(Listener::Gate)
        .get(openapi::PATH, openapi::serve)
        .get("/_stepgate/jwks.json", jwks::jwks)
        .finish();
    registered.extend(public_registered);
    GateRoutes {
        browser,
        public,
        registered,
    }
}

/// Builds the whole gate: its router and the state behind it.
pub async fn build(
    config: Config,
    clock: Arc<dyn Clock>,
    migrations: Migrations,
) -> anyhow::Result<Gate> {
    let store =
        Store::connect_with_timeout(&config.database_url, config.limits.database_timeout).await?;
    if migrations == Migrations::Apply {
        store.migrate().await?;
    }
    let webauthn = build_webauthn(&config.webauthn, &config).map_err(anyhow::Error::msg)?;
    let public_origin = config.public_url.origin().ascii_serialization();
    let notifier = Notifier::new(config.notifications.clone(), public_origin.clone());
    let passkeys = Passkeys::new(
        webauthn,
        store.clone(),
        CeremonySettings {
            ceremony_ttl: config.limits.ceremony_ttl,
            max_ceremonies_per_minute: config.limits.max_ceremonies_per_minute,
            registration_policy: config.passkeys.policy.clone(),
            request_attestation: config.passkeys.request_attestation,
            public_origin: public_origin.clone(),
        },
        notifier.clone(),
    );
    // A forward takes at most connect + upstream timeout; the lease outlasts it.
    let release_lease =
        config.limits.connect_timeout + config.limits.upstream_timeout + Duration::from_secs(10);
    let stepup = StepUp::new(
        store.clone(),
        passkeys,
        notifier,
        clock.clone(),
        StepUpSettings {
            release_lease,
            max_pending_per_user: config.limits.max_pending_per_user,
            passkeys: config.passkeys.clone(),
            rule_policies: config.rule_policies.clone(),
        },
    );
    let upstream = Upstream::new(&config).map_err(anyhow::Error::msg)?;
    let approvals = Approvals::new(
        config.approval.clone(),
        public_origin.clone(),
        store.clone(),
        clock.clone(),
    );
    // Load the signing key now when the database is there, so a broken key shows at start-up;
    // a database that is down only delays it to the first release.
    if let Err(error) = approvals.signer().await {
        tracing::warn!(%error, "the approval signing key could not be loaded yet");
    } else if config.approval.signing_key_pem.is_none() {
        tracing::info!(
            "approvals are signed with the key kept in the database; set [approval] \
             signing_key_file to keep it out of the database"
        );
    }
    let secure_cookie = config.public_url.scheme() == "https";
    let state = AppState(Arc::new(AppInner {
        config,
        stepup,
        upstream,
        approvals,
        clock: clock.clone(),
        public_origin,
        metrics: crate::metrics::Metrics::new(),
        draining: std::sync::atomic::AtomicBool::new(false),
    }));

    let sessions = SessionManagerLayer::new(DbSessionStore::new(store))
        .with_name("stepgate_session")
        .with_path("/_stepgate")
        .with_same_site(SameSite::Strict)
        .with_http_only(true)
        .with_secure(secure_cookie)
        .with_expiry(Expiry::OnInactivity(time::Duration::hours(1)));

    let routes = gate_routes();
    let gate = routes
        .browser
        // Innermost first: the cross-site check refuses before any session work happens;
        // the security headers wrap everything, refusals included.
        .layer(from_fn_with_state(state.clone(), same_origin_only))
        .layer(sessions)
        .layer(from_fn(security_headers))
        // Added after the layers, so not wrapped by them: the OpenAPI document and the JWKS
        // are public, cacheable and need no session.
        .merge(routes.public);

    // Everything that is not a gate route goes through the proxy pipeline. Gate layers do
    // not wrap it: pass-through answers are the upstream's, untouched.
    let router = gate
        .fallback(gateway::gateway)
        // Outermost, on gate routes and the proxy pipeline alike: every request gets an id, a
        // span and its metrics, refusals by inner layers included.
        .layer(from_fn_with_state(state.clone(), observe::observe))
        .with_state(state.clone());
    Ok(Gate::new(router, state))
}
