//! Checkpoints of the audit log as C2SP signed notes (`tlog-checkpoint` inside
//! `signed-note`): the cluster's signed statement "log `origin` had `size` entries
//! with root `root`".
//!
//! Why this format: it is the one transparency logs, witnesses and monitors already
//! read (Go's `sumdb/note`, sigsum, the transparency-dev tools), it is plain text a
//! person can read in an export, and it lets several signature lines sit side by
//! side, of which a verifier checks those of keys it knows and ignores the rest.
//!
//! That last property carries the post-quantum half of a hybrid cluster key: the
//! ed25519 line is standard C2SP (type `0x01`), so any C2SP tool verifies it; the
//! ML-DSA-65 line is **aigrid's own extension**, under C2SP's type `0xff` (kept for
//! signature types the spec does not define), whose key hash is
//! `SHA-256(key_name || "\n" || 0xff || "ml-dsa-65" || ML-DSA-65 key)[..4]`. Tools that
//! do not know it skip it, as C2SP asks of them.

use aigrid_api::{IdentityKey, PublicKey};
use base64::Engine;
use sha2::{Digest, Sha256};

use super::audit::AuditError;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What starts every signature line: an em dash (U+2014) and a space.
const SIG_PREFIX: &str = "\u{2014} ";
/// C2SP's signature type of ed25519.
const TYPE_ED25519: u8 = 0x01;
/// C2SP's signature type for types it does not define, followed by their name.
const TYPE_OTHER: u8 = 0xff;
/// The name after [`TYPE_OTHER`] of aigrid's ML-DSA-65 lines.
const ML_DSA_65_NAME: &[u8] = b"ml-dsa-65";
/// The longest note read: checkpoints are a few hundred bytes, hybrid ones ~5 KiB.
const MAX_NOTE_BYTES: usize = 1 << 20;
/// The most signature lines read, as Go's `sumdb/note` allows.
const MAX_SIGNATURES: usize = 100;

/// A checkpoint: the size and root of the log named `origin` at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's name, unique per cluster (e.g. `aigrid.example/cluster-1/human-chain`).
    pub origin: String,
    /// The number of entries the checkpoint covers.
    pub size: u64,
    /// The RFC 6962 root of those entries.
    pub root: [u8; 32],
}

impl Checkpoint {
    /// The note's text, which its signatures cover: origin, size in decimal and the
    /// root in standard base64, one a line.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        )
    }

    /// The signed note: body, blank line, then one signature line per scheme,
    /// `— <key_name> <base64 std(key hash 4 bytes || signature)>`.
    ///
    /// The ed25519 line is always there (C2SP type 0x01: key hash =
    /// `SHA-256(key_name || "\n" || 0x01 || 32-byte key)[..4]`). With `post_quantum`
    /// and a hybrid key, a second line carries the ML-DSA-65 signature under aigrid's
    /// own extension (type byte 0xff: key hash =
    /// `SHA-256(key_name || "\n" || 0xff || "ml-dsa-65" || key)[..4]`).
    ///
    /// `origin` and `key_name` are checked where they are configured
    /// ([`check_names`]); a note signed with a bad one would not open.
    pub fn sign(&self, key: &IdentityKey, key_name: &str, post_quantum: bool) -> String {
        debug_assert!(check_names(&self.origin, key_name).is_ok());
        let body = self.body();
        let public = key.public();
        let mut note = format!("{body}\n");
        let mut line = |hash: [u8; 4], signature: &[u8]| {
            let data = B64.encode([hash.as_slice(), signature].concat());
            note.push_str(&format!("{SIG_PREFIX}{key_name} {data}\n"));
        };
        line(
            ed25519_key_hash(key_name, &public),
            &key.sign_ed25519(body.as_bytes()),
        );
        if post_quantum {
            if let (Some(hash), Some(signature)) = (
                ml_dsa_key_hash(key_name, &public),
                key.sign_ml_dsa(body.as_bytes()),
            ) {
                line(hash, &signature);
            }
        }
        note
    }

    /// Parses a signed note and checks it was signed by `key` under `key_name`: the
    /// ed25519 line must verify; with `require_post_quantum`, the ML-DSA-65 line too
    /// (and `key` must be hybrid). Lines of unknown keys are ignored, as C2SP says; a
    /// line of `key` that does not verify fails the note, and so does a note with no
    /// line of `key`. Rejects malformed notes (no blank line, bad base64, size not a
    /// decimal, root not 32 bytes, body not exactly 3 lines, over 1 MiB).
    pub fn open(
        note: &str,
        key: &PublicKey,
        key_name: &str,
        require_post_quantum: bool,
    ) -> Result<Checkpoint, AuditError> {
        if require_post_quantum && key.ml_dsa_bytes().is_none() {
            return Err(AuditError::PostQuantumMissing("trusted key"));
        }
        let (body, lines) = split_note(note)?;
        let checkpoint = parse_body(body)?;
        let ed_hash = ed25519_key_hash(key_name, key);
        let ml_hash = ml_dsa_key_hash(key_name, key);
        let (mut ed_ok, mut ml_ok) = (false, false);
        for line in lines {
            if line.name != key_name {
                continue;
            }
            if line.hash == ed_hash {
                if ed_ok {
                    return Err(malformed("the trusted key signed twice"));
                }
                key.verify_ed25519(body.as_bytes(), &line.signature)
                    .map_err(|_| AuditError::BadSignature)?;
                ed_ok = true;
            } else if Some(line.hash) == ml_hash {
                if ml_ok {
                    return Err(malformed("the trusted key signed twice"));
                }
                key.verify_ml_dsa(body.as_bytes(), &line.signature)
                    .map_err(|_| AuditError::BadSignature)?;
                ml_ok = true;
            }
        }
        if !ed_ok {
            return Err(AuditError::Unsigned {
                key_name: key_name.to_owned(),
            });
        }
        if require_post_quantum && !ml_ok {
            return Err(AuditError::PostQuantumMissing("checkpoint"));
        }
        Ok(checkpoint)
    }

    /// The body only, without checking signatures: to read what a note claims (its
    /// origin, to pick the key) before checking it, or to show it.
    pub fn parse_unverified(note: &str) -> Result<Checkpoint, AuditError> {
        let (body, _) = split_note(note)?;
        parse_body(body)
    }
}

