//! The manifest's rules: signatures (ed25519 and hybrid), digests, consistency.

use super::*;

fn hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

fn manifest() -> Manifest {
    let (a, b) = (ChunkDigest::of(b"a"), ChunkDigest::of(b"b"));
    let chunk = |h: &ChunkDigest, len| ChunkRef {
        blake3: h.clone(),
        len,
    };
    Manifest {
        format: MANIFEST_FORMAT,
        name: "tiny".into(),
        codec: CodecInfo {
            name: CODEC_NAME.into(),
            k: 2,
            m: 1,
        },
        chunk_size: 4,
        policy: Policy::default(),
        encryption: None,
        files: vec![
            FileEntry {
                path: "config.json".into(),
                size: 7,
                chunks: vec![chunk(&a, 4), chunk(&b, 3)],
            },
            FileEntry {
                path: "sub/copy.json".into(),
                size: 4,
                chunks: vec![chunk(&a, 4)],
            },
        ],
        stripes: vec![Stripe {
            chunks: vec![chunk(&a, 4), chunk(&b, 3)],
            len: 7,
            shard_len: 4,
            shards: (0..3).map(|i| hex(&[i as u8])).collect(),
        }],
    }
}

/// A change to the tiny manifest.
type Edit = Box<dyn Fn(&mut Manifest)>;

fn locations() -> Locations {
    Locations {
        stripes: vec![(0..3).map(|i| format!("site-{i}")).collect()],
    }
}

#[test]
fn a_hybrid_manifest_needs_both_signatures_and_cannot_be_downgraded() {
    let key = SigningKey::from_bytes(&[5; 32]);
    let signed = SignedManifest::sign_hybrid(manifest(), &key);
    assert_eq!(signed.scheme(), MANIFEST_HYBRID);
    assert_eq!(signed.verify().unwrap(), manifest().digest());
    assert_eq!(
        SignedManifest::sign(manifest(), &key).scheme(),
        MANIFEST_ED25519
    );
    // The same publisher key makes the same ML-DSA-65 key every time.
    let again = SignedManifest::sign_hybrid(manifest(), &key);
    assert_eq!(
        again.ml_dsa.as_ref().unwrap().public_key,
        signed.ml_dsa.as_ref().unwrap().public_key
    );
    // Stripped of its post-quantum half, the ed25519 signature no longer verifies.
    let mut stripped = signed.clone();
    stripped.ml_dsa = None;
    assert!(matches!(
        stripped.verify(),
        Err(ManifestError::Signature(_))
    ));
    // Another ML-DSA signature, or another ML-DSA key, fails.
    let mut forged = signed.clone();
    let other = SignedManifest::sign_hybrid(manifest(), &SigningKey::from_bytes(&[6; 32]));
    forged.ml_dsa.as_mut().unwrap().signature = other.ml_dsa.clone().unwrap().signature;
    assert!(matches!(forged.verify(), Err(ManifestError::Signature(_))));
    let mut rekeyed = signed.clone();
    rekeyed.ml_dsa = other.ml_dsa;
    assert!(matches!(rekeyed.verify(), Err(ManifestError::Signature(_))));
    // A changed manifest fails both.
    let mut altered = signed;
    altered.manifest.files[0].size += 1;
    assert!(altered.verify().is_err());
}

