//! The dispersed store end to end over real local-directory backends: losses, damage,
//! dedup, lazy reads, repair and refusals, as a user of `push`, `pull`, the reader and
//! `repair` sees them. Random choices are seeded; a failure prints its seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aigrid_store::backend::Backend;
use aigrid_store::codec::Params;
use aigrid_store::crypto::ModelKey;
use aigrid_store::manifest::{shard_object, ManifestError, Registration};
use aigrid_store::placement::{PlacementError, Policy};
use aigrid_store::reader::ReaderOptions;
use aigrid_store::repair::FaultKind;
use aigrid_store::store::{PushOptions, Store, StoreError};
use ed25519_dalek::SigningKey;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};

const MIB: usize = 1 << 20;

fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

/// `n` local backends `site-i` under `root`, each on its own site; countries
/// alternate BE, NL.
fn backends(root: &Path, n: usize) -> Vec<Backend> {
    (0..n)
        .map(|i| {
            let mut b =
                Backend::local(format!("site-{i}"), &root.join(format!("site-{i}"))).unwrap();
            b.attributes = BTreeMap::from([
                ("site".to_owned(), format!("s{i}")),
                (
                    "country".to_owned(),
                    if i % 2 == 0 { "BE" } else { "NL" }.to_owned(),
                ),
            ]);
            b
        })
        .collect()
}

fn shard_path(root: &Path, backend: &str, digest: &str) -> PathBuf {
    root.join(backend).join(shard_object(digest))
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0u8; len];
    rng.fill_bytes(&mut out);
    out
}

fn total_put(store: &Store) -> u64 {
    store.backends().iter().map(|b| b.stats().bytes_put).sum()
}

fn total_got(store: &Store) -> u64 {
    store.backends().iter().map(|b| b.stats().bytes_got).sum()
}

