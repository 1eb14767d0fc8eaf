//! Property tests on the classifier (`stepgate::policy`), the claim behind every path row:
//! whatever an upstream reads as a protected route is never a silent pass-through. The
//! tables check the spellings someone published; these check the ones nobody has thought of
//! yet, drawn from a hostile alphabet.
//!
//! The upstream is modelled as the most liberal reader we know of: it percent-decodes
//! everything once, reads `\` as `/`, cuts `;parameters` off each segment, drops empty and `.`
//! segments and resolves `..`, then routes with the rule's own case sensitivity. For any path
//! that reader lands on a protected route, `canonical_path` must refuse the path, or return one
//! that `RuleSet::candidates` matches, so the gate reads the body and decides.
//!
//! The strict JSON reader gets the same treatment for duplicate keys: a generated document
//! with one key repeated, at any depth and in any spelling of the key, is never accepted.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{Map, Value};
use stepgate::policy::json::parse_strict;
use stepgate::policy::{
    canonical_path, methods_to_match, Condition, ConditionTest, Rule, RuleSet, RuleSpec,
};

use crate::fuzz_checks::check_canonical_path;

/// The protected routes of the tables (rules A, B and D), as the policy sees them.
fn rules() -> RuleSet {
    let rule = |name: &str, methods: &[&str], path: &str, case_insensitive: bool| {
        Rule::new(RuleSpec {
            name: name.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            path: path.into(),
            conditions: vec![Condition::new(
                "/permissions",
                ConditionTest::Contains(Value::from("withdraw")),
            )
            .expect("a valid pointer")],
            cooling_off: Duration::from_secs(3600),
            confirm_within: Duration::from_secs(600),
            release_within: Duration::from_secs(3600),
            summary: "A protected change".into(),
            case_insensitive,
            fold_case: case_insensitive,
            content_types: vec![],
        })
        .expect("a valid rule")
    };
    RuleSet::new(vec![
        rule("a", &["PUT", "PATCH"], "/api/v1/api-keys/{key_id}", false),
        rule("b", &["PUT", "PATCH"], "/api/v2/keys/{key_id}", true),
        rule("d", &["GET"], "/api/v1/withdrawal-addresses/export", false),
    ])
    .expect("a valid rule set")
}

/// The liberal upstream's reading of `raw`, as segments.
fn upstream_reading(raw: &str) -> Vec<String> {
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    let text = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut segments: Vec<String> = Vec::new();
    for segment in text.split('/') {
        let segment = segment.split(';').next().unwrap_or_default();
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other.to_string()),
        }
    }
    segments
}

/// Whether the liberal upstream routes `segments` to one of the protected routes.
fn upstream_protects(segments: &[String]) -> bool {
    let same = |a: &str, b: &str, fold: bool| {
        if fold {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    };
    let route = |template: &[&str], fold: bool| {
        segments.len() == template.len()
            && template
                .iter()
                .zip(segments)
                .all(|(t, s)| *t == "*" || same(t, s, fold))
    };
    route(&["api", "v1", "api-keys", "*"], false)
        || route(&["api", "v2", "keys", "*"], true)
        || route(&["api", "v1", "withdrawal-addresses", "export"], false)
}

/// Pieces attackers splice paths from.
fn token() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "/",
        "//",
        ".",
        "..",
        "/./",
        "/../",
        "%2F",
        "%2f",
        "%2e",
        "%2E",
        "%2e%2e",
        ";",
        ";x=1",
        "..;",
        "\\",
        "%5C",
        "%61",
        "%41",
        "%3B",
        "%00",
        "a",
        "A",
        "x",
        "api",
        "API",
        "v1",
        "v2",
        "api-keys",
        "keys",
        "KEYS",
        "k1",
        "withdrawal-addresses",
        "export",
    ])
}

/// A path from random tokens.
fn spliced_path() -> impl Strategy<Value = String> {
    prop::collection::vec(token(), 0..14).prop_map(|parts| format!("/{}", parts.concat()))
}

/// One spelling of a segment: as is, some letters percent-encoded (either hex case), or with
/// its case changed.
fn respell(segment: &'static str) -> impl Strategy<Value = String> {
    (any::<u64>(), 0..4u8).prop_map(move |(bits, how)| {
        segment
            .chars()
            .enumerate()
            .map(|(i, c)| {
                let chosen = bits >> (i % 64) & 1 == 1;
                match how {
                    1 if chosen => format!("%{:02X}", c as u32),
                    2 if chosen => format!("%{:02x}", c as u32),
                    3 if chosen => c.to_ascii_uppercase().to_string(),
                    _ => c.to_string(),
                }
            })
            .collect()
    })
}

/// What goes between two segments of a protected path: a plain slash, or a detour that a
/// liberal reader collapses back into one.
fn separator() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "/",
        "/",
        "/",
        "//",
        "/./",
        "/x/../",
        "%2F",
        "%2f",
        "\\",
        "%5C",
        "/%2e/",
        "/x/%2e%2e/",
        "/x/.%2E/",
        ";p=1/",
        "/x/..;/",
        "%3Bx/",
    ])
}

/// A protected path, each segment re-spelled and each separator possibly a detour, with a
/// suffix a liberal reader ignores.
fn disguised_protected_path() -> impl Strategy<Value = String> {
    let routes: Vec<&'static [&'static str]> = vec![
        &["api", "v1", "api-keys", "k1"],
        &["api", "v2", "keys", "k1"],
        &["api", "v1", "withdrawal-addresses", "export"],
    ];
    prop::sample::select(routes).prop_flat_map(|route| {
        let segments: Vec<_> = route.iter().map(|s| respell(s)).collect();
        let separators = prop::collection::vec(separator(), route.len());
        let suffix =
            prop::sample::select(vec!["", "/", "//", "/.", ";jsessionid=1", "%3Bx", "/x/.."]);
        (segments, separators, suffix).prop_map(|(segments, separators, suffix)| {
            let mut path = String::new();
            for (separator, segment) in separators.iter().zip(&segments) {
                path.push_str(separator);
                path.push_str(segment);
            }
            // A detour as the very first separator must still start the target with `/`.
            if !path.starts_with('/') {
                path.insert(0, '/');
            }
            path.push_str(suffix);
            path
        })
    })
}

