//! How big a job spec may be: each field, each task, each group and the spec as a
//! whole. A spec is a Raft entry, a record every server keeps in memory, a part of
//! every snapshot, and what each node's agent is sent, so its size is multiplied
//! many times over; these limits keep that product bounded whatever the body limit
//! in front of the API allows.
//!
//! Breaking a limit is not a malformed spec but an oversized one: the API answers
//! 413 (`payload_too_large`) with a [`SizeError`] naming the field, where
//! [`JobSpec::validate`](super::JobSpec::validate) rules answer 400.
//! [`JobSpec::check_size`](super::JobSpec::check_size) runs these checks alone, and
//! `validate` runs them first, so the apply path refuses an oversized spec too.

use crate::error::ValidationError;

use super::{Affinity, Constraint, ConstraintValue, EnvVars, JobSpec, Spread, TaskGroup, TaskSpec};

/// Largest spec, as compact JSON.
pub const MAX_SPEC_BYTES: usize = 512 * 1024;
/// Most groups one job may have; bounds the work of one planner pass.
pub const MAX_GROUPS: usize = 64;
/// Largest value of one environment variable.
pub const MAX_ENV_VALUE_BYTES: usize = 64 * 1024;
/// Largest name of one environment variable.
pub const MAX_ENV_NAME_BYTES: usize = 1024;
/// Most environment variables of one task.
pub const MAX_ENV_VARS: usize = 1024;
/// Largest environment of one task: every name and value together.
pub const MAX_ENV_BYTES: usize = 256 * 1024;
/// Longest command (a path, or a program name looked up in `PATH`).
pub const MAX_COMMAND_BYTES: usize = 4096;
/// Most arguments of one task.
pub const MAX_ARGS: usize = 1024;
/// Largest single argument.
pub const MAX_ARG_BYTES: usize = 64 * 1024;
/// Largest command line of one task: the command and every argument together.
pub const MAX_ARGS_BYTES: usize = 256 * 1024;
/// Most artifacts of one task.
pub const MAX_ARTIFACTS: usize = 64;
/// Longest artifact source (a URL or a path).
pub const MAX_SOURCE_BYTES: usize = 4096;
/// Most constraints, affinities or spreads (each) of one group.
pub const MAX_RULES: usize = 64;
/// Longest attribute name a rule reads.
pub const MAX_ATTRIBUTE_BYTES: usize = 256;
/// Most values of one `in` or `not_in` rule.
pub const MAX_RULE_VALUES: usize = 256;
/// Longest value of a rule (a regular expression included).
pub const MAX_RULE_VALUE_BYTES: usize = 4096;
/// Longest free-text field that names one thing: a GPU model, a model digest.
pub const MAX_SHORT_TEXT_BYTES: usize = 256;

/// A spec, or one of its fields, over a size limit. Answered with 413; see the
/// module documentation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SizeError {
    /// Path of the oversized field, in the document's own field names (`.` for the
    /// whole spec).
    pub field: String,
    /// What the limit is and how far the field is over it.
    pub message: String,
}

impl SizeError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SizeError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// `field` has `got` bytes, over `max`.
    fn bytes(field: impl Into<String>, got: usize, max: usize) -> Self {
        Self::new(field, format!("is {got} bytes; at most {max} are allowed"))
    }

    /// `field` has `got` items, over `max`.
    fn items(field: impl Into<String>, got: usize, max: usize, what: &str) -> Self {
        Self::new(
            field,
            format!("has {got} {what}; at most {max} are allowed"),
        )
    }
}

impl From<SizeError> for ValidationError {
    fn from(e: SizeError) -> Self {
        ValidationError::new(e.field, e.message)
    }
}

/// Fails with `field` when `value` is longer than `max` bytes.
fn text(field: impl FnOnce() -> String, value: &str, max: usize) -> Result<(), SizeError> {
    if value.len() > max {
        return Err(SizeError::bytes(field(), value.len(), max));
    }
    Ok(())
}

