//! A server registers signed dispersed-store models over HTTP: it refuses forged or
//! inconsistent manifests without committing anything, answers repeats as they are,
//! moves shard locations by version, forgets models, and tells clients about the
//! store it was configured with.

use std::collections::BTreeMap;
use std::time::Duration;

use aigrid_api::manifest::{Registration, SignedManifest};
use aigrid_api::{StorageBackend, StorageInfo};
use aigrid_scheduler::server::{Server, ServerConfig};
use aigrid_scheduler::testkit::Sign;
use aigrid_scheduler::testkit::{model_registration, placed, publisher, BACKENDS};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

use crate::common;
use common::{start_leader, start_three, until_some};

fn storage() -> StorageInfo {
    StorageInfo {
        backends: BACKENDS
            .iter()
            .enumerate()
            .map(|(i, name)| StorageBackend {
                name: (*name).to_owned(),
                url: format!("file:///var/lib/aigrid/store/{name}"),
                attributes: BTreeMap::from([("site".to_owned(), format!("s{i}"))]),
            })
            .collect(),
        k: 2,
        m: 1,
        policy: vec!["max 1 per site".into()],
    }
}

async fn start(dir: &std::path::Path) -> (Server, String) {
    let mut config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.into());
    config.access = aigrid_scheduler::testkit::admin_access();
    config.storage = storage();
    config.limits.max_model_body_bytes = 2 << 20;
    let server = start_leader(config).await;
    let base = format!("http://{}/api/v1", server.addr);
    (server, base)
}

/// Sends `body` (JSON bytes) and answers the status and the decoded answer
/// (`null` for an empty body).
async fn call(
    client: &Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Vec<u8>>,
) -> (StatusCode, Value) {
    let mut req = client.request(method, url);
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body);
    }
    let resp = req.signed().send().await.unwrap();
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, value)
}

fn bytes(registration: &Registration) -> Vec<u8> {
    serde_json::to_vec(registration).unwrap()
}

