//! Reed-Solomon erasure coding throughput for the model store (`benchmarks/store`,
//! part a): encode (data → parity) and reconstruct (m data shards lost) for the codes
//! the store uses, on one thread and on two, beside a plain memcpy of the same bytes.
//!
//! Implementations, all in the same run and on the same bytes:
//!
//! - **Codec**: `aigrid_store::codec::Codec`. Its `encode` (repair) copies the
//!   stripe into k fresh shard buffers and allocates the parity; its `decode` (every
//!   read) takes owned shards, allocates the lost ones and copies the stripe out.
//! - **Codec::encode_parity**: what a push calls: parity only, from data shards the
//!   caller keeps (slices of the stripe here), into freshly allocated parity.
//! - **rse raw**: `reed-solomon-erasure` (simd-accel) on preallocated buffers, no
//!   copies: data shards are slices of the stripe, parity and lost shards are
//!   written in place. The gap to Codec is Codec's copying and allocation.
//! - **rse blocked**: the same calls made once per column block of every shard
//!   (Reed-Solomon is column-wise, so the bytes are identical), which keeps the
//!   block of all k+m shards in L2 instead of streaming whole shards k×m times.
//! - **Codec API, blocked (sketch)**: `sketch_encode`/`sketch_decode` below, what
//!   `Codec::encode`/`decode` could do behind the same signatures: block by block,
//!   copying each block in while it is still in cache.
//! - **rs-simd**: `reed-solomon-simd` (Leopard-style, GF(2^16)), one encoder or decoder
//!   per thread, reused; its shards live in the coder's work area, so the parity (or
//!   the restored shards) are copied out into the stripe's buffers, as a store must.
//!
//! Throughput is data (stripe) bytes over wall time, threads started and joined
//! inside the clock; with two threads each takes half of the stripes. Every case
//! runs once untimed and its output is checked against the original bytes (or the
//! reference parity) before the timed repetitions, which are interleaved across
//! cases so machine noise falls on all alike; the table shows the median.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aigrid_store::codec::{Codec, Params};
use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use rand::{RngCore, SeedableRng};
use reed_solomon_erasure::galois_8::ReedSolomon;
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

// The `aigrid` binary, where the Codec runs in production, allocates with mimalloc;
// Codec's per-stripe allocations should cost here what they cost there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Bytes a lost shard is overwritten with before a checked run, so that a
/// reconstruction that writes nothing cannot pass.
const POISON: u8 = 0xA5;

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
        default_value = "memcpy,codec,codec-parity,rse-raw,rse-blocked,codec-blocked,simd"
    )]
    imps: Vec<Imp>,
    /// Thread counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Seed of the random stripe bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Who does the work in a column of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Imp {
    Memcpy,
    Codec,
    CodecParity,
    RseRaw,
    RseBlocked,
    CodecBlocked,
    Simd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Encode,
    Reconstruct,
}

/// The bytes every case of one (code, shard size) works on.
struct Workload {
    k: usize,
    m: usize,
    shard: usize,
    /// The stripes, k × shard bytes each, random.
    stripes: Vec<Vec<u8>>,
    /// reed-solomon-erasure's m parity shards of each stripe.
    parity: Vec<Vec<Vec<u8>>>,
    /// reed-solomon-simd's m recovery shards of each stripe (a different code).
    simd_parity: Vec<Vec<Vec<u8>>>,
}

