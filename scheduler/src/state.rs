//! The cluster state machine: every node, job, allocation, evaluation and registered
//! model the control plane knows, changed only by applying Raft-committed
//! [`Command`]s.
//!
//! Applying is deterministic: ids and timestamps come from the command (or, for
//! evaluations the state machine creates itself, from the log index), maps are
//! ordered, and nothing reads the clock or a random source, so every replica that
//! applies the same log holds the same bytes. A command that breaks a rule is
//! rejected whole and leaves the state untouched. Commands may be applied twice (the
//! driver re-proposes when it cannot tell whether a proposal committed), so each
//! one is idempotent: a replay answers what the first application answered.

use std::collections::{BTreeMap, BTreeSet};

use aigrid_api::manifest::{Locations, ManifestError, Registration};
use aigrid_api::{
    AllocId, AllocState, Allocation, AllocationLogs, AllocationReport, Assignment,
    DeleteJobResponse, DesiredState, DrainSpec, ErrorCode, EvalId, EvalStatus, EvalTrigger,
    Evaluation, GpuHealth, Heartbeat, Job, JobId, JobKind, JobSpec, JobStatus, JobSummary,
    JoinTokenInfo, LogTail, MemoryMib, MilliCpu, ModelSummary, Node, NodeAssignments, NodeId,
    NodePublicKey, NodeRegistration, NodeStatus, NodeUsage, SubmitJobResponse, Timestamp, Unplaced,
    ValidationError,
};
use aigrid_consensus::state_machine::{SnapshotError, StateMachine};
use serde::{Deserialize, Serialize};

/// Evaluations kept by default. Older ones are forgotten, completed ones first, so a
/// stream of submissions cannot grow the state without bound.
pub const DEFAULT_EVAL_LIMIT: usize = 10_000;

/// Delay before the first reschedule of an instance that failed or was lost; it
/// doubles with each reschedule of the same instance in a row.
pub const RESCHEDULE_BASE_MS: u64 = 1_000;
/// Longest delay between reschedules of one instance.
pub const RESCHEDULE_MAX_MS: u64 = 300_000;

/// How long to wait before rescheduling an instance rescheduled `reschedules` times
/// in a row already: exponential, capped, so a crash-looping workload cannot keep
/// the planner and the cluster busy.
pub fn reschedule_delay_ms(reschedules: u32) -> u64 {
    RESCHEDULE_BASE_MS
        .saturating_mul(1u64 << reschedules.min(32))
        .min(RESCHEDULE_MAX_MS)
}

/// Version of the snapshot layout; a snapshot of another version is refused rather
/// than misread.
const SNAPSHOT_FORMAT: u32 = 1;

/// One change to the cluster state, carried in a Raft log entry as JSON
/// (`{"type": "submit_job", ...}`). Every variant carries the time it was proposed
/// (`at`), read from the proposer's clock, so replicas agree on timestamps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Creates a job, or updates the live job with the same name in place (same id,
    /// version + 1, the incoming `job_id` unused). Resubmitting an unchanged spec is
    /// a no-op that answers the job's current version and latest evaluation.
    SubmitJob {
        /// Id for the job if it is new.
        job_id: JobId,
        /// Id of the evaluation to create; also recognises a replay of this command.
        eval_id: EvalId,
        /// The submitted spec; validated again here.
        spec: JobSpec,
        /// When it was submitted.
        at: Timestamp,
    },
    /// Removes a job and asks for its allocations to stop.
    DeleteJob {
        /// The job to delete.
        job_id: JobId,
        /// Id of the `job_delete` evaluation to create; also recognises a replay.
        eval_id: EvalId,
        /// When it was deleted.
        at: Timestamp,
    },
    /// Adds a node, or refreshes a known node's inventory (an agent restart). A known
    /// node keeps `registered_at` and stays draining if an operator drained it;
    /// allocations holding GPUs the node no longer reports become lost.
    RegisterNode {
        /// What the agent reported.
        node: NodeRegistration,
        /// The join token a new node (or one whose key was revoked) presents; a
        /// known node re-registers with its own key instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        join_token: Option<TokenUse>,
        /// When it registered.
        at: Timestamp,
    },
    /// Records that nodes were heard from by a server, without anything else to
    /// change: servers batch plain heartbeats into one entry every few seconds
    /// instead of committing each. Down and revoked nodes are left alone; they come
    /// back only through a heartbeat of their own.
    NodesSeen {
        /// The nodes heard from.
        nodes: Vec<NodeId>,
        /// The earliest time any of them was heard from in the batch, so `last_seen`
        /// never runs ahead of the truth.
        at: Timestamp,
    },
    /// Revokes a node's key: its requests are refused from now on, it is marked
    /// down and its instances are rescheduled.
    RevokeNode {
        /// The node.
        node_id: NodeId,
        /// When it was revoked.
        at: Timestamp,
    },
    /// Creates a join token. Only the secret's hash is replicated.
    CreateJoinToken {
        /// The token's public id.
        id: String,
        /// BLAKE3 of its secret, hex.
        secret_hash: String,
        /// Its lifetime.
        ttl_secs: u64,
        /// How many nodes may join with it; unlimited when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_uses: Option<u32>,
        /// The operator's note.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        /// When it was made.
        at: Timestamp,
    },
    /// Deletes a join token; nodes that joined with it stay.
    DeleteJoinToken {
        /// The token's public id.
        id: String,
        /// When it was deleted.
        at: Timestamp,
    },
    /// Records that a node is alive (a node marked down comes back), the health of
    /// its GPUs and the states of its allocations. A GPU turning unhealthy is
    /// cordoned: only the allocations holding it are lost and rescheduled.
    NodeHeartbeat {
        /// The node.
        node_id: NodeId,
        /// GPU health changes; GPUs not listed keep theirs.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gpus: Vec<GpuHealth>,
        /// Allocation states, as [`Command::ReportAllocations`] takes them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        allocations: Vec<AllocationReport>,
        /// Output tails of the node's allocations.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        logs: Vec<LogTail>,
        /// When the heartbeat arrived.
        at: Timestamp,
    },
    /// Starts draining a node: it takes no new work and the leader migrates its
    /// allocations elsewhere, at most `drain.max_parallel` at a time.
    DrainNode {
        /// The node.
        node_id: NodeId,
        /// How to drain it.
        drain: DrainSpec,
        /// When the drain was asked for.
        at: Timestamp,
    },
    /// Changes a node's status: `ready` (an operator ends a drain), `draining` (a
    /// drain one at a time) or `down` (missed heartbeats: its instances become lost
    /// and their jobs get `node_update` evaluations, delayed by the reschedule
    /// backoff).
    SetNodeStatus {
        /// The node.
        node_id: NodeId,
        /// Its new status.
        status: NodeStatus,
        /// When the change was decided.
        at: Timestamp,
    },
    /// Writes the planner's placements and stop requests. All-or-nothing: every
    /// allocation is checked (known job and node, the group's GPUs healthy on that
    /// node and not held by another live allocation, CPU and memory free) before any
    /// is written. A replacement (`previous`) forgets the finished allocation it
    /// replaces; a job whose wanted instance is stopped without a replacement (it was
    /// preempted) gets a `preemption` evaluation.
    UpsertAllocations {
        /// The allocations, whole.
        allocations: Vec<Allocation>,
        /// When the plan was applied.
        at: Timestamp,
    },
    /// An agent's report of the state of allocations on its node. Reports for
    /// allocations already forgotten are ignored; finished states never change again.
    ReportAllocations {
        /// The reporting node; it may report only its own allocations.
        node_id: NodeId,
        /// The states it observed.
        reports: Vec<AllocationReport>,
        /// When the report arrived.
        at: Timestamp,
    },
    /// Records the planner's verdict on an evaluation and, for the job's current
    /// version, which instances it could not place.
    UpdateEvaluation {
        /// The evaluation.
        eval_id: EvalId,
        /// Its new status.
        status: EvalStatus,
        /// Instances that did not fit; empty when everything was placed.
        #[serde(default)]
        unplaced: Vec<Unplaced>,
        /// When the verdict was reached.
        at: Timestamp,
    },
    /// What a scheduling pass decided for a batch of jobs, in one log entry: per
    /// job its placements, stops and evaluation verdicts. Each job's plan is
    /// checked against the state as it is when the entry applies and commits whole
    /// or not at all (a gang is never split); a refused job plan leaves the
    /// other jobs' plans applied and blocks its evaluations with the reason.
    ApplyPlan {
        /// One plan per job.
        jobs: Vec<JobPlan>,
        /// When the plans were made.
        at: Timestamp,
    },
    /// The verdicts on a batch of evaluations planned together, in one log entry.
    /// Evaluations forgotten since planning are skipped rather than failing the batch.
    UpdateEvaluations {
        /// One verdict per evaluation.
        updates: Vec<EvaluationUpdate>,
        /// When the verdicts were reached.
        at: Timestamp,
    },
    /// Registers a dispersed-store model under its digest, after checking again its
    /// signature, its consistency and its locations. A digest already registered
    /// keeps its record and is answered as it is.
    RegisterModel {
        /// The signed manifest and its shards' locations.
        registration: Registration,
        /// When it was registered.
        at: Timestamp,
    },
    /// Replaces where a model's shards are and bumps its locations version; the
    /// locations it already has change nothing.
    SetModelLocations {
        /// The model.
        digest: String,
        /// The backend of every shard of every stripe; checked against the manifest.
        locations: Locations,
        /// Refuses the change (409) unless the current version is this one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_version: Option<u64>,
        /// When the change was made.
        at: Timestamp,
    },
    /// Forgets a model; its shards are left where they are.
    DeleteModel {
        /// The model.
        digest: String,
        /// When it was deleted.
        at: Timestamp,
    },
}

/// A join token presented with a registration: its id and the hash of the secret
/// presented, compared with the stored hash when the registration applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    /// The token's public id.
    pub id: String,
    /// BLAKE3 of the presented secret, hex.
    pub secret_hash: String,
}

/// What one scheduling pass decided for one job, as [`Command::ApplyPlan`] carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPlan {
    /// The job planned.
    pub job_id: JobId,
    /// The version planned for; a plan for an older version is refused.
    pub job_version: u64,
    /// New allocations, each reserving what its group asks for at `job_version`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub place: Vec<NewAllocation>,
    /// Allocations to stop, of this job or (preemption, migration) of others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<AllocId>,
    /// Replacements of other jobs' allocations moved to make room for this job's
    /// placements (their old allocations are in `stop`); part of this plan, so a
    /// move is never committed without what it made room for, nor the reverse.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<MovedAllocation>,
    /// Verdicts on the job's evaluations, applied with the placements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evals: Vec<EvaluationUpdate>,
}

impl JobPlan {
    /// A plan for `job_id` at `job_version` that changes nothing yet.
    pub fn new(job_id: JobId, job_version: u64) -> Self {
        Self {
            job_id,
            job_version,
            place: Vec::new(),
            stop: Vec::new(),
            moves: Vec::new(),
            evals: Vec::new(),
        }
    }
}

/// An instance of another job moved by a [`JobPlan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedAllocation {
    /// The moved instance's job.
    pub job_id: JobId,
    /// That job's version, which must still be current.
    pub job_version: u64,
    /// Where it goes.
    pub alloc: NewAllocation,
}

/// A placement in a [`JobPlan`]: the instance, where, and on which GPUs. Its
/// resources are the group's, so the log does not repeat them per instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewAllocation {
    /// Unique over the cluster's life.
    pub id: AllocId,
    /// The task group.
    pub group: String,
    /// The instance index.
    pub index: u32,
    /// The node chosen.
    pub node: NodeId,
    /// The GPUs reserved, by uuid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
    /// The allocation it replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<AllocId>,
    /// Reschedules in a row so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reschedules: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl NewAllocation {
    /// A placement as the plan carries it, under a fresh id.
    pub fn new(
        placement: &crate::planner::Placement,
        previous: Option<AllocId>,
        reschedules: u32,
    ) -> Self {
        Self {
            id: AllocId::new(uuid::Uuid::new_v4().to_string()),
            group: placement.group.clone(),
            index: placement.index,
            node: placement.node_id.clone(),
            gpus: placement.gpus.clone(),
            previous,
            reschedules,
        }
    }

    /// The allocation this placement becomes: pending, wanted, reserving what
    /// `group` asks for.
    pub fn to_allocation(
        &self,
        job_id: &JobId,
        job_version: u64,
        group: &aigrid_api::TaskGroup,
        at: Timestamp,
    ) -> Allocation {
        Allocation {
            id: self.id.clone(),
            job_id: job_id.clone(),
            job_version,
            node_id: self.node.clone(),
            group: self.group.clone(),
            index: self.index,
            resources: group.resources.clone(),
            gpus: self.gpus.clone(),
            previous: self.previous.clone(),
            reschedules: self.reschedules,
            state: AllocState::Pending,
            desired: DesiredState::Run,
            reason: None,
            restarts: 0,
            limits: None,
            endpoint: None,
            created_at: at,
            updated_at: at,
        }
    }
}

/// The planner's verdict on one evaluation, as [`Command::UpdateEvaluations`] carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvaluationUpdate {
    /// The evaluation.
    pub eval_id: EvalId,
    /// Its new status.
    pub status: EvalStatus,
    /// Instances that did not fit; empty when everything was placed.
    #[serde(default)]
    pub unplaced: Vec<Unplaced>,
}

/// What applying a [`Command`] answers to its proposer.
pub type CommandOutput = Result<Applied, StateError>;

/// The successful outcome of a [`Command`], one variant per kind of change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// A job was created, updated, or resubmitted unchanged.
    JobSubmitted(SubmitJobResponse),
    /// A job was deleted.
    JobDeleted(DeleteJobResponse),
    /// A node registered.
    NodeRegistered {
        /// The node.
        id: NodeId,
        /// True for a node not seen before.
        created: bool,
        /// Evaluations created for jobs that lost instances with vanished GPUs.
        eval_ids: Vec<EvalId>,
    },
    /// A node heartbeated or changed status.
    NodeUpdated {
        /// The node.
        id: NodeId,
        /// Its status now.
        status: NodeStatus,
        /// Evaluations created for jobs with instances on the node.
        eval_ids: Vec<EvalId>,
    },
    /// Allocations were written.
    AllocationsUpserted {
        /// How many the command carried.
        count: usize,
        /// Evaluations created for jobs whose instances were preempted.
        eval_ids: Vec<EvalId>,
    },
    /// An agent's report was recorded.
    AllocationsReported {
        /// How many allocations changed state.
        updated: usize,
        /// Evaluations created to reschedule failed service instances.
        eval_ids: Vec<EvalId>,
    },
    /// An evaluation's status was recorded.
    EvaluationUpdated {
        /// The evaluation.
        id: EvalId,
    },
    /// A batch of job plans was applied.
    PlanApplied {
        /// Allocations placed.
        placed: usize,
        /// Allocations stopped.
        stopped: usize,
        /// Job plans refused, with the reason.
        refused: Vec<(JobId, String)>,
        /// Evaluations created for jobs whose instances were preempted.
        eval_ids: Vec<EvalId>,
    },
    /// A batch of verdicts was recorded.
    EvaluationsUpdated {
        /// How many evaluations still existed and were updated.
        updated: usize,
    },
    /// A batch of plain heartbeats was recorded.
    NodesSeen {
        /// How many nodes' `last_seen` moved.
        updated: usize,
    },
    /// A join token was created.
    JoinTokenCreated(JoinTokenInfo),
    /// A join token was deleted.
    JoinTokenDeleted {
        /// Its id.
        id: String,
    },
    /// A model was registered, or was already.
    ModelRegistered {
        /// The model as registered.
        summary: ModelSummary,
        /// True for the command that registered it; false when it already was.
        created: bool,
    },
    /// A model's locations were set.
    ModelLocationsSet(ModelSummary),
    /// A model was forgotten.
    ModelDeleted {
        /// Its digest.
        digest: String,
    },
}

/// The kinds of object a command can address, for [`StateError::NotFound`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A job.
    Job,
    /// A node.
    Node,
    /// An allocation.
    Allocation,
    /// An evaluation.
    Evaluation,
    /// A join token.
    JoinToken,
    /// A registered model.
    Model,
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Job => "job",
            Self::Node => "node",
            Self::Allocation => "allocation",
            Self::Evaluation => "evaluation",
            Self::JoinToken => "join token",
            Self::Model => "model",
        })
    }
}

/// Why a command was rejected. A rejected command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The command addresses an object that does not exist.
    #[error("{kind} `{id}` not found")]
    NotFound {
        /// What kind of object.
        kind: ObjectKind,
        /// Its id.
        id: String,
    },
    /// A field of the command breaks a rule.
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    /// The command contradicts the state (an id reused for something else, a GPU
    /// already held).
    #[error("{message}")]
    Conflict {
        /// What contradicts what.
        message: String,
    },
    /// The registration's key or join token is not accepted.
    #[error("{0}")]
    Unauthorized(String),
    /// A model's manifest is not signed by its publisher, or contradicts itself.
    #[error("{0}")]
    Manifest(ManifestError),
    /// A model's shard locations do not fit its manifest.
    #[error("shard locations do not fit the manifest: {0}")]
    BadLocations(String),
}

