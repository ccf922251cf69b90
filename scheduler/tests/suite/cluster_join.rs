//! Joining the control plane: a join must name a server that answers on its peer
//! listener with a certificate from the cluster CA naming the requested id, and
//! never this server itself, and be signed by an admin; a refused join answers at
//! once and changes nothing. A
//! good join becomes a voter without waiting for a scheduled snapshot.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use aigrid_scheduler::certs::bootstrap_ca_dir;
use aigrid_scheduler::server::{Server, ServerConfig};
use aigrid_scheduler::testkit::Sign;
use common::*;
use serde_json::{json, Value};

fn config(id: u64, dir: &std::path::Path) -> ServerConfig {
    let mut config = ServerConfig::new(
        id,
        "127.0.0.1:0".parse().unwrap(),
        dir.join(format!("server-{id}")),
    );
    config.tick = Duration::from_millis(50);
    config
}

async fn members(client: &reqwest::Client, server: &Server) -> Value {
    let status: Value = get_json(client, &format!("{}/api/v1/cluster", server.url())).await;
    status["members"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_is_refused_at_once_unless_the_named_server_answers_as_itself() {
    let dir = tempfile::tempdir().unwrap();
    // A one-server cluster: it makes the cluster CA in its data dir.
    let one = start_leader(config(1, dir.path())).await;
    // Server 2 holds a certificate from that CA and waits to be added.
    let mut two = config(2, dir.path());
    two.joining = true;
    two.ca_dir = Some(bootstrap_ca_dir(&dir.path().join("server-1")));
    let two = Server::start(two).await.unwrap();
    two.raft
        .seed_peers(&BTreeMap::from([(1, one.peer_addr.to_string())]));
    // A server of another cluster, under another CA, also calling itself 2.
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = start_leader(config(2, stranger_dir.path())).await;
    // An address nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);

    // Every refusal must come well before the 10 s a commit may take: the client
    // gives up sooner than that.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(6))
        .build()
        .unwrap();
    let url = format!("{}/api/v1/cluster/members", one.url());
    let before = members(&client, &one).await;
    let own = one.peer_addr.to_string();
    let cases: [(u64, &str, u16, &str, &str); 6] = [
        (2, &dead_addr, 400, "invalid_field", "does not answer"),
        (1, &own, 409, "conflict", "this server"),
        (2, &own, 409, "conflict", "(this server)"),
        // The API listener speaks plain HTTP, not the peer protocol.
        (2, &one.addr.to_string(), 400, "invalid_field", "TLS"),
        (
            2,
            &stranger.peer_addr.to_string(),
            400,
            "invalid_field",
            "TLS",
        ),
        // A certificate from the cluster CA, but naming another server.
        (
            3,
            &two.peer_addr.to_string(),
            400,
            "invalid_field",
            "names server 2, not server 3",
        ),
    ];
    // Unsigned, even naming a good server: 401 at once.
    let resp = client
        .post(&url)
        .json(&json!({"id": 2, "addr": two.peer_addr.to_string()}))
        .send()
        .await
        .expect("an unsigned join answers at once");
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(members(&client, &one).await, before);
    for (id, addr, status, code, has) in cases {
        let resp = client
            .post(&url)
            .json(&json!({"id": id, "addr": addr}))
            .signed()
            .send()
            .await
            .unwrap_or_else(|e| panic!("join of {id} at {addr} did not answer: {e}"));
        let (got, body) = status_and_json(resp).await;
        assert_eq!(got.as_u16(), status, "{id} at {addr}: {body}");
        assert_eq!(body["error"]["code"], code, "{id} at {addr}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(has),
            "{id} at {addr}: `{message}` lacks `{has}`"
        );
        assert_eq!(
            members(&client, &one).await,
            before,
            "{id} at {addr} changed members"
        );
    }

    // The server itself, at its own peer listener: added, and promoted to voter
    // although no snapshot is due for 100 000 entries.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let resp = client
        .post(&url)
        .json(&json!({"id": 2, "addr": two.peer_addr.to_string()}))
        .signed()
        .send()
        .await
        .unwrap();
    let (got, body) = status_and_json(resp).await;
    assert_eq!(got.as_u16(), 201, "{body}");
    let voters: Vec<u64> = body["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "voter")
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(voters, vec![1, 2]);
    until("server 2 applying the cluster's log", || {
        two.raft.status().applied_index >= one.raft.status().commit_index
    })
    .await;
    two.stop().await;
    one.stop().await;
    stranger.stop().await;
}
