//! One chunk from the store by itself: the bytes it takes up in its stripe's data
//! shards, read as ranges of those shards, so a node fetching its share of a model
//! from the store takes each chunk once and not the whole shards around it. The
//! chunk's own digest checks what came; anything missing or wrong falls back to
//! the stripe's usual fetch (whole shards, rebuilt from parity when need be).

use aigrid_api::manifest::shard_object;
use aigrid_api::ChunkDigest;

use super::{Fetcher, Reader};
use crate::error::StoreError;
use crate::opener::ChunkOpener;

impl Fetcher {
    /// Bytes `from..to` of stripe `index`, read from the data shards holding them;
    /// `None` when a shard's backend is unknown, fails, or the shard is missing.
    async fn data_range(&self, index: usize, from: u64, to: u64) -> Option<Vec<u8>> {
        let stripe = &self.manifest.stripes[index];
        let names = &self.locations.stripes[index];
        let k = self.codec.params().k;
        let shard_len = stripe.shard_len.max(1);
        let mut out = Vec::with_capacity(usize::try_from(to.saturating_sub(from)).ok()?);
        let mut at = from;
        while at < to {
            let j = usize::try_from(at / shard_len).ok()?;
            if j >= k {
                return None;
            }
            let start = at - j as u64 * shard_len;
            let end = (to - j as u64 * shard_len).min(shard_len);
            let backend = self.store.backend(&names[j])?;
            let object = shard_object(stripe.shards[j].as_str());
            let bytes = backend.get_range(&object, start..end).await.ok()??;
            if bytes.len() as u64 != end - start {
                return None;
            }
            out.extend_from_slice(&bytes);
            at += end - start;
        }
        self.count(|s| {
            s.requests += 1;
            s.bytes += to - from;
        });
        Some(out)
    }
}

impl Reader {
    /// Fetches one chunk from the store into the cache: its bytes from the data
    /// shards, checked against its digest; else the part of its stripe holding
    /// it, as any read does.
    pub(crate) async fn fetch_chunk(&self, hash: &ChunkDigest) -> Result<(), StoreError> {
        let (index, offset) = self.locate[hash];
        let stripe = &self.manifest().stripes[index];
        if let Some(c) = stripe.chunks.iter().find(|c| c.blake3 == *hash) {
            let got = self.fetcher.data_range(index, offset, offset + c.len).await;
            if let (Some(bytes), Some(cache)) = (got, &self.cache) {
                if ChunkOpener::verify(hash, &bytes) {
                    return cache
                        .insert(hash, &bytes)
                        .map_err(crate::error::io(std::path::Path::new("cache")));
                }
            }
        }
        let file = self
            .manifest()
            .files
            .iter()
            .find(|f| f.chunks.iter().any(|c| c.blake3 == *hash))
            .map(|f| f.path.clone())
            .unwrap_or_default();
        self.fetch_stripe(index, &file, &[hash]).await.map(|_| ())
    }
}