impl StateError {
    /// The API error code this rejection is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotFound { .. } => ErrorCode::NotFound,
            Self::Invalid(_) => ErrorCode::InvalidField,
            Self::Conflict { .. } => ErrorCode::Conflict,
            Self::Unauthorized(_) => ErrorCode::Unauthorized,
            Self::Manifest(ManifestError::Signature(_)) => ErrorCode::SignatureInvalid,
            Self::Manifest(ManifestError::Inconsistent(_)) | Self::BadLocations(_) => {
                ErrorCode::InvalidManifest
            }
        }
    }

    pub(crate) fn not_found(kind: ObjectKind, id: impl std::fmt::Display) -> Self {
        Self::NotFound {
            kind,
            id: id.to_string(),
        }
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::Conflict {
            message: message.into(),
        }
    }
}

/// Object counts, for metrics and status pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCounts {
    /// Live jobs.
    pub jobs: usize,
    /// Known nodes.
    pub nodes: usize,
    /// Nodes accepting new work.
    pub nodes_ready: usize,
    /// Allocations kept, including ones being stopped.
    pub allocations: usize,
    /// Allocations wanted and not finished.
    pub allocations_live: usize,
    /// Evaluations kept.
    pub evaluations: usize,
    /// Evaluations waiting for the planner.
    pub evaluations_pending: usize,
    /// Evaluations waiting for capacity.
    pub evaluations_blocked: usize,
    /// Registered models.
    pub models: usize,
}

/// What the state keeps per job beyond its spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobRecord {
    id: JobId,
    spec: JobSpec,
    version: u64,
    submitted_at: Timestamp,
    updated_at: Timestamp,
    /// The evaluation of the latest submission; answered to an unchanged resubmit.
    last_eval: EvalId,
    /// The planner's latest word on instances it could not place.
    unplaced: Vec<Unplaced>,
}

/// An evaluation with its creation order, which decides which ones are forgotten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalRecord {
    seq: u64,
    eval: Evaluation,
}

/// Everything a snapshot holds. Kept apart from the derived indexes so a snapshot
/// cannot be loaded without rebuilding them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tables {
    format: u32,
    eval_limit: usize,
    next_eval_seq: u64,
    nodes: BTreeMap<NodeId, Node>,
    jobs: BTreeMap<JobId, JobRecord>,
    allocations: BTreeMap<AllocId, Allocation>,
    evaluations: BTreeMap<EvalId, EvalRecord>,
    #[serde(default)]
    join_tokens: BTreeMap<String, TokenRecord>,
    /// Output tails agents shipped, per allocation; dropped with the allocation.
    #[serde(default)]
    logs: BTreeMap<AllocId, LogRecord>,
    /// Per node, the log index of the last change to what its agent must run.
    #[serde(default)]
    node_index: BTreeMap<NodeId, u64>,
    /// Registered models by digest.
    #[serde(default)]
    models: crate::models::Models,
}

/// A join token as the state keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRecord {
    info: JoinTokenInfo,
    secret_hash: String,
}

/// An allocation's output tails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogRecord {
    stdout: String,
    stderr: String,
    updated_at: Timestamp,
}

/// Wakes agents' long polls when their node's assignments change. Not part of the
/// replicated state: each server wakes the polls it holds as it applies entries.
#[derive(Default)]
pub struct NodeWatch {
    senders: parking_lot::Mutex<std::collections::HashMap<NodeId, tokio::sync::watch::Sender<u64>>>,
}

impl std::fmt::Debug for NodeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeWatch({} nodes watched)", self.senders.lock().len())
    }
}

impl NodeWatch {
    /// A receiver that changes when `node`'s assignments change. Subscribe before
    /// reading the state so no change between the read and the wait is missed.
    pub fn subscribe(&self, node: &NodeId) -> tokio::sync::watch::Receiver<u64> {
        self.senders
            .lock()
            .entry(node.clone())
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    fn touch(&self, node: &NodeId, index: u64) {
        let mut senders = self.senders.lock();
        if let Some(tx) = senders.get(node) {
            if tx.receiver_count() == 0 {
                senders.remove(node);
            } else {
                tx.send_replace(index);
            }
        }
    }

    fn touch_all(&self, index: u64) {
        let mut senders = self.senders.lock();
        senders.retain(|_, tx| tx.receiver_count() > 0);
        for tx in senders.values() {
            tx.send_replace(index);
        }
    }
}

/// The replicated cluster state. See the module documentation for its rules.
#[derive(Debug, Clone)]
pub struct ClusterState {
    tables: Tables,
    /// Live job names to ids; derived from `tables.jobs`.
    job_names: BTreeMap<String, JobId>,
    /// Evaluation creation order; derived from `tables.evaluations`.
    eval_order: BTreeMap<u64, EvalId>,
    /// Creation order of completed evaluations, trimmed first; derived too, so
    /// trimming never scans every evaluation.
    completed: BTreeSet<u64>,
    /// Allocations by job and node, and what live ones hold; derived, so no command
    /// or read scans every allocation.
    index: AllocIndex,
    /// Bumped whenever capacity may have been added or freed (a node changed, an
    /// allocation stopped holding resources), so the leader knows when blocked
    /// evaluations deserve another try. Derived; never replicated.
    capacity_epoch: u64,
    /// The log index being applied, so allocation writes can stamp the nodes
    /// whose assignments they change.
    applying: u64,
    /// Long polls waiting on nodes' assignments.
    watch: std::sync::Arc<NodeWatch>,
}

/// Allocations indexed by job and by node, and what the live ones hold per node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct AllocIndex {
    by_job: BTreeMap<JobId, BTreeSet<AllocId>>,
    by_node: BTreeMap<NodeId, BTreeSet<AllocId>>,
    held: BTreeMap<NodeId, Held>,
    live: usize,
}

/// What the live allocations on one node hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Held {
    cpu: u64,
    memory: u64,
    allocations: u32,
    gpus: BTreeMap<String, GpuHeld>,
}

/// How one GPU is held: whole by one allocation, or in memory slices by several.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct GpuHeld {
    whole: Option<AllocId>,
    sliced: u64,
    slices: u32,
}

/// The GPU memory slice an allocation holds on its one shared GPU, if it asked for
/// a slice rather than whole GPUs.
fn slice_of(alloc: &Allocation) -> Option<u64> {
    alloc
        .resources
        .gpus
        .as_ref()
        .and_then(|g| g.memory_slice_mib)
        .map(MemoryMib::get)
}

impl Held {
    fn add(&mut self, alloc: &Allocation) {
        self.cpu += alloc.resources.cpu_millis.get();
        self.memory += alloc.resources.memory_mib.get();
        self.allocations += 1;
        let slice = slice_of(alloc);
        for uuid in &alloc.gpus {
            let gpu = self.gpus.entry(uuid.clone()).or_default();
            match slice {
                Some(mib) => {
                    gpu.sliced += mib;
                    gpu.slices += 1;
                }
                None => gpu.whole = Some(alloc.id.clone()),
            }
        }
    }

    fn remove(&mut self, alloc: &Allocation) {
        self.cpu = self.cpu.saturating_sub(alloc.resources.cpu_millis.get());
        self.memory = self.memory.saturating_sub(alloc.resources.memory_mib.get());
        self.allocations = self.allocations.saturating_sub(1);
        let slice = slice_of(alloc);
        for uuid in &alloc.gpus {
            let Some(gpu) = self.gpus.get_mut(uuid) else {
                continue;
            };
            match slice {
                Some(mib) => {
                    gpu.sliced = gpu.sliced.saturating_sub(mib);
                    gpu.slices = gpu.slices.saturating_sub(1);
                }
                None if gpu.whole.as_ref() == Some(&alloc.id) => gpu.whole = None,
                None => {}
            }
            if gpu.whole.is_none() && gpu.slices == 0 {
                self.gpus.remove(uuid);
            }
        }
    }
}