impl Workload {
    fn new(k: usize, m: usize, shard: usize, total: usize, seed: u64) -> Result<Self> {
        let stripe_len = k * shard;
        // An even count, so two threads get equal halves.
        let n = total.div_ceil(stripe_len).max(2).next_multiple_of(2);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let stripes: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                let mut s = vec![0u8; stripe_len];
                rng.fill_bytes(&mut s);
                s
            })
            .collect();
        let rs = ReedSolomon::new(k, m).context("reed-solomon-erasure parameters")?;
        let parity = stripes
            .iter()
            .map(|s| {
                let mut p = vec![vec![0u8; shard]; m];
                let data: Vec<&[u8]> = s.chunks(shard).collect();
                rs.encode_sep(&data, &mut p).map(|()| p)
            })
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("reference encode: {e:?}"))?;
        let simd_parity = stripes
            .iter()
            .map(|s| reed_solomon_simd::encode(k, m, s.chunks(shard)))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("reference simd encode: {e}"))?;
        Ok(Workload {
            k,
            m,
            shard,
            stripes,
            parity,
            simd_parity,
        })
    }

    fn data_bytes(&self) -> usize {
        self.stripes.len() * self.k * self.shard
    }

    /// Stripe `i`'s shards, owned as a fetch hands them over, with the first m data
    /// shards lost. Made outside the clock.
    fn owned_shards(&self, i: usize) -> Vec<Option<Vec<u8>>> {
        let data = self.stripes[i].chunks(self.shard).map(<[u8]>::to_vec);
        let parity = self.parity[i].iter().cloned();
        data.chain(parity)
            .enumerate()
            .map(|(j, s)| (j >= self.m).then_some(s))
            .collect()
    }

    /// Stripe `i` with its first m data shards (the lost ones) poisoned: the starting
    /// point of an in-place reconstruction.
    fn damaged(&self, i: usize) -> Vec<u8> {
        let mut out = self.stripes[i].clone();
        out[..self.m * self.shard].fill(POISON);
        out
    }
}

/// Runs `work` on every item, the items split into one contiguous range per state
/// (one thread each when there are several), and answers the wall time, thread
/// start and join included.
fn run_split<T: Send, S: Send>(
    items: &mut [T],
    states: &mut [S],
    work: impl Fn(&mut S, usize, &mut T) + Sync,
) -> Duration {
    let per = items.len().div_ceil(states.len());
    let start = Instant::now();
    if let [state] = states {
        for (i, item) in items.iter_mut().enumerate() {
            work(state, i, item);
        }
    } else {
        let work = &work;
        std::thread::scope(|s| {
            for (t, (chunk, state)) in items.chunks_mut(per).zip(states.iter_mut()).enumerate() {
                s.spawn(move || {
                    for (j, item) in chunk.iter_mut().enumerate() {
                        work(state, t * per + j, item);
                    }
                });
            }
        });
    }
    start.elapsed()
}

/// `encode_sep` over column blocks of `block` bytes (the whole shard when `block`
/// is at least the shard): the same parity, computed with a working set of
/// (k+m) × block bytes instead of (k+m) whole shards.
fn rse_encode(rs: &ReedSolomon, data: &[&[u8]], parity: &mut [Vec<u8>], block: usize) {
    let len = data[0].len();
    for off in (0..len).step_by(block) {
        let end = (off + block).min(len);
        let d: Vec<&[u8]> = data.iter().map(|s| &s[off..end]).collect();
        let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|s| &mut s[off..end]).collect();
        rs.encode_sep(&d, &mut p)
            .expect("equal, non-empty shards always encode");
    }
}

/// `reconstruct_data` in place over column blocks of `block` bytes: the lost data
/// shards (`present` false) are slices of the output stripe and are written there.
fn rse_reconstruct(rs: &ReedSolomon, shards: &mut [(&mut [u8], bool)], block: usize) {
    let len = shards[0].0.len();
    for off in (0..len).step_by(block) {
        let end = (off + block).min(len);
        let mut sub: Vec<(&mut [u8], bool)> = shards
            .iter_mut()
            .map(|(s, present)| (&mut s[off..end], *present))
            .collect();
        rs.reconstruct_data(&mut sub)
            .expect("k shards present always reconstruct");
    }
}

