//! Part (b): `Store::push` into local directories and into memory, beside a plain
//! copy of the directory and a plain copy laid out as k+m lays it out.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aigrid_benchmarks::measure::{cpus, load_average};

use aigrid_store::backend::Backend;
use aigrid_store::codec::Params;
use aigrid_store::manifest::Registration;
use aigrid_store::store::{PushOptions, PushStats, Store};
use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use object_store::memory::InMemory;

use crate::args::{Args, GIB};
use crate::model::Model;
use crate::timing::{median_index, remove_dir, timed, wall_range, Timing};

/// Pushes the model into fresh backend directories `roots`, named `b0`, `b1`, ...
pub(crate) async fn push(
    model: &Model,
    roots: &[PathBuf],
    params: Params,
    key: &SigningKey,
) -> Result<(Timing, PushStats, Registration)> {
    for root in roots {
        remove_dir(root)?;
    }
    let backends = roots
        .iter()
        .enumerate()
        .map(|(i, root)| Backend::local(format!("b{i}"), root))
        .collect::<std::io::Result<Vec<_>>>()?;
    push_to(model, backends, params, key).await
}

/// Pushes the model into as many fresh in-memory stores as `roots`: the pipeline
/// without the file system.
pub(crate) async fn push_in_memory(
    model: &Model,
    roots: &[PathBuf],
    params: Params,
    key: &SigningKey,
) -> Result<Timing> {
    let backends = (0..roots.len())
        .map(|i| Backend::new(format!("b{i}"), BTreeMap::new(), Arc::new(InMemory::new())))
        .collect();
    Ok(push_to(model, backends, params, key).await?.0)
}

pub(crate) async fn push_to(
    model: &Model,
    backends: Vec<Backend>,
    params: Params,
    key: &SigningKey,
) -> Result<(Timing, PushStats, Registration)> {
    let store = Store::new(backends);
    let opts = PushOptions::new("bench-model", params);
    let (timing, pushed) = timed(async { Ok(store.push(&model.dir, &opts, key).await?) }).await?;
    Ok((timing, pushed.stats, pushed.registration))
}

/// `std::fs::copy` of every file into `dest`.
pub(crate) fn copy_dir(model: &Model, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    for (rel, _, _) in &model.files {
        std::fs::copy(model.dir.join(rel), dest.join(rel))?;
    }
    Ok(())
}

/// The model's bytes written the way k+m lays them out, without hashing or coding:
/// each run of k chunks of `chunk` bytes goes as k files to the first k directories
/// and, standing in for parity, its first m chunks again to the other m.
pub(crate) fn copy_striped(
    model: &Model,
    dests: &[PathBuf],
    k: usize,
    chunk: usize,
) -> Result<u64> {
    for dest in dests {
        std::fs::create_dir_all(dest)?;
    }
    let mut written = 0u64;
    let mut buf = vec![0u8; k * chunk];
    for (rel, _, _) in &model.files {
        let mut file = std::fs::File::open(model.dir.join(rel))?;
        for stripe in 0.. {
            let n = read_full(&mut file, &mut buf)?;
            if n == 0 {
                break;
            }
            let pieces: Vec<&[u8]> = buf[..n].chunks(chunk).collect();
            for (j, dest) in dests.iter().enumerate() {
                let piece = match (j < k, pieces.get(j)) {
                    (true, Some(piece)) => *piece,
                    (true, None) => continue,
                    (false, _) => pieces[(j - k) % pieces.len()],
                };
                std::fs::write(dest.join(format!("{rel}.{stripe}.{j}")), piece)?;
                written += piece.len() as u64;
            }
        }
    }
    Ok(written)
}

/// Fills `buf` from `file` as far as it goes; answers the bytes read.
pub(crate) fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            got => n += got,
        }
    }
    Ok(n)
}

pub(crate) struct PushResults {
    pub(crate) ours: Vec<Timing>,
    pub(crate) memory: Vec<Timing>,
    pub(crate) copy: Vec<Timing>,
    pub(crate) striped: Vec<Timing>,
    pub(crate) stats: PushStats,
    pub(crate) striped_bytes: u64,
    /// The 1-minute load average when the part started and ended.
    pub(crate) load: (String, String),
}

