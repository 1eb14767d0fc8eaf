//! Which requests the gate holds. A rule names methods, a path template and optional body
//! conditions (any of them); `classify` answers, for one request, "pass through" or "hold under
//! this rule". Route matching is cheap and allocation-free for unprotected requests, so the
//! pass-through path pays almost nothing; only a route that a rule names has its body read.

pub mod form;
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

    /// The same condition for a case-folded body: pointer and expected values folded alike.
    fn folded(&self) -> Result<Self, String> {
        let fold = |v: &Value| json::fold_case(v);
        Ok(Self {
            pointer: self.pointer.to_lowercase(),
            test: match &self.test {
                ConditionTest::Contains(v) => ConditionTest::Contains(fold(v)?),
                ConditionTest::Equals(v) => ConditionTest::Equals(fold(v)?),
                ConditionTest::Exists(b) => ConditionTest::Exists(*b),
            },
        })
    }

    /// The RFC 6901 pointer this condition reads.
    pub fn pointer(&self) -> &str {
        &self.pointer
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

/// Body media types a rule can accept besides JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraMediaType {
    FormUrlEncoded,
}

/// Everything that describes a rule, as the config file gives it.
#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub name: String,
    pub methods: Vec<String>,
    pub path: String,
    pub conditions: Vec<Condition>,
    pub cooling_off: Duration,
    pub confirm_within: Duration,
    pub release_within: Duration,
    pub summary: String,
    /// Match the path ignoring ASCII case, for upstreams that route that way.
    pub case_insensitive: bool,
    /// Evaluate conditions on a body whose keys and string values are lower-cased.
    pub fold_case: bool,
    /// Media types accepted besides JSON.
    pub content_types: Vec<ExtraMediaType>,
}

/// Who forwards a rule's held request once its cooling-off is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReleaseMode {
    /// The client repeats the identical request with `Stepgate-Change` (the default).
    #[default]
    Client,
    /// The gate's background worker forwards the stored request itself, for clients that
    /// cannot repeat it. A client release is still accepted; whichever comes first wins.
    Auto,
}

/// One protected kind of change.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    methods: Vec<Method>,
    path: PathTemplate,
    case_insensitive: bool,
    fold_case: bool,
    content_types: Vec<ExtraMediaType>,
    conditions: Vec<Condition>,
    pub cooling_off: Duration,
    pub confirm_within: Duration,
    /// How long after `release_at` the held request may still be released.
    pub release_within: Duration,
    /// Set from the file's `release` key after [`Rule::new`]; `Client` unless configured.
    pub release: ReleaseMode,
    summary: String,
}

