//! The HTTP shard service on a real socket, driven by the real `object_store` HTTP
//! client through `Backend::from_config`, and by raw requests where a well-behaved
//! client cannot misbehave enough.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use aigrid_store::backend::{Backend, BackendConfig, BackendStats};
use aigrid_store::shard_service::{ShardService, ShardServiceLimits};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Node {
    _tmp: tempfile::TempDir,
    /// The service's directory.
    root: PathBuf,
    /// What else is in the temporary directory: nothing may be written here.
    outside: PathBuf,
    addr: SocketAddr,
    /// A backend over the service, with the prefix `m`.
    backend: Backend,
}

async fn start(limits: ShardServiceLimits) -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("shards");
    let service = ShardService::new(&root, limits).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(service.serve(listener, std::future::pending()));
    let backend = Backend::from_config(&BackendConfig {
        name: "node-1".into(),
        url: format!("http://{addr}/m/"),
        attributes: BTreeMap::from([("site".into(), "lab".into())]),
        options: BTreeMap::new(),
    })
    .unwrap();
    Node {
        outside: tmp.path().to_path_buf(),
        _tmp: tmp,
        root,
        addr,
        backend,
    }
}

fn random(len: usize) -> Bytes {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

/// Files (not directories) under `dir`, relative to it.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Sends `request` as written on one connection; the status and the body.
async fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
    v["error"]["code"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn objects_round_trip_through_object_store_and_are_counted() {
    let node = start(ShardServiceLimits::default()).await;
    let b = &node.backend;
    assert_eq!(b.url(), format!("http://{}/m", node.addr));
    let shard = random(100_000);
    b.put("d1/s0/3", shard.clone()).await.unwrap();
    assert_eq!(
        b.stats(),
        BackendStats {
            bytes_put: 100_000,
            puts: 1,
            ..BackendStats::default()
        }
    );
    // Acknowledged means on disk, whole, under the prefix; no temporary file left.
    assert_eq!(
        std::fs::read(node.root.join("m/d1/s0/3")).unwrap(),
        shard.as_ref()
    );
    assert!(files(&node.root.join(".tmp")).is_empty());

    assert_eq!(b.head("d1/s0/3").await.unwrap(), Some(100_000));
    assert_eq!(b.get("d1/s0/3").await.unwrap().unwrap(), shard);
    assert_eq!(
        b.get_range("d1/s0/3", 10..20).await.unwrap().unwrap(),
        shard.slice(10..20)
    );
    // A range running past the end is cut at the end, as object_store expects.
    assert_eq!(
        b.get_range("d1/s0/3", 99_990..200_000)
            .await
            .unwrap()
            .unwrap(),
        shard.slice(99_990..)
    );
    assert!(b.get_range("d1/s0/3", 100_000..100_001).await.is_err());
    let s = b.stats();
    assert_eq!((s.gets, s.bytes_got), (3, 100_000 + 10 + 10));

    // Overwrite, and an empty object.
    let other = random(5);
    b.put("d1/s0/3", other.clone()).await.unwrap();
    assert_eq!(b.get("d1/s0/3").await.unwrap().unwrap(), other);
    b.put("d1/empty", Bytes::new()).await.unwrap();
    assert_eq!(b.head("d1/empty").await.unwrap(), Some(0));
    assert_eq!(b.get("d1/empty").await.unwrap().unwrap(), Bytes::new());

    b.delete("d1/s0/3").await.unwrap();
    assert!(!node.root.join("m/d1/s0/3").exists());
    assert_eq!(b.head("d1/s0/3").await.unwrap(), None);
    b.delete("d1/s0/3").await.unwrap();

    // A clone shares the counters.
    let clone = b.clone();
    clone.put("d2/x", random(7)).await.unwrap();
    assert_eq!(b.stats().bytes_put, 100_000 + 5 + 7);

    let http = reqwest::Client::new();
    let health = http
        .get(format!("http://{}/health", node.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = http
        .get(format!("http://{}/metrics", node.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"aigrid_shard_requests_total{method="PUT",status="201"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("aigrid_shard_received_bytes_total 100012"),
        "{metrics}"
    );
}

#[tokio::test]
async fn missing_objects_are_none() {
    let node = start(ShardServiceLimits::default()).await;
    let b = &node.backend;
    assert_eq!(b.get("nope/0").await.unwrap(), None);
    assert_eq!(b.head("nope/0").await.unwrap(), None);
    assert_eq!(b.get_range("nope/0", 0..4).await.unwrap(), None);
    b.put("dir/obj", random(3)).await.unwrap();
    // A directory is not an object.
    assert_eq!(b.get("dir").await.unwrap(), None);
    assert_eq!(b.stats().gets, 0);
}

#[tokio::test]
async fn ranges_answer_206_or_416() {
    let node = start(ShardServiceLimits::default()).await;
    node.backend
        .put("r", Bytes::from_static(b"0123456789"))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://{}/m/r", node.addr);
    let part = http
        .get(&url)
        .header("Range", "bytes=-3")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], "bytes 7-9/10");
    assert!(part.headers().contains_key("etag"));
    assert!(part.headers().contains_key("last-modified"));
    assert_eq!(part.text().await.unwrap(), "789");
    let beyond = http
        .get(&url)
        .header("Range", "bytes=10-")
        .send()
        .await
        .unwrap();
    assert_eq!(beyond.status(), 416);
    assert_eq!(beyond.headers()["content-range"], "bytes */10");
    assert_eq!(
        error_code(&beyond.text().await.unwrap()),
        "range_not_satisfiable"
    );
}

#[tokio::test]
async fn paths_outside_the_directory_are_refused_and_nothing_is_written() {
    let node = start(ShardServiceLimits::default()).await;
    for path in [
        "/../escape",
        "/m/../../escape",
        "/m/..%2F..%2Fescape",
        "/.tmp/planted",
        "/m//x",
        "/m/a%20b",
    ] {
        let (status, body) = raw(
            node.addr,
            &format!(
                "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nevil"
            ),
        )
        .await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(error_code(&body), "bad_path", "{path}");
    }
    let (status, _) = raw(
        node.addr,
        "GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    assert!(files(&node.root).is_empty(), "{:?}", files(&node.root));
    assert_eq!(
        std::fs::read_dir(&node.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect::<Vec<_>>(),
        ["shards"]
    );
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_and_leave_nothing() {
    let node = start(ShardServiceLimits {
        max_body_bytes: 1024,
        ..ShardServiceLimits::default()
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/m/big", node.addr);
    let declared = http.put(&url).body(vec![7u8; 2048]).send().await.unwrap();
    assert_eq!(declared.status(), 413);
    assert_eq!(error_code(&declared.text().await.unwrap()), "too_large");
    // Chunked, so the size is known only while streaming.
    let chunks = futures_util::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![1u8; 512]))),
    );
    let streamed = http
        .put(&url)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 413);
    let err = node
        .backend
        .put("big", random(4096))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("node-1") && err.contains("413"), "{err}");
    assert!(files(&node.root).is_empty(), "{:?}", files(&node.root));
    assert_eq!(node.backend.stats(), BackendStats::default());
    node.backend.put("small", random(1024)).await.unwrap();
}

#[tokio::test]
async fn other_methods_and_conflicts_are_named() {
    let node = start(ShardServiceLimits::default()).await;
    node.backend.put("a/b", random(3)).await.unwrap();
    let http = reqwest::Client::new();
    let propfind = http
        .request(
            reqwest::Method::from_bytes(b"PROPFIND").unwrap(),
            format!("http://{}/m/a", node.addr),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(propfind.status(), 405);
    assert_eq!(propfind.headers()["allow"], "GET, HEAD, PUT, DELETE");
    // An object cannot be both a file and a directory.
    for path in ["m/a/b/c", "m/a"] {
        let conflict = http
            .put(format!("http://{}/{path}", node.addr))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(conflict.status(), 409, "{path}");
        assert_eq!(error_code(&conflict.text().await.unwrap()), "conflict");
    }
    assert!(files(&node.root.join(".tmp")).is_empty());
}

#[tokio::test]
async fn the_door_answers_429_when_full() {
    let node = start(ShardServiceLimits {
        max_concurrent_requests: 1,
        ..ShardServiceLimits::default()
    })
    .await;
    // Bigger than what the loopback socket buffers hold, so an unread GET keeps
    // streaming, and keeps its place at the door.
    node.backend.put("big", random(48 << 20)).await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://{}/m/big", node.addr);
    let held = http.get(&url).send().await.unwrap();
    assert_eq!(held.status(), 200);
    let refused = http.head(&url).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    drop(held);
    let mut status = 0;
    for _ in 0..100 {
        status = http.head(&url).send().await.unwrap().status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
}

#[tokio::test]
async fn restarting_clears_temporary_files_and_keeps_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    ShardService::new(&root, ShardServiceLimits::default()).unwrap();
    std::fs::write(root.join(".tmp/123-0"), b"half a shard").unwrap();
    std::fs::create_dir_all(root.join("kept")).unwrap();
    std::fs::write(root.join("kept/obj"), b"whole").unwrap();
    let service = ShardService::new(&root, ShardServiceLimits::default()).unwrap();
    assert_eq!(files(&service.dir().join(".tmp")), Vec::<String>::new());
    assert_eq!(std::fs::read(root.join("kept/obj")).unwrap(), b"whole");
}
