//! Who is the caller. The exchange's authenticating edge tells us, either with a header
//! (optionally HMAC-signed so a client reaching the gate directly cannot claim to be someone
//! else) or with the exchange's own session JWT. Time checks use the injected clock.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use http::{header, HeaderMap, HeaderName};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::Sha256;
use time::OffsetDateTime;

/// A user id as the exchange knows it. Validated: 1 to 256 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, IdentityError> {
        if raw.is_empty() || raw.chars().count() > 256 || raw.chars().any(char::is_control) {
            return Err(IdentityError::Invalid(
                "the user id is empty, too long or malformed",
            ));
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why the caller could not be identified. Always the client's (or its edge's) fault: 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityError {
    Missing,
    Invalid(&'static str),
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityError::Missing => f.write_str("no identity was presented"),
            IdentityError::Invalid(why) => f.write_str(why),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    Hs256,
    Rs256,
    Es256,
}

/// The `[identity]` settings as the config file gives them for `jwt` mode.
#[derive(Clone)]
pub struct JwtSettings {
    pub algorithm: JwtAlgorithm,
    /// The HS256 secret, or the PEM public key for RS256/ES256.
    pub key_material: Vec<u8>,
    /// Also accept the token from this cookie (the `Authorization: Bearer` header always works).
    pub cookie: Option<String>,
    pub claim: String,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

/// How the gate identifies callers, ready to use.
#[derive(Clone)]
pub enum IdentitySettings {
    Header {
        header: HeaderName,
        hmac_secret: Option<Vec<u8>>,
        hmac_max_age: Duration,
    },
    Jwt(JwtVerifier),
}

impl fmt::Debug for IdentitySettings {
    // Secrets never reach logs or error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentitySettings::Header {
                header,
                hmac_secret,
                hmac_max_age,
            } => f
                .debug_struct("Header")
                .field("header", header)
                .field("signed", &hmac_secret.is_some())
                .field("hmac_max_age", hmac_max_age)
                .finish(),
            IdentitySettings::Jwt(verifier) => f
                .debug_struct("Jwt")
                .field("algorithm", &verifier.algorithm)
                .field("cookie", &verifier.cookie)
                .field("claim", &verifier.claim)
                .finish(),
        }
    }
}

#[derive(Clone)]
pub struct JwtVerifier {
    algorithm: Algorithm,
    key: DecodingKey,
    cookie: Option<String>,
    claim: String,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_seconds: i64,
}

impl IdentitySettings {
    /// Builds the JWT verifier, parsing the key now so a bad key fails at start-up.
    pub fn jwt(settings: JwtSettings) -> Result<Self, String> {
        let (algorithm, key) = match settings.algorithm {
            JwtAlgorithm::Hs256 => (
                Algorithm::HS256,
                DecodingKey::from_secret(&settings.key_material),
            ),
            JwtAlgorithm::Rs256 => (
                Algorithm::RS256,
                DecodingKey::from_rsa_pem(&settings.key_material)
                    .map_err(|e| format!("not an RSA public key in PEM: {e}"))?,
            ),
            JwtAlgorithm::Es256 => (
                Algorithm::ES256,
                DecodingKey::from_ec_pem(&settings.key_material)
                    .map_err(|e| format!("not an EC public key in PEM: {e}"))?,
            ),
        };
        Ok(IdentitySettings::Jwt(JwtVerifier {
            algorithm,
            key,
            cookie: settings.cookie,
            claim: settings.claim,
            issuer: settings.issuer,
            audience: settings.audience,
            leeway_seconds: i64::try_from(settings.leeway.as_secs()).unwrap_or(i64::MAX),
        }))
    }

    /// Identifies the caller of one request.
    pub fn identify(
        &self,
        headers: &HeaderMap,
        now: OffsetDateTime,
    ) -> Result<UserId, IdentityError> {
        match self {
            IdentitySettings::Header {
                header,
                hmac_secret,
                hmac_max_age,
            } => {
                let value = single_header(headers, header)?;
                match hmac_secret {
                    None => UserId::parse(value),
                    Some(secret) => verify_signed_header(value, secret, *hmac_max_age, now),
                }
            }
            IdentitySettings::Jwt(verifier) => verifier.identify(headers, now),
        }
    }
}

