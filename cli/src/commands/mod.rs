//! Client subcommands of the control API, one module per noun, with human and
//! `--json` output (the printing helpers are [`crate::output`]'s).
//!
//! | module | owns |
//! |---|---|
//! | `job` | `aigrid job` and `aigrid alloc`: job files read and checked, submitted, listed, shown, removed; an allocation's output |
//! | `rollout` | `aigrid rollout`: fleet rollouts of a model to nodes in waves, followed node by node |
//! | `node` | `aigrid node`: nodes listed and shown, registered and heartbeated by hand, drained, revoked; join tokens |
//! | `cluster` | `aigrid cluster`: membership and Raft status |
//! | `deployment` | `aigrid deployment`: a service's rollout shown, followed, paused, resumed, promoted, aborted |
//! | `access` | `aigrid key`, `whoami`, `identity`, `circle`, `apikey`: identities, roles and API keys |
//! | `chain` | the Human Chain: `circle create`, `circle member`, `circle policy`, `proposal` |
//! | `audit` | `aigrid audit`: the audit log read, exported, and verified offline |
//! | `usage` | `aigrid usage`: metered use of a circle or the cluster, by GPU model, job and node |
//! | `treasury` | `aigrid treasury`: circles' balances and ledgers, deposits, guarded transfers, farmers' earnings |
//! | `ca` | `aigrid ca`: the cluster CA and the server certificates it issues |

mod access;
mod audit;
mod ca;
mod chain;
mod cluster;
mod deployment;
mod job;
mod node;
mod rollout;
mod treasury;
mod usage;

pub use access::{
    apikey, circle, identity, key, whoami, ApiKeyCommand, CircleCommand, IdentityCommand,
    KeyCommand,
};
pub use audit::{audit, verify as verify_audit, AuditCommand};
pub use ca::{ca, CaCommand};
pub use chain::{proposal, ProposalCommand};
pub use cluster::{cluster, ClusterCommand};
pub use deployment::{deployment, DeploymentCommand};
pub use job::{alloc, job, AllocCommand, JobCommand};
pub use node::{node, NodeCommand};
pub use rollout::{rollout, RolloutCommand};
pub use treasury::{treasury, TreasuryCommand};
pub use usage::{usage, UsageArgs};