/// What `Codec::encode` could do with the same signature: fill each shard block by
/// block and encode each block while it is still in cache, instead of copying whole
/// shards first and then streaming them k × m times through the coder.
fn sketch_encode(rs: &ReedSolomon, k: usize, stripe: &[u8], block: usize) -> Vec<Vec<u8>> {
    let m = rs.parity_shard_count();
    let shard_len = stripe.len().div_ceil(k).max(1);
    let mut shards: Vec<Vec<u8>> = (0..k + m).map(|_| Vec::with_capacity(shard_len)).collect();
    for off in (0..shard_len).step_by(block) {
        let end = (off + block).min(shard_len);
        for (j, shard) in shards.iter_mut().enumerate() {
            if j < k {
                let from = (j * shard_len + off).min(stripe.len());
                let to = (j * shard_len + end).min(stripe.len());
                shard.extend_from_slice(&stripe[from..to]);
            }
            // The stripe's tail padding, and the parity block about to be written.
            shard.resize(end, 0);
        }
        let (data, parity) = shards.split_at_mut(k);
        let d: Vec<&[u8]> = data.iter().map(|s| &s[off..end]).collect();
        let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|s| &mut s[off..end]).collect();
        rs.encode_sep(&d, &mut p)
            .expect("equal, non-empty shards always encode");
    }
    shards
}

/// What `Codec::decode` could do with the same signature: one output buffer, each
/// block of the surviving data shards copied into it and the lost ones rebuilt
/// straight into it while that block is in cache; no buffers for lost shards.
fn sketch_decode(
    rs: &ReedSolomon,
    k: usize,
    mut shards: Vec<Option<Vec<u8>>>,
    len: usize,
    block: usize,
) -> Vec<u8> {
    let shard_len = len.div_ceil(k).max(1);
    let mut out = vec![0u8; k * shard_len];
    let present: Vec<bool> = shards.iter().map(Option::is_some).collect();
    for off in (0..shard_len).step_by(block) {
        let end = (off + block).min(shard_len);
        let mut sub: Vec<(&mut [u8], bool)> = Vec::with_capacity(shards.len());
        for (j, dst) in out.chunks_mut(shard_len).enumerate() {
            let dst = &mut dst[off..end];
            if let Some(src) = &shards[j] {
                dst.copy_from_slice(&src[off..end]);
            }
            sub.push((dst, present[j]));
        }
        for shard in &mut shards[k..] {
            match shard {
                Some(p) => sub.push((&mut p[off..end], true)),
                None => sub.push((&mut [][..], false)),
            }
        }
        if present[..k].iter().any(|p| !p) {
            rs.reconstruct_data(&mut sub)
                .expect("k shards present always reconstruct");
        }
    }
    out.truncate(len);
    out
}

/// One cell of the table: runs once (`check` true: untimed, output compared with the
/// original) or timed, answering the wall time.
type Runner<'a> = Box<dyn FnMut(bool) -> Result<Duration> + 'a>;

/// Whether `shards` are stripe `i`'s data shards followed by its parity.
fn encoded_ok(w: &Workload, i: usize, shards: &[Vec<u8>]) -> bool {
    shards.len() == w.k + w.m
        && w.stripes[i]
            .chunks(w.shard)
            .chain(w.parity[i].iter().map(Vec::as_slice))
            .zip(shards)
            .all(|(want, got)| want == got.as_slice())
}

/// Fails when `failures` counted any wrong output in a checked run.
fn checked(failures: &AtomicUsize, what: &str) -> Result<()> {
    let n = failures.swap(0, Ordering::Relaxed);
    ensure!(n == 0, "{what}: {n} stripes came out wrong");
    Ok(())
}

fn memcpy_case(w: &Workload, threads: usize) -> Runner<'_> {
    let mut dst: Vec<Vec<u8>> = w.stripes.iter().map(|s| vec![0x5A; s.len()]).collect();
    let mut states = vec![(); threads];
    Box::new(move |check| {
        let t = run_split(&mut dst, &mut states, |_, i, d| {
            d.copy_from_slice(&w.stripes[i])
        });
        if check {
            ensure!(dst == w.stripes, "memcpy copied wrong bytes");
            dst.iter_mut().for_each(|d| d.fill(0x5A));
        }
        Ok(t)
    })
}

