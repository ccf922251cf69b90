//! The Human Chain's audit log: an append-only RFC 6962 Merkle log of what the
//! cluster applied and of each proposal's events, with inclusion and consistency
//! proofs, so that anyone holding a signed checkpoint ([`super::note`]) can check
//! afterwards that an entry is in the log and that the log was only ever appended to.
//!
//! The tree hashing is the `ct-merkle` crate's (leaf `SHA-256(0x00 || leaf)`,
//! interior `SHA-256(0x01 || left || right)`, empty tree `SHA-256("")`); this module
//! owns the log's shape around it: leaves, their serialization, and proofs as plain
//! 32-byte hashes that travel in JSON and CLI output.
//!
//! Leaves are canonical JSON text that the caller made (sorted keys, no whitespace):
//! the log hashes exactly the bytes it stores and shows, so a reader can recompute
//! every hash from an export without knowing the Rust types that produced the
//! entries, and two servers that applied the same change hold the same bytes.
//!
//! Also here: [`AuditError`], the one error of this module and of [`super::note`]
//! and [`super::export`], each variant one line a CLI can print.

use std::fmt;
use std::sync::Arc;

use ct_merkle::mem_backed_tree::MemoryBackedTree;
use ct_merkle::{ConsistencyProof, InclusionProof, RootHash};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2_11::Sha256;

/// The largest tree size a proof is checked against: `ct-merkle`'s index arithmetic
/// holds up to `u64::MAX / 2` leaves, and no real log comes near it.
const MAX_TREE_SIZE: u64 = u64::MAX / 2;

/// Why an audit log, a checkpoint or an export does not check out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// The input does not have the expected shape.
    #[error("malformed audit data: {0}")]
    Malformed(String),
    /// A signature line by the trusted key is there but does not verify.
    #[error("the checkpoint's signature by the trusted key does not verify")]
    BadSignature,
    /// No signature line names the trusted key.
    #[error("the checkpoint carries no signature by the trusted key `{key_name}`")]
    Unsigned {
        /// The key name that was looked for.
        key_name: String,
    },
    /// A post-quantum signature was required and is missing (or the key has none).
    #[error("a post-quantum (ML-DSA-65) signature was required, but the {0} has none")]
    PostQuantumMissing(&'static str),
    /// The checkpoint is of another log.
    #[error("the checkpoint is for log `{found}`, not `{expected}`")]
    WrongOrigin {
        /// The origin expected.
        expected: String,
        /// The origin the checkpoint names.
        found: String,
    },
    /// The checkpoint's size is not the number of entries.
    #[error("the checkpoint covers {checkpoint} entries but the export holds {entries}")]
    SizeMismatch {
        /// The checkpoint's tree size.
        checkpoint: u64,
        /// The number of entries present.
        entries: u64,
    },
    /// The entries do not hash to the checkpoint's root.
    #[error("the entries do not hash to the checkpoint's root: the log was changed")]
    RootMismatch,
    /// An inclusion proof does not verify.
    #[error("the inclusion proof does not verify: the entry is not in the log at that index")]
    InclusionFailed,
    /// A consistency proof does not verify.
    #[error("the consistency proof does not verify: the older log is not a prefix of the newer")]
    ConsistencyFailed,
    /// The older checkpoint claims more entries than the newer.
    #[error("the older checkpoint covers {older} entries, more than the newer one's {newer}")]
    OlderIsLarger {
        /// The older checkpoint's size.
        older: u64,
        /// The newer checkpoint's size.
        newer: u64,
    },
    /// The export's bytes are not exactly its canonical encoding.
    #[error("the export file is not in its canonical encoding: it was edited")]
    NotCanonical,
    /// An export format this build does not read.
    #[error("unsupported audit export format {0} (this build reads format 1)")]
    UnsupportedFormat(u32),
}

/// The in-memory audit log: the leaves and every interior hash, so proofs come
/// without rehashing. Rebuilt from the leaves after a snapshot restore
/// ([`AuditLog::from_leaves`]), which is why it serializes as the leaves alone.
#[derive(Clone, Default)]
pub struct AuditLog {
    tree: MemoryBackedTree<Sha256, AuditLeaf>,
}

