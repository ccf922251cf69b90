//! Model serving: candle runtimes, batching engines and the OpenAI-compatible `/v1` API.
//!
//! Nothing is implemented here yet; the control plane does not depend on it.
