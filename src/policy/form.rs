//! The strict reader for `application/x-www-form-urlencoded` bodies, for rules that list that
//! type. It turns a form into a JSON object so the same conditions apply. Anything frameworks
//! read differently is refused: bracket names (`permissions[]=` is an array to Rails and PHP,
//! a plain key to others), malformed escapes, and names that repeat with mixed forms.

use serde_json::{Map, Value};

/// Parses `a=1&b=2&b=3` into `{"a":"1","b":["2","3"]}`. A name that repeats always becomes an
/// array, whichever way the upstream reads it, so a condition on it sees every value.
pub fn parse_form_strict(bytes: &[u8]) -> Result<Value, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the form is not UTF-8".to_string())?;
    let mut object = Map::new();
    if text.is_empty() {
        return Ok(Value::Object(object));
    }
    for pair in text.split('&') {
        if pair.is_empty() {
            return Err("the form has an empty field (&&)".into());
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name)?;
        let value = decode(value)?;
        if name.is_empty() {
            return Err("the form has a field without a name".into());
        }
        if name.contains(['[', ']', '.']) {
            return Err(format!(
                "the form field `{name}` uses brackets or dots, which frameworks read differently"
            ));
        }
        match object.get_mut(&name) {
            None => {
                object.insert(name, Value::String(value));
            }
            Some(Value::Array(values)) => values.push(Value::String(value)),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, Value::String(value)]);
            }
        }
    }
    Ok(Value::Object(object))
}

fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| "the form has a malformed %-escape".to_string())?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    let decoded =
        String::from_utf8(out).map_err(|_| "the form decodes to invalid UTF-8".to_string())?;
    if decoded.contains('\0') {
        return Err("the form contains NUL".into());
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn forms_become_objects_and_repeats_become_arrays() {
        assert_eq!(
            parse_form_strict(b"label=my+key&permissions=read&permissions=withdraw").unwrap(),
            json!({"label": "my key", "permissions": ["read", "withdraw"]})
        );
        assert_eq!(
            parse_form_strict(b"a=%77ithdraw").unwrap(),
            json!({"a": "withdraw"})
        );
    }

    #[test]
    fn ambiguous_forms_are_refused() {
        for body in [
            &b"permissions[]=withdraw"[..],
            b"a.b=1",
            b"a=%zz",
            b"a=1&&b=2",
            b"=x",
            b"a=%00",
            b"a=\xff",
        ] {
            assert!(
                parse_form_strict(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
