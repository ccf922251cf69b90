//! The OpenAI-compatible inference gateway under `/v1`, served by every server.
//!
//! A request names a model by its pushed name or its digest; the gateway finds the
//! running `model-server` instances of that model (as their agents reported them,
//! with an endpoint), picks the ready one with the fewest requests outstanding
//! through this server, and relays the request there, streaming the answer back
//! unchanged: status, content type and body, server-sent events chunk by chunk.
//!
//! It reads only this server's applied state, so followers serve the gateway as
//! well as the leader and no request waits for a Raft round-trip. A background task
//! rebuilds the routing table when the applied state moves and probes every
//! replica's `/ready`, keeping the set of ready replicas; a replica that refuses a
//! connection is dropped from that set until its next successful probe, and the
//! request moves on to another ready replica (each tried at most once).
//!
//! While a rollout's canaries wait for promotion, a request naming the model by
//! name goes to the canaries with the rollout's canary percent and to the instances
//! they would replace otherwise; a side with no ready replica gives way to the
//! other, so a canary that never turns ready costs no request.
//!
//! A request for a model that scales (a group with a `scaling` block) and has no
//! ready replica is held rather than refused: the gateway wakes its groups at zero
//! and sends the request on once a replica is ready, within a bound and a timeout
//! (`hold` has the rules).
//!
//! Errors leave in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`;
//! a semaphore at the door answers 429 beyond [`GatewayConfig::max_in_flight`].
//!
//! | module | owns |
//! |---|---|
//! | [`balancer`] | the [`Gateway`]: its routing table kept current, replicas probed, a replica picked per request and the request relayed |
//! | [`table`] | the routing table: which models exist, by name, digest or prefix, and their replicas' endpoints |
//! | `keys` | who may call: a circle's API key scopes a request to the models its jobs deploy |
//! | `hold` | requests held while a scaled model has no ready replica, and the wake of its groups at zero |
//! | `load` | each replica's load, from what its `/ready` reports |
//! | [`error`] | [`GatewayError`]: every answer the gateway gives instead of a replica, in OpenAI's shape |
//! | [`relay`] | what crosses to a replica and back: the `model` field read, headers forwarded, answers streamed |
//! | [`metrics`] | the gateway's Prometheus series |
//! | [`samples`] | each replica's recent requests (failures, time to first byte), which rollouts judge canaries on |
//! | [`routes`] | the `/v1` routes and their OpenAPI documentation |

pub mod balancer;
pub mod error;
pub(crate) mod hold;
pub(crate) mod keys;
pub mod load;
pub mod metrics;
pub mod relay;
pub mod routes;
pub mod samples;
pub mod table;
#[cfg(test)]
mod tests;

pub use balancer::{Gateway, GatewayBuildError, GatewayConfig};
pub use error::GatewayError;
pub use load::ReplicaLoad;
pub use routes::{openapi, router};
pub use samples::ReplicaStats;
pub use table::MIN_DIGEST_PREFIX;
