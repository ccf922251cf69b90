//! The bytes every case of one (code, shard size) works on, the columns and
//! operations of the table, and how work is split over threads inside the clock.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::{RngCore, SeedableRng};
use reed_solomon_erasure::galois_8::ReedSolomon;

/// Bytes a lost shard is overwritten with before a checked run, so that a
/// reconstruction that writes nothing cannot pass.
pub(crate) const POISON: u8 = 0xA5;

/// Who does the work in a column of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Imp {
    Memcpy,
    Codec,
    CodecParity,
    RseRaw,
    RseBlocked,
    Simd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Encode,
    Reconstruct,
}

/// The bytes every case of one (code, shard size) works on.
pub(crate) struct Workload {
    pub(crate) k: usize,
    pub(crate) m: usize,
    pub(crate) shard: usize,
    /// The stripes, k × shard bytes each, random.
    pub(crate) stripes: Vec<Vec<u8>>,
    /// reed-solomon-erasure's m parity shards of each stripe.
    pub(crate) parity: Vec<Vec<Vec<u8>>>,
    /// reed-solomon-simd's m recovery shards of each stripe (a different code).
    pub(crate) simd_parity: Vec<Vec<Vec<u8>>>,
}

impl Workload {
    pub(crate) fn new(k: usize, m: usize, shard: usize, total: usize, seed: u64) -> Result<Self> {
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

    pub(crate) fn data_bytes(&self) -> usize {
        self.stripes.len() * self.k * self.shard
    }

    /// Stripe `i` with its first m data shards (the lost ones) poisoned: the starting
    /// point of an in-place reconstruction.
    pub(crate) fn damaged(&self, i: usize) -> Vec<u8> {
        let mut out = self.stripes[i].clone();
        out[..self.m * self.shard].fill(POISON);
        out
    }
}

/// Runs `work` on every item, the items split into one contiguous range per state
/// (one thread each when there are several), and answers the wall time, thread
/// start and join included.
pub(crate) fn run_split<T: Send, S: Send>(
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
