//! Wire types shared by every aigrid role. Nothing here does I/O: the types are what
//! crosses a process boundary (HTTP bodies, Raft log entries, CLI files), so every role
//! agrees on one shape and one set of validation rules.
//!
//! | module | owns |
//! |---|---|
//! | [`ids`] | identifier newtypes (`JobId`, `NodeId`, `AllocId`, `EvalId`) |
//! | [`units`] | quantity and time newtypes (`MilliCpu`, `MemoryMib`, `DiskMib`, `Timestamp`) |
//! | [`spec`] | the job specification users submit, and its validation |
//! | [`job`] | the job views the control API answers with |
//! | [`access`] | identities, circle roles and API keys as the control API shows them |
//! | [`chain`] | the Human Chain: governed circles, proposals, signed decisions, audit entries, checkpoints and proofs |
//! | [`allocation`] | an instance of a task group bound to a node |
//! | [`evaluation`] | a request to the planner to reconcile one job |
//! | [`node`] | node registration and the node view |
//! | [`auth`] | node keys and join tokens (with the cluster CA's fingerprint) |
//! | `ed25519` | signing with an ed25519 seed (verification is `ed25519-dalek`'s strict check) |
//! | [`identity`] | people's identities: ed25519 or hybrid ed25519 + ML-DSA-65 keys, tagged in every encoding |
//! | [`signature`] | the one request-signature scheme (RFC 9421 style) for people and nodes |
//! | [`ca`] | the cluster CA's fingerprint, as join tokens carry it |
//! | [`cluster`] | control-plane membership and Raft status |
//! | [`deployment`] | a service version's rollout and what people may ask of it |
//! | [`model`] | registered models as listed, and the dispersed store a server offers |
//! | [`manifest`] | a model's signed manifest and shard locations: canonical encoding, digest, signature check |
//! | [`rollout`] | fleet rollouts: a model sent to nodes chosen by attributes, in waves, staged and attested |
//! | [`placement`] | placement policies: which storage backends may hold a stripe's shards |
//! | [`digest`] | content digests as types (`ModelDigest`, `ChunkDigest`) |
//! | [`openai`] | OpenAI's `/v1` wire types and error envelope, for the model servers and the gateway |
//! | [`quota`] | circles' quotas, what they hold and borrow, and their dominant share |
//! | [`treasury`] | circles' balances in credits, nodes' prices, the ledger, deposits and transfers |
//! | [`usage`] | metered use (GPU-seconds by model, CPU-seconds, memory) per circle, job and node |
//! | [`error`] | the error body, the stable error codes and validation errors |
//!
//! Every type is re-exported at the crate root, except the manifest's parts and the
//! placement rules (`placement::Constraint` and `placement::Spread` share their names
//! with the job spec's), which are reached through their modules.

#[macro_use]
mod macros;

pub mod access;
pub mod allocation;
pub mod auth;
pub mod ca;
pub mod chain;
pub mod cluster;
pub mod deployment;
pub mod digest;
mod ed25519;
pub mod error;
pub mod evaluation;
pub mod identity;
pub mod ids;
pub mod index;
pub mod job;
pub mod manifest;
pub mod model;
pub mod node;
pub mod openai;
pub mod placement;
pub mod quota;
pub mod rollout;
pub mod signature;
pub mod spec;
pub mod treasury;
pub mod units;
pub mod usage;

