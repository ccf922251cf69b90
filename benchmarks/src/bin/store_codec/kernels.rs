//! The coding kernels measured beside the store's `Codec`: reed-solomon-erasure
//! over column blocks, on the caller's thread.

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
