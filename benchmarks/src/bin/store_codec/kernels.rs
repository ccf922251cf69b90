//! The coding kernels measured beside the store's `Codec`: reed-solomon-erasure
//! over column blocks, and the blocked sketch of what `Codec::encode`/`decode` could
//! do behind the same signatures.

use reed_solomon_erasure::galois_8::ReedSolomon;

/// `encode_sep` over column blocks of `block` bytes (the whole shard when `block`
/// is at least the shard): the same parity, computed with a working set of
/// (k+m) × block bytes instead of (k+m) whole shards.
pub(crate) fn rse_encode(rs: &ReedSolomon, data: &[&[u8]], parity: &mut [Vec<u8>], block: usize) {
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
pub(crate) fn rse_reconstruct(rs: &ReedSolomon, shards: &mut [(&mut [u8], bool)], block: usize) {
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
pub(crate) fn sketch_encode(
    rs: &ReedSolomon,
    k: usize,
    stripe: &[u8],
    block: usize,
) -> Vec<Vec<u8>> {
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
pub(crate) fn sketch_decode(
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

#[cfg(test)]
mod tests {
    use aigrid_store::codec::{Codec, Params};
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
