//! People's identities ("3Bots"): a key pair made by `aigrid key new`, either ed25519
//! alone or ed25519 together with ML-DSA-65 (FIPS 204), a post-quantum signature, so
//! that a signature stays unforgeable if either scheme falls. Every encoding names its
//! algorithm: public keys are `ed25519:<base64url>` or `ed25519+ml-dsa-65:<base64url>`,
//! secret keys the same with their 32-byte seed, and a signature travels with the
//! algorithm of the key that made it. An identity is named by its [`IdentityId`], a
//! hash of its public key, which is what requests carry as their key id.
//!
//! Nothing here draws randomness: a key is made from a seed its caller drew.

use std::fmt;

use base64::Engine;
use ml_dsa::{Keypair as _, MlDsa65, Signer as _, Verifier as _};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::AuthError;
use crate::ed25519::{ED25519_PUBLIC, ED25519_SIGNATURE};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Bytes of an encoded ML-DSA-65 public key.
const ML_DSA_65_PUBLIC: usize = 1952;
/// Bytes of an encoded ML-DSA-65 signature.
const ML_DSA_65_SIGNATURE: usize = 3309;

wire_enum!(
    /// A key's algorithm, as every encoding of the key or of its signatures names it.
    KeyAlgorithm {
        /// ed25519 alone.
        Ed25519 => "ed25519",
        /// ed25519 and ML-DSA-65, both signing; both must verify.
        Ed25519MlDsa65 => "ed25519+ml-dsa-65",
    }
);

/// An identity's public key. Written `<algorithm>:<base64url of the key bytes>`; for
/// the hybrid, the ed25519 key's 32 bytes followed by the ML-DSA-65 key's 1952.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "ed25519:2Dgm5o3mJ0Hn4X1A3t9x0kq7y7rN2cD3O6l0Wk0b1uE")]
pub struct PublicKey(Key);

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    algorithm: KeyAlgorithm,
    bytes: Vec<u8>,
}