#[test]
fn a_signed_manifest_verifies_and_any_change_is_refused() {
    let key = SigningKey::from_bytes(&[5; 32]);
    let signed = SignedManifest::sign(manifest(), &key);
    let digest = signed.verify().unwrap();
    assert_eq!(digest, manifest().digest());
    assert_eq!(
        signed.manifest.chunk_locations()[&ChunkDigest::of(b"b")],
        (0, 4)
    );

    let mut altered = signed.clone();
    altered.manifest.files[0].size += 1;
    altered.manifest.files[0].chunks[1].len += 1;
    assert!(matches!(altered.verify(), Err(ManifestError::Signature(_))));
    let mut moved = signed.clone();
    moved.manifest.stripes[0].shards[0] = hex(b"evil");
    assert!(matches!(moved.verify(), Err(ManifestError::Signature(_))));
    // Locations are not signed: repair may move shards; they must still fit.
    let mut registration = Registration {
        manifest: signed.clone(),
        locations: locations(),
        circle: None,
    };
    assert_eq!(registration.verify().unwrap(), digest);
    registration.locations.stripes[0][1] = "site-0".into();
    assert!(matches!(
        registration.verify(),
        Err(ManifestError::Inconsistent(_))
    ));
    let mut resigned = signed.clone();
    resigned.publisher =
        SignedManifest::sign(manifest(), &SigningKey::from_bytes(&[6; 32])).publisher;
    assert!(matches!(
        resigned.verify(),
        Err(ManifestError::Signature(_))
    ));
    let mut garbled = signed.clone();
    garbled.signature = "AAAA".into();
    assert!(matches!(garbled.verify(), Err(ManifestError::Signature(_))));
}

#[test]
fn chunk_digests_are_bare_hex_on_the_wire_and_nothing_else_gets_in() {
    let mut json = serde_json::to_value(manifest()).unwrap();
    assert_eq!(
        json["files"][0]["chunks"][0]["blake3"],
        serde_json::json!(hex(b"a")),
        "written as the hex string it always was"
    );
    assert_eq!(
        serde_json::from_value::<Manifest>(json.clone()).unwrap(),
        manifest()
    );
    json["stripes"][0]["chunks"][1]["blake3"] = serde_json::json!("not hex");
    let err = serde_json::from_value::<Manifest>(json)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`not hex` is not a chunk digest"), "{err}");
}

#[test]
fn inconsistent_manifests_are_refused() {
    manifest().validate().unwrap();
    let broken: Vec<Edit> = vec![
        Box::new(|m| m.files[0].size = 8),
        Box::new(|m| m.stripes[0].shards.pop().map(|_| ()).unwrap()),
        Box::new(|m| m.stripes[0].shards[1] = "not hex".into()),
        Box::new(|m| m.stripes[0].len = 6),
        Box::new(|m| {
            m.stripes[0].chunks.pop();
            m.stripes[0].len = 4;
        }),
        Box::new(|m| m.files[1].path = "config.json".into()),
        Box::new(|m| m.files[1].path = "../escape".into()),
        Box::new(|m| m.files[1].path = "/etc/passwd".into()),
        Box::new(|m| m.files[1].path = "a//b".into()),
        Box::new(|m| m.codec.m = 0),
        Box::new(|m| m.codec.name = "other".into()),
    ];
    for (i, edit) in broken.iter().enumerate() {
        let mut m = manifest();
        edit(&mut m);
        assert!(
            matches!(m.validate(), Err(ManifestError::Inconsistent(_))),
            "case {i}"
        );
    }
}

/// Asserts each edit of the tiny manifest is refused as inconsistent, signed or
/// not, and that nothing panics on the way.
fn refused(broken: Vec<(&str, Edit)>) {
    let key = SigningKey::from_bytes(&[5; 32]);
    for (case, edit) in broken {
        let mut m = manifest();
        edit(&mut m);
        assert!(
            matches!(m.validate(), Err(ManifestError::Inconsistent(_))),
            "{case}"
        );
        let registration = Registration {
            manifest: SignedManifest::sign(m, &key),
            locations: locations(),
            circle: None,
        };
        assert!(
            matches!(registration.verify(), Err(ManifestError::Inconsistent(_))),
            "{case}"
        );
    }
}

#[test]
fn an_erasure_code_whose_size_wraps_is_refused() {
    refused(vec![
        (
            "k = usize::MAX, m = 1, no shards",
            Box::new(|m| {
                m.codec.k = usize::MAX;
                m.codec.m = 1;
                m.stripes[0].shards.clear();
                m.stripes[0].shard_len = 1;
            }),
        ),
        (
            "k = 1, m = usize::MAX",
            Box::new(|m| m.codec.m = usize::MAX),
        ),
    ]);
    let mut m = manifest();
    m.codec.k = usize::MAX;
    assert!(locations().validate(&m).is_err());
    assert_eq!(m.stored_bytes(), u64::MAX, "saturates, never panics");
}

