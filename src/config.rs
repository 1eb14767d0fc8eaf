//! The configuration file: its schema (unknown keys rejected with their name and line), the
//! `STEPGATE_*` environment overrides, and validation into the runtime [`Config`] the rest of
//! the gate uses. Nothing outside this module sees the file's raw shape.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use std::collections::HashMap;
use std::sync::Arc;

use uuid::Uuid;
use webauthn_rs::prelude::AttestationCaListBuilder;

use crate::identity::{IdentitySettings, JwtAlgorithm, JwtSettings};
use crate::notify::NotifySettings;
use crate::passkeys::CredentialPolicy;
use crate::policy::{
    Condition, ConditionTest, ExtraMediaType, ReleaseMode, Rule, RuleSet, RuleSpec,
};

/// Everything the gate needs to run, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// The origin users' browsers see; also the WebAuthn origin. Never has a path.
    pub public_url: Url,
    pub upstream: Url,
    pub database_url: String,
    pub webauthn: WebauthnSettings,
    pub identity: IdentitySettings,
    /// The header the gate sets to the verified user on protected requests it forwards, after
    /// removing any copy a client sent (on every request).
    pub upstream_identity_header: Option<http::HeaderName>,
    pub limits: Limits,
    pub rules: RuleSet,
    pub passkeys: PasskeySettings,
    pub notifications: NotifySettings,
    /// The admin API: where it listens and the bearer token it requires.
    pub admin: Option<AdminSettings>,
    /// The effective credential policy of each rule (its own settings over the global ones).
    pub rule_policies: HashMap<String, CredentialPolicy>,
    /// The `[approval]` section: how released requests are signed for the upstream.
    pub approval: ApprovalSettings,
}

/// The `[approval]` section. Without a key file the gate keeps a generated key in its
/// database (see `app::approval_signer`).
#[derive(Clone)]
pub struct ApprovalSettings {
    /// A PKCS#8 PEM private key (P-256 → ES256, Ed25519 → EdDSA), read and checked at load.
    pub signing_key_pem: Option<Vec<u8>>,
    /// The JWS `kid`; by default the key's RFC 7638 thumbprint.
    pub key_id: Option<String>,
    /// How long a signed approval is valid after it is made (its `exp`).
    pub token_lifetime: Duration,
}

impl std::fmt::Debug for ApprovalSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovalSettings")
            .field(
                "signing_key",
                &self.signing_key_pem.as_ref().map(|_| "(from file)"),
            )
            .field("key_id", &self.key_id)
            .field("token_lifetime", &self.token_lifetime)
            .finish()
    }
}

/// The admin API's listener and token.
#[derive(Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub token: String,
}

impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSettings")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// The `[passkeys]` section.
#[derive(Debug, Clone)]
pub struct PasskeySettings {
    /// How long an added passkey waits after its confirmation before it becomes active.
    pub add_cooling_off: Duration,
    /// A passkey younger than this can confirm, but the release waits until it is this old.
    pub quarantine: Duration,
    /// How soon the built-in passkey changes must be confirmed.
    pub confirm_within: Duration,
    /// How long an unfreeze waits after its confirmation.
    pub unfreeze_cooling_off: Duration,
    /// The global credential policy: enforced on registration (model checks) and on the
    /// built-in passkey changes and rules without their own settings.
    pub policy: CredentialPolicy,
    /// Whether any policy checks attestation, so registrations should ask for it.
    pub request_attestation: bool,
}

#[derive(Debug, Clone)]
pub struct WebauthnSettings {
    pub rp_id: String,
    pub rp_name: String,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest body the gate buffers on a protected route (413 above it).
    pub max_body_bytes: usize,
    /// How long the upstream may take to answer with headers (504 after it).
    pub upstream_timeout: Duration,
    /// How long connecting to the upstream may take (502 after it).
    pub connect_timeout: Duration,
    /// How long a started passkey ceremony stays usable.
    pub ceremony_ttl: Duration,
    /// How long to wait for a database connection before answering 503.
    pub database_timeout: Duration,
    /// How often each instance expires lapsed changes and removes dead ceremonies/sessions.
    pub sweep_interval: Duration,
    /// How long a client may take to send a request head (slow-loris); then the connection closes.
    pub header_timeout: Duration,
    /// The largest request head (431 above it).
    pub max_header_bytes: usize,
    /// How long a client may take to send a protected route's body (408 after it).
    pub body_timeout: Duration,
    /// How many held or cooling-off changes one user may have at once (429 above it).
    pub max_pending_per_user: u32,
    /// How many passkey ceremonies one user may start per minute (429 above it).
    pub max_ceremonies_per_minute: u32,
    /// On SIGTERM, how long in-flight requests may take to finish before the gate exits.
    pub shutdown_grace: Duration,
    /// How often each instance looks for due changes of `release = "auto"` rules.
    pub auto_release_interval: Duration,
}

/// A configuration problem, said in terms of the file or variable it came from.
#[derive(Debug)]
pub struct ConfigError {
    pub message: String,
}

impl ConfigError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// The file's schema.

