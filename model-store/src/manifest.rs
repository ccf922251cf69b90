//! The manifest: files → chunks → stripes → shards, its canonical encoding, digest and
//! signature. The types and their pure checks are wire types of `aigrid-api`, shared
//! with the control plane; they are re-exported here so the store's modules name them
//! where they always did.

pub use aigrid_api::manifest::*;