/// Asserts an error answer's status, code and a part of its message.
fn refused(answer: (StatusCode, Value), status: StatusCode, code: &str, has: &str) {
    let (got, body) = answer;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(has), "`{message}` lacks `{has}`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_registered_listed_relocated_and_forgotten() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let (server, base) = start(dir.path()).await;
    let client = Client::new();
    let models = format!("{base}/models");

    let (status, told) = call(&client, Method::GET, &format!("{base}/storage"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_value::<StorageInfo>(told).unwrap(),
        storage()
    );

    // Register: 201, then 200 with the same record.
    let small = model_registration("llama", 1, 3);
    let digest = small.manifest.manifest.digest();
    let (status, created) = call(&client, Method::POST, &models, Some(bytes(&small))).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["digest"], digest.as_str());
    assert_eq!(created["name"], "llama");
    assert_eq!(created["files"], 1);
    assert_eq!(created["size"], 12);
    assert_eq!(created["stored_bytes"], 18);
    assert_eq!(
        (created["k"].as_u64(), created["m"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(created["encrypted"], false);
    assert_eq!(created["locations_version"], 1);
    let (status, again) = call(&client, Method::POST, &models, Some(bytes(&small))).await;
    assert_eq!((status, &again), (StatusCode::OK, &created));

    // A manifest bigger than the API's general body limit fits the model routes' own.
    let large = model_registration("llama", 1, 3000);
    let large_body = bytes(&large);
    assert!(large_body.len() > 1 << 20 && large_body.len() < 2 << 20);
    let (status, large_summary) = call(&client, Method::POST, &models, Some(large_body)).await;
    assert_eq!(status, StatusCode::CREATED, "{large_summary}");
    let job_padding = json!({"name": "x", "pad": "p".repeat(1 << 20)});
    refused(
        call(
            &client,
            Method::POST,
            &format!("{base}/jobs"),
            Some(serde_json::to_vec(&job_padding).unwrap()),
        )
        .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "size limit",
    );
    refused(
        call(
            &client,
            Method::POST,
            &models,
            Some(vec![b' '; (2 << 20) + 100_000]),
        )
        .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "size limit",
    );

    // Listed newest first, filtered by name.
    let (status, listed) = call(&client, Method::GET, &models, None).await;
    assert_eq!(status, StatusCode::OK);
    let listed = listed.as_array().unwrap().clone();
    assert_eq!(listed.len(), 2);
    assert!(listed[0]["created_at"].as_u64() >= listed[1]["created_at"].as_u64());
    assert!(listed.contains(&created) && listed.contains(&large_summary));
    let (_, none) = call(&client, Method::GET, &format!("{models}?name=gpt"), None).await;
    assert_eq!(none, json!([]));
    let (_, llamas) = call(&client, Method::GET, &format!("{models}?name=llama"), None).await;
    assert_eq!(llamas.as_array().unwrap().len(), 2);
    refused(
        call(&client, Method::GET, &format!("{models}?bogus=1"), None).await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "bogus",
    );

    // One model whole; digests are checked, any case.
    let one = format!("{models}/{digest}");
    let upper = format!("{models}/{}", digest.to_ascii_uppercase());
    let (status, detail) = call(&client, Method::GET, &upper, None).await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(detail["summary"], created);
    let manifest: SignedManifest = serde_json::from_value(detail["manifest"].clone()).unwrap();
    assert_eq!(manifest, small.manifest);
    assert_eq!(
        detail["locations"],
        serde_json::to_value(&small.locations).unwrap()
    );
    refused(
        call(&client, Method::GET, &format!("{models}/nothex"), None).await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "not a model digest",
    );
    refused(
        call(
            &client,
            Method::GET,
            &format!("{models}/{}", "0".repeat(64)),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
        "model",
    );

    // Locations move by version.
    let locations = format!("{one}/locations");
    let update = |locations: aigrid_api::manifest::Locations, expected: Option<u64>| {
        let mut body = json!({"locations": locations});
        if let Some(v) = expected {
            body["expected_version"] = json!(v);
        }
        Some(serde_json::to_vec(&body).unwrap())
    };
    let (status, moved) = call(
        &client,
        Method::PUT,
        &locations,
        update(placed(3, 1), Some(1)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    assert_eq!(moved["locations_version"], 2);
    refused(
        call(
            &client,
            Method::PUT,
            &locations,
            update(placed(3, 2), Some(1)),
        )
        .await,
        StatusCode::CONFLICT,
        "conflict",
        "version 2, not 1",
    );
    refused(
        call(&client, Method::PUT, &locations, update(placed(2, 2), None)).await,
        StatusCode::BAD_REQUEST,
        "invalid_manifest",
        "locations",
    );
    refused(
        call(
            &client,
            Method::PUT,
            &format!("{models}/{}/locations", "0".repeat(64)),
            update(placed(3, 2), None),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
        "model",
    );
    let (_, detail) = call(&client, Method::GET, &one, None).await;
    assert_eq!(detail["summary"], moved);
    assert_eq!(
        detail["locations"],
        serde_json::to_value(placed(3, 1)).unwrap()
    );

    // A scrub's report is kept with the model; only admins and servers write it.
    let health = format!("{one}/health");
    let report = |healthy: u64, missing: u64| {
        Some(
            serde_json::to_vec(&json!({
                "checked_at": 1_700_000_000_000u64, "shards": 6, "healthy": healthy,
                "missing": missing, "corrupt": 0, "unreachable": 0, "lost_stripes": 0,
                "rebuilt": missing, "unrepairable": 0,
            }))
            .unwrap(),
        )
    };
    let (status, checked) = call(&client, Method::PUT, &health, report(5, 1)).await;
    assert_eq!(status, StatusCode::OK, "{checked}");
    assert_eq!(checked["health"]["missing"], 1, "{checked}");
    refused(
        call(&client, Method::PUT, &health, report(6, 1)).await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "healthy + missing",
    );
    let viewer = aigrid_api::IdentityKey::from_seed(aigrid_api::KeyAlgorithm::Ed25519, [41; 32]);
    let added = client
        .post(format!("{base}/identities"))
        .json(&json!({"name": "viewer", "public_key": viewer.public()}))
        .signed()
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), StatusCode::CREATED);
    let stranger = aigrid_api::IdentityKey::from_seed(aigrid_api::KeyAlgorithm::Ed25519, [43; 32]);
    for (key, status) in [
        (&viewer, StatusCode::FORBIDDEN),
        (&stranger, StatusCode::UNAUTHORIZED),
    ] {
        let answer = client
            .put(&health)
            .header("content-type", "application/json")
            .body(report(6, 0).unwrap())
            .signed_by(key)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), status);
    }
    let (_, listed) = call(&client, Method::GET, &models, None).await;
    let kept = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["digest"] == checked["digest"])
        .unwrap();
    assert_eq!(
        kept["health"], checked["health"],
        "nothing else was written"
    );

    // Forged, inconsistent or malformed registrations change nothing.
    let mut altered = model_registration("mistral", 1, 2);
    altered.manifest.manifest.files[0].path = "evil.bin".into();
    refused(
        call(&client, Method::POST, &models, Some(bytes(&altered))).await,
        StatusCode::BAD_REQUEST,
        "signature_invalid",
        "signature",
    );
    let mut broken = model_registration("mistral", 1, 2).manifest.manifest;
    broken.files[0].size = 1;
    let inconsistent = Registration {
        manifest: SignedManifest::sign(broken, &publisher(1)),
        locations: placed(2, 0),
        circle: None,
    };
    refused(
        call(&client, Method::POST, &models, Some(bytes(&inconsistent))).await,
        StatusCode::BAD_REQUEST,
        "invalid_manifest",
        "weights.bin",
    );
    let mut crowded = model_registration("mistral", 1, 2);
    crowded.locations.stripes[0][1] = crowded.locations.stripes[0][0].clone();
    refused(
        call(&client, Method::POST, &models, Some(bytes(&crowded))).await,
        StatusCode::BAD_REQUEST,
        "invalid_manifest",
        "stripe 0",
    );
    refused(
        call(
            &client,
            Method::POST,
            &models,
            Some(b"{\"manifest\": 1}".to_vec()),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
        "manifest",
    );
    let (_, after) = call(&client, Method::GET, &models, None).await;
    assert_eq!(after.as_array().unwrap().len(), 2, "{after}");

    // Forgotten: 204, then 404.
    let (status, empty) = call(&client, Method::DELETE, &one, None).await;
    assert_eq!((status, empty), (StatusCode::NO_CONTENT, Value::Null));
    refused(
        call(&client, Method::GET, &one, None).await,
        StatusCode::NOT_FOUND,
        "not_found",
        &digest,
    );
    refused(
        call(&client, Method::DELETE, &one, None).await,
        StatusCode::NOT_FOUND,
        "not_found",
        &digest,
    );
    let (_, left) = call(&client, Method::GET, &models, None).await;
    assert_eq!(left, json!([large_summary]));

    let (_, doc) = call(&client, Method::GET, &format!("{base}/openapi.json"), None).await;
    for (path, method) in [
        ("/api/v1/models", "post"),
        ("/api/v1/models", "get"),
        ("/api/v1/models/{digest}", "get"),
        ("/api/v1/models/{digest}", "delete"),
        ("/api/v1/models/{digest}/locations", "put"),
        ("/api/v1/storage", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_store_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().into());
    config.access = aigrid_scheduler::testkit::admin_access();
    let server = Server::start(config).await.unwrap();
    let (status, told) = call(
        &Client::new(),
        reqwest::Method::GET,
        &format!("http://{}/api/v1/storage", server.addr),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(told["backends"], json!([]));
    server.stop().await;
}

/// A model entry is far larger than Raft's 1 MiB target per append message; it is
/// still proposed through a follower and replicated to every server. (A release
/// build does the same with a 15 MiB entry; a debug build spends seconds hashing it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_manifest_replicates_to_every_server() {
    let three = start_three(|_| {}).await;
    let servers = &three.servers;
    let leader = until_some("a leader", || servers[0].raft.status().leader).await;
    let follower = servers
        .iter()
        .find(|s| s.raft.status().id != leader)
        .unwrap();
    let large = model_registration("llama-70b", 1, 8_000);
    let body = bytes(&large);
    assert!(body.len() > 3 << 20, "{} bytes", body.len());
    let client = Client::new();
    let (status, summary) = call(
        &client,
        reqwest::Method::POST,
        &format!("http://{}/api/v1/models", follower.addr),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{summary}");
    let digest = large.manifest.manifest.digest();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for server in servers {
        while server.raft.read_local(|s| s.model(&digest)).is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "server {} never applied it",
                server.raft.status().id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let detail = server.raft.read_local(|s| s.model(&digest)).unwrap();
        assert_eq!(detail.locations, large.locations);
    }
    for server in three.servers {
        server.stop().await;
    }
}
