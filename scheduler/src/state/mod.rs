//! The cluster state machine: every node, job, allocation, evaluation and registered
//! model the control plane knows, changed only by applying Raft-committed
//! [`Command`]s.
//!
//! Applying is deterministic: ids and timestamps come from the command (or, for
//! evaluations the state machine creates itself, from the log index), maps are
//! ordered (the hashed ones are never walked where their order could show, and a
//! snapshot writes them in key order), and nothing reads the clock or a random
//! source, so every replica that applies the same log holds the same bytes. A
//! command that breaks a rule is rejected whole and leaves the state untouched.
//! Commands may be applied twice (the driver re-proposes when it cannot tell
//! whether a proposal committed), so each one is idempotent: a replay answers what
//! the first application answered.

mod access;
mod allocations;
mod canonical;
pub mod chain;
mod command;
pub mod deployments;
mod error;
mod evaluations;
mod fleet;
mod invariants;
mod jobs;
pub mod metering;
pub mod models;
mod nodes;
mod plans;
mod ports;
mod quotas;
pub mod scaling;
mod tables;
#[cfg(test)]
mod tests;
mod tokens;
mod trail;
pub mod treasury;

pub use access::{Action, Principal};
use allocations::assigned;
pub use command::{Applied, Command, CommandOutput, ServerChange};
pub use deployments::{TrafficSplit, Verdict, Watched, WatchedInstance};
pub use error::{ObjectKind, StateError};
pub use evaluations::EvaluationUpdate;
pub use plans::{JobPlan, MovedAllocation, NewAllocation};
pub use scaling::ScaledGroup;
use tables::{slice_of, AllocIndex, Held};
pub use tokens::TokenUse;
pub use trail::Change;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use aigrid_api::{
    AllocId, Allocation, EvalId, EvalStatus, Evaluation, IdentityId, JobId, JobSpec, JoinTokenInfo,
    Node, NodeId, NodeStatus, Timestamp, Unplaced,
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
    /// Who submitted the current version, when a person did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    updated_by: Option<IdentityId>,
    /// Earlier versions, oldest first, at most [`jobs::VERSIONS_KEPT`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    history: Vec<KeptVersion>,
    /// The last version that deployed successfully (or was submitted without an
    /// update policy): what a failed rollout reverts to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stable_version: Option<u64>,
    /// Its latest rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deployment: Option<deployments::DeploymentRecord>,
    /// The latest changes of its scaled groups' counts, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    scale_events: Vec<aigrid_api::ScaleEvent>,
}

/// An earlier version of a job, kept to be shown and reverted to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeptVersion {
    version: u64,
    spec: JobSpec,
    submitted_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    by: Option<IdentityId>,
}

/// An evaluation with its creation order, which decides which ones are forgotten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalRecord {
    seq: u64,
    eval: Evaluation,
}