impl Rule {
    pub fn new(spec: RuleSpec) -> Result<Self, String> {
        let name = spec.name;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("name must be letters, digits, - and _".into());
        }
        if spec.methods.is_empty() {
            return Err("methods must name at least one method".into());
        }
        let methods = spec
            .methods
            .iter()
            .map(|m| {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(format!("method `{m}` must be an upper-case HTTP method"));
                }
                Method::from_bytes(m.as_bytes()).map_err(|_| format!("`{m}` is not a method"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let path = PathTemplate::parse(&spec.path)?;
        check_summary(&spec.summary, &path)?;
        let conditions = if spec.fold_case {
            spec.conditions
                .iter()
                .map(Condition::folded)
                .collect::<Result<Vec<_>, _>>()?
        } else {
            spec.conditions
        };
        Ok(Self {
            name,
            methods,
            path,
            case_insensitive: spec.case_insensitive,
            fold_case: spec.fold_case,
            content_types: spec.content_types,
            conditions,
            cooling_off: spec.cooling_off,
            confirm_within: spec.confirm_within,
            release_within: spec.release_within,
            release: ReleaseMode::Client,
            summary: spec.summary,
        })
    }

    /// What the rule looks at in a body, for showing people what a request asks for.
    pub fn conditions(&self) -> &[Condition] {
        &self.conditions
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

    /// Pairs `(earlier, later)` where the later rule can never decide anything: the earlier
    /// one matches every method and path it does and holds every body (no `when`), and the
    /// first matching rule decides. Almost always a mistake in the file's order.
    pub fn unreachable(&self) -> Vec<(&Rule, &Rule)> {
        let mut found = Vec::new();
        for (index, later) in self.rules.iter().enumerate() {
            let shadow = self.rules[..index].iter().find(|earlier| {
                earlier.conditions.is_empty()
                    && later.methods.iter().all(|m| earlier.methods.contains(m))
                    && earlier.path.covers(
                        earlier.case_insensitive,
                        &later.path,
                        later.case_insensitive,
                    )
            });
            if let Some(earlier) = shadow {
                found.push((earlier, later));
            }
        }
        found
    }

    pub fn by_name(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// Whether any rule's path matches, whatever the method.
    pub fn names_path(&self, canonical_path: &str) -> bool {
        self.rules.iter().any(|rule| {
            rule.path
                .matches(canonical_path, rule.case_insensitive)
                .is_some()
        })
    }

    /// The rules one of whose methods is in `methods` and whose path matches, in order. The
    /// caller passes every method the request could be read as (see [`methods_to_match`]).
    /// Empty (and allocation-free) for the unprotected majority of requests.
    pub fn candidates(&self, methods: &[&Method], canonical_path: &str) -> Vec<RouteMatch<'_>> {
        let mut found = Vec::new();
        for rule in &self.rules {
            if !methods.iter().any(|m| rule.methods.contains(m)) {
                continue;
            }
            if let Some(params) = rule.path.matches(canonical_path, rule.case_insensitive) {
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

/// The headers frameworks honour to change a request's method.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Whether the request could be read as another method at all; false for almost every
/// request, which then matches on its own method without allocating.
pub fn may_override_method(
    method: &Method,
    headers: &http::HeaderMap,
    query: Option<&str>,
) -> bool {
    *method == Method::HEAD
        || *method == Method::OPTIONS
        || method.as_str().bytes().any(|b| b.is_ascii_lowercase())
        // One pass over the (few) names present instead of parsing and hashing each override.
        || headers
            .keys()
            .any(|name| METHOD_OVERRIDE_HEADERS.contains(&name.as_str()))
        // Conservative: any escape could spell `_method`, so it takes the careful path too.
        || query.is_some_and(|q| {
            q.contains('%') || q.as_bytes().windows(6).any(|w| w.eq_ignore_ascii_case(b"method"))
        })
}

/// Every method an upstream could read this request as: the request's own, `GET` for `HEAD`
/// and `OPTIONS` (frameworks route them to GET handlers), and any override named in the
/// method-override headers or a `_method` query parameter. Matching on all of them means an
/// override can only add holds, never remove one; the request is forwarded unchanged.
pub fn methods_to_match(
    method: &Method,
    headers: &http::HeaderMap,
    query: Option<&str>,
) -> Vec<Method> {
    let mut methods = vec![method.clone()];
    // Some frameworks upper-case the method (Django, Werkzeug): `put` is their PUT.
    if method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        if let Ok(upper) = Method::from_bytes(method.as_str().to_ascii_uppercase().as_bytes()) {
            methods.push(upper);
        }
    }
    if methods.contains(&Method::HEAD) || methods.contains(&Method::OPTIONS) {
        methods.push(Method::GET);
    }
    let overrides = METHOD_OVERRIDE_HEADERS
        .iter()
        .flat_map(|name| headers.get_all(*name).iter())
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string);
    let from_query = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(name, _)| path::decode_for_display(name).eq_ignore_ascii_case("_method"))
        .map(|(_, value)| path::decode_for_display(value));
    for name in overrides.chain(from_query) {
        for name in name.split(',') {
            if let Ok(m) = Method::from_bytes(name.trim().to_ascii_uppercase().as_bytes()) {
                if !methods.contains(&m) {
                    methods.push(m);
                }
            }
        }
    }
    methods
}

/// The decision for a request whose route some rule names.
pub enum Decision<'a> {
    Hold(RouteMatch<'a>),
    PassThrough,
}

/// Why a protected route's body could not be judged. The client's fault.
#[derive(Debug)]
pub enum BodyError {
    /// Malformed or ambiguous: 400.
    Invalid(String),
    /// A media type or content coding the gate will not judge: 415.
    Unsupported(String),
}

/// The parts of a protected request's body the decision needs.
pub struct BodyView<'a> {
    pub content_type: Option<&'a [u8]>,
    pub content_encoding: Option<&'a [u8]>,
    pub bytes: &'a [u8],
}

/// Decides among route candidates given the buffered body. The body is parsed strictly, once,
/// by the parser its media type names, whenever it is non-empty or a condition needs it; a body
/// that cannot be parsed is refused, never forwarded.
pub fn decide<'a>(
    candidates: Vec<RouteMatch<'a>>,
    body: &BodyView<'_>,
) -> Result<Decision<'a>, BodyError> {
    let needs_parse = !body.bytes.is_empty() || candidates.iter().any(|c| c.rule.needs_body());
    let parsed = if needs_parse {
        Some(parse_body(&candidates, body)?)
    } else {
        None
    };
    let mut folded = None;
    for candidate in candidates {
        let view = match (&parsed, candidate.rule.fold_case) {
            (Some(value), true) => {
                if folded.is_none() {
                    folded = Some(json::fold_case(value).map_err(BodyError::Invalid)?);
                }
                folded.as_ref()
            }
            (value, _) => value.as_ref(),
        };
        if candidate.rule.body_matches(view) {
            return Ok(Decision::Hold(candidate));
        }
    }
    Ok(Decision::PassThrough)
}

fn parse_body(candidates: &[RouteMatch<'_>], body: &BodyView<'_>) -> Result<Value, BodyError> {
    if let Some(coding) = body.content_encoding {
        if !coding.eq_ignore_ascii_case(b"identity") {
            return Err(BodyError::Unsupported(
                "a compressed or encoded body (Content-Encoding) cannot be judged; send it as identity".into(),
            ));
        }
    }
    let content_type = body
        .content_type
        .and_then(|v| std::str::from_utf8(v).ok())
        .ok_or_else(|| {
            BodyError::Unsupported("the request needs a Content-Type: application/json".into())
        })?;
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    for parameter in parts {
        let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        if name.trim().eq_ignore_ascii_case("charset")
            && !value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
        {
            return Err(BodyError::Unsupported(
                "only UTF-8 bodies can be judged".into(),
            ));
        }
    }
    let is_json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if is_json {
        return json::parse_strict(body.bytes).map_err(BodyError::Invalid);
    }
    let form_allowed = candidates.iter().any(|c| {
        c.rule
            .content_types
            .contains(&ExtraMediaType::FormUrlEncoded)
    });
    if essence == "application/x-www-form-urlencoded" && form_allowed {
        return form::parse_form_strict(body.bytes).map_err(BodyError::Invalid);
    }
    Err(BodyError::Unsupported(format!(
        "`{essence}` bodies are not accepted on this route; send application/json"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(conditions: Vec<Condition>) -> RuleSpec {
        RuleSpec {
            name: "enable-withdrawals".into(),
            methods: vec!["PUT".into(), "PATCH".into()],
            path: "/api/v1/api-keys/{key_id}".into(),
            conditions,
            cooling_off: Duration::from_secs(86400),
            confirm_within: Duration::from_secs(600),
            release_within: Duration::from_secs(86400),
            summary: "Enable withdrawals on API key {key_id}".into(),
            case_insensitive: false,
            fold_case: false,
            content_types: vec![],
        }
    }

    fn rule(conditions: Vec<Condition>) -> Rule {
        Rule::new(spec(conditions)).unwrap()
    }

    fn contains_withdraw() -> Condition {
        Condition::new("/permissions", ConditionTest::Contains(json!("withdraw"))).unwrap()
    }

    fn json_body(bytes: &[u8]) -> BodyView<'_> {
        BodyView {
            content_type: Some(b"application/json"),
            content_encoding: None,
            bytes,
        }
    }

    const PATH: &str = "/api/v1/api-keys/k1";

    fn named(name: &str, methods: &[&str], path: &str, conditions: Vec<Condition>) -> Rule {
        Rule::new(RuleSpec {
            name: name.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            path: path.into(),
            summary: "Change something".into(),
            ..spec(conditions)
        })
        .unwrap()
    }

    #[test]
    fn a_later_rule_behind_an_unconditional_broader_one_is_unreachable() {
        let broad = named("broad", &["PUT", "PATCH"], "/api/v1/api-keys/{id}", vec![]);
        let narrow = named("narrow", &["PUT"], "/api/v1/api-keys/main", vec![]);
        let rules = RuleSet::new(vec![broad.clone(), narrow.clone()]).unwrap();
        let found: Vec<(&str, &str)> = rules
            .unreachable()
            .iter()
            .map(|(a, b)| (a.name.as_str(), b.name.as_str()))
            .collect();
        assert_eq!(found, [("broad", "narrow")]);

        // Reachable: the earlier rule has a condition, or matches fewer methods or paths, or
        // comes after.
        let conditional = named(
            "broad",
            &["PUT", "PATCH"],
            "/api/v1/api-keys/{id}",
            vec![contains_withdraw()],
        );
        let post = named("post", &["POST"], "/api/v1/api-keys/main", vec![]);
        let deeper = named("deeper", &["PUT"], "/api/v1/api-keys/{id}/ips", vec![]);
        for set in [
            vec![conditional, narrow.clone()],
            vec![broad.clone(), post],
            vec![broad.clone(), deeper],
            vec![narrow, broad],
        ] {
            assert!(RuleSet::new(set).unwrap().unreachable().is_empty());
        }
    }

    #[test]
    fn conditions_contains_equals_exists() {
        let body = json!({"permissions": ["read", "withdraw"], "label": "my withdraw key", "n": 3});
        assert!(contains_withdraw().holds(&body));
        let label = Condition::new("/label", ConditionTest::Contains(json!("withdraw"))).unwrap();
        assert!(label.holds(&body));
        let n3 = Condition::new("/n", ConditionTest::Equals(json!(3))).unwrap();
        assert!(n3.holds(&body));
        let n3_text = Condition::new("/n", ConditionTest::Equals(json!("3"))).unwrap();
        assert!(!n3_text.holds(&body));
        let no_ip = Condition::new("/ip", ConditionTest::Exists(false)).unwrap();
        assert!(no_ip.holds(&body));
        let ip = Condition::new("/ip", ConditionTest::Exists(true)).unwrap();
        assert!(!ip.holds(&body));
        assert!(!contains_withdraw().holds(&json!({"permissions": ["read"]})));
        assert!(!contains_withdraw().holds(&json!({"permissions": "read,trade"})));
    }

    #[test]
    fn decide_holds_only_matching_bodies() {
        let set = RuleSet::new(vec![rule(vec![contains_withdraw()])]).unwrap();
        let put = [&Method::PUT];
        let withdraw = json_body(br#"{"permissions":["withdraw"]}"#);
        assert!(matches!(
            decide(set.candidates(&put, PATH), &withdraw),
            Ok(Decision::Hold(_))
        ));
        let read = json_body(br#"{"permissions":["read"]}"#);
        assert!(matches!(
            decide(set.candidates(&put, PATH), &read),
            Ok(Decision::PassThrough)
        ));
        let garbage = json_body(b"not json");
        assert!(matches!(
            decide(set.candidates(&put, PATH), &garbage),
            Err(BodyError::Invalid(_))
        ));
        let empty = json_body(b"");
        assert!(matches!(
            decide(set.candidates(&put, PATH), &empty),
            Err(BodyError::Invalid(_))
        ));
        assert!(set.candidates(&[&Method::GET], PATH).is_empty());
    }

    #[test]
    fn media_types_and_codings_are_checked_before_parsing() {
        let set = RuleSet::new(vec![rule(vec![contains_withdraw()])]).unwrap();
        let put = [&Method::PUT];
        let bytes = br#"{"permissions":["withdraw"]}"#;
        for (content_type, content_encoding) in [
            (None, None),
            (Some(&b"text/plain"[..]), None),
            (Some(&b"application/x-www-form-urlencoded"[..]), None),
            (Some(&b"application/json; charset=latin1"[..]), None),
            (Some(&b"application/json"[..]), Some(&b"gzip"[..])),
        ] {
            let view = BodyView {
                content_type,
                content_encoding,
                bytes,
            };
            let decided = decide(set.candidates(&put, PATH), &view);
            assert!(
                matches!(decided, Err(BodyError::Unsupported(_))),
                "{content_type:?}"
            );
        }
        for content_type in [
            &b"application/json; charset=UTF-8"[..],
            b"application/merge-patch+json",
        ] {
            let view = BodyView {
                content_type: Some(content_type),
                content_encoding: Some(b"identity"),
                bytes,
            };
            assert!(matches!(
                decide(set.candidates(&put, PATH), &view),
                Ok(Decision::Hold(_))
            ));
        }
    }

    #[test]
    fn forms_are_judged_only_where_the_rule_lists_them() {
        let mut with_form = spec(vec![contains_withdraw()]);
        with_form.content_types = vec![ExtraMediaType::FormUrlEncoded];
        let set = RuleSet::new(vec![Rule::new(with_form).unwrap()]).unwrap();
        let view = BodyView {
            content_type: Some(b"application/x-www-form-urlencoded"),
            content_encoding: None,
            bytes: b"permissions=read&permissions=withdraw",
        };
        let put = [&Method::PUT];
        assert!(matches!(
            decide(set.candidates(&put, PATH), &view),
            Ok(Decision::Hold(_))
        ));
    }

    #[test]
    fn case_folding_rules_see_through_case_tricks() {
        let mut folding = spec(vec![contains_withdraw()]);
        folding.fold_case = true;
        folding.case_insensitive = true;
        let set = RuleSet::new(vec![Rule::new(folding).unwrap()]).unwrap();
        let put = [&Method::PUT];
        let body = json_body(br#"{"Permissions":["WITHDRAW"]}"#);
        let shouted = "/API/V1/Api-Keys/k1";
        assert!(matches!(
            decide(set.candidates(&put, shouted), &body),
            Ok(Decision::Hold(_))
        ));
        let strict = RuleSet::new(vec![rule(vec![contains_withdraw()])]).unwrap();
        let decided = decide(strict.candidates(&put, PATH), &body);
        assert!(matches!(decided, Ok(Decision::PassThrough)));
        assert!(strict.candidates(&put, "/API/v1/api-keys/k1").is_empty());
    }

    #[test]
    fn method_overrides_and_head_add_methods_to_match() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "x-http-method-override",
            http::HeaderValue::from_static("put"),
        );
        assert!(may_override_method(&Method::POST, &headers, None));
        let methods = methods_to_match(&Method::POST, &headers, None);
        assert_eq!(methods, vec![Method::POST, Method::PUT]);
        let none = http::HeaderMap::new();
        let query = Some("a=1&%5Fmethod=PATCH");
        assert!(may_override_method(&Method::POST, &none, query));
        assert_eq!(
            methods_to_match(&Method::POST, &none, query),
            vec![Method::POST, Method::PATCH]
        );
        assert_eq!(
            methods_to_match(&Method::HEAD, &none, None),
            vec![Method::HEAD, Method::GET]
        );
        assert!(!may_override_method(&Method::PUT, &none, Some("a=1")));
    }

    #[test]
    fn summary_is_filled_and_sanitized() {
        let r = rule(vec![]);
        let s = r.summary_for(&[("key_id".into(), "k1%E2%80%AEevil".into())]);
        assert_eq!(s, "Enable withdrawals on API key k1\u{FFFD}evil");
    }

    #[test]
    fn summary_placeholders_must_exist() {
        let mut bad = spec(vec![]);
        bad.path = "/a/{id}".into();
        bad.summary = "Change {key}".into();
        let err = Rule::new(bad).unwrap_err();
        assert!(err.contains("{key}"), "{err}");
    }
}
