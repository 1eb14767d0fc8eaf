//! Signed approvals for the upstream (defence in depth): every request the gate forwards as a
//! release carries `Stepgate-Approval`, a compact JWS (ES256 or EdDSA) that binds the change,
//! its user and rule, the request digest and the confirmation times. The public key is
//! published as a JWKS at `/_stepgate/jwks.json`; [`verify`] is what an exchange runs on the
//! request it received, so it can refuse a protected change that did not come through the gate.
//!
//! The exchange recomputes the digest with the gate's own function
//! ([`crate::stepup::digest::request_digest`]), so the two can never disagree on its form.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use http::HeaderMap;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::clock::Clock;
use crate::config::ApprovalSettings;
use crate::error::GateError;
use crate::stepup::digest::{reading_headers, request_digest, CanonicalRequest};
use crate::stepup::Change;
use crate::store::Store;

/// The header that carries the approval on a release, and on nothing else.
pub const APPROVAL_HEADER: &str = "stepgate-approval";

/// The JWS `typ`, so an approval cannot be mistaken for (or replayed as) another kind of JWT.
pub const APPROVAL_TYPE: &str = "stepgate-approval+jwt";

/// What an approval asserts. Times are Unix seconds (JWT NumericDate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalClaims {
    /// The gate's public origin (`public_url`).
    pub iss: String,
    /// The user who confirmed the change.
    pub sub: String,
    /// The change id; also the request's `Idempotency-Key`.
    pub jti: String,
    /// The rule that held the request.
    pub rule: String,
    /// The request digest (hex SHA-256, see `stepup::digest`) the passkey confirmed.
    pub digest: String,
    pub confirmed_at: i64,
    pub release_at: i64,
    pub iat: i64,
    pub exp: i64,
}

/// Why an approval was refused. Every variant is the token's or the request's fault, except
/// `Jwks`, which means the published key set could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    #[error("the approval is not a compact JWS: {0}")]
    Malformed(String),
    #[error("the approval's algorithm `{0}` is not accepted (only ES256 and EdDSA)")]
    WrongAlgorithm(String),
    #[error("the approval names a key the JWKS does not have: {0:?}")]
    UnknownKey(Option<String>),
    #[error("the JWKS could not be read: {0}")]
    Jwks(String),
    #[error("the approval's signature does not verify")]
    BadSignature,
    #[error("the approval expired at {exp} (now {now})")]
    Expired { exp: i64, now: i64 },
    #[error("the approval was issued in the future ({iat}, now {now})")]
    IssuedInFuture { iat: i64, now: i64 },
    #[error("the approval was issued by {0:?}, not the expected gate")]
    WrongIssuer(String),
    #[error("the request is not the one the approval was given for (digest mismatch)")]
    DigestMismatch,
    #[error("the request's Idempotency-Key is not the approved change id")]
    IdempotencyKeyMismatch,
}

// ---------------------------------------------------------------------------------------------
// Signing (the gate's side).

