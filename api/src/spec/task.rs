//! What an instance runs: a process (`exec`, with its restart policy and pinned
//! artifacts) or the built-in model server, and the checks on them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::EnvVars;
use crate::error::ValidationError;

/// What an instance runs, chosen by `driver`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "driver")]
pub enum TaskSpec {
    /// A process started from a command line.
    #[serde(rename = "exec")]
    Exec(ExecTask),
    /// The built-in model server, serving a model from dispersed storage.
    #[serde(rename = "model-server")]
    ModelServer(ModelServerTask),
}

/// The driver word of each [`TaskSpec`] variant, as serde writes it in `driver`.
const TASK_DRIVERS: [&str; 2] = ["exec", "model-server"];

// Written by hand: the derive documents each variant as `allOf` its struct (which
// refuses unknown fields, `driver` among them) and the tag, a schema no task can
// satisfy. Each variant here is its struct's object with `driver` added to it.
impl utoipa::PartialSchema for TaskSpec {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
        use utoipa::openapi::RefOr;
        let variant = |schema: RefOr<Schema>, driver: &str, description: &str| {
            let RefOr::T(Schema::Object(mut object)) = schema else {
                unreachable!("a task struct's schema is an object")
            };
            let tag = ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([driver]))
                .description(Some("Which driver runs the task."));
            object.properties.insert("driver".to_owned(), tag.into());
            object.required.insert(0, "driver".to_owned());
            object.description = Some(description.to_owned());
            Schema::Object(object)
        };
        OneOfBuilder::new()
            .item(variant(
                ExecTask::schema(),
                TASK_DRIVERS[0],
                "A process started from a command line.",
            ))
            .item(variant(
                ModelServerTask::schema(),
                TASK_DRIVERS[1],
                "The built-in model server, serving a model from dispersed storage.",
            ))
            .description(Some("What an instance runs, chosen by `driver`."))
            .into()
    }
}

impl ToSchema for TaskSpec {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        use utoipa::PartialSchema;
        schemas.push((ExecTask::name().into(), ExecTask::schema()));
        ExecTask::schemas(schemas);
        schemas.push((ModelServerTask::name().into(), ModelServerTask::schema()));
        ModelServerTask::schemas(schemas);
    }
}

/// A process the agent starts directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecTask {
    /// The program to run.
    pub command: String,
    /// Its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "EnvVars::is_empty")]
    #[schema(value_type = BTreeMap<String, String>)]
    pub env: EnvVars,
    /// Files fetched and verified before the process starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
    /// What the node does when the process exits.
    #[serde(default, skip_serializing_if = "RestartPolicy::is_default")]
    pub restart: RestartPolicy,
    /// How long the process gets between SIGTERM and SIGKILL when it is stopped, in
    /// milliseconds; 5 s when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(default = 5000, maximum = 3600000)]
    pub kill_timeout_ms: Option<u64>,
}

/// Grace period between SIGTERM and SIGKILL when a task does not set one.
pub const DEFAULT_KILL_TIMEOUT_MS: u64 = 5_000;
/// Longest accepted grace period.
pub const MAX_KILL_TIMEOUT_MS: u64 = 3_600_000;
/// Most in-place restarts a policy may allow before the instance is failed.
pub const MAX_RESTART_ATTEMPTS: u32 = 1_000;

impl ExecTask {
    /// The grace period between SIGTERM and SIGKILL.
    pub fn kill_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.kill_timeout_ms.unwrap_or(DEFAULT_KILL_TIMEOUT_MS))
    }
}

wire_enum!(
    /// When the node restarts an exited process in place.
    #[derive(Default)]
    RestartMode {
        /// Restart after a non-zero exit or a signal, up to `attempts` times.
        #[default]
        OnFailure => "on-failure",
        /// Never; the first exit ends the instance.
        Never => "never",
    }
);

/// How the node restarts a task's process in place before giving the instance up to
/// the control plane (which then reschedules it, for services).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// When to restart.
    #[serde(default)]
    pub mode: RestartMode,
    /// Most restarts before the instance fails.
    #[serde(default = "default_restart_attempts")]
    #[schema(default = 3)]
    pub attempts: u32,
    /// Wait before the first restart, in milliseconds; doubles with each restart.
    #[serde(default = "default_restart_delay")]
    #[schema(default = 1000)]
    pub delay_ms: u64,
    /// Longest wait between restarts, in milliseconds.
    #[serde(default = "default_restart_max_delay")]
    #[schema(default = 30000)]
    pub max_delay_ms: u64,
}