impl PublicKey {
    /// An ed25519 public key from its 32 bytes.
    pub fn ed25519(bytes: [u8; 32]) -> Result<Self, AuthError> {
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| AuthError::Malformed("not a valid ed25519 public key"))?;
        Ok(PublicKey(Key {
            algorithm: KeyAlgorithm::Ed25519,
            bytes: bytes.to_vec(),
        }))
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.0.algorithm
    }

    /// The identity this key names.
    pub fn id(&self) -> IdentityId {
        let mut hasher = blake3::Hasher::new_derive_key("aigrid identity id v1");
        hasher.update(self.0.algorithm.as_str().as_bytes());
        hasher.update(&[0]);
        hasher.update(&self.0.bytes);
        IdentityId(hex::encode(&hasher.finalize().as_bytes()[..16]))
    }

    /// The ed25519 key's 32 bytes, which every key has: formats that name an ed25519
    /// key on its own (a C2SP signed note's key hash) need them without the rest.
    pub fn ed25519_bytes(&self) -> [u8; ED25519_PUBLIC] {
        self.0.bytes[..ED25519_PUBLIC]
            .try_into()
            .expect("every key starts with its 32-byte ed25519 key")
    }

    /// The encoded ML-DSA-65 key (1952 bytes) of a hybrid key, `None` for ed25519
    /// alone: for formats that carry each scheme's signature on its own line.
    pub fn ml_dsa_bytes(&self) -> Option<&[u8]> {
        match self.0.algorithm {
            KeyAlgorithm::Ed25519 => None,
            KeyAlgorithm::Ed25519MlDsa65 => Some(&self.0.bytes[ED25519_PUBLIC..]),
        }
    }

    /// Checks `signature` over `message`: every scheme of the key must verify.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), AuthError> {
        let (ed_sig, ml_sig) = self.split_signature(signature)?;
        self.verify_ed25519(message, ed_sig)?;
        if let Some(ml_sig) = ml_sig {
            self.verify_ml_dsa(message, ml_sig)?;
        }
        Ok(())
    }

    /// A signature by this key as its ed25519 half and, for a hybrid key, its
    /// ML-DSA-65 half.
    fn split_signature<'s>(
        &self,
        signature: &'s [u8],
    ) -> Result<(&'s [u8], Option<&'s [u8]>), AuthError> {
        match self.0.algorithm {
            KeyAlgorithm::Ed25519 if signature.len() == ED25519_SIGNATURE => Ok((signature, None)),
            KeyAlgorithm::Ed25519MlDsa65
                if signature.len() == ED25519_SIGNATURE + ML_DSA_65_SIGNATURE =>
            {
                let (ed, ml) = signature.split_at(ED25519_SIGNATURE);
                Ok((ed, Some(ml)))
            }
            _ => Err(AuthError::Malformed(
                "signature length does not fit the key",
            )),
        }
    }

    /// The decoded ed25519 key and signature of an ed25519 half.
    fn ed25519_parts(
        &self,
        signature: &[u8],
    ) -> Result<(ed25519_dalek::VerifyingKey, ed25519_dalek::Signature), AuthError> {
        let key = decoded_ed25519(&self.ed25519_bytes())?;
        let signature = ed25519_dalek::Signature::from_slice(signature)
            .map_err(|_| AuthError::Malformed("signature is not ed25519"))?;
        Ok((key, signature))
    }

    /// Checks the ed25519 half alone: `signature` is the 64 bytes of an ed25519
    /// signature by this key's ed25519 key. For formats that carry each scheme's
    /// signature apart; a hybrid key's full check is [`PublicKey::verify`].
    pub fn verify_ed25519(&self, message: &[u8], signature: &[u8]) -> Result<(), AuthError> {
        let (ed_key, ed_sig) = self.ed25519_parts(signature)?;
        if crate::ed25519::verify_strictly(&ed_key, message, &ed_sig) {
            Ok(())
        } else {
            Err(AuthError::BadSignature)
        }
    }

    /// Checks the ML-DSA-65 half alone: `signature` is an encoded ML-DSA-65 signature
    /// (3309 bytes) by this key's ML-DSA-65 key. An ed25519-only key has no such half
    /// and refuses every signature.
    pub fn verify_ml_dsa(&self, message: &[u8], signature: &[u8]) -> Result<(), AuthError> {
        let ml_key = self
            .ml_dsa_bytes()
            .ok_or(AuthError::Malformed("the key has no ML-DSA-65 half"))?;
        verify_ml_dsa_65(ml_key, message, signature)
    }
}

/// One signature for [`verify_all`] to check: `signature` by `key` over `message`.
#[derive(Debug, Clone, Copy)]
pub struct SignatureCheck<'a> {
    /// Who is said to have signed.
    pub key: &'a PublicKey,
    /// What was signed.
    pub message: &'a [u8],
    /// The signature, as [`PublicKey::verify`] takes it.
    pub signature: &'a [u8],
}

