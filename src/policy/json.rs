//! The one strict JSON reader for protected-route bodies. Where lenient parsers disagree
//! (duplicate keys: first or last wins?), the gate and the upstream could read two different
//! bodies, so such input is refused instead of interpreted.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// How deep objects and arrays may nest before the body is refused.
pub const MAX_DEPTH: usize = 64;

/// Parses `bytes` as one JSON document: no byte-order mark, no duplicate keys, no trailing
/// data, valid UTF-8, nesting at most [`MAX_DEPTH`].
pub fn parse_strict(bytes: &[u8]) -> Result<Value, String> {
    if bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
        return Err("the body starts with a byte-order mark".into());
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = StrictValue { depth: 0 }
        .deserialize(&mut deserializer)
        .map_err(|e| e.to_string())?;
    deserializer.end().map_err(|e| e.to_string())?;
    Ok(value)
}

struct StrictValue {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let depth = self.nested::<A::Error>()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(StrictValue { depth })? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let depth = self.nested::<A::Error>()?;
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key `{key}`")));
            }
            let value = map.next_value_seed(StrictValue { depth })?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

impl StrictValue {
    fn nested<E: de::Error>(&self) -> Result<usize, E> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(E::custom(format!("nesting deeper than {MAX_DEPTH}")));
        }
        Ok(depth)
    }
}

/// Lower-cases every object key and string value (Unicode case folding by `to_lowercase`), for
/// rules whose upstream ignores case. Two keys that fold to the same text are refused: which
/// one the upstream would use is anybody's guess.
pub fn fold_case(value: &Value) -> Result<Value, String> {
    Ok(match value {
        Value::String(text) => Value::String(text.to_lowercase()),
        Value::Array(items) => Value::Array(items.iter().map(fold_case).collect::<Result<_, _>>()?),
        Value::Object(object) => {
            let mut folded = Map::new();
            for (key, item) in object {
                let key = key.to_lowercase();
                if folded.contains_key(&key) {
                    return Err(format!("keys that differ only in case (`{key}`)"));
                }
                folded.insert(key, fold_case(item)?);
            }
            Value::Object(folded)
        }
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_json() {
        let v = parse_strict(br#"{"permissions":["read","withdraw"],"n":1.5}"#).unwrap();
        assert_eq!(v["permissions"][1], "withdraw");
    }

    #[test]
    fn refuses_what_parsers_read_differently() {
        for body in [
            &br#"{"permissions":["read"],"permissions":["withdraw"]}"#[..],
            &b"\xEF\xBB\xBF{}"[..],
            &br#"{"a":1} {"a":2}"#[..],
            &b"{\"a\":\"\xff\"}"[..],
            &br#"{"a":"#[..],
            &b""[..],
        ] {
            assert!(
                parse_strict(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(parse_strict(deep.as_bytes()).is_err());
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse_strict(ok.as_bytes()).is_ok());
    }

    #[test]
    fn folding_lowercases_keys_and_strings_and_refuses_case_twins() {
        let v = parse_strict(r#"{"Permissions":["WITHDRAW","Read"],"n":1}"#.as_bytes()).unwrap();
        assert_eq!(
            fold_case(&v).unwrap(),
            serde_json::json!({"permissions":["withdraw","read"],"n":1})
        );
        let twins = parse_strict(br#"{"permissions":[],"Permissions":["withdraw"]}"#).unwrap();
        assert!(fold_case(&twins).is_err());
    }
}