impl IdentitySettings {
    /// A string claim of the caller's verified session token (jwt mode only), for example the
    /// anti-phishing code the exchange puts in its tokens.
    pub fn claim(&self, headers: &HeaderMap, now: OffsetDateTime, name: &str) -> Option<String> {
        let IdentitySettings::Jwt(verifier) = self else {
            return None;
        };
        let claims = verifier.verified_claims(headers, now).ok()?;
        claims.get(name)?.as_str().map(str::to_string)
    }
}

/// Exactly one copy of the header, as visible ASCII: two copies could be read differently
/// by us and the upstream.
fn single_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<&'a str, IdentityError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next().ok_or(IdentityError::Missing)?;
    if values.next().is_some() {
        return Err(IdentityError::Invalid(
            "the identity header appears more than once",
        ));
    }
    first
        .to_str()
        .map_err(|_| IdentityError::Invalid("the identity header is not visible ASCII"))
}

/// The signed header format is `{user_id}.{unix_seconds}.{hex(HMAC-SHA256(secret,
/// "{user_id}.{unix_seconds}"))}`. The user id may itself contain dots, so the value is split
/// from the right. The timestamp bounds how long a captured header can be replayed.
fn verify_signed_header(
    value: &str,
    secret: &[u8],
    max_age: Duration,
    now: OffsetDateTime,
) -> Result<UserId, IdentityError> {
    let bad = IdentityError::Invalid("the identity header's signature is missing or wrong");
    let mut parts = value.rsplitn(3, '.');
    let (Some(signature_hex), Some(timestamp), Some(user)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad);
    };
    let signature = decode_hex(signature_hex).ok_or(bad.clone())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| bad.clone())?;
    mac.update(user.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    // Constant-time comparison.
    mac.verify_slice(&signature).map_err(|_| bad.clone())?;

    let signed_at: i64 = timestamp.parse().map_err(|_| bad.clone())?;
    let max_age = i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
    let age = now.unix_timestamp().saturating_sub(signed_at);
    // A little tolerance for clocks that run ahead at the edge, none for stale values.
    if age > max_age || age < -60 {
        return Err(IdentityError::Invalid(
            "the identity header's signature has expired",
        ));
    }
    UserId::parse(user)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Signs a user id the way the edge must, for tests and for edges written in Rust.
pub fn sign_identity_header(user: &str, secret: &[u8], now: OffsetDateTime) -> String {
    let timestamp = now.unix_timestamp().to_string();
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        // HMAC accepts keys of every length; this arm is unreachable in practice.
        Err(_) => return String::new(),
    };
    mac.update(user.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    let signature: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{user}.{timestamp}.{signature}")
}

impl JwtVerifier {
    fn identify(&self, headers: &HeaderMap, now: OffsetDateTime) -> Result<UserId, IdentityError> {
        let claims = self.verified_claims(headers, now)?;
        match claims.get(&self.claim) {
            Some(serde_json::Value::String(user)) => UserId::parse(user),
            Some(serde_json::Value::Number(user)) => UserId::parse(&user.to_string()),
            _ => Err(IdentityError::Invalid(
                "the session token does not name a user",
            )),
        }
    }

    /// The token's claims, once its signature, issuer, audience and times check out.
    fn verified_claims(
        &self,
        headers: &HeaderMap,
        now: OffsetDateTime,
    ) -> Result<serde_json::Map<String, serde_json::Value>, IdentityError> {
        let token = self.token_from(headers)?;
        let mut validation = Validation::new(self.algorithm);
        // Time claims are checked below against the injected clock, not the library's.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &validation,
        )
        .map_err(|_| IdentityError::Invalid("the session token is malformed or badly signed"))?;
        let claims = data.claims;

        let now = now.unix_timestamp();
        let exp = claims
            .get("exp")
            .and_then(serde_json::Value::as_i64)
            .ok_or(IdentityError::Invalid("the session token has no expiry"))?;
        if now > exp.saturating_add(self.leeway_seconds) {
            return Err(IdentityError::Invalid("the session token has expired"));
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf.as_i64().ok_or(IdentityError::Invalid(
                "the session token's nbf is malformed",
            ))?;
            if now < nbf.saturating_sub(self.leeway_seconds) {
                return Err(IdentityError::Invalid("the session token is not valid yet"));
            }
        }
        Ok(claims)
    }

    fn token_from<'a>(&self, headers: &'a HeaderMap) -> Result<&'a str, IdentityError> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let value = value
                .to_str()
                .map_err(|_| IdentityError::Invalid("the Authorization header is malformed"))?;
            return match value.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
                _ => Err(IdentityError::Invalid(
                    "the Authorization header is not a Bearer token",
                )),
            };
        }
        let Some(cookie_name) = &self.cookie else {
            return Err(IdentityError::Missing);
        };
        let mut found = None;
        for value in headers.get_all(header::COOKIE) {
            let Ok(value) = value.to_str() else { continue };
            for pair in value.split(';') {
                if let Some((name, token)) = pair.trim().split_once('=') {
                    if name == cookie_name {
                        if found.is_some() {
                            // Two session cookies could be read differently upstream.
                            return Err(IdentityError::Invalid("the session cookie appears twice"));
                        }
                        found = Some(token.trim_matches('"'));
                    }
                }
            }
        }
        found.ok_or(IdentityError::Missing)
    }
}