/// Fails with `field` when `len` is more than `max` items.
fn count(
    field: impl FnOnce() -> String,
    len: usize,
    max: usize,
    what: &str,
) -> Result<(), SizeError> {
    if len > max {
        return Err(SizeError::items(field(), len, max, what));
    }
    Ok(())
}

/// A writer that only counts, to measure the spec's JSON without building it.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl JobSpec {
    /// Checks every size limit of this module, fields first (so the answer names
    /// the field at fault), then the spec's JSON as a whole.
    pub fn check_size(&self) -> Result<(), SizeError> {
        // Names have their own, much lower, limit among the rules; this only keeps
        // a huge one from being copied into a message.
        text(|| "name".into(), &self.name, MAX_SHORT_TEXT_BYTES)?;
        if let Some(circle) = &self.circle {
            text(|| "circle".into(), circle, MAX_SHORT_TEXT_BYTES)?;
        }
        count(|| "groups".into(), self.groups.len(), MAX_GROUPS, "groups")?;
        for (i, group) in self.groups.iter().enumerate() {
            group.check_size(i)?;
        }
        let mut counter = Counter(0);
        // Serialising plain data into a counter cannot fail.
        let _ = serde_json::to_writer(&mut counter, self);
        if counter.0 > MAX_SPEC_BYTES {
            return Err(SizeError::new(
                ".",
                format!(
                    "the spec is {} bytes as JSON; at most {MAX_SPEC_BYTES} are allowed",
                    counter.0
                ),
            ));
        }
        Ok(())
    }
}

impl TaskGroup {
    fn check_size(&self, i: usize) -> Result<(), SizeError> {
        let at = |rest: &str| format!("groups[{i}].{rest}");
        text(|| at("name"), &self.name, MAX_SHORT_TEXT_BYTES)?;
        if let Some(gpus) = &self.resources.gpus {
            if let Some(model) = &gpus.model {
                text(|| at("resources.gpus.model"), model, MAX_SHORT_TEXT_BYTES)?;
            }
        }
        count(
            || at("constraints"),
            self.constraints.len(),
            MAX_RULES,
            "constraints",
        )?;
        for (
            j,
            Constraint {
                attribute, value, ..
            },
        ) in self.constraints.iter().enumerate()
        {
            check_rule(&at(&format!("constraints[{j}]")), attribute, value)?;
        }
        count(
            || at("affinities"),
            self.affinities.len(),
            MAX_RULES,
            "affinities",
        )?;
        for (
            j,
            Affinity {
                attribute, value, ..
            },
        ) in self.affinities.iter().enumerate()
        {
            check_rule(&at(&format!("affinities[{j}]")), attribute, value)?;
        }
        count(|| at("spread"), self.spread.len(), MAX_RULES, "spreads")?;
        for (j, Spread { attribute, .. }) in self.spread.iter().enumerate() {
            let field = || at(&format!("spread[{j}].attribute"));
            text(field, attribute, MAX_ATTRIBUTE_BYTES)?;
        }
        match &self.task {
            TaskSpec::Exec(exec) => {
                text(|| at("task.command"), &exec.command, MAX_COMMAND_BYTES)?;
                check_args(&at("task.args"), &exec.command, &exec.args)?;
                check_env(&at("task.env"), &exec.env)?;
                count(
                    || at("task.artifacts"),
                    exec.artifacts.len(),
                    MAX_ARTIFACTS,
                    "artifacts",
                )?;
                for (k, artifact) in exec.artifacts.iter().enumerate() {
                    let field = || at(&format!("task.artifacts[{k}].source"));
                    text(field, &artifact.source, MAX_SOURCE_BYTES)?;
                    let field = || at(&format!("task.artifacts[{k}].blake3"));
                    text(field, &artifact.blake3, MAX_SHORT_TEXT_BYTES)?;
                }
            }
            TaskSpec::ModelServer(server) => {
                text(|| at("task.model"), &server.model, MAX_SHORT_TEXT_BYTES)?;
            }
        }
        Ok(())
    }
}

