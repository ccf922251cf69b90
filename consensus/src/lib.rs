//! aigrid's Raft driver, built on raft-rs, generic over the replicated state machine.
//!
//! - [`state_machine`]: the trait a replicated state implements.
//! - [`log_store`]: entries, hard state and snapshots; in memory for raft-rs, written
//!   through to a durable medium with one fsync per batch.
//! - [`log_file`]: that medium on disk, an append-only file of checksummed records.
//! - [`replica`]: one replica's `Ready` cycle, without threads or sockets.
//! - [`runtime`]: the replica on its own thread, with an async handle for proposals,
//!   linearizable reads and membership changes.
//! - [`transport`]: Raft messages between servers over HTTPS with mutual TLS, batched
//!   per peer; a message counts only from the server its connection's certificate names.
//! - [`peer_listener`]: the peer listener's TLS accept loop, labelling each connection
//!   with its certificate's server id.
//! - [`socket`]: a TCP connection that moves from the runtime that accepted it to
//!   the one that serves it (a replica's thread).
//! - [`human`]: the Human Chain's pure rules: approval digests and tallies, and the
//!   audit log of what was approved and applied, with signed checkpoints and exports.
//! - [`metrics`]: Prometheus metrics of all of the above.
//! - `testkit` (feature `testkit`, for tests and benchmarks only): a seeded simulation
//!   of whole clusters over an in-memory network.

pub mod background;
pub mod human;
pub mod log_file;
pub mod log_store;
pub mod metrics;
pub mod peer_listener;
pub mod replica;
pub mod runtime;
pub mod socket;
pub mod state_machine;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod transport;

pub use replica::{MembershipChange, ReplicaConfig, ReplicaStatus};
pub use runtime::{NodeConfig, RaftError, RaftNode, DEFAULT_SPIN, MAX_SPIN, QUIET_SPIN};
pub use state_machine::{SnapshotError, StateMachine};
