//! `aigrid serve`: one model behind the OpenAI-compatible `/v1` API, read from a local
//! directory or streamed from the dispersed store, every byte checked against the
//! signed manifest. The agent's `model-server` driver runs this; so can anyone, by
//! hand.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aigrid_serving::dense::Precision;
use aigrid_serving::server::{Limits, ServeConfig, Server};
use aigrid_serving::{DeviceSpec, ModelSource};
use aigrid_store::cache::ChunkCache;
use aigrid_store::reader::ReaderOptions;
use anyhow::{anyhow, bail, Context};
use clap::Args;

use crate::client::Client;
use crate::model::{self, StoreArgs};

/// Flags of `aigrid serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// The model: a directory of model files (config.json, tokenizer.json,
    /// safetensors or GGUF), or a registered model's digest or a unique prefix of it.
    #[arg(long, env = "AIGRID_MODEL", value_name = "DIGEST|DIR")]
    model: String,
    /// Address for `/v1`, `/health`, `/ready`, `/status` and `/metrics` (port 0: any
    /// free port; the line printed at start says which).
    #[arg(long, env = "AIGRID_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Where the model runs: `auto` (the first CUDA device when this build has CUDA
    /// and one answers, else the CPU), `cpu` or `cuda:N`.
    #[arg(long, env = "AIGRID_DEVICE", default_value = "auto")]
    device: DeviceSpec,
    /// A name clients may give as `model` besides the digest; repeatable, the first
    /// is the one `/v1/models` shows (default: the directory's name, or the name the
    /// model was pushed under).
    #[arg(long = "name", env = "AIGRID_SERVE_NAMES", value_delimiter = ',')]
    names: Vec<String>,
    /// Where verified chunks of a model read from the store are kept between runs
    /// (default: `aigrid/model-cache` under the user's cache directory).
    #[arg(long, env = "AIGRID_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// The chunk cache's budget in GiB; least recently used chunks go first.
    #[arg(long, env = "AIGRID_CACHE_GIB", default_value_t = 20.0)]
    cache_gib: f64,
    /// The owner's key file, for a model encrypted at rest.
    #[arg(long, env = "AIGRID_MODEL_KEY")]
    key: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    /// Requests served at once; more answer 429.
    #[arg(long, env = "AIGRID_MAX_CONCURRENT_REQUESTS", default_value_t = Limits::default().max_concurrent_requests)]
    max_concurrent_requests: usize,
    /// Largest request body in bytes; larger ones answer 413.
    #[arg(long, env = "AIGRID_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    max_body_bytes: usize,
    /// Tokens one generation step processes, prompts and decoding together.
    #[arg(long, env = "AIGRID_MAX_BATCH_TOKENS", default_value_t = Limits::default().max_batch_tokens)]
    max_batch_tokens: usize,
    /// Sequences decoded together.
    #[arg(long, env = "AIGRID_MAX_RUNNING_SEQUENCES", default_value_t = Limits::default().max_running_sequences)]
    max_running_sequences: usize,
    /// Longest an embedding request waits for others to batch with, in milliseconds.
    #[arg(long, env = "AIGRID_EMBED_MAX_DELAY_MS", default_value_t = Limits::default().embed_max_delay_ms)]
    embed_max_delay_ms: u64,
    /// KV cache of the running sequences in GiB, cut into slots of one whole context
    /// each (at most --max-running-sequences); requests wait for a free slot, and one
    /// longer than a slot is refused.
    #[arg(long, env = "AIGRID_KV_CACHE_GIB", default_value_t = 4.0)]
    kv_cache_gib: f64,
    /// Embed inputs longer than the model takes by their first tokens, where a request
    /// does not say (`"truncate"`); without it they are refused with 400.
    #[arg(long, env = "AIGRID_AUTO_TRUNCATE")]
    auto_truncate: bool,
    /// The projections' arithmetic: `f32`, `bf16` (weights and inputs rounded to
    /// bf16, sums in f32, on a GPU's tensor cores or the AMX units of Xeon CPUs since
    /// Sapphire Rapids), or `auto`: bf16 for embedding models on a GPU or where the
    /// CPU has AMX, f32 otherwise.
    #[arg(long, env = "AIGRID_MATMUL_PRECISION", default_value = "auto")]
    matmul_precision: PrecisionChoice,
}

