//! One runner per cell of the table: each column's way of encoding or
//! reconstructing every stripe of a workload, checked once against the original
//! bytes, then timed.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aigrid_store::codec::Codec;
use anyhow::{ensure, Result};
use bytes::Bytes;
use reed_solomon_erasure::galois_8::ReedSolomon;
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

use crate::kernels::{rse_encode, rse_reconstruct};
use crate::workload::{run_split, Workload};

/// One cell of the table: runs once (`check` true: untimed, output compared with the
/// original) or timed, answering the wall time.
pub(crate) type Runner<'a> = Box<dyn FnMut(bool) -> Result<Duration> + 'a>;

/// Whether `shards` are stripe `i`'s data shards followed by its parity.
pub(crate) fn encoded_ok(w: &Workload, i: usize, shards: &[Vec<u8>]) -> bool {
    shards.len() == w.k + w.m
        && w.stripes[i]
            .chunks(w.shard)
            .chain(w.parity[i].iter().map(Vec::as_slice))
            .zip(shards)
            .all(|(want, got)| want == got.as_slice())
}

/// Fails when `failures` counted any wrong output in a checked run.
pub(crate) fn checked(failures: &AtomicUsize, what: &str) -> Result<()> {
    let n = failures.swap(0, Ordering::Relaxed);
    ensure!(n == 0, "{what}: {n} stripes came out wrong");
    Ok(())
}

pub(crate) fn memcpy_case(w: &Workload, threads: usize) -> Runner<'_> {
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

pub(crate) fn codec_encode_case<'a>(
    w: &'a Workload,
    codec: &'a Codec,
    threads: usize,
) -> Runner<'a> {
    // Each stripe handed over whole and owned, as a repair hands over the stripe
    // it rebuilt; made outside the clock.
    let mut items: Vec<Option<Bytes>> = vec![None; w.stripes.len()];
    let mut states = vec![(); threads];
    let failures = AtomicUsize::new(0);
    Box::new(move |check| {
        for (i, item) in items.iter_mut().enumerate() {
            *item = Some(Bytes::from(w.stripes[i].clone()));
        }
        let t = run_split(&mut items, &mut states, |_, i, item| {
            let stripe = item.take().expect("prepared");
            let shards = codec.code_stripe(vec![stripe]).expect("a stripe codes");
            if check {
                let owned: Vec<Vec<u8>> = shards.iter().map(|s| s.to_vec()).collect();
                if !encoded_ok(w, i, &owned) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Dropped here, as the store drops a stripe's shards once written.
            drop(black_box(shards));
        });
        checked(&failures, "Codec::code_stripe")?;
        Ok(t)
    })
}

pub(crate) fn codec_parity_case<'a>(
    w: &'a Workload,
    codec: &'a Codec,
    threads: usize,
) -> Runner<'a> {
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

/// A read's rebuild: the stripe's room with the surviving data shards in place (a
/// reader fetches them straight there) and the parity shards it fetched;
/// `Codec::rebuild` writes the lost data shards.
pub(crate) fn codec_rebuild_case<'a>(
    w: &'a Workload,
    codec: &'a Codec,
    threads: usize,
) -> Runner<'a> {
    // Each stripe's room and the parity shards fetched.
    type Item = (Vec<u8>, Vec<Option<Vec<u8>>>);
    let mut items: Vec<Item> = (0..w.stripes.len())
        .map(|i| {
            (
                w.damaged(i),
                w.parity[i].iter().cloned().map(Some).collect(),
            )
        })
        .collect();
    let present: Vec<bool> = (0..w.k).map(|j| j >= w.m).collect();
    let mut states = vec![(); threads];
    Box::new(move |check| {
        let t = run_split(&mut items, &mut states, |_, _, (room, parity)| {
            codec
                .rebuild(room, &present, parity)
                .expect("k shards present rebuild");
        });
        if check {
            let ok = items.iter().zip(&w.stripes).all(|((room, _), s)| room == s);
            ensure!(ok, "Codec::rebuild rebuilt wrong bytes");
            for (i, (room, _)) in items.iter_mut().enumerate() {
                *room = w.damaged(i);
            }
        }
        Ok(t)
    })
}

pub(crate) fn rse_encode_case<'a>(
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

pub(crate) fn rse_reconstruct_case<'a>(
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

pub(crate) fn simd_encode_case(w: &Workload, threads: usize) -> Result<Runner<'_>> {
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

pub(crate) fn simd_reconstruct_case(w: &Workload, threads: usize) -> Result<Runner<'_>> {
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
