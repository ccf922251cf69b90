//! What changes the state: the [`Command`]s carried in Raft log entries, and what
//! applying one answers ([`Applied`]).

use aigrid_api::manifest::{Locations, Registration};
use aigrid_api::{
    Allocation, AllocationReport, DeleteJobResponse, DrainSpec, EvalId, EvalStatus, GpuHealth,
    JobId, JobSpec, JoinTokenInfo, LogTail, ModelSummary, NodeId, NodeRegistration, NodeStatus,
    SubmitJobResponse, Timestamp, Unplaced,
};
use aigrid_api::{
    ApiKeyInfo, CircleGovernance, CircleInfo, Governance, IdentityId, IdentityInfo, ProposalInfo,
    PublicKey, Role, SignedDecision,
};
use serde::{Deserialize, Serialize};

use super::{EvaluationUpdate, JobPlan, StateError, TokenUse};

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
        /// The submitted spec; validated again here. An env value of
        /// `aigrid_api::access::REDACTED` keeps the live job's value of that name.
        spec: JobSpec,
        /// When it was submitted.
        at: Timestamp,
        /// The identity submitting it. Updating a live job of the same name needs
        /// this identity to be an operator of the live job's circle, checked here
        /// against the state the update applies to. None for the cluster's own
        /// submissions.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<IdentityId>,
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
        /// Where the servers reach the node's workloads: the source address of the
        /// registering connection, as the server that took it saw it, never a
        /// value the agent wrote. Absent, a known node keeps the one it has.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<std::net::IpAddr>,
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
    /// Records what the last scrub of a model's shards found and what its repair
    /// did (the repair loop's report); an older report than the one kept changes
    /// nothing.
    RecordModelHealth {
        /// The model.
        digest: String,
        /// The scrub's counts.
        health: aigrid_api::ShardHealth,
    },
    /// Forgets a model; its shards are left where they are.
    DeleteModel {
        /// The model.
        digest: String,
        /// When it was deleted.
        at: Timestamp,
    },
    /// Makes the identities a server was started with (`--admin`) the cluster's
    /// admins, if it has none yet; otherwise changes nothing.
    BootstrapAdmins {
        /// Names and public keys.
        admins: Vec<(String, PublicKey)>,
        /// When it was proposed.
        at: Timestamp,
    },
    /// Adds an identity or changes its name or admin flag. The last admin cannot
    /// be demoted.
    PutIdentity {
        /// A name for listings.
        name: String,
        /// Its public key; its id follows from it.
        public_key: PublicKey,
        /// Whether it is an admin.
        admin: bool,
        /// When it was added.
        at: Timestamp,
    },
    /// Forgets an identity and its circle roles. The last admin cannot be removed.
    RemoveIdentity {
        /// The identity.
        id: IdentityId,
        /// When it was removed.
        at: Timestamp,
    },
    /// Gives a known identity a role in a circle, or takes it away (`role` absent).
    SetCircleMember {
        /// The circle.
        circle: String,
        /// The member.
        identity: IdentityId,
        /// Its role; absent to remove it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<Role>,
        /// When it was changed.
        at: Timestamp,
    },
    /// Creates a circle's API key. Only the secret's hash is replicated.
    CreateApiKey {
        /// The key as listings show it.
        info: ApiKeyInfo,
        /// BLAKE3 of its secret, hex.
        secret_hash: String,
    },
    /// Revokes an API key.
    RevokeApiKey {
        /// The key's public id.
        id: String,
        /// When it was revoked.
        at: Timestamp,
    },
    /// Names the cluster (its id goes into every approval digest) and seeds its
    /// audit key, once: ignored when the cluster has an id.
    InitCluster {
        /// A random id.
        cluster_id: String,
        /// 32 random bytes, hex: the audit key's seed.
        audit_seed: String,
        /// When it was proposed.
        at: Timestamp,
    },
    /// Creates a governed circle (`create`), or replaces a governed circle's members
    /// and policy: directly where its policy does not guard the change, else as a
    /// proposal's change.
    SetGovernance {
        /// The circle.
        circle: String,
        /// Its members and policy, whole.
        governance: Governance,
        /// True to create the circle (refused if it is governed already).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        create: bool,
        /// Who asked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<IdentityId>,
        /// When.
        at: Timestamp,
    },
    /// Makes a proposal of a guarded change: `command`, applied once the circle's
    /// quorum approves. Everything the proposal is judged by is taken from the state
    /// as this applies.
    Propose {
        /// The proposal's id.
        id: String,
        /// The change.
        command: Box<Command>,
        /// The proposer.
        by: IdentityId,
        /// When.
        at: Timestamp,
    },
    /// A member's signed decision on a proposal, checked again as it applies.
    Decide {
        /// The proposal.
        proposal: String,
        /// The member (the request's signer; the decision must be signed by it too).
        by: IdentityId,
        /// The decision and its signature.
        signed: SignedDecision,
        /// When.
        at: Timestamp,
    },
    /// Expires proposals past their window and applies approved ones whose minimum
    /// window has passed; the leader proposes it when something is due.
    SettleProposals {
        /// The leader's time.
        at: Timestamp,
    },
    /// Allows one change of the control plane's servers (a Raft membership change,
    /// which is not a command): the edge makes the change only once its grant has
    /// applied, directly or, where the root circle guards `cluster.membership`,
    /// through an approved proposal; the grant is then used up.
    GrantMembership {
        /// The change allowed.
        change: ServerChange,
        /// Who asked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<IdentityId>,
        /// When.
        at: Timestamp,
    },
    /// Uses up the grant for server `id` once its change is made.
    UseMembershipGrant {
        /// The server.
        id: u64,
        /// When.
        at: Timestamp,
    },
    /// The leader's verdicts on instances of a rollout: healthy (ran, and
    /// answered ready, for the policy's minimum time) or not. What they imply is
    /// settled as it applies: the rollout waits for promotion, goes on, succeeds,
    /// or fails and reverts.
    JudgeAllocations {
        /// The job.
        job_id: JobId,
        /// The version rolling out; verdicts on another version's instances are
        /// ignored.
        version: u64,
        /// The verdicts.
        verdicts: Vec<super::Verdict>,
        /// Id of the evaluation that lets the planner act on the change.
        eval_id: EvalId,
        /// When they were reached.
        at: Timestamp,
    },
    /// A person steers a rollout: pause, resume, promote (a guarded change when
    /// the job's circle says so) or abort.
    SteerDeployment {
        /// The job.
        job_id: JobId,
        /// The version rolling out, as the person saw it: refused if another one
        /// has taken its place.
        version: u64,
        /// What to do.
        action: aigrid_api::DeploymentAction,
        /// Id of the evaluation that lets the planner act on the change.
        eval_id: EvalId,
        /// When it was asked for.
        at: Timestamp,
        /// Who asked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<IdentityId>,
    },
    /// Starts a fleet rollout of a registered model (a guarded change,
    /// `rollout.promote`, in the model's circle when its policy says so).
    CreateRollout {
        /// Its id; a replay with the same id answers the rollout made.
        id: String,
        /// The model, the nodes' attributes, the waves and thresholds.
        request: aigrid_api::CreateRollout,
        /// When it was asked for.
        at: Timestamp,
        /// Who asked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<IdentityId>,
    },
    /// What a node's agent says of the models fleet rollouts asked it to stage:
    /// active, with its attestation, or failed.
    ReportModels {
        /// The node; it reports only for itself.
        node_id: NodeId,
        /// The reports.
        models: Vec<aigrid_api::ModelReport>,
        /// When they arrived.
        at: Timestamp,
    },
    /// The leader's report that nodes of a fleet rollout are past their timeout;
    /// those still staging at `at` time out.
    RolloutTimeouts {
        /// The rollout.
        id: String,
        /// When the leader saw it.
        at: Timestamp,
    },
    /// The leader's meter: what running allocations held since the last one is
    /// counted ([`super::metering`]).
    Meter {
        /// When the leader metered.
        at: Timestamp,
    },
    /// The leader's settlement: what circles' allocations accrued at their nodes'
    /// prices moves to the farmers, and the running work of circles spent for
    /// longer than `grace_ms` is stopped ([`super::treasury`]).
    Settle {
        /// When the leader settled.
        at: Timestamp,
        /// How long a spent circle's running work keeps running: the settling
        /// server's setting.
        grace_ms: u64,
    },
    /// An admin records credits coming in for a circle, opening its treasury.
    Deposit {
        /// The circle.
        circle: String,
        /// How much.
        amount: aigrid_api::Credits,
        /// The ledger's note.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        memo: String,
        /// Who recorded it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<IdentityId>,
        /// When.
        at: Timestamp,
    },
    /// Moves credits out of a circle: always a guarded change (`treasury.transfer`).
    Transfer {
        /// The circle paying.
        circle: String,
        /// The account credited.
        to: String,
        /// How much.
        amount: aigrid_api::Credits,
        /// The ledger's note.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        memo: String,
        /// Who asked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<IdentityId>,
        /// When.
        at: Timestamp,
    },
    /// An admin sets a circle's quota, or removes it (`quota` absent).
    SetQuota {
        /// The circle.
        circle: String,
        /// What it is guaranteed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quota: Option<aigrid_api::Quota>,
        /// Who set it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<IdentityId>,
        /// When.
        at: Timestamp,
    },
    /// Sets a scaled group's count and records why: the leader's autoscaler, a
    /// server's gateway waking a group at zero, or an approved proposal. Not a new
    /// version of the job.
    ScaleGroup {
        /// The job.
        job_id: JobId,
        /// The group, which has a `scaling` block.
        group: String,
        /// Applies only while the count is this (a decision made on what has
        /// since changed is dropped); absent, applies whatever the count.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<u32>,
        /// The new count, within the group's `min..=max`.
        to: u32,
        /// Why, in words.
        reason: String,
        /// Id of the evaluation that adds or stops the instances.
        eval_id: EvalId,
        /// When.
        at: Timestamp,
    },
    /// The leader's report that a rollout's progress deadline passed; it fails
    /// (and reverts, when its policy says so) if the deadline the state holds has
    /// indeed passed at `at`.
    DeploymentDeadline {
        /// The job.
        job_id: JobId,
        /// The version rolling out.
        version: u64,
        /// Id of the evaluation that lets the planner act on the change.
        eval_id: EvalId,
        /// When the leader saw it pass.
        at: Timestamp,
    },
}