/// A parsed signing key: which algorithm it signs with and its public half as a JWK.
#[derive(Clone)]
pub struct SigningKey {
    algorithm: Algorithm,
    encoding: EncodingKey,
    /// The public JWK members (`kty`, `crv`, `x`, `y`), without `kid`/`alg`/`use`.
    public: Value,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A PKCS#8 PEM private key: P-256 signs ES256, Ed25519 signs EdDSA. Anything else
    /// (P-384, RSA, a public key) is refused.
    pub fn from_pem(pem: &[u8]) -> Result<SigningKey, String> {
        if let Ok(encoding) = EncodingKey::from_ec_pem(pem) {
            // Reading the public point also proves the key is on P-256 (P-384 fails here).
            let jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256)
                .map_err(|_| "an EC key must be on P-256 (ES256)".to_string())?;
            let AlgorithmParameters::EllipticCurve(ec) = jwk.algorithm else {
                return Err("an EC key must be on P-256 (ES256)".into());
            };
            return Ok(SigningKey {
                algorithm: Algorithm::ES256,
                encoding,
                public: json!({ "kty": "EC", "crv": "P-256", "x": ec.x, "y": ec.y }),
            });
        }
        if let Ok(encoding) = EncodingKey::from_ed_pem(pem) {
            let key = ed25519_dalek::SigningKey::from_pkcs8_der(encoding.inner())
                .map_err(|e| format!("not a usable Ed25519 key: {e}"))?;
            let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
            return Ok(SigningKey {
                algorithm: Algorithm::EdDSA,
                encoding,
                public: json!({ "kty": "OKP", "crv": "Ed25519", "x": x }),
            });
        }
        Err("not a PKCS#8 PEM private key on P-256 or Ed25519 \
             (openssl genpkey -algorithm ed25519 -out approval.pem)"
            .into())
    }

    /// A fresh Ed25519 key as PKCS#8 PEM, from the operating system's random source.
    pub fn generate_ed25519_pem() -> String {
        use rand::RngCore;
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        // PKCS#8 v1 for Ed25519 (RFC 8410): a fixed prefix, then the 32-byte seed.
        const PREFIX: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let mut der = PREFIX.to_vec();
        der.extend_from_slice(&seed);
        let body = STANDARD.encode(der);
        format!("-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n")
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The RFC 7638 thumbprint of the public key: the default `kid`.
    pub fn thumbprint(&self) -> String {
        // The required members in lexicographic order, no whitespace (RFC 7638 §3).
        let canonical = match self.public["kty"].as_str() {
            Some("EC") => format!(
                r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                self.public["x"].as_str().unwrap_or_default(),
                self.public["y"].as_str().unwrap_or_default()
            ),
            _ => format!(
                r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
                self.public["x"].as_str().unwrap_or_default()
            ),
        };
        URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
    }
}

/// Signs approvals for released changes and publishes the matching JWKS.
#[derive(Clone, Debug)]
pub struct ApprovalSigner {
    key: SigningKey,
    key_id: String,
    issuer: String,
    lifetime: Duration,
    jwks: String,
}

impl ApprovalSigner {
    pub fn new(
        key: SigningKey,
        key_id: Option<String>,
        issuer: String,
        lifetime: Duration,
    ) -> ApprovalSigner {
        let key_id = key_id.unwrap_or_else(|| key.thumbprint());
        let alg = match key.algorithm {
            Algorithm::ES256 => "ES256",
            _ => "EdDSA",
        };
        let mut jwk = key.public.clone();
        jwk["kid"] = Value::String(key_id.clone());
        jwk["alg"] = Value::String(alg.into());
        jwk["use"] = Value::String("sig".into());
        let jwks = json!({ "keys": [jwk] }).to_string();
        ApprovalSigner {
            key,
            key_id,
            issuer,
            lifetime,
            jwks,
        }
    }

    /// The JWKS document served at `/_stepgate/jwks.json`.
    pub fn jwks_json(&self) -> &str {
        &self.jwks
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The approval for forwarding `change` now. Fails only if the change was never
    /// confirmed (no release without a confirmation) or the signing library fails.
    pub fn sign(&self, change: &Change, now: OffsetDateTime) -> Result<String, String> {
        let (Some(confirmed_at), Some(release_at)) = (change.confirmed_at, change.release_at)
        else {
            return Err(format!("change {} was never confirmed", change.id));
        };
        let iat = now.unix_timestamp();
        let claims = ApprovalClaims {
            iss: self.issuer.clone(),
            sub: change.user_id.clone(),
            jti: change.id.to_string(),
            rule: change.rule.clone(),
            digest: change.digest.clone(),
            confirmed_at: confirmed_at.unix_timestamp(),
            release_at: release_at.unix_timestamp(),
            iat,
            exp: iat.saturating_add(i64::try_from(self.lifetime.as_secs()).unwrap_or(3600)),
        };
        let mut header = Header::new(self.key.algorithm);
        header.kid = Some(self.key_id.clone());
        header.typ = Some(APPROVAL_TYPE.into());
        jsonwebtoken::encode(&header, &claims, &self.key.encoding).map_err(|e| e.to_string())
    }
}

/// The gate's signer, loaded once: from `[approval] signing_key_file`, or else the key kept in
/// the database (generated by the first instance that needs one), so every instance signs with
/// and publishes the same key. Loaded lazily because a gate starts, and passes traffic
/// through, while its database is down; a release needs the database anyway.
pub struct Approvals {
    settings: ApprovalSettings,
    issuer: String,
    store: Store,
    clock: Arc<dyn Clock>,
    signer: tokio::sync::OnceCell<ApprovalSigner>,
}

impl Approvals {
    pub fn new(
        settings: ApprovalSettings,
        issuer: String,
        store: Store,
        clock: Arc<dyn Clock>,
    ) -> Approvals {
        Approvals {
            settings,
            issuer,
            store,
            clock,
            signer: tokio::sync::OnceCell::new(),
        }
    }

