//! The job specification users submit (JSON over the API, TOML from the CLI; one
//! shape). Every struct rejects unknown fields so a misspelt key is an error instead
//! of a silently ignored setting, and [`JobSpec::validate`] checks the rules serde
//! cannot express, naming the exact field that breaks one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;
use crate::units::{MemoryMib, MilliCpu};

/// Priority given to a job that does not state one.
pub const DEFAULT_PRIORITY: u32 = 50;
/// Highest accepted priority.
pub const MAX_PRIORITY: u32 = 100;
/// Longest accepted job, group or circle name (a DNS label's limit, so names can
/// appear in host names and paths).
pub const MAX_NAME_LEN: usize = 63;
/// Most groups one job may have; bounds the work of one planner pass.
pub const MAX_GROUPS: usize = 64;
/// Most instances one group may ask for; bounds the allocations one job can create.
pub const MAX_GROUP_COUNT: u32 = 10_000;
/// Largest compiled size of a constraint regex, so a hostile pattern cannot make
/// every server spend memory compiling it.
pub const MAX_REGEX_BYTES: usize = 256 * 1024;
/// Highest spread weight.
pub const MAX_SPREAD_WEIGHT: u32 = 100;
/// Largest magnitude of an affinity weight; negative weights repel.
pub const MAX_AFFINITY_WEIGHT: i32 = 100;

/// A job as submitted: what to run, how many, and where it may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Unique among live jobs; submitting a spec with the name of a live job updates
    /// that job. 1 to 63 of `a-z 0-9 - _ .`, starting with a letter or digit.
    pub name: String,
    /// Whether the job is kept running or runs to completion.
    #[serde(default)]
    pub kind: JobKind,
    /// 0 to 100; higher-priority jobs are placed first and may preempt lower ones.
    #[serde(default = "default_priority")]
    #[schema(default = 50, maximum = 100)]
    pub priority: u32,
    /// The Autonomous Circle that owns the job, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circle: Option<String>,
    /// The task groups; at least one.
    #[serde(default)]
    pub groups: Vec<TaskGroup>,
}

fn default_priority() -> u32 {
    DEFAULT_PRIORITY
}

fn default_count() -> u32 {
    1
}

fn default_movable() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

wire_enum!(
    /// How the control plane treats a job whose instances exit.
    #[derive(Default)]
    JobKind {
        /// Kept running: exited or lost instances are replaced. The default, as in
        /// most schedulers, since serving is the common case.
        #[default]
        Service => "service",
        /// Runs to completion once.
        Batch => "batch",
        /// Runs to completion; groups are usually `gang` so all workers start together.
        Training => "training",
    }
);

/// A set of identical instances placed together under one resource request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskGroup {
    /// Unique within the job; same character rules as the job name.
    pub name: String,
    /// How many instances to run.
    #[serde(default = "default_count")]
    #[schema(default = 1, minimum = 1)]
    pub count: u32,
    /// Place all `count` instances at once or none of them (distributed training).
    #[serde(default)]
    pub gang: bool,
    /// What each instance needs.
    pub resources: Resources,
    /// Node attributes an instance's node must satisfy; all must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    /// Attributes to spread instances across (sites, countries).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spread: Vec<Spread>,
    /// Weighted preferences for nodes; unlike constraints they never exclude a node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinities: Vec<Affinity>,
    /// Whether the rebalancer may migrate instances to consolidate free GPUs. True by
    /// default; set false for work that cannot tolerate a restart.
    #[serde(default = "default_movable", skip_serializing_if = "is_true")]
    #[schema(default = true)]
    pub movable: bool,
    /// The disruption budget: at most this many instances may be down at once for
    /// voluntary moves (rebalancing, drains). Absent means one at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_unavailable: Option<u32>,
    /// What each instance runs.
    pub task: TaskSpec,
}

/// Resources reserved for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU in thousandths of a core.
    pub cpu_millis: MilliCpu,
    /// Host memory in MiB.
    pub memory_mib: MemoryMib,
    /// GPUs, for groups that need them; absent for CPU-only work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<GpuRequest>,
}