#[derive(Debug, Deserialize)]
struct FileConfig {
    listen: String,
    public_url: String,
    upstream: String,
    database_url: String,
    webauthn: FileWebauthn,
    identity: FileIdentity,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    rules: Vec<FileRule>,
    #[serde(default)]
    passkeys: FilePasskeys,
    #[serde(default)]
    notifications: FileNotifications,
    #[serde(default)]
    freeze: FileFreeze,
    admin_listen: Option<String>,
    admin_token: Option<String>,
    #[serde(default)]
    approval: FileApproval,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileApproval {
    signing_key_file: Option<String>,
    key_id: Option<String>,
    token_lifetime: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FileFreeze {
    unfreeze_cooling_off: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FileNotifications {
    #[serde(default)]
    webhooks: Vec<String>,
    signing_secret: Option<String>,
    max_attempts: Option<Count>,
    retry_base: Option<String>,
    anti_phishing_header: Option<String>,
    anti_phishing_claim: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FilePasskeys {
    add_cooling_off: Option<String>,
    quarantine: Option<String>,
    confirm_within: Option<String>,
    device_bound: Option<bool>,
    aaguid_allow: Option<Vec<String>>,
    aaguid_deny: Option<Vec<String>>,
    attestation: Option<String>,
    attestation_roots: Option<Vec<String>>,
}

impl FilePasskeys {
    fn policy(&self) -> FileCredentialPolicy {
        FileCredentialPolicy {
            device_bound: self.device_bound,
            aaguid_allow: self.aaguid_allow.clone(),
            aaguid_deny: self.aaguid_deny.clone(),
            attestation: self.attestation.clone(),
            attestation_roots: self.attestation_roots.clone(),
        }
    }
}

/// Credential policy keys, globally under `[passkeys]` and on each rule (read inline there:
/// serde's `flatten` does not combine with `deny_unknown_fields`).
#[derive(Debug, Default, Clone)]
struct FileCredentialPolicy {
    device_bound: Option<bool>,
    aaguid_allow: Option<Vec<String>>,
    aaguid_deny: Option<Vec<String>>,
    attestation: Option<String>,
    attestation_roots: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct FileWebauthn {
    rp_id: String,
    rp_name: String,
}

#[derive(Debug, Deserialize)]
struct FileIdentity {
    mode: String,
    header: Option<String>,
    hmac_secret: Option<String>,
    hmac_max_age: Option<String>,
    algorithm: Option<String>,
    secret: Option<String>,
    public_key_pem: Option<String>,
    public_key_file: Option<String>,
    cookie: Option<String>,
    claim: Option<String>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Option<String>,
    upstream_header: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FileLimits {
    max_body_bytes: Option<ByteSize>,
    upstream_timeout: Option<String>,
    connect_timeout: Option<String>,
    ceremony_ttl: Option<String>,
    database_timeout: Option<String>,
    sweep_interval: Option<String>,
    header_timeout: Option<String>,
    max_header_bytes: Option<ByteSize>,
    body_timeout: Option<String>,
    max_pending_per_user: Option<Count>,
    max_ceremonies_per_minute: Option<Count>,
    shutdown_grace: Option<String>,
    auto_release_interval: Option<String>,
}

/// A count written as an integer or as text (environment values are always text).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Count {
    Number(u32),
    Text(String),
}

impl Count {
    fn copy(&self) -> Count {
        match self {
            Count::Number(n) => Count::Number(*n),
            Count::Text(t) => Count::Text(t.clone()),
        }
    }
}

fn count_or(value: Option<Count>, default: u32) -> Result<u32, String> {
    let n = match value {
        None => default,
        Some(Count::Number(n)) => n,
        Some(Count::Text(text)) => text
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not a whole number"))?,
    };
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// A byte count written as an integer or as text such as `"64KiB"` (environment values are
/// always text).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ByteSize {
    Number(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
struct FileRule {
    name: String,
    methods: Vec<String>,
    path: String,
    #[serde(default)]
    when: Vec<FileCondition>,
    cooling_off: String,
    confirm_within: String,
    release_within: Option<String>,
    /// "client" (default) or "auto".
    release: Option<String>,
    summary: String,
    #[serde(default)]
    case_insensitive: bool,
    #[serde(default)]
    fold_case: bool,
    #[serde(default)]
    content_types: Vec<String>,
    device_bound: Option<bool>,
    aaguid_allow: Option<Vec<String>>,
    aaguid_deny: Option<Vec<String>>,
    attestation: Option<String>,
    attestation_roots: Option<Vec<String>>,
}

impl FileRule {
    fn policy(&self) -> FileCredentialPolicy {
        FileCredentialPolicy {
            device_bound: self.device_bound,
            aaguid_allow: self.aaguid_allow.clone(),
            aaguid_deny: self.aaguid_deny.clone(),
            attestation: self.attestation.clone(),
            attestation_roots: self.attestation_roots.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct FileCondition {
    pointer: String,
    contains: Option<toml::Value>,
    equals: Option<toml::Value>,
    exists: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Environment variables that start with `STEPGATE_` but are not configuration overrides.
fn is_reserved_env(name: &str) -> bool {
    name == "STEPGATE_LOG" || name == "STEPGATE_CONFIG" || name.starts_with("STEPGATE_TEST_")
}

impl Config {
    /// Reads `path`, applies the process's `STEPGATE_*` overrides, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(format!("{}: cannot read: {e}", path.display())))?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::from_toml_str(&text, &path.display().to_string(), &env)
    }

    /// Parses configuration text (named `source` in errors) with the given environment.
    /// Every problem found is reported at once, each with its line (when it is in the file)
    /// and key, so one run of `check-config` lists everything to fix.
    pub fn from_toml_str(
        text: &str,
        source: &str,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let (file, unknown) = Self::parse_with_overrides(text, source, env)?;
        let set_by_env: Vec<(String, String)> = overrides_in(env)
            .into_iter()
            .map(|(name, _)| (env_key_path(name), name.clone()))
            .collect();
        let mut problems = Problems::new(source, text, &set_by_env);
        validate(file, &mut problems, &unknown)
    }

    /// The file with `STEPGATE_*` overrides applied, as TOML, plus the overrides' names; for
    /// `check-config --print-effective`.
    pub fn effective_table(
        text: &str,
        source: &str,
        env: &[(String, String)],
    ) -> Result<(toml::Table, Vec<String>), ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::new(format!("{source}: {e}")))?;
        let mut names = Vec::new();
        for (name, value) in overrides_in(env) {
            apply_override(&mut table, name, value)?;
            names.push(name.clone());
        }
        Ok((table, names))
    }

    fn parse_with_overrides(
        text: &str,
        source: &str,
        env: &[(String, String)],
    ) -> Result<(FileConfig, Vec<String>), ConfigError> {
        let mut unknown = Vec::new();
        // First pass straight from the text: serde errors then carry the line and column of
        // the offending key, which a table round-trip would lose. Unknown keys are collected
        // rather than fatal here, so that all of them are reported together.
        let direct: FileConfig =
            serde_ignored::deserialize(toml::Deserializer::new(text), |path| {
                unknown.push(path.to_string())
            })
            .map_err(|e| ConfigError::new(format!("{source}: {}", e.to_string().trim_end())))?;
        let overrides = overrides_in(env);
        if overrides.is_empty() {
            return Ok((direct, unknown));
        }
        let (table, names) = Self::effective_table(text, source, env)?;
        unknown.clear();
        let file = serde_ignored::deserialize(toml::Value::Table(table), |path| {
            unknown.push(path.to_string())
        })
        .map_err(|e| {
            ConfigError::new(format!(
                "{source} with environment overrides {}: {e}",
                names.join(", ")
            ))
        })?;
        Ok((file, unknown))
    }
}

/// What `check-config --print-effective` prints: the configuration as the gate will read it
/// (file plus `STEPGATE_*` overrides) in TOML, secrets redacted, then which keys the
/// environment set.
pub fn effective_report(path: &Path, env: &[(String, String)]) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(format!("{}: cannot read: {e}", path.display())))?;
    let (mut table, overrides) = Config::effective_table(&text, &path.display().to_string(), env)?;
    redact_secrets(&mut table);
    let mut report = toml::to_string(&table)
        .map_err(|e| ConfigError::new(format!("cannot print the configuration: {e}")))?;
    report.push_str("\n# Set by the environment:");
    if overrides.is_empty() {
        report.push_str(" nothing\n");
    } else {
        report.push('\n');
        for name in overrides {
            let key = env_key_path(&name);
            report.push_str(&format!("#   {name} -> {key}\n"));
        }
    }
    Ok(report)
}

/// Keys whose values must never be printed: secrets, tokens, passwords, private keys.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["secret", "token", "password", "private"]
        .iter()
        .any(|word| key.contains(word))
        || (key.ends_with("_pem") && !key.starts_with("public"))
}

const REDACTED: &str = "<redacted>";

fn redact_secrets(table: &mut toml::Table) {
    for (key, value) in table.iter_mut() {
        if is_secret_key(key) {
            *value = toml::Value::String(REDACTED.into());
            continue;
        }
        if key.ends_with("_url") {
            if let toml::Value::String(text) = value {
                if let Ok(mut url) = Url::parse(text) {
                    if url.password().is_some() {
                        let _ = url.set_password(Some(REDACTED));
                        *text = url.to_string();
                    }
                }
            }
        }
        match value {
            toml::Value::Table(inner) => redact_secrets(inner),
            toml::Value::Array(items) => {
                for item in items {
                    if let toml::Value::Table(inner) = item {
                        redact_secrets(inner);
                    }
                }
            }
            _ => {}
        }
    }
}

/// `STEPGATE_RULES__0__COOLING_OFF` → `rules.0.cooling_off`.
fn env_key_path(name: &str) -> String {
    name.trim_start_matches("STEPGATE_")
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect::<Vec<_>>()
        .join(".")
}

fn overrides_in(env: &[(String, String)]) -> Vec<(&String, &String)> {
    env.iter()
        .filter(|(k, _)| k.starts_with("STEPGATE_") && !is_reserved_env(k))
        .map(|(k, v)| (k, v))
        .collect()
}

/// The problems found in one pass over a config, each said as `file, line N: `key`: why`.
struct Problems<'a> {
    source: &'a str,
    text: &'a str,
    /// (key path, variable) for every `STEPGATE_*` override, to say where a value came from.
    set_by_env: &'a [(String, String)],
    found: Vec<String>,
}

impl<'a> Problems<'a> {
    fn new(source: &'a str, text: &'a str, set_by_env: &'a [(String, String)]) -> Self {
        Problems {
            source,
            text,
            set_by_env,
            found: Vec::new(),
        }
    }

    fn add(&mut self, key: &str, why: impl fmt::Display) {
        let from_env = self.set_by_env.iter().find(|(path, _)| {
            key == path
                || key.starts_with(&format!("{path}."))
                || path.starts_with(&format!("{key}."))
        });
        let at = match (from_env, line_of(self.text, key)) {
            (Some((_, variable)), _) => format!("environment variable {variable}"),
            (None, Some(line)) => format!("{}, line {line}", self.source),
            (None, None) => self.source.to_string(),
        };
        self.found.push(format!("{at}: `{key}`: {why}"));
    }

    /// The value, or `None` with the problem recorded.
    fn check<T>(&mut self, key: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(why) => {
                self.add(key, why);
                None
            }
        }
    }

    /// The value, or `fallback` with the problem recorded (the config is refused anyway; the
    /// fallback only lets the remaining keys be checked too).
    fn or<T>(&mut self, key: &str, result: Result<T, String>, fallback: T) -> T {
        self.check(key, result).unwrap_or(fallback)
    }

    fn error(&self) -> ConfigError {
        let count = self.found.len();
        let mut message = self.found.join("\n");
        if count > 1 {
            message.push_str(&format!("\n({count} problems)"));
        }
        ConfigError::new(message)
    }
}

/// The line of the file on which `key` (`limits.sweep_interval`, `rules.2`,
/// `rules.0.when.1.contain`) is written, when it is written there.
fn line_of(text: &str, key: &str) -> Option<usize> {
    use toml_edit::{Item, TableLike, Value};
    let document = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &dyn TableLike = document.as_table();
    let mut span = None;
    let mut segments = key.split('.').peekable();
    while let Some(segment) = segments.next() {
        let Some((name, item)) = table.get_key_value(segment) else {
            break;
        };
        span = name.span().or(span);
        let index = segments.peek().and_then(|s| s.parse::<usize>().ok());
        let next: Option<&dyn TableLike> = match (index, item) {
            (Some(index), Item::ArrayOfTables(tables)) => {
                segments.next();
                let element = tables.get(index)?;
                span = element.span().or(span);
                Some(element)
            }
            (Some(index), Item::Value(Value::Array(values))) => {
                segments.next();
                let element = values.get(index)?;
                span = element.span().or(span);
                element.as_inline_table().map(|t| t as &dyn TableLike)
            }
            (Some(_), _) => None,
            (None, item) => item.as_table_like(),
        };
        match next {
            Some(next) => table = next,
            None => break,
        }
    }
    let start = span?.start;
    Some(text.get(..start)?.matches('\n').count() + 1)
}

/// `STEPGATE_IDENTITY__HMAC_SECRET=x` sets `identity.hmac_secret`: `__` separates table
/// levels, a number selects an array element (`STEPGATE_RULES__0__COOLING_OFF`).
fn apply_override(table: &mut toml::Table, name: &str, raw: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = name["STEPGATE_".len()..]
        .split("__")
        .map(|segment| segment.to_ascii_lowercase())
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(ConfigError::new(format!(
            "environment variable {name}: empty key segment"
        )));
    }
    let value = parse_env_value(name, raw)?;
    let bad = |why: &str| ConfigError::new(format!("environment variable {name}: {why}"));

    let (last, parents) = path.split_last().ok_or_else(|| bad("no key"))?;
    // Walk from the root as a `Value` so tables and arrays take one code path; the root is
    // swapped out and back so nothing is cloned.
    let mut root = toml::Value::Table(std::mem::take(table));
    let result = set_at_path(&mut root, parents, last, value, &bad);
    if let toml::Value::Table(restored) = root {
        *table = restored;
    }
    result
}

fn set_at_path(
    root: &mut toml::Value,
    parents: &[String],
    last: &str,
    value: toml::Value,
    bad: &dyn Fn(&str) -> ConfigError,
) -> Result<(), ConfigError> {
    let mut current = root;
    for segment in parents {
        current = match current {
            toml::Value::Table(t) => t
                .entry(segment.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new())),
            toml::Value::Array(items) => {
                let index: usize = segment
                    .parse()
                    .map_err(|_| bad(&format!("`{segment}` is not an array index")))?;
                items
                    .get_mut(index)
                    .ok_or_else(|| bad(&format!("no element {index} in that array")))?
            }
            _ => return Err(bad(&format!("`{segment}` is not a table"))),
        };
    }
    match current {
        toml::Value::Table(t) => {
            t.insert(last.to_string(), value);
        }
        toml::Value::Array(items) => {
            let index: usize = last
                .parse()
                .map_err(|_| bad(&format!("`{last}` is not an array index")))?;
            let slot = items
                .get_mut(index)
                .ok_or_else(|| bad(&format!("no element {index} in that array")))?;
            *slot = value;
        }
        _ => return Err(bad("the parent key is not a table")),
    }
    Ok(())
}

/// Environment values are text; `true`/`false` become booleans and a value that starts with
/// `[` or `{` is read as an inline TOML array or table (for `methods`, `when`, or whole rules).
fn parse_env_value(name: &str, raw: &str) -> Result<toml::Value, ConfigError> {
    let trimmed = raw.trim();
    match trimmed {
        "true" => Ok(toml::Value::Boolean(true)),
        "false" => Ok(toml::Value::Boolean(false)),
        _ if trimmed.starts_with('[') || trimmed.starts_with('{') => {
            let wrapped: toml::Table = toml::from_str(&format!("v = {trimmed}")).map_err(|e| {
                ConfigError::new(format!(
                    "environment variable {name}: not a TOML value: {e}"
                ))
            })?;
            wrapped
                .get("v")
                .cloned()
                .ok_or_else(|| ConfigError::new(format!("environment variable {name}: empty")))
        }
        _ => Ok(toml::Value::String(raw.to_string())),
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.

fn validate(
    file: FileConfig,
    problems: &mut Problems<'_>,
    unknown: &[String],
) -> Result<Config, ConfigError> {
    for key in unknown {
        problems.add(
            key,
            "unknown key (check its spelling against the configuration reference)",
        );
    }

    let listen: Option<SocketAddr> = problems.check(
        "listen",
        file.listen
            .parse()
            .map_err(|e| format!("not an address like 127.0.0.1:8080 ({e})")),
    );
    let public_url = problems.check("public_url", check_public_url(&file.public_url));
    let upstream = problems.check("upstream", check_upstream(&file.upstream));
    if !(file.database_url.starts_with("sqlite:") || file.database_url.starts_with("postgres")) {
        problems.add(
            "database_url",
            "must start with sqlite: or postgres:// (for example sqlite://stepgate.db, sqlite::memory: or postgres://user@host/db)",
        );
    }

    let rp_id = file.webauthn.rp_id.clone();
    if rp_id.trim().is_empty() {
        problems.add("webauthn.rp_id", "must not be empty");
    } else if let Some(public_url) = &public_url {
        let host = public_url.host_str().unwrap_or_default();
        if host != rp_id && !host.ends_with(&format!(".{rp_id}")) {
            problems.add(
                "webauthn.rp_id",
                format!("must be the host of public_url ({host}) or a parent domain of it"),
            );
        }
    }

    let upstream_identity_header = match &file.identity.upstream_header {
        None => None,
        Some(name) => problems.check(
            "identity.upstream_header",
            check_upstream_header(name, file.identity.header.as_deref()),
        ),
    };
    let identity = match validate_identity(file.identity) {
        Ok(identity) => Some(identity),
        Err((key, why)) => {
            problems.add(&format!("identity.{key}"), why);
            None
        }
    };

    let mut duration = |key: &str, value: Option<String>, default: &str| {
        let fallback = parse_duration(default).unwrap_or_default();
        problems.or(
            &format!("limits.{key}"),
            duration_or(value, default),
            fallback,
        )
    };
    let upstream_timeout = duration("upstream_timeout", file.limits.upstream_timeout, "30s");
    let connect_timeout = duration("connect_timeout", file.limits.connect_timeout, "5s");
    let ceremony_ttl = duration("ceremony_ttl", file.limits.ceremony_ttl, "5m");
    let database_timeout = duration("database_timeout", file.limits.database_timeout, "5s");
    let sweep_interval = duration("sweep_interval", file.limits.sweep_interval, "30s");
    let header_timeout = duration("header_timeout", file.limits.header_timeout, "10s");
    let body_timeout = duration("body_timeout", file.limits.body_timeout, "30s");
    let shutdown_grace = duration("shutdown_grace", file.limits.shutdown_grace, "30s");
    let limits = Limits {
        max_body_bytes: match &file.limits.max_body_bytes {
            None => 64 * 1024,
            Some(size) => problems.or("limits.max_body_bytes", parse_byte_size(size), 0),
        },
        upstream_timeout,
        connect_timeout,
        ceremony_ttl,
        database_timeout,
        sweep_interval,
        header_timeout,
        max_header_bytes: match &file.limits.max_header_bytes {
            None => 32 * 1024,
            Some(size) => problems.or(
                "limits.max_header_bytes",
                parse_byte_size(size).and_then(|bytes| {
                    // hyper needs room for at least one ordinary head.
                    if bytes < 8192 {
                        Err("must be at least 8KiB".into())
                    } else {
                        Ok(bytes)
                    }
                }),
                0,
            ),
        },
        body_timeout,
        shutdown_grace,
        max_pending_per_user: problems.or(
            "limits.max_pending_per_user",
            count_or(file.limits.max_pending_per_user, 10),
            0,
        ),
        max_ceremonies_per_minute: problems.or(
            "limits.max_ceremonies_per_minute",
            count_or(file.limits.max_ceremonies_per_minute, 20),
            0,
        ),
        auto_release_interval: problems.or(
            "limits.auto_release_interval",
            duration_or(file.limits.auto_release_interval, "5s").and_then(|interval| {
                if interval.is_zero() {
                    Err("must be longer than zero".into())
                } else {
                    Ok(interval)
                }
            }),
            Duration::from_secs(5),
        ),
    };
    let approval = match validate_approval(&file.approval) {
        Ok(approval) => Some(approval),
        Err(why) => {
            // The sub-key a message starts with (`signing_key_file: …`) finds its line.
            let key = match why.split_once(':') {
                Some((sub, _)) if sub.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') => {
                    format!("approval.{sub}")
                }
                _ => "approval".to_string(),
            };
            problems.add(&key, why);
            None
        }
    };

    let admin = match (&file.admin_listen, &file.admin_token) {
        (None, None) => None,
        (Some(listen), Some(token)) => {
            if token.len() < 32 {
                problems.add("admin_token", "must be at least 32 characters long");
            }
            problems
                .check(
                    "admin_listen",
                    listen
                        .parse()
                        .map_err(|e| format!("not an address like 127.0.0.1:8081 ({e})")),
                )
                .map(|listen| AdminSettings {
                    listen,
                    token: token.clone(),
                })
        }
        (Some(_), None) => {
            problems.add(
                "admin_token",
                "required with admin_listen (set STEPGATE_ADMIN_TOKEN)",
            );
            None
        }
        (None, Some(_)) => {
            problems.add("admin_listen", "required with admin_token");
            None
        }
    };
    let notifications =
        problems.check("notifications", validate_notifications(&file.notifications));
    let anti_phishing_claim = notifications
        .as_ref()
        .is_some_and(|n| n.anti_phishing_claim.is_some());
    if anti_phishing_claim && !matches!(identity, Some(IdentitySettings::Jwt(_))) {
        problems.add(
            "notifications.anti_phishing_claim",
            "only applies with [identity] mode = \"jwt\"; use anti_phishing_header",
        );
    }
    let global_file_policy = file.passkeys.policy();
    let global_policy = problems.check("passkeys", build_policy(&global_file_policy, None));
    let mut passkey_duration = |key: &str, value: Option<String>| {
        problems.or(key, duration_or(value, "24h"), Duration::ZERO)
    };
    let add_cooling_off = passkey_duration(
        "passkeys.add_cooling_off",
        file.passkeys.add_cooling_off.clone(),
    );
    let quarantine = passkey_duration("passkeys.quarantine", file.passkeys.quarantine.clone());
    let unfreeze_cooling_off = passkey_duration(
        "freeze.unfreeze_cooling_off",
        file.freeze.unfreeze_cooling_off.clone(),
    );
    let confirm_within = problems.or(
        "passkeys.confirm_within",
        duration_or(file.passkeys.confirm_within.clone(), "10m"),
        Duration::ZERO,
    );

    let mut rules = Vec::with_capacity(file.rules.len());
    // Where each valid rule sits in the file, for saying which one a later problem is about.
    let mut file_index_of = Vec::with_capacity(file.rules.len());
    let mut rule_policies = HashMap::new();
    let mut request_attestation = global_policy
        .as_ref()
        .is_some_and(|policy| policy.attestation_roots.is_some());
    for (index, rule) in file.rules.into_iter().enumerate() {
        let key = format!("rules.{index}");
        let label = format!("rule `{}`", rule.name);
        if BUILT_IN_RULES.contains(&rule.name.as_str()) {
            problems.add(
                &key,
                format!("{label}: this name is reserved for the gate's own passkey changes"),
            );
            continue;
        }
        if let Some(global_policy) = &global_policy {
            match build_policy(&rule.policy(), Some(global_policy)) {
                Ok(policy) => {
                    request_attestation |= policy.attestation_roots.is_some();
                    rule_policies.insert(rule.name.clone(), policy);
                }
                Err(why) => problems.add(&key, format!("{label}: {why}")),
            }
        }
        match validate_rule(rule) {
            Ok(rule) => {
                rules.push(rule);
                file_index_of.push(index);
            }
            Err(why) => problems.add(&key, format!("{label}: {why}")),
        }
    }
    let rules = problems.check("rules", RuleSet::new(rules));
    if let Some(rules) = &rules {
        for (earlier, later) in rules.unreachable() {
            let index = rules
                .rules()
                .iter()
                .position(|rule| rule.name == later.name)
                .and_then(|position| file_index_of.get(position))
                .copied()
                .unwrap_or_default();
            problems.add(
                &format!("rules.{index}"),
                format!(
                    "rule `{}` can never match: the earlier rule `{}` holds every request it \
                     would (all of its methods and paths, with no `when`); move it first or \
                     narrow `{}`",
                    later.name, earlier.name, earlier.name
                ),
            );
        }
    }

    let (
        Some(listen),
        Some(public_url),
        Some(upstream),
        Some(identity),
        Some(notifications),
        Some(global_policy),
        Some(rules),
        Some(approval),
        true,
    ) = (
        listen,
        public_url,
        upstream,
        identity,
        notifications,
        global_policy,
        rules,
        approval,
        problems.found.is_empty(),
    )
    else {
        return Err(problems.error());
    };
    Ok(Config {
        listen,
        public_url,
        upstream,
        database_url: file.database_url,
        webauthn: WebauthnSettings {
            rp_id,
            rp_name: file.webauthn.rp_name,
        },
        identity,
        upstream_identity_header,
        limits,
        rules,
        passkeys: PasskeySettings {
            add_cooling_off,
            quarantine,
            confirm_within,
            unfreeze_cooling_off,
            request_attestation,
            policy: global_policy,
        },
        notifications,
        admin,
        rule_policies,
        approval,
    })
}

/// The key file is read and parsed now, so a wrong path or key type fails at start-up and in
/// `check-config`, not on the first release.
fn validate_approval(file: &FileApproval) -> Result<ApprovalSettings, String> {
    let signing_key_pem = match &file.signing_key_file {
        None => None,
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("signing_key_file: cannot read {path}: {e}"))?;
            crate::approval::SigningKey::from_pem(&pem)
                .map_err(|e| format!("signing_key_file: {path}: {e}"))?;
            Some(pem)
        }
    };
    let key_id = match &file.key_id {
        Some(id) if id.trim().is_empty() || id.len() > 128 => {
            return Err("key_id must be 1 to 128 characters".into())
        }
        other => other.clone(),
    };
    let token_lifetime = duration_or(file.token_lifetime.clone(), "5m")
        .map_err(|e| format!("token_lifetime: {e}"))?;
    if token_lifetime.is_zero() || token_lifetime > Duration::from_secs(3600) {
        return Err("token_lifetime must be longer than zero and at most 1h".into());
    }
    Ok(ApprovalSettings {
        signing_key_pem,
        key_id,
        token_lifetime,
    })
}

