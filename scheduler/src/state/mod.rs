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

mod allocations;
mod evaluations;
mod invariants;
mod jobs;
pub mod models;
mod nodes;
mod plans;
mod tables;
#[cfg(test)]
mod tests;
mod tokens;

use allocations::assigned;
pub use evaluations::EvaluationUpdate;
pub use plans::{JobPlan, MovedAllocation, NewAllocation};
use tables::{slice_of, AllocIndex, Held};
pub use tokens::TokenUse;

use std::collections::{BTreeMap, BTreeSet};

use aigrid_api::manifest::{Locations, ManifestError, Registration};
use aigrid_api::{
    AllocId, Allocation, AllocationReport, DeleteJobResponse, DrainSpec, ErrorCode, EvalId,
    EvalStatus, Evaluation, GpuHealth, JobId, JobSpec, JoinTokenInfo, LogTail, ModelSummary, Node,
    NodeId, NodeRegistration, NodeStatus, SubmitJobResponse, Timestamp, Unplaced, ValidationError,
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
    models: models::Models,
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
    /// Where events are published as entries apply; set by the edge, never
    /// replicated, and nothing the state reads back.
    events: Option<std::sync::Arc<dyn EventSink>>,
}

/// Something applying an entry changed that a waiter outside the state machine
/// may care about. The state only emits these; the edge decides who hears them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateEvent {
    /// What `node`'s agent must run changed at log `index`.
    AssignmentsChanged {
        /// The node whose assignments changed.
        node: NodeId,
        /// The log index that changed them.
        index: u64,
    },
    /// A snapshot replaced the whole state: any node's assignments may differ.
    Restored,
}

/// Receives the [`StateEvent`]s a [`ClusterState`] emits while it applies. Called
/// under the state's write lock, so an implementation only records or signals.
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Publishes one event.
    fn publish(&self, event: StateEvent);
}

impl Default for ClusterState {
    fn default() -> Self {
        Self::with_eval_limit(DEFAULT_EVAL_LIMIT)
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
        state.events = self.events.take();
        *self = state;
        // Every waiter re-reads: the restored state may differ in any node.
        self.emit(StateEvent::Restored);
        Ok(())
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
            models: models::Models::default(),
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
            events: None,
        }
    }

    /// This state, publishing its [`StateEvent`]s to `sink` from now on.
    pub fn with_events(mut self, sink: std::sync::Arc<dyn EventSink>) -> Self {
        self.events = Some(sink);
        self
    }

    fn emit(&self, event: StateEvent) {
        if let Some(sink) = &self.events {
            sink.publish(event);
        }
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
        self.emit(StateEvent::AssignmentsChanged {
            node: node.clone(),
            index,
        });
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
}
