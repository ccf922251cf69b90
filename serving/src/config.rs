//! What a model server is told at start: where to listen, the device, the
//! projections' precision, the names it answers to, and its limits. Plain data,
//! shared by the server (which answers by it) and the loader (which sizes the
//! engines by it).

use std::net::SocketAddr;

use crate::dense::Precision;
use crate::DeviceSpec;

/// Limits that answer 413/429/400 instead of queueing without bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Requests in flight at once (429 beyond).
    pub max_concurrent_requests: usize,
    /// Tokens one generation step may process, prefill and decode together; also the
    /// tokens of one embedding forward (inputs are packed, not padded).
    pub max_batch_tokens: usize,
    /// Sequences decoded together.
    pub max_running_sequences: usize,
    /// Longest an embedding request waits for others to batch with, in milliseconds.
    /// 0 (the default) waits for none: a batch is whatever is queued when the model
    /// is free, and requests that arrive during a forward make up the next one.
    pub embed_max_delay_ms: u64,
    /// Bytes of KV cache for the running sequences, cut into slots of one whole
    /// context each (at most `max_running_sequences`; one slot of the whole budget
    /// when that is less than a context). Requests wait for a free slot; one longer
    /// than a slot is refused with 400.
    pub kv_cache_bytes: usize,
    /// Embed inputs longer than the model takes by their first tokens when a request
    /// does not say (`truncate`); off, they are refused with 400.
    pub auto_truncate: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 2 << 20,
            max_concurrent_requests: 256,
            max_batch_tokens: 2048,
            max_running_sequences: 64,
            embed_max_delay_ms: 0,
            kv_cache_bytes: 4 << 30,
            auto_truncate: false,
        }
    }
}

/// How to serve a model.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where the model runs.
    pub device: DeviceSpec,
    /// The projections' arithmetic; `None` chooses ([`Precision::resolve`]): bf16
    /// for embedding models on a GPU or a CPU with AMX, f32 otherwise.
    pub precision: Option<Precision>,
    /// Names clients may give as `model`, besides the model's digest (or directory).
    /// The first is the name `/v1/models` shows.
    pub names: Vec<String>,
    /// Limits.
    pub limits: Limits,
}