fn check_public_url(text: &str) -> Result<Url, String> {
    let public_url = Url::parse(text).map_err(|e| e.to_string())?;
    if !matches!(public_url.scheme(), "http" | "https") || public_url.host_str().is_none() {
        return Err("must be an http(s) origin".into());
    }
    if public_url.path() != "/" || public_url.query().is_some() || public_url.fragment().is_some() {
        return Err(
            "must be an origin only, like https://gate.example.com (no path, query or fragment)"
                .into(),
        );
    }
    if public_url.host_str() == Some("127.0.0.1") {
        return Err(
            "browsers refuse WebAuthn on http://127.0.0.1; use http://localhost:PORT".into(),
        );
    }
    Ok(public_url)
}

fn check_upstream(text: &str) -> Result<Url, String> {
    let upstream = Url::parse(text).map_err(|e| e.to_string())?;
    if upstream.scheme() != "http" || upstream.host_str().is_none() {
        return Err(
            "must be an http:// URL (TLS to the upstream is not supported yet; keep the gate and \
             the exchange API on a private network)"
                .into(),
        );
    }
    if upstream.query().is_some() || upstream.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    Ok(upstream)
}

fn check_upstream_header(
    name: &str,
    identity_header: Option<&str>,
) -> Result<http::HeaderName, String> {
    let name = http::HeaderName::try_from(name.to_ascii_lowercase())
        .map_err(|_| "not a valid header name".to_string())?;
    let clashes = identity_header.is_some_and(|h| h.eq_ignore_ascii_case(name.as_str()))
        || name.as_str().starts_with("stepgate-")
        || [
            "host",
            "connection",
            "authorization",
            "cookie",
            "content-type",
            "content-length",
        ]
        .contains(&name.as_str());
    if clashes {
        return Err(format!(
            "`{name}` is used for something else; pick a header of its own, like x-verified-user"
        ));
    }
    Ok(name)
}