/// One leaf's text, shared: a copy of the log (what a snapshot captures while the
/// replica keeps applying) counts a reference per leaf instead of copying its text.
/// It reads as the `str` it holds. With 95,000 leaves the capture stopped the
/// replica's thread 38-39 ms with each leaf copied, 20 ms shared.
#[derive(Clone, PartialEq, Eq)]
pub struct AuditLeaf(Arc<str>);

impl From<String> for AuditLeaf {
    fn from(text: String) -> Self {
        AuditLeaf(text.into())
    }
}

impl std::ops::Deref for AuditLeaf {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for AuditLeaf {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for AuditLeaf {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<[u8]> for AuditLeaf {
    /// The bytes the tree hashes: the text, exactly.
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for AuditLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for AuditLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<String> for AuditLeaf {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl AuditLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// The log holding `leaves` in order: how a restored snapshot gets its tree back.
    pub fn from_leaves<L: Into<AuditLeaf>>(leaves: impl IntoIterator<Item = L>) -> Self {
        let mut log = Self::new();
        for leaf in leaves {
            log.tree.push(leaf.into());
        }
        log
    }

    /// Appends `leaf` (canonical JSON text) and returns its index.
    pub fn append(&mut self, leaf: String) -> u64 {
        let index = self.tree.len();
        self.tree.push(leaf.into());
        index
    }

    /// The number of leaves: the tree size a checkpoint names.
    pub fn len(&self) -> u64 {
        self.tree.len()
    }

    /// Whether the log has no leaves yet.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Every leaf, in order: what an export carries.
    pub fn leaves(&self) -> &[AuditLeaf] {
        self.tree.items()
    }

    /// The leaf at `index`, if the log is that long.
    pub fn leaf(&self, index: u64) -> Option<&str> {
        let index = usize::try_from(index).ok()?;
        self.tree.get(index).map(|leaf| &**leaf)
    }

    /// The RFC 6962 root of every leaf; `SHA-256("")` for the empty log.
    pub fn root(&self) -> [u8; 32] {
        hash_bytes(self.tree.root().as_bytes())
    }

    /// The audit path of leaf `index` in the tree of the current size, `None` if
    /// there is no such leaf. Checked by [`verify_inclusion`].
    pub fn prove_inclusion(&self, index: u64) -> Option<Vec<[u8; 32]>> {
        if index >= self.len() {
            return None;
        }
        let index = usize::try_from(index).ok()?;
        Some(split_hashes(self.tree.prove_inclusion(index).as_bytes()))
    }

    /// The proof that the log's first `old_size` leaves are a prefix of the current
    /// log, `None` if `old_size` exceeds the current size. Empty when `old_size` is 0
    /// (the empty tree is a prefix of every tree) or the current size. Checked by
    /// [`verify_consistency`].
    pub fn prove_consistency(&self, old_size: u64) -> Option<Vec<[u8; 32]>> {
        let len = self.len();
        if old_size > len {
            return None;
        }
        if old_size == 0 {
            return Some(Vec::new());
        }
        // ct-merkle counts the leaves added since the old tree, not the old size.
        let additions = usize::try_from(len - old_size).ok()?;
        Some(split_hashes(
            self.tree.prove_consistency(additions).as_bytes(),
        ))
    }
}

impl PartialEq for AuditLog {
    /// Two logs are equal when they hold the same leaves (the hashes follow).
    fn eq(&self, other: &Self) -> bool {
        self.tree.items() == other.tree.items()
    }
}

impl Eq for AuditLog {}

impl fmt::Debug for AuditLog {
    /// The size and root only: a log can hold many thousands of leaves.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("size", &self.len())
            .field("root", &hex::encode(self.root()))
            .finish()
    }
}

impl Serialize for AuditLog {
    /// The plain JSON list of leaf strings; the hashes are derived, never stored.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.leaves().iter().map(|leaf| &**leaf))
    }
}

impl<'de> Deserialize<'de> for AuditLog {
    /// Reads the list of leaf strings and rebuilds the tree from them.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<String>::deserialize(deserializer).map(Self::from_leaves)
    }
}

/// The RFC 6962 root of `leaves`, without keeping a log: what a verifier compares
/// against a checkpoint.
pub fn root_of<L: AsRef<str>>(leaves: &[L]) -> [u8; 32] {
    let mut tree = MemoryBackedTree::<Sha256, &str>::new();
    for leaf in leaves {
        tree.push(leaf.as_ref());
    }
    hash_bytes(tree.root().as_bytes())
}

/// Checks that `leaf` is at `index` in the tree of `size` leaves whose root is
/// `root`, given the audit path [`AuditLog::prove_inclusion`] made. As in RFC 9162, a
/// proof does not pin `size` on its own (a neighbouring size of the same height may
/// verify too): take the size and root together from a signed checkpoint.
pub fn verify_inclusion(
    root: &[u8; 32],
    size: u64,
    index: u64,
    leaf: &str,
    proof: &[[u8; 32]],
) -> Result<(), AuditError> {
    if size > MAX_TREE_SIZE {
        return Err(AuditError::Malformed(format!(
            "tree size {size} is too large"
        )));
    }
    if index >= size {
        return Err(AuditError::InclusionFailed);
    }
    let proof = InclusionProof::<Sha256>::try_from_bytes(proof.concat())
        .map_err(|_| AuditError::InclusionFailed)?;
    root_hash(root, size)
        .verify_inclusion(&leaf, index, &proof)
        .map_err(|_| AuditError::InclusionFailed)
}

/// Checks that the tree of `old_size` leaves with root `old_root` is a prefix of the
/// tree of `new_size` leaves with root `new_root`, given the proof
/// [`AuditLog::prove_consistency`] made. The empty tree is a prefix of every tree: its
/// proof is empty and its root must be `SHA-256("")`. As for inclusion, the sizes
/// come with their roots from signed checkpoints; the proof alone does not pin them.
pub fn verify_consistency(
    old_root: &[u8; 32],
    old_size: u64,
    new_root: &[u8; 32],
    new_size: u64,
    proof: &[[u8; 32]],
) -> Result<(), AuditError> {
    if new_size > MAX_TREE_SIZE {
        return Err(AuditError::Malformed(format!(
            "tree size {new_size} is too large"
        )));
    }
    if old_size > new_size {
        return Err(AuditError::OlderIsLarger {
            older: old_size,
            newer: new_size,
        });
    }
    if old_size == 0 {
        // ct-merkle has no proofs from the empty tree; RFC 9162 makes them empty.
        return if proof.is_empty() && *old_root == root_of::<&str>(&[]) {
            Ok(())
        } else {
            Err(AuditError::ConsistencyFailed)
        };
    }
    let proof = ConsistencyProof::<Sha256>::try_from_bytes(proof.concat())
        .map_err(|_| AuditError::ConsistencyFailed)?;
    root_hash(new_root, new_size)
        .verify_consistency(&root_hash(old_root, old_size), &proof)
        .map_err(|_| AuditError::ConsistencyFailed)
}

/// ct-merkle's root of a tree of `size` leaves.
fn root_hash(root: &[u8; 32], size: u64) -> RootHash<Sha256> {
    RootHash::new((*root).into(), size)
}

/// A digest as the plain bytes the rest of aigrid passes around.
fn hash_bytes(digest: &[u8]) -> [u8; 32] {
    digest
        .try_into()
        .expect("SHA-256 digests are 32 bytes long")
}

/// A proof's concatenated hashes, one by one.
fn split_hashes(bytes: &[u8]) -> Vec<[u8; 32]> {
    bytes.chunks_exact(32).map(hash_bytes).collect()
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256 as Sha256Ref};