/// [`PublicKey::verify`] of every check, each answered as it would be alone, with
/// the ed25519 halves checked together as one batch where there are several
/// (about half the cost of checking them one by one from eight on; see
/// `ed25519::verify_strictly_all` for what a batch accepts). A hybrid key's ML-DSA
/// half is checked on its own once its ed25519 half holds.
pub fn verify_all(checks: &[SignatureCheck<'_>]) -> Vec<Result<(), AuthError>> {
    let mut verdicts: Vec<Result<(), AuthError>> = Vec::with_capacity(checks.len());
    let mut batch = Vec::with_capacity(checks.len());
    // Which check each batch item is, and its ML-DSA half.
    let mut batched = Vec::with_capacity(checks.len());
    for (i, check) in checks.iter().enumerate() {
        let parts = check
            .key
            .split_signature(check.signature)
            .and_then(|(ed, ml)| {
                let (key, signature) = check.key.ed25519_parts(ed)?;
                Ok((key, signature, ml))
            });
        match parts {
            Ok((key, signature, ml)) => {
                batch.push((key, check.message, signature));
                batched.push((i, ml));
                verdicts.push(Ok(()));
            }
            Err(e) => verdicts.push(Err(e)),
        }
    }
    let held = crate::ed25519::verify_strictly_all(&batch);
    for ((i, ml), held) in batched.into_iter().zip(held) {
        let check = &checks[i];
        verdicts[i] = if !held {
            Err(AuthError::BadSignature)
        } else if let Some(ml) = ml {
            check.key.verify_ml_dsa(check.message, ml)
        } else {
            Ok(())
        };
    }
    verdicts
}

/// Decoded ed25519 keys kept at once; past this the cache starts again.
const DECODED_KEYS: usize = 4096;

/// The ed25519 key `bytes` encodes, decoded once: decompressing a key is about a
/// sixth of a verification, and a server checks the same few keys over and over.
/// Bounded, so keys that verify nothing cannot grow it.
fn decoded_ed25519(bytes: &[u8; ED25519_PUBLIC]) -> Result<ed25519_dalek::VerifyingKey, AuthError> {
    use std::collections::HashMap;
    use std::sync::{LazyLock, RwLock};
    static KEYS: LazyLock<RwLock<HashMap<[u8; ED25519_PUBLIC], ed25519_dalek::VerifyingKey>>> =
        LazyLock::new(RwLock::default);
    if let Some(key) = KEYS.read().ok().and_then(|keys| keys.get(bytes).copied()) {
        return Ok(key);
    }
    let key = ed25519_dalek::VerifyingKey::from_bytes(bytes)
        .map_err(|_| AuthError::Malformed("stored key is invalid"))?;
    if let Ok(mut keys) = KEYS.write() {
        if keys.len() >= DECODED_KEYS {
            keys.clear();
        }
        keys.insert(*bytes, key);
    }
    Ok(key)
}

/// Checks an ML-DSA-65 `signature` over `message` under the encoded key `key` (1952
/// bytes), for formats that carry the post-quantum key on its own.
pub fn verify_ml_dsa_65(key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), AuthError> {
    let encoded = ml_dsa::EncodedVerifyingKey::<MlDsa65>::try_from(key)
        .map_err(|_| AuthError::Malformed("the key is not an ML-DSA-65 key"))?;
    let key = ml_dsa::VerifyingKey::<MlDsa65>::decode(&encoded);
    let sig = ml_dsa::Signature::<MlDsa65>::try_from(signature)
        .map_err(|_| AuthError::Malformed("signature is not ML-DSA-65"))?;
    key.verify(message, &sig)
        .map_err(|_| AuthError::BadSignature)
}

impl From<crate::auth::NodePublicKey> for PublicKey {
    fn from(key: crate::auth::NodePublicKey) -> Self {
        PublicKey::ed25519(*key.as_bytes()).expect("a NodePublicKey holds a valid ed25519 key")
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0.algorithm, B64.encode(&self.0.bytes))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({}, id {})", self.0.algorithm, self.id())
    }
}

impl std::str::FromStr for PublicKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const SHAPE: &str =
            "a public key looks like ed25519:<base64url> or ed25519+ml-dsa-65:<base64url>";
        let (algorithm, data) = s.trim().split_once(':').ok_or(SHAPE)?;
        let algorithm: KeyAlgorithm = algorithm.parse().map_err(|_| SHAPE.to_owned())?;
        let bytes = B64.decode(data).map_err(|_| SHAPE.to_owned())?;
        let want = match algorithm {
            KeyAlgorithm::Ed25519 => ED25519_PUBLIC,
            KeyAlgorithm::Ed25519MlDsa65 => ED25519_PUBLIC + ML_DSA_65_PUBLIC,
        };
        if bytes.len() != want {
            return Err(format!("a {algorithm} public key is {want} bytes"));
        }
        let ed: [u8; 32] = bytes[..ED25519_PUBLIC].try_into().map_err(|_| SHAPE)?;
        ed25519_dalek::VerifyingKey::from_bytes(&ed).map_err(|_| "not a valid ed25519 key")?;
        Ok(PublicKey(Key { algorithm, bytes }))
    }
}

