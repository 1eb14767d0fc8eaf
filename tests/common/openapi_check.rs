//! Checks real answers against the gate's own OpenAPI document: the operation must document
//! the status it answered, and the body must fit that status's schema. The schema checker
//! covers what the document uses (`$ref`, `allOf`, `anyOf`, `type`, `required`, `properties`,
//! `additionalProperties: false`, `items`, `enum`, `const`, and the `uuid`/`date-time`
//! formats), so an answer that gains, loses or retypes a property fails the test that saw it.

#![allow(dead_code)]

use serde_json::Value;

/// The document as the gate serves it.
pub struct OpenApi {
    document: Value,
}

impl OpenApi {
    pub fn new(document: Value) -> Self {
        Self { document }
    }

    pub fn document(&self) -> &Value {
        &self.document
    }

    /// The schema of `method template`'s JSON answer with `status`; panics when the document
    /// does not describe that status for that operation.
    pub fn response_schema(&self, method: &str, template: &str, status: u16) -> Value {
        let operation = &self.document["paths"][template][method.to_ascii_lowercase()];
        assert!(
            operation.is_object(),
            "the OpenAPI document has no operation {method} {template}"
        );
        self.schema_of(operation, &format!("{method} {template}"), status)
    }

    /// The schema of a protected request's answer with `status` (the hold answer and the
    /// release refusals), from `components.pathItems.ProtectedRequest`.
    pub fn protected_schema(&self, method: &str, status: u16) -> Value {
        let operation = &self.document["components"]["pathItems"]["ProtectedRequest"]
            [method.to_ascii_lowercase()];
        assert!(
            operation.is_object(),
            "ProtectedRequest documents no {method}"
        );
        self.schema_of(operation, &format!("protected {method}"), status)
    }

    fn schema_of(&self, operation: &Value, what: &str, status: u16) -> Value {
        let response = &operation["responses"][status.to_string()];
        assert!(
            response.is_object(),
            "{what}: the document does not describe status {status}; it lists {:?}",
            operation["responses"]
                .as_object()
                .map(|r| r.keys().cloned().collect::<Vec<_>>())
        );
        let schema = &response["content"]["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{what} {status}: no application/json schema"
        );
        schema.clone()
    }

    /// Asserts that `value` fits `schema`, naming every mismatch.
    pub fn assert_fits(&self, schema: &Value, value: &Value, what: &str) {
        let mut problems = Vec::new();
        self.check(schema, value, "$", &mut problems);
        assert!(
            problems.is_empty(),
            "{what}: the answer does not fit the OpenAPI schema:\n  {}\nanswer: {value:#}",
            problems.join("\n  ")
        );
    }

    /// Asserts that a `method template` answer with `status` fits the document.
    pub fn assert_answer(&self, method: &str, template: &str, status: u16, body: &Value) {
        let schema = self.response_schema(method, template, status);
        self.assert_fits(&schema, body, &format!("{method} {template} → {status}"));
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema["$ref"].as_str() {
            Some(reference) => self
                .document
                .pointer(reference.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("unresolved $ref {reference}")),
            None => schema,
        }
    }

    fn check(&self, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if let Some(all) = schema["allOf"].as_array() {
            for part in all {
                self.check(part, value, at, problems);
            }
        }
        if let Some(any) = schema["anyOf"].as_array() {
            let fits_one = any.iter().any(|part| {
                let mut inner = Vec::new();
                self.check(part, value, at, &mut inner);
                inner.is_empty()
            });
            if !fits_one {
                problems.push(format!("{at}: fits none of anyOf"));
            }
        }
        if let Some(expected) = schema.get("const") {
            if value != expected {
                problems.push(format!("{at}: expected {expected}, got {value}"));
            }
        }
        if let Some(allowed) = schema["enum"].as_array() {
            if !allowed.contains(value) {
                problems.push(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        if let Some(types) = types_of(schema) {
            if !types.iter().any(|t| has_type(value, t)) {
                problems.push(format!("{at}: expected type {types:?}, got {value}"));
                return;
            }
        }
        if let (Some(format), Some(text)) = (schema["format"].as_str(), value.as_str()) {
            let ok = match format {
                "uuid" => uuid::Uuid::parse_str(text).is_ok(),
                "date-time" => time::OffsetDateTime::parse(
                    text,
                    &time::format_description::well_known::Rfc3339,
                )
                .is_ok(),
                "uri" => text.starts_with("http://") || text.starts_with("https://"),
                _ => true,
            };
            if !ok {
                problems.push(format!("{at}: {text:?} is not a {format}"));
            }
        }
        if let Some(object) = value.as_object() {
            if let Some(required) = schema["required"].as_array() {
                for name in required.iter().filter_map(Value::as_str) {
                    if !object.contains_key(name) {
                        problems.push(format!("{at}: required property `{name}` is missing"));
                    }
                }
            }
            let properties = schema["properties"].as_object();
            for (name, item) in object {
                match properties.and_then(|p| p.get(name)) {
                    Some(property) => self.check(property, item, &format!("{at}.{name}"), problems),
                    None if schema["additionalProperties"] == Value::Bool(false) => {
                        problems.push(format!("{at}: property `{name}` is not documented"))
                    }
                    None => {}
                }
            }
        }
        if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
            for (index, item) in array.iter().enumerate() {
                self.check(items, item, &format!("{at}[{index}]"), problems);
            }
        }
    }
}

fn types_of(schema: &Value) -> Option<Vec<String>> {
    match &schema["type"] {
        Value::String(t) => Some(vec![t.clone()]),
        Value::Array(ts) => Some(
            ts.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect(),
        ),
        _ => None,
    }
}

fn has_type(value: &Value, name: &str) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    }
}

#[cfg(test)]
mod checker_tests {
    //! The checker must be able to say no, or the walk tests prove nothing.
    use super::*;
    use serde_json::json;

    fn api() -> OpenApi {
        OpenApi::new(json!({
            "components": { "schemas": { "Thing": {
                "type": "object", "required": ["id", "when"], "additionalProperties": false,
                "properties": { "id": { "type": "string", "format": "uuid" },
                                "when": { "type": ["string", "null"], "format": "date-time" },
                                "state": { "enum": ["a", "b"] } },
            } } }
        }))
    }

    fn problems(value: Value) -> usize {
        let api = api();
        let mut problems = Vec::new();
        api.check(
            &json!({ "$ref": "#/components/schemas/Thing" }),
            &value,
            "$",
            &mut problems,
        );
        problems.len()
    }

    #[test]
    fn the_checker_refuses_what_does_not_fit() {
        let id = "6f9619ff-8b86-d011-b42d-00cf4fc964ff";
        assert_eq!(problems(json!({ "id": id, "when": null })), 0);
        assert_eq!(
            problems(json!({ "id": id, "when": "2026-01-01T00:00:00Z", "state": "a" })),
            0
        );
        assert_eq!(problems(json!({ "id": id })), 1, "missing required");
        assert_eq!(
            problems(json!({ "id": id, "when": null, "extra": 1 })),
            1,
            "undocumented"
        );
        assert_eq!(problems(json!({ "id": "nope", "when": null })), 1, "format");
        assert_eq!(problems(json!({ "id": id, "when": 5 })), 1, "type");
        assert_eq!(
            problems(json!({ "id": id, "when": null, "state": "c" })),
            1,
            "enum"
        );
    }
}