pub(crate) async fn part_push(
    args: &Args,
    model: &Model,
    work: &Path,
    roots: &[PathBuf],
    params: Params,
    key: &SigningKey,
) -> Result<(PushResults, Registration)> {
    let copy_dest = work.join("copy");
    let striped: Vec<PathBuf> = (0..roots.len())
        .map(|i| work.join(format!("striped{i}")))
        .collect();
    let mut out = PushResults {
        ours: Vec::new(),
        memory: Vec::new(),
        copy: Vec::new(),
        striped: Vec::new(),
        stats: PushStats::default(),
        striped_bytes: 0,
        load: (load_average(), String::new()),
    };
    let mut registration = None;
    for rep in 0..args.push_reps {
        eprintln!("==> push, repetition {}/{}", rep + 1, args.push_reps);
        let (timing, stats, reg) = push(model, roots, params, key).await?;
        out.ours.push(timing);
        out.stats = stats;
        registration = Some(reg);

        out.memory
            .push(push_in_memory(model, roots, params, key).await?);

        remove_dir(&copy_dest)?;
        let (timing, ()) = timed(async { copy_dir(model, &copy_dest) }).await?;
        out.copy.push(timing);
        remove_dir(&copy_dest)?;

        for dest in &striped {
            remove_dir(dest)?;
        }
        let (timing, written) = timed(async {
            copy_striped(
                model,
                &striped,
                params.k,
                aigrid_store::chunk::DEFAULT_CHUNK_SIZE as usize,
            )
        })
        .await?;
        out.striped.push(timing);
        out.striped_bytes = written;
        for dest in &striped {
            remove_dir(dest)?;
        }
    }
    out.load.1 = load_average();
    Ok((out, registration.context("no push ran")?))
}

pub(crate) fn print_push(args: &Args, model: &Model, params: Params, r: &PushResults) {
    let bytes = model.bytes() as f64;
    let gbs = |t: &Timing| bytes / t.wall.as_secs_f64() / 1e9;
    let ours = r.ours[median_index(&r.ours)];
    let n = params.k + params.m;
    println!(
        "### (b) Push pipeline: {:.2} GiB model ({} tensors x {} MiB + config.json), {}+{}, 4 MiB chunks, {n} local-directory backends; median of {} repetitions, interleaved; {} CPUs, 1-min load average {} at the start, {} at the end",
        bytes / GIB,
        args.tensors,
        args.tensor_mib,
        params.k,
        params.m,
        args.push_reps,
        cpus(),
        r.load.0,
        r.load.1,
    );
    println!();
    println!("| pipeline | bytes written, GiB | wall s, median | wall s, min-max | **GB/s of model bytes** | CPU s (user+sys) | ours / this GB/s |");
    println!("|:--|--:|--:|--:|--:|--:|--:|");
    let (k, m) = (params.k, params.m);
    let rows: [(String, f64, &[Timing]); 4] = [
        (
            "**ours: `Store::push`** (cut, BLAKE3 chunks, RS encode, BLAKE3 shards, write)".into(),
            r.stats.bytes_uploaded as f64,
            &r.ours,
        ),
        (
            format!("ours, into {n} in-memory stores (`InMemory`: the pipeline without file writes)"),
            r.stats.bytes_uploaded as f64,
            &r.memory,
        ),
        (
            "baseline: `std::fs::copy` to 1 directory".into(),
            bytes,
            &r.copy,
        ),
        (
            format!("baseline: plain copy laid out as {k}+{m} lays it out, {n} directories (no hash, no coding)"),
            r.striped_bytes as f64,
            &r.striped,
        ),
    ];
    for (name, written, samples) in rows {
        let t = samples[median_index(samples)];
        let (lo, hi) = wall_range(samples);
        println!(
            "| {name} | {:.2} | {:.3} | {lo:.3}-{hi:.3} | {:.2} | {:.2} | {:.2} |",
            written / GIB,
            t.wall.as_secs_f64(),
            gbs(&t),
            t.cpu,
            gbs(&ours) / gbs(&t),
        );
    }
    println!();
    println!(
        "Push: {} chunks in {} stripes, {:.2} GiB of shards written. The model was written just before, so it is read from the page cache; every write on both sides lands in the page cache and nothing is fsynced.",
        r.stats.chunks,
        r.stats.stripes_written,
        r.stats.bytes_uploaded as f64 / GIB,
    );
    let v = gbs(&ours);
    println!(
        "Target: push >= 1 GB/s of model bytes: {v:.2} GB/s, {}.",
        if v >= 1.0 { "met" } else { "MISSED" }
    );
    println!();
}