impl TryFrom<String> for PublicKey {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PublicKey> for String {
    fn from(k: PublicKey) -> Self {
        k.to_string()
    }
}

string_id! {
    /// Names an identity: 32 hex characters of a hash of its public key. Requests
    /// carry it as their key id.
    IdentityId
}

impl IdentityId {
    /// Checks the shape: 32 lowercase hex characters.
    pub fn is_well_formed(&self) -> bool {
        self.0.len() == 32
            && self
                .0
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
}

/// An identity's secret key: a 32-byte seed from which each scheme's key is derived.
/// It never prints and never serialises on its own; [`IdentityKey::to_secret_string`]
/// writes it for the key file.
pub struct IdentityKey {
    algorithm: KeyAlgorithm,
    seed: [u8; 32],
    ed: crate::ed25519::Signer,
    ml: Option<Box<ml_dsa::SigningKey<MlDsa65>>>,
}

impl IdentityKey {
    /// The key of `algorithm` grown from `seed` (32 random bytes the caller drew).
    pub fn from_seed(algorithm: KeyAlgorithm, seed: [u8; 32]) -> Self {
        let ed_seed = blake3::derive_key("aigrid identity ed25519 v1", &seed);
        let ml = match algorithm {
            KeyAlgorithm::Ed25519 => None,
            KeyAlgorithm::Ed25519MlDsa65 => {
                let ml_seed = blake3::derive_key("aigrid identity ml-dsa-65 v1", &seed);
                Some(Box::new(ml_dsa::SigningKey::<MlDsa65>::from_seed(
                    &ml_seed.into(),
                )))
            }
        };
        IdentityKey {
            algorithm,
            seed,
            ed: crate::ed25519::Signer::from_seed(&ed_seed),
            ml,
        }
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        let mut bytes = self.ed.public().to_vec();
        if let Some(ml) = &self.ml {
            bytes.extend_from_slice(ml.verifying_key().encode().as_slice());
        }
        PublicKey(Key {
            algorithm: self.algorithm,
            bytes,
        })
    }

    /// The identity this key is.
    pub fn id(&self) -> IdentityId {
        self.public().id()
    }

    /// Signs `message` with every scheme of the key: the ed25519 signature's 64 bytes,
    /// then, for the hybrid, the ML-DSA-65 signature.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let mut out = self.sign_ed25519(message).to_vec();
        if let Some(ml) = self.sign_ml_dsa(message) {
            out.extend_from_slice(&ml);
        }
        out
    }

    /// The ed25519 signature alone (64 bytes): for formats that carry each scheme's
    /// signature apart, such as a C2SP signed note's lines.
    pub fn sign_ed25519(&self, message: &[u8]) -> [u8; ED25519_SIGNATURE] {
        self.ed.sign(message)
    }

    /// The ML-DSA-65 signature alone (3309 bytes), `None` for an ed25519-only key.
    pub fn sign_ml_dsa(&self, message: &[u8]) -> Option<Vec<u8>> {
        self.ml.as_ref().map(|ml| {
            let sig: ml_dsa::Signature<MlDsa65> = ml.sign(message);
            sig.encode().to_vec()
        })
    }

    /// The secret as the key file stores it: `<algorithm>:<base64url seed>`.
    pub fn to_secret_string(&self) -> String {
        format!("{}:{}", self.algorithm, B64.encode(self.seed))
    }

