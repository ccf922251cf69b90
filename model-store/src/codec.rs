//! Reed-Solomon stripes over GF(2^8), through `reed-solomon-erasure` (SIMD-accelerated).
//! A stripe of `len` bytes is padded to k equal data shards and encoded into m parity
//! shards; any k of the k+m rebuild the stripe.

use reed_solomon_erasure::galois_8::ReedSolomon;
use serde::{Deserialize, Serialize};

pub use aigrid_api::manifest::{params_in_range, CODEC_NAME, MAX_SHARDS};

/// Bytes of each shard coded at once: small enough that a block of every shard stays
/// in a core's cache (measured 2x faster than whole 4 MiB shards, see
/// `benchmarks/store`).
const BLOCK: usize = 64 << 10;

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

/// A ready encoder/decoder for one (k, m).
pub struct Codec {
    params: Params,
    rs: ReedSolomon,
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
        Ok(Codec { params, rs })
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

    /// The k+m shards of a stripe: data shards first (the stripe, zero-padded), then
    /// parity.
    pub fn encode(&self, stripe: &[u8]) -> Vec<Vec<u8>> {
        let k = self.params.k;
        let shard_len = self.shard_len(stripe.len());
        let mut shards: Vec<Vec<u8>> = (0..k)
            .map(|i| {
                let start = (i * shard_len).min(stripe.len());
                let end = ((i + 1) * shard_len).min(stripe.len());
                let mut shard = vec![0u8; shard_len];
                shard[..end - start].copy_from_slice(&stripe[start..end]);
                shard
            })
            .collect();
        let refs: Vec<&[u8]> = shards.iter().map(Vec::as_slice).collect();
        let parity = self
            .encode_parity(&refs)
            .expect("k equal, non-empty shards always encode");
        shards.extend(parity);
        shards
    }

    /// The stripe of `len` bytes from the shards that survive (`None` for a missing
    /// or corrupt one). Never answers bytes it could not rebuild.
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
        let have = shards.iter().filter(|s| s.is_some()).count();
        if have < k {
            return Err(CodecError::TooFewShards { have, k });
        }
        // The data shards go straight into the output; lost ones are rebuilt there,
        // a column block at a time so the working set stays in cache.
        let missing: Vec<bool> = shards.iter().map(Option::is_none).collect();
        let mut out = Vec::with_capacity(k * shard_len);
        for shard in &mut shards[..k] {
            match shard.take() {
                Some(bytes) => out.extend_from_slice(&bytes),
                // Room for a lost shard, rebuilt below.
                None => out.resize(out.len() + shard_len, 0),
            }
        }
        if missing[..k].iter().any(|lost| *lost) {
            let mut parity: Vec<Vec<u8>> = shards
                .drain(k..)
                .map(|s| s.unwrap_or_else(|| vec![0u8; shard_len]))
                .collect();
            let mut data: Vec<&mut [u8]> = out.chunks_mut(shard_len).collect();
            let mut start = 0;
            while start < shard_len {
                let end = (start + BLOCK).min(shard_len);
                let mut block: Vec<(&mut [u8], bool)> = data
                    .iter_mut()
                    .map(|d| &mut d[start..end])
                    .chain(parity.iter_mut().map(|p| &mut p[start..end]))
                    .zip(missing.iter())
                    .map(|(slice, lost)| (slice, !*lost))
                    .collect();
                self.rs
                    .reconstruct_data(&mut block)
                    .map_err(|e| CodecError::Malformed(e.to_string()))?;
                start = end;
            }
        }
        out.truncate(len);
        Ok(out)
    }
}

impl Codec {
    /// The m parity shards of k data shards of equal length, which the caller keeps
    /// (no copy of the data is made).
    pub fn encode_parity(&self, data: &[&[u8]]) -> Result<Vec<Vec<u8>>, CodecError> {
        let Params { k, m } = self.params;
        let len = data.first().map_or(0, |d| d.len());
        if data.len() != k || len == 0 || data.iter().any(|d| d.len() != len) {
            return Err(CodecError::Malformed(format!(
                "{} data shards for a {k}+{m} code, or unequal or empty ones",
                data.len()
            )));
        }
        let mut parity = vec![vec![0u8; len]; m];
        // A column block at a time: k+m blocks of 64 KiB stay in cache, where whole
        // 4 MiB shards would stream through memory once per parity row.
        let mut start = 0;
        while start < len {
            let end = (start + BLOCK).min(len);
            let data_block: Vec<&[u8]> = data.iter().map(|d| &d[start..end]).collect();
            let mut parity_block: Vec<&mut [u8]> =
                parity.iter_mut().map(|p| &mut p[start..end]).collect();
            self.rs
                .encode_sep(&data_block, &mut parity_block)
                .map_err(|e| CodecError::Malformed(e.to_string()))?;
            start = end;
        }
        Ok(parity)
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Every subset of `n` indices with at most `r` members.
    fn subsets(n: usize, r: usize) -> Vec<Vec<usize>> {
        (0u32..(1 << n))
            .filter(|mask| mask.count_ones() as usize <= r)
            .map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect())
            .collect()
    }

    #[test]
    fn any_m_losses_rebuild_and_m_plus_one_never_return_bytes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (k, m) in [(2, 1), (4, 2), (6, 3)] {
            let codec = Codec::new(Params { k, m }).unwrap();
            for len in [0usize, 1, k - 1, k, k + 1, 4097] {
                let stripe: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                let shards = codec.encode(&stripe);
                assert_eq!(shards.len(), k + m);
                for lost in subsets(k + m, m + 1) {
                    let mut have: Vec<Option<Vec<u8>>> = shards.iter().cloned().map(Some).collect();
                    for i in &lost {
                        have[*i] = None;
                    }
                    let out = codec.decode(have, len);
                    if lost.len() <= m {
                        assert_eq!(out.unwrap(), stripe, "{k}+{m} len {len} lost {lost:?}");
                    } else {
                        assert_eq!(
                            out.unwrap_err(),
                            CodecError::TooFewShards { have: k - 1, k }
                        );
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
        let shards = codec.encode(b"abcd");
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
    }
}