fn codec_encode_case<'a>(w: &'a Workload, codec: &'a Codec, threads: usize) -> Runner<'a> {
    let mut items = vec![(); w.stripes.len()];
    let mut states = vec![(); threads];
    let failures = AtomicUsize::new(0);
    Box::new(move |check| {
        let t = run_split(&mut items, &mut states, |_, i, _| {
            let shards = codec.encode(&w.stripes[i]);
            if check && !encoded_ok(w, i, &shards) {
                failures.fetch_add(1, Ordering::Relaxed);
            }
            // Dropped here, as the store drops a stripe's shards once written.
            drop(black_box(shards));
        });
        checked(&failures, "Codec::encode")?;
        Ok(t)
    })
}

fn codec_parity_case<'a>(w: &'a Workload, codec: &'a Codec, threads: usize) -> Runner<'a> {
    let mut items = vec![(); w.stripes.len()];
    let mut states = vec![(); threads];
    let failures = AtomicUsize::new(0);
    Box::new(move |check| {
        let t = run_split(&mut items, &mut states, |_, i, _| {
            let data: Vec<&[u8]> = w.stripes[i].chunks(w.shard).collect();
            let parity = codec.encode_parity(&data).expect("k equal shards encode");
            if check && parity != w.parity[i] {
                failures.fetch_add(1, Ordering::Relaxed);
            }
            drop(black_box(parity));
        });
        checked(&failures, "Codec::encode_parity")?;
        Ok(t)
    })
}

fn codec_decode_case<'a>(w: &'a Workload, codec: &'a Codec, threads: usize) -> Runner<'a> {
    let mut items: Vec<Option<Vec<Option<Vec<u8>>>>> = vec![None; w.stripes.len()];
    let mut states = vec![(); threads];
    let failures = AtomicUsize::new(0);
    Box::new(move |check| {
        for (i, item) in items.iter_mut().enumerate() {
            *item = Some(w.owned_shards(i));
        }
        let len = w.k * w.shard;
        let t = run_split(&mut items, &mut states, |_, i, item| {
            let shards = item.take().expect("prepared");
            let out = codec.decode(shards, len).expect("k shards present decode");
            if check && out != w.stripes[i] {
                failures.fetch_add(1, Ordering::Relaxed);
            }
            drop(black_box(out));
        });
        checked(&failures, "Codec::decode")?;
        Ok(t)
    })
}

fn sketch_encode_case<'a>(
    w: &'a Workload,
    rs: &'a ReedSolomon,
    threads: usize,
    block: usize,
) -> Runner<'a> {
    let mut items = vec![(); w.stripes.len()];
    let mut states = vec![(); threads];
    let failures = AtomicUsize::new(0);
    Box::new(move |check| {
        let t = run_split(&mut items, &mut states, |_, i, _| {
            let shards = sketch_encode(rs, w.k, &w.stripes[i], block);
            if check && !encoded_ok(w, i, &shards) {
                failures.fetch_add(1, Ordering::Relaxed);
            }
            drop(black_box(shards));
        });
        checked(&failures, "blocked encode sketch")?;
        Ok(t)
    })
}

fn sketch_decode_case<'a>(
    w: &'a Workload,
    rs: &'a ReedSolomon,
    threads: usize,
    block: usize,
) -> Runner<'a> {
    let mut items: Vec<Option<Vec<Option<Vec<u8>>>>> = vec![None; w.stripes.len()];
    let mut states = vec![(); threads];
    let failures = AtomicUsize::new(0);
    Box::new(move |check| {
        for (i, item) in items.iter_mut().enumerate() {
            *item = Some(w.owned_shards(i));
        }
        let len = w.k * w.shard;
        let t = run_split(&mut items, &mut states, |_, i, item| {
            let shards = item.take().expect("prepared");
            let out = sketch_decode(rs, w.k, shards, len, block);
            if check && out != w.stripes[i] {
                failures.fetch_add(1, Ordering::Relaxed);
            }
            drop(black_box(out));
        });
        checked(&failures, "blocked decode sketch")?;
        Ok(t)
    })
}