    use super::*;

    /// Leaves as the log stores them: small canonical JSON objects.
    fn leaves(n: u64) -> Vec<String> {
        (0..n).map(|i| format!(r#"{{"i":{i}}}"#)).collect()
    }

    fn sha(parts: &[&[u8]]) -> [u8; 32] {
        let mut h = Sha256Ref::new();
        for p in parts {
            h.update(p);
        }
        h.finalize().into()
    }

    #[test]
    fn roots_match_rfc6962_computed_by_hand() {
        let empty = sha(&[b""]);
        assert_eq!(AuditLog::new().root(), empty);
        assert_eq!(root_of::<&str>(&[]), empty);
        assert_eq!(
            hex::encode(empty),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );

        let one = vec![r#"{"a":1}"#.to_owned()];
        let leaf0 = sha(&[&[0], one[0].as_bytes()]);
        assert_eq!(AuditLog::from_leaves(one.clone()).root(), leaf0);
        assert_eq!(root_of(&one), leaf0);

        // Three leaves: MTH = H(1 || H(1 || l0 || l1) || l2), the left subtree being
        // the largest power of two below the size.
        let three = leaves(3);
        let l: Vec<[u8; 32]> = three.iter().map(|x| sha(&[&[0], x.as_bytes()])).collect();
        let left = sha(&[&[1], &l[0], &l[1]]);
        assert_eq!(root_of(&three), sha(&[&[1], &left, &l[2]]));
    }

    #[test]
    fn the_log_appends_and_reads_back() {
        let mut log = AuditLog::default();
        assert!(log.is_empty());
        for (i, leaf) in leaves(5).into_iter().enumerate() {
            assert_eq!(log.append(leaf), i as u64);
        }
        assert_eq!(log.len(), 5);
        assert!(!log.is_empty());
        assert_eq!(log.leaves(), leaves(5).as_slice());
        assert_eq!(log.leaf(4), Some(r#"{"i":4}"#));
        assert_eq!(log.leaf(5), None);
        assert_eq!(log.leaf(u64::MAX), None);
        assert_eq!(log.root(), root_of(&leaves(5)));
        assert_eq!(log, AuditLog::from_leaves(leaves(5)));
        assert_ne!(log, AuditLog::from_leaves(leaves(4)));
    }

    #[test]
    fn serializes_as_the_list_of_leaves_and_rebuilds_the_tree() {
        let log = AuditLog::from_leaves(leaves(7));
        let json = serde_json::to_string(&log).unwrap();
        assert_eq!(json, serde_json::to_string(&leaves(7)).unwrap());
        let back: AuditLog = serde_json::from_str(&json).unwrap();
        assert_eq!(back, log);
        assert_eq!(back.root(), log.root());
        assert_eq!(back.prove_inclusion(3), log.prove_inclusion(3));
        assert!(serde_json::from_str::<AuditLog>(r#"{"leaves":[]}"#).is_err());

        let debug = format!("{log:?}");
        assert!(debug.contains("size: 7"), "{debug}");
        assert!(debug.contains(&hex::encode(log.root())), "{debug}");
        assert!(!debug.contains(r#""i""#), "{debug}");
    }

    #[test]
    fn every_inclusion_proof_of_sizes_1_to_20_verifies() {
        for size in 1..=20 {
            let log = AuditLog::from_leaves(leaves(size));
            let root = log.root();
            for index in 0..size {
                let proof = log.prove_inclusion(index).unwrap();
                let leaf = log.leaf(index).unwrap();
                verify_inclusion(&root, size, index, leaf, &proof)
                    .unwrap_or_else(|e| panic!("size {size} index {index}: {e}"));
            }
            assert_eq!(log.prove_inclusion(size), None);
        }
    }

    #[test]
    fn a_changed_leaf_root_index_size_or_proof_fails_inclusion() {
        let size = 13;
        let log = AuditLog::from_leaves(leaves(size));
        let root = log.root();
        for index in 0..size {
            let proof = log.prove_inclusion(index).unwrap();
            let leaf = log.leaf(index).unwrap();
            let fails = |root: &[u8; 32], size, index, leaf: &str, proof: &[[u8; 32]]| {
                assert_eq!(
                    verify_inclusion(root, size, index, leaf, proof),
                    Err(AuditError::InclusionFailed),
                    "index {index}"
                );
            };
            fails(&root, size, index, &format!("{leaf} "), &proof);
            let mut bad_root = root;
            bad_root[index as usize % 32] ^= 1;
            fails(&bad_root, size, index, leaf, &proof);
            fails(&root, size, (index + 1) % size, leaf, &proof);
            fails(&root, size, index + size, leaf, &proof);
            fails(&root, size * 2, index, leaf, &proof);
            for i in 0..proof.len() {
                let mut bad = proof.clone();
                bad[i][0] ^= 0x80;
                fails(&root, size, index, leaf, &bad);
            }
            fails(&root, size, index, leaf, &proof[1..]);
            fails(
                &root,
                size,
                index,
                leaf,
                &[proof.clone(), vec![root]].concat(),
            );
        }
        assert!(verify_inclusion(&root, u64::MAX, 0, "x", &[]).is_err());
        assert!(verify_inclusion(&root_of::<&str>(&[]), 0, 0, "x", &[]).is_err());
    }

    #[test]
    fn every_consistency_proof_of_sizes_1_to_20_verifies() {
        for size in 1..=20 {
            let all = leaves(size);
            let log = AuditLog::from_leaves(all.clone());
            for old_size in 0..=size {
                let old_root = root_of(&all[..old_size as usize]);
                let proof = log.prove_consistency(old_size).unwrap();
                verify_consistency(&old_root, old_size, &log.root(), size, &proof)
                    .unwrap_or_else(|e| panic!("{old_size} -> {size}: {e}"));
            }
            assert_eq!(log.prove_consistency(size + 1), None);
        }
        let empty = AuditLog::new();
        assert_eq!(empty.prove_consistency(0), Some(vec![]));
        verify_consistency(&empty.root(), 0, &empty.root(), 0, &[]).unwrap();
    }

    #[test]
    fn a_changed_root_size_or_proof_fails_consistency() {
        let size = 17;
        let all = leaves(size);
        let log = AuditLog::from_leaves(all.clone());
        let new_root = log.root();
        for old_size in 1..size {
            let old_root = root_of(&all[..old_size as usize]);
            let proof = log.prove_consistency(old_size).unwrap();
            let fails = |old_root: &[u8; 32],
                         old_size,
                         new_root: &[u8; 32],
                         new_size,
                         proof: &[[u8; 32]]| {
                assert!(
                    verify_consistency(old_root, old_size, new_root, new_size, proof).is_err(),
                    "{old_size} -> {new_size}"
                );
            };
            let mut bad_old = old_root;
            bad_old[3] ^= 1;
            fails(&bad_old, old_size, &new_root, size, &proof);
            let mut bad_new = new_root;
            bad_new[30] ^= 1;
            fails(&old_root, old_size, &bad_new, size, &proof);
            fails(&old_root, old_size + 1, &new_root, size, &proof);
            // A proof alone does not pin the sizes (RFC 9162's algorithm accepts 1 -> 17
            // as 1 -> 18 too): the signed checkpoint does. A tree of another height fails.
            fails(&old_root, old_size, &new_root, size * 2, &proof);
            for i in 0..proof.len() {
                let mut bad = proof.clone();
                bad[i][31] ^= 1;
                fails(&old_root, old_size, &new_root, size, &bad);
            }
            fails(&old_root, old_size, &new_root, size, &proof[1..]);
            // A rewritten prefix: the old tree had another leaf at 0.
            let mut rewritten = all[..old_size as usize].to_vec();
            rewritten[0].push(' ');
            fails(&root_of(&rewritten), old_size, &new_root, size, &proof);
        }
        // From the empty tree: only an empty proof and the empty root.
        let empty = root_of::<&str>(&[]);
        assert!(verify_consistency(&empty, 0, &new_root, size, &[new_root]).is_err());
        assert!(verify_consistency(&new_root, 0, &new_root, size, &[]).is_err());
        // Equal sizes: the roots must be equal.
        verify_consistency(&new_root, size, &new_root, size, &[]).unwrap();
        assert!(verify_consistency(&empty, size, &new_root, size, &[]).is_err());
        assert_eq!(
            verify_consistency(&new_root, size + 1, &new_root, size, &[]),
            Err(AuditError::OlderIsLarger {
                older: size + 1,
                newer: size
            })
        );
        assert!(verify_consistency(&empty, 1, &new_root, u64::MAX, &[]).is_err());
    }
}