fn check_rule(path: &str, attribute: &str, value: &ConstraintValue) -> Result<(), SizeError> {
    text(
        || format!("{path}.attribute"),
        attribute,
        MAX_ATTRIBUTE_BYTES,
    )?;
    let field = || format!("{path}.value");
    match value {
        ConstraintValue::One(v) => text(field, v, MAX_RULE_VALUE_BYTES),
        ConstraintValue::Many(values) => {
            count(field, values.len(), MAX_RULE_VALUES, "values")?;
            for (k, v) in values.iter().enumerate() {
                text(|| format!("{path}.value[{k}]"), v, MAX_RULE_VALUE_BYTES)?;
            }
            Ok(())
        }
    }
}

fn check_args(path: &str, command: &str, args: &[String]) -> Result<(), SizeError> {
    count(|| path.to_owned(), args.len(), MAX_ARGS, "arguments")?;
    let mut total = command.len();
    for (k, arg) in args.iter().enumerate() {
        text(|| format!("{path}[{k}]"), arg, MAX_ARG_BYTES)?;
        total += arg.len();
    }
    if total > MAX_ARGS_BYTES {
        return Err(SizeError::new(
            path,
            format!(
                "the command line is {total} bytes with its command; at most \
                 {MAX_ARGS_BYTES} are allowed"
            ),
        ));
    }
    Ok(())
}