/// GPUs reserved for one instance: whole GPUs, held exclusively, or with
/// `memory_slice_mib` a slice of one GPU shared with other sliced instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuRequest {
    /// How many GPUs, all on the same node; 1 for a slice.
    #[schema(minimum = 1)]
    pub count: u32,
    /// A model name the device's model must contain (`H100`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Least memory each GPU must have, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_memory_mib: Option<MemoryMib>,
    /// Ask for a slice of one shared GPU with at least this much of its memory, in
    /// MiB, instead of whole GPUs. Slices share a GPU only with other slices, and
    /// the slices on one GPU never add up to more than its memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_slice_mib: Option<MemoryMib>,
    /// Require all of an instance's GPUs to be in one interconnect group (an NVLink
    /// domain). Without it the planner still prefers one group but may split.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub same_interconnect: bool,
}

impl GpuRequest {
    /// True when the request is for a slice of a shared GPU.
    pub fn is_slice(&self) -> bool {
        self.memory_slice_mib.is_some()
    }
}

/// A rule on a node attribute (`country in [BE, NL]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Constraint {
    /// The node attribute the rule reads.
    pub attribute: String,
    /// How the attribute is compared with `value`.
    pub op: ConstraintOp,
    /// A string, or a list of strings for `in` and `not_in`.
    pub value: ConstraintValue,
}

wire_enum!(
    /// The comparison a [`Constraint`] makes. A node lacking the attribute matches only
    /// `!=` and `not_in`.
    ConstraintOp {
        /// The attribute equals the value.
        Eq => "=",
        /// The attribute differs from the value.
        Ne => "!=",
        /// The attribute is one of the listed values.
        In => "in",
        /// The attribute is none of the listed values.
        NotIn => "not_in",
        /// The attribute matches the regular expression (unanchored, `regex` crate
        /// syntax).
        Regex => "regex",
        /// The attribute, read as a number, is at least the value.
        Ge => ">=",
        /// The attribute, read as a number, is at most the value.
        Le => "<=",
    }
);

/// The right-hand side of a [`Constraint`]: one string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ConstraintValue {
    /// A single value, for every op except `in` and `not_in`.
    One(String),
    /// A list of values, for `in` and `not_in`.
    Many(Vec<String>),
}

impl ConstraintValue {
    /// The value when it is a single string.
    pub fn as_single(&self) -> Option<&str> {
        match self {
            Self::One(v) => Some(v),
            Self::Many(_) => None,
        }
    }

    /// The values when given as a list.
    pub fn as_list(&self) -> Option<&[String]> {
        match self {
            Self::One(_) => None,
            Self::Many(v) => Some(v),
        }
    }
}

// Written by hand rather than `#[serde(untagged)]` so a wrong type gets a message
// naming what is accepted instead of "data did not match any variant".
impl<'de> Deserialize<'de> for ConstraintValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ConstraintValue;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ConstraintValue::One(v.to_owned()))
            }

            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(ConstraintValue::One(v))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(v) = seq.next_element::<String>()? {
                    values.push(v);
                }
                Ok(ConstraintValue::Many(values))
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

/// A weighted preference for nodes whose attribute satisfies a rule
/// (`site = ghent`, weight 50). Positive weights attract, negative ones repel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Affinity {
    /// The node attribute the rule reads.
    pub attribute: String,
    /// How the attribute is compared with `value`, as for a [`Constraint`].
    pub op: ConstraintOp,
    /// A string, or a list of strings for `in` and `not_in`.
    pub value: ConstraintValue,
    /// -100 to 100, not 0: how strongly matching nodes are preferred (or avoided).
    #[schema(minimum = -100, maximum = 100)]
    pub weight: i32,
}

/// Spread a group's instances evenly over the values of a node attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Spread {
    /// The node attribute whose values instances are spread over.
    pub attribute: String,
    /// 1 to 100: how much this spread counts against other placement preferences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub weight: Option<u32>,
}

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
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
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
}

