//! The aigrid control plane's core: the replicated cluster state and, around it, the
//! control API and the server that runs them.
//!
//! | module | owns |
//! |---|---|
//! | [`state`] | the cluster state machine: nodes, jobs, allocations, evaluations and models, changed only by Raft-committed [`state::Command`]s |
//! | [`planner`] | the pure planner: a cluster snapshot and a job's unplaced instances in, placements (nodes, GPUs) and explanations out |
//! | [`preempt`] | pure preemption: room for instances that fit nowhere, made by evicting the least disruptive set of clearly lower-priority allocations |
//! | [`defrag`] | pure defragmentation: room for instances that fit nowhere because free GPUs are scattered, made by migrating the fewest movable allocations |
//! | [`models`] | the model registry: signed manifests of dispersed-store models by digest, their shard locations, and their control API routes |
//! | [`agents`] | the agent-facing API: signed requests, join tokens, heartbeats kept off the log when they change nothing, long polls for assignments, log tails |
//! | [`http`] | the control API under `/api/v1`, `/metrics`, `/health`, `/ready`, and its OpenAPI document |
//! | [`gateway`] | the OpenAI-compatible `/v1` inference gateway: resolves a request's model, picks a ready replica with the fewest requests outstanding and streams its answer back |
//! | [`metrics`] | Prometheus gauges of the state and counters of the scheduling loop |
//! | [`worker`] | the leader's scheduling loop: plans pending evaluations and commits the placements |
//! | [`server`] | one control-plane server: configuration, replica, listener, lifecycle |
//! | [`testkit`] | fixtures for tests: small real inputs (signed model registrations) |

pub mod agents;
pub mod clock;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod models;
pub mod planner;
pub mod server;
pub mod state;
pub mod testkit;
pub mod worker;