fn rse_encode_case<'a>(
    w: &'a Workload,
    rs: &'a ReedSolomon,
    threads: usize,
    block: usize,
) -> Runner<'a> {
    let mut parity: Vec<Vec<Vec<u8>>> = vec![vec![vec![0x5A; w.shard]; w.m]; w.stripes.len()];
    let mut states = vec![(); threads];
    Box::new(move |check| {
        let t = run_split(&mut parity, &mut states, |_, i, p| {
            let data: Vec<&[u8]> = w.stripes[i].chunks(w.shard).collect();
            rse_encode(rs, &data, p, block);
        });
        if check {
            ensure!(parity == w.parity, "reed-solomon-erasure parity differs");
            parity.iter_mut().flatten().for_each(|p| p.fill(0x5A));
        }
        Ok(t)
    })
}

fn rse_reconstruct_case<'a>(
    w: &'a Workload,
    rs: &'a ReedSolomon,
    threads: usize,
    block: usize,
) -> Runner<'a> {
    // The output stripe with the surviving data shards already in place (as if
    // fetched straight into it), and the stripe's parity shards.
    let mut items: Vec<(Vec<u8>, Vec<Vec<u8>>)> = (0..w.stripes.len())
        .map(|i| (w.damaged(i), w.parity[i].clone()))
        .collect();
    let mut states = vec![(); threads];
    Box::new(move |check| {
        let t = run_split(&mut items, &mut states, |_, _, (out, parity)| {
            let mut shards: Vec<(&mut [u8], bool)> = out
                .chunks_mut(w.shard)
                .enumerate()
                .map(|(j, s)| (s, j >= w.m))
                .chain(parity.iter_mut().map(|p| (p.as_mut_slice(), true)))
                .collect();
            rse_reconstruct(rs, &mut shards, block);
        });
        if check {
            let ok = items.iter().zip(&w.stripes).all(|((out, _), s)| out == s);
            ensure!(ok, "reed-solomon-erasure rebuilt wrong bytes");
            for (i, (out, _)) in items.iter_mut().enumerate() {
                *out = w.damaged(i);
            }
        }
        Ok(t)
    })
}

fn simd_encode_case(w: &Workload, threads: usize) -> Result<Runner<'_>> {
    let mut parity: Vec<Vec<Vec<u8>>> = vec![vec![vec![0x5A; w.shard]; w.m]; w.stripes.len()];
    let mut states = (0..threads)
        .map(|_| ReedSolomonEncoder::new(w.k, w.m, w.shard))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("reed-solomon-simd encoder: {e}"))?;
    Ok(Box::new(move |check| {
        let t = run_split(&mut parity, &mut states, |enc, i, p| {
            for s in w.stripes[i].chunks(w.shard) {
                enc.add_original_shard(s).expect("k shards of shard bytes");
            }
            let result = enc.encode().expect("k shards added");
            for (dst, src) in p.iter_mut().zip(result.recovery_iter()) {
                dst.copy_from_slice(src);
            }
        });
        if check {
            ensure!(parity == w.simd_parity, "reed-solomon-simd parity differs");
            parity.iter_mut().flatten().for_each(|p| p.fill(0x5A));
        }
        Ok(t)
    }))
}

fn simd_reconstruct_case(w: &Workload, threads: usize) -> Result<Runner<'_>> {
    let mut out: Vec<Vec<u8>> = (0..w.stripes.len()).map(|i| w.damaged(i)).collect();
    let mut states = (0..threads)
        .map(|_| ReedSolomonDecoder::new(w.k, w.m, w.shard))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("reed-solomon-simd decoder: {e}"))?;
    Ok(Box::new(move |check| {
        let t = run_split(&mut out, &mut states, |dec, i, stripe| {
            for (j, s) in stripe.chunks(w.shard).enumerate().skip(w.m) {
                dec.add_original_shard(j, s)
                    .expect("a surviving data shard");
            }
            for (j, p) in w.simd_parity[i].iter().enumerate() {
                dec.add_recovery_shard(j, p).expect("a recovery shard");
            }
            let result = dec.decode().expect("k shards present");
            for (j, s) in result.restored_original_iter() {
                stripe[j * w.shard..(j + 1) * w.shard].copy_from_slice(s);
            }
        });
        if check {
            ensure!(out == w.stripes, "reed-solomon-simd rebuilt wrong bytes");
            for (i, o) in out.iter_mut().enumerate() {
                *o = w.damaged(i);
            }
        }
        Ok(t)
    }))
}