impl JobSpec {
    /// Checks the rules serde cannot express. The first broken rule is reported, with
    /// the path of its field, so the same spec always gives the same answer.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_name("name", &self.name)?;
        if self.priority > MAX_PRIORITY {
            return Err(ValidationError::new(
                "priority",
                format!(
                    "must be between 0 and {MAX_PRIORITY}, got {}",
                    self.priority
                ),
            ));
        }
        if let Some(circle) = &self.circle {
            check_name("circle", circle)?;
        }
        if self.groups.is_empty() {
            return Err(ValidationError::new(
                "groups",
                "at least one group is required",
            ));
        }
        if self.groups.len() > MAX_GROUPS {
            return Err(ValidationError::new(
                "groups",
                format!(
                    "at most {MAX_GROUPS} groups are allowed, got {}",
                    self.groups.len()
                ),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, group) in self.groups.iter().enumerate() {
            let path = format!("groups[{i}]");
            group.validate_at(&path)?;
            if !names.insert(group.name.as_str()) {
                return Err(ValidationError::new(
                    format!("{path}.name"),
                    format!("duplicate group name `{}`", group.name),
                ));
            }
        }
        Ok(())
    }

    /// The group called `name`.
    pub fn group(&self, name: &str) -> Option<&TaskGroup> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// Instances the job asks for across all groups.
    pub fn instance_count(&self) -> u64 {
        self.groups.iter().map(|g| u64::from(g.count)).sum()
    }
}

impl TaskGroup {
    fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        check_name(&format!("{path}.name"), &self.name)?;
        if self.count == 0 {
            return Err(ValidationError::new(
                format!("{path}.count"),
                "must be at least 1",
            ));
        }
        if self.count > MAX_GROUP_COUNT {
            return Err(ValidationError::new(
                format!("{path}.count"),
                format!("must be at most {MAX_GROUP_COUNT}, got {}", self.count),
            ));
        }
        self.resources.validate_at(&format!("{path}.resources"))?;
        for (j, constraint) in self.constraints.iter().enumerate() {
            constraint.validate_at(&format!("{path}.constraints[{j}]"))?;
        }
        for (k, spread) in self.spread.iter().enumerate() {
            spread.validate_at(&format!("{path}.spread[{k}]"))?;
        }
        for (k, affinity) in self.affinities.iter().enumerate() {
            affinity.validate_at(&format!("{path}.affinities[{k}]"))?;
        }
        if self.max_unavailable == Some(0) {
            return Err(ValidationError::new(
                format!("{path}.max_unavailable"),
                "must be at least 1; set `movable = false` to forbid voluntary moves",
            ));
        }
        self.task.validate_at(&format!("{path}.task"))
    }
}

impl Resources {
    fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        if self.cpu_millis.get() == 0 {
            return Err(ValidationError::new(
                format!("{path}.cpu_millis"),
                "must be greater than 0",
            ));
        }
        if self.memory_mib.get() == 0 {
            return Err(ValidationError::new(
                format!("{path}.memory_mib"),
                "must be greater than 0",
            ));
        }
        let Some(gpus) = &self.gpus else {
            return Ok(());
        };
        if gpus.count == 0 {
            return Err(ValidationError::new(
                format!("{path}.gpus.count"),
                "must be at least 1; omit `gpus` for a CPU-only group",
            ));
        }
        if gpus.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            return Err(ValidationError::new(
                format!("{path}.gpus.model"),
                "must not be empty when set",
            ));
        }
        if gpus.min_memory_mib.is_some_and(|m| m.get() == 0) {
            return Err(ValidationError::new(
                format!("{path}.gpus.min_memory_mib"),
                "must be greater than 0 when set",
            ));
        }
        if let Some(slice) = gpus.memory_slice_mib {
            if slice.get() == 0 {
                return Err(ValidationError::new(
                    format!("{path}.gpus.memory_slice_mib"),
                    "must be greater than 0 when set",
                ));
            }
            if gpus.count != 1 {
                return Err(ValidationError::new(
                    format!("{path}.gpus.count"),
                    format!(
                        "a memory slice is one shared GPU: count must be 1, got {}",
                        gpus.count
                    ),
                ));
            }
            if gpus.same_interconnect {
                return Err(ValidationError::new(
                    format!("{path}.gpus.same_interconnect"),
                    "does not apply to a memory slice of one GPU",
                ));
            }
        }
        Ok(())
    }
}