    pub async fn signer(&self) -> Result<&ApprovalSigner, GateError> {
        self.signer
            .get_or_try_init(|| async {
                let pem = match &self.settings.signing_key_pem {
                    Some(pem) => pem.clone(),
                    None => {
                        let generated = SigningKey::generate_ed25519_pem();
                        self.store
                            .approval_key_or_insert(&generated, self.clock.now())
                            .await?
                            .into_bytes()
                    }
                };
                let key = SigningKey::from_pem(&pem).map_err(|why| {
                    GateError::Internal(format!("the approval signing key is unusable: {why}"))
                })?;
                Ok(ApprovalSigner::new(
                    key,
                    self.settings.key_id.clone(),
                    self.issuer.clone(),
                    self.settings.token_lifetime,
                ))
            })
            .await
    }

    /// Signs the approval for forwarding `change` now.
    pub async fn sign(&self, change: &Change) -> Result<String, GateError> {
        let now = self.clock.now();
        self.signer()
            .await?
            .sign(change, now)
            .map_err(|why| GateError::Internal(format!("could not sign the approval: {why}")))
    }
}

// ---------------------------------------------------------------------------------------------
// Verifying (the exchange's side).

/// The request as the exchange received it from the gate.
pub struct ReceivedRequest<'a> {
    pub method: &'a str,
    /// The path and raw query as received (`/api/v1/api-keys/k1?x=1`). If the gate's
    /// `upstream` URL has a path prefix, strip it first: the digest covers the path the gate
    /// matched.
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

impl ReceivedRequest<'_> {
    /// The request digest, computed by the same function the gate uses when it holds.
    pub fn digest(&self) -> String {
        let (path, query) = match self.path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (self.path_and_query, None),
        };
        let content_type = self
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes());
        let reading = reading_headers(self.headers);
        request_digest(&CanonicalRequest {
            method: self.method,
            path,
            query,
            content_type,
            reading_headers: &reading,
            body: self.body,
        })
    }
}

/// What else [`verify_with`] checks.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The gate's public origin; `None` skips the `iss` check.
    pub issuer: Option<String>,
    /// Clock difference tolerated between the gate and the exchange.
    pub leeway: Duration,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            issuer: None,
            leeway: Duration::from_secs(60),
        }
    }
}

/// Verifies `token` (the `Stepgate-Approval` header) against `jwks` (the text of
/// `/_stepgate/jwks.json`) and the request it arrived with, at `now`, with default options.
pub fn verify(
    token: &str,
    jwks: &str,
    request: &ReceivedRequest<'_>,
    now: OffsetDateTime,
) -> Result<ApprovalClaims, ApprovalError> {
    verify_with(token, jwks, request, now, &VerifyOptions::default())
}