/// Removes `id` from the set under `key`, dropping the set once empty.
fn forget<K: Ord>(map: &mut BTreeMap<K, BTreeSet<AllocId>>, key: &K, id: &AllocId) {
    if let Some(set) = map.get_mut(key) {
        set.remove(id);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

impl AllocIndex {
    fn from_allocations<'a>(allocations: impl IntoIterator<Item = &'a Allocation>) -> Self {
        let mut index = Self::default();
        for alloc in allocations {
            index.add(alloc);
        }
        index
    }

    fn add(&mut self, alloc: &Allocation) {
        self.by_job
            .entry(alloc.job_id.clone())
            .or_default()
            .insert(alloc.id.clone());
        self.by_node
            .entry(alloc.node_id.clone())
            .or_default()
            .insert(alloc.id.clone());
        if alloc.is_live() {
            self.live += 1;
            self.held
                .entry(alloc.node_id.clone())
                .or_default()
                .add(alloc);
        }
    }

    fn remove(&mut self, alloc: &Allocation) {
        forget(&mut self.by_job, &alloc.job_id, &alloc.id);
        forget(&mut self.by_node, &alloc.node_id, &alloc.id);
        if alloc.is_live() {
            self.live = self.live.saturating_sub(1);
            if let Some(held) = self.held.get_mut(&alloc.node_id) {
                held.remove(alloc);
                if held.allocations == 0 {
                    self.held.remove(&alloc.node_id);
                }
            }
        }
    }
}

impl Default for ClusterState {
    fn default() -> Self {
        Self::with_eval_limit(DEFAULT_EVAL_LIMIT)
    }
}

impl ClusterState {
    /// An empty state keeping at most `limit` evaluations (at least one). The limit
    /// is part of the replicated state, so every replica must start from the same.
    pub fn with_eval_limit(limit: usize) -> Self {
        Self::from_tables(Tables {
            format: SNAPSHOT_FORMAT,
            eval_limit: limit.max(1),
            next_eval_seq: 0,
            nodes: BTreeMap::new(),
            jobs: BTreeMap::new(),
            allocations: BTreeMap::new(),
            evaluations: BTreeMap::new(),
            join_tokens: BTreeMap::new(),
            logs: BTreeMap::new(),
            node_index: BTreeMap::new(),
            models: crate::models::Models::default(),
        })
    }

    fn from_tables(tables: Tables) -> Self {
        let job_names = tables
            .jobs
            .values()
            .map(|job| (job.spec.name.clone(), job.id.clone()))
            .collect();
        let eval_order = tables
            .evaluations
            .values()
            .map(|record| (record.seq, record.eval.id.clone()))
            .collect();
        let completed = tables
            .evaluations
            .values()
            .filter(|record| record.eval.status == EvalStatus::Complete)
            .map(|record| record.seq)
            .collect();
        let index = AllocIndex::from_allocations(tables.allocations.values());
        Self {
            tables,
            job_names,
            eval_order,
            completed,
            index,
            capacity_epoch: 0,
            applying: 0,
            watch: std::sync::Arc::default(),
        }
    }

    /// The long-poll registry this state wakes as it applies entries.
    pub fn watch(&self) -> std::sync::Arc<NodeWatch> {
        self.watch.clone()
    }

    /// Records that what `node`'s agent must run changed at the entry being applied.
    fn touch_node(&mut self, node: &NodeId) {
        let index = self.applying;
        match self.tables.node_index.get_mut(node) {
            Some(i) => *i = index,
            None => {
                self.tables.node_index.insert(node.clone(), index);
            }
        }
        self.watch.touch(node, index);
    }

    // ----- allocation table: every write goes through these, keeping the index --

    /// Inserts or replaces an allocation.
    fn put_alloc(&mut self, alloc: Allocation) {
        let old = self.tables.allocations.remove(&alloc.id);
        if let Some(old) = &old {
            if old.is_live() && !alloc.is_live() {
                self.capacity_epoch += 1;
            }
            self.index.remove(old);
        }
        if old.as_ref().map(assigned) != Some(assigned(&alloc)) {
            self.touch_node(&alloc.node_id);
        }
        self.index.add(&alloc);
        self.tables.allocations.insert(alloc.id.clone(), alloc);
    }

    /// Removes an allocation.
    fn drop_alloc(&mut self, id: &AllocId) -> Option<Allocation> {
        let old = self.tables.allocations.remove(id)?;
        if old.is_live() {
            self.capacity_epoch += 1;
        }
        if assigned(&old).0 {
            self.touch_node(&old.node_id);
        }
        self.tables.logs.remove(id);
        self.index.remove(&old);
        Some(old)
    }

    /// Ids of the allocations of one job.
    fn job_alloc_ids(&self, job_id: &JobId) -> Vec<AllocId> {
        self.index
            .by_job
            .get(job_id)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Ids of the allocations on one node.
    fn node_alloc_ids(&self, node_id: &NodeId) -> Vec<AllocId> {
        self.index
            .by_node
            .get(node_id)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn job_allocs(&self, job_id: &JobId) -> Vec<&Allocation> {
        self.index
            .by_job
            .get(job_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tables.allocations.get(id))
            .collect()
    }

    // ----- reads -------------------------------------------------------------

    /// The job with this id, with its allocations and derived status.
    pub fn job(&self, id: &JobId) -> Option<Job> {
        self.tables.jobs.get(id).map(|record| self.job_view(record))
    }

    /// The live job with this name.
    pub fn job_by_name(&self, name: &str) -> Option<Job> {
        self.job_names.get(name).and_then(|id| self.job(id))
    }

    /// Every live job, ordered by name.
    pub fn jobs(&self) -> Vec<JobSummary> {
        self.job_names
            .values()
            .filter_map(|id| self.tables.jobs.get(id))
            .map(|job| {
                let allocs = &self.job_allocs(&job.id);
                JobSummary {
                    id: job.id.clone(),
                    name: job.spec.name.clone(),
                    kind: job.spec.kind,
                    priority: job.spec.priority,
                    version: job.version,
                    status: job_status(&job.spec, allocs),
                    submitted_at: job.submitted_at,
                    updated_at: job.updated_at,
                    groups: u32::try_from(job.spec.groups.len()).unwrap_or(u32::MAX),
                    instances: job.spec.instance_count(),
                    running: count_wanted(allocs, AllocState::Running),
                }
            })
            .collect()
    }

    /// The node with this id, with what its allocations hold.
    pub fn node(&self, id: &NodeId) -> Option<Node> {
        self.tables.nodes.get(id).map(|n| self.node_view(n))
    }

    /// A node's status, without building its view; `None` for an unknown node.
    pub fn node_status(&self, id: &NodeId) -> Option<NodeStatus> {
        self.tables.nodes.get(id).map(|n| n.status)
    }

    /// A node's key and whether it was revoked; `None` for an unknown node.
    pub fn node_key(&self, id: &NodeId) -> Option<(Option<NodePublicKey>, bool)> {
        self.tables.nodes.get(id).map(|n| (n.public_key, n.revoked))
    }

    /// What `node`'s agent must run: every allocation on it that is not finished
    /// (wanted, or asked to stop and not yet confirmed stopped), each with its task
    /// when it is of the job's current version.
    pub fn assignments(&self, node_id: &NodeId) -> Option<NodeAssignments> {
        self.tables.nodes.get(node_id)?;
        let allocations = self
            .index
            .by_node
            .get(node_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tables.allocations.get(id))
            .filter(|a| assigned(a).0)
            .map(|a| Assignment {
                allocation: a.clone(),
                task: self
                    .tables
                    .jobs
                    .get(&a.job_id)
                    .filter(|j| j.version == a.job_version)
                    .and_then(|j| j.spec.group(&a.group))
                    .map(|g| g.task.clone()),
            })
            .collect();
        Some(NodeAssignments {
            index: self.node_assignment_index(node_id),
            allocations,
        })
    }

    /// The log index of the last change to `node`'s assignments.
    pub fn node_assignment_index(&self, node_id: &NodeId) -> u64 {
        self.tables.node_index.get(node_id).copied().unwrap_or(0)
    }

    /// The output tails shipped for an allocation.
    pub fn allocation_logs(&self, id: &AllocId) -> Option<AllocationLogs> {
        let alloc = self.tables.allocations.get(id)?;
        let record = self.tables.logs.get(id);
        Some(AllocationLogs {
            id: id.clone(),
            node_id: alloc.node_id.clone(),
            stdout: record.map(|r| r.stdout.clone()).unwrap_or_default(),
            stderr: record.map(|r| r.stderr.clone()).unwrap_or_default(),
            updated_at: record.map(|r| r.updated_at),
        })
    }

    /// Registered models, newest first; only those named `name` when given.
    pub fn models(&self, name: Option<&str>) -> Vec<ModelSummary> {
        self.tables.models.list(name)
    }

    /// The models pushed under `name`, newest first: what a deployment naming a
    /// model rather than a digest resolves to (the first).
    pub fn models_named(&self, name: &str) -> Vec<ModelSummary> {
        self.tables.models.list(Some(name))
    }

    /// The model with this digest: summary, signed manifest and locations.
    pub fn model(&self, digest: &str) -> Option<crate::models::ModelDetail> {
        self.tables.models.detail(digest)
    }

    /// The model table, for the checks handlers run before proposing.
    pub(crate) fn models_table(&self) -> &crate::models::Models {
        &self.tables.models
    }

    /// Every registered model's digest, name and registration time, without building
    /// summaries: what the `/v1` gateway resolves request names against.
    pub fn model_names(&self) -> Vec<crate::models::ModelName> {
        self.tables.models.names()
    }

    /// The model servers the `/v1` gateway may route to, as (model digest,
    /// allocation): wanted, running instances of `model-server` groups that report
    /// an endpoint, at their job's current version. Instances of an older version
    /// are left out, since the state keeps only the current task and so does not
    /// know which model they serve. Costs the live jobs plus their model servers'
    /// allocations, never a scan of every allocation.
    pub fn model_servers(&self) -> Vec<(&str, &Allocation)> {
        let mut found = Vec::new();
        for job in self
            .job_names
            .values()
            .filter_map(|id| self.tables.jobs.get(id))
        {
            for group in &job.spec.groups {
                let aigrid_api::TaskSpec::ModelServer(task) = &group.task else {
                    continue;
                };
                found.extend(
                    self.job_allocs(&job.id)
                        .into_iter()
                        .filter(|a| {
                            a.group == group.name
                                && a.job_version == job.version
                                && a.desired == DesiredState::Run
                                && a.state == AllocState::Running
                                && a.endpoint.is_some()
                        })
                        .map(|a| (task.model.as_str(), a)),
                );
            }
        }
        found
    }

    /// Every join token, by id; never their secrets.
    pub fn join_tokens(&self) -> Vec<JoinTokenInfo> {
        self.tables
            .join_tokens
            .values()
            .map(|t| t.info.clone())
            .collect()
    }

    /// What of `hb` would change the state: GPU health that differs from what is
    /// recorded, reports that say something new about allocations on the node, and
    /// whether the node is down (a heartbeat brings it back). `None` when the
    /// heartbeat only says the node is alive, so it need not be committed.
    pub fn heartbeat_changes(&self, node_id: &NodeId, hb: &Heartbeat) -> Option<Heartbeat> {
        let node = self.tables.nodes.get(node_id)?;
        let gpus: Vec<GpuHealth> = hb
            .gpus
            .iter()
            .filter(|h| {
                node.resources.gpus.iter().any(|g| {
                    g.uuid == h.uuid
                        && (g.healthy != h.healthy || (!h.healthy && g.health_reason != h.reason))
                })
            })
            .cloned()
            .collect();
        let allocations: Vec<AllocationReport> = hb
            .allocations
            .iter()
            .filter(|r| {
                self.tables.allocations.get(&r.id).is_some_and(|a| {
                    &a.node_id == node_id && !a.state.is_terminal() && r.differs_from(a)
                })
            })
            .cloned()
            .collect();
        let down = node.status == NodeStatus::Down;
        if gpus.is_empty() && allocations.is_empty() && hb.logs.is_empty() && !down {
            return None;
        }
        Some(Heartbeat {
            gpus,
            allocations,
            telemetry: None,
            logs: hb.logs.clone(),
        })
    }

    /// Every node, ordered by id, with what its allocations hold.
    pub fn nodes(&self) -> Vec<Node> {
        self.tables
            .nodes
            .values()
            .map(|n| self.node_view(n))
            .collect()
    }

    fn node_view(&self, node: &Node) -> Node {
        let held = self.index.held.get(&node.id);
        let gpus = &node.resources.gpus;
        let used = held.map_or(0, |h| {
            gpus.iter().filter(|g| h.gpus.contains_key(&g.uuid)).count()
        });
        let free = gpus
            .iter()
            .filter(|g| g.healthy && !held.is_some_and(|h| h.gpus.contains_key(&g.uuid)))
            .count();
        let mut view = node.clone();
        view.usage = Some(NodeUsage {
            cpu_millis: MilliCpu::new(held.map_or(0, |h| h.cpu)),
            memory_mib: MemoryMib::new(held.map_or(0, |h| h.memory)),
            gpus_used: u32::try_from(used).unwrap_or(u32::MAX),
            gpus_free: u32::try_from(free).unwrap_or(u32::MAX),
            allocations: held.map_or(0, |h| h.allocations),
        });
        view
    }

    /// What the planner needs to know: every node and what live allocations hold.
    pub fn plan_snapshot(&self) -> crate::planner::PlanSnapshot {
        crate::planner::PlanSnapshot::with_jobs(
            self.tables.nodes.values(),
            self.live_allocations(),
            // A hash lookup per allocation rather than a walk of the job map.
            {
                let mut specs: std::collections::HashMap<JobId, Option<&JobSpec>> =
                    std::collections::HashMap::new();
                move |job_id: &JobId, group: &str| {
                    let spec = match specs.get(job_id) {
                        Some(spec) => *spec,
                        None => {
                            let spec = self.tables.jobs.get(job_id).map(|j| &j.spec);
                            specs.insert(job_id.clone(), spec);
                            spec
                        }
                    };
                    spec.map(|spec| crate::planner::GroupInfo::of(spec, group))
                }
            },
        )
    }

    /// Every live allocation (wanted and not finished), ordered by id.
    pub fn live_allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.tables.allocations.values().filter(|a| a.is_live())
    }

    /// The spec and version of a live job, without building its view.
    pub fn job_spec(&self, id: &JobId) -> Option<(&JobSpec, u64)> {
        self.tables.jobs.get(id).map(|j| (&j.spec, j.version))
    }

    /// Changes whenever capacity may have appeared or been freed; see the field.
    pub fn capacity_epoch(&self) -> u64 {
        self.capacity_epoch
    }

    /// Nodes that are not down and were last heard from before `deadline`.
    pub fn silent_nodes(&self, deadline: Timestamp) -> Vec<NodeId> {
        self.tables
            .nodes
            .values()
            .filter(|n| n.status != NodeStatus::Down && n.last_seen < deadline)
            .map(|n| n.id.clone())
            .collect()
    }

    /// Draining nodes with their drain and the allocations still on them.
    pub fn drains(&self) -> Vec<(NodeId, DrainSpec, Vec<Allocation>)> {
        self.tables
            .nodes
            .values()
            .filter(|n| n.status == NodeStatus::Draining)
            .map(|n| {
                (
                    n.id.clone(),
                    n.drain.unwrap_or_default(),
                    self.node_allocations(&n.id),
                )
            })
            .collect()
    }

    /// Every allocation kept, ordered by id.
    pub fn allocations(&self) -> Vec<Allocation> {
        self.tables.allocations.values().cloned().collect()
    }

    /// The allocation with this id.
    pub fn allocation(&self, id: &AllocId) -> Option<Allocation> {
        self.tables.allocations.get(id).cloned()
    }

    /// The allocations on one node, ordered by id: what its agent should run or stop.
    pub fn node_allocations(&self, node_id: &NodeId) -> Vec<Allocation> {
        self.index
            .by_node
            .get(node_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tables.allocations.get(id))
            .cloned()
            .collect()
    }

    /// The evaluation with this id, if it has not been forgotten.
    pub fn evaluation(&self, id: &EvalId) -> Option<Evaluation> {
        self.tables.evaluations.get(id).map(|r| r.eval.clone())
    }

    /// Evaluations with this status, oldest first: the planner's queue.
    pub fn evaluations(&self, status: EvalStatus) -> Vec<Evaluation> {
        self.eval_order
            .values()
            .filter_map(|id| self.tables.evaluations.get(id))
            .filter(|r| r.eval.status == status)
            .map(|r| r.eval.clone())
            .collect()
    }

    /// How many of each object the state holds.
    pub fn counts(&self) -> StateCounts {
        let evals = || self.tables.evaluations.values().map(|r| r.eval.status);
        StateCounts {
            jobs: self.tables.jobs.len(),
            nodes: self.tables.nodes.len(),
            nodes_ready: self
                .tables
                .nodes
                .values()
                .filter(|n| n.status == NodeStatus::Ready)
                .count(),
            allocations: self.tables.allocations.len(),
            allocations_live: self.index.live,
            evaluations: self.tables.evaluations.len(),
            evaluations_pending: evals().filter(|s| *s == EvalStatus::Pending).count(),
            evaluations_blocked: evals().filter(|s| *s == EvalStatus::Blocked).count(),
            models: self.tables.models.len(),
        }
    }

    fn job_view(&self, record: &JobRecord) -> Job {
        let allocations: Vec<Allocation> =
            self.job_allocs(&record.id).into_iter().cloned().collect();
        let refs: Vec<&Allocation> = allocations.iter().collect();
        Job {
            id: record.id.clone(),
            name: record.spec.name.clone(),
            version: record.version,
            status: job_status(&record.spec, &refs),
            spec: record.spec.clone(),
            submitted_at: record.submitted_at,
            updated_at: record.updated_at,
            allocations,
            unplaced: record.unplaced.clone(),
        }
    }

    // ----- invariants --------------------------------------------------------

    /// Checks the rules every reachable state obeys. Run after every apply in debug
    /// builds, on every restored snapshot, and by tests after every step.
    pub fn check_invariants(&self) -> Result<(), String> {
        let t = &self.tables;
        if t.format != SNAPSHOT_FORMAT {
            return Err(format!(
                "snapshot format {} is not {SNAPSHOT_FORMAT}",
                t.format
            ));
        }
        if t.eval_limit == 0 || t.evaluations.len() > t.eval_limit {
            return Err(format!(
                "{} evaluations kept with a limit of {}",
                t.evaluations.len(),
                t.eval_limit
            ));
        }
        t.models.check_invariants()?;

        let mut names = BTreeMap::new();
        for (id, job) in &t.jobs {
            if id != &job.id {
                return Err(format!("job keyed `{id}` has id `{}`", job.id));
            }
            if job.version == 0 {
                return Err(format!("job `{id}` has version 0"));
            }
            if let Some(other) = names.insert(job.spec.name.clone(), id.clone()) {
                return Err(format!(
                    "live jobs `{other}` and `{id}` share the name `{}`",
                    job.spec.name
                ));
            }
        }
        if names != self.job_names {
            return Err("the job name index disagrees with the jobs".to_owned());
        }

        for (id, node) in &t.nodes {
            if id != &node.id {
                return Err(format!("node keyed `{id}` has id `{}`", node.id));
            }
            if node.usage.is_some() {
                return Err(format!("node `{id}` stores its usage"));
            }
        }

        let mut gpu_holders: BTreeMap<(&NodeId, &str), &AllocId> = BTreeMap::new();
        for (id, alloc) in &t.allocations {
            if id != &alloc.id {
                return Err(format!("allocation keyed `{id}` has id `{}`", alloc.id));
            }
            let Some(node) = t.nodes.get(&alloc.node_id) else {
                return Err(format!(
                    "allocation `{id}` is on unknown node `{}`",
                    alloc.node_id
                ));
            };
            if alloc.desired == DesiredState::Run && !t.jobs.contains_key(&alloc.job_id) {
                return Err(format!(
                    "allocation `{id}` should run but job `{}` does not exist",
                    alloc.job_id
                ));
            }
            if alloc.desired == DesiredState::Stop && alloc.state.is_terminal() {
                return Err(format!(
                    "allocation `{id}` is stopped and finished but was kept"
                ));
            }
            if !alloc.is_live() {
                continue;
            }
            for gpu in &alloc.gpus {
                let Some(device) = node.resources.gpus.iter().find(|g| &g.uuid == gpu) else {
                    return Err(format!(
                        "allocation `{id}` holds GPU `{gpu}` that node `{}` lacks",
                        node.id
                    ));
                };
                if !device.healthy {
                    return Err(format!("allocation `{id}` holds unhealthy GPU `{gpu}`"));
                }
                if slice_of(alloc).is_some() {
                    continue;
                }
                if let Some(other) = gpu_holders.insert((&alloc.node_id, gpu), id) {
                    return Err(format!(
                        "allocations `{other}` and `{id}` both hold GPU `{gpu}`"
                    ));
                }
            }
        }

        let index = AllocIndex::from_allocations(t.allocations.values());
        if index != self.index {
            return Err("the allocation index disagrees with the allocations".to_owned());
        }
        for (node_id, held) in &index.held {
            let node = &t.nodes[node_id];
            for (uuid, gpu) in &held.gpus {
                let memory = node
                    .resources
                    .gpus
                    .iter()
                    .find(|g| &g.uuid == uuid)
                    .map_or(0, |g| g.memory_mib.get());
                if gpu.whole.is_some() && gpu.slices > 0 {
                    return Err(format!("GPU `{uuid}` is held whole and sliced at once"));
                }
                if gpu.sliced > memory {
                    return Err(format!(
                        "GPU `{uuid}` has {} MiB sliced out of {memory}",
                        gpu.sliced
                    ));
                }
            }
        }

        if self.eval_order.len() != t.evaluations.len() {
            return Err("the evaluation order index disagrees with the evaluations".to_owned());
        }
        for (seq, id) in &self.eval_order {
            match t.evaluations.get(id) {
                Some(record) if record.seq == *seq && &record.eval.id == id => {}
                _ => return Err(format!("evaluation order entry {seq} -> `{id}` is stale")),
            }
            if *seq >= t.next_eval_seq {
                return Err(format!(
                    "evaluation `{id}` has sequence {seq} from the future"
                ));
            }
        }
        let completed = t
            .evaluations
            .values()
            .filter(|r| r.eval.status == EvalStatus::Complete)
            .count();
        if completed != self.completed.len()
            || self
                .completed
                .iter()
                .any(|seq| !self.eval_order.contains_key(seq))
        {
            return Err("the completed-evaluation index disagrees with the evaluations".to_owned());
        }
        Ok(())
    }

    // ----- commands ----------------------------------------------------------

    fn submit_job(
        &mut self,
        job_id: JobId,
        eval_id: EvalId,
        spec: JobSpec,
        at: Timestamp,
    ) -> CommandOutput {
        spec.validate()?;
        if let Some(record) = self.tables.evaluations.get(&eval_id) {
            let eval = &record.eval;
            let same_job = self
                .tables
                .jobs
                .get(&eval.job_id)
                .is_some_and(|job| job.spec.name == spec.name);
            return match eval.trigger {
                EvalTrigger::JobSubmit | EvalTrigger::JobUpdate if same_job => {
                    Ok(Applied::JobSubmitted(SubmitJobResponse {
                        id: eval.job_id.clone(),
                        version: eval.job_version,
                        eval_id,
                        created: eval.trigger == EvalTrigger::JobSubmit,
                    }))
                }
                _ => Err(StateError::conflict(format!(
                    "evaluation id `{eval_id}` is already used"
                ))),
            };
        }
        if let Some(existing) = self.tables.jobs.get(&job_id) {
            if existing.spec.name != spec.name {
                return Err(StateError::conflict(format!(
                    "job id `{job_id}` belongs to job `{}`",
                    existing.spec.name
                )));
            }
        }

        let live = self
            .job_names
            .get(&spec.name)
            .and_then(|id| self.tables.jobs.get_mut(id));
        let (id, version, trigger) = match live {
            Some(job) if job.spec == spec => {
                return Ok(Applied::JobSubmitted(SubmitJobResponse {
                    id: job.id.clone(),
                    version: job.version,
                    eval_id: job.last_eval.clone(),
                    created: false,
                }));
            }
            Some(job) => {
                job.version += 1;
                job.spec = spec;
                job.updated_at = at;
                job.last_eval = eval_id.clone();
                job.unplaced.clear();
                (job.id.clone(), job.version, EvalTrigger::JobUpdate)
            }
            None => {
                self.job_names.insert(spec.name.clone(), job_id.clone());
                self.tables.jobs.insert(
                    job_id.clone(),
                    JobRecord {
                        id: job_id.clone(),
                        spec,
                        version: 1,
                        submitted_at: at,
                        updated_at: at,
                        last_eval: eval_id.clone(),
                        unplaced: Vec::new(),
                    },
                );
                (job_id, 1, EvalTrigger::JobSubmit)
            }
        };
        self.insert_eval(eval_id.clone(), id.clone(), version, trigger, at, None);
        Ok(Applied::JobSubmitted(SubmitJobResponse {
            id,
            version,
            eval_id,
            created: trigger == EvalTrigger::JobSubmit,
        }))
    }

    fn delete_job(&mut self, job_id: JobId, eval_id: EvalId, at: Timestamp) -> CommandOutput {
        if let Some(record) = self.tables.evaluations.get(&eval_id) {
            let eval = &record.eval;
            return if eval.trigger == EvalTrigger::JobDelete && eval.job_id == job_id {
                Ok(Applied::JobDeleted(DeleteJobResponse {
                    id: job_id,
                    eval_id,
                }))
            } else {
                Err(StateError::conflict(format!(
                    "evaluation id `{eval_id}` is already used"
                )))
            };
        }
        let job = self
            .tables
            .jobs
            .remove(&job_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Job, &job_id))?;
        self.job_names.remove(&job.spec.name);
        for id in self.job_alloc_ids(&job_id) {
            let Some(mut alloc) = self.drop_alloc(&id) else {
                continue;
            };
            if !alloc.state.is_terminal() {
                alloc.desired = DesiredState::Stop;
                alloc.updated_at = at;
                self.put_alloc(alloc);
            }
        }
        self.insert_eval(
            eval_id.clone(),
            job_id.clone(),
            job.version,
            EvalTrigger::JobDelete,
            at,
            None,
        );
        Ok(Applied::JobDeleted(DeleteJobResponse {
            id: job_id,
            eval_id,
        }))
    }

    /// Checks that a registration may apply: a known node keeps its key; a new
    /// node, or one whose key was revoked, presents a valid join token and a new key.
    pub fn check_registration(
        &self,
        reg: &NodeRegistration,
        token: Option<&TokenUse>,
        at: Timestamp,
    ) -> Result<Option<String>, StateError> {
        reg.validate()?;
        let unauthorized = |m: String| Err(StateError::Unauthorized(m));
        if let Some(node) = self.tables.nodes.get(&reg.id) {
            if node.revoked {
                if reg.public_key.is_none() || reg.public_key == node.public_key {
                    return unauthorized(format!(
                        "the key of node `{}` was revoked; join again with a new key and a join token",
                        reg.id
                    ));
                }
            } else if node.public_key.is_some() {
                if reg.public_key != node.public_key {
                    return unauthorized(format!(
                        "node `{}` is registered with another key",
                        reg.id
                    ));
                }
                return Ok(None);
            }
        }
        let Some(token) = token else {
            if reg.public_key.is_none() {
                // A node without a key is one the operator registers by hand;
                // only the server itself proposes that.
                return Ok(None);
            }
            return unauthorized("a new node must present a join token".to_owned());
        };
        let Some(record) = self.tables.join_tokens.get(&token.id) else {
            return unauthorized(format!("unknown join token `{}`", token.id));
        };
        if record.secret_hash != token.secret_hash {
            return unauthorized(format!("join token `{}` does not match", token.id));
        }
        if at >= record.info.expires_at {
            return unauthorized(format!("join token `{}` has expired", token.id));
        }
        if record
            .info
            .max_uses
            .is_some_and(|max| record.info.uses >= max)
        {
            return unauthorized(format!("join token `{}` is used up", token.id));
        }
        Ok(Some(token.id.clone()))
    }

    fn register_node(
        &mut self,
        index: u64,
        reg: NodeRegistration,
        token: Option<TokenUse>,
        at: Timestamp,
    ) -> CommandOutput {
        if let Some(used) = self.check_registration(&reg, token.as_ref(), at)? {
            if let Some(record) = self.tables.join_tokens.get_mut(&used) {
                record.info.uses += 1;
            }
        }
        let id = reg.id.clone();
        self.capacity_epoch += 1;
        self.touch_node(&id);
        let created = match self.tables.nodes.get_mut(&id) {
            Some(node) => {
                node.name = reg.name;
                node.attributes = reg.attributes;
                node.resources = reg.resources;
                if reg.public_key.is_some() {
                    node.public_key = reg.public_key;
                }
                node.revoked = false;
                if node.status == NodeStatus::Down {
                    node.status = Self::back_up(node);
                }
                node.last_seen = node.last_seen.max(at);
                false
            }
            None => {
                self.tables.nodes.insert(
                    id.clone(),
                    Node {
                        id: id.clone(),
                        name: reg.name,
                        attributes: reg.attributes,
                        resources: reg.resources,
                        status: NodeStatus::Ready,
                        registered_at: at,
                        last_seen: at,
                        drain: None,
                        usage: None,
                        public_key: reg.public_key,
                        revoked: false,
                        telemetry: None,
                    },
                );
                true
            }
        };
        let usable: BTreeSet<String> = self.tables.nodes[&id]
            .resources
            .gpus
            .iter()
            .filter(|g| g.healthy)
            .map(|g| g.uuid.clone())
            .collect();
        let displaced =
            self.lose_allocations(&id, at, |a| a.gpus.iter().any(|g| !usable.contains(g)));
        let eval_ids = self.node_update_evals(index, displaced, EvalTrigger::NodeUpdate, at);
        Ok(Applied::NodeRegistered {
            id,
            created,
            eval_ids,
        })
    }

    /// Checks a heartbeat as [`Command::NodeHeartbeat`] will: the node exists, the
    /// GPUs are its own, the allocations reported are on it. The API calls it
    /// first so a bad heartbeat is refused without a log entry.
    pub fn check_heartbeat(
        &self,
        node_id: &NodeId,
        gpus: &[GpuHealth],
        reports: &[AllocationReport],
    ) -> Result<(), StateError> {
        let node = self
            .tables
            .nodes
            .get(node_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Node, node_id))?;
        for (i, health) in gpus.iter().enumerate() {
            if !node.resources.gpus.iter().any(|g| g.uuid == health.uuid) {
                return Err(ValidationError::new(
                    format!("gpus[{i}].uuid"),
                    format!("node `{node_id}` has no GPU `{}`", health.uuid),
                )
                .into());
            }
        }
        self.check_reports(node_id, reports)
    }

    /// The status a node returns to when it is heard from after being down.
    fn back_up(node: &Node) -> NodeStatus {
        if node.drain.is_some() {
            NodeStatus::Draining
        } else {
            NodeStatus::Ready
        }
    }

    fn heartbeat(
        &mut self,
        index: u64,
        node_id: NodeId,
        gpus: Vec<GpuHealth>,
        reports: Vec<AllocationReport>,
        logs: Vec<LogTail>,
        at: Timestamp,
    ) -> CommandOutput {
        self.check_heartbeat(&node_id, &gpus, &reports)?;
        if self.tables.nodes[&node_id].revoked {
            return Err(StateError::Unauthorized(format!(
                "the key of node `{node_id}` was revoked"
            )));
        }
        for tail in logs {
            if self
                .tables
                .allocations
                .get(&tail.id)
                .is_some_and(|a| a.node_id == node_id)
            {
                self.tables.logs.insert(
                    tail.id,
                    LogRecord {
                        stdout: tail.stdout,
                        stderr: tail.stderr,
                        updated_at: at,
                    },
                );
            }
        }

        let node = self.tables.nodes.get_mut(&node_id).expect("checked above");
        node.last_seen = node.last_seen.max(at);
        let mut changed = node.status == NodeStatus::Down;
        if changed {
            node.status = Self::back_up(node);
        }
        let mut failing = BTreeSet::new();
        for health in gpus {
            let device = node
                .resources
                .gpus
                .iter_mut()
                .find(|g| g.uuid == health.uuid)
                .expect("checked above");
            if !health.healthy && device.healthy {
                failing.insert(health.uuid.clone());
            }
            changed |= device.healthy != health.healthy;
            device.healthy = health.healthy;
            device.health_reason = if health.healthy { None } else { health.reason };
        }
        let status = node.status;
        if changed {
            self.capacity_epoch += 1;
        }
        let mut displaced =
            self.lose_allocations(&node_id, at, |a| a.gpus.iter().any(|g| failing.contains(g)));
        let (_, failed) = self.apply_reports(reports, at);
        let mut eval_ids = self.node_update_evals(
            index,
            std::mem::take(&mut displaced),
            EvalTrigger::NodeUpdate,
            at,
        );
        eval_ids.extend(self.node_update_evals(index, failed, EvalTrigger::AllocFailed, at));
        Ok(Applied::NodeUpdated {
            id: node_id,
            status,
            eval_ids,
        })
    }

    fn nodes_seen(&mut self, nodes: Vec<NodeId>, at: Timestamp) -> Applied {
        let mut updated = 0;
        for id in nodes {
            if let Some(node) = self.tables.nodes.get_mut(&id) {
                if node.status != NodeStatus::Down && !node.revoked && node.last_seen < at {
                    node.last_seen = at;
                    updated += 1;
                }
            }
        }
        Applied::NodesSeen { updated }
    }

    fn revoke_node(&mut self, index: u64, node_id: NodeId, at: Timestamp) -> CommandOutput {
        let node = self
            .tables
            .nodes
            .get_mut(&node_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Node, &node_id))?;
        node.revoked = true;
        let was = node.status;
        node.status = NodeStatus::Down;
        if was != NodeStatus::Down {
            self.capacity_epoch += 1;
        }
        let displaced = self.lose_allocations(&node_id, at, |_| true);
        let eval_ids = self.node_update_evals(index, displaced, EvalTrigger::NodeUpdate, at);
        Ok(Applied::NodeUpdated {
            id: node_id,
            status: NodeStatus::Down,
            eval_ids,
        })
    }

    fn create_join_token(
        &mut self,
        id: String,
        secret_hash: String,
        ttl_secs: u64,
        max_uses: Option<u32>,
        description: Option<String>,
        at: Timestamp,
    ) -> CommandOutput {
        if let Some(existing) = self.tables.join_tokens.get(&id) {
            // A replay of the same command answers the same.
            if existing.secret_hash == secret_hash && existing.info.created_at == at {
                return Ok(Applied::JoinTokenCreated(existing.info.clone()));
            }
            return Err(StateError::conflict(format!("join token `{id}` exists")));
        }
        let info = JoinTokenInfo {
            id: id.clone(),
            created_at: at,
            expires_at: Timestamp::from_millis(
                at.as_millis().saturating_add(ttl_secs.saturating_mul(1000)),
            ),
            max_uses,
            uses: 0,
            description,
        };
        self.tables.join_tokens.insert(
            id,
            TokenRecord {
                info: info.clone(),
                secret_hash,
            },
        );
        Ok(Applied::JoinTokenCreated(info))
    }

    fn set_node_status(
        &mut self,
        index: u64,
        node_id: NodeId,
        status: NodeStatus,
        drain: Option<DrainSpec>,
        at: Timestamp,
    ) -> CommandOutput {
        if let Some(drain) = &drain {
            drain.validate()?;
        }
        let node = self
            .tables
            .nodes
            .get_mut(&node_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Node, &node_id))?;
        match status {
            NodeStatus::Ready => node.drain = None,
            NodeStatus::Draining => node.drain = Some(drain.unwrap_or_default()),
            NodeStatus::Down => {}
        }
        if node.status == status {
            return Ok(Applied::NodeUpdated {
                id: node_id,
                status,
                eval_ids: Vec::new(),
            });
        }
        node.status = status;
        self.capacity_epoch += 1;
        // A draining node's allocations are migrated by the leader at the drain's
        // pace, not all at once, so only a node going down displaces anything here.
        let displaced = match status {
            NodeStatus::Down => self.lose_allocations(&node_id, at, |_| true),
            NodeStatus::Ready | NodeStatus::Draining => BTreeMap::new(),
        };
        let eval_ids = self.node_update_evals(index, displaced, EvalTrigger::NodeUpdate, at);
        Ok(Applied::NodeUpdated {
            id: node_id,
            status,
            eval_ids,
        })
    }

    fn apply_plan(&mut self, index: u64, plans: Vec<JobPlan>, at: Timestamp) -> Applied {
        let (mut placed, mut stopped) = (0, 0);
        let mut refused = Vec::new();
        let mut preempted = BTreeSet::new();
        for plan in plans {
            let result = self
                .plan_allocations(&plan, at)
                .and_then(|allocations| self.check_allocations(&allocations).map(|()| allocations));
            match result {
                Ok(allocations) => {
                    placed += plan.place.len() + plan.moves.len();
                    stopped += plan.stop.len();
                    preempted.extend(self.write_allocations(allocations, at));
                    for u in plan.evals {
                        let _ = self.update_evaluation(u.eval_id, u.status, u.unplaced, at);
                    }
                }
                Err(e) => {
                    for u in plan.evals {
                        let unplaced = vec![Unplaced {
                            group: String::new(),
                            count: 0,
                            reason: format!("the plan was refused: {e}"),
                        }];
                        let _ =
                            self.update_evaluation(u.eval_id, EvalStatus::Blocked, unplaced, at);
                    }
                    refused.push((plan.job_id, e.to_string()));
                }
            }
        }
        let eval_ids = self.requeue_preempted(index, preempted, at);
        Applied::PlanApplied {
            placed,
            stopped,
            refused,
            eval_ids,
        }
    }

    /// The allocations a job plan writes: its placements with the group's
    /// resources, and its stops.
    fn plan_allocations(
        &self,
        plan: &JobPlan,
        at: Timestamp,
    ) -> Result<Vec<Allocation>, StateError> {
        let job = self
            .tables
            .jobs
            .get(&plan.job_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Job, &plan.job_id))?;
        if plan.job_version != job.version {
            return Err(StateError::conflict(format!(
                "the plan is for version {} of job `{}`, now at version {}",
                plan.job_version, job.spec.name, job.version
            )));
        }
        let mut allocations =
            Vec::with_capacity(plan.place.len() + plan.stop.len() + plan.moves.len());
        for moved in &plan.moves {
            let other = self
                .tables
                .jobs
                .get(&moved.job_id)
                .ok_or_else(|| StateError::not_found(ObjectKind::Job, &moved.job_id))?;
            if moved.job_version != other.version {
                return Err(StateError::conflict(format!(
                    "a move is for version {} of job `{}`, now at version {}",
                    moved.job_version, other.spec.name, other.version
                )));
            }
            let group = other.spec.group(&moved.alloc.group).ok_or_else(|| {
                ValidationError::new(
                    "moves.alloc.group",
                    format!(
                        "job `{}` has no group `{}`",
                        other.spec.name, moved.alloc.group
                    ),
                )
            })?;
            allocations.push(moved.alloc.to_allocation(
                &moved.job_id,
                moved.job_version,
                group,
                at,
            ));
        }
        for id in &plan.stop {
            let mut alloc = self
                .tables
                .allocations
                .get(id)
                .ok_or_else(|| StateError::not_found(ObjectKind::Allocation, id))?
                .clone();
            alloc.desired = DesiredState::Stop;
            allocations.push(alloc);
        }
        for new in &plan.place {
            let group = job.spec.group(&new.group).ok_or_else(|| {
                ValidationError::new(
                    "place.group",
                    format!("job `{}` has no group `{}`", job.spec.name, new.group),
                )
            })?;
            if self.tables.allocations.contains_key(&new.id) {
                return Err(StateError::conflict(format!(
                    "allocation id `{}` is already used",
                    new.id
                )));
            }
            allocations.push(new.to_allocation(&plan.job_id, plan.job_version, group, at));
        }
        self.check_one_per_instance(&allocations)?;
        Ok(allocations)
    }

    /// Refuses a plan that would leave two live allocations for one instance (job,
    /// group, index): a plan made twice, say by a leader that could not tell its
    /// first commit went through, places nothing twice.
    fn check_one_per_instance(&self, allocations: &[Allocation]) -> Result<(), StateError> {
        let rewritten: BTreeSet<&AllocId> = allocations.iter().map(|a| &a.id).collect();
        let jobs: BTreeSet<&JobId> = allocations
            .iter()
            .filter(|a| a.is_live())
            .map(|a| &a.job_id)
            .collect();
        let mut instances: BTreeSet<(&JobId, &str, u32)> = BTreeSet::new();
        for job_id in jobs {
            for alloc in self.job_allocs(job_id) {
                if alloc.is_live() && !rewritten.contains(&alloc.id) {
                    instances.insert((&alloc.job_id, alloc.group.as_str(), alloc.index));
                }
            }
        }
        for alloc in allocations.iter().filter(|a| a.is_live()) {
            if !instances.insert((&alloc.job_id, alloc.group.as_str(), alloc.index)) {
                return Err(StateError::conflict(format!(
                    "instance {}[{}] of job `{}` already has a live allocation",
                    alloc.group, alloc.index, alloc.job_id
                )));
            }
        }
        Ok(())
    }

    fn upsert_allocations(
        &mut self,
        index: u64,
        allocations: Vec<Allocation>,
        at: Timestamp,
    ) -> CommandOutput {
        self.check_allocations(&allocations)?;
        self.check_one_per_instance(&allocations)?;
        let count = allocations.len();
        let stopped = self.write_allocations(allocations, at);
        let eval_ids = self.requeue_preempted(index, stopped, at);
        Ok(Applied::AllocationsUpserted { count, eval_ids })
    }

    /// Jobs among `stopped` whose wanted instances were stopped without a
    /// replacement were preempted: they go back in the queue, without backoff.
    fn requeue_preempted(
        &mut self,
        index: u64,
        stopped: BTreeSet<JobId>,
        at: Timestamp,
    ) -> Vec<EvalId> {
        let preempted = stopped
            .into_iter()
            .filter(|job_id| self.missing_instances(job_id))
            .map(|job_id| (job_id, 0))
            .collect();
        self.node_update_evals(index, preempted, EvalTrigger::Preemption, at)
    }

    /// Writes checked allocations; answers the jobs that had a live allocation
    /// stopped.
    fn write_allocations(
        &mut self,
        allocations: Vec<Allocation>,
        at: Timestamp,
    ) -> BTreeSet<JobId> {
        let mut stopped: BTreeSet<JobId> = BTreeSet::new();
        for mut alloc in allocations {
            alloc.updated_at = at;
            alloc.created_at = at;
            if let Some(old) = self.tables.allocations.get(&alloc.id) {
                alloc.created_at = old.created_at;
                if old.state.is_terminal() {
                    alloc.state = old.state;
                }
                if old.is_live() && !alloc.is_live() {
                    stopped.insert(alloc.job_id.clone());
                }
            }
            // A replacement takes over from a finished allocation: forget it.
            if let Some(previous) = &alloc.previous {
                if self
                    .tables
                    .allocations
                    .get(previous)
                    .is_some_and(|p| p.state.is_terminal() && p.job_id == alloc.job_id)
                {
                    self.drop_alloc(previous);
                }
            }
            if alloc.desired == DesiredState::Stop && alloc.state.is_terminal() {
                self.drop_alloc(&alloc.id);
            } else {
                self.put_alloc(alloc);
            }
        }
        stopped
    }

    /// True when some instance the job's spec wants has no live allocation.
    fn missing_instances(&self, job_id: &JobId) -> bool {
        let Some(job) = self.tables.jobs.get(job_id) else {
            return false;
        };
        let live: BTreeSet<(&str, u32)> = self
            .job_allocs(job_id)
            .into_iter()
            .filter(|a| a.is_live())
            .map(|a| (a.group.as_str(), a.index))
            .collect();
        job.spec
            .groups
            .iter()
            .any(|g| (0..g.count).any(|i| !live.contains(&(g.name.as_str(), i))))
    }

    /// Every rule an upsert must pass, checked before anything is written. Costs
    /// what the upsert carries, never a scan of every allocation.
    fn check_allocations(&self, allocations: &[Allocation]) -> Result<(), StateError> {
        let t = &self.tables;
        let incoming: BTreeSet<&AllocId> = allocations.iter().map(|a| &a.id).collect();
        if incoming.len() != allocations.len() {
            return Err(
                ValidationError::new("allocations", "an allocation id appears twice").into(),
            );
        }
        // What the touched nodes hold once the rewritten allocations let go of theirs;
        // the incoming ones are then added one by one.
        let mut held: BTreeMap<&NodeId, Held> = BTreeMap::new();
        for alloc in allocations {
            if !held.contains_key(&alloc.node_id) {
                let current = self.index.held.get(&alloc.node_id).cloned();
                held.insert(&alloc.node_id, current.unwrap_or_default());
            }
        }
        for alloc in allocations {
            if let Some(old) = t.allocations.get(&alloc.id).filter(|o| o.is_live()) {
                if let Some(h) = held.get_mut(&old.node_id) {
                    h.remove(old);
                }
            }
        }

        for (i, alloc) in allocations.iter().enumerate() {
            let field = |name: &str| format!("allocations[{i}].{name}");
            if alloc.id.as_str().is_empty() {
                return Err(ValidationError::new(field("id"), "must not be empty").into());
            }
            let node = t
                .nodes
                .get(&alloc.node_id)
                .ok_or_else(|| StateError::not_found(ObjectKind::Node, &alloc.node_id))?;
            let old = t.allocations.get(&alloc.id);
            if let Some(old) = old {
                if (&old.job_id, &old.node_id, &old.group, old.index)
                    != (&alloc.job_id, &alloc.node_id, &alloc.group, alloc.index)
                {
                    return Err(StateError::conflict(format!(
                        "allocation `{}` cannot move to another job, node, group or index",
                        alloc.id
                    )));
                }
            }
            let mut own = BTreeSet::new();
            for gpu in &alloc.gpus {
                if !node.resources.gpus.iter().any(|g| &g.uuid == gpu) {
                    return Err(ValidationError::new(
                        field("gpus"),
                        format!("node `{}` has no GPU `{gpu}`", node.id),
                    )
                    .into());
                }
                if !own.insert(gpu.as_str()) {
                    return Err(ValidationError::new(
                        field("gpus"),
                        format!("GPU `{gpu}` is listed twice"),
                    )
                    .into());
                }
            }
            let live = alloc.is_live() && !old.is_some_and(|o| o.state.is_terminal());
            if !live {
                continue;
            }
            let job = t
                .jobs
                .get(&alloc.job_id)
                .ok_or_else(|| StateError::not_found(ObjectKind::Job, &alloc.job_id))?;
            let Some(group) = job.spec.group(&alloc.group) else {
                return Err(ValidationError::new(
                    field("group"),
                    format!("job `{}` has no group `{}`", job.spec.name, alloc.group),
                )
                .into());
            };
            if alloc.index >= group.count {
                return Err(ValidationError::new(
                    field("index"),
                    format!("group `{}` has {} instances", group.name, group.count),
                )
                .into());
            }
            if alloc.job_version == 0 || alloc.job_version > job.version {
                return Err(ValidationError::new(
                    field("job_version"),
                    format!("must be between 1 and the job's version {}", job.version),
                )
                .into());
            }
            let h = held.get_mut(&alloc.node_id).expect("every node was added");
            if old.is_none() {
                if !node.status.is_schedulable() {
                    return Err(StateError::conflict(format!(
                        "node `{}` is {} and takes no new allocations",
                        node.id, node.status
                    )));
                }
                let gpus_wanted = match &alloc.resources.gpus {
                    None => 0,
                    Some(g) if g.memory_slice_mib.is_some() => 1,
                    Some(g) => g.count,
                };
                if u32::try_from(alloc.gpus.len()).ok() != Some(gpus_wanted) {
                    return Err(ValidationError::new(
                        field("gpus"),
                        format!("must name {gpus_wanted} GPUs"),
                    )
                    .into());
                }
                let (cpu, memory) = (alloc.resources.cpu_millis, alloc.resources.memory_mib);
                if h.cpu + cpu.get() > node.resources.cpu_millis.get() {
                    return Err(StateError::conflict(format!(
                        "node `{}` has not {cpu} CPU millis free",
                        node.id
                    )));
                }
                if h.memory + memory.get() > node.resources.memory_mib.get() {
                    return Err(StateError::conflict(format!(
                        "node `{}` has not {memory} MiB of memory free",
                        node.id
                    )));
                }
            }
            let slice = slice_of(alloc);
            for uuid in &alloc.gpus {
                let device = node
                    .resources
                    .gpus
                    .iter()
                    .find(|g| &g.uuid == uuid)
                    .expect("checked above");
                if !device.healthy {
                    return Err(StateError::conflict(format!(
                        "GPU `{uuid}` on node `{}` is unhealthy",
                        node.id
                    )));
                }
                let Some(gpu) = h.gpus.get(uuid) else {
                    continue;
                };
                if let Some(other) = &gpu.whole {
                    return Err(StateError::conflict(format!(
                        "GPU `{uuid}` on node `{}` is already held by allocation `{other}`",
                        node.id
                    )));
                }
                match slice {
                    None if gpu.slices > 0 => {
                        return Err(StateError::conflict(format!(
                            "GPU `{uuid}` on node `{}` is shared by {} allocations",
                            node.id, gpu.slices
                        )));
                    }
                    Some(mib) if gpu.sliced + mib > device.memory_mib.get() => {
                        return Err(StateError::conflict(format!(
                            "GPU `{uuid}` on node `{}` has not {mib} MiB free to share",
                            node.id
                        )));
                    }
                    _ => {}
                }
            }
            h.add(alloc);
        }
        Ok(())
    }

    /// Checks that a node reports only its own allocations.
    fn check_reports(
        &self,
        node_id: &NodeId,
        reports: &[AllocationReport],
    ) -> Result<(), StateError> {
        for (i, report) in reports.iter().enumerate() {
            if let Some(endpoint) = &report.endpoint {
                aigrid_api::allocation::check_endpoint(endpoint).map_err(|e| {
                    ValidationError::new(format!("allocations[{i}].endpoint"), e.message)
                })?;
            }
            if let Some(alloc) = self.tables.allocations.get(&report.id) {
                if &alloc.node_id != node_id {
                    return Err(StateError::conflict(format!(
                        "allocation `{}` is not on node `{node_id}`",
                        report.id
                    )));
                }
            }
        }
        Ok(())
    }

    /// Records reported states; answers how many allocations changed state and
    /// the services whose wanted instances failed (to be rescheduled), each with
    /// the fewest reschedules among them.
    fn apply_reports(
        &mut self,
        reports: Vec<AllocationReport>,
        at: Timestamp,
    ) -> (usize, BTreeMap<JobId, u32>) {
        let mut changed = 0;
        let mut failed: BTreeMap<JobId, u32> = BTreeMap::new();
        for report in reports {
            let Some(alloc) = self.tables.allocations.get(&report.id) else {
                continue;
            };
            if alloc.state.is_terminal() || !report.differs_from(alloc) {
                continue;
            }
            changed += 1;
            let mut alloc = alloc.clone();
            alloc.state = report.state;
            alloc.reason = report.reason.map(|mut r| {
                truncate_at_char(&mut r, aigrid_api::allocation::MAX_REASON_LEN);
                r
            });
            alloc.restarts = report.restarts;
            alloc.limits = report.limits;
            alloc.endpoint = report.endpoint;
            alloc.updated_at = at;
            if alloc.desired == DesiredState::Stop && alloc.state.is_terminal() {
                self.drop_alloc(&report.id);
                continue;
            }
            let service = self
                .tables
                .jobs
                .get(&alloc.job_id)
                .is_some_and(|j| j.spec.kind == JobKind::Service);
            if service && matches!(alloc.state, AllocState::Failed | AllocState::Lost) {
                let fewest = failed.entry(alloc.job_id.clone()).or_insert(u32::MAX);
                *fewest = (*fewest).min(alloc.reschedules);
            }
            self.put_alloc(alloc);
        }
        (changed, failed)
    }

    fn report_allocations(
        &mut self,
        index: u64,
        node_id: NodeId,
        reports: Vec<AllocationReport>,
        at: Timestamp,
    ) -> CommandOutput {
        if !self.tables.nodes.contains_key(&node_id) {
            return Err(StateError::not_found(ObjectKind::Node, &node_id));
        }
        self.check_reports(&node_id, &reports)?;
        let (changed, failed) = self.apply_reports(reports, at);
        if let Some(node) = self.tables.nodes.get_mut(&node_id) {
            node.last_seen = node.last_seen.max(at);
        }
        let eval_ids = self.node_update_evals(index, failed, EvalTrigger::AllocFailed, at);
        Ok(Applied::AllocationsReported {
            updated: changed,
            eval_ids,
        })
    }

    fn update_evaluation(
        &mut self,
        eval_id: EvalId,
        status: EvalStatus,
        unplaced: Vec<Unplaced>,
        at: Timestamp,
    ) -> CommandOutput {
        let record = self
            .tables
            .evaluations
            .get_mut(&eval_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Evaluation, &eval_id))?;
        record.eval.status = status;
        record.eval.updated_at = at;
        if status == EvalStatus::Complete {
            self.completed.insert(record.seq);
        } else {
            self.completed.remove(&record.seq);
        }
        let eval = &record.eval;
        if let Some(job) = self.tables.jobs.get_mut(&eval.job_id) {
            if job.version == eval.job_version {
                job.unplaced = unplaced;
            }
        }
        Ok(Applied::EvaluationUpdated { id: eval_id })
    }

    // ----- helpers -----------------------------------------------------------

    /// Marks the unfinished allocations on `node_id` that `gone` selects as lost
    /// (dropping those already asked to stop) and returns the jobs that lost one,
    /// each with the fewest reschedules among its lost instances.
    fn lose_allocations(
        &mut self,
        node_id: &NodeId,
        at: Timestamp,
        gone: impl Fn(&Allocation) -> bool,
    ) -> BTreeMap<JobId, u32> {
        let mut jobs: BTreeMap<JobId, u32> = BTreeMap::new();
        for id in self.node_alloc_ids(node_id) {
            let Some(alloc) = self.tables.allocations.get(&id) else {
                continue;
            };
            if alloc.state.is_terminal() || !gone(alloc) {
                continue;
            }
            if alloc.desired == DesiredState::Stop {
                self.drop_alloc(&id);
                continue;
            }
            let mut alloc = alloc.clone();
            alloc.state = AllocState::Lost;
            alloc.updated_at = at;
            let fewest = jobs.entry(alloc.job_id.clone()).or_insert(u32::MAX);
            *fewest = (*fewest).min(alloc.reschedules);
            self.put_alloc(alloc);
        }
        jobs
    }

    /// Creates an evaluation per live job in `jobs`, each held back by the
    /// reschedule backoff of its instance rescheduled least so far (a preemption is
    /// not held back). Their ids derive from the log index, the one input every
    /// replica shares for a command that carries none.
    fn node_update_evals(
        &mut self,
        index: u64,
        jobs: BTreeMap<JobId, u32>,
        trigger: EvalTrigger,
        at: Timestamp,
    ) -> Vec<EvalId> {
        let mut created = Vec::new();
        for (n, (job_id, reschedules)) in jobs.into_iter().enumerate() {
            let Some(version) = self.tables.jobs.get(&job_id).map(|j| j.version) else {
                continue;
            };
            let eval_id = EvalId(format!("log-{index}-{trigger}-{n}"));
            if self.tables.evaluations.contains_key(&eval_id) {
                continue;
            }
            let wait_until = (trigger != EvalTrigger::Preemption).then(|| {
                Timestamp::from_millis(
                    at.as_millis()
                        .saturating_add(reschedule_delay_ms(reschedules)),
                )
            });
            self.insert_eval(eval_id.clone(), job_id, version, trigger, at, wait_until);
            created.push(eval_id);
        }
        created
    }

    fn insert_eval(
        &mut self,
        id: EvalId,
        job_id: JobId,
        job_version: u64,
        trigger: EvalTrigger,
        at: Timestamp,
        wait_until: Option<Timestamp>,
    ) {
        let seq = self.tables.next_eval_seq;
        self.tables.next_eval_seq += 1;
        self.eval_order.insert(seq, id.clone());
        self.tables.evaluations.insert(
            id.clone(),
            EvalRecord {
                seq,
                eval: Evaluation {
                    id,
                    job_id,
                    job_version,
                    trigger,
                    status: EvalStatus::Pending,
                    created_at: at,
                    updated_at: at,
                    wait_until,
                },
            },
        );
        self.trim_evals();
    }

    /// Forgets the oldest evaluations beyond the limit: completed ones first, then,
    /// if the planner has fallen that far behind, the oldest of any status.
    fn trim_evals(&mut self) {
        let excess = self
            .tables
            .evaluations
            .len()
            .saturating_sub(self.tables.eval_limit);
        if excess == 0 {
            return;
        }
        let mut victims: BTreeSet<u64> = self.completed.iter().take(excess).copied().collect();
        let missing = excess - victims.len();
        let oldest: Vec<u64> = self
            .eval_order
            .keys()
            .filter(|seq| !victims.contains(seq))
            .take(missing)
            .copied()
            .collect();
        victims.extend(oldest);
        for seq in victims {
            self.completed.remove(&seq);
            if let Some(id) = self.eval_order.remove(&seq) {
                self.tables.evaluations.remove(&id);
            }
        }
    }
}

