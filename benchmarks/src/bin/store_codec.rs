//! Reed-Solomon erasure coding throughput for the model store (`benchmarks/store`,
//! part a): encode (data → parity) and reconstruct (m data shards lost) for the codes
//! the store uses, on one thread and on two, beside a plain memcpy of the same bytes.
//!
//! Implementations, all in the same run and on the same bytes:
//!
//! - **Codec**: `aigrid_store::codec::Codec`. Its `code_stripe` (repair) takes the
//!   stripe whole and owned, as a repair hands over the stripe it rebuilt (made
//!   outside the clock): the data shards are slices of it, padded in place, and the
//!   parity is coded into buffers the codec takes back when the shards drop (the
//!   last stripe's, here); its `rebuild` (every read) takes the
//!   stripe's room with the surviving data shards in place, as a reader fetches them
//!   straight there, and writes the lost ones. Both work in column blocks, spread over the codec's own pool of one
//!   thread per core: one caller codes on every core.
//! - **Codec::encode_parity**: parity only, from data shards the caller keeps
//!   (slices of the stripe here), into the codec's reused parity buffers: what `code_stripe`
//!   does for a push, whose chunks are the data shards.
//! - **rse raw**: `reed-solomon-erasure` (simd-accel) on preallocated buffers, no
//!   copies: data shards are slices of the stripe, parity and lost shards are
//!   written in place. The gap to Codec is Codec's copying and allocation.
//! - **rse blocked**: the same calls made once per column block of every shard
//!   (Reed-Solomon is column-wise, so the bytes are identical), which keeps the
//!   block of all k+m shards in L2 instead of streaming whole shards k×m times.
//! - **rs-simd**: `reed-solomon-simd` (Leopard-style, GF(2^16)), one encoder or decoder
//!   per thread, reused; its shards live in the coder's work area, so the parity (or
//!   the restored shards) are copied out into the stripe's buffers, as a store must.
//!
//! Throughput is data (stripe) bytes over wall time, threads started and joined
//! inside the clock; with two threads each takes half of the stripes. Every case
//! runs once untimed and its output is checked against the original bytes (or the
//! reference parity) before the timed repetitions, which are interleaved across
//! cases so machine noise falls on all alike; the table shows the median.
//!
//! | module | owns |
//! |---|---|
//! | [`workload`] | the stripes, their reference parity, the columns and operations, the thread split |
//! | [`kernels`] | reed-solomon-erasure over column blocks |
//! | [`cases`] | one runner per cell: each column's encode or reconstruct, checked then timed |
//! | [`report`] | the tables, the targets, the machine and its load |

// A binary's root resolves modules beside itself (`src/bin/`), where every
// binary's files would mix; this one keeps its own in `src/bin/store_codec/`.
#[path = "store_codec/cases.rs"]
mod cases;
#[path = "store_codec/kernels.rs"]
mod kernels;
#[path = "store_codec/report.rs"]
mod report;
#[path = "store_codec/workload.rs"]
mod workload;

use aigrid_store::codec::{Codec, Params};
use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use reed_solomon_erasure::galois_8::ReedSolomon;

use cases::{
    codec_encode_case, codec_parity_case, codec_rebuild_case, memcpy_case, rse_encode_case,
    rse_reconstruct_case, simd_encode_case, simd_reconstruct_case, Runner,
};
use report::{
    cpu_model, median, print_table, print_targets, range, simd_features, Cell, Columns, CpuSample,
    Group,
};
use workload::{Imp, Op, Workload};

// The `aigrid` binary, where the Codec runs in production, allocates with mimalloc;
// Codec's per-stripe allocations should cost here what they cost there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "store_codec",
    about = "Reed-Solomon encode/reconstruct throughput: aigrid's Codec, reed-solomon-erasure raw and blocked, reed-solomon-simd, memcpy"
)]
struct Args {
    /// Codes to measure, as k+m.
    #[arg(long, value_delimiter = ',', default_value = "10+4,4+2")]
    codes: Vec<String>,
    /// Shard sizes in KiB (a stripe is k shards); production cuts 4 MiB chunks.
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    shard_kib: Vec<usize>,
    /// Column block of the "rse blocked" variant, KiB.
    #[arg(long, default_value_t = 64)]
    block_kib: usize,
    /// Data per measurement, MiB: rounded up to an even number of whole stripes.
    #[arg(long, default_value_t = 256)]
    total_mib: usize,
    /// Timed repetitions per cell (after one checked, untimed run); the median is shown.
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// Columns to measure (default: all).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "memcpy,codec,codec-parity,rse-raw,rse-blocked,simd"
    )]
    imps: Vec<Imp>,
    /// Thread counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Seed of the random stripe bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn parse_code(s: &str) -> Result<(usize, usize)> {
    let (k, m) = s
        .split_once('+')
        .with_context(|| format!("code `{s}` is not k+m"))?;
    Ok((k.trim().parse()?, m.trim().parse()?))
}

