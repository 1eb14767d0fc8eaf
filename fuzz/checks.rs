//! What the fuzz targets assert, in one place: the `cargo fuzz` targets call these on every
//! input libFuzzer makes, and the `bypass` test binary calls them on the seed corpus
//! (`fuzz/seeds/`), so CI checks the same properties on stable Rust without libFuzzer.
//!
//! A violated property panics, which libFuzzer reports as a crash with the input saved.

use serde_json::Value;
use stepgate::policy::canonical_path;
use stepgate::policy::form::parse_form_strict;
use stepgate::policy::json::{fold_case, parse_strict};

/// `canonical_path` on arbitrary bytes: never panics; what it accepts keeps its meaning (it
/// decodes to the same bytes), is a fixed point (the canonical form of a canonical path is
/// itself, so the gate forwards what it matched) and holds none of the spellings the gate
/// promises to refuse.
pub fn check_canonical_path(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(canonical) = canonical_path(raw) else {
        return;
    };
    let canonical = canonical.into_owned();
    // Canonicalising changes spelling, never meaning: both decode to the same bytes.
    assert_eq!(
        percent_decode(canonical.as_bytes()),
        percent_decode(raw.as_bytes()),
        "canonical {canonical:?} means another path than {raw:?}"
    );
    let again = canonical_path(&canonical)
        .unwrap_or_else(|e| panic!("canonical {canonical:?} (of {raw:?}) is refused: {e}"));
    assert_eq!(
        again, canonical,
        "canonical_path is not idempotent on {raw:?}"
    );
    assert!(
        canonical.starts_with('/'),
        "{canonical:?} is not origin-form"
    );
    for forbidden in ["//", ";", "\\"] {
        assert!(
            !canonical.contains(forbidden),
            "{canonical:?} (of {raw:?}) contains {forbidden:?}"
        );
    }
    let upper = canonical.to_ascii_uppercase();
    for forbidden in ["%2F", "%5C", "%00", "%2E"] {
        assert!(
            !upper.contains(forbidden),
            "{canonical:?} (of {raw:?}) contains {forbidden}"
        );
    }
    // A single trailing slash is kept; no segment before it may be a dot segment.
    let body = canonical.strip_suffix('/').unwrap_or(&canonical);
    for segment in body.split('/').skip(1) {
        assert!(
            segment != "." && segment != "..",
            "{canonical:?} (of {raw:?}) has a dot segment"
        );
    }
    // Every escape left is upper-case hex naming a byte that is not unreserved (those are
    // decoded), so two spellings of one path canonicalise alike.
    let bytes = canonical.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b != b'%' {
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).expect("an escape has two digits");
        assert!(
            hex.iter()
                .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)),
            "{canonical:?}: escape not in upper-case hex"
        );
        let text = std::str::from_utf8(hex).expect("hex digits are ASCII");
        let byte = u8::from_str_radix(text, 16).expect("hex digits parse");
        assert!(
            !(byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)),
            "{canonical:?}: unreserved byte {byte:#04x} left encoded"
        );
    }
}

/// Every `%XX` escape decoded (the input is known to have only well-formed escapes).
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], escaped) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

/// The strict body readers on arbitrary bytes: never panic; accepted JSON re-serialises to a
/// document that is accepted again and equal; accepted forms re-encode to a form that parses
/// to the same object; case folding never panics.
pub fn check_strict_body(data: &[u8]) {
    if let Ok(value) = parse_strict(data) {
        let text = serde_json::to_vec(&value).expect("a parsed value serialises");
        let again = parse_strict(&text).unwrap_or_else(|e| {
            panic!(
                "re-serialised JSON is refused ({e}): {}",
                String::from_utf8_lossy(&text)
            )
        });
        assert!(
            same_json(&value, &again),
            "JSON changed across a round trip: {value} vs {again}"
        );
        let _ = fold_case(&value);
    }
    if let Ok(form) = parse_form_strict(data) {
        let text = encode_form(&form);
        let again = parse_form_strict(text.as_bytes())
            .unwrap_or_else(|e| panic!("re-encoded form {text:?} is refused: {e}"));
        assert_eq!(form, again, "form changed across a round trip via {text:?}");
    }
}

/// Equality that allows a float to move by a unit in the last place: serde_json's default
/// float parser is not guaranteed to round-trip exactly (without its `float_roundtrip`
/// feature), and that is not the property under test. Counted in ULPs, not relatively, so
/// subnormals compare right too.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            _ if x == y => true,
            (Some(x), Some(y)) => {
                x.is_sign_positive() == y.is_sign_positive()
                    && x.to_bits().abs_diff(y.to_bits()) <= 2
            }
            _ => false,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// A form object back to `application/x-www-form-urlencoded`, every byte but the unreserved
/// ones escaped; an array becomes the repeated field it came from.
fn encode_form(form: &Value) -> String {
    let escape = |text: &str| -> String {
        text.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    let mut pairs = Vec::new();
    if let Value::Object(fields) = form {
        for (name, value) in fields {
            let values = match value {
                Value::Array(items) => items.iter().collect(),
                other => vec![other],
            };
            for value in values {
                pairs.push(format!(
                    "{}={}",
                    escape(name),
                    escape(value.as_str().unwrap_or_default())
                ));
            }
        }
    }
    pairs.join("&")
}
