//! The node agent (`aigrid agent`): GPU and host discovery, the outbound-only pull
//! loop, workload drivers, the model cache and the shard service.
//!
//! - [`simulated`]: GPU inventories from a `--simulate-gpus` specification, so every
//!   GPU path can be exercised on machines without GPUs.

pub mod simulated;