fn measure(args: &Args, k: usize, m: usize, shard: usize) -> Result<Group> {
    let total = args.total_mib << 20;
    let w = Workload::new(k, m, shard, total, args.seed)?;
    let codec = Codec::new(Params { k, m })?;
    let rs = ReedSolomon::new(k, m).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let block = (args.block_kib << 10).min(shard);
    let bytes = w.data_bytes() as f64;

    let mut cases: Vec<(Cell, Runner)> = Vec::new();
    for op in [Op::Encode, Op::Reconstruct] {
        for &threads in &args.threads {
            for &imp in &args.imps {
                let runner = match (imp, op) {
                    // Parity only: nothing to reconstruct.
                    (Imp::CodecParity, Op::Reconstruct) => continue,
                    (Imp::Memcpy, _) => memcpy_case(&w, threads),
                    (Imp::Codec, Op::Encode) => codec_encode_case(&w, &codec, threads),
                    (Imp::Codec, Op::Reconstruct) => codec_rebuild_case(&w, &codec, threads),
                    (Imp::CodecParity, Op::Encode) => codec_parity_case(&w, &codec, threads),
                    (Imp::RseRaw, Op::Encode) => rse_encode_case(&w, &rs, threads, shard),
                    (Imp::RseRaw, Op::Reconstruct) => rse_reconstruct_case(&w, &rs, threads, shard),
                    (Imp::RseBlocked, Op::Encode) => rse_encode_case(&w, &rs, threads, block),
                    (Imp::RseBlocked, Op::Reconstruct) => {
                        rse_reconstruct_case(&w, &rs, threads, block)
                    }
                    (Imp::Simd, Op::Encode) => simd_encode_case(&w, threads)?,
                    (Imp::Simd, Op::Reconstruct) => simd_reconstruct_case(&w, threads)?,
                };
                let cell = Cell {
                    op,
                    threads,
                    imp,
                    samples: Vec::new(),
                };
                cases.push((cell, runner));
            }
        }
    }
    for (cell, run) in &mut cases {
        run(true).with_context(|| format!("{k}+{m} {:?} {:?}", cell.op, cell.imp))?;
    }
    let before = CpuSample::now();
    for rep in 0..args.reps {
        eprintln!(
            "  {k}+{m}, shard {} KiB: repetition {}/{}",
            shard >> 10,
            rep + 1,
            args.reps
        );
        for (cell, run) in &mut cases {
            let t = run(false)?;
            cell.samples.push(bytes / t.as_secs_f64() / 1e9);
        }
    }
    let others = before
        .zip(CpuSample::now())
        .and_then(|(b, a)| b.others_since(a));
    Ok(Group {
        k,
        m,
        shard,
        stripes: w.stripes.len(),
        cells: cases.into_iter().map(|(c, _)| c).collect(),
        others,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.reps == 0 || args.threads.contains(&0) || args.block_kib == 0 {
        bail!("--reps, --threads and --block-kib must be positive");
    }
    let codes = args
        .codes
        .iter()
        .map(|c| parse_code(c))
        .collect::<Result<Vec<_>>>()?;
    let mut groups = Vec::new();
    for &(k, m) in &codes {
        for &kib in &args.shard_kib {
            ensure!(kib > 0, "--shard-kib must be positive");
            eprintln!("==> {k}+{m}, shard {kib} KiB");
            groups.push(measure(&args, k, m, kib << 10)?);
        }
    }

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "Reed-Solomon throughput, GB/s of data (stripe) bytes, median of {} repetitions; {} on {cores} cores ({}); mimalloc.",
        args.reps,
        cpu_model(),
        simd_features()
    );
    let stripes: Vec<String> = groups
        .iter()
        .map(|g| {
            let others = g
                .others
                .map_or("unknown".into(), |o| format!("{:.0}%", o * 100.0));
            format!(
                "{}+{} @ {} KiB: {} stripes = {} MiB (other processes meanwhile: {others} of the machine)",
                g.k,
                g.m,
                g.shard >> 10,
                g.stripes,
                (g.stripes * g.k * g.shard) >> 20
            )
        })
        .collect();
    println!(
        "Per measurement: {}. Every cell's output was checked once against the original bytes.",
        stripes.join("; ")
    );
    println!();
    let columns = Columns {
        imps: args.imps.clone(),
        threads: args.threads.clone(),
        block_kib: args.block_kib,
    };
    print_table(&columns, &groups, |c| format!("{:.2}", median(&c.samples)));
    println!();
    println!("Spread over the repetitions (min-max GB/s):");
    println!();
    print_table(&columns, &groups, |c| {
        let (lo, hi) = range(&c.samples);
        format!("{lo:.2}-{hi:.2}")
    });
    println!();
    print_targets(&columns, &groups);
    Ok(())
}
