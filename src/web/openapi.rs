//! The OpenAPI 3.1 document of the gate's HTTP interface, served at `/_stepgate/openapi.json`:
//! the hold answer and the release contract of protected requests, the JSON API (ceremonies,
//! changes, cancel, freeze), the gate's pages and one-click cancel link, and the admin API on
//! its own listener. It is written here by hand with `serde_json` (no codegen), and the tests
//! below compare it with the routes `web::routes` actually registered, in both directions, so
//! it cannot drift: a new route without an entry here fails them.

use std::sync::OnceLock;

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue};
use serde_json::{json, Map, Value};

/// Where the document is served.
pub const PATH: &str = "/_stepgate/openapi.json";

/// `GET /_stepgate/openapi.json`: the same bytes for the life of the process, so caches may
/// keep them (the document changes only with the binary).
pub async fn serve() -> Response {
    static BYTES: OnceLock<String> = OnceLock::new();
    let body = BYTES.get_or_init(|| document().to_string()).clone();
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// One documented operation: the method and path template it answers, and its OpenAPI
/// operation object.
struct Operation {
    method: &'static str,
    path: &'static str,
    body: Value,
}

fn op(method: &'static str, path: &'static str, body: Value) -> Operation {
    Operation { method, path, body }
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for operation in gate_operations() {
        add(&mut paths, operation, None);
    }
    for operation in admin_operations() {
        add(&mut paths, operation, Some(admin_server()));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "stepgate",
            "version": env!("CARGO_PKG_VERSION"),
            "summary": "A WebAuthn step-up gate in front of an exchange's API-key endpoints.",
            "description": INFO_DESCRIPTION,
            "license": { "name": "Apache-2.0", "identifier": "Apache-2.0" },
        },
        "servers": [{
            "url": "{public_url}",
            "description": "The gate's listener (`listen`), as users' browsers reach it: the \
                            configured `public_url`, which is also the WebAuthn origin.",
            "variables": { "public_url": { "default": "http://localhost:8080" } },
        }],
        "tags": [
            { "name": "protected", "description": "Requests the rules protect: the hold answer and the release contract (see `components.pathItems.ProtectedRequest`)." },
            { "name": "passkeys", "description": "Registering, listing, renaming and removing the user's passkeys." },
            { "name": "changes", "description": "Held changes: list, read, confirm with a passkey, cancel." },
            { "name": "account", "description": "Emergency freeze and the unfreeze that must be confirmed." },
            { "name": "pages", "description": "The gate's HTML pages and their static assets (text/html, text/css, text/javascript)." },
            { "name": "meta", "description": "This document." },
            { "name": "admin", "description": "The admin API, on its own listener (`admin_listen`) with a bearer token. It can look, freeze and start an unfreeze; no route approves, confirms or hurries a change." },
        ],
        "paths": paths,
        "components": components(),
    })
}

fn add(paths: &mut Map<String, Value>, operation: Operation, servers: Option<Value>) {
    let item = paths.entry(operation.path).or_insert_with(|| json!({}));
    if let Some(servers) = servers {
        item["servers"] = servers;
    }
    item[operation.method.to_ascii_lowercase()] = operation.body;
}

fn admin_server() -> Value {
    json!([{
        "url": "http://{admin_listen}",
        "description": "The admin listener (`admin_listen`): keep it off the public network.",
        "variables": { "admin_listen": { "default": "127.0.0.1:8081" } },
    }])
}

const INFO_DESCRIPTION: &str = "\
stepgate is a reverse proxy in front of an exchange's API. Requests no rule matches stream \
through untouched. A request a rule protects (method + path + body) is **held**: the gate \
stores it and answers `403` with `error: \"step_up_required\"` (schema `StepUpRequired`) and \
`WWW-Authenticate: StepUp realm=\"stepgate\", error=\"step_up_required\", change_id=\"<id>\"`. \
The user confirms the change with a passkey on `confirm_url` (or through \
`/_stepgate/api/changes/{id}/confirm/start` and `/finish`); it then cools off until \
`release_at`, during which it can be cancelled.\n\n\
**Release contract.** After `release_at` the client sends the *identical* request again \
(same method, path, query, content type and body bytes) with the header \
`Stepgate-Change: <change id>`. The gate forwards it once, with `Idempotency-Key: <change id>`, \
and the answer is the exchange's own. A different request, an early one, or a second release \
is refused with the JSON error shape (`Error`). See `components.pathItems.ProtectedRequest`.\n\n\
**Errors** are JSON `{\"error\": code, \"message\": sentence}` (schema `Error`), sometimes with \
`release_at`, `state` or `upstream_status`; pages answer errors as HTML with the same status.";

// ---------------------------------------------------------------------------------------------
// Building blocks.

fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn json_content(schema: Value) -> Value {
    json!({ "application/json": { "schema": schema } })
}

fn ok(description: &str, schema_name: &str) -> Value {
    json!({ "description": description, "content": json_content(schema(schema_name)) })
}

/// An error response: the `Error` shape with `error` limited to the codes this operation can
/// give with this status.
fn error(codes: &[&str]) -> Value {
    json!({
        "description": format!("Refused: {}.", codes.join(", ")),
        "content": json_content(json!({
            "allOf": [schema("Error")],
            "properties": { "error": { "enum": codes } },
        })),
    })
}

