//! Ed25519 signing for identities and node keys. Signatures are made with AWS-LC
//! (the library the cluster's TLS already runs on): Ed25519 is deterministic, so a
//! signature (and the public key) is byte for byte what `ed25519-dalek` makes from
//! the same seed, in half the time on x86-64 (9.3 µs against 19.0 µs a signature on
//! a 2-core EPYC), and a client signs every request it sends. Verification keeps
//! `ed25519-dalek`'s strict rules, which refuse small-order keys and points that
//! AWS-LC's check lets through ([`verify_strictly`]); the equation itself is
//! AWS-LC's to check where it is the same check (a key in its canonical encoding),
//! 71 µs against 95 µs a signature on a 2-core first-generation EPYC.

use std::sync::LazyLock;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};

/// Bytes of an ed25519 public key.
pub(crate) const ED25519_PUBLIC: usize = 32;
/// Bytes of an ed25519 signature.
pub(crate) const ED25519_SIGNATURE: usize = 64;

/// A signing key made from a 32-byte Ed25519 seed.
pub(crate) struct Signer(Ed25519KeyPair);

impl Signer {
    /// The key whose seed (RFC 8032's secret key) is `seed`.
    pub(crate) fn from_seed(seed: &[u8; 32]) -> Self {
        // Any 32 bytes are a valid Ed25519 seed: AWS-LC refuses only other lengths.
        Signer(Ed25519KeyPair::from_seed_unchecked(seed).expect("a 32-byte seed is a key"))
    }

    /// The matching public key.
    pub(crate) fn public(&self) -> [u8; ED25519_PUBLIC] {
        let mut out = [0; ED25519_PUBLIC];
        out.copy_from_slice(self.0.public_key().as_ref());
        out
    }

    /// The signature of `message`.
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; ED25519_SIGNATURE] {
        let mut out = [0; ED25519_SIGNATURE];
        out.copy_from_slice(self.0.sign(message).as_ref());
        out
    }
}

/// The encodings of the eight points of small order, the only `R` a strict check
/// refuses that a plain one can accept.
static SMALL_ORDER: LazyLock<[[u8; 32]; 8]> = LazyLock::new(|| {
    curve25519_dalek::constants::EIGHT_TORSION.map(|point| point.compress().to_bytes())
});

/// Whether `signature` is `key`'s over `message` by `ed25519-dalek`'s
/// `verify_strict`, at the cost of its plain `verify`. Both require `s` reduced and
/// the recomputed `R'` = \[s\]B - \[k\]A to encode as the signature's `R`
/// bytes; strict also refuses a small-order key and a small-order `R`, which it finds
/// by decompressing `R`, a sixth of a verification. Once `R'` encodes as `R`, `R`
/// is the canonical encoding of a point, so comparing its bytes with the eight
/// small-order points' encodings decides the same.
pub(crate) fn verify_strictly(key: &VerifyingKey, message: &[u8], signature: &Signature) -> bool {
    passes_strict_rules(key, signature) && verifies(key, message, signature)
}

/// `ed25519-dalek`'s plain `verify`: `s` reduced, and \[s\]B - \[k\]A encoding as
/// the signature's `R` bytes, with k the hash of `R`, the key's bytes and the
/// message. AWS-LC checks exactly this (RFC 8032's `s` < L, the same hash and the
/// same comparison of encodings) for a key whose bytes decode; the one encoding it
/// reads differently is a non-canonical key (y at or above p, which `ed25519-dalek`
/// reduces and AWS-LC refuses), and such a key goes `ed25519-dalek`'s way.
fn verifies(key: &VerifyingKey, message: &[u8], signature: &Signature) -> bool {
    let bytes = key.as_bytes();
    if canonical_y(bytes) {
        UnparsedPublicKey::new(&ED25519, bytes)
            .verify(message, &signature.to_bytes())
            .is_ok()
    } else {
        key.verify(message, signature).is_ok()
    }
}