    /// Reads what [`IdentityKey::to_secret_string`] wrote.
    pub fn from_secret_string(s: &str) -> Result<Self, String> {
        const SHAPE: &str = "a secret key looks like <algorithm>:<base64url of 32 bytes>";
        let (algorithm, data) = s.trim().split_once(':').ok_or(SHAPE)?;
        let algorithm: KeyAlgorithm = algorithm.parse().map_err(|_| SHAPE.to_owned())?;
        let seed: [u8; 32] = B64
            .decode(data)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(SHAPE)?;
        Ok(IdentityKey::from_seed(algorithm, seed))
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IdentityKey({}, id {}, secret redacted)",
            self.algorithm,
            self.id()
        )
    }
}

/// What `aigrid key new` writes (mode 0600) and every client command reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// A name for listings (`alice`, `ci`).
    pub name: String,
    /// The identity's id, for reading the file without deriving keys.
    pub id: IdentityId,
    /// The public key.
    pub public_key: PublicKey,
    /// The secret, as [`IdentityKey::to_secret_string`] writes it.
    pub secret_key: String,
}

impl KeyFile {
    /// The file for `key`, named `name`.
    pub fn new(name: impl Into<String>, key: &IdentityKey) -> Self {
        KeyFile {
            name: name.into(),
            id: key.id(),
            public_key: key.public(),
            secret_key: key.to_secret_string(),
        }
    }

