//! The aigrid control plane's core: the replicated cluster state and, around it, the
//! control API and the server that runs them.
//!
//! | module | owns |
//! |---|---|
//! | [`state`] | the cluster state machine: nodes, jobs, allocations and evaluations, changed only by Raft-committed [`state::Command`]s |
//! | [`planner`] | the pure planner: a cluster snapshot and a job's unplaced instances in, placements (nodes, GPUs) and explanations out |
//! | [`http`] | the control API under `/api/v1`, `/metrics`, `/health`, `/ready`, and its OpenAPI document |
//! | [`worker`] | the leader's scheduling loop: plans pending evaluations and commits the placements |
//! | [`server`] | one control-plane server: configuration, replica, listener, lifecycle |

pub mod http;
pub mod planner;
pub mod server;
pub mod state;
pub mod worker;
