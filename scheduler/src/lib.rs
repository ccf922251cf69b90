//! The aigrid control plane's core: the replicated cluster state and, around it, the
//! control API and the server that runs them.
//!
//! The core is pure: [`state`] (the replicated state machine) and [`planner`]
//! (placement, preemption, defragmentation) read no clock, do no I/O and use no
//! async runtime. Everything else is the edge that feeds them: HTTP, agents, the
//! scheduling loop, the gateway, metrics, and the [`clock`] they read time from.
//!
//! | module | owns |
//! |---|---|
//! | [`state`] | the cluster state machine, one module per area (`jobs`, `nodes`, `allocations`, `plans`, `evaluations`, `tokens`, [`state::models`], `invariants`) under one dispatch ([`state::ClusterState`]'s `apply` over [`state::Command`]); changed only by Raft-committed commands; emits [`state::StateEvent`]s to an [`state::EventSink`] the edge supplies |
//! | [`planner`] | the pure planner: a cluster snapshot and a job's unplaced instances in, placements (nodes, GPUs) and explanations out; [`planner::preempt`] and [`planner::defrag`] make room for what does not fit |
//! | [`clock`] | the one [`clock::Clock`] the edge reads time from ([`clock::SystemClock`], [`clock::ManualClock`] for tests) |
//! | [`console`] | the web console at `/ui`: its page and scripts, built into the binary, signing in the browser what the CLI signs |
//! | [`http`] | the control API under `/api/v1`, `/metrics`, `/health`, `/ready`, and its OpenAPI document: one module per area (`jobs`, `nodes`, `agents`, `tokens`, `cluster`, `models`, `ops`), each a `utoipa-axum` router whose routes carry their documentation, over [`http::plumbing`] (state, errors, extractors, `propose`, `read`), which imports no area |
//! | [`hub`] | what a server holds for its agents beside the replicated state: [`hub::NodeWatch`] (wakes long polls on the state's events), the batch of plain heartbeats, their readings, long-poll slots |
//! | [`gateway`] | the OpenAI-compatible `/v1` inference gateway: resolves a request's model ([`gateway::table`]), picks a ready replica with the fewest requests outstanding and streams its answer back ([`gateway::balancer`]); its routes are documented in the same OpenAPI document |
//! | [`metrics`] | Prometheus gauges of the state and counters of the scheduling loop |
//! | [`worker`] | the leader's scheduling loop: plans pending evaluations and commits the placements |
//! | [`autoscaler`] | the leader's autoscaler: each scaled group's load from its replicas' reports and the gateway's held requests, its windows' decisions committed with their reasons, a scale beyond the circle's limit proposed to its quorum |
//! | [`rollouts`] | the leader's rollout watcher: judges the instances of rollouts under way (runs, readiness, the gateway's measurements of canaries) and reports passed deadlines |
//! | [`listener`] | the accept loop in front of the HTTP surface: connection limits (in total and per client), header, body, idle and TLS handshake timeouts, optional TLS, graceful shutdown |
//! | [`server`] | one control-plane server: replica, listeners, lifecycle |
//! | [`server_config`] | what a server is started with, checked, and why it may fail to start |
//! | [`certs`] | its certificate from the cluster CA (or the CA a one-server cluster makes), and when the control API is served over HTTPS |
//! | `testkit` | fixtures for tests (feature `testkit`, never in a release build): small real inputs (signed model registrations) |
//!
//! ## Following a job submission
//!
//! 1. **Validated** at the edge: `POST /api/v1/jobs` is `submit_job` in [`http::jobs`],
//!    which decodes the body and runs [`aigrid_api::JobSpec::validate`] before it
//!    proposes [`state::Command::SubmitJob`] with an id, an evaluation id and a
//!    timestamp from the [`clock`].
//! 2. **Applied** once Raft commits it: [`state::ClusterState`]'s
//!    `StateMachine::apply` (in `state/mod.rs`) dispatches to `submit_job` in
//!    `state/jobs.rs`, which validates the spec again, creates or updates the job
//!    by name (idempotent by evaluation id) and queues an evaluation
//!    (`insert_eval` in `state/evaluations.rs`).
//! 3. **Planned** by the leader's loop, [`worker::run`]: [`worker::collect`] gathers
//!    the due evaluations and a [`planner::PlanSnapshot`]; `plan_job` calls
//!    [`planner::plan`] (then [`planner::preempt::plan_preemption`] and
//!    [`planner::defrag::plan_defrag`] for what did not fit), and the result is
//!    proposed as [`state::Command::ApplyPlan`].
//! 4. **Committed** by `apply_plan` in `state/plans.rs`, which re-checks every
//!    placement against the current state (`check_allocations`) before writing it;
//!    the agents' long polls wake through [`hub::NodeWatch`].
//!
//! [`state::ClusterState::check_invariants`] (`state/invariants.rs`) states the
//! rules every reachable state obeys; unit tests, the property tests and the
//! simulation all run it.

pub mod autoscaler;
pub mod certs;
pub mod clock;
pub mod console;
pub mod gateway;
pub mod http;
pub mod hub;
pub mod listener;
pub mod metrics;
pub mod planner;
pub mod rollouts;
pub mod server;
pub mod server_config;
pub mod state;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod worker;

/// `N` bytes from the thread's generator (ChaCha, seeded from the operating system
/// and reseeded by it), for secrets and ids: no system call of their own.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::fill(&mut out[..]);
    out
}

/// A fresh version-4 UUID for a new record's id, from [`random_bytes`]: where
/// `Uuid::new_v4` asks the kernel for every id, and a job submission takes two.
pub(crate) fn new_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(random_bytes()).into_uuid()
}

/// A new record's id: a [`new_uuid`], hyphenated, made into the id type by `make`.
pub(crate) fn new_id<T>(make: impl Fn(String) -> T) -> T {
    make(new_uuid().to_string())
}