/// Checks a log's origin and a key name before anything is signed under them: an
/// origin is one non-empty line; a key name is non-empty, with no whitespace and no
/// `+` (C2SP's rules, which keep signature lines and verifier keys parseable).
pub fn check_names(origin: &str, key_name: &str) -> Result<(), AuditError> {
    if origin.is_empty() || origin.chars().any(|c| c < ' ') {
        return Err(malformed("a log origin is one non-empty line"));
    }
    if !valid_key_name(key_name) {
        return Err(malformed(
            "a key name is non-empty, with no whitespace and no '+'",
        ));
    }
    Ok(())
}

fn valid_key_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(char::is_whitespace) && !name.contains('+')
}

fn malformed(why: &str) -> AuditError {
    AuditError::Malformed(format!("checkpoint note: {why}"))
}

/// One signature line, decoded.
struct SignatureLine<'a> {
    name: &'a str,
    hash: [u8; 4],
    signature: Vec<u8>,
}

/// Splits a note into its signed text (with its final newline) and its signature
/// lines, checking the note's shape as C2SP does.
fn split_note(note: &str) -> Result<(&str, Vec<SignatureLine<'_>>), AuditError> {
    if note.len() > MAX_NOTE_BYTES {
        return Err(malformed("over 1 MiB"));
    }
    if note.chars().any(|c| c < ' ' && c != '\n') {
        return Err(malformed("control characters other than newline"));
    }
    // The signatures follow the last blank line; the text keeps its final newline.
    let split = note
        .rfind("\n\n")
        .ok_or_else(|| malformed("no blank line before the signatures"))?;
    let (body, signatures) = (&note[..=split], &note[split + 2..]);
    let signatures = signatures
        .strip_suffix('\n')
        .ok_or_else(|| malformed("no signature lines, or no final newline"))?;
    let mut lines = Vec::new();
    for line in signatures.split('\n') {
        if lines.len() == MAX_SIGNATURES {
            return Err(malformed("too many signature lines"));
        }
        let (name, data) = line
            .strip_prefix(SIG_PREFIX)
            .and_then(|rest| rest.split_once(' '))
            .ok_or_else(|| malformed("a signature line is not `— <name> <base64>`"))?;
        if !valid_key_name(name) {
            return Err(malformed("a signature line has an invalid key name"));
        }
        let bytes = B64
            .decode(data)
            .map_err(|_| malformed("a signature is not standard base64"))?;
        if bytes.len() < 5 {
            return Err(malformed("a signature line is too short"));
        }
        let (hash, signature) = bytes.split_at(4);
        lines.push(SignatureLine {
            name,
            hash: hash.try_into().expect("split at 4"),
            signature: signature.to_vec(),
        });
    }
    Ok((body, lines))
}

