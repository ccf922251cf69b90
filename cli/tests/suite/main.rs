//! The `aigrid` binary's integration tests, one module per area, in one test binary:
//! one link of the dependency graph, and the areas' tests run side by side rather
//! than one binary after another.
//! They start real `aigrid server` and `aigrid agent` processes on loopback ports.
//! Run one area with `cargo test -p aigrid --test suite <module>::`.

mod common;

mod agents;
mod bad_input;
mod bad_node_input;
mod cli;
mod config;
mod console;
mod dashboards;
mod data_port;
mod exec_driver;
mod human_chain;
mod membership;
mod models;
mod nodes;
mod openapi;
mod quotas;
mod replication;
mod rollouts;
mod sandbox;
mod scaling;
mod security;
mod serving;
mod tls;
mod treasury;
mod up;
mod versions;