#[test]
fn unsorted_shadowing_or_partial_file_paths_are_refused() {
    let file = |path: &str| FileEntry {
        path: path.into(),
        size: 4,
        chunks: vec![ChunkRef {
            blake3: ChunkDigest::of(b"a"),
            len: 4,
        }],
    };
    refused(vec![
        ("unsorted", Box::new(|m| m.files.swap(0, 1))),
        (
            "a file is a directory of the next",
            Box::new(move |m| m.files.insert(1, file("sub"))),
        ),
        (
            "a file is a directory of a later one",
            Box::new(move |m| {
                m.files.insert(1, file("sub"));
                m.files.insert(2, file("sub-other"));
            }),
        ),
        (
            "a partial file",
            Box::new(|m| m.files[1].path = "sub/copy.json.aigrid-partial".into()),
        ),
        (
            "a partial directory",
            Box::new(|m| m.files[1].path = "sub.aigrid-partial/copy.json".into()),
        ),
    ]);
    let mut m = manifest();
    m.files.insert(1, file("sub-other"));
    m.validate().unwrap();
}

#[test]
fn sizes_that_overflow_are_refused() {
    let c = |data: &[u8], len| ChunkRef {
        blake3: ChunkDigest::of(data),
        len,
    };
    let huge = 10_000_000_000_000_000_000u64;
    // A stripe of one huge chunk, as k = 2, m = 1 codes it: 3 shards of
    // `huge / 2` bytes fit in a u64; two such stripes do not.
    let stripe = move |data: &[u8]| Stripe {
        chunks: vec![c(data, huge)],
        len: huge,
        shard_len: huge / 2,
        shards: (0..3).map(|i| hex(&[i as u8])).collect(),
    };
    refused(vec![
        (
            "stripe chunk lengths overflow",
            Box::new(move |m| {
                m.chunk_size = u64::MAX;
                let s = &mut m.stripes[0];
                s.chunks.push(c(b"c", u64::MAX - 1));
                s.len = u64::MAX;
                s.shard_len = u64::MAX.div_ceil(2);
            }),
        ),
        (
            "shard bytes of a stripe overflow",
            Box::new(move |m| {
                let big = u64::MAX / 4 * 3;
                m.chunk_size = u64::MAX;
                let s = &mut m.stripes[0];
                s.chunks.push(c(b"c", big));
                s.len = 7 + big;
                s.shard_len = (7 + big).div_ceil(2);
            }),
        ),
        (
            "shard bytes of the model overflow",
            Box::new(move |m| {
                m.chunk_size = u64::MAX;
                m.stripes.push(stripe(b"c"));
                m.stripes.push(stripe(b"d"));
            }),
        ),
        (
            "a file's chunk lengths overflow",
            Box::new(move |m| {
                m.chunk_size = u64::MAX;
                m.stripes.push(stripe(b"c"));
                m.files[1].chunks = vec![c(b"c", huge), c(b"c", huge)];
                m.files[1].size = u64::MAX;
            }),
        ),
        (
            "the model's size overflows",
            Box::new(move |m| {
                m.chunk_size = u64::MAX;
                m.stripes.push(stripe(b"c"));
                m.files[0].chunks = vec![c(b"c", huge)];
                m.files[0].size = huge;
                m.files[1].chunks = vec![c(b"c", huge)];
                m.files[1].size = huge;
            }),
        ),
        (
            "a stored chunk longer than a chunk",
            Box::new(move |m| {
                let s = &mut m.stripes[0];
                s.chunks.push(c(b"c", 5));
                s.len = 12;
                s.shard_len = 6;
            }),
        ),
    ]);
}