fn default_restart_attempts() -> u32 {
    3
}

fn default_restart_delay() -> u64 {
    1_000
}

fn default_restart_max_delay() -> u64 {
    30_000
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            mode: RestartMode::OnFailure,
            attempts: default_restart_attempts(),
            delay_ms: default_restart_delay(),
            max_delay_ms: default_restart_max_delay(),
        }
    }
}

impl RestartPolicy {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The wait before restart number `restart` (0 for the first): `delay_ms`
    /// doubling each time, capped at `max_delay_ms`.
    pub fn delay(&self, restart: u32) -> std::time::Duration {
        let ms = self
            .delay_ms
            .saturating_mul(1u64 << restart.min(32))
            .min(self.max_delay_ms.max(self.delay_ms));
        std::time::Duration::from_millis(ms)
    }

    /// True when a process that exited (successfully or not) after `restarts`
    /// restarts should be started again.
    pub fn should_restart(&self, success: bool, restarts: u32) -> bool {
        self.mode == RestartMode::OnFailure && !success && restarts < self.attempts
    }
}

/// A file pinned by digest: the agent refuses to start the task if the fetched
/// bytes hash differently, which is what makes a deployment tamper-proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Where to fetch the file from.
    pub source: String,
    /// BLAKE3 digest of the file: 64 lowercase hex characters.
    pub blake3: String,
}

/// The built-in model server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelServerTask {
    /// Digest of the model's manifest in dispersed storage. A digest, not a name, so a
    /// deployment pins exactly the bytes that were reviewed.
    pub model: String,
    /// For an embedding model: embed inputs longer than it takes by their first tokens
    /// when a request does not say (`aigrid serve --auto-truncate`); refused otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_truncate: bool,
}

impl TaskSpec {
    pub(super) fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        match self {
            Self::Exec(exec) => exec.validate_at(path),
            Self::ModelServer(server) => {
                let model = server.model.as_str();
                if model.is_empty() {
                    Err(ValidationError::new(
                        format!("{path}.model"),
                        "must name a model digest",
                    ))
                } else if model.chars().any(char::is_whitespace) {
                    Err(ValidationError::new(
                        format!("{path}.model"),
                        "a model digest contains no whitespace",
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

impl ExecTask {
    pub(super) fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        if self.command.trim().is_empty() {
            return Err(ValidationError::new(
                format!("{path}.command"),
                "must not be empty",
            ));
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains(['=', '\0']) {
                return Err(ValidationError::new(
                    format!("{path}.env"),
                    format!("`{key}` is not a valid variable name (empty, or contains `=` or NUL)"),
                ));
            }
        }
        if self.restart.attempts > MAX_RESTART_ATTEMPTS {
            return Err(ValidationError::new(
                format!("{path}.restart.attempts"),
                format!("must be at most {MAX_RESTART_ATTEMPTS}"),
            ));
        }
        if self.restart.delay_ms > MAX_KILL_TIMEOUT_MS
            || self.restart.max_delay_ms > MAX_KILL_TIMEOUT_MS
        {
            return Err(ValidationError::new(
                format!("{path}.restart"),
                format!("delays must be at most {MAX_KILL_TIMEOUT_MS} ms"),
            ));
        }
        if self
            .kill_timeout_ms
            .is_some_and(|t| t > MAX_KILL_TIMEOUT_MS)
        {
            return Err(ValidationError::new(
                format!("{path}.kill_timeout_ms"),
                format!("must be at most {MAX_KILL_TIMEOUT_MS}"),
            ));
        }
        for (i, artifact) in self.artifacts.iter().enumerate() {
            let at = format!("{path}.artifacts[{i}]");
            if artifact.source.trim().is_empty() {
                return Err(ValidationError::new(
                    format!("{at}.source"),
                    "must not be empty",
                ));
            }
            if !crate::digest::is_digest(&artifact.blake3) {
                return Err(ValidationError::new(
                    format!("{at}.blake3"),
                    "must be a BLAKE3 digest: 64 lowercase hex characters",
                ));
            }
        }
        Ok(())
    }
}
