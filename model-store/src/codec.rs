//! Reed-Solomon stripes over GF(2^8), through `reed-solomon-erasure` (SIMD-accelerated).
//! A stripe of `len` bytes is padded to k equal data shards and encoded into m parity
//! shards; any k of the k+m rebuild the stripe.
//!
//! Every path (a push's parity, a repair's re-encode, a reader's rebuild) codes in
//! column blocks: block i of every shard is coded while it is in one core's cache,
//! and the blocks are spread over the machine's cores by a pool of the codec's own
//! (apart from the pool inference uses), so one stripe is coded on every core.
//!
//! Parity is written into buffers the codec takes back when the shards made from
//! them drop ([`Spare`]): a push or a repair codes stripe after stripe, and each
//! stripe's parity then lands in memory already mapped instead of fresh pages the
//! kernel must fault in and zero.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use rayon::prelude::*;
use reed_solomon_erasure::galois_8::ReedSolomon;
use serde::{Deserialize, Serialize};

pub use aigrid_api::manifest::{params_in_range, CODEC_NAME, MAX_SHARDS};

/// Bytes of each shard coded at once: small enough that a block of every shard stays
/// in a core's cache (measured 2x faster than whole 4 MiB shards, see
/// `benchmarks/store`).
const BLOCK: usize = 64 << 10;

/// The codec's threads, one per core: blocks of one stripe are coded in parallel
/// here, never on the global pool that model inference keeps busy.
fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("aigrid-codec-{i}"))
            .build()
            .expect("the codec's threads start")
    })
}

/// `f` over the column blocks, in parallel on the codec's pool where there are
/// several: each block holds its slice of every shard, in shard order.
fn each_block<T, F>(blocks: Vec<T>, f: F) -> Result<(), CodecError>
where
    T: Send,
    F: Fn(T) -> Result<(), CodecError> + Send + Sync,
{
    if blocks.len() <= 1 {
        return blocks.into_iter().try_for_each(f);
    }
    pool().install(|| blocks.into_par_iter().try_for_each(f))
}

/// Shards cut into column blocks and regrouped by block: entry i holds block i of
/// every shard, in shard order.
fn by_block<S: BlockSlice>(shards: impl Iterator<Item = S>, blocks: usize) -> Vec<Vec<S>> {
    let mut out: Vec<Vec<S>> = (0..blocks).map(|_| Vec::new()).collect();
    for shard in shards {
        for (i, block) in shard.blocks().enumerate() {
            out[i].push(block);
        }
    }
    out
}

/// A shard's slice that can be cut into column blocks.
trait BlockSlice: Sized {
    fn blocks(self) -> impl Iterator<Item = Self>;
}

impl BlockSlice for &[u8] {
    fn blocks(self) -> impl Iterator<Item = Self> {
        self.chunks(BLOCK)
    }
}

impl BlockSlice for &mut [u8] {
    fn blocks(self) -> impl Iterator<Item = Self> {
        self.chunks_mut(BLOCK)
    }
}

fn coding_error(e: reed_solomon_erasure::Error) -> CodecError {
    CodecError::Malformed(e.to_string())
}

/// Why a stripe could not be encoded or rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// k or m is out of range.
    #[error("invalid erasure code {k}+{m}: k must be at least 1, m at least 1, k+m at most {MAX_SHARDS}")]
    Parameters {
        /// Data shards.
        k: usize,
        /// Parity shards.
        m: usize,
    },
    /// Fewer than k shards survive.
    #[error("only {have} of {k} needed shards are available")]
    TooFewShards {
        /// Shards present.
        have: usize,
        /// Shards needed.
        k: usize,
    },
    /// The shards given do not fit the stripe (wrong count or unequal sizes).
    #[error("malformed stripe: {0}")]
    Malformed(String),
}

/// An erasure code of k data and m parity shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    /// Data shards per stripe.
    pub k: usize,
    /// Parity shards per stripe.
    pub m: usize,
}