fn validate_notifications(file: &FileNotifications) -> Result<NotifySettings, String> {
    let webhooks = file
        .webhooks
        .iter()
        .map(|url| {
            let parsed = Url::parse(url).map_err(|e| format!("webhooks: `{url}`: {e}"))?;
            if parsed.scheme() != "http" {
                return Err(format!(
                    "webhooks: `{url}` must be http:// (deliveries are signed; keep the receiver on a private network)"
                ));
            }
            Ok(parsed)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let signing_secret = match &file.signing_secret {
        Some(secret) if secret.len() < 32 => {
            return Err("signing_secret must be at least 32 characters long".into())
        }
        other => other.as_ref().map(|s| s.clone().into_bytes()),
    };
    if !webhooks.is_empty() && signing_secret.is_none() {
        return Err(
            "webhooks need a signing_secret (set STEPGATE_NOTIFICATIONS__SIGNING_SECRET)".into(),
        );
    }
    let anti_phishing_header = file
        .anti_phishing_header
        .as_ref()
        .map(|name| {
            http::HeaderName::try_from(name.to_ascii_lowercase())
                .map_err(|_| "anti_phishing_header is not a header name".to_string())
        })
        .transpose()?;
    Ok(NotifySettings {
        webhooks,
        signing_secret,
        max_attempts: count_or(file.max_attempts.as_ref().map(Count::copy), 8)
            .map_err(|e| format!("max_attempts: {e}"))?,
        retry_base: duration_or(file.retry_base.clone(), "2s")
            .map_err(|e| format!("retry_base: {e}"))?,
        anti_phishing_header,
        anti_phishing_claim: file.anti_phishing_claim.clone(),
    })
}

/// The names of the gate's built-in changes (adding and removing passkeys).
pub const BUILT_IN_RULES: [&str; 3] = ["passkey-add", "passkey-remove", "account-unfreeze"];

/// One credential policy: the keys given, each falling back to `base` (the global policy)
/// when absent. Root certificates are read now, so a bad path fails at start-up.
fn build_policy(
    file: &FileCredentialPolicy,
    base: Option<&CredentialPolicy>,
) -> Result<CredentialPolicy, String> {
    let base = base.cloned().unwrap_or_default();
    let parse_list =
        |key: &str, list: &Option<Vec<String>>, fallback: Vec<Uuid>| -> Result<Vec<Uuid>, String> {
            match list {
                None => Ok(fallback),
                Some(items) => items
                    .iter()
                    .map(|item| {
                        Uuid::parse_str(item.trim())
                            .map_err(|_| format!("{key}: `{item}` is not an AAGUID (a UUID)"))
                    })
                    .collect(),
            }
        };
    let attestation_roots = match (file.attestation.as_deref(), &file.attestation_roots) {
        (None, None) => base.attestation_roots.clone(),
        (Some("none"), None) => None,
        (Some("none"), Some(_)) => {
            return Err("attestation_roots only apply with attestation = \"required\"".into())
        }
        (Some("required") | None, Some(paths)) if !paths.is_empty() => {
            let mut builder = AttestationCaListBuilder::new();
            for path in paths {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("attestation_roots: cannot read {path}: {e}"))?;
                // The chain check does not depend on the AAGUID recorded here.
                builder
                    .insert_device_pem(&pem, Uuid::nil(), path.clone(), Default::default())
                    .map_err(|e| {
                        format!("attestation_roots: {path} is not a PEM certificate ({e:?})")
                    })?;
            }
            Some(Arc::new(builder.build()))
        }
        (Some("required"), _) => {
            return Err("attestation = \"required\" needs attestation_roots (PEM files)".into())
        }
        (Some(other), _) => {
            return Err(format!(
                "attestation must be \"none\" or \"required\", not `{other}`"
            ))
        }
        (None, Some(_)) => return Err("attestation_roots must name at least one PEM file".into()),
    };
    Ok(CredentialPolicy {
        device_bound: file.device_bound.unwrap_or(base.device_bound),
        aaguid_allow: parse_list(
            "aaguid_allow",
            &file.aaguid_allow,
            base.aaguid_allow.clone(),
        )?,
        aaguid_deny: parse_list("aaguid_deny", &file.aaguid_deny, base.aaguid_deny.clone())?,
        attestation_roots,
    })
}

/// The `[identity]` table; a problem comes back as (key within the table, why).
fn validate_identity(file: FileIdentity) -> Result<IdentitySettings, (String, String)> {
    let err = |key: &str, why: &str| (key.to_string(), why.to_string());
    let jwt_only = [
        ("algorithm", file.algorithm.is_some()),
        ("secret", file.secret.is_some()),
        ("public_key_pem", file.public_key_pem.is_some()),
        ("public_key_file", file.public_key_file.is_some()),
        ("cookie", file.cookie.is_some()),
        ("claim", file.claim.is_some()),
        ("issuer", file.issuer.is_some()),
        ("audience", file.audience.is_some()),
        ("leeway", file.leeway.is_some()),
    ];
    match file.mode.as_str() {
        "header" => {
            if let Some((key, _)) = jwt_only.iter().find(|(_, set)| *set) {
                return Err(err(key, "only applies when mode = \"jwt\""));
            }
            let header = file
                .header
                .ok_or_else(|| err("header", "required when mode = \"header\""))?;
            let header = http::HeaderName::try_from(header.to_ascii_lowercase())
                .map_err(|_| err("header", "not a valid header name"))?;
            let hmac_secret = match file.hmac_secret {
                Some(secret) if secret.len() < 32 => {
                    return Err(err("hmac_secret", "must be at least 32 characters long"))
                }
                other => other.map(String::into_bytes),
            };
            let hmac_max_age =
                duration_or(file.hmac_max_age, "5m").map_err(|why| err("hmac_max_age", &why))?;
            Ok(IdentitySettings::Header {
                header,
                hmac_secret,
                hmac_max_age,
            })
        }
        "jwt" => {
            if file.header.is_some() || file.hmac_secret.is_some() || file.hmac_max_age.is_some() {
                return Err(err(
                    "header",
                    "header, hmac_secret and hmac_max_age only apply when mode = \"header\"",
                ));
            }
            let algorithm = match file.algorithm.as_deref() {
                Some("HS256") => JwtAlgorithm::Hs256,
                Some("RS256") => JwtAlgorithm::Rs256,
                Some("ES256") => JwtAlgorithm::Es256,
                Some(_) => return Err(err("algorithm", "must be HS256, RS256 or ES256")),
                None => return Err(err("algorithm", "required when mode = \"jwt\"")),
            };
            let key_material = match algorithm {
                JwtAlgorithm::Hs256 => {
                    if file.public_key_pem.is_some() || file.public_key_file.is_some() {
                        return Err(err(
                            "public_key_pem",
                            "HS256 uses `secret`, not a public key",
                        ));
                    }
                    let secret = file
                        .secret
                        .ok_or_else(|| err("secret", "required for HS256"))?;
                    if secret.len() < 32 {
                        return Err(err("secret", "must be at least 32 characters long"));
                    }
                    secret.into_bytes()
                }
                JwtAlgorithm::Rs256 | JwtAlgorithm::Es256 => {
                    if file.secret.is_some() {
                        return Err(err(
                            "secret",
                            "RS256 and ES256 use a public key, not a secret",
                        ));
                    }
                    match (file.public_key_pem, file.public_key_file) {
                        (Some(pem), None) => pem.into_bytes(),
                        (None, Some(path)) => std::fs::read(&path).map_err(|e| {
                            err("public_key_file", &format!("cannot read {path}: {e}"))
                        })?,
                        _ => {
                            return Err(err(
                                "public_key_pem",
                                "give exactly one of public_key_pem or public_key_file",
                            ))
                        }
                    }
                }
            };
            let cookie = match file.cookie {
                Some(name) if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) => {
                    return Err(err("cookie", "not a valid cookie name"))
                }
                other => other,
            };
            let settings = JwtSettings {
                algorithm,
                key_material,
                cookie,
                claim: file.claim.unwrap_or_else(|| "sub".to_string()),
                issuer: file.issuer,
                audience: file.audience,
                leeway: duration_or(file.leeway, "30s").map_err(|why| err("leeway", &why))?,
            };
            IdentitySettings::jwt(settings).map_err(|why| err("algorithm", &why))
        }
        _ => Err(err("mode", "must be \"header\" or \"jwt\"")),
    }
}