/// Whether an encoded point's y (its low 255 bits) is below p = 2^255 - 19: every
/// bit of it set above the lowest byte, and that byte at least 0xed, is y >= p.
fn canonical_y(bytes: &[u8; 32]) -> bool {
    !(bytes[0] >= 0xed && bytes[1..31].iter().all(|&b| b == 0xff) && bytes[31] & 0x7f == 0x7f)
}

/// The strict rules' cheap part: neither the key nor the signature's `R` is of small
/// order.
fn passes_strict_rules(key: &VerifyingKey, signature: &Signature) -> bool {
    !key.is_weak() && !SMALL_ORDER.contains(signature.r_bytes())
}

/// Fewest signatures checked together: one alone goes [`verify_strictly`]'s way.
const BATCH_FROM: usize = 2;

/// [`verify_strictly`] for every `(key, message, signature)`, in one batch where
/// more than one passes the strict rules' cheap part: a batch of eight costs about
/// half of eight checks one by one (22 against 44 µs a signature on a 2-core Xeon,
/// 27 for a batch of four). When the batch fails, each is checked alone, so a
/// refused signature is refused on its own and never takes the batch's others with it.
///
/// The batch (`ed25519_dalek::verify_batch`) checks one random linear combination
/// of the signatures' equations, with coefficients drawn from a hash of every
/// signature, key and message in it: it holds only if, but for a chance of 2^-128,
/// each equation does. Each equation is the one [`verify_strictly`] checks, as
/// points rather than as `R`'s encoding, and the strict rules' refusals (small-order
/// keys and `R`s) are applied to each first. What the batch takes beyond one by one
/// are signatures whose `R` differs from \[s\]B - \[k\]A by a point of small order
/// or in its encoding alone: making one takes the key's secret, so they are its
/// holder's own signatures, never a forgery.
pub(crate) fn verify_strictly_all(items: &[(VerifyingKey, &[u8], Signature)]) -> Vec<bool> {
    let mut verdicts: Vec<bool> = items
        .iter()
        .map(|(key, _, signature)| passes_strict_rules(key, signature))
        .collect();
    let candidates: Vec<usize> = (0..items.len()).filter(|&i| verdicts[i]).collect();
    if candidates.len() >= BATCH_FROM {
        let messages: Vec<&[u8]> = candidates.iter().map(|&i| items[i].1).collect();
        let signatures: Vec<Signature> = candidates.iter().map(|&i| items[i].2).collect();
        let keys: Vec<VerifyingKey> = candidates.iter().map(|&i| items[i].0).collect();
        if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
            return verdicts;
        }
    }
    for i in candidates {
        let (key, message, signature) = &items[i];
        verdicts[i] = verifies(key, message, signature);
    }
    verdicts
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::Signer as _;

    use super::*;

    #[test]
    fn keys_and_signatures_are_the_ones_ed25519_dalek_makes_and_verify_strictly() {
        for n in 0u8..32 {
            let seed = blake3::derive_key("ed25519 signer test", &[n]);
            let signer = Signer::from_seed(&seed);
            let dalek = ed25519_dalek::SigningKey::from_bytes(&seed);
            let message: Vec<u8> = (0..usize::from(n) * 37).map(|i| i as u8 ^ n).collect();
            assert_eq!(signer.public(), dalek.verifying_key().to_bytes());
            let ours = signer.sign(&message);
            assert_eq!(ours, dalek.sign(&message).to_bytes(), "seed {n}");
            let signature = ed25519_dalek::Signature::from_bytes(&ours);
            assert!(dalek
                .verifying_key()
                .verify_strict(&message, &signature)
                .is_ok());
        }
    }

    /// A signature whose R is `r` and whose s makes the plain equation hold for
    /// `message` under the key with secret scalar `a` (R must then be [s - ka]B).
    fn forged(a: curve25519_dalek::Scalar, r: [u8; 32], message: &[u8]) -> Signature {
        use curve25519_dalek::Scalar;
        use sha2::{Digest as _, Sha512};
        let public = curve25519_dalek::constants::ED25519_BASEPOINT_POINT * a;
        let mut h = Sha512::new();
        h.update(r);
        h.update(public.compress().as_bytes());
        h.update(message);
        let wide: [u8; 64] = h.finalize().into();
        let k = Scalar::from_bytes_mod_order_wide(&wide);
        Signature::from_components(r, (k * a).to_bytes())
    }

    #[test]
    fn the_strict_check_is_verify_strict_at_the_cost_of_verify() {
        use curve25519_dalek::constants::ED25519_BASEPOINT_POINT as B;
        use curve25519_dalek::Scalar;
        for n in 0u8..16 {
            let seed = blake3::derive_key("ed25519 strict test", &[n]);
            let signer = Signer::from_seed(&seed);
            let key = VerifyingKey::from_bytes(&signer.public()).unwrap();
            let message = vec![n; usize::from(n) * 11];
            let good = Signature::from_bytes(&signer.sign(&message));
            assert!(verify_strictly(&key, &message, &good));
            assert!(!verify_strictly(&key, b"another message", &good));
            let mut bent = good.to_bytes();
            bent[usize::from(n) % 64] ^= 1;
            let bent = Signature::from_bytes(&bent);
            assert_eq!(
                verify_strictly(&key, &message, &bent),
                key.verify_strict(&message, &bent).is_ok()
            );
        }
        // R the identity, with s = ka: the plain equation holds (R' = [ka - ka]B),
        // and R has small order, which the strict check refuses.
        let a = Scalar::from_bytes_mod_order([7; 32]);
        let key = VerifyingKey::from_bytes((B * a).compress().as_bytes()).unwrap();
        let identity = curve25519_dalek::EdwardsPoint::default()
            .compress()
            .to_bytes();
        let small_r = forged(a, identity, b"job");
        assert!(
            key.verify(b"job", &small_r).is_ok(),
            "the plain check takes it"
        );
        assert!(key.verify_strict(b"job", &small_r).is_err());
        assert!(!verify_strictly(&key, b"job", &small_r));
        // A small-order key (the identity) with R = [s]B: the plain check takes any
        // message, the strict one none.
        let weak = VerifyingKey::from_bytes(&identity).unwrap();
        let s = Scalar::from_bytes_mod_order([9; 32]);
        let any = Signature::from_components((B * s).compress().to_bytes(), s.to_bytes());
        assert!(
            weak.verify(b"anything", &any).is_ok(),
            "the plain check takes it"
        );
        assert!(weak.verify_strict(b"anything", &any).is_err());
        assert!(!verify_strictly(&weak, b"anything", &any));
        assert_eq!(
            SMALL_ORDER
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            8
        );
    }

    /// `signature` with L added to its `s`: the same point equation, but `s` not
    /// reduced.
    fn wide_of(signature: &[u8; 64]) -> [u8; 64] {
        // L = 2^252 + 27742317777372353535851937790883648493, little-endian.
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut wide = *signature;
        let mut carry = 0u16;
        for (byte, l) in wide[32..].iter_mut().zip(L) {
            let sum = u16::from(*byte) + u16::from(l) + carry;
            *byte = sum as u8;
            carry = sum >> 8;
        }
        wide
    }

    #[test]
    fn the_equation_is_checked_as_ed25519_dalek_checks_it() {
        let mut checked = 0;
        for n in 0u8..24 {
            let seed = blake3::derive_key("ed25519 verify test", &[n]);
            let signer = Signer::from_seed(&seed);
            let key = VerifyingKey::from_bytes(&signer.public()).unwrap();
            assert!(canonical_y(key.as_bytes()));
            let message = vec![n ^ 0x5a; usize::from(n) * 13];
            let good = signer.sign(&message);
            let mut cases = vec![good];
            // Every bit of R and s flipped in turn.
            for bit in (usize::from(n)..512).step_by(24) {
                let mut bent = good;
                bent[bit / 8] ^= 1 << (bit % 8);
                cases.push(bent);
            }
            // s + L: the equation holds, but s is not reduced.
            cases.push(wide_of(&good));
            for case in cases {
                let signature = Signature::from_bytes(&case);
                for m in [&message[..], b"another message"] {
                    assert_eq!(
                        verifies(&key, m, &signature),
                        key.verify(m, &signature).is_ok(),
                        "key {n}"
                    );
                    checked += 1;
                }
            }
            assert!(verifies(&key, &message, &Signature::from_bytes(&good)));
            assert!(!verifies(
                &key,
                &message,
                &Signature::from_bytes(&wide_of(&good))
            ));
        }
        assert!(checked > 500);
        // Non-canonical keys: y = p + k decodes (reduced) for some k; those go
        // ed25519-dalek's way and get its verdict.
        let mut noncanonical = 0;
        for k in 0u8..19 {
            for sign in [0u8, 0x80] {
                let mut bytes = [0xffu8; 32];
                bytes[0] = 0xed + k;
                bytes[31] = 0x7f | sign;
                assert!(!canonical_y(&bytes));
                if let Ok(key) = VerifyingKey::from_bytes(&bytes) {
                    noncanonical += 1;
                    let s = curve25519_dalek::Scalar::from_bytes_mod_order([3; 32]);
                    let r = (curve25519_dalek::constants::ED25519_BASEPOINT_POINT * s)
                        .compress()
                        .to_bytes();
                    let signature = Signature::from_components(r, s.to_bytes());
                    assert_eq!(
                        verifies(&key, b"job", &signature),
                        key.verify(b"job", &signature).is_ok()
                    );
                }
            }
        }
        assert!(noncanonical > 0, "some y >= p decodes");
        let mut below = [0xffu8; 32];
        below[0] = 0xec;
        below[31] = 0x7f;
        assert!(canonical_y(&below), "p - 1 is canonical");
    }

    /// Checked together, every signature gets the verdict it gets alone: good ones
    /// (under several keys) hold, and bent ones, one the strict rules refuse for its
    /// small-order R, and one by a small-order key are refused, without taking the
    /// good ones with them.
    #[test]
    fn a_batch_answers_each_signature_as_it_is_answered_alone() {
        use curve25519_dalek::constants::ED25519_BASEPOINT_POINT as B;
        use curve25519_dalek::Scalar;
        let mut owned: Vec<(VerifyingKey, Vec<u8>, Signature)> = Vec::new();
        for n in 0u8..24 {
            let seed = blake3::derive_key("ed25519 batch test", &[n % 5]);
            let signer = Signer::from_seed(&seed);
            let key = VerifyingKey::from_bytes(&signer.public()).unwrap();
            let message = vec![n; usize::from(n) * 7 + 1];
            let mut signature = signer.sign(&message);
            if n % 6 == 4 {
                signature[usize::from(n)] ^= 0x40;
            }
            owned.push((key, message, Signature::from_bytes(&signature)));
        }
        let a = Scalar::from_bytes_mod_order([7; 32]);
        let identity = curve25519_dalek::EdwardsPoint::default()
            .compress()
            .to_bytes();
        let key = VerifyingKey::from_bytes((B * a).compress().as_bytes()).unwrap();
        owned.push((key, b"job".to_vec(), forged(a, identity, b"job")));
        let weak = VerifyingKey::from_bytes(&identity).unwrap();
        let s = Scalar::from_bytes_mod_order([9; 32]);
        let any = Signature::from_components((B * s).compress().to_bytes(), s.to_bytes());
        owned.push((weak, b"anything".to_vec(), any));

        let alone: Vec<bool> = owned
            .iter()
            .map(|(key, message, signature)| verify_strictly(key, message, signature))
            .collect();
        assert_eq!(alone.iter().filter(|held| **held).count(), 20);
        let items: Vec<(VerifyingKey, &[u8], Signature)> = owned
            .iter()
            .map(|(key, message, signature)| (*key, message.as_slice(), *signature))
            .collect();
        assert_eq!(verify_strictly_all(&items), alone);
        // All good: the batch holds at once.
        let good: Vec<_> = items
            .iter()
            .zip(&alone)
            .filter(|(_, held)| **held)
            .map(|(item, _)| *item)
            .collect();
        assert_eq!(verify_strictly_all(&good), vec![true; good.len()]);
        assert!(verify_strictly_all(&[]).is_empty());
    }
}
