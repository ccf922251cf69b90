//! Checks answers against an OpenAPI 3.1 document, whose schemas are JSON Schema
//! 2020-12: the status must be documented for the operation, the content type among
//! those documented for the status, and a JSON body (or each server-sent event's
//! data) valid under the documented schema, with undocumented fields refused.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Validates answers against the document's schemas.
pub struct Checker {
    doc: Value,
    validators: BTreeMap<String, jsonschema::Validator>,
}

impl Checker {
    /// A checker of answers against `doc`, an OpenAPI 3.1 document.
    pub fn new(doc: Value) -> Checker {
        Checker {
            doc,
            validators: BTreeMap::new(),
        }
    }

    /// Checks one answer of `METHOD path`; `Err` says what the document gets wrong.
    pub fn check(
        &mut self,
        method: &str,
        path: &str,
        status: u16,
        content_type: &str,
        body: &[u8],
    ) -> Result<(), String> {
        let op = &self.doc["paths"][path][method.to_ascii_lowercase()];
        let responses = op["responses"].as_object().cloned().unwrap_or_default();
        let Some(response) = responses
            .get(&status.to_string())
            .or_else(|| responses.get("default"))
        else {
            let documented: Vec<&String> = responses.keys().collect();
            return Err(format!(
                "status {status} is not documented (documented: {documented:?}); body {}",
                String::from_utf8_lossy(body)
            ));
        };
        let media = content_type.split(';').next().unwrap_or_default().trim();
        let content = &response["content"];
        if body.is_empty() && content.as_object().is_none_or(|c| c.is_empty()) {
            return Ok(());
        }
        let Some(documented) = content.get(media) else {
            let types: Vec<&String> = content
                .as_object()
                .map(|c| c.keys().collect())
                .unwrap_or_default();
            return Err(format!(
                "status {status}: answered `{media}`, documented {types:?}; body {}",
                String::from_utf8_lossy(body)
            ));
        };
        let Some(schema) = documented.get("schema") else {
            return Ok(());
        };
        if media == "text/event-stream" {
            // Each event's data is one JSON document of the schema; `[DONE]` ends it.
            let text = String::from_utf8_lossy(body);
            for data in text.lines().filter_map(|l| l.strip_prefix("data:")) {
                let data = data.trim();
                if data != "[DONE]" {
                    self.validate(schema, status, data.as_bytes())?;
                }
            }
            return Ok(());
        }
        if media != "application/json" {
            // Text (Prometheus' exposition format): the type is what is checked.
            return Ok(());
        }
        self.validate(schema, status, body)
    }

    /// Validates one JSON document against `schema`.
    fn validate(&mut self, schema: &Value, status: u16, body: &[u8]) -> Result<(), String> {
        let instance: Value = serde_json::from_slice(body).map_err(|e| {
            format!(
                "status {status}: the body is not JSON ({e}): {}",
                String::from_utf8_lossy(body)
            )
        })?;
        let key = serde_json::to_string(schema).unwrap();
        if !self.validators.contains_key(&key) {
            let mut root = strict(schema.clone());
            // `#/components/...` references resolve within the schema's own document.
            root["components"] = strict_components(&self.doc["components"]);
            let validator = jsonschema::draft202012::new(&root)
                .map_err(|e| format!("the documented schema does not compile: {e}"))?;
            self.validators.insert(key.clone(), validator);
        }
        let errors: Vec<String> = self.validators[&key]
            .iter_errors(&instance)
            .map(|e| format!("at `{}`: {e}", e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "status {status}: the body breaks its documented schema: {}\nbody: {instance}",
                errors.join("; ")
            ))
        }
    }
}

/// The schema with undocumented properties refused: an object schema that lists its
/// properties gets `unevaluatedProperties: false`, so a field serde writes under a
/// name the document does not use is caught. Schemas composed with `allOf` are left
/// open at the part and closed at the whole.
fn strict(mut schema: Value) -> Value {
    if let Some(obj) = schema.as_object_mut() {
        let composed = obj.contains_key("allOf");
        if (obj.contains_key("properties") || composed)
            && !obj.contains_key("additionalProperties")
            && !obj.contains_key("unevaluatedProperties")
        {
            obj.insert("unevaluatedProperties".into(), Value::Bool(false));
        }
    }
    schema
}

/// The components with every named schema made [`strict`], except those used as a
/// part of an `allOf` (closing a part would refuse its siblings' properties).
fn strict_components(components: &Value) -> Value {
    let mut parts = BTreeSet::new();
    collect_all_of_refs(components, &mut parts);
    let mut out = components.clone();
    if let Some(schemas) = out["schemas"].as_object_mut() {
        for (name, schema) in schemas.iter_mut() {
            if !parts.contains(name) {
                *schema = strict(schema.take());
            }
        }
    }
    out
}

fn collect_all_of_refs(value: &Value, parts: &mut BTreeSet<String>) {
    match value {
        Value::Object(obj) => {
            if let Some(Value::Array(items)) = obj.get("allOf") {
                for item in items {
                    if let Some(r) = item["$ref"].as_str() {
                        parts.insert(r.rsplit('/').next().unwrap().to_owned());
                    }
                }
            }
            obj.values().for_each(|v| collect_all_of_refs(v, parts));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_all_of_refs(v, parts)),
        _ => {}
    }
}
