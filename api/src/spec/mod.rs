//! The job specification users submit (JSON over the API, TOML from the CLI; one
//! shape). Every struct rejects unknown fields so a misspelt key is an error instead
//! of a silently ignored setting, and [`JobSpec::validate`] checks the rules serde
//! cannot express, naming the exact field that breaks one.
//!
//! | module | owns |
//! |---|---|
//! | this one | the job and its groups ([`JobSpec`], [`TaskGroup`]), names, the checks that walk them |
//! | `resources` | what an instance reserves: CPU, memory, GPUs ([`Resources`], [`GpuRequest`]) |
//! | `rules` | rules on node attributes: [`Constraint`], [`Affinity`], [`Spread`] |
//! | `env` | a task's environment variables ([`EnvVars`]) |
//! | `task` | what an instance runs: [`TaskSpec`], [`ExecTask`] with its [`RestartPolicy`] and [`Artifact`]s, [`ModelServerTask`] |
//! | `scaling` | how a service group's count follows its load ([`Scaling`]) and the changes it made ([`ScaleEvent`]) |
//! | `limits` | how big a spec and each of its fields may be ([`SizeError`], answered with 413) |
//!
//! Every type and limit is reached from here.

mod env;
mod limits;
mod resources;
mod rules;
mod scaling;
mod task;
#[cfg(test)]
mod tests;
mod update;

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;

pub use env::EnvVars;
pub use limits::{
    SizeError, MAX_ARGS, MAX_ARGS_BYTES, MAX_ARG_BYTES, MAX_ARTIFACTS, MAX_ATTRIBUTE_BYTES,
    MAX_COMMAND_BYTES, MAX_ENV_BYTES, MAX_ENV_NAME_BYTES, MAX_ENV_VALUE_BYTES, MAX_ENV_VARS,
    MAX_GROUPS, MAX_RULES, MAX_RULE_VALUES, MAX_RULE_VALUE_BYTES, MAX_SHORT_TEXT_BYTES,
    MAX_SOURCE_BYTES, MAX_SPEC_BYTES,
};
pub use resources::{GpuRequest, Resources};
pub use rules::{
    Affinity, Constraint, ConstraintOp, ConstraintValue, Spread, MAX_AFFINITY_WEIGHT,
    MAX_REGEX_BYTES, MAX_SPREAD_WEIGHT,
};
pub use scaling::{ScaleEvent, Scaling, MAX_SCALING_WINDOW};
pub use task::{
    Artifact, ExecTask, ModelServerTask, RestartMode, RestartPolicy, TaskSpec,
    DEFAULT_KILL_TIMEOUT_MS, MAX_KILL_TIMEOUT_MS, MAX_RESTART_ATTEMPTS,
};
pub use update::{CanaryChecks, Ratio, Span, UpdatePolicy};

/// Priority given to a job that does not state one.
pub const DEFAULT_PRIORITY: u32 = 50;
/// Highest accepted priority.
pub const MAX_PRIORITY: u32 = 100;
/// Longest accepted job, group or circle name (a DNS label's limit, so names can
/// appear in host names and paths).
pub const MAX_NAME_LEN: usize = 63;
/// Most instances one group may ask for; bounds the allocations one job can create.
pub const MAX_GROUP_COUNT: u32 = 10_000;

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
    #[serde(default, deserialize_with = "exact_vec")]
    pub groups: Vec<TaskGroup>,
}

/// A list read to exactly its length. JSON does not say how long a list is, so serde
/// grows the vector as it reads, and a list of one group kept four groups' room:
/// 1,856 bytes where 464 do, for every job the state keeps on every server.
fn exact_vec<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let mut items = Vec::<T>::deserialize(deserializer)?;
    items.shrink_to_fit();
    Ok(items)
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
    /// How many instances to run; with `scaling`, how many to start with (kept
    /// within its `min..=max`, and 0 allowed where `min` is 0).
    #[serde(default = "default_count")]
    #[schema(default = 1, minimum = 0)]
    pub count: u32,
    /// Place all `count` instances at once or none of them (distributed training).
    #[serde(default)]
    pub gang: bool,
    /// What each instance needs.
    pub resources: Resources,
    /// Node attributes an instance's node must satisfy; all must hold.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "exact_vec"
    )]
    pub constraints: Vec<Constraint>,
    /// Attributes to spread instances across (sites, countries).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "exact_vec"
    )]
    pub spread: Vec<Spread>,
    /// Weighted preferences for nodes; unlike constraints they never exclude a node.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "exact_vec"
    )]
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
    /// How a new version replaces the running one (services only); absent, an
    /// update replaces `max_unavailable` instances at a time without waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdatePolicy>,
    /// How the count follows the load (services serving a model only); absent,
    /// the count is fixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,
    /// What each instance runs.
    pub task: TaskSpec,
}

