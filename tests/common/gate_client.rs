//! A user of a running gate, driven over HTTP the way a browser page and an API client would:
//! an identity header set by the (imaginary) edge, one cookie jar (one gate session), and a
//! software passkey that claims user verification.
//!
//! Every call names the gate it goes to (`gate` is a base URL such as `http://127.0.0.1:PORT`),
//! so one user can start a ceremony on one instance and finish it on another. Cookies are
//! scoped to the host, not the port, so the session follows the user across instances on the
//! same host, exactly as it would behind one load balancer.

#![allow(dead_code)]

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_authenticator_rs::WebauthnAuthenticator;
use webauthn_rs::prelude::{CreationChallengeResponse, RequestChallengeResponse, Url};

/// The header the gate's `header` identity mode reads in these tests.
pub const IDENTITY_HEADER: &str = "x-user-id";

/// One request to the exchange's API, kept so it can be sent again byte for byte.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: Method,
    pub path_and_query: String,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// `PUT /api/v1/api-keys/{key_id}` that adds `withdraw`: what the rule in the tests holds.
/// Odd spacing on purpose: a release must carry these exact bytes.
pub fn enable_withdrawals(key_id: &str) -> ApiRequest {
    ApiRequest {
        method: Method::PUT,
        path_and_query: format!("/api/v1/api-keys/{key_id}"),
        content_type: "application/json".into(),
        body: format!(
            "{{\"permissions\": [\"read\", \"trade\", \"withdraw\"],  \"label\": \"bot {key_id}\", \
             \"ip_whitelist\": [\"203.0.113.7\"]}}"
        )
        .into_bytes(),
    }
}

/// `PUT /api/v1/api-keys/{key_id}` that only tightens permissions: no rule matches it.
pub fn restrict_to_reading(key_id: &str) -> ApiRequest {
    ApiRequest {
        method: Method::PUT,
        path_and_query: format!("/api/v1/api-keys/{key_id}"),
        content_type: "application/json".into(),
        body: b"{\"permissions\": [\"read\"]}".to_vec(),
    }
}

/// One user. Clones share the identity, the cookie jar and the passkey.
#[derive(Clone)]
pub struct GateUser {
    pub name: String,
    origin: Url,
    client: reqwest::Client,
    passkey: Arc<Mutex<SoftPasskey>>,
}

impl GateUser {
    /// A user whose passkey signs for `origin`, the gate's `public_url` (the WebAuthn origin).
    pub fn new(name: &str, origin: &str) -> Self {
        Self {
            name: name.to_string(),
            origin: Url::parse(origin).expect("the public origin is a URL"),
            client: cookie_client(),
            passkey: Arc::new(Mutex::new(SoftPasskey::new(true))),
        }
    }

    /// A request to `gate` carrying this user's identity and session.
    pub fn request(&self, gate: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{gate}{path}"))
            .header(IDENTITY_HEADER, &self.name)
    }

    pub async fn send(&self, gate: &str, api: &ApiRequest) -> reqwest::Response {
        self.request(gate, api.method.clone(), &api.path_and_query)
            .header("content-type", &api.content_type)
            .body(api.body.clone())
            .send()
            .await
            .expect("send the API request through the gate")
    }

    /// `api` again with `Stepgate-Change: {change_id}`, not yet sent (for callers that expect
    /// the connection to break).
    pub fn release_request(
        &self,
        gate: &str,
        api: &ApiRequest,
        change_id: &str,
    ) -> reqwest::RequestBuilder {
        self.request(gate, api.method.clone(), &api.path_and_query)
            .header("content-type", &api.content_type)
            .header("stepgate-change", change_id)
            .body(api.body.clone())
    }

    pub async fn release(
        &self,
        gate: &str,
        api: &ApiRequest,
        change_id: &str,
    ) -> reqwest::Response {
        self.release_request(gate, api, change_id)
            .send()
            .await
            .expect("send the release through the gate")
    }

    /// Sends `api`, which must be held (403 `step_up_required`); returns the change id.
    pub async fn hold(&self, gate: &str, api: &ApiRequest) -> String {
        let body = expect_error(
            self.send(gate, api).await,
            StatusCode::FORBIDDEN,
            "step_up_required",
        )
        .await;
        body["change_id"]
            .as_str()
            .unwrap_or_else(|| panic!("step_up_required without a change_id: {body}"))
            .to_string()
    }

    /// Registers this user's passkey through `gate`.
    pub async fn register_passkey(&self, gate: &str) {
        let response = self
            .request(gate, Method::POST, "/_stepgate/api/passkeys/register/start")
            .json(&json!({}))
            .send()
            .await
            .expect("send register/start");
        let options = expect_json(response, StatusCode::OK).await;
        let challenge: CreationChallengeResponse = serde_json::from_value(options.clone())
            .unwrap_or_else(|e| panic!("register/start is not creation options ({e}): {options}"));
        let credential = self
            .passkey
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .do_registration(self.origin.clone(), challenge)
            .unwrap_or_else(|e| panic!("the soft passkey refused to register: {e:?}"));
        let response = self
            .request(
                gate,
                Method::POST,
                "/_stepgate/api/passkeys/register/finish",
            )
            .json(&json!({
                "ceremony_id": ceremony_id_of(&options),
                "credential": credential,
                "name": "My key",
            }))
            .send()
            .await
            .expect("send register/finish");
        expect_json(response, StatusCode::OK).await;
    }

