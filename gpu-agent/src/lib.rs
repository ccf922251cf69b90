//! The node agent (`aigrid agent`): GPU and host discovery, the outbound-only pull
//! loop, workload drivers, the model cache and the shard service.
//!
//! - [`discovery`]: what the machine offers (host, NVML or simulated GPUs) and how
//!   its GPUs are doing, read once for registration and again every heartbeat.
//! - [`simulated`]: GPU inventories from a `--simulate-gpus` specification, so every
//!   GPU path can be exercised on machines without GPUs.
//! - [`runner`]: the allocation runner: applies assignments, restart policy, stops,
//!   reattach after an agent restart, reports and log tails.
//! - [`config`]: what the runner and its drivers are given (data dir, how to
//!   start supervisors and model servers, log limits).
//! - [`driver`]: how one run of a task happens (`exec` under a supervisor, or
//!   recorded in memory for simulated fleets).
//! - [`model_server`]: how a `model-server` task runs: an `exec` task of this
//!   binary's `serve` role on the port the control plane assigned it, at the
//!   node's recorded address.
//! - [`sandbox`]: what keeps workloads from the node's credentials and each
//!   other: a uid per allocation, Landlock, secrets as files.
//! - [`supervisor`]: the detached per-allocation process (`aigrid supervise`) and
//!   the allocation-directory files it shares with the agent.
//! - [`logs`]: size-rotated workload logs and their tails.
//! - [`cgroup`]: cgroup v2 CPU and memory limits, probed once per node.
//! - [`artifact`]: BLAKE3-verified, content-addressed task artifacts.
//! - [`identity`]: the node id and ed25519 key kept in the data dir.
//! - [`client`]: signed requests to the servers, moving on when one fails.
//! - [`agent`]: the outbound-only pull loop: register, heartbeat, long-poll.
//! - [`staging`]: models staged for fleet rollouts, through a
//!   [`staging::ModelStager`], and their attestations signed with the node key.
//! - [`fleet`]: many agents in one process, for tests and benchmarks at scale.
//! - [`metrics`]: the agent's Prometheus metrics.
//! - `testkit` (feature `testkit`, never in a release build): fixtures for tests: allocations, assignments and a driver whose
//!   runs exit as scripted.

pub mod discovery;
pub mod simulated;

pub mod artifact;
pub mod cgroup;
pub mod config;
pub mod driver;
pub mod logs;
pub mod model_server;
pub mod runner;
pub mod sandbox;
pub mod staging;
pub mod supervisor;

pub mod agent;
pub mod client;
pub mod fleet;
pub mod identity;
pub mod metrics;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
