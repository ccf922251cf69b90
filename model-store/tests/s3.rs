//! The store's S3 path against a real S3-speaking server: moto's (PyPI
//! `moto[server]`, fetched by `fixtures/moto.sh`), started by the test on a loopback
//! port. A model is pushed across four buckets, pulled back bit for bit, one bucket
//! is lost (its objects and then the bucket itself), and repair rebuilds what it held
//! into the bucket made again, and into a spare bucket when it is gone for good.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aigrid_store::backend::{Backend, BackendConfig};
use aigrid_store::codec::Params;
use aigrid_store::manifest::{shard_object, Registration};
use aigrid_store::repair::FaultKind;
use aigrid_store::store::{PushOptions, Store};
use ed25519_dalek::SigningKey;

/// The moto venv from `fixtures/moto.sh`, made first if it is missing.
fn moto_server_bin() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = std::env::var_os("AIGRID_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.parent().unwrap().join("target").join("fixtures"));
    let script = manifest.join("fixtures/moto.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("AIGRID_FIXTURES", &fixtures)
        .output()
        .expect("running fixtures/moto.sh");
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    fixtures.join("moto-env/bin/moto_server")
}

/// A running moto server, killed when dropped.
struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(moto_server_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, url }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The backend `site-i` on bucket `bucket-i` of `moto`, configured as a user would:
/// the endpoint and credentials as options, nothing from the environment.
fn backend(moto: &Moto, i: usize) -> Backend {
    let config: BackendConfig = serde_json::from_value(serde_json::json!({
        "name": format!("site-{i}"),
        "url": format!("s3://bucket-{i}/models"),
        "attributes": {"site": format!("s{i}")},
        "options": {
            "endpoint": moto.url, "allow_http": "true", "region": "us-east-1",
            "access_key_id": "testing", "secret_access_key": "testing",
        },
    }))
    .unwrap();
    Backend::from_config(&config).unwrap()
}

async fn bucket(client: &reqwest::Client, moto: &Moto, i: usize, method: reqwest::Method) {
    let resp = client
        .request(method.clone(), format!("{}/bucket-{i}", moto.url))
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "{method} bucket-{i}: {}",
        resp.status()
    );
}

/// Object keys in bucket `i`, from S3's own listing.
async fn keys(client: &reqwest::Client, moto: &Moto, i: usize) -> Vec<String> {
    let xml = client
        .get(format!("{}/bucket-{i}?list-type=2", moto.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    xml.split("<Key>")
        .skip(1)
        .filter_map(|s| s.split("</Key>").next().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_spread_over_s3_buckets_survives_losing_one_and_is_repaired() {
    let moto = Moto::start();
    let client = reqwest::Client::new();
    for i in 0..5 {
        bucket(&client, &moto, i, reqwest::Method::PUT).await;
    }
    let store = Store::new((0..4).map(|i| backend(&moto, i)).collect());
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let bytes: Vec<u8> = (0..3 * 1024 * 1024 + 7u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(model.join("weights.bin"), &bytes).unwrap();
    std::fs::write(model.join("config.json"), b"{\"layers\": 2}").unwrap();
    let mut opts = PushOptions::new("s3-model", Params { k: 2, m: 2 });
    opts.chunk_size = 256 * 1024;
    let key = SigningKey::from_bytes(&[7; 32]);
    let reg: Registration = store.push(&model, &opts, &key).await.unwrap().registration;
    reg.verify().unwrap();
    // The shards are S3 objects, in every bucket.
    for i in 0..4 {
        let held = keys(&client, &moto, i).await;
        assert!(
            held.iter().any(|k| k.starts_with("models/shards/")),
            "bucket-{i}: {held:?}"
        );
    }
    let pulled = root.path().join("pulled");
    store.pull(&reg, &pulled, None).await.unwrap();
    assert!(std::fs::read(pulled.join("weights.bin")).unwrap() == bytes);

    // Lose bucket-0: every object, then the bucket itself.
    let lost = backend(&moto, 0);
    for k in keys(&client, &moto, 0).await {
        let path = k.strip_prefix("models/").unwrap();
        lost.delete(path).await.unwrap();
    }
    bucket(&client, &moto, 0, reqwest::Method::DELETE).await;
    // Two of four shards per stripe remain (k = 2): it still pulls.
    let again = root.path().join("again");
    store.pull(&reg, &again, None).await.unwrap();
    assert!(std::fs::read(again.join("weights.bin")).unwrap() == bytes);

    // The bucket made again, empty: repair rebuilds its shards there.
    bucket(&client, &moto, 0, reqwest::Method::PUT).await;
    let report = store.repair(&reg).await.unwrap();
    assert!(!report.scrub.faults.is_empty());
    assert!(report
        .scrub
        .faults
        .iter()
        .all(|f| f.backend == "site-0" && f.kind == FaultKind::Missing));
    assert_eq!(report.rebuilt, report.scrub.faults.len());
    assert_eq!(report.failed, 0);
    assert!(store.scrub(&reg).await.unwrap().healthy());
    let shard = &reg.manifest.manifest.stripes[0].shards[0];
    assert!(keys(&client, &moto, 0)
        .await
        .contains(&format!("models/{}", shard_object(shard))));

    // Gone for good: its shards move to the spare bucket-4.
    let mut with_spare: Vec<Backend> = (0..5).map(|i| backend(&moto, i)).collect();
    with_spare.remove(1);
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
    assert!(store.scrub(&moved).await.unwrap().healthy());
    assert!(!keys(&client, &moto, 4).await.is_empty());
    let last = root.path().join("last");
    store.pull(&moved, &last, None).await.unwrap();
    assert!(std::fs::read(last.join("weights.bin")).unwrap() == bytes);
}
