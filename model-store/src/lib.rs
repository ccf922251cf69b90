//! The dispersed model store. A model is a directory of files; its bytes are cut into
//! chunks, hashed, grouped into stripes and erasure coded so that any k of a stripe's
//! k+m shards rebuild it, and a signed manifest names every byte by digest.
//!
//! | module | owns |
//! |---|---|
//! | [`chunk`] | where files are cut: fixed-size chunks, aligned to tensors in safetensors files |
//! | [`codec`] | Reed-Solomon stripes: k data shards and m parity shards, rebuilt from any k |
//! | [`manifest`] | files → chunks → stripes → shards, its canonical encoding, digest and signature |
//! | [`backend`] | a named shard store over `object_store` |
//! | [`store`] | push (directory → shards + signed manifest) and verified pull |
//!
//! The first three are pure; the lazy reader, placement policies and repair build on
//! them next.

#![warn(missing_docs)]

pub mod backend;
pub mod chunk;
pub mod codec;
pub mod manifest;
pub mod store;