/// Clock ticks the whole machine spent busy and in all, and this process's own CPU
/// time, from `/proc`: the difference over a run says how much of the machine other
/// processes took meanwhile, which on a shared machine decides whether a run counts.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    busy: u64,
    total: u64,
    own: u64,
}

impl CpuSample {
    fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        // user nice system idle iowait irq softirq steal
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let total: u64 = ticks.iter().sum();
        let idle = ticks.get(3)? + ticks.get(4)?;
        let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // After the command name: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = own_stat.rsplit_once(')')?.1.split_whitespace().collect();
        let own = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(CpuSample {
            busy: total - idle,
            total,
            own,
        })
    }

    /// The share of all cores that other processes used since `self`.
    fn others_since(self, now: CpuSample) -> Option<f64> {
        let total = now.total.checked_sub(self.total).filter(|&t| t > 0)?;
        let busy = now.busy.saturating_sub(self.busy);
        let own = now.own.saturating_sub(self.own);
        Some(busy.saturating_sub(own) as f64 / total as f64)
    }
}

/// One measured cell.
struct Cell {
    op: Op,
    threads: usize,
    imp: Imp,
    /// GB/s of data bytes, one per timed repetition.
    samples: Vec<f64>,
}

/// The cells of one (code, shard size).
struct Group {
    k: usize,
    m: usize,
    shard: usize,
    stripes: usize,
    cells: Vec<Cell>,
    /// Share of the machine other processes used during the timed repetitions.
    others: Option<f64>,
}