/// The state's hashed tables: foldhash, seeded at random per table, where the
/// standard SipHash-1-3 took a tenth of every submission's apply on the lookups,
/// inserts and trims of ids and names.
type Hashed<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Writes a hashed map as a map in key order, as a tree of the same entries writes.
fn in_key_order<K, V, S>(map: &Hashed<K, V>, serializer: S) -> Result<S::Ok, S::Error>
where
    K: Ord + Serialize,
    V: Serialize,
    S: serde::Serializer,
{
    let mut entries: Vec<(&K, &V)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    serializer.collect_map(entries)
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
    /// Shared with a snapshot being written: a job changed meanwhile is copied.
    /// Hashed: a submission looks its id up and inserts it, and the planner's verdict
    /// looks it up again, in a table of hundreds of thousands of random ids. Its walks
    /// (a circle's jobs, the derived sets) sum, collect into sets or sort, so no result
    /// depends on its order; a snapshot writes it in id order.
    #[serde(serialize_with = "in_key_order")]
    jobs: Hashed<JobId, Arc<JobRecord>>,
    allocations: BTreeMap<AllocId, Allocation>,
    /// Hashed: every submission looks its evaluation id up and inserts it, and each
    /// beyond the limit removes the oldest; in a tree of 10,000 random ids each was a
    /// chain of string comparisons. Written to a snapshot in id order, so a snapshot's
    /// bytes depend on the state alone.
    /// Boxed: past the limit every submission inserts one and removes one, and the
    /// table's rehashes (tombstones filling it) move a pointer per entry, not a
    /// record.
    #[serde(serialize_with = "in_key_order")]
    evaluations: Hashed<EvalId, Box<EvalRecord>>,
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
    /// Identities, circles' members and API keys.
    #[serde(default)]
    access: access::Access,
    /// Governed circles, proposals, target versions and the audit log.
    #[serde(default)]
    chain: chain::Chain,
    /// Fleet rollouts by id, at most [`fleet::ROLLOUTS_KEPT`].
    #[serde(default)]
    rollouts: BTreeMap<String, aigrid_api::FleetRollout>,
    /// Metered use.
    #[serde(default)]
    metering: metering::Metering,
    /// Balances, unsettled use and the ledger.
    #[serde(default)]
    treasury: treasury::Treasury,
    /// Circles' quotas.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    quotas: BTreeMap<String, aigrid_api::Quota>,
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
    /// Live job names to ids; derived from `tables.jobs`. Hashed: every submission
    /// looks its name up several times, and a tree of a few hundred thousand names
    /// costs a chain of string comparisons (each a cache miss) per look. The one
    /// reading in name order, the job list, sorts what it lists.
    job_names: Hashed<String, JobId>,
    /// Names of the live jobs with a `model-server` group; derived from
    /// `tables.jobs`, so the gateway's routing reads never scan every job.
    model_jobs: BTreeSet<String>,
    /// Ids of the live jobs with a deployment record, under way or not; derived
    /// from `tables.jobs`, so the leader's look at the rollouts under way, every
    /// quarter second, never scans every job.
    deployed_jobs: BTreeSet<JobId>,
    /// Evaluation creation order; derived from `tables.evaluations`.
    eval_order: BTreeMap<u64, EvalId>,
    /// Creation order of the evaluations of each status; derived too, so trimming
    /// (completed ones first) and the planner's reads of pending and blocked ones
    /// never scan every evaluation.
    eval_status: BTreeMap<EvalStatus, BTreeSet<u64>>,
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

/// Whether a job deploys a model: a group with a `model-server` task.
fn serves_models(spec: &aigrid_api::JobSpec) -> bool {
    spec.groups
        .iter()
        .any(|group| matches!(group.task, aigrid_api::TaskSpec::ModelServer(_)))
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

    fn decode(data: &[u8]) -> Result<Command, String> {
        Command::from_entry(data).map_err(|e| e.to_string())
    }

    fn apply(&mut self, index: u64, command: Command) -> CommandOutput {
        self.applying = index;
        let change = self.change_of(&command);
        if let Some(change) = change.as_ref().filter(|c| self.is_guarded(c)) {
            // A guarded change arrives only inside an approved proposal.
            return Err(StateError::Guarded {
                circle: change.circle.clone(),
                kind: change.kind,
                target: change.target.clone(),
            });
        }
        let event = self.change_event(index, &command);
        let output = self.dispatch(index, command);
        if output.is_ok() {
            self.record_change(index, event, change);
        }
        debug_assert_eq!(self.check_invariants(), Ok(()));
        output
    }

    fn snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        encode_tables(&self.tables)
    }

    /// A copy of the tables, serialised by the job: copying 100,000 jobs takes a
    /// small part of what writing them as JSON does, so the replica stops for the
    /// copy alone.
    fn capture(&self) -> aigrid_consensus::state_machine::SnapshotJob {
        let tables = self.tables.clone();
        Box::new(move || encode_tables(&tables))
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

impl Tables {
    /// The job `id` to change: copied first if a snapshot being written shares it.
    fn job_mut(&mut self, id: &JobId) -> Option<&mut JobRecord> {
        self.jobs.get_mut(id).map(Arc::make_mut)
    }

    /// Names of the jobs with a `model-server` group: what `model_jobs` holds.
    fn model_job_names(&self) -> BTreeSet<String> {
        self.jobs
            .values()
            .filter(|job| serves_models(&job.spec))
            .map(|job| job.spec.name.clone())
            .collect()
    }

    /// Ids of the jobs with a deployment record: what `deployed_jobs` holds.
    fn deployed_job_ids(&self) -> BTreeSet<JobId> {
        self.jobs
            .values()
            .filter(|job| job.deployment.is_some())
            .map(|job| job.id.clone())
            .collect()
    }
}

/// The tables as JSON, streamed through an LZ4 frame: a state of a million
/// allocations never exists as one uncompressed buffer, and what the log keeps and
/// sends to lagging followers is several times smaller.
///
/// The JSON reaches the frame through a buffer of one LZ4 block: serde_json writes
/// a token at a time, and the frame encoder's cost per write made a snapshot of
/// 100,000 jobs (85 MB of JSON) take 0.74-0.98 s on a busy server; through the
/// buffer it takes 0.41-0.63 s.
fn encode_tables(tables: &Tables) -> Result<Vec<u8>, SnapshotError> {
    let error = |e: &dyn std::fmt::Display| SnapshotError(e.to_string());
    const BLOCK: usize = 64 << 10;
    let encoder = lz4_flex::frame::FrameEncoder::new(Vec::new());
    let mut writer = std::io::BufWriter::with_capacity(BLOCK, encoder);
    serde_json::to_writer(&mut writer, tables).map_err(|e| error(&e))?;
    let encoder = writer.into_inner().map_err(|e| error(&e.error()))?;
    encoder.finish().map_err(|e| error(&e))
}

impl ClusterState {
    /// Applies `command` as the replicated apply does, guard included, but records
    /// nothing in the audit log: the baseline the audit log's cost is measured
    /// against (`benchmarks/human_chain`). Never used by a server.
    #[cfg(feature = "testkit")]
    pub fn apply_without_audit(&mut self, index: u64, command: Command) -> CommandOutput {
        self.applying = index;
        if let Some(change) = self.guarded_change(&command) {
            return Err(StateError::Guarded {
                circle: change.circle,
                kind: change.kind,
                target: change.target,
            });
        }
        self.dispatch(index, command)
    }

    /// Applies one command, guarded or not: the direct path comes through
    /// `StateMachine::apply`, which refuses guarded changes first; an approved
    /// proposal's change comes through here from `chain`.
    fn dispatch(&mut self, index: u64, command: Command) -> CommandOutput {
        match command {
            Command::SubmitJob {
                job_id,
                eval_id,
                spec,
                at,
                by,
            } => self.submit_job(job_id, eval_id, spec, at, by.as_ref()),
            Command::DeleteJob {
                job_id,
                eval_id,
                at,
            } => self.delete_job(job_id, eval_id, at),
            Command::RegisterNode {
                node,
                join_token,
                address,
                at,
            } => self.register_node(index, node, join_token, address, at),
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
            Command::RegisterModel { registration, at } => self.register_model(registration, at),
            Command::SetModelLocations {
                digest,
                locations,
                expected_version,
                at,
            } => self
                .tables
                .models
                .set_locations(&digest, locations, expected_version, at),
            Command::RecordModelHealth { digest, health } => {
                self.tables.models.record_health(&digest, health)
            }
            Command::DeleteModel { digest, at: _ } => self.tables.models.delete(digest),
            Command::BootstrapAdmins { admins, at } => self.bootstrap_admins(admins, at),
            Command::PutIdentity {
                name,
                public_key,
                admin,
                at,
            } => self.put_identity(name, public_key, admin, at),
            Command::RemoveIdentity { id, at: _ } => self.remove_identity(id),
            Command::SetCircleMember {
                circle,
                identity,
                role,
                at: _,
            } => self.set_member(circle, identity, role),
            Command::CreateApiKey { info, secret_hash } => self.create_api_key(info, secret_hash),
            Command::RevokeApiKey { id, at: _ } => self.revoke_api_key(id),
            Command::InitCluster {
                cluster_id,
                audit_seed,
                at: _,
            } => self.init_cluster(cluster_id, audit_seed),
            Command::SetGovernance {
                circle,
                governance,
                create,
                by: _,
                at: _,
            } => self.set_governance(circle, governance, create),
            Command::Propose {
                id,
                command,
                by,
                at,
            } => self.propose(id, *command, by, at),
            Command::Decide {
                proposal,
                by,
                signed,
                at,
            } => self.decide(index, proposal, by, signed, at),
            Command::SettleProposals { at } => self.settle_proposals(index, at),
            Command::GrantMembership { change, .. } => Ok(self.grant_membership(change)),
            Command::UseMembershipGrant { id, .. } => Ok(self.use_membership_grant(id)),
            Command::JudgeAllocations {
                job_id,
                version,
                verdicts,
                eval_id,
                at,
            } => self.judge_allocations(&job_id, version, verdicts, eval_id, at),
            Command::SteerDeployment {
                job_id,
                version,
                action,
                eval_id,
                at,
                by: _,
            } => self.steer_deployment(&job_id, version, action, eval_id, at),
            Command::DeploymentDeadline {
                job_id,
                version,
                eval_id,
                at,
            } => self.deadline_passed(&job_id, version, eval_id, at),
            Command::CreateRollout {
                id,
                request,
                at,
                by: _,
            } => self.create_rollout(id, request, at),
            Command::ReportModels {
                node_id,
                models,
                at,
            } => self.report_models(&node_id, models, at),
            Command::RolloutTimeouts { id, at } => self.rollout_timeouts(&id, at),
            Command::Meter { at } => {
                let metered = self.meter(at);
                self.review_holds_and_plan(index, at);
                Ok(Applied::Metered(metered))
            }
            Command::Settle { at, grace_ms } => self.settle(index, at, grace_ms),
            Command::Deposit {
                circle,
                amount,
                memo,
                at,
                by: _,
            } => self.deposit(index, &circle, amount, memo, at),
            Command::Transfer {
                circle,
                to,
                amount,
                memo,
                at,
                by: _,
            } => self.transfer(index, &circle, to, amount, memo, at),
            Command::SetQuota {
                circle,
                quota,
                at,
                by: _,
            } => self.set_quota(&circle, quota, at),
            Command::ScaleGroup {
                job_id,
                group,
                from,
                to,
                reason,
                eval_id,
                at,
            } => self.scale_group(job_id, group, from, to, reason, eval_id, at),
        }
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
            jobs: Hashed::default(),
            allocations: BTreeMap::new(),
            evaluations: Hashed::default(),
            join_tokens: BTreeMap::new(),
            logs: BTreeMap::new(),
            node_index: BTreeMap::new(),
            models: models::Models::default(),
            access: access::Access::default(),
            chain: chain::Chain::default(),
            rollouts: BTreeMap::new(),
            metering: metering::Metering::default(),
            treasury: treasury::Treasury::default(),
            quotas: BTreeMap::new(),
        })
    }

    fn from_tables(tables: Tables) -> Self {
        let job_names = tables
            .jobs
            .values()
            .map(|job| (job.spec.name.clone(), job.id.clone()))
            .collect();
        let model_jobs = tables.model_job_names();
        let deployed_jobs = tables.deployed_job_ids();
        let eval_order = tables
            .evaluations
            .values()
            .map(|record| (record.seq, record.eval.id.clone()))
            .collect();
        let mut eval_status: BTreeMap<EvalStatus, BTreeSet<u64>> = BTreeMap::new();
        for record in tables.evaluations.values() {
            eval_status
                .entry(record.eval.status)
                .or_default()
                .insert(record.seq);
        }
        let index = AllocIndex::from_allocations(tables.allocations.values());
        Self {
            tables,
            job_names,
            model_jobs,
            deployed_jobs,
            eval_order,
            eval_status,
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