/// Every subset of `0..n` of size `r`.
fn subsets(n: usize, r: usize) -> Vec<Vec<usize>> {
    (0u64..(1 << n))
        .filter(|mask| mask.count_ones() as usize == r)
        .map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_m_lost_shards_pull_back_the_same_bytes_and_m_plus_one_name_file_and_stripe() {
    let seed: u64 = std::env::var("AIGRID_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("loss table seed {seed} (rerun with AIGRID_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let chunk = MIB;
    for (k, m) in [(2, 1), (4, 2), (6, 3), (10, 4)] {
        for size in [0, 1, chunk - 1, chunk, chunk + 1, 37 * MIB] {
            let root = tempfile::tempdir().unwrap();
            let model = root.path().join("model");
            std::fs::create_dir_all(model.join("sub")).unwrap();
            let bytes = random_bytes(seed ^ size as u64, size);
            std::fs::write(model.join("sub/weights.bin"), &bytes).unwrap();
            let store = Store::new(backends(root.path(), k + m));
            let mut opts = PushOptions::new("m", Params { k, m });
            opts.chunk_size = chunk as u64;
            let pushed = store.push(&model, &opts, &signing_key()).await.unwrap();
            let reg = &pushed.registration;
            let manifest = &reg.manifest.manifest;
            let n = k + m;
            // Which shard indices to drop from every stripe.
            let mut losses: Vec<Vec<usize>> = Vec::new();
            if n <= 6 {
                for r in 0..=m {
                    losses.extend(subsets(n, r));
                }
            } else {
                let mut all: Vec<usize> = (0..n).collect();
                for r in 0..=m {
                    for _ in 0..3 {
                        all.shuffle(&mut rng);
                        losses.push(all[..r].to_vec());
                    }
                }
            }
            let mut fatal: Vec<Vec<usize>> = Vec::new();
            let mut all: Vec<usize> = (0..n).collect();
            for _ in 0..2 {
                all.shuffle(&mut rng);
                fatal.push(all[..m + 1].to_vec());
            }
            let cases = losses
                .into_iter()
                .map(|l| (l, true))
                .chain(fatal.into_iter().map(|l| (l, false)));
            for (case, (lost, survives)) in cases.enumerate() {
                let mut removed = Vec::new();
                for (s, stripe) in manifest.stripes.iter().enumerate() {
                    for &j in &lost {
                        let path = shard_path(
                            root.path(),
                            &reg.locations.stripes[s][j],
                            &stripe.shards[j],
                        );
                        if let Ok(data) = std::fs::read(&path) {
                            std::fs::remove_file(&path).unwrap();
                            removed.push((path, data));
                        }
                    }
                }
                let dest = root.path().join(format!("out-{case}"));
                let result = store.pull(reg, &dest, None).await;
                let what = format!("{k}+{m} size {size} lost {lost:?} (seed {seed})");
                if survives || manifest.stripes.is_empty() {
                    result.unwrap_or_else(|e| panic!("{what}: {e}"));
                    let back = std::fs::read(dest.join("sub/weights.bin")).unwrap();
                    assert!(back == bytes, "{what}: different bytes");
                } else {
                    let err = result.expect_err(&what);
                    assert!(
                        matches!(&err, StoreError::Unrecoverable { file, stripe, .. }
                            if file == "sub/weights.bin" && *stripe < manifest.stripes.len()),
                        "{what}: {err}"
                    );
                    let text = err.to_string();
                    assert!(
                        text.contains("sub/weights.bin") && text.contains("stripe"),
                        "{text}"
                    );
                    assert!(
                        !dest.join("sub/weights.bin").exists(),
                        "{what}: wrote a file"
                    );
                    let leftovers = std::fs::read_dir(dest.join("sub"))
                        .map(|d| d.count())
                        .unwrap_or(0);
                    assert_eq!(leftovers, 0, "{what}: left a partial file");
                }
                for (path, data) in removed {
                    std::fs::write(path, data).unwrap();
                }
                std::fs::remove_dir_all(&dest).ok();
            }
        }
    }
}

/// Writes a safetensors file of `tensors` (name, bytes) as F32 vectors.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (name, data) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": [data.len() / 4], "data_offsets": [at, at + data.len()]}),
        );
        at += data.len();
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    for (_, data) in tensors {
        out.extend_from_slice(data);
    }
    std::fs::write(path, out).unwrap();
}

fn tensors(seed: u64, count: usize, each: usize) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| {
            (
                format!("layer.{i:02}.weight"),
                random_bytes(seed + i as u64, each),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_reads_as_a_missing_shard_and_scrub_reports_it_and_forgeries_are_refused() {
    let seed: u64 = rand::random();
    eprintln!("corruption seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let bytes = random_bytes(seed, 3 * MIB + 17);
    std::fs::write(model.join("weights.bin"), &bytes).unwrap();
    let store = Store::new(backends(root.path(), 6));
    let mut opts = PushOptions::new("m", Params { k: 4, m: 2 });
    opts.chunk_size = 256 * 1024;
    let reg = store
        .push(&model, &opts, &signing_key())
        .await
        .unwrap()
        .registration;
    let manifest = &reg.manifest.manifest;
    let s = rng.random_range(0..manifest.stripes.len());
    let j = rng.random_range(0..6);
    let path = shard_path(
        root.path(),
        &reg.locations.stripes[s][j],
        &manifest.stripes[s].shards[j],
    );
    let mut data = std::fs::read(&path).unwrap();
    let bit = rng.random_range(0..data.len() * 8);
    data[bit / 8] ^= 1 << (bit % 8);
    std::fs::write(&path, data).unwrap();

    let dest = root.path().join("out");
    store.pull(&reg, &dest, None).await.unwrap();
    assert!(
        std::fs::read(dest.join("weights.bin")).unwrap() == bytes,
        "seed {seed}"
    );
    let reader = store.reader(&reg, ReaderOptions::default()).unwrap();
    assert!(
        reader.read_file("weights.bin").await.unwrap() == bytes,
        "seed {seed}"
    );
    let scrub = store.scrub(&reg).await.unwrap();
    assert_eq!(scrub.faults.len(), 1, "seed {seed}: {scrub:?}");
    assert_eq!((scrub.faults[0].stripe, scrub.faults[0].shard), (s, j));
    assert_eq!(scrub.faults[0].kind, FaultKind::Corrupt);

    // An altered manifest or signature is refused before anything is read.
    let mut forged = reg.clone();
    forged.manifest.manifest.files[0].path = "other.bin".into();
    let mut resigned = reg.clone();
    resigned.manifest.signature = SigningKey::from_bytes(&[9; 32]).sign_manifest_for_test(&reg);
    for bad in [forged, resigned] {
        let got = store.got_nothing_for(&bad, root.path()).await;
        assert!(
            matches!(got, Err(StoreError::Manifest(ManifestError::Signature(_)))),
            "{got:?}"
        );
    }
}

/// Test helpers that read nicely above.
trait ForgeSignature {
    fn sign_manifest_for_test(&self, reg: &Registration) -> String;
}

impl ForgeSignature for SigningKey {
    fn sign_manifest_for_test(&self, reg: &Registration) -> String {
        aigrid_store::manifest::SignedManifest::sign(reg.manifest.manifest.clone(), self).signature
    }
}

trait PullNothing {
    async fn got_nothing_for(&self, reg: &Registration, root: &Path) -> Result<(), StoreError>;
}

impl PullNothing for Store {
    async fn got_nothing_for(&self, reg: &Registration, root: &Path) -> Result<(), StoreError> {
        let before = total_got(self);
        let dest = root.join("forged");
        let result = self.pull(reg, &dest, None).await.map(|_| ());
        assert!(self.reader(reg, ReaderOptions::default()).is_err());
        assert!(self.scrub(reg).await.is_err());
        assert_eq!(
            total_got(self),
            before,
            "a forged manifest made the store read"
        );
        assert!(!dest.exists());
        result
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_model_differing_in_one_tensor_uploads_only_that_tensor() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::new(backends(root.path(), 6));
    let (k, m) = (4, 2);
    let each = 512 * 1024;
    let first = tensors(1, 8, each);
    let a = root.path().join("a");
    std::fs::create_dir_all(&a).unwrap();
    write_safetensors(&a.join("model.safetensors"), &first);
    std::fs::write(a.join("config.json"), br#"{"hidden": 64}"#).unwrap();
    let mut opts = PushOptions::new("a", Params { k, m });
    opts.chunk_size = 256 * 1024;
    let before = total_put(&store);
    let pa = store.push(&a, &opts, &signing_key()).await.unwrap();
    let sent_a = total_put(&store) - before;
    assert_eq!(sent_a, pa.stats.bytes_uploaded);

    let mut second = first.clone();
    second[5].1 = random_bytes(99, each);
    let b = root.path().join("b");
    std::fs::create_dir_all(&b).unwrap();
    write_safetensors(&b.join("model.safetensors"), &second);
    std::fs::write(b.join("config.json"), br#"{"hidden": 64}"#).unwrap();
    opts.name = "b".into();
    // A stranger's models are never trusted for dedup; the publisher's own are.
    let mut stranger = pa.registration.clone();
    stranger.manifest = aigrid_store::manifest::SignedManifest::sign(
        stranger.manifest.manifest,
        &SigningKey::from_bytes(&[2; 32]),
    );
    opts.known = vec![stranger];
    let before = total_put(&store);
    let alone = store.push(&b, &opts, &signing_key()).await.unwrap();
    assert_eq!(alone.stats.stripes_reused, 0);
    assert!(
        total_put(&store) - before > sent_a / 2,
        "a stranger's stripes were reused"
    );
    store
        .remove(&alone.registration, std::slice::from_ref(&pa.registration))
        .await
        .unwrap();
    opts.known = vec![pa.registration.clone()];
    let before = total_put(&store);
    let pb = store.push(&b, &opts, &signing_key()).await.unwrap();
    let sent_b = total_put(&store) - before;
    // The changed tensor is two 256 KiB chunks: one stripe of 512 KiB, coded 4+2.
    let tensor_coded = (each * (k + m) / k) as u64;
    eprintln!(
        "first push sent {sent_a} bytes, second {sent_b} (changed tensor coded: {tensor_coded})"
    );
    assert_eq!(
        sent_b, tensor_coded,
        "only the changed tensor's chunks are uploaded"
    );
    assert!(sent_b * 8 < sent_a);
    assert_eq!(pb.stats.bytes_uploaded, sent_b);
    assert_eq!(pb.stats.dedup_bytes, pb.stats.total_bytes - each as u64);

    // Both pull whole; removing the first keeps every shard the second uses.
    let dest = root.path().join("pulled-b");
    let b_stripes = &pb.registration.manifest.manifest.stripes;
    let only_a = pa
        .registration
        .manifest
        .manifest
        .stripes
        .iter()
        .filter(|s| !b_stripes.contains(s))
        .count();
    let deleted = store
        .remove(&pa.registration, std::slice::from_ref(&pb.registration))
        .await
        .unwrap();
    assert_eq!(
        deleted,
        only_a * (k + m),
        "only stripes the second model does not share go"
    );
    store.pull(&pb.registration, &dest, None).await.unwrap();
    assert!(
        std::fs::read(dest.join("model.safetensors")).unwrap()
            == std::fs::read(b.join("model.safetensors")).unwrap()
    );
    // Removing the last model empties the backends.
    store.remove(&pb.registration, &[]).await.unwrap();
    for i in 0..6 {
        assert!(
            walkdir(&root.path().join(format!("site-{i}"))).is_empty(),
            "site-{i} keeps shards"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_one_tensor_of_a_200_mib_model_fetches_under_a_tenth_of_it() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::new(backends(root.path(), 6));
    let model = root.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let all = tensors(7, 50, 4 * MIB);
    write_safetensors(&model.join("model.safetensors"), &all);
    let opts = PushOptions::new("big", Params { k: 4, m: 2 });
    let reg = store
        .push(&model, &opts, &signing_key())
        .await
        .unwrap()
        .registration;
    let size = reg.manifest.manifest.size();
    assert!(size >= 200 * MIB as u64);

    let cache_dir = root.path().join("cache");
    let cache = std::sync::Arc::new(
        aigrid_store::cache::ChunkCache::open(&cache_dir, 64 * MIB as u64).unwrap(),
    );
    let reader = store
        .reader(
            &reg,
            ReaderOptions {
                cache: Some(cache.clone()),
                ..Default::default()
            },
        )
        .unwrap();
    let before = total_got(&store);
    let view = reader.safetensors("model.safetensors").await.unwrap();
    assert_eq!(view.names().count(), 50);
    let tensor = view.tensor("layer.31.weight").await.unwrap();
    assert!(tensor == all[31].1);
    let fetched = total_got(&store) - before;
    eprintln!(
        "one tensor of {size} bytes fetched {fetched} bytes ({:.2}%)",
        fetched as f64 * 100.0 / size as f64
    );
    assert!(fetched * 10 < size, "fetched {fetched} of {size}");

    // A second read comes from the cache; the cache survives a restart.
    let before = total_got(&store);
    assert!(view.tensor("layer.31.weight").await.unwrap() == all[31].1);
    assert_eq!(total_got(&store), before);
    drop(view);
    drop(reader);
    let cache = std::sync::Arc::new(
        aigrid_store::cache::ChunkCache::open(&cache_dir, 64 * MIB as u64).unwrap(),
    );
    let reader = store
        .reader(
            &reg,
            ReaderOptions {
                cache: Some(cache),
                ..Default::default()
            },
        )
        .unwrap();
    let view = reader.safetensors("model.safetensors").await.unwrap();
    assert!(view.tensor("layer.31.weight").await.unwrap() == all[31].1);
    assert_eq!(
        total_got(&store),
        before,
        "served from the cache after restart"
    );
    // Ranges across tensors are exact.
    let header = reader.read_at("model.safetensors", 0, 8).await.unwrap();
    let data_start = 8 + u64::from_le_bytes(header[..].try_into().unwrap());
    let span = reader
        .read_at("model.safetensors", data_start + 4 * MIB as u64 - 3, 10)
        .await
        .unwrap();
    assert_eq!(&span[..3], &all[0].1[4 * MIB - 3..]);
    assert_eq!(&span[3..], &all[1].1[..7]);
    assert!(matches!(
        reader.read_at("model.safetensors", size - 1, 2).await,
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        reader.read_at("nope", 0, 1).await,
        Err(StoreError::NoSuchFile(_))
    ));

    // A lost data shard under a partial read: the stripe is rebuilt from any k,
    // the requests already out counting among them.
    for (i, stripe) in reg.manifest.manifest.stripes.iter().enumerate() {
        let path = shard_path(root.path(), &reg.locations.stripes[i][0], &stripe.shards[0]);
        let _ = std::fs::remove_file(path);
    }
    let reader = store.reader(&reg, ReaderOptions::default()).unwrap();
    let view = reader.safetensors("model.safetensors").await.unwrap();
    let before = total_got(&store);
    let (name, bytes) = &all[7];
    assert!(view.tensor(name).await.unwrap() == *bytes, "{name}");
    let fetched = total_got(&store) - before;
    let stats = reader.stats();
    assert!(stats.reconstructed > 0 && stats.bad_shards > 0, "{stats:?}");
    assert!(fetched * 10 < size, "fetched {fetched} of {size}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_restores_a_wiped_backend_so_m_other_losses_are_survivable() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::new(backends(root.path(), 6));
    let model = root.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let bytes = random_bytes(3, 5 * MIB + 3);
    std::fs::write(model.join("w.bin"), &bytes).unwrap();
    let mut opts = PushOptions::new("m", Params { k: 4, m: 2 });
    opts.chunk_size = 256 * 1024;
    let reg = store
        .push(&model, &opts, &signing_key())
        .await
        .unwrap()
        .registration;
    // Wipe every shard on site-0.
    std::fs::remove_dir_all(root.path().join("site-0/shards")).unwrap();
    let report = store.repair(&reg).await.unwrap();
    assert!(report
        .scrub
        .faults
        .iter()
        .all(|f| f.backend == "site-0" && f.kind == FaultKind::Missing));
    assert!(!report.scrub.faults.is_empty());
    assert_eq!(report.rebuilt, report.scrub.faults.len());
    assert_eq!(report.failed, 0);
    assert!(store.scrub(&reg).await.unwrap().healthy());
    // Then lose two other backends entirely: the model still pulls.
    let survivors = Store::new(store.backends()[..4].to_vec());
    let dest = root.path().join("out");
    survivors.pull(&reg, &dest, None).await.unwrap();
    assert!(std::fs::read(dest.join("w.bin")).unwrap() == bytes);

    // A backend that is gone for good: its shards move to a spare backend the policy
    // allows, and the new locations say so.
    let mut with_spare = backends(root.path(), 7);
    with_spare.remove(2);
    let store = Store::new(with_spare);
    let report = store.repair(&reg).await.unwrap();
    assert!(report
        .scrub
        .faults
        .iter()
        .all(|f| f.kind == FaultKind::UnknownBackend));
    assert_eq!(report.moved, report.scrub.faults.len());
    let moved = Registration {
        locations: report.locations.clone(),
        ..reg.clone()
    };
    moved.verify().unwrap();
    assert!(moved
        .locations
        .stripes
        .iter()
        .flatten()
        .all(|b| b != "site-2"));
    assert!(store.scrub(&moved).await.unwrap().healthy());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_anything_is_written() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::new(backends(root.path(), 6));
    let key = signing_key();
    let model = root.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("a.bin"), b"hello").unwrap();
    let shards_written = || total_put(&store);

    let opts = PushOptions::new("m", Params { k: 4, m: 2 });
    assert!(matches!(
        store.push(&root.path().join("missing"), &opts, &key).await,
        Err(StoreError::Io { .. })
    ));

    // k+m larger than the backends the policy allows.
    let mut big = PushOptions::new("m", Params { k: 4, m: 3 });
    big.policy = Policy::default();
    let err = store.push(&model, &big, &key).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Placement(PlacementError::TooFewBackends { need: 7, .. })
        ),
        "{err}"
    );
    let mut be_only = PushOptions::new("m", Params { k: 2, m: 2 });
    be_only.policy = Policy::parse(&["country in BE"]).unwrap();
    let err = store.push(&model, &be_only, &key).await.unwrap_err();
    assert!(err.to_string().contains("allows 3 of the 6"), "{err}");
    // Unsatisfiable: two sites only, at most one shard per site.
    let mut on_two_sites = backends(root.path(), 6);
    for (i, b) in on_two_sites.iter_mut().enumerate() {
        b.attributes
            .insert("site".into(), if i < 3 { "x" } else { "y" }.into());
    }
    let two_sites = Store::new(on_two_sites);
    let mut spread = PushOptions::new("m", Params { k: 2, m: 1 });
    spread.policy = Policy::parse(&["max 1 per site"]).unwrap();
    let err = two_sites.push(&model, &spread, &key).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Placement(PlacementError::Unsatisfiable { .. })
        ),
        "{err}"
    );

    #[cfg(unix)]
    {
        // A link to a file is pushed as the file; one leading nowhere is refused.
        std::os::unix::fs::symlink(model.join("a.bin"), model.join("linked.bin")).unwrap();
        std::os::unix::fs::symlink(root.path().join("gone"), model.join("dangling.bin")).unwrap();
        let err = store.push(&model, &opts, &key).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Io { .. }) && err.to_string().contains("dangling.bin"),
            "{err}"
        );
        std::fs::remove_file(model.join("dangling.bin")).unwrap();
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let locked = model.join("locked.bin");
        std::fs::write(&locked, b"secret").unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        if std::fs::read(&locked).is_err() {
            // (root reads anything; the check only means something for other users)
            let err = store.push(&model, &opts, &key).await.unwrap_err();
            assert!(err.to_string().contains("locked.bin"), "{err}");
        }
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    assert_eq!(shards_written(), 0, "a refused push wrote shards");
    let pushed = store.push(&model, &opts, &key).await.unwrap().registration;
    let paths: Vec<&str> = pushed
        .manifest
        .manifest
        .files
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert!(paths.contains(&"linked.bin"), "{paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_models_keep_plaintext_off_the_backends() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::new(backends(root.path(), 3));
    let model = root.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let secret = b"the quick brown fox jumps over the lazy dog ".repeat(5000);
    std::fs::write(model.join("weights.bin"), &secret).unwrap();
    let owner = ModelKey::from_bytes([4; 32]);
    let mut opts = PushOptions::new("private", Params { k: 2, m: 1 });
    opts.chunk_size = 64 * 1024;
    opts.key = Some(owner.clone());
    let reg = store
        .push(&model, &opts, &signing_key())
        .await
        .unwrap()
        .registration;
    assert!(reg.manifest.manifest.encryption.is_some());
    for b in 0..3 {
        for entry in walkdir(&root.path().join(format!("site-{b}"))) {
            let data = std::fs::read(entry).unwrap();
            assert!(
                !data.windows(19).any(|w| w == b"the quick brown fox"),
                "plaintext on a backend"
            );
        }
    }
    let dest = root.path().join("out");
    assert!(matches!(
        store.pull(&reg, &dest, None).await,
        Err(StoreError::KeyRequired { .. })
    ));
    assert!(matches!(
        store
            .pull(&reg, &dest, Some(&ModelKey::from_bytes([5; 32])))
            .await,
        Err(StoreError::WrongKey { .. })
    ));
    store.pull(&reg, &dest, Some(&owner)).await.unwrap();
    assert!(std::fs::read(dest.join("weights.bin")).unwrap() == secret);
    let reader = store
        .reader(
            &reg,
            ReaderOptions {
                key: Some(owner),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        &reader.read_at("weights.bin", 4, 5).await.unwrap()[..],
        b"quick"
    );
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walkdir(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
