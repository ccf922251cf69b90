//! Checks answers against an OpenAPI 3.1 document, whose schemas are JSON Schema
//! 2020-12: the status must be documented for the operation, the content type among
//! those documented for the status, and a JSON body (or each server-sent event's
//! data) valid under the documented schema, with undocumented fields refused.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Validates answers against the document's schemas.
pub struct Checker {
    doc: Value,
    /// The document's components made [`strict`], which every answer schema's
    /// `#/components/...` references resolve against.
    components: Value,
    schemas: boon::Schemas,
    compiled: BTreeMap<String, boon::SchemaIndex>,
}

impl Checker {
    /// A checker of answers against `doc`, an OpenAPI 3.1 document.
    pub fn new(doc: Value) -> Checker {
        Checker {
            components: strict_components(&doc["components"]),
            doc,
            schemas: boon::Schemas::new(),
            compiled: BTreeMap::new(),
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
        let index = match self.compiled.get(&key) {
            Some(index) => *index,
            None => {
                let mut root = strict(schema.clone());
                // `#/components/...` references resolve within the schema's own document.
                root["components"] = self.components.clone();
                let url = format!(
                    "https://aigrid.invalid/answers/{}.json",
                    self.compiled.len()
                );
                let mut compiler = boon::Compiler::new();
                compiler.set_default_draft(boon::Draft::V2020_12);
                let not_compiled = |e| format!("the documented schema does not compile: {e}");
                compiler.add_resource(&url, root).map_err(not_compiled)?;
                let index = compiler
                    .compile(&url, &mut self.schemas)
                    .map_err(not_compiled)?;
                self.compiled.insert(key, index);
                index
            }
        };
        match self.schemas.validate(&instance, index) {
            Ok(()) => Ok(()),
            // The alternate form names each failing keyword's place in the schema.
            Err(e) => Err(format!(
                "status {status}: the body breaks its documented schema: {e:#}\nbody: {instance}"
            )),
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Checker;

    /// A document with one operation whose answers are a `Pair` (a named schema
    /// reached by reference) or a `Labelled` (an `allOf` over another named schema).
    fn doc() -> serde_json::Value {
        json!({
            "openapi": "3.1.0",
            "paths": {"/pair": {"get": {"responses": {
                "200": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Pair"}}}},
                "201": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Labelled"}}}},
                "204": {"description": "nothing"}
            }}}},
            "components": {"schemas": {
                "Pair": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "count": {"type": "integer", "minimum": 0}},
                    "required": ["name"]
                },
                "Named": {"type": "object", "properties": {"name": {"type": "string"}}},
                "Labelled": {"allOf": [
                    {"$ref": "#/components/schemas/Named"},
                    {"type": "object", "properties": {"label": {"type": "string"}}}
                ]}
            }}
        })
    }

    fn check(status: u16, body: serde_json::Value) -> Result<(), String> {
        Checker::new(doc()).check(
            "GET",
            "/pair",
            status,
            "application/json",
            body.to_string().as_bytes(),
        )
    }

    #[test]
    fn answers_that_match_their_schema_pass() {
        check(200, json!({"name": "a", "count": 2})).unwrap();
        check(201, json!({"name": "a", "label": "b"})).unwrap();
        Checker::new(doc())
            .check("GET", "/pair", 204, "", b"")
            .unwrap();
    }

    #[test]
    fn answers_that_break_their_schema_are_refused_with_the_place() {
        let missing = check(200, json!({"count": 2})).unwrap_err();
        assert!(missing.contains("name"), "{missing}");
        let wrong_type = check(200, json!({"name": 3})).unwrap_err();
        assert!(wrong_type.contains("/name"), "{wrong_type}");
        let below_minimum = check(200, json!({"name": "a", "count": -1})).unwrap_err();
        assert!(below_minimum.contains("/count"), "{below_minimum}");
        // A field the document does not name is refused, also across `allOf` parts.
        let undocumented = check(200, json!({"name": "a", "extra": 1})).unwrap_err();
        assert!(undocumented.contains("extra"), "{undocumented}");
        let undocumented = check(201, json!({"name": "a", "label": "b", "x": 1})).unwrap_err();
        assert!(undocumented.contains('x'), "{undocumented}");
        // An undocumented status and a body that is not JSON.
        assert!(check(404, json!({}))
            .unwrap_err()
            .contains("not documented"));
        let not_json = Checker::new(doc())
            .check("GET", "/pair", 200, "application/json", b"{")
            .unwrap_err();
        assert!(not_json.contains("not JSON"), "{not_json}");
    }
}
