//! Chunks spread peer to peer, over real HTTP on loopback: a node stages a model
//! from a peer that holds it instead of the store; a peer that answers every
//! chunk with garbage never gets a byte of it into the node's cache and is
//! dropped; with no peer that can help, the store gives everything.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aigrid_store::backend::Backend;
use aigrid_store::cache::ChunkCache;
use aigrid_store::codec::Params;
use aigrid_store::peers::{Peer, PeerChunks, PEER_CHUNK_PATH};
use aigrid_store::reader::ReaderOptions;
use aigrid_store::store::{PushOptions, Store};
use axum::routing::get;
use rand::{RngCore, SeedableRng};

const MIB: usize = 1 << 20;

/// A store of three local backends under `root`, and a model directory beside it
/// whose weights are `size` random bytes (not yet written).
fn store_and_model(
    root: &std::path::Path,
    size: usize,
    seed: u64,
) -> (Store, std::path::PathBuf, Vec<u8>) {
    let backends: Vec<Backend> = (0..3)
        .map(|i| Backend::local(format!("b{i}"), &root.join(format!("b{i}"))).unwrap())
        .collect();
    let model = root.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let mut bytes = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    (Store::new(backends), model, bytes)
}

async fn listen(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stages_from_a_peer_and_a_lying_peer_gets_nothing_into_its_cache() {
    let root = tempfile::tempdir().unwrap();
    let (store, model, bytes) = store_and_model(root.path(), 9 * MIB + 123, 5);
    std::fs::write(model.join("weights.bin"), &bytes).unwrap();
    std::fs::write(model.join("config.json"), b"{\"layers\": 2}").unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let reg = store
        .push(&model, &PushOptions::new("m", Params { k: 2, m: 1 }), &key)
        .await
        .unwrap()
        .registration;
    let reader_with = |cache: &Arc<ChunkCache>| {
        store
            .reader(
                &reg,
                ReaderOptions {
                    cache: Some(cache.clone()),
                    ..ReaderOptions::default()
                },
            )
            .unwrap()
    };
    let client = reqwest::Client::new();
    let timeout = Duration::from_secs(5);

    // The first node has no peer: everything comes from the store.
    let first_dir = root.path().join("first");
    let first = Arc::new(ChunkCache::open(&first_dir, 64 * MIB as u64).unwrap());
    let (from_store, from_peers) = reader_with(&first)
        .stage(&client, &[], None, timeout)
        .await
        .unwrap();
    assert!(from_store > 0);
    assert_eq!(from_peers.chunks, 0);

    // It serves its cache to peers; a liar answers every chunk with garbage.
    let good = listen(PeerChunks::new(&first_dir, 4).router()).await;
    let liar = listen(axum::Router::new().route(
        &format!("{PEER_CHUNK_PATH}/{{digest}}"),
        get(|| async { vec![0x5Au8; 4 * MIB] }),
    ))
    .await;
    let peers = [
        // The liar is of the node's own site, so it is asked first.
        Peer {
            url: format!("http://{liar}"),
            same_site: true,
            whole: true,
        },
        Peer {
            url: format!("http://{good}"),
            same_site: false,
            whole: true,
        },
    ];
    let second = Arc::new(ChunkCache::open(&root.path().join("second"), 64 * MIB as u64).unwrap());
    let before = store
        .backends()
        .iter()
        .map(|b| b.stats().bytes_got)
        .sum::<u64>();
    let reader = reader_with(&second);
    let (from_store, from_peers) = reader.stage(&client, &peers, None, timeout).await.unwrap();
    let after = store
        .backends()
        .iter()
        .map(|b| b.stats().bytes_got)
        .sum::<u64>();
    assert_eq!(
        from_peers.dropped,
        vec![format!("http://{liar}")],
        "{from_peers:?}"
    );
    assert!(from_peers.chunks > 0, "{from_peers:?}");
    assert_eq!(from_store, 0, "every chunk came from the good peer");
    assert_eq!(after, before, "the store was not asked");
    // What the cache holds is the model, byte for byte.
    assert_eq!(reader.read_file("weights.bin").await.unwrap(), bytes);
    let chunks = std::fs::read_dir(root.path().join("second").join("chunks")).unwrap();
    for entry in chunks {
        let entry = entry.unwrap();
        let digest = entry.file_name().to_string_lossy().into_owned();
        let held = std::fs::read(entry.path()).unwrap();
        assert_eq!(
            aigrid_api::ChunkDigest::of(&held).as_str(),
            digest,
            "a bad chunk was kept"
        );
    }

    // A third node whose only peer lies still stages, from the store.
    let third = Arc::new(ChunkCache::open(&root.path().join("third"), 64 * MIB as u64).unwrap());
    let (from_store, from_peers) = reader_with(&third)
        .stage(&client, &peers[..1], None, timeout)
        .await
        .unwrap();
    assert!(from_store > 0);
    assert_eq!(from_peers.chunks, 0);
    assert_eq!(from_peers.dropped.len(), 1);

    // A peer whose uploads are full at first is asked again after a rest, rather
    // than its chunks going to the store.
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let held = first_dir.join("chunks");
    let busy_at_first = listen(axum::Router::new().route(
        &format!("{PEER_CHUNK_PATH}/{{digest}}"),
        get(
            move |axum::extract::Path(digest): axum::extract::Path<String>| {
                let (answered, held) = (answered.clone(), held.clone());
                async move {
                    if answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 6 {
                        return (axum::http::StatusCode::TOO_MANY_REQUESTS, Vec::new());
                    }
                    (
                        axum::http::StatusCode::OK,
                        std::fs::read(held.join(digest)).unwrap(),
                    )
                }
            },
        ),
    ))
    .await;
    let fourth = Arc::new(ChunkCache::open(&root.path().join("fourth"), 64 * MIB as u64).unwrap());
    let patient = [Peer {
        url: format!("http://{busy_at_first}"),
        same_site: false,
        whole: true,
    }];
    let before = store
        .backends()
        .iter()
        .map(|b| b.stats().bytes_got)
        .sum::<u64>();
    let (from_store, from_peers) = reader_with(&fourth)
        .stage(&client, &patient, None, timeout)
        .await
        .unwrap();
    let after = store
        .backends()
        .iter()
        .map(|b| b.stats().bytes_got)
        .sum::<u64>();
    assert!(from_peers.refused >= 6, "{from_peers:?}");
    assert!(from_peers.chunks > 0, "{from_peers:?}");
    assert_eq!((from_store, after), (0, before), "{from_peers:?}");

    // Nothing but a chunk digest is asked for.
    let bad = client
        .get(format!("http://{good}{PEER_CHUNK_PATH}/not-a-digest"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

/// Bytes the store's backends have sent so far.
fn store_bytes(store: &Store) -> u64 {
    store.backends().iter().map(|b| b.stats().bytes_got).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_staging_together_take_one_copy_from_the_store_and_the_rest_from_each_other() {
    let root = tempfile::tempdir().unwrap();
    let (store, model, bytes) = store_and_model(root.path(), 24 * MIB, 9);
    std::fs::write(model.join("weights.bin"), &bytes).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
    let mut options = PushOptions::new("m", Params { k: 2, m: 1 });
    options.chunk_size = MIB as u64;
    let reg = store
        .push(&model, &options, &key)
        .await
        .unwrap()
        .registration;

    // Three nodes of one wave: each serves its cache, paced so a node cannot
    // fetch everything before the others have asked for anything.
    let nodes = 3;
    let dirs: Vec<std::path::PathBuf> = (0..nodes)
        .map(|i| root.path().join(format!("node{i}")))
        .collect();
    let caches: Vec<Arc<ChunkCache>> = dirs
        .iter()
        .map(|d| Arc::new(ChunkCache::open(d, 64 * MIB as u64).unwrap()))
        .collect();
    let mut urls = Vec::new();
    for d in &dirs {
        let peer = PeerChunks::new(d, 4).with_upload_mbit(200.0);
        urls.push(format!("http://{}", listen(peer.router()).await));
    }
    let before = store_bytes(&store);
    let client = reqwest::Client::new();
    let staged = futures_util::future::join_all((0..nodes).map(|i| {
        let peers: Vec<Peer> = (0..nodes)
            .filter(|j| *j != i)
            .map(|j| Peer {
                url: urls[j].clone(),
                same_site: false,
                whole: false,
            })
            .collect();
        let reader = store
            .reader(
                &reg,
                ReaderOptions {
                    cache: Some(caches[i].clone()),
                    ..ReaderOptions::default()
                },
            )
            .unwrap();
        let share = aigrid_api::OriginShare {
            index: u32::try_from(i).unwrap(),
            of: u32::try_from(nodes).unwrap(),
        };
        let client = client.clone();
        async move {
            let out = reader
                .stage(&client, &peers, Some(share), Duration::from_secs(10))
                .await
                .unwrap();
            assert_eq!(
                reader.read_file("weights.bin").await.unwrap().len(),
                24 * MIB
            );
            out
        }
    }))
    .await;
    let from_store = store_bytes(&store) - before;
    for (i, (_, from_peers)) in staged.iter().enumerate() {
        assert!(
            from_peers.chunks >= 8,
            "node {i} took most of what it did not fetch itself from its peers: {from_peers:?}"
        );
        assert!(from_peers.dropped.is_empty());
    }
    // One copy: each chunk read from its data shards once.
    let copy = 24 * MIB as u64;
    assert!(
        from_store < copy * 11 / 10,
        "the store sent {from_store} bytes for a {copy}-byte model to {nodes} nodes"
    );
    for c in &caches {
        assert_eq!(c.stats().bytes, copy, "every chunk cached, once");
    }

    // A stranger asking holdings with a body that is not digests is refused; one
    // naming too many chunks is refused for its size.
    let bad = client
        .post(format!(
            "{}{}",
            urls[0],
            aigrid_store::peers::PEER_HAVE_PATH
        ))
        .body(vec![1u8; 33])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), reqwest::StatusCode::BAD_REQUEST);
    let huge = client
        .post(format!(
            "{}{}",
            urls[0],
            aigrid_store::peers::PEER_HAVE_PATH
        ))
        .body(vec![0u8; (aigrid_store::peers::MAX_HAVE_CHUNKS + 1) * 32])
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), reqwest::StatusCode::PAYLOAD_TOO_LARGE);
}
