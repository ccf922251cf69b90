//! The offline audit export: what `aigrid audit export FILE` writes, and the check
//! anyone can run on it later without reaching the cluster: every entry of the log,
//! a checkpoint of exactly those entries signed by the cluster key, and (given an
//! earlier checkpoint someone kept) proof that the log only grew since.
//!
//! The file's bytes must be exactly the canonical encoding of what they parse to
//! (pretty JSON as `serde_json` writes it, then a newline). So any changed byte,
//! even whitespace, is caught, though the signature covers only the checkpoint: a
//! file is either what aigrid wrote or it is refused, its hash can be published and
//! compared as a whole, and no two parsers can read different contents from one
//! file (duplicate keys, odd escapes, trailing data).

use aigrid_api::{IdentityKey, PublicKey};
use serde::{Deserialize, Serialize};

use super::audit::{root_of, verify_consistency, AuditError, AuditLog};
use super::note::Checkpoint;

/// The export format this build writes and reads.
pub const EXPORT_FORMAT: u32 = 1;

/// What `aigrid audit export FILE` writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditExport {
    /// [`EXPORT_FORMAT`]: a reader refuses formats it does not know rather than
    /// misreading them.
    pub format: u32,
    /// The log's origin, as its checkpoints name it.
    pub origin: String,
    /// The name the cluster key signs checkpoints under.
    pub key_name: String,
    /// The cluster key, used when the verifier pins none (trust on first use).
    pub cluster_key: PublicKey,
    /// A signed note ([`Checkpoint::sign`]) of the log at exactly `entries`.
    pub checkpoint: String,
    /// Every entry of the log, in order: canonical JSON text.
    pub entries: Vec<String>,
}

impl AuditExport {
    /// The export of `entries`, with a fresh checkpoint of them signed by `key` under
    /// `key_name` (with the ML-DSA-65 line too when `post_quantum` and the key is
    /// hybrid).
    pub fn signed(
        origin: &str,
        key_name: &str,
        key: &IdentityKey,
        post_quantum: bool,
        entries: Vec<String>,
    ) -> Self {
        let checkpoint = Checkpoint {
            origin: origin.to_owned(),
            size: entries.len() as u64,
            root: root_of(&entries),
        };
        AuditExport {
            format: EXPORT_FORMAT,
            origin: origin.to_owned(),
            key_name: key_name.to_owned(),
            cluster_key: key.public(),
            checkpoint: checkpoint.sign(key, key_name, post_quantum),
            entries,
        }
    }

    /// The canonical file: `serde_json`'s pretty encoding and a trailing newline.
    /// [`verify_export`] refuses any other bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes =
            serde_json::to_vec_pretty(self).expect("an export is strings and numbers only");
        bytes.push(b'\n');
        bytes
    }
}

/// What a verified export proves: the log had `size` entries with this `root`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The number of entries, equal to the checkpoint's size.
    pub size: u64,
    /// Their RFC 6962 root, equal to the checkpoint's root.
    pub root: [u8; 32],
}

/// Checks an export offline:
/// - the bytes are exactly the canonical encoding of what they parse to;
/// - the checkpoint is signed by `trusted_key` (or, when `None`, by the file's own
///   `cluster_key`) under the file's `key_name`; when that key is hybrid, its
///   ML-DSA-65 line must verify too, so stripping it cannot downgrade the check;
/// - the checkpoint's origin is the file's, its size is the number of entries and its
///   root is their root;
/// - with `older` (the signed note of an earlier checkpoint of the same log, checked
///   with the same key), the older tree is a prefix of this one: a consistency proof
///   built from the entries verifies, and the older root is the root of the first
///   `older.size` entries.
pub fn verify_export(
    bytes: &[u8],
    trusted_key: Option<&PublicKey>,
    older: Option<&str>,
) -> Result<Verified, AuditError> {
    let export: AuditExport = serde_json::from_slice(bytes)
        .map_err(|e| AuditError::Malformed(format!("export file: {e}")))?;
    if export.format != EXPORT_FORMAT {
        return Err(AuditError::UnsupportedFormat(export.format));
    }
    if export.to_bytes() != bytes {
        return Err(AuditError::NotCanonical);
    }
    let key = trusted_key.unwrap_or(&export.cluster_key);
    let open = |note: &str| {
        let require_post_quantum = key.ml_dsa_bytes().is_some();
        let checkpoint = Checkpoint::open(note, key, &export.key_name, require_post_quantum)?;
        if checkpoint.origin != export.origin {
            return Err(AuditError::WrongOrigin {
                expected: export.origin.clone(),
                found: checkpoint.origin,
            });
        }
        Ok(checkpoint)
    };
    let checkpoint = open(&export.checkpoint)?;
    let entries = export.entries.len() as u64;
    if checkpoint.size != entries {
        return Err(AuditError::SizeMismatch {
            checkpoint: checkpoint.size,
            entries,
        });
    }
    let log = AuditLog::from_leaves(export.entries);
    if log.root() != checkpoint.root {
        return Err(AuditError::RootMismatch);
    }
    if let Some(older) = older {
        let older = open(older)?;
        let proof = log
            .prove_consistency(older.size)
            .ok_or(AuditError::OlderIsLarger {
                older: older.size,
                newer: checkpoint.size,
            })?;
        verify_consistency(
            &older.root,
            older.size,
            &checkpoint.root,
            checkpoint.size,
            &proof,
        )?;
        // The proof was built from these entries, so check the prefix itself as well:
        // a verifier must not rest on one construction alone.
        let prefix = usize::try_from(older.size).expect("at most the number of entries");
        if root_of(&log.leaves()[..prefix]) != older.root {
            return Err(AuditError::ConsistencyFailed);
        }
    }
    Ok(Verified {
        size: checkpoint.size,
        root: checkpoint.root,
    })
}