/// Reads a checkpoint's body: exactly origin, size and root lines.
fn parse_body(body: &str) -> Result<Checkpoint, AuditError> {
    let lines: Vec<&str> = body
        .strip_suffix('\n')
        .ok_or_else(|| malformed("the body does not end with a newline"))?
        .split('\n')
        .collect();
    let [origin, size, root] = lines[..] else {
        return Err(malformed("the body is not exactly origin, size and root"));
    };
    if origin.is_empty() {
        return Err(malformed("empty origin"));
    }
    let size: u64 = size
        .parse()
        .ok()
        .filter(|n: &u64| n.to_string() == size)
        .ok_or_else(|| malformed("the size is not a decimal number"))?;
    let root: [u8; 32] = B64
        .decode(root)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| malformed("the root is not 32 bytes of standard base64"))?;
    Ok(Checkpoint {
        origin: origin.to_owned(),
        size,
        root,
    })
}

/// C2SP's key hash: the first 4 bytes of `SHA-256(name || "\n" || type || key)`.
fn key_hash(key_name: &str, key_type: &[u8], key: &[u8]) -> [u8; 4] {
    let digest = Sha256::new()
        .chain_update(key_name.as_bytes())
        .chain_update(b"\n")
        .chain_update(key_type)
        .chain_update(key)
        .finalize();
    digest[..4]
        .try_into()
        .expect("SHA-256 is longer than 4 bytes")
}

fn ed25519_key_hash(key_name: &str, key: &PublicKey) -> [u8; 4] {
    key_hash(key_name, &[TYPE_ED25519], &key.ed25519_bytes())
}

fn ml_dsa_key_hash(key_name: &str, key: &PublicKey) -> Option<[u8; 4]> {
    let key_type = [&[TYPE_OTHER][..], ML_DSA_65_NAME].concat();
    key.ml_dsa_bytes()
        .map(|ml| key_hash(key_name, &key_type, ml))
}

#[cfg(test)]
mod tests {
    use aigrid_api::KeyAlgorithm;

    use super::*;

