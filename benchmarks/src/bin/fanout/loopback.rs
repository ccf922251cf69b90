//! The spread for real, on loopback: a model pushed to a store whose backends
//! all sit behind one link of the origin's rate, and N nodes, each a peer
//! service on its own port (the agent's [`PeerChunks`], uploads paced to the
//! node's link) and a model cache staged by the agent's own code
//! ([`aigrid_store::reader::Reader::stage`]), told their peers and origin share
//! as the control plane tells them for a wave of all nodes. They start together;
//! each node's time to ready is when its staging returns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_api::rollout::{choose_peers, peer_rank};
use aigrid_api::OriginShare;
use aigrid_benchmarks::link::{throttled_behind, Link};
use aigrid_store::backend::Backend;
use aigrid_store::cache::ChunkCache;
use aigrid_store::codec::Params;
use aigrid_store::peers::{Peer, PeerChunks};
use aigrid_store::reader::ReaderOptions;
use aigrid_store::store::{PushOptions, Store};
use anyhow::{Context, Result};
use rand::{RngCore, SeedableRng};

use crate::sim::name;
use crate::{Args, Outcomes};

/// Longest one chunk may take from a peer, as the agent allows.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Spreads the model to `args.nodes` real nodes whose links are `link_mbit`.
pub fn run(args: &Args, link_mbit: f64) -> Result<Outcomes> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(spread(args, link_mbit))
}

async fn spread(args: &Args, link_mbit: f64) -> Result<Outcomes> {
    let root = tempfile::tempdir()?;
    let n = args.nodes;
    // The model: random bytes, pushed with the store's usual code.
    let model = root.path().join("model");
    std::fs::create_dir_all(&model)?;
    let size = usize::try_from(args.model_mib << 20)?;
    let mut bytes = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(args.seed).fill_bytes(&mut bytes);
    std::fs::write(model.join("weights.safetensors"), &bytes)?;
    drop(bytes);
    let params = Params { k: 4, m: 2 };
    let dirs: Vec<_> = (0..params.k + params.m)
        .map(|i| root.path().join(format!("backend{i}")))
        .collect();
    let local = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| Backend::local(format!("b{i}"), d))
        .collect::<std::io::Result<Vec<_>>>()?;
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let mut options = PushOptions::new("fanout", params);
    options.chunk_size = args.chunk_mib << 20;
    let registration = Store::new(local)
        .push(&model, &options, &key)
        .await
        .context("pushing the model")?
        .registration;
    // The origin: the same backends, every read through one link its reads share.
    let origin = Link::fair(args.origin_mbit * 1e6 / 8.0);
    let mut backends = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let store = throttled_behind(d, origin.clone())?;
        backends.push(Backend::new(format!("b{i}"), BTreeMap::new(), store));
    }
    let store = Store::new(backends);

    // The nodes' peer services, each on its own port.
    let mut urls = Vec::with_capacity(n);
    let mut caches = Vec::with_capacity(n);
    for i in 0..n {
        let dir = root.path().join(name(i));
        caches.push(Arc::new(ChunkCache::open(
            &dir,
            4 * size as u64 + (64 << 20),
        )?));
        let service = PeerChunks::new(&dir, args.uploads).with_upload_mbit(link_mbit);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        urls.push(format!("http://{}", listener.local_addr()?));
        tokio::spawn(async move { axum::serve(listener, service.router()).await });
    }

    // Staging, all at once, each node told its peers as the control plane
    // names them for one wave of all nodes.
    let start = Instant::now();
    let before = origin.bytes();
    let mut staging = tokio::task::JoinSet::new();
    for (i, cache) in caches.iter().enumerate() {
        let mine = name(i);
        let sites = args.sites.max(1);
        let others = choose_peers((0..n).filter(|p| *p != i).collect(), |p| {
            (
                i % sites == p % sites,
                false,
                peer_rank("r1", &mine, &name(*p)),
            )
        });
        let peers: Vec<Peer> = others
            .iter()
            .map(|p| Peer {
                url: urls[*p].clone(),
                same_site: i % sites == p % sites,
                whole: false,
            })
            .collect();
        let share = OriginShare {
            index: u32::try_from(i)?,
            of: u32::try_from(n)?,
        };
        let reader = store.reader(
            &registration,
            ReaderOptions {
                cache: Some(cache.clone()),
                ..ReaderOptions::default()
            },
        )?;
        let client = reqwest::Client::builder().no_proxy().build()?;
        staging.spawn(async move {
            let staged = reader
                .stage(&client, &peers, Some(share), PEER_TIMEOUT)
                .await;
            (i, staged.map(|_| start.elapsed().as_secs_f64()))
        });
    }
    let mut ready = vec![f64::NAN; n];
    while let Some(done) = staging.join_next().await {
        let (i, at) = done?;
        ready[i] = at.with_context(|| format!("staging on {}", name(i)))?;
    }
    Ok(Outcomes {
        ready,
        origin_bits: (origin.bytes() - before) as f64 * 8.0,
    })
}
