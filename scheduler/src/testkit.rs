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
        circle: None,
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

/// The identity tests act as: the admin of the clusters they start.
pub fn admin_key() -> aigrid_api::IdentityKey {
    aigrid_api::IdentityKey::from_seed(aigrid_api::KeyAlgorithm::Ed25519, [42; 32])
}

/// What a test server is started with: [`admin_key`] as the admin of its new cluster.
pub fn admin_access() -> crate::http::ServerAccess {
    crate::http::ServerAccess {
        admins: vec![("tests".to_owned(), admin_key().public())],
        server_key: None,
        node_issuer: None,
    }
}

/// Signs requests built with reqwest, as the CLI and agents do.
pub trait Sign {
    /// Signed by [`admin_key`].
    fn signed(self) -> reqwest::RequestBuilder;
    /// Signed by `key`.
    fn signed_by(self, key: &dyn aigrid_api::RequestSigner) -> reqwest::RequestBuilder;
}

impl Sign for reqwest::RequestBuilder {
    fn signed(self) -> reqwest::RequestBuilder {
        self.signed_by(&admin_key())
    }

    fn signed_by(self, key: &dyn aigrid_api::RequestSigner) -> reqwest::RequestBuilder {
        let (client, request) = self.build_split();
        let mut request = request.expect("the request builds");
        let body = request
            .body()
            .and_then(|b| b.as_bytes())
            .unwrap_or_default()
            .to_vec();
        let url = request.url();
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut nonce = [0u8; 16];
        rand::fill(&mut nonce[..]);
        let signed = aigrid_api::signature::sign_request(
            key,
            request.method().as_str(),
            &target,
            &body,
            created,
            nonce,
        );
        for (name, value) in signed.pairs() {
            if let Ok(value) = value.parse() {
                request.headers_mut().insert(name, value);
            }
        }
        reqwest::RequestBuilder::from_parts(client, request)
    }
}