#[cfg(test)]
mod tests {
    use aigrid_api::KeyAlgorithm;

    use super::*;

    const ORIGIN: &str = "aigrid.test/c1/human-chain";
    const NAME: &str = "aigrid.test/c1";

    fn key(algorithm: KeyAlgorithm, seed: u8) -> IdentityKey {
        IdentityKey::from_seed(algorithm, [seed; 32])
    }

    fn entries(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!(r#"{{"kind":"applied","seq":{i}}}"#))
            .collect()
    }

    /// The signed note of the checkpoint of `entries`, as a verifier kept it.
    fn note_of(key: &IdentityKey, entries: &[String]) -> String {
        AuditExport::signed(ORIGIN, NAME, key, true, entries.to_vec()).checkpoint
    }

    #[test]
    fn an_export_verifies_with_its_own_or_a_pinned_key() {
        for algorithm in [KeyAlgorithm::Ed25519, KeyAlgorithm::Ed25519MlDsa65] {
            let k = key(algorithm, 1);
            let export = AuditExport::signed(ORIGIN, NAME, &k, true, entries(30));
            let bytes = export.to_bytes();
            assert!(bytes.ends_with(b"}\n"));
            let want = Verified {
                size: 30,
                root: root_of(&entries(30)),
            };
            assert_eq!(verify_export(&bytes, None, None), Ok(want));
            assert_eq!(verify_export(&bytes, Some(&k.public()), None), Ok(want));
            let older = note_of(&k, &entries(12));
            assert_eq!(
                verify_export(&bytes, Some(&k.public()), Some(&older)),
                Ok(want)
            );
            // The same size is a prefix of itself; so is the empty log.
            for old in [0, 30] {
                let older = note_of(&k, &entries(old));
                assert_eq!(verify_export(&bytes, None, Some(&older)), Ok(want));
            }
        }
    }

    #[test]
    fn any_changed_byte_fails() {
        let k = key(KeyAlgorithm::Ed25519, 2);
        let bytes = AuditExport::signed(ORIGIN, NAME, &k, true, entries(3)).to_bytes();
        verify_export(&bytes, None, None).unwrap();
        for i in 0..bytes.len() {
            for flip in [0x01, 0x20, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                assert!(
                    verify_export(&bad, None, None).is_err(),
                    "byte {i} ^ {flip:#x} of:\n{}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
        // Added or removed whitespace, or a compact rewrite of the same content.
        let text = String::from_utf8(bytes.clone()).unwrap();
        let export: AuditExport = serde_json::from_slice(&bytes).unwrap();
        for bad in [
            format!("{text}\n"),
            text.trim_end().to_owned(),
            text.replacen("  ", "   ", 1),
            text.replacen("\n", "\r\n", 1),
            serde_json::to_string(&export).unwrap(),
        ] {
            assert_eq!(
                verify_export(bad.as_bytes(), None, None),
                Err(AuditError::NotCanonical),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_wrong_key_fails() {
        let k = key(KeyAlgorithm::Ed25519, 3);
        let other = key(KeyAlgorithm::Ed25519, 4);
        let bytes = AuditExport::signed(ORIGIN, NAME, &k, true, entries(5)).to_bytes();
        assert!(matches!(
            verify_export(&bytes, Some(&other.public()), None),
            Err(AuditError::Unsigned { .. })
        ));
        // Re-signed by another key that the file then names: fine alone, refused
        // against the pinned key.
        let swapped = AuditExport::signed(ORIGIN, NAME, &other, true, entries(5)).to_bytes();
        verify_export(&swapped, None, None).unwrap();
        assert!(verify_export(&swapped, Some(&k.public()), None).is_err());
        // An older checkpoint by another key is no evidence.
        let older = note_of(&other, &entries(2));
        assert!(verify_export(&bytes, None, Some(&older)).is_err());
    }

    #[test]
    fn a_hybrid_key_requires_its_post_quantum_line() {
        let k = key(KeyAlgorithm::Ed25519MlDsa65, 5);
        let classic = AuditExport::signed(ORIGIN, NAME, &k, false, entries(4)).to_bytes();
        assert_eq!(
            verify_export(&classic, None, None),
            Err(AuditError::PostQuantumMissing("checkpoint"))
        );
        // A verifier that pins only the ed25519 half accepts the classic line.
        let ed_only = PublicKey::ed25519(k.public().ed25519_bytes()).unwrap();
        verify_export(&classic, Some(&ed_only), None).unwrap();
    }

    #[test]
    fn a_rewritten_log_fails_against_an_older_checkpoint() {
        let k = key(KeyAlgorithm::Ed25519, 6);
        let honest = entries(20);
        let before = note_of(&k, &honest[..10]);
        let early = note_of(&k, &honest[..5]);
        let mut rewritten = honest.clone();
        rewritten[7] = r#"{"kind":"applied","seq":"forged"}"#.to_owned();
        let bytes = AuditExport::signed(ORIGIN, NAME, &k, true, rewritten).to_bytes();
        // Alone, a re-signed rewrite is indistinguishable: that is what older
        // checkpoints kept elsewhere are for.
        verify_export(&bytes, None, None).unwrap();
        assert_eq!(
            verify_export(&bytes, None, Some(&before)),
            Err(AuditError::ConsistencyFailed)
        );
        // A checkpoint from before the rewritten entry still matches.
        verify_export(&bytes, None, Some(&early)).unwrap();
        let honest_bytes = AuditExport::signed(ORIGIN, NAME, &k, true, honest).to_bytes();
        verify_export(&honest_bytes, None, Some(&before)).unwrap();
    }

    #[test]
    fn an_older_checkpoint_must_be_smaller_and_of_the_same_log() {
        let k = key(KeyAlgorithm::Ed25519, 7);
        let bytes = AuditExport::signed(ORIGIN, NAME, &k, true, entries(8)).to_bytes();
        let larger = note_of(&k, &entries(9));
        assert_eq!(
            verify_export(&bytes, None, Some(&larger)),
            Err(AuditError::OlderIsLarger { older: 9, newer: 8 })
        );
        let elsewhere = AuditExport::signed("other/log", NAME, &k, true, entries(3)).checkpoint;
        assert!(matches!(
            verify_export(&bytes, None, Some(&elsewhere)),
            Err(AuditError::WrongOrigin { .. })
        ));
        assert!(matches!(
            verify_export(&bytes, None, Some("not a note")),
            Err(AuditError::Malformed(_))
        ));
    }

    #[test]
    fn the_checkpoint_must_cover_exactly_the_entries() {
        let k = key(KeyAlgorithm::Ed25519, 8);
        let mut export = AuditExport::signed(ORIGIN, NAME, &k, true, entries(6));
        export.entries.push(r#"{"extra":true}"#.to_owned());
        assert_eq!(
            verify_export(&export.to_bytes(), None, None),
            Err(AuditError::SizeMismatch {
                checkpoint: 6,
                entries: 7
            })
        );
        export.entries.pop();
        export.entries.swap(0, 1);
        assert_eq!(
            verify_export(&export.to_bytes(), None, None),
            Err(AuditError::RootMismatch)
        );
        export.entries.swap(0, 1);
        export.origin = "other/log".into();
        assert!(matches!(
            verify_export(&export.to_bytes(), None, None),
            Err(AuditError::WrongOrigin { .. })
        ));
        export.origin = ORIGIN.into();
        export.format = 2;
        assert_eq!(
            verify_export(&export.to_bytes(), None, None),
            Err(AuditError::UnsupportedFormat(2))
        );
        let mut value =
            serde_json::to_value(AuditExport::signed(ORIGIN, NAME, &k, true, vec![])).unwrap();
        value["extra"] = serde_json::json!(1);
        let mut bytes = serde_json::to_vec_pretty(&value).unwrap();
        bytes.push(b'\n');
        assert!(matches!(
            verify_export(&bytes, None, None),
            Err(AuditError::Malformed(_))
        ));
    }
}
