//! The approval matrix at the level of one ballot, in the manner of python-tuf's
//! root-rotation tests and Safe's owner checks: each way a decision can be wrong is
//! refused with its own error, and nothing passes below the threshold.

use aigrid_api::{IdentityKey, KeyAlgorithm, ProposalState};

use super::*;

fn key(seed: u8) -> IdentityKey {
    IdentityKey::from_seed(KeyAlgorithm::Ed25519, [seed; 32])
}

fn hybrid(seed: u8) -> IdentityKey {
    IdentityKey::from_seed(KeyAlgorithm::Ed25519MlDsa65, [seed; 32])
}

fn signer(k: &IdentityKey, weight: u32) -> Signer {
    Signer {
        identity: k.id(),
        public_key: k.public(),
        weight,
        new_weight: 0,
        veto: false,
    }
}

fn input<'a>(hash: &'a [u8; 32], id: &'a str, version: u64) -> DigestInput<'a> {
    DigestInput {
        cluster_id: "c1",
        circle: "lab",
        circle_version: version,
        kind: ChangeKind::JobCreate,
        payload_hash: hash,
        base_version: 0,
        proposal_id: id,
        expires_at: Timestamp::from_millis(1_000),
    }
}

/// A ballot's owned parts.
struct Box3 {
    signers: Vec<Signer>,
    threshold: u32,
    new_threshold: Option<u32>,
    require_hybrid: bool,
    digest: [u8; 32],
    decisions: Vec<DecisionRecord>,
}

impl Box3 {
    fn new(signers: Vec<Signer>, threshold: u32) -> Self {
        let hash = payload_hash(&serde_json::json!({"name": "web"}));
        Box3 {
            signers,
            threshold,
            new_threshold: None,
            require_hybrid: false,
            digest: proposal_digest(&input(&hash, "p1", 1)),
            decisions: Vec::new(),
        }
    }

    fn ballot(&self) -> Ballot<'_> {
        Ballot {
            signers: &self.signers,
            threshold: self.threshold,
            new_threshold: self.new_threshold,
            require_hybrid: self.require_hybrid,
            digest: &self.digest,
            decisions: &self.decisions,
        }
    }

    /// Admits and records `k`'s decision, as the state machine does.
    fn decide(&mut self, k: &IdentityKey, decision: Decision) -> Result<Count, ChainError> {
        let signed = sign_decision(k, &self.digest, decision);
        self.submit(&k.id(), &signed)
    }

    fn submit(&mut self, who: &IdentityId, signed: &SignedDecision) -> Result<Count, ChainError> {
        self.ballot().admit(who, signed)?;
        self.decisions.push(DecisionRecord {
            identity: who.clone(),
            decision: signed.decision,
            signature: signed.signature.clone(),
            at: Timestamp::from_millis(1),
        });
        Ok(self.ballot().count())
    }
}

#[test]
fn digests_bind_every_field() {
    let hash = payload_hash(&serde_json::json!({"a": 1}));
    let base = proposal_digest(&input(&hash, "p1", 1));
    let mut seen = vec![base];
    let other_hash = payload_hash(&serde_json::json!({"a": 2}));
    let variants = [
        DigestInput {
            cluster_id: "c2",
            ..input(&hash, "p1", 1)
        },
        DigestInput {
            circle: "lab2",
            ..input(&hash, "p1", 1)
        },
        input(&hash, "p1", 2),
        DigestInput {
            kind: ChangeKind::JobDelete,
            ..input(&hash, "p1", 1)
        },
        input(&other_hash, "p1", 1),
        DigestInput {
            base_version: 7,
            ..input(&hash, "p1", 1)
        },
        input(&hash, "p2", 1),
        DigestInput {
            expires_at: Timestamp::from_millis(1_001),
            ..input(&hash, "p1", 1)
        },
    ];
    for v in variants {
        let d = proposal_digest(&v);
        assert!(!seen.contains(&d), "{v:?} collides");
        seen.push(d);
    }
    // Field boundaries are not ambiguous.
    let a = proposal_digest(&DigestInput {
        cluster_id: "ab",
        circle: "c",
        ..input(&hash, "p1", 1)
    });
    let b = proposal_digest(&DigestInput {
        cluster_id: "a",
        circle: "bc",
        ..input(&hash, "p1", 1)
    });
    assert_ne!(a, b);
}