impl StateMachine for ClusterState {
    type Command = Command;
    type Output = CommandOutput;

    fn apply(&mut self, index: u64, command: Command) -> CommandOutput {
        self.applying = index;
        let output = match command {
            Command::SubmitJob {
                job_id,
                eval_id,
                spec,
                at,
            } => self.submit_job(job_id, eval_id, spec, at),
            Command::DeleteJob {
                job_id,
                eval_id,
                at,
            } => self.delete_job(job_id, eval_id, at),
            Command::RegisterNode {
                node,
                join_token,
                at,
            } => self.register_node(index, node, join_token, at),
            Command::NodesSeen { nodes, at } => Ok(self.nodes_seen(nodes, at)),
            Command::RevokeNode { node_id, at } => self.revoke_node(index, node_id, at),
            Command::CreateJoinToken {
                id,
                secret_hash,
                ttl_secs,
                max_uses,
                description,
                at,
            } => self.create_join_token(id, secret_hash, ttl_secs, max_uses, description, at),
            Command::DeleteJoinToken { id, at: _ } => {
                if self.tables.join_tokens.remove(&id).is_some() {
                    Ok(Applied::JoinTokenDeleted { id })
                } else {
                    Err(StateError::not_found(ObjectKind::JoinToken, &id))
                }
            }
            Command::NodeHeartbeat {
                node_id,
                gpus,
                allocations,
                logs,
                at,
            } => self.heartbeat(index, node_id, gpus, allocations, logs, at),
            Command::DrainNode { node_id, drain, at } => {
                self.set_node_status(index, node_id, NodeStatus::Draining, Some(drain), at)
            }
            Command::SetNodeStatus {
                node_id,
                status,
                at,
            } => self.set_node_status(index, node_id, status, None, at),
            Command::UpsertAllocations { allocations, at } => {
                self.upsert_allocations(index, allocations, at)
            }
            Command::ReportAllocations {
                node_id,
                reports,
                at,
            } => self.report_allocations(index, node_id, reports, at),
            Command::UpdateEvaluation {
                eval_id,
                status,
                unplaced,
                at,
            } => self.update_evaluation(eval_id, status, unplaced, at),
            Command::ApplyPlan { jobs, at } => Ok(self.apply_plan(index, jobs, at)),
            Command::UpdateEvaluations { updates, at } => {
                let updated = updates
                    .into_iter()
                    .filter(|u| {
                        self.update_evaluation(u.eval_id.clone(), u.status, u.unplaced.clone(), at)
                            .is_ok()
                    })
                    .count();
                Ok(Applied::EvaluationsUpdated { updated })
            }
            Command::RegisterModel { registration, at } => {
                self.tables.models.register(registration, at)
            }
            Command::SetModelLocations {
                digest,
                locations,
                expected_version,
                at,
            } => self
                .tables
                .models
                .set_locations(&digest, locations, expected_version, at),
            Command::DeleteModel { digest, at: _ } => self.tables.models.delete(digest),
        };
        debug_assert_eq!(self.check_invariants(), Ok(()));
        output
    }

