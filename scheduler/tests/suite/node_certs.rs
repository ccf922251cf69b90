//! A node's data port certificate comes with its registration: a server holding the
//! cluster CA's key issues it for the key the node's request carries; a server
//! without the key refuses (409) and registers nothing.

use aigrid_api::{NodeId, NodeKey, NodeSigner, RequestSigner};
use aigrid_scheduler::server::{Server, ServerConfig};
use aigrid_scheduler::testkit::Sign;
use aigrid_tls::{ApiTrust, ClusterCa, Member, NodeKeyRequest};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

use crate::common;
use common::{get_json, start_leader};

async fn join_token(client: &Client, base: &str) -> String {
    let created: Value = client
        .post(format!("{base}/join-tokens"))
        .json(&json!({"max_uses": 5}))
        .signed()
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["token"].as_str().unwrap().to_owned()
}

/// Registers node `id` with a TLS data port and `csr`, signed by its key, with a
/// join token; answers the status and the body.
async fn register(client: &Client, base: &str, id: &str, csr: &str) -> (StatusCode, Value) {
    let key = NodeKey::from_secret([7; 32]);
    let node = NodeId::new(id);
    let body = serde_json::to_vec(&json!({
        "id": id, "name": id,
        "public_key": key.public().to_string(),
        "resources": {"cpu_millis": 4000, "memory_mib": 8192, "disk_mib": 1000, "gpus": []},
        "data_port": 7800, "data_tls": true, "data_csr": csr,
    }))
    .unwrap();
    let token = join_token(client, base).await;
    let signer: &dyn RequestSigner = &NodeSigner {
        node: &node,
        key: &key,
    };
    let resp = client
        .post(format!("{base}/nodes"))
        .header("content-type", "application/json")
        .bearer_auth(token)
        .body(body)
        .signed_by(signer)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn start(config: ServerConfig) -> (Server, String) {
    let server = start_leader(config).await;
    let base = format!("http://{}/api/v1", server.addr);
    (server, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_the_ca_key_issues_the_node_its_data_port_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().into());
    let (server, base) = start(config).await;
    let client = Client::new();
    let request = NodeKeyRequest::new("edge-a", &["edge-a.lan".into()]).unwrap();
    let (status, body) = register(&client, &base, "edge-a", request.csr_pem()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let chain = body["data_certificate"].as_str().unwrap();
    let ca = aigrid_tls::ca::read_ca_cert(
        &aigrid_scheduler::certs::bootstrap_ca_dir(dir.path()).join("ca.pem"),
    )
    .unwrap();
    let identity = request.accept(chain, Some(&ApiTrust::CaCert(ca))).unwrap();
    assert_eq!(
        aigrid_tls::member_of(identity.leaf()),
        Some(Member::Node("edge-a".into()))
    );
    let node: Value = get_json(&client, &format!("{base}/nodes/edge-a")).await;
    assert_eq!(node["data_tls"], true, "{node}");
    assert!(node.get("data_csr").is_none(), "{node}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_ca_key_refuses_and_registers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The operator issued this server's certificate ahead: no CA key here.
    let tls = dir.path().join("tls");
    let ca = ClusterCa::create().unwrap();
    ca.issue_server(1, &["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .save(&tls)
        .unwrap();
    let mut config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().join("data"));
    config.ca_dir = Some(tls);
    let (server, base) = start(config).await;
    let client = Client::new();
    let request = NodeKeyRequest::new("edge-b", &[]).unwrap();
    let (status, body) = register(&client, &base, "edge-b", request.csr_pem()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "conflict", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("aigrid ca issue --node"), "{message}");
    let missing = client
        .get(format!("{base}/nodes/edge-b"))
        .signed()
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    drop(server);
}