/// `--matmul-precision`: `auto` or a [`Precision`].
#[derive(Debug, Clone, Copy)]
struct PrecisionChoice(Option<Precision>);

impl std::str::FromStr for PrecisionChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(PrecisionChoice(None)),
            other => other
                .parse()
                .map(|p| PrecisionChoice(Some(p)))
                .map_err(|e| format!("{e}, or auto")),
        }
    }
}

impl ServeArgs {
    /// The limits, each checked to allow at least something.
    fn limits(&self) -> anyhow::Result<Limits> {
        for (flag, value) in [
            ("--max-concurrent-requests", self.max_concurrent_requests),
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-batch-tokens", self.max_batch_tokens),
            ("--max-running-sequences", self.max_running_sequences),
        ] {
            if value == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        Ok(Limits {
            max_body_bytes: self.max_body_bytes,
            max_concurrent_requests: self.max_concurrent_requests,
            max_batch_tokens: self.max_batch_tokens,
            max_running_sequences: self.max_running_sequences,
            embed_max_delay_ms: self.embed_max_delay_ms,
            kv_cache_bytes: gib_bytes("--kv-cache-gib", self.kv_cache_gib)? as usize,
            auto_truncate: self.auto_truncate,
        })
    }

    /// The cache budget in bytes.
    fn cache_bytes(&self) -> anyhow::Result<u64> {
        gib_bytes("--cache-gib", self.cache_gib)
    }

    /// The names given, trimmed, or `default` alone.
    fn names(&self, default: String) -> anyhow::Result<Vec<String>> {
        if self.names.is_empty() {
            return Ok(vec![default]);
        }
        let mut names = Vec::new();
        for name in &self.names {
            let name = name.trim();
            if name.is_empty() {
                bail!("--name must not be empty");
            }
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }
}

/// True when `text` could be a digest or a prefix of one.
fn looks_like_digest(text: &str) -> bool {
    !text.is_empty() && text.len() <= 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A local model directory and the name it is served under by default: its own.
fn dir_source(path: &Path) -> anyhow::Result<(ModelSource, String)> {
    let dir = path
        .canonicalize()
        .with_context(|| format!("model directory {}", path.display()))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| anyhow!("model directory {} has no name: pass --name", dir.display()))?;
    Ok((ModelSource::Dir(dir), name))
}

/// A registered model, read lazily through the store's verified reader and a chunk
/// cache, and the name it was pushed under.
async fn store_source(servers: &str, args: &ServeArgs) -> anyhow::Result<(ModelSource, String)> {
    let cache_bytes = args.cache_bytes()?;
    let key = model::read_model_key(args.key.as_deref())?;
    // Model reads are open: a model server holds no identity.
    let client = Client::new(servers, None)?;
    let digest = model::resolve(&client, &args.model).await?;
    // Checked to verify and to be the digest asked for, as `pull` does.
    let detail = model::detail(&client, &digest).await?;
    let (store, _) = model::open_store(&client, &args.store).await?;
    let cache_dir = match &args.cache_dir {
        Some(dir) => dir.clone(),
        None => dirs::cache_dir()
            .ok_or_else(|| anyhow!("no user cache directory; pass --cache-dir DIR"))?
            .join("aigrid")
            .join("model-cache"),
    };
    let cache = ChunkCache::open(&cache_dir, cache_bytes)
        .with_context(|| format!("opening the model cache {}", cache_dir.display()))?;
    // The cache is the node's, shared by its model servers, and outlives the models
    // it served: the chunks of models deleted since leave the disk now.
    match model::registered_chunks(&client).await {
        Ok(live) => match cache.retain(|c| live.contains(c)) {
            Ok((0, _)) => {}
            Ok((chunks, bytes)) => {
                tracing::info!(chunks, bytes, "dropped cached chunks of deleted models")
            }
            Err(e) => tracing::warn!(error = %e, "sweeping the model cache"),
        },
        Err(e) => tracing::warn!(error = %e, "listing models to sweep the model cache"),
    }
    let options = ReaderOptions {
        cache: Some(Arc::new(cache)),
        key,
        ..ReaderOptions::default()
    };
    let reader = store
        .reader(&detail.registration(), options)
        .map_err(|e| anyhow!("model {}: {e}", model::short(&digest)))?;
    Ok((
        ModelSource::Store(Arc::new(reader)),
        detail.summary.name.clone(),
    ))
}

/// Where `--model` points: an existing directory, else a registered model.
async fn source(servers: &str, args: &ServeArgs) -> anyhow::Result<(ModelSource, String)> {
    let text = args.model.trim();
    let path = Path::new(text);
    if path.is_dir() {
        return dir_source(path);
    }
    if path.exists() {
        bail!("--model {text} is not a directory: give a model directory or a model digest");
    }
    if !looks_like_digest(text) {
        bail!("--model {text}: no such directory, and not a model digest");
    }
    store_source(servers, args).await
}

/// `aigrid serve`: binds, prints where it serves, then serves until SIGINT or
/// SIGTERM, finishing the requests in flight.
pub async fn run_serve(servers: &str, args: ServeArgs) -> anyhow::Result<()> {
    let limits = args.limits()?;
    let precision = args.matmul_precision.0;
    let (source, default_name) = source(servers, &args).await?;
    let names = args.names(default_name)?;
    let shown = names[0].clone();
    let config = ServeConfig {
        listen: args.listen,
        device: args.device,
        precision,
        names,
        limits,
    };
    // A device it cannot use or a precision the device cannot run ("device cuda:0:
    // this build has no CUDA support", "bf16 matrix products need ..."), or an
    // address it cannot listen on.
    let server = Server::bind(config, source).await.map_err(|e| match e {
        aigrid_serving::ServingError::Model(why) => anyhow!("{why}"),
        other => anyhow!("cannot listen on {}: {other}", args.listen),
    })?;
    // Informational: a closed stdout must not stop the server.
    let line = format!(
        "serving {shown} on http://{} (device {})\n",
        server.local_addr(),
        args.device
    );
    let mut out = std::io::stdout();
    let _ = std::io::Write::write_all(&mut out, line.as_bytes());
    let _ = std::io::Write::flush(&mut out);
    server
        .run(crate::shutdown::shutdown_signal())
        .await
        .map_err(|e| anyhow!("{e}"))?;
    tracing::info!("model server stopped");
    Ok(())
}

/// A positive number of GiB given to `flag`, in bytes.
fn gib_bytes(flag: &str, gib: f64) -> anyhow::Result<u64> {
    if !gib.is_finite() || gib <= 0.0 || gib > 1e6 {
        bail!("{flag} must be a positive number of GiB, got {gib}");
    }
    Ok((gib * f64::from(1u32 << 30)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut argv = vec!["serve", "--model", "abc123"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn flags_parse_with_defaults_and_checks() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.listen, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(args.device, DeviceSpec::Auto);
        assert_eq!(args.limits().unwrap(), Limits::default());
        assert_eq!(args.cache_bytes().unwrap(), 20 << 30);
        assert_eq!(args.names("dir".into()).unwrap(), ["dir"]);

        let args = parse(&[
            "--device",
            "cuda:1",
            "--name",
            "a",
            "--name",
            "b,a",
            "--max-concurrent-requests",
            "3",
            "--cache-gib",
            "0.5",
        ])
        .unwrap();
        assert_eq!(args.device, DeviceSpec::Cuda(1));
        assert_eq!(args.names("dir".into()).unwrap(), ["a", "b"]);
        assert_eq!(args.limits().unwrap().max_concurrent_requests, 3);
        assert_eq!(args.cache_bytes().unwrap(), 1 << 29);

        assert!(parse(&["--device", "gpu"]).is_err());
        let zero = parse(&["--max-batch-tokens", "0"]).unwrap();
        assert!(zero
            .limits()
            .unwrap_err()
            .to_string()
            .contains("--max-batch-tokens"));
        let bad = parse(&["--cache-gib=-1"]).unwrap();
        assert!(bad.cache_bytes().is_err());
        let empty = parse(&["--name", " "]).unwrap();
        assert!(empty.names("d".into()).is_err());
    }

    #[test]
    fn a_model_is_a_directory_or_a_digest() {
        assert!(looks_like_digest("abcdef"));
        assert!(looks_like_digest(&"a".repeat(64)));
        assert!(!looks_like_digest(&"a".repeat(65)));
        assert!(!looks_like_digest("./model"));
        assert!(!looks_like_digest(""));

        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("my-model");
        std::fs::create_dir(&model).unwrap();
        let (source, name) = dir_source(&model.join("..").join("my-model")).unwrap();
        assert_eq!(name, "my-model");
        assert!(matches!(source, ModelSource::Dir(p) if p == model.canonicalize().unwrap()));
    }
}