    /// The tables as JSON, streamed through an LZ4 frame: a state of a million
    /// allocations never exists as one uncompressed buffer, and what the log keeps
    /// and sends to lagging followers is several times smaller.
    fn snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        let error = |e: &dyn std::fmt::Display| SnapshotError(e.to_string());
        let mut encoder = lz4_flex::frame::FrameEncoder::new(Vec::new());
        serde_json::to_writer(&mut encoder, &self.tables).map_err(|e| error(&e))?;
        encoder.finish().map_err(|e| error(&e))
    }

    /// Reads a snapshot: an LZ4 frame of JSON, or plain JSON as earlier releases
    /// wrote it.
    fn restore(&mut self, data: &[u8]) -> Result<(), SnapshotError> {
        const LZ4_FRAME_MAGIC: [u8; 4] = [0x04, 0x22, 0x4d, 0x18];
        let error = |e: serde_json::Error| SnapshotError(e.to_string());
        let tables: Tables = if data.starts_with(&LZ4_FRAME_MAGIC) {
            let reader = std::io::BufReader::new(lz4_flex::frame::FrameDecoder::new(data));
            serde_json::from_reader(reader).map_err(error)?
        } else {
            serde_json::from_slice(data).map_err(error)?
        };
        let mut state = Self::from_tables(tables);
        state.check_invariants().map_err(SnapshotError)?;
        state.watch = self.watch.clone();
        *self = state;
        // Every poll re-reads: the restored state may differ in any node.
        self.watch.touch_all(u64::MAX);
        Ok(())
    }
}