fn validate_rule(rule: FileRule) -> Result<Rule, String> {
    let cooling_off = parse_duration(&rule.cooling_off).map_err(|e| format!("cooling_off: {e}"))?;
    let confirm_within =
        parse_duration(&rule.confirm_within).map_err(|e| format!("confirm_within: {e}"))?;
    let release_within =
        duration_or(rule.release_within, "7d").map_err(|e| format!("release_within: {e}"))?;
    if confirm_within.is_zero() {
        return Err("confirm_within must be longer than zero".into());
    }
    if release_within.is_zero() {
        return Err("release_within must be longer than zero".into());
    }
    let mut conditions = Vec::with_capacity(rule.when.len());
    for (index, condition) in rule.when.into_iter().enumerate() {
        let test = match (condition.contains, condition.equals, condition.exists) {
            (Some(v), None, None) => ConditionTest::Contains(toml_to_json(v)?),
            (None, Some(v), None) => ConditionTest::Equals(toml_to_json(v)?),
            (None, None, Some(b)) => ConditionTest::Exists(b),
            _ => {
                return Err(format!(
                    "when[{index}]: give exactly one of contains, equals or exists"
                ))
            }
        };
        conditions.push(
            Condition::new(&condition.pointer, test).map_err(|e| format!("when[{index}]: {e}"))?,
        );
    }
    let content_types = rule
        .content_types
        .iter()
        .map(|t| match t.as_str() {
            "application/x-www-form-urlencoded" => Ok(ExtraMediaType::FormUrlEncoded),
            other => Err(format!(
                "content_types: `{other}` cannot be parsed strictly; JSON is always accepted and \
                 application/x-www-form-urlencoded can be added"
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let release = match rule.release.as_deref() {
        None | Some("client") => ReleaseMode::Client,
        Some("auto") => ReleaseMode::Auto,
        Some(other) => return Err(format!("release: `{other}` must be \"client\" or \"auto\"")),
    };
    let mut built = Rule::new(RuleSpec {
        name: rule.name,
        methods: rule.methods,
        path: rule.path,
        conditions,
        cooling_off,
        confirm_within,
        release_within,
        summary: rule.summary,
        case_insensitive: rule.case_insensitive,
        fold_case: rule.fold_case,
        content_types,
    })?;
    built.release = release;
    Ok(built)
}

fn toml_to_json(value: toml::Value) -> Result<serde_json::Value, String> {
    if let toml::Value::Datetime(_) = value {
        return Err("dates are not supported in conditions".into());
    }
    serde_json::to_value(value).map_err(|e| e.to_string())
}

/// Humantime durations: `24h`, `10m`, `90s`, `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration like 24h or 10m ({e})"))
}

fn duration_or(value: Option<String>, default: &str) -> Result<Duration, String> {
    parse_duration(value.as_deref().unwrap_or(default))
}

fn parse_byte_size(size: &ByteSize) -> Result<usize, String> {
    let bytes = match size {
        ByteSize::Number(n) => *n,
        ByteSize::Text(text) => {
            let text = text.trim();
            let split = text
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(text.len());
            let (number, unit) = text.split_at(split);
            let number: u64 = number
                .parse()
                .map_err(|_| format!("`{text}` is not a size like 65536, 64KiB or 1MiB"))?;
            let factor = match unit.trim() {
                "" | "B" => 1,
                "KiB" | "KB" | "k" | "K" => 1024,
                "MiB" | "MB" | "M" => 1024 * 1024,
                _ => return Err(format!("`{text}`: unknown unit (use B, KiB or MiB)")),
            };
            number.saturating_mul(factor)
        }
    };
    if bytes == 0 {
        return Err("must be more than zero".into());
    }
    usize::try_from(bytes).map_err(|_| "too large".to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A complete, valid config file; other modules' tests start from it too.
    pub const MINIMAL: &str = r#"
listen = "127.0.0.1:8080"
public_url = "http://localhost:8080"
upstream = "http://127.0.0.1:9000"
database_url = "sqlite::memory:"

[webauthn]
rp_id = "localhost"
rp_name = "Example Exchange"

[identity]
mode = "header"
header = "x-user-id"

[[rules]]
name = "enable-withdrawals"
methods = ["PUT", "PATCH"]
path = "/api/v1/api-keys/{key_id}"
when = [{ pointer = "/permissions", contains = "withdraw" }]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on API key {key_id}"
"#;

    #[test]
    fn every_problem_is_reported_at_once_with_its_line_and_key() {
        let text = format!(
            "{}{}",
            MINIMAL
                .replace("[identity]", "[limits]\nsweep_intervall = \"1s\"\nbody_timeout = \"soon\"\n\n[identity]")
                .replace(
                    "cooling_off = \"24h\"",
                    "cooling_off = \"a day\"\nwhen_not = true"
                )
                .replace(
                    "mode = \"header\"\nheader = \"x-user-id\"",
                    "mode = \"jwt\"\nalgorithm = \"ES256\"\npublic_key_file = \"/nonexistent/edge.pem\""
                ),
            r#"
[[rules]]
name = "any-key-change"
methods = ["PUT"]
path = "/api/v1/api-keys/{id}"
cooling_off = "1h"
confirm_within = "10m"
summary = "Change API key {id}"

[[rules]]
name = "main-key-change"
methods = ["PUT"]
path = "/api/v1/api-keys/main"
cooling_off = "1h"
confirm_within = "10m"
summary = "Change the main API key"
"#
        );
        let line = |needle: &str| {
            text.lines()
                .position(|l| l.starts_with(needle))
                .map(|i| i + 1)
                .unwrap_or_else(|| panic!("{needle} is in the text"))
        };
        let error = Config::from_toml_str(&text, "gate.toml", &[]).unwrap_err();
        let message = error.message;
        let expected = [
            format!(
                "gate.toml, line {}: `limits.sweep_intervall`: unknown key",
                line("sweep_intervall")
            ),
            format!(
                "gate.toml, line {}: `rules.0.when_not`: unknown key",
                line("when_not")
            ),
            format!(
                "gate.toml, line {}: `limits.body_timeout`:",
                line("body_timeout")
            ),
            format!(
                "gate.toml, line {}: `identity.public_key_file`: cannot read /nonexistent/edge.pem",
                line("public_key_file")
            ),
            "`rules.0`: rule `enable-withdrawals`: cooling_off:".to_string(),
            "`rules.2`: rule `main-key-change` can never match: the earlier rule `any-key-change`"
                .to_string(),
            "(6 problems)".to_string(),
        ];
        for part in expected {
            assert!(message.contains(&part), "missing {part:?} in:\n{message}");
        }
        assert_eq!(message.lines().count(), 7, "{message}");
    }

    #[test]
    fn a_problem_from_the_environment_names_the_variable() {
        let env = vec![(
            "STEPGATE_LIMITS__SWEEP_INTERVAL".to_string(),
            "often".to_string(),
        )];
        let error = Config::from_toml_str(MINIMAL, "gate.toml", &env).unwrap_err();
        assert!(
            error.message.starts_with(
                "environment variable STEPGATE_LIMITS__SWEEP_INTERVAL: `limits.sweep_interval`:"
            ),
            "{}",
            error.message
        );
    }

    #[test]
    fn the_effective_config_redacts_secrets_and_lists_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gate.toml");
        let text = MINIMAL
            .replace(
                "database_url = \"sqlite::memory:\"",
                "database_url = \"postgres://gate:db-password-1@db/gate\"",
            )
            .replace(
                "header = \"x-user-id\"",
                "header = \"x-user-id\"\nhmac_secret = \"file-secret-0123456789abcdef0123456789\"",
            );
        std::fs::write(&path, text).unwrap();
        let env = vec![
            (
                "STEPGATE_ADMIN_TOKEN".to_string(),
                "env-token-0123456789abcdef0123456789".to_string(),
            ),
            (
                "STEPGATE_ADMIN_LISTEN".to_string(),
                "127.0.0.1:8081".to_string(),
            ),
        ];
        let report = effective_report(&path, &env).unwrap();
        for secret in ["db-password-1", "file-secret-", "env-token-"] {
            assert!(!report.contains(secret), "{secret} leaked:\n{report}");
        }
        assert!(report.contains("admin_token = \"<redacted>\""), "{report}");
        assert!(report.contains("hmac_secret = \"<redacted>\""), "{report}");
        assert!(
            report.contains("admin_listen = \"127.0.0.1:8081\""),
            "{report}"
        );
        assert!(
            report.contains("#   STEPGATE_ADMIN_TOKEN -> admin_token"),
            "{report}"
        );
        assert!(
            report.contains("#   STEPGATE_ADMIN_LISTEN -> admin_listen"),
            "{report}"
        );
        // What it prints is itself a config that loads (with the secrets put back).
        assert!(report.contains("[[rules]]"), "{report}");
    }

    #[test]
    fn release_mode_defaults_to_client_and_auto_is_read() {
        let config = Config::from_toml_str(MINIMAL, "t", &[]).expect("loads");
        assert_eq!(config.rules.rules()[0].release, ReleaseMode::Client);
        let env = vec![("STEPGATE_RULES__0__RELEASE".to_string(), "auto".to_string())];
        let config = Config::from_toml_str(MINIMAL, "t", &env).expect("loads");
        assert_eq!(config.rules.rules()[0].release, ReleaseMode::Auto);
        let env = vec![(
            "STEPGATE_RULES__0__RELEASE".to_string(),
            "later".to_string(),
        )];
        let error = Config::from_toml_str(MINIMAL, "t", &env).unwrap_err();
        assert!(error.message.contains("release"), "{}", error.message);
    }

    #[test]
    fn the_approval_key_file_is_read_and_checked_at_load() {
        let without = Config::from_toml_str(MINIMAL, "t", &[]).expect("loads");
        assert!(without.approval.signing_key_pem.is_none());
        assert_eq!(without.approval.token_lifetime, Duration::from_secs(300));

        let dir = tempfile::tempdir().expect("a temporary directory");
        let good = dir.path().join("approval.pem");
        std::fs::write(&good, crate::approval::SigningKey::generate_ed25519_pem()).unwrap();
        let bad = dir.path().join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let with = |path: &std::path::Path| {
            let text = format!(
                "{MINIMAL}\n[approval]\nsigning_key_file = \"{}\"\nkey_id = \"k1\"\ntoken_lifetime = \"2m\"\n",
                path.display()
            );
            Config::from_toml_str(&text, "t", &[])
        };
        let loaded = with(&good).expect("an Ed25519 PKCS#8 key loads");
        assert!(loaded.approval.signing_key_pem.is_some());
        assert_eq!(loaded.approval.key_id.as_deref(), Some("k1"));
        assert_eq!(loaded.approval.token_lifetime, Duration::from_secs(120));
        for path in [bad, dir.path().join("missing.pem")] {
            let error = with(&path).unwrap_err();
            assert!(
                error.message.contains("approval") && error.message.contains("signing_key_file"),
                "{}",
                error.message
            );
        }
    }

    #[test]
    fn minimal_file_loads() {
        let config = Config::from_toml_str(MINIMAL, "test.toml", &[]).expect("valid");
        assert_eq!(config.rules.rules().len(), 1);
        assert_eq!(config.limits.max_body_bytes, 64 * 1024);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = MINIMAL.replace("[identity]", "[identity]\nheadr = \"x\"");
        let error = Config::from_toml_str(&text, "test.toml", &[]).unwrap_err();
        assert!(error.message.contains("headr"), "{}", error.message);
        assert!(error.message.contains("line 12"), "{}", error.message);
    }

    #[test]
    fn environment_overrides_nested_keys_and_rules() {
        let env = vec![
            (
                "STEPGATE_WEBAUTHN__RP_NAME".to_string(),
                "Other".to_string(),
            ),
            (
                "STEPGATE_RULES__0__COOLING_OFF".to_string(),
                "2m".to_string(),
            ),
            (
                "STEPGATE_TEST_POSTGRES_URL".to_string(),
                "ignored".to_string(),
            ),
        ];
        let config = Config::from_toml_str(MINIMAL, "test.toml", &env).expect("valid");
        assert_eq!(config.webauthn.rp_name, "Other");
        assert_eq!(
            config.rules.rules()[0].cooling_off,
            Duration::from_secs(120)
        );
    }

    #[test]
    fn unknown_environment_key_is_refused_by_name() {
        let env = vec![("STEPGATE_LISTN".to_string(), "x".to_string())];
        let error = Config::from_toml_str(MINIMAL, "test.toml", &env).unwrap_err();
        assert!(
            error.message.contains("STEPGATE_LISTN"),
            "{}",
            error.message
        );
        assert!(error.message.contains("listn"), "{}", error.message);
    }

    #[test]
    fn bad_duration_names_the_rule_and_key() {
        let text = MINIMAL.replace("\"24h\"", "\"soon\"");
        let error = Config::from_toml_str(&text, "test.toml", &[]).unwrap_err();
        assert!(
            error.message.contains("enable-withdrawals"),
            "{}",
            error.message
        );
        assert!(error.message.contains("cooling_off"), "{}", error.message);
    }

    #[test]
    fn an_anti_phishing_claim_needs_jwt_identity() {
        let text = format!("{MINIMAL}\n[notifications]\nanti_phishing_claim = \"apc\"\n");
        let error = Config::from_toml_str(&text, "t", &[]).unwrap_err();
        assert!(
            error.message.contains("anti_phishing_claim"),
            "{}",
            error.message
        );
    }

    #[test]
    fn public_url_on_127_0_0_1_is_refused() {
        let text = MINIMAL.replace("http://localhost:8080", "http://127.0.0.1:8080");
        assert!(Config::from_toml_str(&text, "t", &[]).is_err());
    }
}
