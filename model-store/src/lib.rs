//! The dispersed model store. A model is a directory of files; its bytes are cut into
//! chunks, hashed, grouped into stripes and erasure coded so that any k of a stripe's
//! k+m shards rebuild it, and a signed manifest names every byte by digest.
//!
//! | module | owns |
//! |---|---|
//! | [`chunk`] | where files are cut: fixed-size chunks, aligned to tensors in safetensors files |
//! | [`codec`] | Reed-Solomon stripes: k data shards and m parity shards, rebuilt from any k |
//! | [`manifest`] | files → chunks → stripes → shards, its canonical encoding, digest and signature (the types live in `aigrid-api`, re-exported) |
//! | [`placement`] | placing a stripe's shards by a placement policy (the policy types live in `aigrid-api`, re-exported) |
//! | [`backend`] | a named shard store over `object_store` |
//! | [`shard_service`] | the HTTP shard service a node runs, spoken to by `http://` backends |
//! | [`crypto`] | encryption at rest: chunks sealed under the owner's key |
//! | [`error`] | the store's one error type, [`error::StoreError`] (also at `store::StoreError`) |
//! | `source` | a model directory as a push reads it: files walked, read in order, cut into hashed chunks |
//! | [`store`] | the store over its backends; push (directory → shards + signed manifest, deduplicated) and removal |
//! | `opener` | stored chunks checked against their [`aigrid_api::ChunkDigest`] and unsealed |
//! | [`pull`] | pull: a registered model written out as files, whole or not at all |
//! | [`reader`] | the verified lazy reader: ranges, hedged stripe fetches, safetensors tensors |
//! | [`cache`] | a bounded on-disk cache of verified chunks |
//! | [`repair`] | scrub (check every shard) and repair (rebuild and re-place bad ones) |
//! | [`peers`] | chunks served to and fetched from peers, every one checked against the manifest |
//! | [`swarm`] | peer-to-peer spreading: which chunk next (rarest first) and from whom (own site, other peers, then the store) |
//!
//! `chunk`, `codec`, `manifest`, `placement` and `swarm` are pure; the rest talk to backends.

pub mod backend;
pub mod cache;
pub mod chunk;
pub mod codec;
pub mod crypto;
pub mod error;
pub mod manifest;
mod opener;
pub mod peers;
pub mod placement;
pub mod pull;
pub mod reader;
pub mod repair;
pub mod shard_service;
mod source;
pub mod store;
pub mod swarm;