/// Most bytes of parity buffers a codec keeps for its next stripes: two stripes'
/// parity of the widest code over 4 MiB chunks with room to spare, so a push's
/// steady flow of stripes never allocates parity, and an idle codec holds little.
const SPARE_BYTES: usize = 64 << 20;

/// Parity buffers waiting to be written over. Measured on a 2-core AVX2 machine
/// (`benchmarks/store`, 10+4 over 4 MiB shards, two callers): with a fresh zeroed
/// buffer per parity shard, a sixth of the time went to the kernel clearing new
/// pages and a twelfth to zeroing bytes the coder overwrites anyway.
#[derive(Default)]
struct Spare {
    bufs: parking_lot::Mutex<Vec<Vec<u8>>>,
}

impl Spare {
    /// A buffer of `len` bytes, reused where one is kept. Its bytes are whatever
    /// the last stripe left there: the coder writes every one of them.
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = self.bufs.lock().pop();
        match reused {
            Some(mut buf) if buf.capacity() >= len => {
                buf.resize(len, 0);
                buf
            }
            _ => vec![0; len],
        }
    }

    /// Keeps `buf` for a later stripe unless the spare room is full.
    fn give(&self, buf: Vec<u8>) {
        let mut bufs = self.bufs.lock();
        let held: usize = bufs.iter().map(Vec::capacity).sum();
        if held + buf.capacity() <= SPARE_BYTES {
            bufs.push(buf);
        }
    }
}

/// A parity shard's bytes; they go back to their codec's spare room on drop.
struct ParityBuf {
    buf: Vec<u8>,
    spare: Arc<Spare>,
}

impl AsRef<[u8]> for ParityBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for ParityBuf {
    fn drop(&mut self) {
        self.spare.give(std::mem::take(&mut self.buf));
    }
}

/// A ready encoder/decoder for one (k, m).
pub struct Codec {
    params: Params,
    rs: ReedSolomon,
    spare: Arc<Spare>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Codec({}+{})", self.params.k, self.params.m)
    }
}

impl Codec {
    /// A codec for `params`, checked.
    pub fn new(params: Params) -> Result<Self, CodecError> {
        let Params { k, m } = params;
        if !params_in_range(k, m) {
            return Err(CodecError::Parameters { k, m });
        }
        let rs = ReedSolomon::new(k, m).map_err(|_| CodecError::Parameters { k, m })?;
        Ok(Codec {
            params,
            rs,
            spare: Arc::default(),
        })
    }

    /// Its parameters.
    pub fn params(&self) -> Params {
        self.params
    }

    /// Bytes per shard for a stripe of `len` bytes (at least one, so an empty stripe
    /// still has shards to place and verify).
    pub fn shard_len(&self, len: usize) -> usize {
        len.div_ceil(self.params.k).max(1)
    }