impl Constraint {
    fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        check_rule(path, &self.attribute, self.op, &self.value)
    }
}

impl Affinity {
    fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        check_rule(path, &self.attribute, self.op, &self.value)?;
        if self.weight == 0 || self.weight.abs() > MAX_AFFINITY_WEIGHT {
            return Err(ValidationError::new(
                format!("{path}.weight"),
                format!(
                    "must be between -{MAX_AFFINITY_WEIGHT} and {MAX_AFFINITY_WEIGHT} and not 0, got {}",
                    self.weight
                ),
            ));
        }
        Ok(())
    }
}

/// Checks an attribute rule, shared by constraints and affinities.
fn check_rule(
    path: &str,
    attribute: &str,
    op: ConstraintOp,
    value: &ConstraintValue,
) -> Result<(), ValidationError> {
    if attribute.trim().is_empty() {
        return Err(ValidationError::new(
            format!("{path}.attribute"),
            "must not be empty",
        ));
    }
    let field = format!("{path}.value");
    match op {
        ConstraintOp::In | ConstraintOp::NotIn => {
            let Some(values) = value.as_list() else {
                return Err(ValidationError::new(
                    field,
                    format!("`{op}` takes a list of values, e.g. [\"a\", \"b\"]"),
                ));
            };
            if values.is_empty() {
                return Err(ValidationError::new(
                    field,
                    format!("`{op}` needs at least one value"),
                ));
            }
        }
        ConstraintOp::Eq
        | ConstraintOp::Ne
        | ConstraintOp::Regex
        | ConstraintOp::Ge
        | ConstraintOp::Le => {
            let Some(value) = value.as_single() else {
                return Err(ValidationError::new(
                    field,
                    format!("`{op}` takes a single value, not a list"),
                ));
            };
            check_single_value(&field, op, value)?;
        }
    }
    Ok(())
}

fn check_single_value(field: &str, op: ConstraintOp, value: &str) -> Result<(), ValidationError> {
    match op {
        ConstraintOp::Regex => regex::RegexBuilder::new(value)
            .size_limit(MAX_REGEX_BYTES)
            .build()
            .map(drop)
            .map_err(|e| {
                ValidationError::new(field, format!("is not a valid regular expression: {e}"))
            }),
        ConstraintOp::Ge | ConstraintOp::Le => match value.trim().parse::<f64>() {
            Ok(n) if n.is_finite() => Ok(()),
            _ => Err(ValidationError::new(
                field,
                format!("`{op}` compares numbers; `{value}` is not a number"),
            )),
        },
        ConstraintOp::Eq | ConstraintOp::Ne | ConstraintOp::In | ConstraintOp::NotIn => Ok(()),
    }
}

impl Spread {
    fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        if self.attribute.trim().is_empty() {
            return Err(ValidationError::new(
                format!("{path}.attribute"),
                "must not be empty",
            ));
        }
        match self.weight {
            Some(w) if w == 0 || w > MAX_SPREAD_WEIGHT => Err(ValidationError::new(
                format!("{path}.weight"),
                format!("must be between 1 and {MAX_SPREAD_WEIGHT}, got {w}"),
            )),
            _ => Ok(()),
        }
    }
}

