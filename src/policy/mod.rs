//! Which requests the gate holds. A rule names methods, a path template and optional body
//! conditions (any of them); `classify` answers, for one request, "pass through" or "hold under
//! this rule". Route matching is cheap and allocation-free for unprotected requests, so the
//! pass-through path pays almost nothing; only a route that a rule names has its body read.

pub mod json;
pub mod path;

use std::time::Duration;

use http::Method;
use serde_json::Value;

pub use path::{canonical_path, PathError, PathTemplate};

/// What a condition checks at its JSON pointer.
#[derive(Debug, Clone)]
pub enum ConditionTest {
    /// An array element equal to the value, or (for a string value) a substring of a string.
    Contains(Value),
    Equals(Value),
    /// Whether the pointer resolves at all.
    Exists(bool),
}

#[derive(Debug, Clone)]
pub struct Condition {
    pointer: String,
    test: ConditionTest,
}

impl Condition {
    pub fn new(pointer: &str, test: ConditionTest) -> Result<Self, String> {
        if !(pointer.is_empty() || pointer.starts_with('/')) {
            return Err(format!(
                "pointer `{pointer}` must be empty or start with / (RFC 6901)"
            ));
        }
        Ok(Self {
            pointer: pointer.to_string(),
            test,
        })
    }

    pub fn holds(&self, body: &Value) -> bool {
        let target = body.pointer(&self.pointer);
        match (&self.test, target) {
            (ConditionTest::Exists(expected), target) => target.is_some() == *expected,
            (_, None) => false,
            (ConditionTest::Equals(expected), Some(found)) => found == expected,
            (ConditionTest::Contains(needle), Some(Value::Array(items))) => {
                items.iter().any(|item| item == needle)
            }
            (ConditionTest::Contains(Value::String(needle)), Some(Value::String(haystack))) => {
                haystack.contains(needle.as_str())
            }
            (ConditionTest::Contains(_), Some(_)) => false,
        }
    }
}

/// One protected kind of change.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    methods: Vec<Method>,
    path: PathTemplate,
    conditions: Vec<Condition>,
    pub cooling_off: Duration,
    pub confirm_within: Duration,
    /// How long after `release_at` the held request may still be released.
    pub release_within: Duration,
    summary: String,
}