fn check_env(path: &str, env: &EnvVars) -> Result<(), SizeError> {
    count(|| path.to_owned(), env.len(), MAX_ENV_VARS, "variables")?;
    let mut total = 0;
    for (name, value) in env {
        if name.len() > MAX_ENV_NAME_BYTES {
            return Err(SizeError::new(
                path,
                format!(
                    "a variable name is {} bytes; at most {MAX_ENV_NAME_BYTES} are allowed",
                    name.len()
                ),
            ));
        }
        text(|| format!("{path}.{name}"), value, MAX_ENV_VALUE_BYTES)?;
        total += name.len() + value.len();
    }
    if total > MAX_ENV_BYTES {
        return Err(SizeError::new(
            path,
            format!(
                "the environment is {total} bytes (names and values); at most \
                 {MAX_ENV_BYTES} are allowed"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn spec(task: Value) -> Value {
        json!({
            "name": "j",
            "groups": [{"name": "g", "resources": {"cpu_millis": 100, "memory_mib": 64},
                        "task": task}]
        })
    }

    fn exec(extra: Value) -> Value {
        let mut task = json!({"driver": "exec", "command": "/bin/true"});
        task.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        spec(task)
    }

    fn size_error(v: Value) -> SizeError {
        let spec: JobSpec = serde_json::from_value(v).unwrap();
        let err = spec.check_size().unwrap_err();
        // The full validation reports the same field.
        assert_eq!(spec.validate().unwrap_err().field, err.field);
        err
    }

    fn fits(v: Value) {
        let spec: JobSpec = serde_json::from_value(v).unwrap();
        spec.check_size().unwrap();
        spec.validate().unwrap();
    }

    #[test]
    fn an_environment_value_is_bounded() {
        let at_limit = "v".repeat(MAX_ENV_VALUE_BYTES);
        fits(exec(json!({"env": {"A": at_limit}})));
        let megabyte = "v".repeat(1 << 20);
        let err = size_error(exec(json!({"env": {"BIG": megabyte}})));
        assert_eq!(err.field, "groups[0].task.env.BIG");
        assert!(
            err.message.contains(&MAX_ENV_VALUE_BYTES.to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_task_environment_is_bounded_as_a_whole() {
        let value = "v".repeat(MAX_ENV_VALUE_BYTES);
        let env: serde_json::Map<String, Value> = (0..MAX_ENV_BYTES / MAX_ENV_VALUE_BYTES + 1)
            .map(|i| (format!("V{i}"), json!(value)))
            .collect();
        let err = size_error(exec(json!({ "env": env })));
        assert_eq!(err.field, "groups[0].task.env");
        let many: serde_json::Map<String, Value> = (0..=MAX_ENV_VARS)
            .map(|i| (format!("V{i}"), json!("")))
            .collect();
        assert_eq!(
            size_error(exec(json!({ "env": many }))).field,
            "groups[0].task.env"
        );
        let long_name: serde_json::Map<String, Value> =
            [("N".repeat(MAX_ENV_NAME_BYTES + 1), json!("x"))]
                .into_iter()
                .collect();
        assert!(size_error(exec(json!({ "env": long_name })))
            .message
            .contains("name"));
    }

    #[test]
    fn arguments_are_bounded_in_number_length_and_total() {
        let err = size_error(exec(json!({"args": vec!["a"; MAX_ARGS + 1]})));
        assert_eq!(err.field, "groups[0].task.args");
        let long = "a".repeat(MAX_ARG_BYTES + 1);
        assert_eq!(
            size_error(exec(json!({"args": ["ok", long]}))).field,
            "groups[0].task.args[1]"
        );
        let piece = "a".repeat(MAX_ARG_BYTES);
        let args = vec![piece; MAX_ARGS_BYTES / MAX_ARG_BYTES];
        // Exactly at the limit with the command's bytes on top: over.
        assert_eq!(
            size_error(exec(json!({ "args": args }))).field,
            "groups[0].task.args"
        );
        let command = "c".repeat(MAX_COMMAND_BYTES + 1);
        let err = size_error(spec(json!({"driver": "exec", "command": command})));
        assert_eq!(err.field, "groups[0].task.command");
    }

    #[test]
    fn rules_groups_and_names_are_bounded() {
        let rule = json!({"attribute": "site", "op": "=", "value": "a"});
        let mut v = exec(json!({}));
        v["groups"][0]["constraints"] = json!(vec![rule; MAX_RULES + 1]);
        assert_eq!(size_error(v).field, "groups[0].constraints");
        let mut v = exec(json!({}));
        let values = vec!["x"; MAX_RULE_VALUES + 1];
        v["groups"][0]["affinities"] =
            json!([{"attribute": "site", "op": "in", "value": values, "weight": 5}]);
        assert_eq!(size_error(v).field, "groups[0].affinities[0].value");
        let mut v = exec(json!({}));
        let pattern = "a".repeat(MAX_RULE_VALUE_BYTES + 1);
        v["groups"][0]["constraints"] =
            json!([{"attribute": "site", "op": "regex", "value": pattern}]);
        assert_eq!(size_error(v).field, "groups[0].constraints[0].value");
        let mut v = exec(json!({}));
        let group = v["groups"][0].clone();
        v["groups"] = json!((0..=MAX_GROUPS)
            .map(|i| {
                let mut g = group.clone();
                g["name"] = json!(format!("g{i}"));
                g
            })
            .collect::<Vec<_>>());
        assert_eq!(size_error(v).field, "groups");
        let mut v = exec(json!({}));
        v["name"] = json!("n".repeat(1 << 20));
        assert_eq!(size_error(v).field, "name");
    }

    #[test]
    fn the_whole_spec_is_bounded() {
        // Every field within its own limit, the spec over its total.
        let value = "v".repeat(MAX_ENV_VALUE_BYTES);
        let env: serde_json::Map<String, Value> =
            (0..3).map(|i| (format!("V{i}"), json!(value))).collect();
        let mut v = exec(json!({ "env": env }));
        let group = v["groups"][0].clone();
        let groups: Vec<Value> = (0..3)
            .map(|i| {
                let mut g = group.clone();
                g["name"] = json!(format!("g{i}"));
                g
            })
            .collect();
        v["groups"] = json!(groups);
        let err = size_error(v);
        assert_eq!(err.field, ".");
        assert!(err.message.contains(&MAX_SPEC_BYTES.to_string()), "{err}");
    }
}