/// Base64url without padding, as JWTs and WebAuthn use it.
pub fn base64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn header_mode(signed: bool) -> IdentitySettings {
        IdentitySettings::Header {
            header: HeaderName::from_static("x-user-id"),
            hmac_secret: signed.then(|| SECRET.to_vec()),
            hmac_max_age: Duration::from_secs(300),
        }
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn signed_header_round_trips_and_allows_dots_in_ids() {
        let now = OffsetDateTime::now_utc();
        let value = sign_identity_header("alice.smith", SECRET, now);
        let user = header_mode(true).identify(&headers(&value), now).unwrap();
        assert_eq!(user.as_str(), "alice.smith");
    }

    #[test]
    fn signed_header_refuses_forgery_and_staleness() {
        let now = OffsetDateTime::now_utc();
        let value = sign_identity_header("alice", SECRET, now);
        let forged = value.replacen("alice", "mallory", 1);
        assert!(header_mode(true).identify(&headers(&forged), now).is_err());
        assert!(header_mode(true).identify(&headers("alice"), now).is_err());
        let later = now + Duration::from_secs(301);
        assert!(header_mode(true).identify(&headers(&value), later).is_err());
    }

    #[test]
    fn claims_come_only_from_a_verified_token() {
        let secret = b"0123456789abcdef0123456789abcdef-jwt";
        let settings = IdentitySettings::jwt(JwtSettings {
            algorithm: JwtAlgorithm::Hs256,
            key_material: secret.to_vec(),
            cookie: None,
            claim: "sub".into(),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(0),
        })
        .unwrap();
        let now = OffsetDateTime::now_utc();
        let token = |key: &[u8]| {
            let claims = serde_json::json!({"sub": "alice", "apc": "BLUE-42", "exp": now.unix_timestamp() + 60});
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(key),
            )
            .unwrap()
        };
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {}", token(secret))).unwrap(),
        );
        assert_eq!(settings.claim(&h, now, "apc").as_deref(), Some("BLUE-42"));
        assert_eq!(settings.claim(&h, now, "missing"), None);
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!(
                "Bearer {}",
                token(b"another-secret-another-secret-xx")
            ))
            .unwrap(),
        );
        assert_eq!(
            settings.claim(&h, now, "apc"),
            None,
            "a forged token's claims are not read"
        );
        assert_eq!(
            header_mode(false).claim(&headers("alice"), now, "apc"),
            None
        );
    }

    #[test]
    fn duplicate_identity_headers_are_refused() {
        let mut h = headers("alice");
        h.append("x-user-id", HeaderValue::from_static("bob"));
        assert!(header_mode(false)
            .identify(&h, OffsetDateTime::now_utc())
            .is_err());
    }
}