impl Rule {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        methods: &[String],
        path: &str,
        conditions: Vec<Condition>,
        cooling_off: Duration,
        confirm_within: Duration,
        release_within: Duration,
        summary: String,
    ) -> Result<Self, String> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("name must be letters, digits, - and _".into());
        }
        if methods.is_empty() {
            return Err("methods must name at least one method".into());
        }
        let methods = methods
            .iter()
            .map(|m| {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(format!("method `{m}` must be an upper-case HTTP method"));
                }
                Method::from_bytes(m.as_bytes()).map_err(|_| format!("`{m}` is not a method"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let path = PathTemplate::parse(path)?;
        check_summary(&summary, &path)?;
        Ok(Self {
            name,
            methods,
            path,
            conditions,
            cooling_off,
            confirm_within,
            release_within,
            summary,
        })
    }

    /// True when the decision depends on the body.
    pub fn needs_body(&self) -> bool {
        !self.conditions.is_empty()
    }

    /// Whether this body is one the rule protects (any condition holds; no conditions: all).
    pub fn body_matches(&self, body: Option<&Value>) -> bool {
        if self.conditions.is_empty() {
            return true;
        }
        body.is_some_and(|body| self.conditions.iter().any(|c| c.holds(body)))
    }

    /// The plain-words summary with the placeholders filled from the request's path. Values
    /// are decoded for display and stripped of control and bidirectional-override characters,
    /// so a crafted key id cannot disguise what the user is confirming.
    pub fn summary_for(&self, params: &[(String, String)]) -> String {
        let mut out = self.summary.clone();
        for (name, value) in params {
            let shown = sanitize_for_display(&path::decode_for_display(value));
            out = out.replace(&format!("{{{name}}}"), &shown);
        }
        out
    }
}

fn check_summary(summary: &str, path: &PathTemplate) -> Result<(), String> {
    if summary.trim().is_empty() {
        return Err("summary must say in plain words what changes".into());
    }
    let names: Vec<&str> = path.param_names().collect();
    let mut rest = summary;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| "summary has an unclosed {".to_string())?;
        let name = &after[..end];
        if !names.contains(&name) {
            return Err(format!(
                "summary names `{{{name}}}`, which the path does not have"
            ));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// Replaces characters that can hide or reorder text on screen.
pub fn sanitize_for_display(text: &str) -> String {
    text.chars()
        .map(|c| {
            let bidi_or_invisible = matches!(c,
                '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}');
            if c.is_control() || bidi_or_invisible {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect()
}

/// A rule whose method and path match a request, with the path's placeholder values.
#[derive(Debug)]
pub struct RouteMatch<'a> {
    pub rule: &'a Rule,
    pub params: Vec<(String, String)>,
}

/// All rules, in file order: the first rule that matches a request decides.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> Result<Self, String> {
        for (i, rule) in rules.iter().enumerate() {
            if rules[..i].iter().any(|r| r.name == rule.name) {
                return Err(format!("two rules are named `{}`", rule.name));
            }
        }
        Ok(Self { rules })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn by_name(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// The rules whose method and path match, in order. Empty (and allocation-free) for the
    /// unprotected majority of requests.
    pub fn candidates(&self, method: &Method, canonical_path: &str) -> Vec<RouteMatch<'_>> {
        let mut found = Vec::new();
        for rule in &self.rules {
            if !rule.methods.contains(method) {
                continue;
            }
            if let Some(params) = rule.path.matches(canonical_path) {
                found.push(RouteMatch {
                    rule,
                    params: params
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                });
            }
        }
        found
    }
}

/// The decision for a request whose route some rule names.
pub enum Decision<'a> {
    Hold(RouteMatch<'a>),
    PassThrough,
}

/// Why a protected route's body could not be judged. The client's fault: 400.
#[derive(Debug)]
pub struct BodyError(pub String);

/// Decides among route candidates given the buffered body. The body is parsed strictly, once,
/// and only when some candidate's conditions need it; a body that cannot be parsed is refused,
/// never forwarded.
pub fn decide<'a>(candidates: Vec<RouteMatch<'a>>, body: &[u8]) -> Result<Decision<'a>, BodyError> {
    let parsed = if candidates.iter().any(|c| c.rule.needs_body()) {
        Some(json::parse_strict(body).map_err(BodyError)?)
    } else {
        None
    };
    for candidate in candidates {
        if candidate.rule.body_matches(parsed.as_ref()) {
            return Ok(Decision::Hold(candidate));
        }
    }
    Ok(Decision::PassThrough)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(conditions: Vec<Condition>) -> Rule {
        Rule::new(
            "enable-withdrawals".into(),
            &["PUT".into(), "PATCH".into()],
            "/api/v1/api-keys/{key_id}",
            conditions,
            Duration::from_secs(86400),
            Duration::from_secs(600),
            Duration::from_secs(86400),
            "Enable withdrawals on API key {key_id}".into(),
        )
        .unwrap()
    }

    fn contains_withdraw() -> Condition {
        Condition::new("/permissions", ConditionTest::Contains(json!("withdraw"))).unwrap()
    }

    #[test]
    fn conditions_contains_equals_exists() {
        let body = json!({"permissions": ["read", "withdraw"], "label": "my withdraw key", "n": 3});
        assert!(contains_withdraw().holds(&body));
        assert!(
            Condition::new("/label", ConditionTest::Contains(json!("withdraw")))
                .unwrap()
                .holds(&body)
        );
        assert!(Condition::new("/n", ConditionTest::Equals(json!(3)))
            .unwrap()
            .holds(&body));
        assert!(!Condition::new("/n", ConditionTest::Equals(json!("3")))
            .unwrap()
            .holds(&body));
        assert!(Condition::new("/ip", ConditionTest::Exists(false))
            .unwrap()
            .holds(&body));
        assert!(!Condition::new("/ip", ConditionTest::Exists(true))
            .unwrap()
            .holds(&body));
        assert!(!contains_withdraw().holds(&json!({"permissions": ["read"]})));
        assert!(!contains_withdraw().holds(&json!({"permissions": "read,trade"})));
    }

    #[test]
    fn decide_holds_only_matching_bodies() {
        let set = RuleSet::new(vec![rule(vec![contains_withdraw()])]).unwrap();
        let method = Method::PUT;
        let held = decide(
            set.candidates(&method, "/api/v1/api-keys/k1"),
            br#"{"permissions":["withdraw"]}"#,
        )
        .unwrap();
        assert!(matches!(held, Decision::Hold(_)));
        let passed = decide(
            set.candidates(&method, "/api/v1/api-keys/k1"),
            br#"{"permissions":["read"]}"#,
        )
        .unwrap();
        assert!(matches!(passed, Decision::PassThrough));
        assert!(decide(set.candidates(&method, "/api/v1/api-keys/k1"), b"not json").is_err());
        assert!(set
            .candidates(&Method::GET, "/api/v1/api-keys/k1")
            .is_empty());
    }

    #[test]
    fn summary_is_filled_and_sanitized() {
        let r = rule(vec![]);
        let s = r.summary_for(&[("key_id".into(), "k1%E2%80%AEevil".into())]);
        assert_eq!(s, "Enable withdrawals on API key k1\u{FFFD}evil");
    }

    #[test]
    fn summary_placeholders_must_exist() {
        let err = Rule::new(
            "r".into(),
            &["PUT".into()],
            "/a/{id}",
            vec![],
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::from_secs(1),
            "Change {key}".into(),
        )
        .unwrap_err();
        assert!(err.contains("{key}"), "{err}");
    }
}
