//! Checks responses against crates/manager/openapi.json: the path and method must be documented,
//! the status listed (or covered by `default`), and a JSON body must match the schema (the subset of
//! JSON Schema the document uses: $ref, type, enum, oneOf, properties, required,
//! additionalProperties, items, minimum, maximum).

use serde_json::Value;
use std::sync::OnceLock;

fn doc() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::from_str(include_str!("../../../manager/openapi.json")).expect("openapi.json is valid JSON"))
}

/// The documented path template matching a concrete path (static segments win over parameters).
pub fn template_for(path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').collect();
    let mut best: Option<(usize, String)> = None;
    for template in doc()["paths"].as_object().unwrap().keys() {
        let parts: Vec<&str> = template.split('/').collect();
        if parts.len() != segments.len() {
            continue;
        }
        let matches = parts.iter().zip(&segments).all(|(t, s)| t.starts_with('{') || t == s);
        if matches {
            let statics = parts.iter().filter(|t| !t.starts_with('{')).count();
            if best.as_ref().is_none_or(|(n, _)| statics > *n) {
                best = Some((statics, template.clone()));
            }
        }
    }
    best.map(|(_, t)| t)
}

/// Panics if the response does not conform to the document.
pub fn check(method: &str, path: &str, status: u16, content_type: &str, body: &[u8]) {
    let d = doc();
    let error_schema = serde_json::json!({ "$ref": "#/components/schemas/Error" });
    // A TCP listener refuses (401, 403) before it routes, whatever the path or method.
    let refused = matches!(status, 401 | 403);
    let Some(template) = template_for(path) else {
        assert!(status == 404 || refused, "{method} {path}: undocumented path answered {status}");
        return validate_json(&error_schema, body, method, path);
    };
    let Some(operation) = d["paths"][&template].get(method.to_ascii_lowercase()) else {
        assert!(status == 405 || refused, "{method} {template}: undocumented method answered {status}");
        return validate_json(&error_schema, body, method, path);
    };
    let responses = &operation["responses"];
    let response = responses
        .get(status.to_string())
        .or_else(|| responses.get("default"))
        .unwrap_or_else(|| panic!("{method} {template}: status {status} is not documented"));
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        assert!(body.is_empty(), "{method} {template} {status}: documented without a body but got {body:?}");
        return;
    };
    let media = content_type.split(';').next().unwrap_or("").trim();
    let entry = content
        .get(media)
        .unwrap_or_else(|| panic!("{method} {template} {status}: content type {media:?} is not documented"));
    if media == "application/json" {
        validate_json(&entry["schema"], body, method, path);
    } else if media == "application/x-ndjson" {
        for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            validate_json(&entry["schema"], line, method, path);
        }
    }
}

fn validate_json(schema: &Value, body: &[u8], method: &str, path: &str) {
    let value: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {}", String::from_utf8_lossy(body)));
    if let Err(e) = validate(schema, &value, "$") {
        panic!("{method} {path}: response does not match openapi.json: {e}\nbody: {value}");
    }
}

fn resolve(schema: &Value) -> &Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.strip_prefix("#/components/schemas/").expect("local $ref");
            resolve(&doc()["components"]["schemas"][name])
        }
        None => schema,
    }
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        other => panic!("openapi.json uses unknown type {other}"),
    }
}

pub fn validate(schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(schema);
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let n = options.iter().filter(|o| validate(o, v, at).is_ok()).count();
        if n != 1 {
            return Err(format!("{at}: matches {n} of the oneOf alternatives"));
        }
    }
    match schema.get("type") {
        Some(Value::String(t)) if !type_ok(t, v) => return Err(format!("{at}: expected {t}, got {v}")),
        Some(Value::Array(ts)) if !ts.iter().any(|t| type_ok(t.as_str().unwrap(), v)) => {
            return Err(format!("{at}: expected one of {ts:?}, got {v}"));
        }
        _ => {}
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array)
        && !values.contains(v)
    {
        return Err(format!("{at}: {v} is not one of {values:?}"));
    }
    if let Some(n) = v.as_f64() {
        if schema.get("minimum").and_then(Value::as_f64).is_some_and(|m| n < m) {
            return Err(format!("{at}: {n} below minimum"));
        }
        if schema.get("maximum").and_then(Value::as_f64).is_some_and(|m| n > m) {
            return Err(format!("{at}: {n} above maximum"));
        }
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for key in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let key = key.as_str().unwrap();
            if !obj.contains_key(key) {
                return Err(format!("{at}: missing required {key}"));
            }
        }
        for (key, value) in obj {
            match props.and_then(|p| p.get(key)) {
                Some(sub) => validate(sub, value, &format!("{at}.{key}"))?,
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{at}: property {key} is not documented"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), v.as_array()) {
        for (i, item) in array.iter().enumerate() {
            validate(items, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}