pub use access::{
    AddIdentity, ApiKey, ApiKeyInfo, CircleInfo, CircleMember, CircleRole, CreateApiKey,
    CreatedApiKey, IdentityInfo, Role, SetMember, WhoAmI,
};
pub use allocation::{
    AllocState, Allocation, AllocationLogs, AllocationReport, Assignment, DesiredState,
    LimitsEnforcement, LogTail, NodeAssignments,
};
pub use auth::{
    AuthError, CreateJoinToken, CreatedJoinToken, JoinToken, JoinTokenInfo, NodeKey, NodePublicKey,
};
pub use ca::CaFingerprint;
pub use chain::{
    AuditCheckpoint, AuditEntry, AuditProof, ChangeKind, CircleGovernance, CirclePolicy,
    CreateCircle, Decision, DecisionRecord, Governance, PolicyMember, ProposalCreated,
    ProposalInfo, ProposalState, SignedDecision, Signer,
};
pub use cluster::{
    ClusterStatus, Health, JoinRequest, LeaveRequest, Member, MemberRole, Readiness,
};
pub use deployment::{
    Deployment, DeploymentAction, DeploymentGroup, DeploymentState, SteerDeployment,
};
pub use digest::{ChunkDigest, ModelDigest};
pub use error::{ErrorBody, ErrorCode, ErrorDetail, ParseEnumError, ValidationError};
pub use evaluation::{EvalStatus, EvalTrigger, Evaluation};
pub use identity::{
    verify_all, IdentityId, IdentityKey, KeyAlgorithm, KeyFile, PublicKey, SignatureCheck,
};
pub use ids::{AllocId, EvalId, JobId, NodeId};
pub use index::{ApiArea, ApiIndex};
pub use job::{
    DeleteJobResponse, Job, JobStatus, JobSummary, JobVersion, RevertJob, SubmitJobResponse,
    Unplaced,
};
pub use manifest::{Locations, Manifest, ManifestError, Registration, SignedManifest};
pub use model::{ModelSummary, ReplicaLoadReport, ShardHealth, StorageBackend, StorageInfo};
pub use node::{
    DrainSpec, GpuDevice, GpuHealth, GpuTelemetry, Heartbeat, HeartbeatResponse, Node,
    NodeProtections, NodeRegistration, NodeResources, NodeStatus, NodeTelemetry, NodeUsage,
    PortRange, RegisterNodeResponse,
};
pub use quota::{CircleUsage, Held, Quota};
pub use rollout::{
    AbortAfter, CreateRollout, FleetRollout, ModelAssignment, ModelPeer, ModelReport, NodeStage,
    NodeStageState, OriginShare, RolloutState, Wave, Waves,
};
pub use signature::{KeyRef, NodeSigner, ParsedSignature, RequestSigner, SignedHeaders};
pub use spec::{
    Affinity, Artifact, CanaryChecks, Constraint, ConstraintOp, ConstraintValue, EnvVars, ExecTask,
    GpuRequest, JobKind, JobSpec, ModelServerTask, Ratio, Resources, RestartMode, RestartPolicy,
    ScaleEvent, Scaling, SizeError, Span, Spread, TaskGroup, TaskSpec, UpdatePolicy,
};
pub use treasury::{
    Accounts, Credits, Deposit, EntryKind, LedgerEntry, LedgerPage, NodeOffer, Prices, Transfer,
    TreasuryView,
};
pub use units::{DiskMib, MemoryMib, MilliCpu, Timestamp};
pub use usage::{UsageAmounts, UsageLine, UsageQuery, UsageReport};

#[cfg(test)]
mod tests {
    use utoipa::OpenApi;

    use super::*;

