//! The scheduler's integration tests, one module per area, in one test binary (one
//! link of the dependency graph, the areas' tests run side by side): HTTP
//! servers on loopback ports, and seeded simulations of the state machine and the
//! scheduling pass. Run one area with `cargo test -p aigrid-scheduler --test suite
//! <module>::`.

mod common;
mod sim;

mod autoscale;
mod chain_edge;
mod cluster_join;
mod edge;
mod fair_share;
mod fleet;
mod gateway;
mod gateway_routes;
mod human_chain_sim;
mod models;
mod node_certs;
mod placement;
mod planner_scenarios;
mod rollouts;
mod scenarios;
mod simulation;
mod streams;
mod treasury_sim;