/// A change of the control plane's servers that [`Command::GrantMembership`] allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerChange {
    /// Add server `id`, whose peer listener is at `addr`.
    Add {
        /// Its id.
        id: u64,
        /// Its peer listener's address.
        addr: String,
    },
    /// Remove server `id`.
    Remove {
        /// Its id.
        id: u64,
    },
}

impl ServerChange {
    /// The server it changes.
    pub fn id(&self) -> u64 {
        match self {
            ServerChange::Add { id, .. } | ServerChange::Remove { id } => *id,
        }
    }
}

impl Command {
    /// Reads the command a log entry carries. `serde` reads a tagged enum by first
    /// copying the whole object into a buffer of its own; a job submission and a
    /// plan, the commands written most (a plan carries a verdict per job planned),
    /// are read straight into their fields instead when they start with their tag,
    /// as `serde_json` writes it, and hold their fields and nothing else, each once.
    /// Anything else, and anything that reading refuses, takes the general reading:
    /// what the strict one accepts, the general one accepts with the same value, so
    /// every release and every replica reads an entry alike.
    pub fn from_entry(data: &[u8]) -> serde_json::Result<Command> {
        /// An entry's fields read straight into `T` when it starts with `tag`; `None`
        /// when it does not, or when that reading refuses it.
        fn strictly<T: serde::de::DeserializeOwned>(data: &[u8], tag: &[u8]) -> Option<T> {
            data.starts_with(tag)
                .then(|| serde_json::from_slice(data).ok())
                .flatten()
        }
        /// `Command::SubmitJob`'s fields and its tag, already checked.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct SubmitJob {
            #[serde(rename = "type")]
            _tag: serde::de::IgnoredAny,
            job_id: JobId,
            eval_id: EvalId,
            spec: JobSpec,
            at: Timestamp,
            #[serde(default)]
            by: Option<IdentityId>,
        }
        /// `Command::ApplyPlan`'s fields and its tag, already checked.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ApplyPlan {
            #[serde(rename = "type")]
            _tag: serde::de::IgnoredAny,
            jobs: Vec<JobPlan>,
            at: Timestamp,
        }
        if let Some(SubmitJob {
            _tag,
            job_id,
            eval_id,
            spec,
            at,
            by,
        }) = strictly(data, br#"{"type":"submit_job","#)
        {
            return Ok(Command::SubmitJob {
                job_id,
                eval_id,
                spec,
                at,
                by,
            });
        }
        if let Some(ApplyPlan { _tag, jobs, at }) = strictly(data, br#"{"type":"apply_plan","#) {
            return Ok(Command::ApplyPlan { jobs, at });
        }
        serde_json::from_slice(data)
    }
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
        /// Of those, other jobs' allocations stopped to make room (preempted).
        preempted: usize,
        /// Other jobs' allocations moved to make room (migrated).
        migrated: usize,
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
    /// A model's shard health was recorded; the model as it is now.
    ModelHealthRecorded(ModelSummary),
    /// A model was forgotten.
    ModelDeleted {
        /// Its digest.
        digest: String,
    },
    /// The bootstrap admins were added (none when the cluster had an admin).
    AdminsBootstrapped {
        /// How many.
        added: usize,
    },
    /// An identity was added or changed.
    IdentityPut(IdentityInfo),
    /// An identity was removed.
    IdentityRemoved {
        /// Its id.
        id: IdentityId,
    },
    /// A circle's members changed; the circle as it is now.
    CircleChanged(CircleInfo),
    /// An API key was created.
    ApiKeyCreated(ApiKeyInfo),
    /// An API key was revoked.
    ApiKeyRevoked(ApiKeyInfo),
    /// The cluster has this id (set now or before).
    ClusterInitialized {
        /// The id.
        cluster_id: String,
    },
    /// A governed circle as it is now.
    CircleGoverned(CircleGovernance),
    /// A proposal was made (or a replay found it made).
    Proposed(ProposalInfo),
    /// A decision was recorded; the proposal as it is now (applied, if this
    /// decision completed its quorum).
    Decided(ProposalInfo),
    /// Proposals were settled.
    ProposalsSettled {
        /// How many applied.
        applied: usize,
        /// How many expired.
        expired: usize,
    },
    /// A server change is allowed.
    MembershipGranted(ServerChange),
    /// A grant was used up (`false` when there was none).
    MembershipGrantUsed(bool),
    /// A rollout moved (or was judged); the job's latest rollout as it is now.
    DeploymentChanged(Option<aigrid_api::Deployment>),
    /// A fleet rollout as it is now.
    RolloutChanged(aigrid_api::FleetRollout),
    /// Fleet rollouts moved by a node's model reports.
    RolloutsMoved {
        /// How many reports changed a node's stage.
        count: usize,
    },
    /// Use was metered.
    Metered(super::metering::Metered),
    /// Use was settled.
    Settled(super::treasury::Settled),
    /// A deposit or transfer moved credits of a circle's treasury.
    TreasuryChanged {
        /// The circle.
        circle: String,
    },
    /// A scaled group's count, and whether this command changed it.
    Scaled {
        /// The count now.
        count: u32,
        /// False when the count was already that, or no longer the one the
        /// decision was made on.
        changed: bool,
    },
    /// A circle's quota was set or removed.
    QuotaSet {
        /// The circle.
        circle: String,
    },
}
