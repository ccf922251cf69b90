//! Fixtures for tests of the control plane and of what is built on it: small but real
//! inputs that pass every check production code runs, so a test fails only for the
//! reason it is about.

use aigrid_api::manifest::{
    ChunkRef, CodecInfo, FileEntry, Locations, Manifest, Registration, SignedManifest, Stripe,
    CODEC_NAME, MANIFEST_FORMAT,
};
use aigrid_api::placement::Policy;
use ed25519_dalek::SigningKey;

/// Backends [`model_registration`]'s shards are placed on: stripe `i` puts shard `j`
/// on `BACKENDS[(i + j) % 4]`.
pub const BACKENDS: [&str; 4] = ["site-0", "site-1", "site-2", "site-3"];

/// The publisher key made from one byte, as [`model_registration`] signs with.
pub fn publisher(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A signed registration of a model called `name`: one file of `stripes` 4-byte
/// chunks, each in its own 2+1 stripe, signed by [`publisher`]`(seed)`. The digest
/// depends on `name` and `stripes`; shard digests are made up (nothing is stored).
pub fn model_registration(name: &str, seed: u8, stripes: usize) -> Registration {
    let hash = |data: &[u8]| blake3::hash(data).to_hex().to_string();
    let chunk = |i: usize| ChunkRef {
        blake3: aigrid_api::ChunkDigest::of(format!("{name}/chunk/{i}").as_bytes()),
        len: 4,
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: name.to_owned(),
        codec: CodecInfo {
            name: CODEC_NAME.to_owned(),
            k: 2,
            m: 1,
        },
        chunk_size: 4,
        policy: Policy::default(),
        encryption: None,
        files: vec![FileEntry {
            path: "weights.bin".to_owned(),
            size: 4 * stripes as u64,
            chunks: (0..stripes).map(chunk).collect(),
        }],
        stripes: (0..stripes)
            .map(|i| Stripe {
                chunks: vec![chunk(i)],
                len: 4,
                shard_len: 2,
                shards: (0..3)
                    .map(|j| hash(format!("{name}/shard/{i}/{j}").as_bytes()))
                    .collect(),
            })
            .collect(),
    };
    Registration {
        manifest: SignedManifest::sign(manifest, &publisher(seed)),
        locations: placed(stripes, 0),
    }
}

/// Locations for `stripes` 2+1 stripes, shard `j` of stripe `i` on
/// `BACKENDS[(i + j + shift) % 4]`; a different `shift` moves every shard.
pub fn placed(stripes: usize, shift: usize) -> Locations {
    Locations {
        stripes: (0..stripes)
            .map(|i| {
                (0..3)
                    .map(|j| BACKENDS[(i + j + shift) % BACKENDS.len()].to_owned())
                    .collect()
            })
            .collect(),
    }
}