fn html(description: &str) -> Value {
    json!({ "description": description, "content": { "text/html": { "schema": { "type": "string" } } } })
}

/// Responses of the JSON API: the operation's own plus what every identified, database-backed
/// call can answer. State-changing calls also refuse cross-site requests.
fn api_responses(method: &str, own: Value) -> Value {
    let mut responses = own;
    responses["401"] = error(&["unauthenticated"]);
    responses["500"] = error(&["internal_error"]);
    responses["503"] = error(&["database_unavailable"]);
    if method == "POST" {
        let forbidden = responses.get("403").cloned();
        responses["403"] = match forbidden {
            Some(existing) => with_code(existing, "cross_origin"),
            None => error(&["cross_origin"]),
        };
    }
    responses
}

/// Adds `code` to an `error(...)` response's list.
fn with_code(response: Value, code: &str) -> Value {
    let mut codes: Vec<String> = response["content"]["application/json"]["schema"]["properties"]
        ["error"]["enum"]
        .as_array()
        .map(|codes| {
            codes
                .iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    codes.push(code.to_string());
    let codes: Vec<&str> = codes.iter().map(String::as_str).collect();
    error(&codes)
}

fn path_param(name: &str, description: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": description, "schema": { "type": "string" } })
}

fn change_id_param() -> Value {
    path_param(
        "id",
        "The change's id (a UUID; anything else names nothing: 404).",
    )
}

/// Identified by the exchange's edge (header mode) or by the session JWT (jwt mode).
fn identified() -> Value {
    json!([{ "edgeIdentity": [] }, { "sessionJwt": [] }])
}

/// Passkey ceremonies are also bound to the gate's browser session (its cookie).
fn identified_in_session() -> Value {
    json!([
        { "edgeIdentity": [], "gateSession": [] },
        { "sessionJwt": [], "gateSession": [] },
    ])
}

fn request_body(schema_name: &str) -> Value {
    json!({ "required": true, "content": json_content(schema(schema_name)) })
}

// ---------------------------------------------------------------------------------------------
// The gate's routes.

fn gate_operations() -> Vec<Operation> {
    vec![
        op("GET", "/_stepgate/jwks.json", json!({
            "tags": ["meta"],
            "operationId": "jwks",
            "summary": "The approval signing key, as a JWKS",
            "description": "The public key that signs the `Stepgate-Approval` header of every released request (RFC 7517). An exchange verifies the approval with it (see `stepgate::approval::verify`) and can refuse a change that did not come through the gate. Public and cacheable.",
            "security": [],
            "responses": {
                "200": { "description": "The key set.", "content": { "application/json": { "schema": {
                    "type": "object",
                    "required": ["keys"],
                    "properties": { "keys": { "type": "array", "items": { "type": "object", "required": ["kty", "kid", "alg", "use"] } } },
                } } } },
                "503": error(&["database_unavailable"]),
            },
        })),
        op("GET", PATH, json!({
            "tags": ["meta"],
            "operationId": "openapi",
            "summary": "This OpenAPI document",
            "description": "The machine-readable description of the gate's HTTP interface. Public and cacheable.",
            "security": [],
            "responses": { "200": { "description": "The document.", "content": { "application/json": { "schema": { "type": "object" } } } } },
        })),
        // --- pages ---------------------------------------------------------------------------
        op("GET", "/_stepgate/passkeys", page("passkeysPage", "The user's passkeys page", "Lists the user's passkeys; registers, renames and removes them through the JSON API.")),
        op("GET", "/_stepgate/changes", page("changesPage", "The user's pending changes page", "Lists held and cooling-off changes, with cancel buttons and the emergency freeze.")),
        op("GET", "/_stepgate/changes/{id}", {
            let mut page = page("changePage", "The confirm page of one change", "Says in plain words what the change does, that no support agent will ever ask for it, and confirms it with a passkey (this is `confirm_url`). After confirming it shows the cooling-off countdown.");
            page["parameters"] = json!([change_id_param()]);
            page
        }),
        op("GET", "/_stepgate/static/{name}", json!({
            "tags": ["pages"],
            "operationId": "staticAsset",
            "summary": "A static asset of the pages",
            "description": "`stepgate.js` (the WebAuthn calls) or `stepgate.css`. No identity needed.",
            "security": [],
            "parameters": [path_param("name", "`stepgate.js` or `stepgate.css`.")],
            "responses": {
                "200": { "description": "The asset.", "content": {
                    "text/javascript": { "schema": { "type": "string" } },
                    "text/css": { "schema": { "type": "string" } },
                } },
                "404": { "description": "No such asset (empty body)." },
            },
        })),
        op("GET", "/_stepgate/cancel/{id}", cancel_link(
            "showCancelLink",
            "Show a change from a one-click cancel link",
            "Opens the link mailed with `change.confirmed` (`cancel_url`). Only shows the change and a cancel button: mail scanners prefetch links, so a GET never cancels. No login and no passkey: the signed token names this one change.",
            "The change and, while it can be cancelled, the button.",
        )),
        op("POST", "/_stepgate/cancel/{id}", cancel_link(
            "cancelByLink",
            "Cancel a change with a one-click cancel link",
            "The button on the link's page: cancels the change the token names, without login or passkey, until the change can no longer be cancelled.",
            "The change, now cancelled (or its final state if it could no longer be cancelled).",
        )),
        // --- passkeys ------------------------------------------------------------------------
        op("POST", "/_stepgate/api/passkeys/register/start", json!({
            "tags": ["passkeys"],
            "operationId": "registerStart",
            "summary": "Start registering a passkey",
            "description": "Starts a WebAuthn registration ceremony bound to this browser session. The answer is `PublicKeyCredentialCreationOptions` in the W3C JSON form under `publicKey`, plus the `ceremony_id` to finish with.",
            "security": identified_in_session(),
            "responses": api_responses("POST", json!({
                "200": ok("Creation options.", "CreationCeremony"),
                "403": error(&["account_frozen"]),
                "429": error(&["too_many_ceremonies"]),
            })),
        })),
        op("POST", "/_stepgate/api/passkeys/register/finish", json!({
            "tags": ["passkeys"],
            "operationId": "registerFinish",
            "summary": "Finish registering a passkey",
            "description": "Sends the authenticator's `credential.toJSON()`. The user's first passkey is active at once (200, quarantined for `passkeys.quarantine`); a further one is pending until the user confirms the `passkey-add` change with an existing passkey (202).",
            "security": identified_in_session(),
            "requestBody": request_body("RegisterFinish"),
            "responses": api_responses("POST", json!({
                "200": ok("The first passkey, active.", "Passkey"),
                "202": ok("The passkey, pending a confirmed change.", "PendingPasskey"),
                "400": error(&["bad_request", "ceremony_invalid", "registration_failed"]),
                "403": error(&["account_frozen", "passkey_not_allowed", "user_not_verified"]),
                "409": error(&["duplicate_credential"]),
            })),
        })),
        op("GET", "/_stepgate/api/passkeys", json!({
            "tags": ["passkeys"],
            "operationId": "listPasskeys",
            "summary": "List the user's passkeys",
            "description": "Active, pending and disabled passkeys, newest last.",
            "security": identified(),
            "responses": api_responses("GET", json!({ "200": ok("The passkeys.", "PasskeyList") })),
        })),
        op("POST", "/_stepgate/api/passkeys/{id}/rename", json!({
            "tags": ["passkeys"],
            "operationId": "renamePasskey",
            "summary": "Rename a passkey",
            "description": "Renaming is harmless, so it needs no confirmation.",
            "security": identified(),
            "parameters": [path_param("id", "The passkey's id (a UUID).")],
            "requestBody": request_body("RenamePasskey"),
            "responses": api_responses("POST", json!({
                "200": ok("The new name.", "RenamedPasskey"),
                "400": error(&["bad_request"]),
                "404": error(&["not_found"]),
            })),
        })),
        op("POST", "/_stepgate/api/passkeys/{id}/remove", json!({
            "tags": ["passkeys"],
            "operationId": "removePasskey",
            "summary": "Remove a passkey",
            "description": "Removing an active passkey is a change the user confirms with a passkey (202, `passkey-remove`); a pending one is dropped at once (200).",
            "security": identified(),
            "parameters": [path_param("id", "The passkey's id (a UUID).")],
            "responses": api_responses("POST", json!({
                "200": ok("A pending passkey, dropped.", "Removed"),
                "202": ok("The change to confirm.", "StartedChange"),
                "404": error(&["not_found"]),
                "429": error(&["too_many_pending_changes"]),
            })),
        })),
        // --- account -------------------------------------------------------------------------
        op("GET", "/_stepgate/api/account", json!({
            "tags": ["account"],
            "operationId": "account",
            "summary": "Whether the account is frozen",
            "description": "The account's freeze state.",
            "security": identified(),
            "responses": api_responses("GET", json!({ "200": ok("The account.", "Account") })),
        })),
        op("POST", "/_stepgate/api/account/freeze", json!({
            "tags": ["account"],
            "operationId": "freeze",
            "summary": "Emergency freeze",
            "description": "Cancels every held or cooling-off change at once and refuses new protected requests, releases and passkey registrations (`403 account_frozen`) until unfrozen. No passkey needed: stopping must be easy.",
            "security": identified(),
            "responses": api_responses("POST", json!({ "200": ok("Frozen; the ids of the changes it cancelled.", "Frozen") })),
        })),
        op("POST", "/_stepgate/api/account/unfreeze", json!({
            "tags": ["account"],
            "operationId": "unfreeze",
            "summary": "Start an unfreeze",
            "description": "Unfreezing is loosening: it creates an `account-unfreeze` change the user confirms with a passkey and which then cools off for `freeze.unfreeze_cooling_off`.",
            "security": identified(),
            "responses": api_responses("POST", json!({
                "202": ok("The change to confirm.", "StartedChange"),
                "400": error(&["bad_request"]),
                "429": error(&["too_many_pending_changes"]),
            })),
        })),
        // --- changes -------------------------------------------------------------------------
        op("GET", "/_stepgate/api/changes", json!({
            "tags": ["changes"],
            "operationId": "listChanges",
            "summary": "List the user's changes",
            "description": "Every change of the user, in any state.",
            "security": identified(),
            "responses": api_responses("GET", json!({ "200": ok("The changes.", "ChangeList") })),
        })),
        op("GET", "/_stepgate/api/changes/{id}", json!({
            "tags": ["changes"],
            "operationId": "getChange",
            "summary": "Read one change",
            "description": "The change's state and deadlines. Another user's change is `404`, like an unknown one.",
            "security": identified(),
            "parameters": [change_id_param()],
            "responses": api_responses("GET", json!({
                "200": ok("The change.", "Change"),
                "404": error(&["not_found"]),
            })),
        })),
        op("POST", "/_stepgate/api/changes/{id}/confirm/start", json!({
            "tags": ["changes"],
            "operationId": "confirmStart",
            "summary": "Start confirming a change with a passkey",
            "description": "Starts a WebAuthn assertion ceremony bound to this change's request digest and to this browser session. The answer is `PublicKeyCredentialRequestOptions` in the W3C JSON form under `publicKey`, plus `ceremony_id`. User verification is always required.",
            "security": identified_in_session(),
            "parameters": [change_id_param()],
            "responses": api_responses("POST", json!({
                "200": ok("Request options.", "RequestCeremony"),
                "403": error(&["account_frozen", "change_cancelled", "change_expired", "passkey_not_allowed"]),
                "404": error(&["not_found"]),
                "409": error(&["no_passkey", "change_not_held"]),
                "429": error(&["too_many_ceremonies"]),
            })),
        })),
        op("POST", "/_stepgate/api/changes/{id}/confirm/finish", json!({
            "tags": ["changes"],
            "operationId": "confirmFinish",
            "summary": "Finish confirming a change with a passkey",
            "description": "Sends the authenticator's `credential.toJSON()`. On success the change is `cooling_off` until `release_at`; with a passkey still in quarantine it also says until when.",
            "security": identified_in_session(),
            "parameters": [change_id_param()],
            "requestBody": request_body("ConfirmFinish"),
            "responses": api_responses("POST", json!({
                "200": ok("Confirmed: cooling off.", "Confirmed"),
                "400": error(&["bad_request", "ceremony_invalid"]),
                "403": error(&["account_frozen", "assertion_invalid", "user_not_verified", "passkey_not_allowed", "passkey_disabled", "change_cancelled", "change_expired"]),
                "404": error(&["not_found"]),
                "409": error(&["no_passkey", "change_not_held"]),
            })),
        })),
        op("POST", "/_stepgate/api/changes/{id}/cancel", json!({
            "tags": ["changes"],
            "operationId": "cancelChange",
            "summary": "Cancel a change",
            "description": "Cancels a held or cooling-off change at once. No passkey needed: stopping must be easy.",
            "security": identified(),
            "parameters": [change_id_param()],
            "responses": api_responses("POST", json!({
                "200": ok("Cancelled.", "StateOnly"),
                "403": error(&["change_cancelled", "change_expired"]),
                "404": error(&["not_found"]),
                "409": error(&["change_already_applied", "change_not_held"]),
            })),
        })),
    ]
}

fn page(operation_id: &str, summary: &str, description: &str) -> Value {
    json!({
        "tags": ["pages"],
        "operationId": operation_id,
        "summary": summary,
        "description": description,
        "security": identified(),
        "responses": {
            "200": html("The page."),
            "401": html("No verified identity: an error page."),
            "404": html("Not found: an error page."),
            "503": html("The database is unavailable: an error page."),
        },
    })
}

fn cancel_link(operation_id: &str, summary: &str, description: &str, done: &str) -> Value {
    json!({
        "tags": ["changes"],
        "operationId": operation_id,
        "summary": summary,
        "description": description,
        "security": [],
        "parameters": [
            change_id_param(),
            { "name": "token", "in": "query", "required": true, "description": "The signed token from `cancel_url`.", "schema": { "type": "string" } },
        ],
        "responses": {
            "200": html(done),
            "400": html("The token is missing."),
            "404": html("The token is invalid, expired, or names another change: an error page."),
            "503": html("The database is unavailable: an error page."),
        },
    })
}

// ---------------------------------------------------------------------------------------------
// The admin API.

fn admin_operations() -> Vec<Operation> {
    let user = || path_param("user", "The exchange's user id, as the identity names it.");
    let responses = |own: Value| {
        let mut responses = own;
        responses["401"] = error(&["unauthenticated"]);
        responses["500"] = error(&["internal_error"]);
        responses["503"] = error(&["database_unavailable"]);
        responses
    };
    let admin = |operation_id: &str, summary: &str, description: &str| {
        json!({
            "tags": ["admin"],
            "operationId": operation_id,
            "summary": summary,
            "description": description,
            "security": [{ "adminToken": [] }],
        })
    };
    let with = |mut base: Value, parameters: Value, responses: Value| {
        if parameters.as_array().is_some_and(|p| !p.is_empty()) {
            base["parameters"] = parameters;
        }
        base["responses"] = responses;
        base
    };
    vec![
        op("GET", "/admin/users/{user}/changes", with(
            admin("adminUserChanges", "A user's changes", "Every change of the user, in any state."),
            json!([user()]),
            responses(json!({ "200": ok("The changes.", "ChangeList"), "404": error(&["not_found"]) })),
        )),
        op("GET", "/admin/users/{user}/passkeys", with(
            admin("adminUserPasskeys", "A user's passkeys", "Active, pending and disabled passkeys of the user."),
            json!([user()]),
            responses(json!({ "200": ok("The passkeys.", "PasskeyList"), "404": error(&["not_found"]) })),
        )),
        op("POST", "/admin/users/{user}/freeze", with(
            admin("adminFreeze", "Freeze a user's account", "As the user's own emergency freeze: cancels every held or cooling-off change at once."),
            json!([user()]),
            responses(json!({ "200": ok("Frozen; the ids of the changes it cancelled.", "Frozen"), "404": error(&["not_found"]) })),
        )),
        op("POST", "/admin/users/{user}/unfreeze", with(
            admin("adminUnfreeze", "Start a user's unfreeze", "Creates the user's `account-unfreeze` change; only the user can confirm it, with a passkey, and it then cools off."),
            json!([user()]),
            responses(json!({
                "202": ok("The change the user must confirm.", "StartedChange"),
                "400": error(&["bad_request"]),
                "404": error(&["not_found"]),
                "429": error(&["too_many_pending_changes"]),
            })),
        )),
        op("GET", "/admin/audit", with(
            admin("adminAudit", "The audit log", "Every audit row, oldest first, and the chain's head. `stepgate audit verify` checks the chain."),
            json!([]),
            responses(json!({ "200": ok("The log.", "AuditLog") })),
        )),
        op("GET", "/admin/webhooks/dead", with(
            admin("adminDeadLetters", "Dead-lettered webhook deliveries", "Deliveries that failed `notifications.max_attempts` times."),
            json!([]),
            responses(json!({ "200": ok("The deliveries.", "DeadLetters") })),
        )),
        op("GET", "/healthz", json!({
            "tags": ["admin"],
            "operationId": "healthz",
            "summary": "Liveness",
            "description": "200 while the process serves. Does not look at the database, so a database outage does not get the gate restarted. No token.",
            "security": [],
            "responses": { "200": { "description": "Alive.", "content": { "application/json": { "schema": {
                "type": "object", "required": ["status"], "properties": { "status": { "const": "ok" } },
            } } } } },
        })),
        op("GET", "/readyz", json!({
            "tags": ["admin"],
            "operationId": "readyz",
            "summary": "Readiness",
            "description": "Whether this instance should get traffic: the database answers, every migration is applied, the upstream accepts a TCP connection, and no shutdown has begun. Each check says what is wrong. No token.",
            "security": [],
            "responses": {
                "200": { "description": "Ready.", "content": { "application/json": { "schema": schema("Readiness") } } },
                "503": { "description": "Not ready; the failed checks have an `error`.", "content": { "application/json": { "schema": schema("Readiness") } } },
            },
        })),
        op("GET", "/metrics", json!({
            "tags": ["admin"],
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "description": "The Prometheus text format (0.0.4): requests by outcome and refusal reason, ceremony outcomes, latency histograms, changes by state, webhook backlog and dead letters, database errors. The README lists every metric. No token.",
            "security": [],
            "responses": { "200": { "description": "The exposition.", "content": { "text/plain": { "schema": { "type": "string" } } } } },
        })),
        op("POST", "/admin/webhooks/{id}/retry", with(
            admin("adminRetryDelivery", "Retry a dead-lettered delivery", "Queues the delivery again."),
            json!([path_param("id", "The delivery's id, from `/admin/webhooks/dead`.")]),
            responses(json!({ "200": ok("Queued again.", "StateOnly"), "404": error(&["not_found"]) })),
        )),
    ]
}

// ---------------------------------------------------------------------------------------------
// Components.

fn timestamp() -> Value {
    json!({ "type": "string", "format": "date-time" })
}

fn nullable_timestamp() -> Value {
    json!({ "type": ["string", "null"], "format": "date-time" })
}

fn uuid() -> Value {
    json!({ "type": "string", "format": "uuid" })
}

/// A closed object: every listed property, these required, nothing else (so a property added
/// to an answer without documenting it fails the walk test).
fn object(required: &[&str], properties: Value) -> Value {
    json!({ "type": "object", "required": required, "properties": properties, "additionalProperties": false })
}

fn passkey_properties() -> Value {
    json!({
        "id": uuid(),
        "name": { "type": "string" },
        "state": { "enum": ["active", "pending", "disabled"] },
        "created_at": timestamp(),
        "last_used_at": nullable_timestamp(),
        "backup_eligible": { "type": "boolean", "description": "A synced (backup-eligible) credential." },
        "aaguid": { "type": ["string", "null"], "format": "uuid", "description": "The authenticator model, when known." },
        "quarantined_until": { "type": "string", "format": "date-time", "description": "Until then a change it confirms waits for this time before release." },
    })
}

const PASSKEY_FIELDS: &[&str] = &[
    "id",
    "name",
    "state",
    "created_at",
    "last_used_at",
    "backup_eligible",
    "aaguid",
    "quarantined_until",
];

fn components() -> Value {
    let mut pending_properties = passkey_properties();
    pending_properties["change_id"] = uuid();
    pending_properties["confirm_url"] = json!({ "type": "string", "format": "uri" });
    pending_properties["summary"] = json!({ "type": "string" });
    let mut pending_required = PASSKEY_FIELDS.to_vec();
    pending_required.extend(["change_id", "confirm_url", "summary"]);

    json!({
        "securitySchemes": {
            "edgeIdentity": {
                "type": "apiKey", "in": "header", "name": "X-User-Id",
                "description": "Header identity mode: the user id set by the exchange's authenticating edge (`identity.header`; `X-User-Id` is an example), optionally HMAC-signed. The edge must remove any client-sent copy.",
            },
            "sessionJwt": {
                "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "JWT identity mode: the exchange's session token, as `Authorization: Bearer` or in the configured cookie.",
            },
            "gateSession": {
                "type": "apiKey", "in": "cookie", "name": "stepgate_session",
                "description": "The gate's own browser session (SameSite=Strict, path /_stepgate). A ceremony can only be finished in the session that started it.",
            },
            "adminToken": {
                "type": "http", "scheme": "bearer",
                "description": "`Authorization: Bearer <admin_token>` on the admin listener.",
            },
        },
        "headers": {
            "WWW-Authenticate": {
                "description": "`StepUp realm=\"stepgate\", error=\"step_up_required\", change_id=\"<id>\"`.",
                "required": true,
                "schema": { "type": "string" },
            },
            "Retry-After": {
                "description": "Whole seconds until `release_at` (rounded up).",
                "schema": { "type": "integer", "minimum": 0 },
            },
        },
        "parameters": {
            "StepgateChange": {
                "name": "Stepgate-Change", "in": "header", "required": false,
                "description": "On a release only: the id of the confirmed change this identical request releases. Never forwarded upstream.",
                "schema": { "type": "string", "format": "uuid" },
            },
        },
        "pathItems": {
            "ProtectedRequest": protected_request(),
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {
                    "error": { "type": "string", "description": "A stable machine-readable code." },
                    "message": { "type": "string", "description": "A sentence a person can read." },
                    "release_at": { "type": "string", "format": "date-time", "description": "`cooling_off`: when the release becomes possible." },
                    "state": { "enum": ["applied", "applying"], "description": "`change_already_applied`: whether it is applied or being applied right now." },
                    "upstream_status": { "type": ["integer", "null"], "description": "`change_already_applied` with `state: applied`: the exchange's status for the release." },
                    "request_id": { "type": "string", "description": "The request's id (also in the `X-Request-Id` answer header), to quote to support and find in the gate's logs." },
                },
                "additionalProperties": false,
            },
            "Readiness": {
                "type": "object",
                "required": ["status", "checks"],
                "properties": {
                    "status": { "enum": ["ready", "unready"] },
                    "checks": {
                        "type": "object",
                        "required": ["database", "migrations", "upstream", "shutdown"],
                        "additionalProperties": {
                            "type": "object",
                            "required": ["ok"],
                            "properties": { "ok": { "type": "boolean" }, "error": { "type": "string" } },
                        },
                    },
                },
            },
            "StepUpRequired": object(
                &["error", "message", "change_id", "confirm_url", "summary", "cooling_off_seconds", "confirm_before"],
                json!({
                    "error": { "const": "step_up_required" },
                    "message": { "type": "string" },
                    "change_id": uuid(),
                    "confirm_url": { "type": "string", "format": "uri", "description": "The gate's page that confirms this change with a passkey." },
                    "summary": { "type": "string", "description": "What the change does, in plain words, rendered from the stored request." },
                    "cooling_off_seconds": { "type": "integer", "minimum": 0, "description": "How long the change waits after confirmation." },
                    "confirm_before": timestamp(),
                }),
            ),
            "Change": object(
                &["id", "state", "summary", "rule", "method", "path", "created_at", "confirm_before", "confirmed_at", "release_at", "release_before", "quarantined_until"],
                json!({
                    "id": uuid(),
                    "state": { "enum": ["held", "cooling_off", "applying", "applied", "cancelled", "expired"] },
                    "summary": { "type": "string" },
                    "rule": { "type": "string", "description": "The rule that held it, or a built-in (`passkey-add`, `passkey-remove`, `account-unfreeze`)." },
                    "method": { "type": "string" },
                    "path": { "type": "string" },
                    "created_at": timestamp(),
                    "confirm_before": timestamp(),
                    "confirmed_at": nullable_timestamp(),
                    "release_at": nullable_timestamp(),
                    "release_before": nullable_timestamp(),
                    "quarantined_until": nullable_timestamp(),
                }),
            ),
            "ChangeList": object(&["changes"], json!({ "changes": { "type": "array", "items": schema("Change") } })),
            "StartedChange": object(
                &["change_id", "confirm_url", "summary", "state"],
                json!({
                    "change_id": uuid(),
                    "confirm_url": { "type": "string", "format": "uri" },
                    "summary": { "type": "string" },
                    "state": { "const": "held" },
                }),
            ),
            "Confirmed": object(
                &["state", "release_at"],
                json!({
                    "state": { "const": "cooling_off" },
                    "release_at": nullable_timestamp(),
                    "quarantined_until": timestamp(),
                    "message": { "type": "string", "description": "Present with `quarantined_until`: why the wait is longer." },
                }),
            ),
            "StateOnly": object(&["state"], json!({ "state": { "type": "string" } })),
            "Passkey": object(PASSKEY_FIELDS, passkey_properties()),
            "PendingPasskey": object(&pending_required, pending_properties),
            "PasskeyList": object(&["passkeys"], json!({ "passkeys": { "type": "array", "items": schema("Passkey") } })),
            "RenamedPasskey": object(&["id", "name"], json!({ "id": uuid(), "name": { "type": "string" } })),
            "Removed": object(&["state"], json!({ "state": { "const": "removed" } })),
            "Account": object(&["frozen", "frozen_at"], json!({ "frozen": { "type": "boolean" }, "frozen_at": nullable_timestamp() })),
            "Frozen": object(&["frozen", "cancelled"], json!({
                "frozen": { "const": true },
                "cancelled": { "type": "array", "items": uuid(), "description": "The changes the freeze cancelled." },
            })),
            "CreationCeremony": {
                "type": "object",
                "required": ["ceremony_id", "publicKey"],
                "properties": {
                    "ceremony_id": uuid(),
                    "publicKey": { "type": "object", "description": "W3C `PublicKeyCredentialCreationOptionsJSON` (for `PublicKeyCredential.parseCreationOptionsFromJSON`)." },
                },
            },
            "RequestCeremony": {
                "type": "object",
                "required": ["ceremony_id", "publicKey"],
                "properties": {
                    "ceremony_id": uuid(),
                    "publicKey": { "type": "object", "description": "W3C `PublicKeyCredentialRequestOptionsJSON` (for `PublicKeyCredential.parseRequestOptionsFromJSON`)." },
                },
            },
            "RegisterFinish": {
                "type": "object",
                "required": ["ceremony_id", "credential", "name"],
                "properties": {
                    "ceremony_id": uuid(),
                    "credential": { "type": "object", "description": "The new credential's W3C `RegistrationResponseJSON` (`credential.toJSON()`)." },
                    "name": { "type": "string", "description": "The user's name for the passkey." },
                },
            },
            "ConfirmFinish": {
                "type": "object",
                "required": ["ceremony_id", "credential"],
                "properties": {
                    "ceremony_id": uuid(),
                    "credential": { "type": "object", "description": "The assertion's W3C `AuthenticationResponseJSON` (`credential.toJSON()`)." },
                },
            },
            "RenamePasskey": {
                "type": "object",
                "required": ["name"],
                "properties": { "name": { "type": "string" } },
            },
            "AuditLog": object(&["rows", "head"], json!({
                "rows": { "type": "array", "items": schema("AuditRow") },
                "head": object(&["seq", "hash"], json!({ "seq": { "type": "integer" }, "hash": { "type": "string" } })),
            })),
            "AuditRow": object(
                &["seq", "occurred_at", "user_id", "kind", "change_id", "detail", "prev_hash", "hash"],
                json!({
                    "seq": { "type": "integer" },
                    "occurred_at": { "type": "integer", "description": "Milliseconds since the Unix epoch." },
                    "user_id": { "type": "string" },
                    "kind": { "type": "string", "description": "The event, for example `change.held`." },
                    "change_id": { "type": ["string", "null"] },
                    "detail": { "type": "string", "description": "JSON text." },
                    "prev_hash": { "type": "string" },
                    "hash": { "type": "string", "description": "SHA-256 over `prev_hash` and every field." },
                }),
            ),
            "DeadLetters": object(&["deliveries"], json!({
                "deliveries": { "type": "array", "items": object(
                    &["id", "event", "webhook_url", "attempts", "last_error"],
                    json!({
                        "id": { "type": "string" },
                        "event": { "type": "string" },
                        "webhook_url": { "type": "string" },
                        "attempts": { "type": "integer" },
                        "last_error": { "type": ["string", "null"] },
                    }),
                ) },
            })),
        },
    })
}

/// Not a route of the gate: the shape every request a rule protects takes, whatever path the
/// rules name (they are configuration). Kept under `components.pathItems` so it documents the
/// hold answer and the release contract without claiming a path.
fn protected_request() -> Value {
    let operation = json!({
        "tags": ["protected"],
        "summary": "A request a rule protects (held, then released once)",
        "description": "Sent to the exchange's own path through the gate. Without `Stepgate-Change` a matching request is held: `403 step_up_required`. After confirmation and the cooling-off, the identical request with `Stepgate-Change: <change_id>` is forwarded once (`Idempotency-Key: <change_id>`) and the exchange's answer is returned as is. A request the rules do not hold is forwarded untouched.",
        "security": identified(),
        "parameters": [{ "$ref": "#/components/parameters/StepgateChange" }],
        "responses": {
            "default": { "description": "The exchange's own answer, passed through (an unprotected request, or a release)." },
            "400": error(&["invalid_path", "invalid_body", "bad_request"]),
            "401": error(&["unauthenticated"]),
            "403": {
                "description": "Held (`step_up_required`, with `WWW-Authenticate`), or a release refused (`cooling_off` with `Retry-After`, …), or the account frozen.",
                "headers": {
                    "WWW-Authenticate": { "$ref": "#/components/headers/WWW-Authenticate" },
                    "Retry-After": { "$ref": "#/components/headers/Retry-After" },
                },
                "content": json_content(json!({ "anyOf": [
                    schema("StepUpRequired"),
                    {
                        "allOf": [schema("Error")],
                        "properties": { "error": { "enum": ["cooling_off", "not_confirmed", "change_cancelled", "change_expired", "change_mismatch", "account_frozen"] } },
                    },
                ] })),
            },
            "404": error(&["not_found"]),
            "408": error(&["body_timeout"]),
            "409": error(&["change_already_applied"]),
            "413": error(&["body_too_large"]),
            "415": error(&["unsupported_media_type"]),
            "429": error(&["too_many_pending_changes"]),
            "500": error(&["internal_error"]),
            "502": error(&["upstream_unreachable", "upstream_failed"]),
            "503": error(&["database_unavailable"]),
            "504": error(&["upstream_timeout"]),
        },
    });
    let mut item = json!({
        "summary": "Any request a rule protects",
        "description": "The rules (`[[rules]]`: methods, path template, body conditions) decide which requests these are; the exchange's other requests stream through untouched.",
    });
    for method in ["post", "put", "patch", "delete"] {
        item[method] = operation.clone();
    }
    item
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::web::routes::{all_registered, Listener};

    const METHODS: &[&str] = &[
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    fn operations(document: &Value) -> BTreeSet<(String, String)> {
        let mut found = BTreeSet::new();
        for (path, item) in document["paths"].as_object().expect("paths is an object") {
            for (key, _) in item.as_object().expect("a path item is an object") {
                if METHODS.contains(&key.as_str()) {
                    found.insert((key.to_ascii_uppercase(), path.clone()));
                }
            }
        }
        found
    }

    /// Every registered route is documented with words, and the document names no route that
    /// is not registered: the two lists are equal.
    #[test]
    fn the_document_describes_exactly_the_registered_routes() {
        let document = document();
        let registered: BTreeSet<(String, String)> = all_registered()
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        let documented = operations(&document);
        let undocumented: Vec<_> = registered.difference(&documented).collect();
        let unregistered: Vec<_> = documented.difference(&registered).collect();
        assert!(
            undocumented.is_empty(),
            "routes without an operation in web::openapi: {undocumented:?}"
        );
        assert!(
            unregistered.is_empty(),
            "operations in the OpenAPI document that no router registers: {unregistered:?}"
        );
        for route in all_registered() {
            let operation = &document["paths"][route.path][route.method.to_ascii_lowercase()];
            for field in ["summary", "description"] {
                assert!(
                    operation[field]
                        .as_str()
                        .is_some_and(|s| !s.trim().is_empty()),
                    "{} {} has no {field}",
                    route.method,
                    route.path
                );
            }
            assert!(
                operation["responses"]
                    .as_object()
                    .is_some_and(|r| !r.is_empty()),
                "{} {} documents no response",
                route.method,
                route.path
            );
            let is_admin = operation["tags"]
                .as_array()
                .is_some_and(|tags| tags.iter().any(|t| t == "admin"));
            let on_admin_server = document["paths"][route.path]["servers"] == admin_server();
            assert_eq!(
                (is_admin, on_admin_server),
                (
                    route.listener == Listener::Admin,
                    route.listener == Listener::Admin
                ),
                "{} {} is on the {:?} listener; the document must say so (admin tag and server)",
                route.method,
                route.path,
                route.listener
            );
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_json() {
        let text = document().to_string();
        let parsed: Value = serde_json::from_str(&text).expect("the document is JSON");
        assert!(
            parsed["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1.")),
            "openapi version: {}",
            parsed["openapi"]
        );
        assert!(parsed["info"]["title"].is_string() && parsed["info"]["version"].is_string());
        // The hold answer and the release contract are described even though their paths are
        // configuration.
        let protected = &parsed["components"]["pathItems"]["ProtectedRequest"]["put"];
        assert!(protected["responses"]["403"].is_object());
        assert_eq!(
            parsed["components"]["parameters"]["StepgateChange"]["name"],
            "Stepgate-Change"
        );
    }

    /// Each `{name}` in a path template is a declared, required path parameter, and each
    /// declared path parameter appears in the template.
    #[test]
    fn path_parameters_match_the_templates() {
        let document = document();
        for (path, item) in document["paths"].as_object().expect("paths") {
            let in_template: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            for (method, operation) in item.as_object().expect("path item") {
                if !METHODS.contains(&method.as_str()) {
                    continue;
                }
                let declared: BTreeSet<&str> = operation["parameters"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .filter(|p| p["in"] == "path")
                            .inspect(|p| assert_eq!(p["required"], true, "{method} {path}"))
                            .filter_map(|p| p["name"].as_str())
                            .collect()
                    })
                    .unwrap_or_default();
                assert_eq!(declared, in_template, "{method} {path}: path parameters");
            }
        }
    }

    /// Every `$ref` points at something the document has.
    #[test]
    fn every_reference_resolves() {
        fn walk(document: &Value, value: &Value, broken: &mut Vec<String>) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(reference)) = map.get("$ref") {
                        let pointer = reference.trim_start_matches('#');
                        if document.pointer(pointer).is_none() {
                            broken.push(reference.clone());
                        }
                    }
                    map.values().for_each(|v| walk(document, v, broken));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(document, v, broken)),
                _ => {}
            }
        }
        let document = document();
        let mut broken = Vec::new();
        walk(&document, &document, &mut broken);
        assert!(broken.is_empty(), "unresolved $refs: {broken:?}");
    }
}
