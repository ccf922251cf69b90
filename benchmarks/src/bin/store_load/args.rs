//! The flags of a run, and the units its tables speak in.

use std::path::PathBuf;

use clap::Parser;

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const GIB: f64 = (1u64 << 30) as f64;

#[derive(Parser, Debug)]
#[command(
    name = "store_load",
    about = "Model store push throughput and cold load over throttled backends, beside plain copies and a single-link download"
)]
pub(crate) struct Args {
    /// Parts to run: push (b), load (c).
    #[arg(long, value_delimiter = ',', default_value = "push,load")]
    pub(crate) parts: Vec<String>,
    /// Tensors in model.safetensors.
    #[arg(long, default_value_t = 64)]
    pub(crate) tensors: usize,
    /// Size of each tensor, MiB.
    #[arg(long, default_value_t = 16)]
    pub(crate) tensor_mib: usize,
    /// The erasure code, k+m; there are k+m backends.
    #[arg(long, default_value = "4+2")]
    pub(crate) code: String,
    /// Timed push repetitions (each variant, interleaved); the median is shown.
    #[arg(long, default_value_t = 3)]
    pub(crate) push_reps: usize,
    /// Timed cold loads of each of ours (each with a fresh reader, cache and links);
    /// the baseline runs once (its time is set by its link).
    #[arg(long, default_value_t = 3)]
    pub(crate) load_reps: usize,
    /// Bandwidth of each backend's link, MiB/s.
    #[arg(long, default_value_t = 100.0)]
    pub(crate) link_mib_s: f64,
    /// Override `FetchOptions::bytes_in_flight` (MiB) for ours; the library default
    /// otherwise.
    #[arg(long)]
    pub(crate) bytes_in_flight_mib: Option<u64>,
    /// Override `FetchOptions::hedge_initial` (ms) for ours.
    #[arg(long)]
    pub(crate) hedge_initial_ms: Option<u64>,
    /// Override `FetchOptions::hedge_factor` for ours.
    #[arg(long)]
    pub(crate) hedge_factor: Option<f64>,
    /// Tensors fetched at once in the per-tensor row (0: all at once).
    #[arg(long, default_value_t = 0)]
    pub(crate) tensor_concurrency: usize,
    /// Where the work directory goes (default: $TMPDIR, else /tmp).
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Seed of the model's random bytes.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
}
