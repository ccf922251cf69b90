//! The model store's push pipeline and cold load (`benchmarks/store`, parts b and c),
//! each beside the plain way of moving the same bytes, on one ~1 GiB model written
//! once with random bytes under `$TMPDIR`: `config.json` and `model.safetensors`
//! (64 F32 tensors of 16 MiB by default).
//!
//! - **(b) push**: `Store::push` with the 4+2 code and 4 MiB chunks over 6
//!   local-directory backends (`Backend::local`), so cutting, BLAKE3 of every chunk,
//!   Reed-Solomon encoding, BLAKE3 of every shard and the writes are all inside the
//!   clock; and the same push into 6 `InMemory` stores, which leaves the file system
//!   out. Beside them: `std::fs::copy` of the directory into one other directory,
//!   and a plain copy of the same bytes laid out as 4+2 lays them out (each run of k
//!   chunks to k directories, m of them again to m more: 1.5x the bytes in as many
//!   files as the push writes, no hashing, no coding). Throughput is model bytes over
//!   wall time. The model was just written, so it is read from the page cache, and
//!   every write lands in the page cache: nothing is fsynced on either side.
//! - **(c) cold load**: every backend sits behind its own simulated link of
//!   `--link-mib-s` (100 MiB/s): `link::Throttled` wraps `LocalFileSystem` and queues the
//!   GETs of one backend on its `Link`, however many run at once (object_store's
//!   `ThrottledStore` sleeps per request, so concurrent requests would exceed the
//!   link). Ours is a fresh reader over fresh links with an empty chunk cache:
//!   `Reader::prewarm(&[], false)` fetches every stripe from any k of its k+m shards,
//!   checks every shard and chunk against the signed manifest and writes every chunk
//!   to the cache. Two more rows read every tensor concurrently through
//!   `Reader::safetensors`, all within one task and in one tokio task each. The
//!   baseline downloads each file whole from one backend behind the same kind of
//!   link (the files stored as single objects in a separate directory) and hashes it
//!   with BLAKE3 as it streams in. The shards are in the page cache (just pushed), so
//!   the links are the bottleneck by construction; the table also says how long the
//!   links sat idle, which is time the reader left bandwidth unused.
//!
//! Every load is checked after its clock stops: the baseline's hashes against the
//! files', every tensor's bytes against the generated ones, and the cache against
//! the manifest's chunk count after a prewarm. The machine is shared, so each table
//! says the 1-minute load average around it.
//!
//! | module | owns |
//! |---|---|
//! | [`args`] | the flags, and the units the tables speak in |
//! | [`model`] | the model written for the run and what its bytes hash to |
//! | [`timing`] | wall and CPU time of a run, medians and spreads |
//! | [`push`] | part (b), push beside plain copies |
//! | [`load`] | part (c), cold loads beside a single-link download |

// A binary's root resolves modules beside itself (`src/bin/`), where every
// binary's files would mix; this one keeps its own in `src/bin/store_load/`.
#[path = "store_load/args.rs"]
mod args;
#[path = "store_load/load.rs"]
mod load;
#[path = "store_load/model.rs"]
mod model;
#[path = "store_load/push.rs"]
mod push;
#[path = "store_load/timing.rs"]
mod timing;

use std::path::PathBuf;

use aigrid_store::codec::Params;
use anyhow::{bail, ensure, Context, Result};
use args::Args;
use clap::Parser;
use ed25519_dalek::SigningKey;
use load::{part_load, print_load};
use model::write_model;
use push::{part_push, print_push, push};

// The `aigrid` binary, which pushes and reads models in production, allocates with
// mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn parse_code(code: &str) -> Result<Params> {
    let (k, m) = code
        .split_once('+')
        .with_context(|| format!("--code `{code}`: expected k+m"))?;
    let params = Params {
        k: k.trim().parse()?,
        m: m.trim().parse()?,
    };
    ensure!(
        params.k > 0 && params.m > 0,
        "--code `{code}`: k and m must be positive"
    );
    Ok(params)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let params = parse_code(&args.code)?;
    for part in &args.parts {
        if !matches!(part.as_str(), "push" | "load") {
            bail!("unknown part `{part}` (push, load)");
        }
    }
    ensure!(
        args.push_reps > 0 && args.load_reps > 0 && args.tensors > 0 && args.tensor_mib > 0,
        "--push-reps, --load-reps, --tensors and --tensor-mib must be positive"
    );
    ensure!(args.link_mib_s > 0.0, "--link-mib-s must be positive");
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("aigrid-store-load.")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a work directory in {}", parent.display()))?;
    eprintln!(
        "==> writing the model ({} x {} MiB) under {}",
        args.tensors,
        args.tensor_mib,
        work.path().display()
    );
    let model = write_model(
        &work.path().join("model"),
        args.tensors,
        args.tensor_mib << 20,
        args.seed,
    )?;
    let roots: Vec<PathBuf> = (0..params.k + params.m)
        .map(|i| work.path().join(format!("backend{i}")))
        .collect();
    let key = SigningKey::from_bytes(&rand::random());
    let wants = |p: &str| args.parts.iter().any(|x| x == p);

    let registration = if wants("push") {
        let (results, registration) =
            part_push(&args, &model, work.path(), &roots, params, &key).await?;
        print_push(&args, &model, params, &results);
        registration
    } else {
        eprintln!("==> pushing once (not timed)");
        push(&model, &roots, params, &key).await?.2
    };
    if wants("load") {
        let results = part_load(&args, &model, work.path(), &roots, &registration).await?;
        print_load(&args, &model, params, &results);
    }
    Ok(())
}
