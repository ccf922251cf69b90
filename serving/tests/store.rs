//! Serving a model from the dispersed store: loaded through the verified lazy reader,
//! the same answers as from its directory; a shard lost or damaged is healed from
//! parity; a weight chunk whose bytes were changed never becomes ready.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aigrid_serving::server::Limits;
use aigrid_serving::ModelSource;
use aigrid_store::backend::Backend;
use aigrid_store::cache::ChunkCache;
use aigrid_store::codec::{Codec, Params};
use aigrid_store::manifest::{shard_object, Registration};
use aigrid_store::reader::ReaderOptions;
use aigrid_store::store::{PushOptions, Store};
use common::{assert_openai_error, start, tiny_model};
use ed25519_dalek::SigningKey;
use serde_json::json;

const K: usize = 4;
const M: usize = 2;

fn store(root: &Path) -> Store {
    let backends = (0..K + M)
        .map(|i| {
            let mut b =
                Backend::local(format!("site-{i}"), &root.join(format!("site-{i}"))).unwrap();
            b.attributes = BTreeMap::from([("site".to_owned(), format!("s{i}"))]);
            b
        })
        .collect();
    Store::new(backends)
}

async fn push(root: &Path, model: &Path) -> Registration {
    let mut opts = PushOptions::new("tiny", Params { k: K, m: M });
    opts.chunk_size = 64 << 10;
    store(root)
        .push(model, &opts, &SigningKey::from_bytes(&[3; 32]))
        .await
        .unwrap()
        .registration
}

fn source(root: &Path, registration: &Registration, cache: &Path) -> ModelSource {
    let cache = Arc::new(ChunkCache::open(cache, 1 << 30).unwrap());
    let reader = store(root)
        .reader(
            registration,
            ReaderOptions {
                cache: Some(cache),
                ..ReaderOptions::default()
            },
        )
        .unwrap();
    ModelSource::Store(Arc::new(reader))
}

fn shard_file(
    root: &Path,
    registration: &Registration,
    stripe: usize,
    shard: usize,
) -> std::path::PathBuf {
    let backend = &registration.locations.stripes[stripe][shard];
    let digest = &registration.manifest.manifest.stripes[stripe].shards[shard];
    root.join(backend).join(shard_object(digest))
}

/// A stripe holding only weight bytes (not the first of model.safetensors, which holds
/// its header).
fn weight_stripe(registration: &Registration) -> usize {
    let manifest = &registration.manifest.manifest;
    let file = manifest
        .files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .unwrap();
    let middle = &file.chunks[file.chunks.len() / 2].blake3;
    manifest
        .stripes
        .iter()
        .position(|s| s.chunks.iter().any(|c| &c.blake3 == middle))
        .unwrap()
}

async fn completion(server: &common::Running) -> (u16, serde_json::Value) {
    server
        .post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "Models live in", "max_tokens": 20, "temperature": 0}),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_from_the_store_answers_like_its_directory_and_heals_a_bad_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model(&dir);
    let root = tmp.path().join("sites");
    let registration = push(&root, &dir).await;

    let local = start(ModelSource::Dir(dir.clone()), "tiny", Limits::default()).await;
    local.wait_ready(Duration::from_secs(60)).await;
    let (_, expect) = completion(&local).await;

    // One bit flipped in one shard of a weight stripe, another shard deleted: parity
    // makes up for both.
    let stripe = weight_stripe(&registration);
    let flipped = shard_file(&root, &registration, stripe, 1);
    let mut bytes = std::fs::read(&flipped).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x10;
    std::fs::write(&flipped, bytes).unwrap();
    std::fs::remove_file(shard_file(&root, &registration, stripe, 0)).unwrap();

    let served = start(
        source(&root, &registration, &tmp.path().join("cache")),
        "tiny",
        Limits::default(),
    )
    .await;
    served.wait_ready(Duration::from_secs(60)).await;
    let (status, got) = completion(&served).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["choices"][0]["text"], expect["choices"][0]["text"]);
    let report = served.status().await;
    assert_eq!(report["phase"], "ready");
    assert_eq!(report["kind"], "generation");
    assert_eq!(report["precision"], "f32");
    assert_eq!(report["bytes_loaded"], report["bytes_total"], "{report}");
    let weights = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(report["bytes_total"], weights);
    assert_eq!(
        report["model"],
        registration.manifest.manifest.digest().as_str()
    );
    // The stripe missing a data shard was rebuilt from parity.
    assert!(
        report["store"]["stripes_reconstructed"].as_u64().unwrap() >= 1,
        "{report}"
    );
    // The digest is a name too.
    let (status, _) = served
        .post(
            "/v1/completions",
            &json!({"model": registration.manifest.manifest.digest(), "prompt": "x", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_chunk_with_one_flipped_bit_never_becomes_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model(&dir);
    let root = tmp.path().join("sites");
    let registration = push(&root, &dir).await;

    // Change one bit of one weight chunk, and rewrite the stripe's parity to match, as
    // someone altering the stored model consistently would: every shard file still
    // decodes, but the bytes are not the ones the signed manifest pins.
    let stripe = weight_stripe(&registration);
    let data: Vec<Vec<u8>> = (0..K)
        .map(|i| std::fs::read(shard_file(&root, &registration, stripe, i)).unwrap())
        .collect();
    let mut data = data;
    data[0][7] ^= 0x01;
    std::fs::write(shard_file(&root, &registration, stripe, 0), &data[0]).unwrap();
    let codec = Codec::new(Params { k: K, m: M }).unwrap();
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    for (j, parity) in codec.encode_parity(&refs).unwrap().into_iter().enumerate() {
        std::fs::write(shard_file(&root, &registration, stripe, K + j), parity).unwrap();
    }

    let served = start(
        source(&root, &registration, &tmp.path().join("cache")),
        "tiny",
        Limits::default(),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let report = loop {
        let report = served.status().await;
        if report["phase"] == "failed" {
            break report;
        }
        assert_ne!(report["phase"], "ready", "a tampered model became ready");
        assert!(std::time::Instant::now() < deadline, "{report}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        report["error"].as_str().unwrap().contains("stripe"),
        "{report}"
    );
    let ready = served
        .client
        .get(format!("{}/ready", served.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let health = served
        .client
        .get(format!("{}/health", served.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let (status, body) = completion(&served).await;
    assert_eq!(status, 503, "{body}");
    assert_openai_error(&body);
    assert_eq!(body["error"]["code"], "model_not_ready");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served.status().await["phase"], "failed");
}