impl Group {
    fn cell(&self, op: Op, threads: usize, imp: Imp) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.op == op && c.threads == threads && c.imp == imp)
    }
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
                    (Imp::Codec, Op::Reconstruct) => codec_decode_case(&w, &codec, threads),
                    (Imp::CodecParity, Op::Encode) => codec_parity_case(&w, &codec, threads),
                    (Imp::RseRaw, Op::Encode) => rse_encode_case(&w, &rs, threads, shard),
                    (Imp::RseRaw, Op::Reconstruct) => rse_reconstruct_case(&w, &rs, threads, shard),
                    (Imp::RseBlocked, Op::Encode) => rse_encode_case(&w, &rs, threads, block),
                    (Imp::RseBlocked, Op::Reconstruct) => {
                        rse_reconstruct_case(&w, &rs, threads, block)
                    }
                    (Imp::CodecBlocked, Op::Encode) => sketch_encode_case(&w, &rs, threads, block),
                    (Imp::CodecBlocked, Op::Reconstruct) => {
                        sketch_decode_case(&w, &rs, threads, block)
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

fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn range(samples: &[f64]) -> (f64, f64) {
    let lo = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn imp_name(imp: Imp, block_kib: usize) -> String {
    match imp {
        Imp::Memcpy => "memcpy".into(),
        Imp::Codec => "Codec (rse)".into(),
        Imp::CodecParity => "Codec::encode_parity".into(),
        Imp::RseRaw => "rse raw".into(),
        Imp::RseBlocked => format!("rse raw, {block_kib} KiB blocks"),
        Imp::CodecBlocked => "Codec API, blocked (sketch)".into(),
        Imp::Simd => "rs-simd".into(),
    }
}

fn print_table(args: &Args, groups: &[Group], cell_text: impl Fn(&Cell) -> String) {
    let names: Vec<String> = args
        .imps
        .iter()
        .map(|&i| imp_name(i, args.block_kib))
        .collect();
    println!(
        "| code | shard | operation | threads | {} |",
        names.join(" | ")
    );
    println!("|:--|--:|:--|--:|{}", "--:|".repeat(args.imps.len()));
    for g in groups {
        for op in [Op::Encode, Op::Reconstruct] {
            for &threads in &args.threads {
                let cells: Vec<String> = args
                    .imps
                    .iter()
                    .map(|&imp| g.cell(op, threads, imp).map_or("-".into(), &cell_text))
                    .collect();
                let op_name = match op {
                    Op::Encode => "encode".to_string(),
                    Op::Reconstruct => format!("reconstruct, {} data lost", g.m),
                };
                println!(
                    "| {}+{} | {} KiB | {op_name} | {threads} | {} |",
                    g.k,
                    g.m,
                    g.shard >> 10,
                    cells.join(" | ")
                );
            }
        }
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn simd_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut f = Vec::new();
        if is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if is_x86_feature_detected!("avx512bw") {
            f.push("avx512bw");
        }
        if is_x86_feature_detected!("gfni") {
            f.push("gfni");
        }
        f.join(", ")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

/// The targets: 10+4 on the most threads, for Codec and each alternative.
fn print_targets(args: &Args, groups: &[Group]) {
    const ENCODE: f64 = 4.0;
    const RECONSTRUCT: f64 = 3.0;
    let Some(&threads) = args.threads.iter().max() else {
        return;
    };
    println!(
        "Targets, 10+4 on {threads} threads: encode >= {ENCODE} GB/s, reconstruct >= {RECONSTRUCT} GB/s (data bytes; median, best of the repetitions in brackets)."
    );
    let verdict = |c: Option<&Cell>, target: f64| {
        c.map_or("-".to_string(), |c| {
            let (v, best) = (median(&c.samples), range(&c.samples).1);
            let word = if v >= target { "met" } else { "MISSED" };
            format!("{v:.2} {word} (best {best:.2})")
        })
    };
    for g in groups.iter().filter(|g| (g.k, g.m) == (10, 4)) {
        println!();
        println!(
            "| 10+4, shard {} KiB, {threads} threads | encode | reconstruct |",
            g.shard >> 10
        );
        println!("|:--|:--|:--|");
        for &imp in args.imps.iter().filter(|&&i| i != Imp::Memcpy) {
            println!(
                "| {} | {} | {} |",
                imp_name(imp, args.block_kib),
                verdict(g.cell(Op::Encode, threads, imp), ENCODE),
                verdict(g.cell(Op::Reconstruct, threads, imp), RECONSTRUCT)
            );
        }
    }
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
    print_table(&args, &groups, |c| format!("{:.2}", median(&c.samples)));
    println!();
    println!("Spread over the repetitions (min-max GB/s):");
    println!();
    print_table(&args, &groups, |c| {
        let (lo, hi) = range(&c.samples);
        format!("{lo:.2}-{hi:.2}")
    });
    println!();
    print_targets(&args, &groups);
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::{RngCore, SeedableRng};

    use super::*;

    /// The blocked sketches answer exactly what Codec answers, for stripes that do
    /// not divide into k shards or into blocks.
    #[test]
    fn blocked_sketches_match_codec() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        for (k, m) in [(4, 2), (10, 4)] {
            let codec = Codec::new(Params { k, m }).unwrap();
            let rs = ReedSolomon::new(k, m).unwrap();
            for len in [0usize, 1, 7, 4097, 100_003] {
                let mut stripe = vec![0u8; len];
                rng.fill_bytes(&mut stripe);
                for block in [3, 64, 1 << 16] {
                    let shards = sketch_encode(&rs, k, &stripe, block);
                    assert_eq!(
                        shards,
                        codec.encode(&stripe),
                        "{k}+{m} len {len} block {block}"
                    );
                    let mut have: Vec<Option<Vec<u8>>> = shards.into_iter().map(Some).collect();
                    for lost in have.iter_mut().take(m) {
                        *lost = None;
                    }
                    assert_eq!(sketch_decode(&rs, k, have, len, block), stripe);
                }
            }
        }
    }
}