    /// The secret key, checked against the public key the file names.
    pub fn key(&self) -> Result<IdentityKey, String> {
        let key = IdentityKey::from_secret_string(&self.secret_key)?;
        if key.public() != self.public_key {
            return Err("the secret key does not match the file's public key".into());
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_tagged_and_ids_follow_keys() {
        for algorithm in [KeyAlgorithm::Ed25519, KeyAlgorithm::Ed25519MlDsa65] {
            let key = IdentityKey::from_seed(algorithm, [9; 32]);
            let public = key.public();
            let text = public.to_string();
            assert!(text.starts_with(&format!("{algorithm}:")), "{text}");
            assert_eq!(text.parse::<PublicKey>().unwrap(), public);
            assert!(public.id().is_well_formed());
            let secret = key.to_secret_string();
            assert!(secret.starts_with(&format!("{algorithm}:")));
            let back = IdentityKey::from_secret_string(&secret).unwrap();
            assert_eq!(back.public(), public);
            assert!(!format!("{key:?}").contains(&secret[secret.len() - 20..]));
            let file = KeyFile::new("alice", &key);
            assert_eq!(file.key().unwrap().id(), key.id());
        }
        let a = IdentityKey::from_seed(KeyAlgorithm::Ed25519, [1; 32]);
        let b = IdentityKey::from_seed(KeyAlgorithm::Ed25519MlDsa65, [1; 32]);
        // Same seed, other algorithm: another identity.
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn every_scheme_of_a_key_must_verify() {
        for algorithm in [KeyAlgorithm::Ed25519, KeyAlgorithm::Ed25519MlDsa65] {
            let key = IdentityKey::from_seed(algorithm, [4; 32]);
            let other = IdentityKey::from_seed(algorithm, [5; 32]);
            let sig = key.sign(b"hello");
            key.public().verify(b"hello", &sig).unwrap();
            assert_eq!(
                key.public().verify(b"hellp", &sig),
                Err(AuthError::BadSignature)
            );
            assert!(other.public().verify(b"hello", &sig).is_err());
            // A flipped bit in the last scheme's part alone is caught.
            let mut bad = sig.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(key.public().verify(b"hello", &bad).is_err());
        }
        // A hybrid key refuses an ed25519-only signature of the same ed25519 key.
        let hybrid = IdentityKey::from_seed(KeyAlgorithm::Ed25519MlDsa65, [6; 32]);
        let ed_part = hybrid.sign(b"m")[..64].to_vec();
        assert!(hybrid.public().verify(b"m", &ed_part).is_err());
    }

    #[test]
    fn decoded_keys_answer_as_fresh_ones_past_the_cache_bound() {
        let key = IdentityKey::from_seed(KeyAlgorithm::Ed25519, [8; 32]);
        let sig = key.sign(b"again");
        // Past the bound the cache starts again; each key still verifies only its own
        // signatures, the first time and every time after.
        for seed in 0..=(DECODED_KEYS as u32) {
            let mut bytes = [0; 32];
            bytes[..4].copy_from_slice(&seed.to_be_bytes());
            let other = IdentityKey::from_seed(KeyAlgorithm::Ed25519, bytes).public();
            assert!(other.verify_ed25519(b"again", &sig).is_err());
            key.public().verify_ed25519(b"again", &sig).unwrap();
        }
        for _ in 0..2 {
            key.public().verify_ed25519(b"again", &sig).unwrap();
            assert_eq!(
                key.public().verify_ed25519(b"agaim", &sig),
                Err(AuthError::BadSignature)
            );
        }
        // Bytes that are no curve point are refused every time, never cached.
        let y = (0..=u8::MAX)
            .map(|b| [b; 32])
            .find(|y| ed25519_dalek::VerifyingKey::from_bytes(y).is_err())
            .unwrap();
        for _ in 0..2 {
            assert_eq!(
                decoded_ed25519(&y),
                Err(AuthError::Malformed("stored key is invalid"))
            );
        }
    }

    #[test]
    fn each_half_signs_and_verifies_alone() {
        let ed = IdentityKey::from_seed(KeyAlgorithm::Ed25519, [7; 32]);
        let public = ed.public();
        assert_eq!(public.ed25519_bytes().to_vec(), public.0.bytes);
        assert_eq!(public.ml_dsa_bytes(), None);
        assert_eq!(ed.sign_ml_dsa(b"m"), None);
        let sig = ed.sign_ed25519(b"m");
        assert_eq!(sig.to_vec(), ed.sign(b"m"));
        public.verify_ed25519(b"m", &sig).unwrap();
        assert_eq!(
            public.verify_ed25519(b"n", &sig),
            Err(AuthError::BadSignature)
        );
        assert!(public.verify_ml_dsa(b"m", &sig).is_err());

        let hybrid = IdentityKey::from_seed(KeyAlgorithm::Ed25519MlDsa65, [7; 32]);
        let public = hybrid.public();
        assert_eq!(public.ed25519_bytes()[..], public.0.bytes[..32]);
        assert_eq!(
            public.ml_dsa_bytes().map(<[u8]>::len),
            Some(ML_DSA_65_PUBLIC)
        );
        let ed_sig = hybrid.sign_ed25519(b"m");
        let ml_sig = hybrid.sign_ml_dsa(b"m").unwrap();
        assert_eq!(ml_sig.len(), ML_DSA_65_SIGNATURE);
        public.verify_ed25519(b"m", &ed_sig).unwrap();
        public.verify_ml_dsa(b"m", &ml_sig).unwrap();
        assert_eq!(
            public.verify_ml_dsa(b"n", &ml_sig),
            Err(AuthError::BadSignature)
        );
        // The halves put together are the full signature.
        public
            .verify(b"m", &[ed_sig.as_slice(), &ml_sig].concat())
            .unwrap();
        // One half is no signature for the other scheme.
        assert!(public.verify_ml_dsa(b"m", &ed_sig).is_err());
        assert!(public.verify_ed25519(b"m", &ml_sig).is_err());
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            "",
            "ed25519",
            "rsa:AAAA",
            "ed25519:AAAA",
            "ed25519+ml-dsa-65:AAAA",
            "ed25519:!!!",
        ] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad}");
        }
        assert!(IdentityKey::from_secret_string("ed25519:AAAA").is_err());
        let key = IdentityKey::from_seed(KeyAlgorithm::Ed25519, [2; 32]);
        let mut file = KeyFile::new("x", &key);
        file.public_key = IdentityKey::from_seed(KeyAlgorithm::Ed25519, [3; 32]).public();
        assert!(file.key().is_err());
    }
}