    const NAME: &str = "aigrid.test/c1";

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            origin: "aigrid.test/c1/human-chain".into(),
            size: 42,
            root: [7; 32],
        }
    }

    fn key(algorithm: KeyAlgorithm, seed: u8) -> IdentityKey {
        IdentityKey::from_seed(algorithm, [seed; 32])
    }

    #[test]
    fn the_note_has_the_c2sp_shape() {
        let cp = checkpoint();
        assert_eq!(
            cp.body(),
            "aigrid.test/c1/human-chain\n42\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n"
        );
        let k = key(KeyAlgorithm::Ed25519, 1);
        let note = cp.sign(&k, NAME, true);
        let (body, sigs) = note.split_once("\n\n").unwrap();
        assert_eq!(format!("{body}\n"), cp.body());
        let line = sigs.strip_suffix('\n').unwrap();
        assert!(!line.contains('\n'), "one line for an ed25519 key");
        let data = line.strip_prefix(&format!("\u{2014} {NAME} ")).unwrap();
        let bytes = B64.decode(data).unwrap();
        // The key hash computed by hand, then the 64-byte signature.
        let mut pre = format!("{NAME}\n").into_bytes();
        pre.push(0x01);
        pre.extend_from_slice(&k.public().ed25519_bytes());
        assert_eq!(bytes[..4], Sha256::digest(&pre)[..4]);
        assert_eq!(bytes.len(), 4 + 64);
        k.public()
            .verify_ed25519(cp.body().as_bytes(), &bytes[4..])
            .unwrap();
    }

    #[test]
    fn signed_notes_open_with_the_right_key_only() {
        for algorithm in [KeyAlgorithm::Ed25519, KeyAlgorithm::Ed25519MlDsa65] {
            let k = key(algorithm, 2);
            let note = checkpoint().sign(&k, NAME, true);
            assert_eq!(
                Checkpoint::open(&note, &k.public(), NAME, false).unwrap(),
                checkpoint()
            );
            let other = key(algorithm, 3).public();
            assert_eq!(
                Checkpoint::open(&note, &other, NAME, false),
                Err(AuditError::Unsigned {
                    key_name: NAME.into()
                })
            );
            assert!(Checkpoint::open(&note, &k.public(), "other", false).is_err());
            // The body changed under the signature.
            let forged = note.replacen("\n42\n", "\n43\n", 1);
            assert_eq!(
                Checkpoint::open(&forged, &k.public(), NAME, false),
                Err(AuditError::BadSignature)
            );
            assert_eq!(Checkpoint::parse_unverified(&forged).unwrap().size, 43);
        }
    }

    #[test]
    fn post_quantum_lines_are_required_only_when_asked() {
        let hybrid = key(KeyAlgorithm::Ed25519MlDsa65, 4);
        let pq = checkpoint().sign(&hybrid, NAME, true);
        let classic = checkpoint().sign(&hybrid, NAME, false);
        assert_eq!(pq.matches('\u{2014}').count(), 2);
        assert_eq!(classic.matches('\u{2014}').count(), 1);
        Checkpoint::open(&pq, &hybrid.public(), NAME, true).unwrap();
        Checkpoint::open(&classic, &hybrid.public(), NAME, false).unwrap();
        assert_eq!(
            Checkpoint::open(&classic, &hybrid.public(), NAME, true),
            Err(AuditError::PostQuantumMissing("checkpoint"))
        );
        let ed = key(KeyAlgorithm::Ed25519, 4);
        let note = checkpoint().sign(&ed, NAME, true);
        assert_eq!(
            Checkpoint::open(&note, &ed.public(), NAME, true),
            Err(AuditError::PostQuantumMissing("trusted key"))
        );
        // A broken ML-DSA line of the trusted key fails the note.
        let (head, last) = pq.trim_end().rsplit_once(' ').unwrap();
        let mut bytes = B64.decode(last).unwrap();
        let end = bytes.len() - 1;
        bytes[end] ^= 1;
        let broken = format!("{head} {}\n", B64.encode(&bytes));
        assert_eq!(
            Checkpoint::open(&broken, &hybrid.public(), NAME, false),
            Err(AuditError::BadSignature)
        );
        // An ed25519-only verifier of the same ed25519 key skips the ML-DSA line.
        let ed_only = PublicKey::ed25519(hybrid.public().ed25519_bytes()).unwrap();
        Checkpoint::open(&pq, &ed_only, NAME, false).unwrap();
    }

    #[test]
    fn lines_of_unknown_keys_are_ignored() {
        let k = key(KeyAlgorithm::Ed25519, 5);
        let witness = key(KeyAlgorithm::Ed25519, 6);
        let note = checkpoint().sign(&k, NAME, false);
        let witnessed = checkpoint().sign(&witness, "witness.example", false);
        let witness_line = witnessed.split_once("\n\n").unwrap().1;
        for both in [
            format!("{note}{witness_line}"),
            note.replacen("\n\n", &format!("\n\n{witness_line}"), 1),
        ] {
            Checkpoint::open(&both, &k.public(), NAME, false).unwrap();
            Checkpoint::open(&both, &witness.public(), "witness.example", false).unwrap();
        }
        let twice = format!("{note}{}", note.split_once("\n\n").unwrap().1);
        assert!(matches!(
            Checkpoint::open(&twice, &k.public(), NAME, false),
            Err(AuditError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_notes_are_refused() {
        let k = key(KeyAlgorithm::Ed25519, 8);
        let good = checkpoint().sign(&k, NAME, false);
        let sig = good.split_once("\n\n").unwrap().1;
        let bad = [
            String::new(),
            checkpoint().body(),
            good.replacen("\n\n", "\n", 1),
            good.trim_end().to_owned(),
            format!("{good}\n"),
            good.replacen("\n42\n", "\n042\n", 1),
            good.replacen("\n42\n", "\n+42\n", 1),
            good.replacen("\n42\n", "\n-1\n", 1),
            good.replacen("\n42\n", "\n4.2\n", 1),
            good.replacen("\n42\n", "\n99999999999999999999\n", 1),
            good.replacen("BwcH", "BwcHBwcH", 1),
            good.replacen("Bwc=\n", "Bw==\n", 1),
            good.replacen("Bwc=\n", "Bwc\n", 1),
            good.replacen("human-chain\n", "human-chain\nextra\n", 1),
            format!("\n42\n{}\n\n{sig}", B64.encode([7; 32])),
            good.replacen('\u{2014}', "-", 1),
            good.replacen(&format!(" {NAME} "), "  ", 1),
            good.replacen(&format!("{NAME} "), &format!("{NAME} !!"), 1),
            good.replacen(&format!("{NAME} "), "a+b ", 1),
            good.replacen("human-chain", "human\u{7}chain", 1),
            format!("{good}\u{2014} {NAME} AAAA\n"),
            format!("{good}{}", "x".repeat(MAX_NOTE_BYTES)),
        ];
        for note in bad {
            let short: String = note.chars().take(80).collect();
            assert!(
                matches!(
                    Checkpoint::open(&note, &k.public(), NAME, false),
                    Err(AuditError::Malformed(_))
                ),
                "{short:?}"
            );
            assert!(Checkpoint::parse_unverified(&note).is_err(), "{short:?}");
        }
        let many = format!("{good}{}", sig.repeat(MAX_SIGNATURES));
        assert!(Checkpoint::parse_unverified(&many).is_err());
    }

    #[test]
    fn names_are_checked_before_signing() {
        check_names("aigrid.test/c1/human-chain", NAME).unwrap();
        assert!(check_names("", NAME).is_err());
        assert!(check_names("a\nb", NAME).is_err());
        for name in ["", "a b", "a+b", "a\tb"] {
            assert!(check_names("origin", name).is_err(), "{name:?}");
        }
    }
}