/// [`verify`] with an expected issuer and leeway. Checks, in order: the algorithm (ES256 or
/// EdDSA only, never `none` or HMAC), the key (by `kid`, of the algorithm's type), the
/// signature, the times, the issuer, the digest of the received request, and that its
/// `Idempotency-Key` (when present) is the approved change.
pub fn verify_with(
    token: &str,
    jwks: &str,
    request: &ReceivedRequest<'_>,
    now: OffsetDateTime,
    options: &VerifyOptions,
) -> Result<ApprovalClaims, ApprovalError> {
    let header = read_header(token)?;
    let alg = header["alg"].as_str().unwrap_or("(missing)").to_string();
    let algorithm = match alg.as_str() {
        "ES256" => Algorithm::ES256,
        "EdDSA" => Algorithm::EdDSA,
        _ => return Err(ApprovalError::WrongAlgorithm(alg)),
    };
    let kid = header["kid"].as_str().map(str::to_string);
    let key = find_key(jwks, kid.as_deref(), &alg)?;

    let mut validation = Validation::new(algorithm);
    // Times are checked below against the caller's `now`, not the library's system clock.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<ApprovalClaims>(token, &key, &validation)
        .map_err(|error| match error.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => ApprovalError::BadSignature,
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
                ApprovalError::WrongAlgorithm(alg.clone())
            }
            _ => ApprovalError::Malformed(error.to_string()),
        })?
        .claims;

    let now = now.unix_timestamp();
    let leeway = i64::try_from(options.leeway.as_secs()).unwrap_or(0);
    if now > claims.exp.saturating_add(leeway) {
        return Err(ApprovalError::Expired {
            exp: claims.exp,
            now,
        });
    }
    if claims.iat > now.saturating_add(leeway) {
        return Err(ApprovalError::IssuedInFuture {
            iat: claims.iat,
            now,
        });
    }
    if let Some(issuer) = &options.issuer {
        if &claims.iss != issuer {
            return Err(ApprovalError::WrongIssuer(claims.iss));
        }
    }
    if request.digest() != claims.digest {
        return Err(ApprovalError::DigestMismatch);
    }
    if let Some(key) = request.headers.get("idempotency-key") {
        if key.as_bytes() != claims.jti.as_bytes() {
            return Err(ApprovalError::IdempotencyKeyMismatch);
        }
    }
    Ok(claims)
}

fn read_header(token: &str) -> Result<Value, ApprovalError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ApprovalError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|e| ApprovalError::Malformed(format!("header: {e}")))?;
    let header: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApprovalError::Malformed(format!("header: {e}")))?;
    if header["typ"].as_str() != Some(APPROVAL_TYPE) {
        return Err(ApprovalError::Malformed(format!(
            "typ must be {APPROVAL_TYPE}"
        )));
    }
    Ok(header)
}