impl TaskSpec {
    fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
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
    fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
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

/// Checks a job, group or circle name: DNS-label-like so it can be used in host
/// names, paths and file names without escaping.
fn check_name(field: &str, value: &str) -> Result<(), ValidationError> {
    let fail = |message: String| Err(ValidationError::new(field, message));
    let Some(first) = value.chars().next() else {
        return fail("must not be empty".to_owned());
    };
    if value.len() > MAX_NAME_LEN {
        return fail(format!(
            "must be at most {MAX_NAME_LEN} characters, got {}",
            value.len()
        ));
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return fail("must start with a lowercase letter or a digit".to_owned());
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return fail(format!(
            "may contain only lowercase letters, digits, `-`, `_` and `.`; found `{bad}`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DIGEST: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    /// The example job of DESIGN.md, verbatim.
    fn design_example() -> serde_json::Value {
        json!({
          "name": "llama-chat",
          "kind": "service",
          "priority": 50,
          "circle": "vision-lab",
          "groups": [{
            "name": "replica",
            "count": 2,
            "gang": false,
            "resources": {"cpu_millis": 2000, "memory_mib": 8192,
                          "gpus": {"count": 1, "model": "H100", "min_memory_mib": 40000}},
            "constraints": [{"attribute": "country", "op": "in", "value": ["BE", "NL"]}],
            "spread": [{"attribute": "site"}],
            "task": {"driver": "exec", "command": "/usr/bin/python3", "args": ["serve.py"],
                     "env": {"MODE": "prod"}, "artifacts": [{"source": "...", "blake3": "..."}]}
          }]
        })
    }

    fn valid() -> serde_json::Value {
        let mut v = design_example();
        v["groups"][0]["task"]["artifacts"][0]["blake3"] = json!(DIGEST);
        v
    }

    fn parse(v: serde_json::Value) -> Result<JobSpec, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn design_example_parses_and_names_the_bad_digest() {
        let spec = parse(design_example()).unwrap();
        assert_eq!(spec.name, "llama-chat");
        assert_eq!(spec.kind, JobKind::Service);
        assert_eq!(spec.circle.as_deref(), Some("vision-lab"));
        let group = &spec.groups[0];
        assert_eq!(group.count, 2);
        assert_eq!(group.resources.cpu_millis, MilliCpu::new(2000));
        let gpus = group.resources.gpus.as_ref().unwrap();
        assert_eq!(gpus.min_memory_mib, Some(MemoryMib::new(40000)));
        assert_eq!(group.constraints[0].op, ConstraintOp::In);
        assert_eq!(
            group.constraints[0].value,
            ConstraintValue::Many(vec!["BE".into(), "NL".into()])
        );
        assert!(matches!(&group.task, TaskSpec::Exec(e) if e.env["MODE"] == "prod"));
        let err = spec.validate().unwrap_err();
        assert_eq!(err.field, "groups[0].task.artifacts[0].blake3");
        parse(valid()).unwrap().validate().unwrap();
    }

    #[test]
    fn toml_has_the_same_shape() {
        let text = format!(
            r#"
name = "llama-chat"
kind = "service"
priority = 50
circle = "vision-lab"

[[groups]]
name = "replica"
count = 2
gang = false
resources = {{ cpu_millis = 2000, memory_mib = 8192, gpus = {{ count = 1, model = "H100", min_memory_mib = 40000 }} }}
constraints = [{{ attribute = "country", op = "in", value = ["BE", "NL"] }}]
spread = [{{ attribute = "site" }}]

[groups.task]
driver = "exec"
command = "/usr/bin/python3"
args = ["serve.py"]
env = {{ MODE = "prod" }}
artifacts = [{{ source = "...", blake3 = "{DIGEST}" }}]
"#
        );
        let from_toml: JobSpec = toml::from_str(&text).unwrap();
        assert_eq!(from_toml, parse(valid()).unwrap());
        let round = toml::to_string(&from_toml).unwrap();
        assert_eq!(toml::from_str::<JobSpec>(&round).unwrap(), from_toml);
    }

    #[test]
    fn toml_rejects_unknown_keys_inside_the_task() {
        let text = r#"
name = "j"
[[groups]]
name = "g"
resources = { cpu_millis = 1, memory_mib = 1 }
[groups.task]
driver = "model-server"
model = "m"
replicas = 3
"#;
        let err = toml::from_str::<JobSpec>(text).unwrap_err();
        assert!(err.to_string().contains("replicas"), "{err}");
    }

    #[test]
    fn defaults_fill_omitted_fields() {
        let spec = parse(json!({
            "name": "j",
            "groups": [{"name": "g", "resources": {"cpu_millis": 100, "memory_mib": 64},
                        "task": {"driver": "model-server", "model": "blake3:abc"}}]
        }))
        .unwrap();
        assert_eq!(spec.kind, JobKind::Service);
        assert_eq!(spec.priority, DEFAULT_PRIORITY);
        assert_eq!(spec.groups[0].count, 1);
        assert!(!spec.groups[0].gang);
        assert_eq!(spec.instance_count(), 1);
        spec.validate().unwrap();
    }

    #[test]
    fn json_round_trip_is_lossless() {
        let spec = parse(valid()).unwrap();
        let text = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<JobSpec>(&text).unwrap(), spec);
    }

    #[test]
    fn unknown_fields_are_rejected_at_every_level() {
        let places: &[&[&str]] = &[
            &[],
            &["groups", "0"],
            &["groups", "0", "resources"],
            &["groups", "0", "resources", "gpus"],
            &["groups", "0", "constraints", "0"],
            &["groups", "0", "spread", "0"],
            &["groups", "0", "task"],
            &["groups", "0", "task", "artifacts", "0"],
        ];
        for place in places {
            let mut v = valid();
            let mut target = &mut v;
            for key in *place {
                target = match key.parse::<usize>() {
                    Ok(i) => &mut target[i],
                    Err(_) => &mut target[*key],
                };
            }
            target["surprise"] = json!(1);
            let err = parse(v).unwrap_err();
            assert!(err.to_string().contains("surprise"), "{place:?}: {err}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected_in_a_model_server_task() {
        let mut v = valid();
        v["groups"][0]["task"] = json!({"driver": "model-server", "model": "d", "command": "x"});
        let err = parse(v).unwrap_err();
        assert!(err.to_string().contains("command"), "{err}");
    }

    #[test]
    fn unknown_or_missing_driver_is_rejected() {
        let mut v = valid();
        v["groups"][0]["task"] = json!({"driver": "docker", "image": "x"});
        assert!(parse(v).unwrap_err().to_string().contains("docker"));
        let mut v = valid();
        v["groups"][0]["task"] = json!({"command": "x"});
        assert!(parse(v).unwrap_err().to_string().contains("driver"));
    }

    #[test]
    fn negative_numbers_and_wrong_value_types_are_parse_errors() {
        let mut v = valid();
        v["groups"][0]["resources"]["cpu_millis"] = json!(-1);
        assert!(parse(v).is_err());
        let mut v = valid();
        v["groups"][0]["constraints"][0]["value"] = json!(5);
        let err = parse(v).unwrap_err();
        assert!(
            err.to_string().contains("a string or a list of strings"),
            "{err}"
        );
    }

    /// Applies `edit` to a valid spec and returns the field validation blames.
    fn blamed(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v = valid();
        edit(&mut v);
        let spec = parse(v).expect("edit keeps the document parseable");
        spec.validate().expect_err("edit breaks a rule").field
    }

    /// An edit that breaks one rule of a valid spec.
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;

    #[test]
    fn validation_names_the_offending_field() {
        let cases: Vec<(&str, Edit)> = vec![
            ("name", Box::new(|v| v["name"] = json!(""))),
            ("name", Box::new(|v| v["name"] = json!("Llama"))),
            ("name", Box::new(|v| v["name"] = json!("-llama"))),
            ("name", Box::new(|v| v["name"] = json!("a b"))),
            ("name", Box::new(|v| v["name"] = json!("x".repeat(64)))),
            ("priority", Box::new(|v| v["priority"] = json!(101))),
            ("circle", Box::new(|v| v["circle"] = json!("Vision Lab"))),
            ("groups", Box::new(|v| v["groups"] = json!([]))),
            (
                "groups[0].name",
                Box::new(|v| v["groups"][0]["name"] = json!("")),
            ),
            (
                "groups[0].count",
                Box::new(|v| v["groups"][0]["count"] = json!(0)),
            ),
            (
                "groups[0].count",
                Box::new(|v| v["groups"][0]["count"] = json!(MAX_GROUP_COUNT + 1)),
            ),
            (
                "groups[0].resources.cpu_millis",
                Box::new(|v| v["groups"][0]["resources"]["cpu_millis"] = json!(0)),
            ),
            (
                "groups[0].resources.memory_mib",
                Box::new(|v| v["groups"][0]["resources"]["memory_mib"] = json!(0)),
            ),
            (
                "groups[0].resources.gpus.count",
                Box::new(|v| v["groups"][0]["resources"]["gpus"]["count"] = json!(0)),
            ),
            (
                "groups[0].resources.gpus.model",
                Box::new(|v| v["groups"][0]["resources"]["gpus"]["model"] = json!(" ")),
            ),
            (
                "groups[0].resources.gpus.min_memory_mib",
                Box::new(|v| v["groups"][0]["resources"]["gpus"]["min_memory_mib"] = json!(0)),
            ),
            (
                "groups[0].constraints[0].attribute",
                Box::new(|v| v["groups"][0]["constraints"][0]["attribute"] = json!("")),
            ),
            (
                "groups[0].constraints[0].value",
                Box::new(|v| v["groups"][0]["constraints"][0]["value"] = json!("BE")),
            ),
            (
                "groups[0].constraints[0].value",
                Box::new(|v| v["groups"][0]["constraints"][0]["value"] = json!([])),
            ),
            (
                "groups[0].constraints[0].value",
                Box::new(|v| {
                    v["groups"][0]["constraints"][0] =
                        json!({"attribute": "site", "op": "not_in", "value": "x"})
                }),
            ),
            (
                "groups[0].constraints[0].value",
                Box::new(|v| {
                    v["groups"][0]["constraints"][0] =
                        json!({"attribute": "site", "op": "regex", "value": "("})
                }),
            ),
            (
                "groups[0].constraints[0].value",
                Box::new(|v| {
                    v["groups"][0]["constraints"][0] =
                        json!({"attribute": "cuda", "op": ">=", "value": ["12"]})
                }),
            ),
            (
                "groups[0].constraints[0].value",
                Box::new(|v| {
                    v["groups"][0]["constraints"][0] =
                        json!({"attribute": "cuda", "op": "<=", "value": "twelve"})
                }),
            ),
            (
                "groups[0].constraints[0].value",
                Box::new(|v| {
                    v["groups"][0]["constraints"][0] =
                        json!({"attribute": "site", "op": "=", "value": ["a"]})
                }),
            ),
            (
                "groups[0].spread[0].attribute",
                Box::new(|v| v["groups"][0]["spread"][0]["attribute"] = json!("")),
            ),
            (
                "groups[0].spread[0].weight",
                Box::new(|v| v["groups"][0]["spread"][0]["weight"] = json!(0)),
            ),
            (
                "groups[0].resources.gpus.memory_slice_mib",
                Box::new(|v| v["groups"][0]["resources"]["gpus"]["memory_slice_mib"] = json!(0)),
            ),
            (
                "groups[0].resources.gpus.count",
                Box::new(|v| {
                    v["groups"][0]["resources"]["gpus"] =
                        json!({"count": 2, "memory_slice_mib": 10240})
                }),
            ),
            (
                "groups[0].resources.gpus.same_interconnect",
                Box::new(|v| {
                    v["groups"][0]["resources"]["gpus"] =
                        json!({"count": 1, "memory_slice_mib": 10240, "same_interconnect": true})
                }),
            ),
            (
                "groups[0].affinities[0].attribute",
                Box::new(|v| {
                    v["groups"][0]["affinities"] =
                        json!([{"attribute": " ", "op": "=", "value": "a", "weight": 5}])
                }),
            ),
            (
                "groups[0].affinities[0].value",
                Box::new(|v| {
                    v["groups"][0]["affinities"] =
                        json!([{"attribute": "site", "op": "in", "value": "a", "weight": 5}])
                }),
            ),
            (
                "groups[0].affinities[0].weight",
                Box::new(|v| {
                    v["groups"][0]["affinities"] =
                        json!([{"attribute": "site", "op": "=", "value": "a", "weight": 0}])
                }),
            ),
            (
                "groups[0].affinities[0].weight",
                Box::new(|v| {
                    v["groups"][0]["affinities"] =
                        json!([{"attribute": "site", "op": "=", "value": "a", "weight": -101}])
                }),
            ),
            (
                "groups[0].max_unavailable",
                Box::new(|v| v["groups"][0]["max_unavailable"] = json!(0)),
            ),
            (
                "groups[0].task.command",
                Box::new(|v| v["groups"][0]["task"]["command"] = json!("  ")),
            ),
            (
                "groups[0].task.env",
                Box::new(|v| v["groups"][0]["task"]["env"] = json!({"A=B": "c"})),
            ),
            (
                "groups[0].task.artifacts[0].source",
                Box::new(|v| v["groups"][0]["task"]["artifacts"][0]["source"] = json!("")),
            ),
            (
                "groups[0].task.model",
                Box::new(|v| {
                    v["groups"][0]["task"] = json!({"driver": "model-server", "model": ""})
                }),
            ),
            (
                "groups[1].name",
                Box::new(|v| {
                    let copy = v["groups"][0].clone();
                    v["groups"].as_array_mut().unwrap().push(copy);
                }),
            ),
        ];
        for (field, edit) in cases {
            assert_eq!(blamed(edit), field);
        }
    }

    #[test]
    fn good_constraints_pass() {
        let mut v = valid();
        v["groups"][0]["constraints"] = json!([
            {"attribute": "site", "op": "=", "value": "ghent"},
            {"attribute": "site", "op": "!=", "value": ""},
            {"attribute": "country", "op": "not_in", "value": ["FR"]},
            {"attribute": "gpu.model", "op": "regex", "value": "^H1[0-9]0$"},
            {"attribute": "cuda", "op": ">=", "value": "12.1"},
            {"attribute": "disk_mib", "op": "<=", "value": "1000000"},
        ]);
        v["groups"][0]["spread"] = json!([{"attribute": "site", "weight": 100}]);
        parse(v).unwrap().validate().unwrap();
    }

    #[test]
    fn placement_fields_default_and_round_trip() {
        let spec = parse(valid()).unwrap();
        let group = &spec.groups[0];
        assert!(group.movable && group.affinities.is_empty());
        assert_eq!(group.max_unavailable, None);
        let gpus = group.resources.gpus.as_ref().unwrap();
        assert!(!gpus.is_slice() && !gpus.same_interconnect);
        // Defaults stay off the wire, so older specs serialise exactly as before.
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["groups"][0].get("movable"), None);
        assert_eq!(
            json["groups"][0]["resources"]["gpus"].get("same_interconnect"),
            None
        );

        let mut v = valid();
        v["groups"][0]["movable"] = json!(false);
        v["groups"][0]["max_unavailable"] = json!(2);
        v["groups"][0]["affinities"] = json!([
            {"attribute": "site", "op": "=", "value": "ghent", "weight": 50},
            {"attribute": "farm", "op": "in", "value": ["a", "b"], "weight": -100},
        ]);
        v["groups"][0]["resources"]["gpus"] =
            json!({"count": 1, "model": "L4", "memory_slice_mib": 8192});
        let spec = parse(v).unwrap();
        spec.validate().unwrap();
        let group = &spec.groups[0];
        assert!(!group.movable);
        assert_eq!(group.max_unavailable, Some(2));
        assert_eq!(group.affinities[1].weight, -100);
        let gpus = group.resources.gpus.as_ref().unwrap();
        assert_eq!(gpus.memory_slice_mib, Some(MemoryMib::new(8192)));
        assert!(gpus.is_slice());
        let back: JobSpec = serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);

        let mut v = valid();
        v["groups"][0]["affinities"] =
            json!([{"attribute": "site", "op": "=", "value": "a", "weight": 1, "extra": 1}]);
        assert!(parse(v).is_err());
    }

    #[test]
    fn wire_words_parse_back() {
        for op in ConstraintOp::ALL {
            assert_eq!(op.as_str().parse::<ConstraintOp>().unwrap(), *op);
            assert_eq!(serde_json::to_value(op).unwrap(), json!(op.as_str()));
        }
        assert!("~".parse::<ConstraintOp>().is_err());
        assert_eq!("training".parse::<JobKind>().unwrap(), JobKind::Training);
    }
}