/// What of an allocation its node's agent acts on: whether it is in the node's
/// assignments at all (not finished), what is wanted of it, and which job version
/// it runs. A change to any of these wakes the agent's long poll.
fn assigned(alloc: &Allocation) -> (bool, DesiredState, u64) {
    (!alloc.state.is_terminal(), alloc.desired, alloc.job_version)
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Allocations the control plane still wants that are in `state`.
fn count_wanted(allocs: &[&Allocation], state: AllocState) -> u64 {
    let n = allocs
        .iter()
        .filter(|a| a.desired == DesiredState::Run && a.state == state)
        .count();
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A job's status from its wanted allocations: a service is running while any
/// instance runs; a batch or training job fails on any failed instance and completes
/// when as many instances completed as the spec asks for.
fn job_status(spec: &JobSpec, allocs: &[&Allocation]) -> JobStatus {
    let running = count_wanted(allocs, AllocState::Running);
    match spec.kind {
        JobKind::Service if running > 0 => JobStatus::Running,
        JobKind::Service => JobStatus::Pending,
        JobKind::Batch | JobKind::Training => {
            let complete = count_wanted(allocs, AllocState::Complete);
            if count_wanted(allocs, AllocState::Failed) > 0 {
                JobStatus::Failed
            } else if complete >= spec.instance_count() {
                JobStatus::Complete
            } else if running > 0 || complete > 0 {
                JobStatus::Running
            } else {
                JobStatus::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigrid_api::{GpuDevice, GpuRequest, NodeResources, Resources};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    /// A state plus a log index, checking invariants after every command.
    struct Log {
        state: ClusterState,
        index: u64,
    }

    impl Log {
        fn new() -> Self {
            Self::with(ClusterState::default())
        }

        fn with(state: ClusterState) -> Self {
            Self { state, index: 0 }
        }

        fn apply(&mut self, command: Command) -> CommandOutput {
            self.index += 1;
            let out = self.state.apply(self.index, command);
            self.state.check_invariants().unwrap();
            out
        }

        fn bytes(&self) -> Vec<u8> {
            self.state.snapshot().unwrap()
        }
    }

    fn spec_json(name: &str) -> serde_json::Value {
        json!({
            "name": name,
            "groups": [{
                "name": "web",
                "count": 2,
                "resources": {"cpu_millis": 500, "memory_mib": 256},
                "task": {"driver": "exec", "command": "/bin/server"}
            }]
        })
    }

    fn spec(name: &str) -> JobSpec {
        serde_json::from_value(spec_json(name)).unwrap()
    }

    fn submit(job: &str, eval: &str, spec: JobSpec) -> Command {
        Command::SubmitJob {
            job_id: JobId::new(job),
            eval_id: EvalId::new(eval),
            spec,
            at: Timestamp::new(100),
        }
    }

    fn delete(job: &str, eval: &str) -> Command {
        Command::DeleteJob {
            job_id: JobId::new(job),
            eval_id: EvalId::new(eval),
            at: Timestamp::new(200),
        }
    }

    fn registration(id: &str, gpus: &[&str]) -> NodeRegistration {
        NodeRegistration {
            id: NodeId::new(id),
            name: format!("host-{id}"),
            attributes: [("site".to_owned(), "ghent".to_owned())].into(),
            resources: NodeResources {
                cpu_millis: 8000.into(),
                memory_mib: 32768.into(),
                disk_mib: 100_000.into(),
                gpus: gpus
                    .iter()
                    .enumerate()
                    .map(|(i, uuid)| GpuDevice {
                        index: u32::try_from(i).unwrap(),
                        uuid: (*uuid).to_owned(),
                        vendor: "nvidia".to_owned(),
                        model: "H100".to_owned(),
                        memory_mib: MemoryMib::new(81920),
                        healthy: true,
                        health_reason: None,
                        numa_node: None,
                        interconnect_group: None,
                        mig_capable: false,
                    })
                    .collect(),
            },
            public_key: None,
        }
    }

    fn register(id: &str, gpus: &[&str]) -> Command {
        Command::RegisterNode {
            node: registration(id, gpus),
            join_token: None,
            at: Timestamp::new(10),
        }
    }

    fn alloc(id: &str, job: &str, node: &str, index: u32, gpus: &[&str]) -> Allocation {
        Allocation {
            id: AllocId::new(id),
            job_id: JobId::new(job),
            job_version: 1,
            node_id: NodeId::new(node),
            group: "web".to_owned(),
            index,
            resources: Resources {
                cpu_millis: 500.into(),
                memory_mib: 256.into(),
                gpus: (!gpus.is_empty()).then(|| GpuRequest {
                    count: u32::try_from(gpus.len()).unwrap(),
                    model: None,
                    min_memory_mib: None,
                    memory_slice_mib: None,
                    same_interconnect: false,
                }),
            },
            gpus: gpus.iter().map(|g| (*g).to_owned()).collect(),
            previous: None,
            reschedules: 0,
            state: AllocState::Pending,
            reason: None,
            restarts: 0,
            limits: None,
            endpoint: None,
            desired: DesiredState::Run,
            created_at: Timestamp::new(0),
            updated_at: Timestamp::new(0),
        }
    }

    fn upsert(allocations: Vec<Allocation>) -> Command {
        Command::UpsertAllocations {
            allocations,
            at: Timestamp::new(300),
        }
    }

    fn report(node: &str, reports: &[(&str, AllocState)]) -> Command {
        Command::ReportAllocations {
            node_id: NodeId::new(node),
            reports: reports
                .iter()
                .map(|(id, state)| AllocationReport::new(AllocId::new(*id), *state))
                .collect(),
            at: Timestamp::new(400),
        }
    }

    fn submitted(out: CommandOutput) -> SubmitJobResponse {
        match out {
            Ok(Applied::JobSubmitted(r)) => r,
            other => panic!("expected a submission, got {other:?}"),
        }
    }

    /// A log with node `n1` (GPUs g0, g1) and job `j1` named `api`.
    fn with_job_and_node() -> Log {
        let mut log = Log::new();
        log.apply(register("n1", &["g0", "g1"])).unwrap();
        log.apply(submit("j1", "e1", spec("api"))).unwrap();
        log
    }

    fn keyed(id: &str, seed: u8) -> NodeRegistration {
        let mut reg = registration(id, &["g0"]);
        reg.public_key = Some(aigrid_api::NodeKey::from_secret([seed; 32]).public());
        reg
    }

    fn join(reg: NodeRegistration, token: Option<(&str, &str)>, at: u64) -> Command {
        Command::RegisterNode {
            node: reg,
            join_token: token.map(|(id, secret)| TokenUse {
                id: id.to_owned(),
                secret_hash: aigrid_api::auth::hash_secret(secret),
            }),
            at: Timestamp::new(at),
        }
    }

    fn token(id: &str, secret: &str, ttl_secs: u64, max_uses: Option<u32>) -> Command {
        Command::CreateJoinToken {
            id: id.to_owned(),
            secret_hash: aigrid_api::auth::hash_secret(secret),
            ttl_secs,
            max_uses,
            description: None,
            at: Timestamp::new(1_000),
        }
    }

    fn unauthorized(out: CommandOutput) -> String {
        match out {
            Err(StateError::Unauthorized(m)) => m,
            other => panic!("expected unauthorized, got {other:?}"),
        }
    }

    #[test]
    fn join_tokens_admit_new_keys_until_they_expire_or_run_out() {
        let mut log = Log::new();
        log.apply(token("t1", "s3cret", 10, Some(2))).unwrap();
        let before = log.bytes();
        // No token, a wrong secret, an unknown token: refused, nothing changes.
        assert!(unauthorized(log.apply(join(keyed("a", 1), None, 2_000))).contains("join token"));
        assert!(
            unauthorized(log.apply(join(keyed("a", 1), Some(("t1", "guess")), 2_000)))
                .contains("does not match")
        );
        assert!(
            unauthorized(log.apply(join(keyed("a", 1), Some(("t9", "s3cret")), 2_000)))
                .contains("unknown")
        );
        assert_eq!(log.bytes(), before);

        log.apply(join(keyed("a", 1), Some(("t1", "s3cret")), 2_000))
            .unwrap();
        assert_eq!(log.state.join_tokens()[0].uses, 1);
        // A known node re-registers with its key alone, and cannot swap keys.
        log.apply(join(keyed("a", 1), None, 3_000)).unwrap();
        assert!(
            unauthorized(log.apply(join(keyed("a", 2), Some(("t1", "s3cret")), 3_000)))
                .contains("another key")
        );
        log.apply(join(keyed("b", 2), Some(("t1", "s3cret")), 3_000))
            .unwrap();
        assert!(
            unauthorized(log.apply(join(keyed("c", 3), Some(("t1", "s3cret")), 3_000)))
                .contains("used up")
        );
        log.apply(token("t2", "later", 10, None)).unwrap();
        assert!(
            unauthorized(log.apply(join(keyed("c", 3), Some(("t2", "later")), 11_000)))
                .contains("expired")
        );
        // Deleting a token leaves the nodes that joined with it.
        log.apply(Command::DeleteJoinToken {
            id: "t1".into(),
            at: Timestamp::new(4_000),
        })
        .unwrap();
        assert_eq!(log.state.join_tokens().len(), 1);
        assert!(log.state.node(&NodeId::new("a")).is_some());
        // Tokens and keys survive a snapshot.
        let mut restored = ClusterState::default();
        restored.restore(&log.bytes()).unwrap();
        assert_eq!(restored.join_tokens(), log.state.join_tokens());
        assert_eq!(
            restored.node_key(&NodeId::new("a")),
            Some((keyed("a", 1).public_key, false))
        );
    }

    #[test]
    fn a_revoked_node_loses_its_work_and_rejoins_only_with_a_new_key() {
        let mut log = Log::new();
        log.apply(token("t1", "s", 1_000, None)).unwrap();
        log.apply(join(keyed("a", 1), Some(("t1", "s")), 2_000))
            .unwrap();
        log.apply(submit("j1", "e1", spec("api"))).unwrap();
        log.apply(upsert(vec![alloc("x", "j1", "a", 0, &["g0"])]))
            .unwrap();
        let Applied::NodeUpdated {
            status, eval_ids, ..
        } = log
            .apply(Command::RevokeNode {
                node_id: NodeId::new("a"),
                at: Timestamp::new(3_000),
            })
            .unwrap()
        else {
            panic!("not a node update");
        };
        assert_eq!(status, NodeStatus::Down);
        assert_eq!(eval_ids.len(), 1);
        assert!(log.state.node_key(&NodeId::new("a")).unwrap().1);
        assert_eq!(
            log.state.allocation(&AllocId::new("x")).unwrap().state,
            AllocState::Lost
        );
        // Its heartbeats are refused; its old key cannot come back, even with a token.
        let hb = Command::NodeHeartbeat {
            node_id: NodeId::new("a"),
            gpus: vec![],
            allocations: vec![],
            logs: Vec::new(),
            at: Timestamp::new(3_100),
        };
        assert!(unauthorized(log.apply(hb)).contains("revoked"));
        assert!(
            unauthorized(log.apply(join(keyed("a", 1), Some(("t1", "s")), 3_200)))
                .contains("revoked")
        );
        log.apply(join(keyed("a", 7), Some(("t1", "s")), 3_300))
            .unwrap();
        let node = log.state.node(&NodeId::new("a")).unwrap();
        assert!(!node.revoked);
        assert_eq!(node.status, NodeStatus::Ready);
    }

    #[test]
    fn batched_liveness_moves_last_seen_but_never_revives_a_down_node() {
        let mut log = Log::new();
        log.apply(register("n1", &["g0"])).unwrap();
        log.apply(register("n2", &["g1"])).unwrap();
        log.apply(Command::SetNodeStatus {
            node_id: NodeId::new("n2"),
            status: NodeStatus::Down,
            at: Timestamp::new(20),
        })
        .unwrap();
        let seen = Command::NodesSeen {
            nodes: vec![NodeId::new("n1"), NodeId::new("n2"), NodeId::new("gone")],
            at: Timestamp::new(500),
        };
        assert_eq!(log.apply(seen), Ok(Applied::NodesSeen { updated: 1 }));
        let n1 = log.state.node(&NodeId::new("n1")).unwrap();
        let n2 = log.state.node(&NodeId::new("n2")).unwrap();
        assert_eq!(n1.last_seen, Timestamp::new(500));
        assert_eq!(
            (n2.status, n2.last_seen),
            (NodeStatus::Down, Timestamp::new(10))
        );
        // An older batch never moves last_seen back.
        let old = Command::NodesSeen {
            nodes: vec![NodeId::new("n1")],
            at: Timestamp::new(100),
        };
        assert_eq!(log.apply(old), Ok(Applied::NodesSeen { updated: 0 }));
    }

    #[test]
    fn assignments_carry_the_task_and_wake_only_on_changes_their_agent_acts_on() {
        let mut log = with_job_and_node();
        let n1 = NodeId::new("n1");
        let watch = log.state.watch();
        let mut rx = watch.subscribe(&n1);
        let registered = log.state.node_assignment_index(&n1);
        log.apply(upsert(vec![alloc("x", "j1", "n1", 0, &[])]))
            .unwrap();
        let a = log.state.assignments(&n1).unwrap();
        assert!(a.index > registered);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert_eq!(a.allocations.len(), 1);
        assert!(matches!(
            a.allocations[0].task,
            Some(aigrid_api::TaskSpec::Exec(_))
        ));

        // The agent's own report changes nothing it must act on.
        let mut running = AllocationReport::new(AllocId::new("x"), AllocState::Running);
        running.restarts = 2;
        running.reason = Some("x".repeat(5_000));
        log.apply(Command::ReportAllocations {
            node_id: n1.clone(),
            reports: vec![running],
            at: Timestamp::new(300),
        })
        .unwrap();
        assert_eq!(log.state.node_assignment_index(&n1), a.index);
        assert!(!rx.has_changed().unwrap());
        let x = log.state.allocation(&AllocId::new("x")).unwrap();
        assert_eq!(x.restarts, 2);
        assert_eq!(
            x.reason.unwrap().len(),
            aigrid_api::allocation::MAX_REASON_LEN
        );

        // Log tails are kept per allocation and dropped with it.
        log.apply(Command::NodeHeartbeat {
            node_id: n1.clone(),
            gpus: vec![],
            allocations: vec![],
            logs: vec![LogTail {
                id: AllocId::new("x"),
                stdout: "hello\n".into(),
                stderr: String::new(),
            }],
            at: Timestamp::new(400),
        })
        .unwrap();
        let logs = log.state.allocation_logs(&AllocId::new("x")).unwrap();
        assert_eq!(
            (logs.stdout.as_str(), logs.updated_at),
            ("hello\n", Some(Timestamp::new(400)))
        );

        // Deleting the job asks the agent to stop it: that wakes the poll.
        log.apply(delete("j1", "e2")).unwrap();
        assert!(rx.has_changed().unwrap());
        let a = log.state.assignments(&n1).unwrap();
        assert_eq!(a.allocations[0].allocation.desired, DesiredState::Stop);
        log.apply(report("n1", &[("x", AllocState::Stopped)]))
            .unwrap();
        assert!(log.state.assignments(&n1).unwrap().allocations.is_empty());
        assert!(log.state.allocation_logs(&AllocId::new("x")).is_none());
    }

    #[test]
    fn only_what_a_heartbeat_changes_is_committed() {
        let mut log = with_job_and_node();
        log.apply(upsert(vec![alloc("x", "j1", "n1", 0, &["g0"])]))
            .unwrap();
        let n1 = NodeId::new("n1");
        let healthy = |uuid: &str| GpuHealth {
            uuid: uuid.into(),
            healthy: true,
            reason: None,
        };
        let same = Heartbeat {
            gpus: vec![healthy("g0"), healthy("g1")],
            allocations: vec![AllocationReport::new(
                AllocId::new("x"),
                AllocState::Pending,
            )],
            ..Heartbeat::default()
        };
        assert_eq!(log.state.heartbeat_changes(&n1, &same), None);
        let mut new = same.clone();
        new.gpus[1].healthy = false;
        new.allocations[0].state = AllocState::Running;
        new.allocations.push(AllocationReport::new(
            AllocId::new("gone"),
            AllocState::Running,
        ));
        let changes = log.state.heartbeat_changes(&n1, &new).unwrap();
        assert_eq!(changes.gpus.len(), 1);
        assert_eq!(changes.gpus[0].uuid, "g1");
        assert_eq!(changes.allocations.len(), 1);
        // A node marked down comes back only through a committed heartbeat.
        log.apply(Command::SetNodeStatus {
            node_id: n1.clone(),
            status: NodeStatus::Down,
            at: Timestamp::new(500),
        })
        .unwrap();
        assert!(log.state.heartbeat_changes(&n1, &same).is_some());
    }

    #[test]
    fn submit_creates_a_job_and_an_evaluation() {
        let mut log = Log::new();
        let r = submitted(log.apply(submit("j1", "e1", spec("api"))));
        assert_eq!(
            r,
            SubmitJobResponse {
                id: JobId::new("j1"),
                version: 1,
                eval_id: EvalId::new("e1"),
                created: true
            }
        );
        let job = log.state.job(&JobId::new("j1")).unwrap();
        assert_eq!((job.version, job.status), (1, JobStatus::Pending));
        assert_eq!(job.submitted_at, Timestamp::new(100));
        let eval = log.state.evaluation(&EvalId::new("e1")).unwrap();
        assert_eq!(eval.trigger, EvalTrigger::JobSubmit);
        assert_eq!(eval.status, EvalStatus::Pending);
        assert_eq!(log.state.evaluations(EvalStatus::Pending), vec![eval]);
    }

    #[test]
    fn a_replayed_submission_answers_the_same_and_changes_nothing() {
        let mut log = Log::new();
        let first = log.apply(submit("j1", "e1", spec("api")));
        let before = log.bytes();
        assert_eq!(log.apply(submit("j1", "e1", spec("api"))), first);
        assert_eq!(log.bytes(), before);

        let mut changed = spec("api");
        changed.priority = 70;
        let update = submit("j2", "e2", changed);
        let second = log.apply(update.clone());
        let before = log.bytes();
        assert_eq!(log.apply(update), second);
        assert_eq!(log.bytes(), before);
        assert_eq!(log.state.job(&JobId::new("j1")).unwrap().version, 2);
    }

    #[test]
    fn resubmitting_by_name_updates_in_place() {
        let mut log = Log::new();
        log.apply(submit("j1", "e1", spec("api"))).unwrap();
        let mut changed = spec("api");
        changed.groups[0].count = 5;
        let r = submitted(log.apply(submit("ignored", "e2", changed.clone())));
        assert_eq!(
            r,
            SubmitJobResponse {
                id: JobId::new("j1"),
                version: 2,
                eval_id: EvalId::new("e2"),
                created: false
            }
        );
        assert!(log.state.job(&JobId::new("ignored")).is_none());
        let job = log.state.job_by_name("api").unwrap();
        assert_eq!((job.id.as_str(), job.version), ("j1", 2));
        assert_eq!(job.spec, changed);
        let eval = log.state.evaluation(&EvalId::new("e2")).unwrap();
        assert_eq!(
            (eval.trigger, eval.job_version),
            (EvalTrigger::JobUpdate, 2)
        );
        assert_eq!(log.state.jobs().len(), 1);
    }

    #[test]
    fn resubmitting_an_unchanged_spec_is_a_no_op() {
        let mut log = Log::new();
        log.apply(submit("j1", "e1", spec("api"))).unwrap();
        let before = log.bytes();
        let r = submitted(log.apply(submit("j9", "e9", spec("api"))));
        assert_eq!(
            (r.id.as_str(), r.version, r.eval_id.as_str()),
            ("j1", 1, "e1")
        );
        assert!(!r.created);
        assert_eq!(log.bytes(), before);
    }

    #[test]
    fn reused_ids_are_conflicts() {
        let mut log = Log::new();
        log.apply(submit("j1", "e1", spec("api"))).unwrap();
        let before = log.bytes();
        let err = log.apply(submit("j1", "e2", spec("other"))).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Conflict);
        let err = log.apply(submit("j2", "e1", spec("other"))).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Conflict);
        let err = log.apply(delete("j1", "e1")).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Conflict);
        assert_eq!(log.bytes(), before);
    }

    #[test]
    fn an_invalid_spec_is_rejected_and_changes_nothing() {
        let mut log = with_job_and_node();
        let before = log.bytes();
        let mut bad = spec("api");
        bad.groups[0].resources.cpu_millis = 0.into();
        let err = log.apply(submit("j2", "e2", bad)).unwrap_err();
        match &err {
            StateError::Invalid(v) => assert_eq!(v.field, "groups[0].resources.cpu_millis"),
            other => panic!("{other:?}"),
        }
        assert_eq!(err.code(), ErrorCode::InvalidField);
        let mut bad = spec("api");
        bad.priority = 101;
        assert!(log.apply(submit("j3", "e3", bad)).is_err());
        assert_eq!(log.bytes(), before);
    }

    #[test]
    fn delete_stops_allocations_and_forgets_the_job() {
        let mut log = with_job_and_node();
        log.apply(upsert(vec![
            alloc("a0", "j1", "n1", 0, &["g0"]),
            alloc("a1", "j1", "n1", 1, &[]),
        ]))
        .unwrap();
        log.apply(report(
            "n1",
            &[("a0", AllocState::Running), ("a1", AllocState::Failed)],
        ))
        .unwrap();

        let out = log.apply(delete("j1", "d1"));
        assert_eq!(
            out,
            Ok(Applied::JobDeleted(DeleteJobResponse {
                id: JobId::new("j1"),
                eval_id: EvalId::new("d1")
            }))
        );
        assert!(log.state.job(&JobId::new("j1")).is_none());
        assert!(log.state.job_by_name("api").is_none());
        let a0 = log.state.allocation(&AllocId::new("a0")).unwrap();
        assert_eq!(a0.desired, DesiredState::Stop);
        assert!(
            log.state.allocation(&AllocId::new("a1")).is_none(),
            "finished allocation kept"
        );
        let eval = log.state.evaluation(&EvalId::new("d1")).unwrap();
        assert_eq!(eval.trigger, EvalTrigger::JobDelete);

        let before = log.bytes();
        assert_eq!(log.apply(delete("j1", "d1")), out, "replay");
        assert_eq!(log.bytes(), before);
        let err = log.apply(delete("j1", "d2")).unwrap_err();
        assert_eq!(
            err,
            StateError::NotFound {
                kind: ObjectKind::Job,
                id: "j1".into()
            }
        );
        assert_eq!(err.to_string(), "job `j1` not found");

        log.apply(report("n1", &[("a0", AllocState::Stopped)]))
            .unwrap();
        assert!(log.state.allocation(&AllocId::new("a0")).is_none());
        assert_eq!(log.state.counts().allocations, 0);

        let again = submitted(log.apply(submit("j2", "e2", spec("api"))));
        assert!(again.created, "a deleted name can be reused");
        assert_eq!((again.id.as_str(), again.version), ("j2", 1));
    }

    #[test]
    fn nodes_register_heartbeat_and_keep_a_drain() {
        let mut log = Log::new();
        assert_eq!(
            log.apply(register("n1", &["g0"])),
            Ok(Applied::NodeRegistered {
                id: NodeId::new("n1"),
                created: true,
                eval_ids: vec![]
            })
        );
        let hb = Command::NodeHeartbeat {
            node_id: NodeId::new("n1"),
            gpus: vec![],
            allocations: vec![],
            logs: Vec::new(),
            at: Timestamp::new(50),
        };
        log.apply(hb).unwrap();
        let node = log.state.node(&NodeId::new("n1")).unwrap();
        assert_eq!(
            (node.registered_at, node.last_seen),
            (Timestamp::new(10), Timestamp::new(50))
        );

        let drain = Command::SetNodeStatus {
            node_id: NodeId::new("n1"),
            status: NodeStatus::Draining,
            at: Timestamp::new(60),
        };
        log.apply(drain).unwrap();
        let out = log.apply(register("n1", &["g0"])).unwrap();
        assert!(matches!(
            out,
            Applied::NodeRegistered { created: false, .. }
        ));
        let node = log.state.node(&NodeId::new("n1")).unwrap();
        assert_eq!(node.status, NodeStatus::Draining);
        assert_eq!(
            node.last_seen,
            Timestamp::new(50),
            "last_seen never goes back"
        );

        let err = log
            .apply(Command::NodeHeartbeat {
                node_id: NodeId::new("nope"),
                gpus: vec![],
                allocations: vec![],
                logs: Vec::new(),
                at: Timestamp::new(1),
            })
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::NotFound);
        let mut bad = registration("n2", &["g0", "g0"]);
        bad.resources.gpus[1].index = 1;
        let err = log
            .apply(Command::RegisterNode {
                node: bad,
                join_token: None,
                at: Timestamp::new(1),
            })
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidField);
        assert_eq!(log.state.nodes().len(), 1);
    }

    #[test]
    fn a_down_node_loses_its_allocations_and_triggers_evaluations() {
        let mut log = with_job_and_node();
        log.apply(upsert(vec![alloc("a0", "j1", "n1", 0, &["g0"])]))
            .unwrap();
        log.apply(report("n1", &[("a0", AllocState::Running)]))
            .unwrap();
        assert_eq!(
            log.state.job(&JobId::new("j1")).unwrap().status,
            JobStatus::Running
        );

        let down = Command::SetNodeStatus {
            node_id: NodeId::new("n1"),
            status: NodeStatus::Down,
            at: Timestamp::new(500),
        };
        let out = log.apply(down.clone()).unwrap();
        let Applied::NodeUpdated {
            status, eval_ids, ..
        } = out
        else {
            panic!("{out:?}")
        };
        assert_eq!(status, NodeStatus::Down);
        assert_eq!(
            eval_ids,
            vec![EvalId::new(format!("log-{}-node_update-0", log.index))]
        );
        let eval = log.state.evaluation(&eval_ids[0]).unwrap();
        assert_eq!(
            (eval.trigger, eval.job_id.as_str()),
            (EvalTrigger::NodeUpdate, "j1")
        );
        assert_eq!(
            log.state.allocation(&AllocId::new("a0")).unwrap().state,
            AllocState::Lost
        );
        assert_eq!(
            log.state.job(&JobId::new("j1")).unwrap().status,
            JobStatus::Pending
        );

        let before = log.bytes();
        let again = log.apply(down).unwrap();
        assert!(matches!(again, Applied::NodeUpdated { ref eval_ids, .. } if eval_ids.is_empty()));
        assert_eq!(log.bytes(), before);

        log.apply(report("n1", &[("a0", AllocState::Running)]))
            .unwrap();
        assert_eq!(
            log.state.allocation(&AllocId::new("a0")).unwrap().state,
            AllocState::Lost,
            "finished states never change"
        );
        log.apply(Command::NodeHeartbeat {
            node_id: NodeId::new("n1"),
            gpus: vec![],
            allocations: vec![],
            logs: Vec::new(),
            at: Timestamp::new(600),
        })
        .unwrap();
        assert_eq!(
            log.state.node(&NodeId::new("n1")).unwrap().status,
            NodeStatus::Ready
        );
    }

    #[test]
    fn a_node_that_loses_a_gpu_loses_the_allocations_holding_it() {
        let mut log = with_job_and_node();
        log.apply(upsert(vec![
            alloc("a0", "j1", "n1", 0, &["g0"]),
            alloc("a1", "j1", "n1", 1, &["g1"]),
        ]))
        .unwrap();
        let out = log.apply(register("n1", &["g1"])).unwrap();
        assert!(matches!(out, Applied::NodeRegistered { ref eval_ids, .. } if eval_ids.len() == 1));
        let state = |id: &str| log.state.allocation(&AllocId::new(id)).unwrap().state;
        assert_eq!(
            (state("a0"), state("a1")),
            (AllocState::Lost, AllocState::Pending)
        );
    }

    #[test]
    fn allocations_are_checked_before_anything_is_written() {
        let mut log = with_job_and_node();
        log.apply(register("n2", &[])).unwrap();
        log.apply(upsert(vec![alloc("a0", "j1", "n1", 0, &["g0"])]))
            .unwrap();
        let before = log.bytes();
        let good = alloc("a1", "j1", "n1", 1, &["g1"]);
        let cases: Vec<(Allocation, ErrorCode)> = vec![
            (alloc("a2", "nojob", "n1", 1, &[]), ErrorCode::NotFound),
            (alloc("a2", "j1", "nonode", 1, &[]), ErrorCode::NotFound),
            (alloc("a2", "j1", "n1", 2, &[]), ErrorCode::InvalidField),
            (alloc("a2", "j1", "n1", 1, &["g9"]), ErrorCode::InvalidField),
            (
                alloc("a2", "j1", "n1", 1, &["g1", "g1"]),
                ErrorCode::InvalidField,
            ),
            (alloc("a2", "j1", "n1", 1, &["g0"]), ErrorCode::Conflict),
            (alloc("a0", "j1", "n2", 0, &[]), ErrorCode::Conflict),
            (
                Allocation {
                    id: AllocId::new("a2"),
                    group: "db".into(),
                    ..good.clone()
                },
                ErrorCode::InvalidField,
            ),
            (
                Allocation {
                    id: AllocId::new("a2"),
                    job_version: 2,
                    ..good.clone()
                },
                ErrorCode::InvalidField,
            ),
        ];
        for (bad, code) in cases {
            let err = log
                .apply(upsert(vec![good.clone(), bad.clone()]))
                .unwrap_err();
            assert_eq!(err.code(), code, "{bad:?}: {err}");
            assert_eq!(log.bytes(), before, "{bad:?}");
        }
        let err = log
            .apply(upsert(vec![good.clone(), good.clone()]))
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidField);

        log.apply(Command::SetNodeStatus {
            node_id: NodeId::new("n1"),
            status: NodeStatus::Draining,
            at: Timestamp::new(1),
        })
        .unwrap();
        let err = log.apply(upsert(vec![good.clone()])).unwrap_err();
        assert_eq!(
            err.code(),
            ErrorCode::Conflict,
            "new work on a draining node"
        );

        let mut moved = alloc("a0", "j1", "n1", 0, &["g0"]);
        moved.desired = DesiredState::Stop;
        // A wanted instance stopped without a replacement goes back in the queue.
        let out = log.apply(upsert(vec![moved])).unwrap();
        let Applied::AllocationsUpserted { count: 1, eval_ids } = out else {
            panic!("{out:?}")
        };
        let eval = log.state.evaluation(&eval_ids[0]).unwrap();
        assert_eq!(
            (eval.trigger, eval.job_id.as_str(), eval.wait_until),
            (EvalTrigger::Preemption, "j1", None)
        );
        let a0 = log.state.allocation(&AllocId::new("a0")).unwrap();
        assert_eq!(
            (a0.desired, a0.created_at),
            (DesiredState::Stop, Timestamp::new(300))
        );
    }

    #[test]
    fn a_stopped_gpu_can_be_reused_and_reports_are_scoped_to_their_node() {
        let mut log = with_job_and_node();
        log.apply(register("n2", &[])).unwrap();
        log.apply(upsert(vec![alloc("a0", "j1", "n1", 0, &["g0"])]))
            .unwrap();
        let err = log
            .apply(report("n2", &[("a0", AllocState::Failed)]))
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::Conflict);
        let out = log.apply(report(
            "n1",
            &[("a0", AllocState::Complete), ("gone", AllocState::Running)],
        ));
        assert_eq!(
            out,
            Ok(Applied::AllocationsReported {
                updated: 1,
                eval_ids: vec![]
            })
        );
        log.apply(upsert(vec![alloc("a1", "j1", "n1", 1, &["g0"])]))
            .unwrap();
        let err = log.apply(report("nope", &[])).unwrap_err();
        assert_eq!(err.code(), ErrorCode::NotFound);
    }

    #[test]
    fn batch_status_follows_its_instances() {
        let mut log = Log::new();
        log.apply(register("n1", &[])).unwrap();
        let mut batch = spec("train");
        batch.kind = JobKind::Batch;
        log.apply(submit("j1", "e1", batch)).unwrap();
        log.apply(upsert(vec![
            alloc("a0", "j1", "n1", 0, &[]),
            alloc("a1", "j1", "n1", 1, &[]),
        ]))
        .unwrap();
        let status = |log: &Log| log.state.job(&JobId::new("j1")).unwrap().status;
        assert_eq!(status(&log), JobStatus::Pending);
        log.apply(report("n1", &[("a0", AllocState::Complete)]))
            .unwrap();
        assert_eq!(status(&log), JobStatus::Running);
        log.apply(report("n1", &[("a1", AllocState::Complete)]))
            .unwrap();
        assert_eq!(status(&log), JobStatus::Complete);
        let summary = &log.state.jobs()[0];
        assert_eq!(
            (summary.status, summary.instances, summary.running),
            (JobStatus::Complete, 2, 0)
        );
    }

    #[test]
    fn evaluation_verdicts_reach_the_job_view() {
        let mut log = with_job_and_node();
        let unplaced = vec![Unplaced {
            group: "web".into(),
            count: 2,
            reason: "no node with 2 free H100".into(),
        }];
        let out = log.apply(Command::UpdateEvaluation {
            eval_id: EvalId::new("e1"),
            status: EvalStatus::Blocked,
            unplaced: unplaced.clone(),
            at: Timestamp::new(700),
        });
        assert_eq!(
            out,
            Ok(Applied::EvaluationUpdated {
                id: EvalId::new("e1")
            })
        );
        assert_eq!(log.state.job(&JobId::new("j1")).unwrap().unplaced, unplaced);
        assert_eq!(log.state.counts().evaluations_blocked, 1);
        let err = log
            .apply(Command::UpdateEvaluation {
                eval_id: EvalId::new("nope"),
                status: EvalStatus::Complete,
                unplaced: vec![],
                at: Timestamp::new(1),
            })
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::NotFound);
    }

    #[test]
    fn batched_verdicts_skip_forgotten_evaluations() {
        let mut log = with_job_and_node();
        let out = log.apply(Command::UpdateEvaluations {
            updates: vec![
                EvaluationUpdate {
                    eval_id: EvalId::new("forgotten"),
                    status: EvalStatus::Complete,
                    unplaced: vec![],
                },
                EvaluationUpdate {
                    eval_id: EvalId::new("e1"),
                    status: EvalStatus::Complete,
                    unplaced: vec![],
                },
            ],
            at: Timestamp::new(800),
        });
        assert_eq!(out, Ok(Applied::EvaluationsUpdated { updated: 1 }));
        let eval = log.state.evaluation(&EvalId::new("e1")).unwrap();
        assert_eq!(eval.status, EvalStatus::Complete);
        assert_eq!(eval.updated_at, Timestamp::new(800));
        assert_eq!(log.state.counts().evaluations_pending, 0);
    }

    #[test]
    fn evaluation_history_is_bounded_completed_first() {
        let mut log = Log::with(ClusterState::with_eval_limit(3));
        for i in 0..3 {
            log.apply(submit(
                &format!("j{i}"),
                &format!("e{i}"),
                spec(&format!("job{i}")),
            ))
            .unwrap();
        }
        log.apply(Command::UpdateEvaluation {
            eval_id: EvalId::new("e1"),
            status: EvalStatus::Complete,
            unplaced: vec![],
            at: Timestamp::new(1),
        })
        .unwrap();
        log.apply(submit("j3", "e3", spec("job3"))).unwrap();
        let kept: Vec<_> = log
            .state
            .evaluations(EvalStatus::Pending)
            .into_iter()
            .map(|e| e.id.0)
            .collect();
        assert_eq!(kept, ["e0", "e2", "e3"], "the completed one goes first");
        log.apply(submit("j4", "e4", spec("job4"))).unwrap();
        let kept: Vec<_> = log
            .state
            .evaluations(EvalStatus::Pending)
            .into_iter()
            .map(|e| e.id.0)
            .collect();
        assert_eq!(kept, ["e2", "e3", "e4"], "then the oldest");
        assert_eq!(log.state.counts().evaluations, 3);
    }

    #[test]
    fn reads_list_jobs_by_name_and_count_objects() {
        let mut log = with_job_and_node();
        log.apply(submit("j0", "e0", spec("zeta"))).unwrap();
        log.apply(submit("j2", "e2", spec("alpha"))).unwrap();
        let names: Vec<_> = log.state.jobs().into_iter().map(|j| j.name).collect();
        assert_eq!(names, ["alpha", "api", "zeta"]);
        log.apply(upsert(vec![alloc("a0", "j1", "n1", 0, &[])]))
            .unwrap();
        assert_eq!(log.state.node_allocations(&NodeId::new("n1")).len(), 1);
        assert_eq!(
            log.state.counts(),
            StateCounts {
                jobs: 3,
                nodes: 1,
                nodes_ready: 1,
                allocations: 1,
                allocations_live: 1,
                evaluations: 3,
                evaluations_pending: 3,
                evaluations_blocked: 0,
                models: 0,
            }
        );
    }

    #[test]
    fn snapshot_and_restore_round_trip() {
        let mut log = with_job_and_node();
        log.apply(upsert(vec![alloc("a0", "j1", "n1", 0, &["g0"])]))
            .unwrap();
        let bytes = log.bytes();
        let mut restored = ClusterState::default();
        restored.restore(&bytes).unwrap();
        assert_eq!(restored.snapshot().unwrap(), bytes);
        assert_eq!(restored.job_by_name("api"), log.state.job_by_name("api"));
        assert_eq!(restored.jobs(), log.state.jobs());

        // The restored state keeps applying exactly like the original.
        let mut a = log;
        let mut b = Log::with(restored);
        b.index = a.index;
        let next = submit("j1", "e5", {
            let mut s = spec("api");
            s.priority = 90;
            s
        });
        assert_eq!(a.apply(next.clone()), b.apply(next));
        assert_eq!(a.bytes(), b.bytes());
    }

    #[test]
    fn reported_endpoints_are_kept_checked_and_route_model_servers() {
        let mut log = Log::new();
        log.apply(register("n1", &[])).unwrap();
        let mut served = spec_json("llm");
        served["groups"][0]["task"] = json!({"driver": "model-server", "model": "d1"});
        log.apply(submit("j1", "e1", serde_json::from_value(served).unwrap()))
            .unwrap();
        log.apply(submit("j2", "e2", spec("api"))).unwrap();
        log.apply(upsert(vec![
            alloc("m0", "j1", "n1", 0, &[]),
            alloc("m1", "j1", "n1", 1, &[]),
            alloc("x0", "j2", "n1", 0, &[]),
        ]))
        .unwrap();
        assert!(log.state.model_servers().is_empty(), "pending: nowhere yet");
        let at = |id: &str, endpoint: Option<&str>| {
            let mut r = AllocationReport::new(AllocId::new(id), AllocState::Running);
            r.endpoint = endpoint.map(str::to_owned);
            r
        };
        let reports = vec![
            at("m0", Some("http://10.0.0.1:9000")),
            at("m1", None),
            at("x0", Some("http://10.0.0.1:9001")),
        ];
        let reported = |reports: Vec<AllocationReport>| Command::ReportAllocations {
            node_id: NodeId::new("n1"),
            reports,
            at: Timestamp::new(400),
        };
        log.apply(reported(reports.clone())).unwrap();
        let servers: Vec<(String, String)> = log
            .state
            .model_servers()
            .into_iter()
            .map(|(digest, a)| (digest.to_owned(), a.id.to_string()))
            .collect();
        // m1 reports no endpoint, x0 is not a model server.
        assert_eq!(servers, [("d1".to_owned(), "m0".to_owned())]);
        let x0 = log.state.allocation(&AllocId::new("x0")).unwrap();
        assert_eq!(x0.endpoint.as_deref(), Some("http://10.0.0.1:9001"));
        let hb = Heartbeat {
            gpus: vec![],
            allocations: reports,
            telemetry: None,
            logs: vec![],
        };
        assert!(
            log.state
                .heartbeat_changes(&NodeId::new("n1"), &hb)
                .is_none(),
            "the same endpoints again change nothing"
        );

        // An endpoint that is more than a host and port is refused, changing nothing.
        let before = log.bytes();
        let bad = reported(vec![at("m1", Some("http://10.0.0.1:9000/elsewhere"))]);
        let err = log.apply(bad).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidField);
        assert!(err.to_string().contains("endpoint"), "{err}");
        assert_eq!(log.bytes(), before);

        // Snapshots carry endpoints.
        let mut restored = ClusterState::default();
        restored.restore(&log.bytes()).unwrap();
        assert_eq!(
            restored.allocation(&AllocId::new("m0")).unwrap().endpoint,
            Some("http://10.0.0.1:9000".to_owned())
        );
        assert_eq!(restored.model_servers().len(), 1);
    }

    #[test]
    fn restore_refuses_garbage_and_leaves_the_state_alone() {
        let mut log = with_job_and_node();
        let before = log.bytes();
        assert!(log.state.restore(b"not json").is_err());
        let mut truncated = before.clone();
        truncated.truncate(before.len() / 2);
        assert!(log.state.restore(&truncated).is_err());
        let plain =
            std::io::read_to_string(lz4_flex::frame::FrameDecoder::new(&before[..])).unwrap();
        let mut value: serde_json::Value = serde_json::from_str(&plain).unwrap();
        value["format"] = json!(99);
        assert!(log
            .state
            .restore(&serde_json::to_vec(&value).unwrap())
            .is_err());
        let mut value: serde_json::Value = serde_json::from_str(&plain).unwrap();
        value["jobs"]["j1"]["version"] = json!(0);
        let err = log
            .state
            .restore(&serde_json::to_vec(&value).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("version 0"), "{err}");
        assert_eq!(log.bytes(), before);
    }

    #[test]
    fn commands_are_stable_json() {
        let command = submit("j1", "e1", spec("api"));
        let value = serde_json::to_value(&command).unwrap();
        assert_eq!(value["type"], json!("submit_job"));
        assert_eq!(value["at"], json!(100));
        assert_eq!(value["spec"]["groups"][0]["task"]["driver"], json!("exec"));
        let back: Command = serde_json::from_value(value).unwrap();
        assert_eq!(back, command);
        let status: Command = serde_json::from_value(json!({
            "type": "set_node_status", "node_id": "n1", "status": "draining", "at": 5
        }))
        .unwrap();
        assert!(matches!(
            status,
            Command::SetNodeStatus {
                status: NodeStatus::Draining,
                ..
            }
        ));
    }

    /// A random command over small id spaces, so commands collide often.
    fn random_command(rng: &mut StdRng, step: u64) -> Command {
        let job = format!("j{}", rng.random_range(0..4));
        let node = format!("n{}", rng.random_range(0..3));
        let eval = format!("e{}", rng.random_range(0..12));
        let at = Timestamp::new(step);
        match rng.random_range(0..11) {
            0 | 1 => {
                let mut s = spec(&format!("job{}", rng.random_range(0..3)));
                s.priority = rng.random_range(0..3) * 50;
                s.groups[0].count = rng.random_range(1..3);
                Command::SubmitJob {
                    job_id: JobId::new(job),
                    eval_id: EvalId::new(eval),
                    spec: s,
                    at,
                }
            }
            2 => Command::DeleteJob {
                job_id: JobId::new(job),
                eval_id: EvalId::new(eval),
                at,
            },
            3 => {
                let gpus: &[&str] = if rng.random_bool(0.5) {
                    &["g0", "g1"]
                } else {
                    &["g1"]
                };
                Command::RegisterNode {
                    node: registration(&node, gpus),
                    join_token: None,
                    at,
                }
            }
            4 => Command::NodeHeartbeat {
                node_id: NodeId::new(node),
                gpus: if rng.random_bool(0.5) {
                    vec![GpuHealth {
                        uuid: "g1".into(),
                        healthy: rng.random_bool(0.5),
                        reason: Some("XID 79".into()),
                    }]
                } else {
                    vec![]
                },
                allocations: vec![],
                logs: Vec::new(),
                at,
            },
            9 => Command::DrainNode {
                node_id: NodeId::new(node),
                drain: DrainSpec {
                    max_parallel: rng.random_range(0..3),
                },
                at,
            },
            10 => Command::ApplyPlan {
                jobs: vec![JobPlan {
                    job_id: JobId::new(job),
                    job_version: rng.random_range(1..3),
                    place: vec![NewAllocation {
                        id: AllocId::new(format!("a{}", rng.random_range(0..6))),
                        group: "web".into(),
                        index: rng.random_range(0..2),
                        node: NodeId::new(node),
                        gpus: vec![],
                        previous: None,
                        reschedules: 0,
                    }],
                    stop: if rng.random_bool(0.3) {
                        vec![AllocId::new(format!("a{}", rng.random_range(0..6)))]
                    } else {
                        vec![]
                    },
                    moves: vec![],
                    evals: vec![EvaluationUpdate {
                        eval_id: EvalId::new(eval),
                        status: EvalStatus::Complete,
                        unplaced: vec![],
                    }],
                }],
                at,
            },
            5 => Command::SetNodeStatus {
                node_id: NodeId::new(node),
                status: NodeStatus::ALL[rng.random_range(0..3)],
                at,
            },
            6 => {
                let mut a = alloc(
                    &format!("a{}", rng.random_range(0..6)),
                    &job,
                    &node,
                    rng.random_range(0..2),
                    if rng.random_bool(0.5) { &["g1"] } else { &[] },
                );
                if rng.random_bool(0.3) {
                    a.desired = DesiredState::Stop;
                }
                upsert(vec![a])
            }
            7 => Command::ReportAllocations {
                node_id: NodeId::new(node),
                reports: vec![AllocationReport::new(
                    AllocId::new(format!("a{}", rng.random_range(0..6))),
                    AllocState::ALL[rng.random_range(0..AllocState::ALL.len())],
                )],
                at,
            },
            _ => Command::UpdateEvaluation {
                eval_id: EvalId::new(eval),
                status: EvalStatus::ALL[rng.random_range(0..3)],
                unplaced: vec![],
                at,
            },
        }
    }

    #[test]
    fn replicas_fed_the_same_log_stay_identical() {
        for seed in 0..20u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut a = Log::with(ClusterState::with_eval_limit(8));
            let mut b = Log::with(ClusterState::with_eval_limit(8));
            let mut outputs = 0;
            for step in 0..300 {
                let command = random_command(&mut rng, step);
                let before = a.bytes();
                let out_a = a.apply(command.clone());
                let out_b = b.apply(command.clone());
                assert_eq!(out_a, out_b, "seed {seed} step {step}");
                if out_a.is_err() {
                    assert_eq!(
                        a.bytes(),
                        before,
                        "seed {seed} step {step}: rejected {command:?} changed state"
                    );
                } else {
                    outputs += 1;
                }
                if step % 50 == 49 {
                    // A replica that restarts from a snapshot continues identically.
                    let mut restored = ClusterState::default();
                    restored.restore(&b.bytes()).unwrap();
                    b.state = restored;
                }
                assert_eq!(a.bytes(), b.bytes(), "seed {seed} step {step}");
            }
            assert!(outputs > 50, "seed {seed}: too few commands applied");
        }
    }
}