    #[derive(OpenApi)]
    #[openapi(components(schemas(
        JobSpec,
        Job,
        JobSummary,
        SubmitJobResponse,
        DeleteJobResponse,
        Evaluation,
        Node,
        NodeRegistration,
        AllocationReport,
        ClusterStatus,
        JoinRequest,
        LeaveRequest,
        ModelSummary,
        StorageInfo,
        ErrorBody,
        ValidationError,
        Registration,
        ModelDigest,
        ChunkDigest,
        DeploymentAction,
        FleetRollout,
    )))]
    struct Doc;

    #[test]
    fn every_wire_type_has_an_openapi_schema() {
        let doc = Doc::openapi();
        let json = doc.to_json().unwrap();
        let schemas = &doc.components.as_ref().unwrap().schemas;
        for name in [
            "JobSpec",
            "TaskGroup",
            "TaskSpec",
            "ExecTask",
            "ModelServerTask",
            "ConstraintOp",
            "ConstraintValue",
            "Affinity",
            "GpuRequest",
            "Allocation",
            "AllocState",
            "NodeStatus",
            "GpuDevice",
            "MemberRole",
            "ErrorDetail",
            "Timestamp",
            "MilliCpu",
            "StorageBackend",
            "ChunkDigest",
        ] {
            assert!(schemas.contains_key(name), "missing schema {name}");
        }
        assert!(json.contains("model-server"));
        assert!(json.contains("not_in"));
    }

    /// The words a schema lists in its `enum`, as JSON values.
    fn schema_words(schema: &utoipa::openapi::RefOr<utoipa::openapi::Schema>) -> Vec<Value> {
        let json = serde_json::to_value(schema).unwrap();
        json["enum"].as_array().cloned().unwrap_or_default()
    }

    /// Per closed enum: its name, each variant as serde writes it, and the words its
    /// schema documents.
    macro_rules! enum_words {
        ($($t:ty $(= $all:expr)?),+ $(,)?) => {
            vec![$((
                stringify!($t).rsplit("::").next().unwrap(),
                enum_words!(@all $t $(= $all)?)
                    .iter()
                    .map(|v| serde_json::to_value(v).unwrap())
                    .collect::<Vec<Value>>(),
                schema_words(&<$t as utoipa::PartialSchema>::schema()),
            )),+]
        };
        (@all $t:ty = $all:expr) => { $all };
        (@all $t:ty) => { <$t>::ALL };
    }

    use serde_json::Value;

    #[test]
    fn task_drivers_are_documented_as_serde_writes_them() {
        let exec: TaskSpec =
            serde_json::from_value(serde_json::json!({"driver": "exec", "command": "x"})).unwrap();
        let model: TaskSpec =
            serde_json::from_value(serde_json::json!({"driver": "model-server", "model": "m"}))
                .unwrap();
        let schema = serde_json::to_value(<TaskSpec as utoipa::PartialSchema>::schema()).unwrap();
        let variants = schema["oneOf"].as_array().unwrap();
        assert_eq!(variants.len(), 2);
        for (task, variant) in [exec, model].iter().zip(variants) {
            let written = serde_json::to_value(task).unwrap();
            assert_eq!(
                variant["properties"]["driver"]["enum"][0],
                written["driver"]
            );
            // Every field serde writes is a documented property of its variant.
            for field in written.as_object().unwrap().keys() {
                assert!(
                    variant["properties"].get(field).is_some(),
                    "{field}: {variant}"
                );
            }
        }
    }

    #[test]
    fn every_enum_schema_lists_exactly_the_words_serde_writes() {
        let enums = enum_words!(
            AllocState,
            DesiredState,
            LimitsEnforcement,
            MemberRole,
            EvalTrigger,
            EvalStatus,
            JobStatus,
            NodeStatus,
            JobKind,
            ConstraintOp,
            RestartMode,
            DeploymentState,
            DeploymentAction,
            RolloutState,
            NodeStageState,
            placement::Op = [placement::Op::In, placement::Op::NotIn],
        );
        for (name, serde, schema) in &enums {
            assert_eq!(schema, serde, "{name}: the schema's words are not serde's");
            for word in serde {
                let text = word.as_str().unwrap();
                assert!(
                    !text.chars().any(char::is_uppercase),
                    "{name}: `{text}` is not a lowercase wire word"
                );
            }
        }
        // Every enum the document holds is one of the above, so a new one cannot
        // slip past this check.
        let doc = serde_json::to_value(Doc::openapi()).unwrap();
        for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
            if schema.get("enum").is_some() {
                assert!(
                    enums.iter().any(|(checked, ..)| checked == name),
                    "{name} is an enum schema this test does not check"
                );
            }
        }
    }
}