#[test]
fn canonical_json_ignores_key_order_and_whitespace() {
    let a: serde_json::Value =
        serde_json::from_str(r#"{"b": [1, {"y": 2, "x": 1}], "a": "s"}"#).unwrap();
    let b: serde_json::Value = serde_json::from_str(r#"{"a":"s","b":[1,{"x":1,"y":2}]}"#).unwrap();
    assert_eq!(canonical_json(&a), br#"{"a":"s","b":[1,{"x":1,"y":2}]}"#);
    assert_eq!(payload_hash(&a), payload_hash(&b));
    assert_ne!(
        payload_hash(&a),
        payload_hash(&serde_json::json!({"a": "t"}))
    );
}

#[test]
fn below_the_threshold_nothing_passes_and_each_identity_counts_once() {
    let (a, b, c) = (key(1), key(2), key(3));
    let mut bx = Box3::new(vec![signer(&a, 1), signer(&b, 1), signer(&c, 1)], 2);
    // The proposer alone in a 2-of-3 circle.
    assert!(matches!(
        bx.decide(&a, Decision::Approve),
        Ok(Count::Pending {
            have: 1,
            need: 2,
            new: None
        })
    ));
    // The same key again: refused, and the count does not move.
    assert_eq!(
        bx.decide(&a, Decision::Approve),
        Err(ChainError::AlreadyDecided(a.id()))
    );
    assert_eq!(
        bx.decide(&a, Decision::Approve).unwrap_err().code(),
        ErrorCode::AlreadyDecided
    );
    assert!(matches!(
        bx.ballot().count(),
        Count::Pending { have: 1, .. }
    ));
    // A second member reaches it.
    assert_eq!(bx.decide(&b, Decision::Approve), Ok(Count::Reached));
}

#[test]
fn two_keys_of_one_identity_count_once() {
    // The ed25519-only and the hybrid key grown from one seed share their ed25519
    // key: one person, registered twice.
    let (a, a2, b) = (key(1), hybrid(1), key(2));
    assert_ne!(a.id(), a2.id());
    let mut bx = Box3::new(vec![signer(&a, 1), signer(&a2, 1), signer(&b, 1)], 2);
    bx.decide(&a, Decision::Approve).unwrap();
    assert_eq!(
        bx.decide(&a2, Decision::Approve),
        Err(ChainError::AlreadyDecided(a2.id()))
    );
    // Even recorded (as a replica that admitted it earlier would hold it), the
    // second key adds nothing.
    bx.decisions.push(DecisionRecord {
        identity: a2.id(),
        decision: Decision::Approve,
        signature: String::new(),
        at: Timestamp::from_millis(2),
    });
    assert!(matches!(
        bx.ballot().count(),
        Count::Pending { have: 1, .. }
    ));
}

#[test]
fn strangers_wrong_digests_replays_and_forgeries_are_refused_distinctly() {
    let (a, b, c, stranger) = (key(1), key(2), key(3), key(9));
    let mut bx = Box3::new(vec![signer(&a, 1), signer(&b, 1), signer(&c, 1)], 2);
    let e = bx.decide(&stranger, Decision::Approve).unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotASigner);

    // Signed for another proposal (same circle, another id), sent here as it is.
    let hash = payload_hash(&serde_json::json!({"name": "web"}));
    let other = proposal_digest(&input(&hash, "p2", 1));
    let replayed = sign_decision(&b, &other, Decision::Approve);
    let e = bx.submit(&b.id(), &replayed).unwrap_err();
    assert_eq!(e.code(), ErrorCode::DigestMismatch);
    // ... or with this proposal's digest pasted over it: the signature fails.
    let pasted = SignedDecision {
        digest: hex::encode(bx.digest),
        ..replayed
    };
    assert_eq!(
        bx.submit(&b.id(), &pasted).unwrap_err().code(),
        ErrorCode::ApprovalInvalid
    );
    // Signed under an older version of the circle.
    let old_version = proposal_digest(&input(&hash, "p1", 0));
    let stale_sig = sign_decision(&b, &old_version, Decision::Approve);
    assert_eq!(
        bx.submit(&b.id(), &stale_sig).unwrap_err().code(),
        ErrorCode::DigestMismatch
    );
    // Someone else's signature sent as b's own.
    let forged = sign_decision(&c, &bx.digest, Decision::Approve);
    assert_eq!(
        bx.submit(&b.id(), &forged).unwrap_err().code(),
        ErrorCode::ApprovalInvalid
    );
    // An approval's signature presented as a rejection.
    let flipped = SignedDecision {
        decision: Decision::Reject,
        ..sign_decision(&b, &bx.digest, Decision::Approve)
    };
    assert_eq!(
        bx.submit(&b.id(), &flipped).unwrap_err().code(),
        ErrorCode::ApprovalInvalid
    );
    // Garbage.
    let garbage = SignedDecision {
        signature: "!!".into(),
        ..sign_decision(&b, &bx.digest, Decision::Approve)
    };
    assert_eq!(
        bx.submit(&b.id(), &garbage).unwrap_err().code(),
        ErrorCode::ApprovalInvalid
    );
    // None of it counted.
    assert!(bx.decisions.is_empty());
}

#[test]
fn vetoes_come_from_the_veto_set_only() {
    let (a, b, c) = (key(1), key(2), key(3));
    let mut vetoer = signer(&c, 1);
    vetoer.veto = true;
    let mut bx = Box3::new(vec![signer(&a, 1), signer(&b, 1), vetoer], 2);
    assert_eq!(
        bx.decide(&b, Decision::Veto).unwrap_err().code(),
        ErrorCode::NotAVetoer
    );
    bx.decide(&a, Decision::Approve).unwrap();
    assert_eq!(bx.decide(&c, Decision::Veto), Ok(Count::Vetoed));
    assert_eq!(ChainError::Vetoed.code(), ErrorCode::ProposalVetoed);
    assert_eq!(
        ChainError::Closed(ProposalState::Applied).code(),
        ErrorCode::ProposalClosed
    );
}

#[test]
fn rejections_end_it_once_the_threshold_is_out_of_reach() {
    let (a, b, c) = (key(1), key(2), key(3));
    let mut bx = Box3::new(vec![signer(&a, 1), signer(&b, 1), signer(&c, 1)], 2);
    assert!(matches!(
        bx.decide(&a, Decision::Reject),
        Ok(Count::Pending { .. })
    ));
    assert_eq!(bx.decide(&b, Decision::Reject), Ok(Count::Rejected));
}

#[test]
fn weights_decide_not_heads() {
    let (a, b, c) = (key(1), key(2), key(3));
    // 5-of-7: a (4) and c (1) reach it; a and b (2) do not... until c joins.
    let mut bx = Box3::new(vec![signer(&a, 4), signer(&b, 2), signer(&c, 1)], 5);
    bx.decide(&b, Decision::Approve).unwrap();
    assert!(matches!(
        bx.decide(&c, Decision::Approve),
        Ok(Count::Pending { have: 3, .. })
    ));
    assert_eq!(bx.decide(&a, Decision::Approve), Ok(Count::Reached));
}

#[test]
fn a_hybrid_circle_refuses_ed25519_only_decisions() {
    let (a, b) = (hybrid(1), key(2));
    let mut bx = Box3::new(vec![signer(&a, 1), signer(&b, 1)], 2);
    bx.require_hybrid = true;
    assert_eq!(
        bx.decide(&b, Decision::Approve).unwrap_err().code(),
        ErrorCode::HybridRequired
    );
    bx.decide(&a, Decision::Approve).unwrap();
    // A hybrid key's ed25519 half alone does not verify as the hybrid.
    let full = sign_decision(&a, &bx.digest, Decision::Approve);
    let raw = B64.decode(&full.signature).unwrap();
    let half = SignedDecision {
        signature: B64.encode(&raw[..64]),
        ..full
    };
    let mut fresh = Box3::new(vec![signer(&a, 1), signer(&b, 1)], 2);
    fresh.require_hybrid = true;
    assert_eq!(
        fresh.submit(&a.id(), &half).unwrap_err().code(),
        ErrorCode::ApprovalInvalid
    );
}

#[test]
fn changing_the_signers_needs_the_old_and_the_new_quorum() {
    // Old: a, b (2 of 2). New: a, b, c, d (3 of 4).
    let (a, b, c, d) = (key(1), key(2), key(3), key(4));
    let with_new = |k: &IdentityKey, old: u32, new: u32| Signer {
        new_weight: new,
        ..signer(k, old)
    };
    let mut bx = Box3::new(
        vec![
            with_new(&a, 1, 1),
            with_new(&b, 1, 1),
            with_new(&c, 0, 1),
            with_new(&d, 0, 1),
        ],
        2,
    );
    bx.new_threshold = Some(3);
    // The new members alone reach neither quorum.
    bx.decide(&c, Decision::Approve).unwrap();
    assert!(matches!(
        bx.decide(&d, Decision::Approve),
        Ok(Count::Pending {
            have: 0,
            need: 2,
            new: Some((2, 3))
        })
    ));
    // a: the new quorum is reached, the old is not.
    assert!(matches!(
        bx.decide(&a, Decision::Approve),
        Ok(Count::Pending {
            have: 1,
            new: Some((3, 3)),
            ..
        })
    ));
    assert_eq!(bx.decide(&b, Decision::Approve), Ok(Count::Reached));

    // Lowering a 2-of-2 to 1-of-1 by removing b: b must agree (old quorum).
    let mut shrink = Box3::new(vec![with_new(&a, 1, 1), with_new(&b, 1, 0)], 2);
    shrink.new_threshold = Some(1);
    assert!(matches!(
        shrink.decide(&a, Decision::Approve),
        Ok(Count::Pending { .. })
    ));
    assert_eq!(shrink.decide(&b, Decision::Approve), Ok(Count::Reached));
}

#[test]
fn a_one_member_circle_approves_its_own() {
    let a = key(1);
    let mut bx = Box3::new(vec![signer(&a, 1)], 1);
    assert_eq!(bx.decide(&a, Decision::Approve), Ok(Count::Reached));
}