impl JobSpec {
    /// Checks the rules serde cannot express, the size limits first
    /// ([`JobSpec::check_size`]). The first broken rule is reported, with the path of
    /// its field, so the same spec always gives the same answer.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.check_size()?;
        self.validate_sized()
    }

    /// [`JobSpec::validate`] for a spec whose [`JobSpec::check_size`] already
    /// passed: the rules without writing the spec out again to measure it.
    pub fn validate_sized(&self) -> Result<(), ValidationError> {
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
        let mut names = BTreeSet::new();
        for (i, group) in self.groups.iter().enumerate() {
            let path = format!("groups[{i}]");
            if group.update.is_some() && self.kind != JobKind::Service {
                return Err(ValidationError::new(
                    format!("{path}.update"),
                    "only a service rolls out under an update policy",
                ));
            }
            if group.scaling.is_some() && self.kind != JobKind::Service {
                return Err(ValidationError::new(
                    format!("{path}.scaling"),
                    "only a service scales with its load",
                ));
            }
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
        if let Some(scaling) = &self.scaling {
            let at = format!("{path}.scaling");
            scaling.validate_at(&at)?;
            if self.gang {
                return Err(ValidationError::new(
                    at,
                    "a gang starts whole at one size; remove `scaling` or `gang`",
                ));
            }
            if !matches!(self.task, TaskSpec::ModelServer(_)) {
                return Err(ValidationError::new(
                    at,
                    "scaling follows the load the gateway relays, which only a \
                     `model-server` task takes",
                ));
            }
        }
        let least = if self.scaling.as_ref().is_some_and(|s| s.min == 0) {
            0
        } else {
            1
        };
        if self.count < least {
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
        if let Some(update) = &self.update {
            let at = format!("{path}.update");
            if self.gang {
                return Err(ValidationError::new(
                    at,
                    "a gang is replaced whole; remove `update` or `gang`",
                ));
            }
            // A scaled group's canaries are counted against its largest size.
            let most = self.scaling.as_ref().map_or(self.count, |s| s.max);
            update.validate_at(&at, most)?;
        }
        self.task.validate_at(&format!("{path}.task"))
    }

    /// Whether `other` runs the same instances as this group, whatever the count
    /// (for a gang, which starts whole, the same count too), the update policy or
    /// the scaling:
    /// an instance of one is an instance of the other, so a version that changes
    /// only those keeps its instances running.
    pub fn same_instances(&self, other: &TaskGroup) -> bool {
        if self.gang && self.count != other.count {
            return false;
        }
        let strip = |g: &TaskGroup| TaskGroup {
            count: 0,
            update: None,
            max_unavailable: None,
            scaling: None,
            ..g.clone()
        };
        strip(self) == strip(other)
    }
}

impl JobSpec {
    /// The spec as reads show it: every task's `env` values are secrets, written
    /// once and shown as [`crate::access::REDACTED`] to every reader.
    pub fn redacted(&self) -> JobSpec {
        let mut spec = self.clone();
        for group in &mut spec.groups {
            if let TaskSpec::Exec(task) = &mut group.task {
                for value in task.env.values_mut() {
                    *value = crate::access::REDACTED.to_owned();
                }
            }
        }
        spec
    }
}

/// Checks a job, group or circle name: DNS-label-like so it can be used in host
/// names, paths and file names without escaping.
pub fn check_name(field: &str, value: &str) -> Result<(), ValidationError> {
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