/// The JWKS key named `kid`, usable only for `alg`: an EC P-256 key for ES256, an OKP Ed25519
/// key for EdDSA. A symmetric key in the set is never used, whatever the token says.
fn find_key(jwks: &str, kid: Option<&str>, alg: &str) -> Result<DecodingKey, ApprovalError> {
    let set: Value = serde_json::from_str(jwks).map_err(|e| ApprovalError::Jwks(e.to_string()))?;
    let keys = set["keys"]
        .as_array()
        .ok_or_else(|| ApprovalError::Jwks("no \"keys\" array".into()))?;
    let unknown = || ApprovalError::UnknownKey(kid.map(str::to_string));
    let kid = kid.ok_or_else(unknown)?;
    let jwk = keys
        .iter()
        .find(|k| k["kid"].as_str() == Some(kid))
        .ok_or_else(unknown)?;
    if let Some(key_alg) = jwk["alg"].as_str() {
        if key_alg != alg {
            return Err(ApprovalError::WrongAlgorithm(alg.to_string()));
        }
    }
    let text = |name: &str| {
        jwk[name]
            .as_str()
            .ok_or_else(|| ApprovalError::Jwks(format!("key {kid} has no {name}")))
    };
    match (alg, jwk["kty"].as_str(), jwk["crv"].as_str()) {
        ("ES256", Some("EC"), Some("P-256")) => {
            DecodingKey::from_ec_components(text("x")?, text("y")?)
                .map_err(|e| ApprovalError::Jwks(e.to_string()))
        }
        ("EdDSA", Some("OKP"), Some("Ed25519")) => DecodingKey::from_ed_components(text("x")?)
            .map_err(|e| ApprovalError::Jwks(e.to_string())),
        _ => Err(ApprovalError::WrongAlgorithm(alg.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stepup::State;
    use http::HeaderValue;
    use uuid::Uuid;

    /// A P-256 key made with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`.
    const P256_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgUk7bctfQRu1/hnNU
A0wc8WoX10m8kCg0SlciJ+JjTamhRANCAAQ8Q2XuULs0JiMpurONJZ5CFUUm2huP
XBLL0MakQXKRQWTCpsmG1h7egCSHhYR3HcELprrl4nvh5GeFkY/QUCu3
-----END PRIVATE KEY-----
";

    const BODY: &[u8] = br#"{"permissions":["read","withdraw"]}"#;

    fn headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers
    }

    fn request<'a>(headers: &'a HeaderMap, body: &'a [u8]) -> ReceivedRequest<'a> {
        ReceivedRequest {
            method: "PUT",
            path_and_query: "/api/v1/api-keys/k1",
            headers,
            body,
        }
    }

    fn change(now: OffsetDateTime) -> Change {
        let headers = headers();
        Change {
            id: Uuid::new_v4(),
            user_id: "alice".into(),
            rule: "enable-withdrawals".into(),
            method: "PUT".into(),
            path: "/api/v1/api-keys/k1".into(),
            query: None,
            headers: vec![],
            body: BODY.to_vec(),
            digest: request(&headers, BODY).digest(),
            summary: "s".into(),
            state: State::Applying,
            cooling_off: Duration::from_secs(60),
            release_within: Duration::from_secs(60),
            created_at: now,
            confirm_before: now,
            confirmed_at: Some(now - Duration::from_secs(3600)),
            release_at: Some(now),
            release_before: None,
            finished_at: None,
            lease_until: None,
            release_attempts: 1,
            outcome_status: None,
            quarantined_until: None,
        }
    }

    fn signer_for(pem: &str) -> ApprovalSigner {
        let key = SigningKey::from_pem(pem.as_bytes()).expect("a test key");
        ApprovalSigner::new(
            key,
            None,
            "https://gate.example".into(),
            Duration::from_secs(300),
        )
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("a time")
    }

    #[test]
    fn both_key_types_sign_approvals_that_verify_and_bind_the_change() {
        let ed = SigningKey::generate_ed25519_pem();
        for pem in [P256_PEM, ed.as_str()] {
            let signer = signer_for(pem);
            let change = change(now());
            let token = signer.sign(&change, now()).expect("sign");
            let headers = headers();
            let options = VerifyOptions {
                issuer: Some("https://gate.example".into()),
                ..VerifyOptions::default()
            };
            let claims = verify_with(
                &token,
                signer.jwks_json(),
                &request(&headers, BODY),
                now(),
                &options,
            )
            .expect("a fresh approval verifies");
            assert_eq!(claims.jti, change.id.to_string());
            assert_eq!(claims.sub, "alice");
            assert_eq!(claims.rule, "enable-withdrawals");
            assert_eq!(claims.digest, change.digest);
            assert_eq!(claims.exp - claims.iat, 300);
        }
    }

    #[test]
    fn refusals_say_why() {
        let signer = signer_for(P256_PEM);
        let change = change(now());
        let token = signer.sign(&change, now()).expect("sign");
        let jwks = signer.jwks_json();
        let headers = headers();
        let ok = request(&headers, BODY);

        // Another body: the digest no longer matches.
        assert_eq!(
            verify(&token, jwks, &request(&headers, b"{}"), now()),
            Err(ApprovalError::DigestMismatch)
        );
        // Late beyond the leeway.
        assert!(matches!(
            verify(&token, jwks, &ok, now() + Duration::from_secs(300 + 61)),
            Err(ApprovalError::Expired { .. })
        ));
        // A claim altered after signing.
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        let mut claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
        claims["sub"] = json!("mallory");
        parts[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
        assert_eq!(
            verify(&parts.join("."), jwks, &ok, now()),
            Err(ApprovalError::BadSignature)
        );
        // Signed by another key under the same kid.
        let other = ApprovalSigner::new(
            SigningKey::from_pem(P256_PEM.as_bytes()).unwrap(),
            None,
            "https://gate.example".into(),
            Duration::from_secs(300),
        );
        let impostor = ApprovalSigner::new(
            SigningKey::from_pem(SigningKey::generate_ed25519_pem().as_bytes()).unwrap(),
            Some(other.key_id().to_string()),
            "https://gate.example".into(),
            Duration::from_secs(300),
        );
        let forged = impostor.sign(&change, now()).unwrap();
        assert_eq!(
            verify(&forged, jwks, &ok, now()),
            Err(ApprovalError::WrongAlgorithm("EdDSA".into())),
            "an EdDSA token cannot use an ES256 key"
        );
        // Another key of the same type under the published kid: the signature fails.
        let ed_a = signer_for(&SigningKey::generate_ed25519_pem());
        let ed_b = ApprovalSigner::new(
            SigningKey::from_pem(SigningKey::generate_ed25519_pem().as_bytes()).unwrap(),
            Some(ed_a.key_id().to_string()),
            "https://gate.example".into(),
            Duration::from_secs(300),
        );
        assert_eq!(
            verify(
                &ed_b.sign(&change, now()).unwrap(),
                ed_a.jwks_json(),
                &ok,
                now()
            ),
            Err(ApprovalError::BadSignature)
        );
        // A kid the JWKS does not have.
        let stranger = signer_with_kid("someone-else");
        let token_b = stranger.sign(&change, now()).unwrap();
        assert_eq!(
            verify(&token_b, jwks, &ok, now()),
            Err(ApprovalError::UnknownKey(Some("someone-else".into())))
        );
        // The wrong issuer.
        let options = VerifyOptions {
            issuer: Some("https://other.example".into()),
            ..VerifyOptions::default()
        };
        assert!(matches!(
            verify_with(&token, jwks, &ok, now(), &options),
            Err(ApprovalError::WrongIssuer(_))
        ));
        // An Idempotency-Key for another change.
        let mut keyed = headers.clone();
        keyed.insert("idempotency-key", HeaderValue::from_static("other"));
        assert_eq!(
            verify(&token, jwks, &request(&keyed, BODY), now()),
            Err(ApprovalError::IdempotencyKeyMismatch)
        );
    }

    fn signer_with_kid(kid: &str) -> ApprovalSigner {
        ApprovalSigner::new(
            SigningKey::from_pem(SigningKey::generate_ed25519_pem().as_bytes()).unwrap(),
            Some(kid.into()),
            "https://gate.example".into(),
            Duration::from_secs(300),
        )
    }

    #[test]
    fn none_and_hmac_tokens_are_refused_even_with_a_symmetric_key_published() {
        let signer = signer_for(P256_PEM);
        let headers = headers();
        let ok = request(&headers, BODY);
        let change = change(now());
        let claims = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&json!({
                "iss": "https://gate.example", "sub": "alice", "jti": change.id.to_string(),
                "rule": "r", "digest": change.digest, "confirmed_at": 0, "release_at": 0,
                "iat": now().unix_timestamp(), "exp": now().unix_timestamp() + 60,
            }))
            .unwrap(),
        );
        for alg in ["none", "HS256"] {
            let header = URL_SAFE_NO_PAD.encode(
                json!({ "alg": alg, "typ": APPROVAL_TYPE, "kid": signer.key_id() }).to_string(),
            );
            let token = format!("{header}.{claims}.");
            assert_eq!(
                verify(&token, signer.jwks_json(), &ok, now()),
                Err(ApprovalError::WrongAlgorithm(alg.into()))
            );
        }
        // An HS256 token "signed" with the public key as the secret (key confusion).
        let hmac = jsonwebtoken::encode(
            &Header {
                typ: Some(APPROVAL_TYPE.into()),
                kid: Some(signer.key_id().into()),
                ..Header::new(Algorithm::HS256)
            },
            &json!({}),
            &EncodingKey::from_secret(signer.jwks_json().as_bytes()),
        )
        .unwrap();
        assert_eq!(
            verify(&hmac, signer.jwks_json(), &ok, now()),
            Err(ApprovalError::WrongAlgorithm("HS256".into()))
        );
    }

    #[test]
    fn keys_other_than_p256_and_ed25519_are_refused() {
        // P-384, made with openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384.
        const P384_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDDZ1HiZ/rF+boln3OQq
uu4ogJ6r2bptHyu7hJZFb6+PyoEryNMjf4nn384q6c2xkfGhZANiAARcH5/uJvGQ
rVwHrzXWGqbQMCu3S1uJ8axH0picCcM0K75YAzHaU0fKLcLzA60Za5x9ouTMdLvn
wa7tS4ZRWt8Zbdz3ZiagIGerrO5eUU2tLoEXhtSUo0X9rKUyWSnpm2M=
-----END PRIVATE KEY-----
";
        assert!(SigningKey::from_pem(P384_PEM.as_bytes()).is_err());
        assert!(SigningKey::from_pem(b"not a key").is_err());
    }
}