fn never_a_silent_pass_through(rules: &RuleSet, raw: &str) -> Result<(), TestCaseError> {
    check_canonical_path(raw.as_bytes());
    let reading = upstream_reading(raw);
    if !upstream_protects(&reading) {
        return Ok(());
    }
    match canonical_path(raw) {
        Err(_) => Ok(()),
        Ok(canonical) => {
            let methods = [&Method::PUT, &Method::GET];
            prop_assert!(
                !rules.candidates(&methods, &canonical).is_empty(),
                "the upstream reads {raw:?} as /{} (protected), but the gate forwards it as \
                 {canonical:?} without a rule matching",
                reading.join("/")
            );
            Ok(())
        }
    }
}

/// Cases per property, and where shrunk failures are kept
/// (`tests/bypass/classifier_props.proptest-regressions`) so that a failure found once is replayed first on every later run, not left to chance.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn spliced_paths_the_upstream_protects_are_never_passed_through(raw in spliced_path()) {
        never_a_silent_pass_through(&rules(), &raw)?;
    }

    #[test]
    fn disguised_protected_paths_are_refused_or_matched(raw in disguised_protected_path()) {
        never_a_silent_pass_through(&rules(), &raw)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Strict JSON: duplicate keys at any depth.

fn json_value() -> impl Strategy<Value = Value> {
    let key = prop::sample::select(vec!["a", "b", "permissions", "Permissions", "é", "💩", ""]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-z\u{e9}\u{1F4A9}\"\\\\]{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..5).prop_map(|pairs| {
                Value::Object(
                    pairs
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

/// A JSON string literal for `key`, every character as a `\u` escape when `escaped` (so the
/// duplicate is spelled differently from the original).
fn key_literal(key: &str, escaped: bool) -> String {
    if !escaped {
        return serde_json::to_string(key).expect("a string serialises");
    }
    let units: String = key.encode_utf16().map(|u| format!("\\u{u:04x}")).collect();
    format!("\"{units}\"")
}

/// Serialises `value`, repeating one key of the `target`-th non-empty object (pre-order,
/// modulo how many there are). Returns false when there was no non-empty object to pick.
fn write_with_duplicate(
    value: &Value,
    target: usize,
    escaped: bool,
    seen: &mut usize,
    total: usize,
    out: &mut String,
) -> bool {
    match value {
        Value::Array(items) => {
            out.push('[');
            let mut injected = false;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                injected |= write_with_duplicate(item, target, escaped, seen, total, out);
            }
            out.push(']');
            injected
        }
        Value::Object(fields) if !fields.is_empty() => {
            let here = *seen == target % total.max(1);
            *seen += 1;
            out.push('{');
            let mut injected = here;
            for (i, (key, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&key_literal(key, false));
                out.push(':');
                injected |= write_with_duplicate(item, target, escaped, seen, total, out);
            }
            if here {
                let (key, item) = fields.iter().next().expect("a non-empty object");
                out.push(',');
                out.push_str(&key_literal(key, escaped));
                out.push(':');
                out.push_str(&serde_json::to_string(item).expect("a value serialises"));
            }
            out.push('}');
            injected
        }
        other => {
            out.push_str(&serde_json::to_string(other).expect("a value serialises"));
            false
        }
    }
}

fn non_empty_objects(value: &Value) -> usize {
    match value {
        Value::Array(items) => items.iter().map(non_empty_objects).sum(),
        Value::Object(fields) => {
            usize::from(!fields.is_empty()) + fields.values().map(non_empty_objects).sum::<usize>()
        }
        _ => 0,
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// The control: a document without duplicates is read back as itself.
    #[test]
    fn strict_json_reads_documents_without_duplicates(value in json_value()) {
        let text = serde_json::to_vec(&value).expect("a value serialises");
        prop_assert_eq!(parse_strict(&text).ok(), Some(value));
    }

    #[test]
    fn strict_json_never_accepts_a_duplicate_key(
        value in json_value(),
        target in any::<usize>(),
        escaped in any::<bool>(),
    ) {
        let total = non_empty_objects(&value);
        let mut text = String::new();
        let injected = write_with_duplicate(&value, target, escaped, &mut 0, total, &mut text);
        if !injected {
            // No object to repeat a key in: wrap the document in one that does.
            text = format!("{{\"k\":{text},{}:0}}", key_literal("k", escaped));
        }
        prop_assert!(
            parse_strict(text.as_bytes()).is_err(),
            "a duplicate key was accepted: {}", text
        );
    }

    /// Overrides only add methods: the request's own method is always matched, first.
    #[test]
    fn method_overrides_never_remove_the_real_method(
        method in prop::sample::select(vec!["GET", "PUT", "PATCH", "POST", "HEAD", "OPTIONS", "DELETE"]),
        header in prop::sample::select(vec!["x-http-method-override", "x-http-method", "x-method-override"]),
        value in "[A-Za-z ,]{0,12}",
        query in "(_method=[A-Za-z]{0,6}&?){0,2}",
    ) {
        let method = Method::from_bytes(method.as_bytes()).expect("a method");
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(header, value);
        }
        let methods = methods_to_match(&method, &headers, Some(&query));
        prop_assert_eq!(methods.first(), Some(&method));
    }
}