    /// Starts a confirmation on `gate`; returns the whole `{"ceremony_id","publicKey"}` answer.
    pub async fn start_confirmation(&self, gate: &str, change_id: &str) -> Value {
        let response = self
            .request(
                gate,
                Method::POST,
                &format!("/_stepgate/api/changes/{change_id}/confirm/start"),
            )
            .json(&json!({}))
            .send()
            .await
            .expect("send confirm/start");
        expect_json(response, StatusCode::OK).await
    }

    /// What this user's authenticator answers to a confirmation's request options.
    pub fn sign(&self, options: &Value) -> Value {
        let challenge: RequestChallengeResponse = serde_json::from_value(options.clone())
            .unwrap_or_else(|e| panic!("confirm/start is not request options ({e}): {options}"));
        let credential = self
            .passkey
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .do_authentication(self.origin.clone(), challenge)
            .unwrap_or_else(|e| panic!("the soft passkey refused to sign: {e:?}"));
        serde_json::to_value(credential).expect("serialise the assertion")
    }

    /// Finishes a confirmation started with `options` on `gate` (not necessarily the gate that
    /// started it).
    pub async fn finish_confirmation(
        &self,
        gate: &str,
        change_id: &str,
        options: &Value,
        credential: &Value,
    ) -> reqwest::Response {
        self.request(
            gate,
            Method::POST,
            &format!("/_stepgate/api/changes/{change_id}/confirm/finish"),
        )
        .json(&json!({"ceremony_id": ceremony_id_of(options), "credential": credential}))
        .send()
        .await
        .expect("send confirm/finish")
    }

    /// Confirms a held change through `gate`; returns `{"state":"cooling_off","release_at"}`.
    pub async fn confirm(&self, gate: &str, change_id: &str) -> Value {
        let options = self.start_confirmation(gate, change_id).await;
        let credential = self.sign(&options);
        let response = self
            .finish_confirmation(gate, change_id, &options, &credential)
            .await;
        let body = expect_json(response, StatusCode::OK).await;
        assert_eq!(
            body["state"], "cooling_off",
            "confirm/finish answer: {body}"
        );
        body
    }

    pub async fn cancel(&self, gate: &str, change_id: &str) -> reqwest::Response {
        self.request(
            gate,
            Method::POST,
            &format!("/_stepgate/api/changes/{change_id}/cancel"),
        )
        .send()
        .await
        .expect("send cancel")
    }

    pub async fn get_change(&self, gate: &str, change_id: &str) -> reqwest::Response {
        self.request(
            gate,
            Method::GET,
            &format!("/_stepgate/api/changes/{change_id}"),
        )
        .send()
        .await
        .expect("send GET change")
    }

    /// The change as `gate` reports it (must be 200).
    pub async fn change(&self, gate: &str, change_id: &str) -> Value {
        let body = expect_json(self.get_change(gate, change_id).await, StatusCode::OK).await;
        assert_eq!(body["id"], change_id, "GET change answer: {body}");
        body
    }

    /// The change's `state` as `gate` reports it.
    pub async fn change_state(&self, gate: &str, change_id: &str) -> String {
        let body = self.change(gate, change_id).await;
        body["state"]
            .as_str()
            .unwrap_or_else(|| panic!("GET change without a state: {body}"))
            .to_string()
    }
}

fn cookie_client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        // Generous: the gates may run on a loaded machine.
        .timeout(Duration::from_secs(60))
        .build()
        .expect("build a reqwest client")
}

fn ceremony_id_of(options: &Value) -> String {
    options["ceremony_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a ceremony answer without ceremony_id: {options}"))
        .to_string()
}

/// Reads a JSON answer that must have `status`.
pub async fn expect_json(response: reqwest::Response, status: StatusCode) -> Value {
    let (actual, url, text) = read(response).await;
    assert_eq!(
        actual, status,
        "{url}: expected {status}, got {actual} with body {text}"
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}"))
}

/// Reads a gate error that must be `status` with `{"error": code, "message": ...}`.
pub async fn expect_error(response: reqwest::Response, status: StatusCode, code: &str) -> Value {
    let (actual, url, text) = read(response).await;
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("{url}: expected {status} `{code}`, got {actual} with a non-JSON body ({e}): {text}")
    });
    assert!(
        actual == status && body["error"] == code,
        "{url}: expected {status} `{code}`, got {actual} with body {text}"
    );
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{url}: the `{code}` error has no human message: {text}"
    );
    body
}

async fn read(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let url = response.url().path().to_string();
    let text = response.text().await.expect("read the answer's body");
    (status, url, text)
}
