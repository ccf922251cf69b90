//! Removing models gives the disk back: after a push and the removal of every model,
//! each backend's directory holds exactly what it held before (no shard, no empty
//! directory), over local directories and over HTTP shard services alike, while a
//! shard another model still uses stays.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aigrid_store::backend::{Backend, BackendConfig};
use aigrid_store::codec::Params;
use aigrid_store::shard_service::{ShardService, ShardServiceLimits};
use aigrid_store::store::{PushOptions, Store};
use ed25519_dalek::SigningKey;
use rand::{RngCore, SeedableRng};

/// What a directory takes on disk: every entry under it (files and directories,
/// not the directory itself) with its allocated bytes.
#[derive(Debug, PartialEq, Eq)]
struct Usage {
    entries: BTreeSet<PathBuf>,
    bytes: u64,
}

fn usage(dir: &Path) -> Usage {
    let mut usage = Usage {
        entries: BTreeSet::new(),
        bytes: 0,
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            usage.bytes += meta.blocks() * 512;
            usage
                .entries
                .insert(path.strip_prefix(dir).unwrap().to_path_buf());
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    usage
}

fn model(dir: &Path, seed: u64, len: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut bytes = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    std::fs::write(dir.join("weights.bin"), bytes).unwrap();
    std::fs::write(dir.join("config.json"), br#"{"hidden": 64}"#).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_then_remove_returns_every_backend_to_its_size() {
    let root = tempfile::tempdir().unwrap();
    let mut backends = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..4 {
        let dir = root.path().join(format!("site-{i}"));
        let mut b = Backend::local(format!("site-{i}"), &dir).unwrap();
        b.attributes = BTreeMap::from([("site".to_owned(), format!("s{i}"))]);
        backends.push(b);
        dirs.push(dir);
    }
    // Two nodes' disks offered through their shard services.
    for i in 4..6 {
        let dir = root.path().join(format!("node-{i}"));
        let service = ShardService::new(&dir, ShardServiceLimits::default()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(service.serve(listener, std::future::pending()));
        backends.push(
            Backend::from_config(&BackendConfig {
                name: format!("node-{i}"),
                url: format!("http://{addr}/m/"),
                attributes: BTreeMap::from([("site".to_owned(), format!("s{i}"))]),
                options: BTreeMap::new(),
            })
            .unwrap(),
        );
        dirs.push(dir);
    }
    let store = Store::new(backends);
    let before: Vec<Usage> = dirs.iter().map(|d| usage(d)).collect();

    let key = SigningKey::from_bytes(&[7; 32]);
    let mut opts = PushOptions::new("a", Params { k: 4, m: 2 });
    opts.chunk_size = 256 * 1024;
    model(&root.path().join("a"), 1, 3 << 20);
    let a = store
        .push(&root.path().join("a"), &opts, &key)
        .await
        .unwrap();
    // A second model sharing all but its config with the first, deduplicated
    // against it.
    model(&root.path().join("b"), 1, 3 << 20);
    std::fs::write(root.path().join("b/config.json"), br#"{"hidden": 65}"#).unwrap();
    opts.name = "b".into();
    opts.known = vec![a.registration.clone()];
    let b = store
        .push(&root.path().join("b"), &opts, &key)
        .await
        .unwrap();
    assert!(b.stats.stripes_reused > 0, "{:?}", b.stats);
    let full: Vec<Usage> = dirs.iter().map(|d| usage(d)).collect();
    assert!(full.iter().zip(&before).all(|(f, b)| f.bytes > b.bytes));

    // Removing the first keeps what the second uses: the second still pulls.
    store
        .remove(&a.registration, std::slice::from_ref(&b.registration))
        .await
        .unwrap();
    let pulled = root.path().join("pulled");
    store.pull(&b.registration, &pulled, None).await.unwrap();
    assert_eq!(
        std::fs::read(pulled.join("weights.bin")).unwrap(),
        std::fs::read(root.path().join("b/weights.bin")).unwrap()
    );

    store.remove(&b.registration, &[]).await.unwrap();
    for (dir, (after, before)) in dirs.iter().zip(dirs.iter().map(|d| usage(d)).zip(before)) {
        assert_eq!(after, before, "{} did not get its disk back", dir.display());
    }
}