    /// The k+m shards of a stripe given as its parts in order (a push's chunks, or a
    /// rebuilt stripe whole): data shards first, then parity. The data shards are
    /// slices of the stripe, never copies of it: the parts themselves when they are
    /// exactly the k shards; otherwise the parts joined and zero-padded once (in
    /// place, when the stripe is one buffer nothing else holds). The parity is coded
    /// from them in column blocks ([`Codec::encode_parity`]).
    pub fn code_stripe(&self, parts: Vec<Bytes>) -> Result<Vec<Bytes>, CodecError> {
        let k = self.params.k;
        let len: usize = parts.iter().map(Bytes::len).sum();
        let shard_len = self.shard_len(len);
        let data: Vec<Bytes> = if parts.len() == k && parts.iter().all(|p| p.len() == shard_len) {
            parts
        } else {
            let mut bytes: Vec<u8> = match <[Bytes; 1]>::try_from(parts) {
                Ok([whole]) => whole.into(),
                Err(parts) => {
                    let mut joined = Vec::with_capacity(k * shard_len);
                    for part in &parts {
                        joined.extend_from_slice(part);
                    }
                    joined
                }
            };
            bytes.resize(k * shard_len, 0);
            let bytes = Bytes::from(bytes);
            (0..k)
                .map(|j| bytes.slice(j * shard_len..(j + 1) * shard_len))
                .collect()
        };
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_ref()).collect();
        let parity = self.encode_parity(&refs)?;
        Ok(data.into_iter().chain(parity).collect())
    }

    /// The stripe of `len` bytes from the shards that survive (`None` for a missing
    /// or corrupt one), for callers holding shards apart (a repair's scrub). Never
    /// answers bytes it could not rebuild. The surviving data shards are copied into
    /// the output a block at a time and the lost ones rebuilt straight into it while
    /// that block is in cache.
    pub fn decode(
        &self,
        mut shards: Vec<Option<Vec<u8>>>,
        len: usize,
    ) -> Result<Vec<u8>, CodecError> {
        let Params { k, m } = self.params;
        if shards.len() != k + m {
            return Err(CodecError::Malformed(format!(
                "{} shards for a {k}+{m} code",
                shards.len()
            )));
        }
        let shard_len = self.shard_len(len);
        if let Some(i) = shards
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.len() != shard_len))
        {
            return Err(CodecError::Malformed(format!(
                "shard {i} is not {shard_len} bytes"
            )));
        }
        let (data, parity) = shards.split_at_mut(k);
        let present: Vec<bool> = data.iter().map(Option::is_some).collect();
        let mut out = vec![0u8; k * shard_len];
        let data = &*data;
        self.rebuild_blocks(&mut out, &present, parity, |i, outs| {
            for (dst, src) in outs.iter_mut().zip(data) {
                if let Some(src) = src {
                    let from = i * BLOCK;
                    dst.copy_from_slice(&src[from..from + dst.len()]);
                }
            }
        })?;
        out.truncate(len);
        Ok(out)
    }

    /// Rebuilds in place the lost data shards of a stripe whose surviving data shards
    /// were fetched straight into their places: `data` is the room of all k data
    /// shards, one after another; `present[j]` says whether data shard j holds its
    /// bytes; `parity` holds the parity shards fetched (`None` for one missing or
    /// bad). Nothing is copied: only the lost shards' bytes are written. Fails, and
    /// leaves the lost shards as they were, when fewer than k shards are present.
    pub fn rebuild(
        &self,
        data: &mut [u8],
        present: &[bool],
        parity: &mut [Option<Vec<u8>>],
    ) -> Result<(), CodecError> {
        let Params { k, m } = self.params;
        if present.len() != k
            || parity.len() != m
            || data.is_empty()
            || !data.len().is_multiple_of(k)
        {
            return Err(CodecError::Malformed(format!(
                "{} data shards in {} bytes and {} parity shards for a {k}+{m} code",
                present.len(),
                data.len(),
                parity.len()
            )));
        }
        let shard_len = data.len() / k;
        if let Some(i) = parity
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.len() != shard_len))
        {
            return Err(CodecError::Malformed(format!(
                "parity shard {i} is not {shard_len} bytes"
            )));
        }
        self.rebuild_blocks(data, present, parity, |_, _| {})
    }

    /// The one loop of every read: for each column block (spread over the codec's
    /// threads), `fill` puts the surviving data shards' block in place, then the lost
    /// ones are rebuilt from the data and parity present while the block is in cache.
    fn rebuild_blocks<F>(
        &self,
        data: &mut [u8],
        present: &[bool],
        parity: &mut [Option<Vec<u8>>],
        fill: F,
    ) -> Result<(), CodecError>
    where
        F: Fn(usize, &mut [&mut [u8]]) + Send + Sync,
    {
        let k = self.params.k;
        let have = present.iter().filter(|p| **p).count() + parity.iter().flatten().count();
        if have < k {
            return Err(CodecError::TooFewShards { have, k });
        }
        let shard_len = data.len() / k;
        let blocks = shard_len.div_ceil(BLOCK);
        let outs = by_block(data.chunks_mut(shard_len), blocks);
        if present.iter().all(|p| *p) {
            return each_block(outs.into_iter().enumerate().collect(), |(i, mut outs)| {
                fill(i, &mut outs);
                Ok(())
            });
        }
        // Lost parity shards take no room: the rebuild of data reads only what is
        // present.
        let mut parity_blocks: Vec<Vec<Option<&mut [u8]>>> = (0..blocks)
            .map(|_| Vec::with_capacity(parity.len()))
            .collect();
        for shard in parity.iter_mut() {
            match shard {
                Some(p) => {
                    for (i, block) in p.chunks_mut(BLOCK).enumerate() {
                        parity_blocks[i].push(Some(block));
                    }
                }
                None => parity_blocks.iter_mut().for_each(|b| b.push(None)),
            }
        }
        let work: Vec<_> = outs.into_iter().zip(parity_blocks).enumerate().collect();
        each_block(work, |(i, (mut outs, parity))| {
            fill(i, &mut outs);
            let mut block: Vec<(&mut [u8], bool)> =
                outs.into_iter().zip(present.iter().copied()).collect();
            block.extend(parity.into_iter().map(|p| match p {
                Some(p) => (p, true),
                None => (&mut [][..], false),
            }));
            self.rs.reconstruct_data(&mut block).map_err(coding_error)
        })
    }

    /// The m parity shards of k data shards of equal length, which the caller keeps
    /// (no copy of the data is made). The parity's buffers return to this codec when
    /// the last handle to them drops, for its next stripe.
    pub fn encode_parity(&self, data: &[&[u8]]) -> Result<Vec<Bytes>, CodecError> {
        let Params { k, m } = self.params;
        let len = data.first().map_or(0, |d| d.len());
        if data.len() != k || len == 0 || data.iter().any(|d| d.len() != len) {
            return Err(CodecError::Malformed(format!(
                "{} data shards for a {k}+{m} code, or unequal or empty ones",
                data.len()
            )));
        }
        let mut parity: Vec<Vec<u8>> = (0..m).map(|_| self.spare.take(len)).collect();
        let blocks = len.div_ceil(BLOCK);
        let data_blocks = by_block(data.iter().copied(), blocks);
        let parity_blocks = by_block(parity.iter_mut().map(Vec::as_mut_slice), blocks);
        let work: Vec<_> = data_blocks.into_iter().zip(parity_blocks).collect();
        let coded = each_block(work, |(d, mut p)| {
            self.rs.encode_sep(&d, &mut p).map_err(coding_error)
        });
        let parity: Vec<Bytes> = parity
            .into_iter()
            .map(|buf| {
                Bytes::from_owner(ParityBuf {
                    buf,
                    spare: self.spare.clone(),
                })
            })
            .collect();
        coded.map(|()| parity)
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The k+m shards of `stripe` given whole, as a repair codes a rebuilt stripe.
    fn encode(codec: &Codec, stripe: &[u8]) -> Vec<Vec<u8>> {
        codec
            .code_stripe(vec![Bytes::copy_from_slice(stripe)])
            .unwrap()
            .iter()
            .map(|s| s.to_vec())
            .collect()
    }

    /// Every subset of `n` indices with at most `r` members.
    fn subsets(n: usize, r: usize) -> Vec<Vec<usize>> {
        (0u32..(1 << n))
            .filter(|mask| mask.count_ones() as usize <= r)
            .map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect())
            .collect()
    }

    /// The stripe as a reader gets it: the surviving data shards in their places in
    /// one room (junk where a shard was lost), rebuilt there.
    fn rebuild_in_room(
        codec: &Codec,
        have: &[Option<Vec<u8>>],
        len: usize,
    ) -> Result<Vec<u8>, CodecError> {
        let k = codec.params().k;
        let shard_len = codec.shard_len(len);
        let mut room = vec![0xA5u8; k * shard_len];
        for (j, shard) in have[..k].iter().enumerate() {
            if let Some(shard) = shard {
                room[j * shard_len..(j + 1) * shard_len].copy_from_slice(shard);
            }
        }
        let present: Vec<bool> = have[..k].iter().map(Option::is_some).collect();
        let mut parity = have[k..].to_vec();
        let before = room.clone();
        match codec.rebuild(&mut room, &present, &mut parity) {
            Ok(()) => {
                room.truncate(len);
                Ok(room)
            }
            Err(e) => {
                assert_eq!(room, before, "a failed rebuild writes nothing");
                Err(e)
            }
        }
    }

    #[test]
    fn any_m_losses_rebuild_and_m_plus_one_never_return_bytes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (k, m) in [(2, 1), (4, 2), (6, 3)] {
            let codec = Codec::new(Params { k, m }).unwrap();
            for len in [0usize, 1, k - 1, k, k + 1, 4097] {
                let stripe: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                let shards = encode(&codec, &stripe);
                assert_eq!(shards.len(), k + m);
                for lost in subsets(k + m, m + 1) {
                    let mut have: Vec<Option<Vec<u8>>> = shards.iter().cloned().map(Some).collect();
                    for i in &lost {
                        have[*i] = None;
                    }
                    let in_room = rebuild_in_room(&codec, &have, len);
                    let out = codec.decode(have, len);
                    if lost.len() <= m {
                        assert_eq!(out.unwrap(), stripe, "{k}+{m} len {len} lost {lost:?}");
                        assert_eq!(in_room.unwrap(), stripe, "in place, lost {lost:?}");
                    } else {
                        let few = CodecError::TooFewShards { have: k - 1, k };
                        assert_eq!(out.unwrap_err(), few);
                        assert_eq!(in_room.unwrap_err(), few);
                    }
                }
            }
        }
    }

    #[test]
    fn bad_parameters_and_shapes_are_refused() {
        assert!(Codec::new(Params { k: 0, m: 1 }).is_err());
        assert!(Codec::new(Params { k: 4, m: 0 }).is_err());
        assert!(Codec::new(Params { k: 200, m: 57 }).is_err());
        // k+m would wrap to a small number.
        for (k, m) in [(usize::MAX, 1), (1, usize::MAX), (usize::MAX, usize::MAX)] {
            assert_eq!(
                Codec::new(Params { k, m }).unwrap_err(),
                CodecError::Parameters { k, m }
            );
        }
        assert!(Codec::new(Params { k: 255, m: 1 }).is_ok());
        let codec = Codec::new(Params { k: 2, m: 1 }).unwrap();
        let shards = encode(&codec, b"abcd");
        assert!(matches!(
            codec.decode(vec![Some(shards[0].clone())], 4),
            Err(CodecError::Malformed(_))
        ));
        let mut short: Vec<Option<Vec<u8>>> = shards.into_iter().map(Some).collect();
        short[1] = Some(vec![0]);
        assert!(matches!(
            codec.decode(short, 4),
            Err(CodecError::Malformed(_))
        ));
        // In place: the room must hold k whole shards, and the parity be m of them.
        let mut parity = vec![None];
        for (room, present) in [(5, 2), (4, 1), (0, 2), (4, 3)] {
            assert!(matches!(
                codec.rebuild(&mut vec![0; room], &vec![true; present], &mut parity),
                Err(CodecError::Malformed(_))
            ));
        }
        assert!(matches!(
            codec.rebuild(&mut [0; 4], &[true, false], &mut [Some(vec![0])]),
            Err(CodecError::Malformed(_))
        ));
    }
    /// Stripes of several column blocks with a ragged last one: the data shards are
    /// the stripe, the parity is what the library computes over whole shards, a
    /// push's parity is the same, and any m losses (data, parity or both) rebuild.
    #[test]
    fn stripes_of_many_blocks_code_alike_on_every_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (k, m) in [(4, 2), (3, 3)] {
            let codec = Codec::new(Params { k, m }).unwrap();
            for len in [k * BLOCK, k * (3 * BLOCK + 123) - 5] {
                let stripe: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                let shards = encode(&codec, &stripe);
                let shard_len = codec.shard_len(len);
                let mut padded = stripe.clone();
                padded.resize(k * shard_len, 0);
                for (j, shard) in shards[..k].iter().enumerate() {
                    assert_eq!(shard[..], padded[j * shard_len..(j + 1) * shard_len]);
                }
                let mut whole = shards.clone();
                for p in &mut whole[k..] {
                    p.fill(0);
                }
                ReedSolomon::new(k, m).unwrap().encode(&mut whole).unwrap();
                assert_eq!(whole, shards, "{k}+{m} len {len}");
                let refs: Vec<&[u8]> = shards[..k].iter().map(Vec::as_slice).collect();
                assert_eq!(codec.encode_parity(&refs).unwrap(), shards[k..]);
                for lost in subsets(k + m, m) {
                    let mut have: Vec<Option<Vec<u8>>> = shards.iter().cloned().map(Some).collect();
                    for i in &lost {
                        have[*i] = None;
                    }
                    assert_eq!(
                        rebuild_in_room(&codec, &have, len).unwrap(),
                        stripe,
                        "in place: {k}+{m} len {len} lost {lost:?}"
                    );
                    assert_eq!(
                        codec.decode(have, len).unwrap(),
                        stripe,
                        "{k}+{m} len {len} lost {lost:?}"
                    );
                }
            }
        }
    }

    /// Parity written over the buffers of an earlier stripe's parity (the codec
    /// takes them back when they drop) is the new stripe's parity, byte for byte,
    /// whatever the old bytes were; buffers still held are never written over.
    #[test]
    fn parity_over_reused_buffers_is_the_new_stripes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let (k, m) = (4, 2);
        let codec = Codec::new(Params { k, m }).unwrap();
        let reference = ReedSolomon::new(k, m).unwrap();
        let mut held = Vec::new();
        for len in [4 * 3000, 4 * 3000, 4 * 1000, 4 * 5000, 4 * 3000] {
            let shard = len / k;
            let stripe: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let mut whole: Vec<Vec<u8>> = stripe.chunks(shard).map(<[u8]>::to_vec).collect();
            whole.extend((0..m).map(|_| vec![0; shard]));
            reference.encode(&mut whole).unwrap();
            let refs: Vec<&[u8]> = stripe.chunks(shard).collect();
            let first = codec.encode_parity(&refs).unwrap();
            let at: Vec<*const u8> = first.iter().map(|p| p.as_ptr()).collect();
            assert_eq!(first, whole[k..], "len {len}");
            drop(first);
            let again = codec.encode_parity(&refs).unwrap();
            assert_eq!(again, whole[k..], "len {len}, over reused buffers");
            assert!(
                again.iter().all(|p| at.contains(&p.as_ptr())),
                "the dropped parity buffers are reused"
            );
            // Kept alive: the next stripe must not write over these.
            held.push((again, whole[k..].to_vec()));
        }
        for (parity, want) in &held {
            assert_eq!(parity, want, "parity still held is unchanged");
        }
    }

    /// A stripe coded from its parts as a push cuts them (chunks across shard
    /// boundaries, or exactly the k shards) has the shards of the stripe coded whole,
    /// and k parts of a shard each are kept as they are, not copied.
    #[test]
    fn a_stripe_in_parts_codes_as_the_whole_and_exact_shards_are_kept() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let codec = Codec::new(Params { k: 4, m: 2 }).unwrap();
        let stripe: Vec<u8> = (0..4 * 1000 - 3).map(|_| rng.random()).collect();
        let whole = encode(&codec, &stripe);
        let cuts = [0, 7, 1500, 1501, 3999 - 2, stripe.len()];
        let parts: Vec<Bytes> = cuts
            .windows(2)
            .map(|w| Bytes::copy_from_slice(&stripe[w[0]..w[1]]))
            .collect();
        let coded: Vec<Vec<u8>> = codec
            .code_stripe(parts)
            .unwrap()
            .iter()
            .map(|s| s.to_vec())
            .collect();
        assert_eq!(coded, whole);
        let exact: Vec<Bytes> = whole[..4].iter().map(|s| Bytes::from(s.clone())).collect();
        let at: Vec<*const u8> = exact.iter().map(|b| b.as_ptr()).collect();
        let coded = codec.code_stripe(exact).unwrap();
        assert_eq!(
            coded.iter().take(4).map(|b| b.as_ptr()).collect::<Vec<_>>(),
            at
        );
        assert_eq!(coded[4..], whole[4..]);
    }
}
