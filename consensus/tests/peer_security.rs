//! Real replicas over the mutual-TLS peer transport, played against by servers that
//! hold a valid certificate but speak for someone else, and by an address hijack.

mod common;

use std::time::Duration;

use aigrid_consensus::transport::{encode_batch, MESSAGES_PATH};
use aigrid_consensus::ReplicaConfig;
use aigrid_tls::{ClusterCa, ServerIdentity};
use common::{agreed_leader, cluster, identity, Node};
use raft::prelude::{Message, MessageType};

fn timeout_now(from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgTimeoutNow);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

/// Posts `messages` to `to`'s peer listener presenting `who`'s certificate.
async fn post_as(
    who: &ServerIdentity,
    to: &Node,
    messages: &[Message],
    headers: &[(&str, &str)],
) -> reqwest::StatusCode {
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(who.peer_client_config(to.id).unwrap())
        .build()
        .unwrap();
    let mut req = client
        .post(format!("https://{}{MESSAGES_PATH}", to.addr))
        .body(encode_batch(messages).unwrap());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_timeout_now_does_not_move_leadership() {
    let ca = ClusterCa::create().unwrap();
    let nodes = cluster(&ca, 3, ReplicaConfig::default(), Duration::from_millis(50)).await;
    let leader = agreed_leader(&nodes, None).await;
    let term = nodes[0].raft.status().term;
    let follower = nodes.iter().find(|n| n.id != leader).unwrap();
    let other = nodes
        .iter()
        .find(|n| n.id != leader && n.id != follower.id)
        .unwrap();
    let forged = [timeout_now(leader, follower.id, term)];
    // A member's valid certificate, and a stranger's from the same CA, each
    // claiming to be the leader.
    for who in [identity(&ca, other.id), identity(&ca, 9)] {
        let status = post_as(&who, follower, &forged, &[]).await;
        assert_eq!(status, reqwest::StatusCode::FORBIDDEN, "as {}", who.id());
    }
    // Several election timeouts: a believed MsgTimeoutNow would have started an
    // election at once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for node in &nodes {
        let status = node.raft.status();
        assert_eq!(status.leader, Some(leader), "server {}", node.id);
        assert_eq!(status.term, term, "server {}", node.id);
    }
    // The same message under the leader's own certificate does move leadership: the
    // refusal above was the certificate check, not a malformed message.
    let status = post_as(&identity(&ca, leader), follower, &forged, &[]).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert_eq!(agreed_leader(&nodes, Some(leader)).await, follower.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_address_header_does_not_move_a_peer() {
    let ca = ClusterCa::create().unwrap();
    let nodes = cluster(&ca, 3, ReplicaConfig::default(), Duration::from_millis(50)).await;
    let leader = agreed_leader(&nodes, None).await;
    let follower = nodes.iter().find(|n| n.id != leader).unwrap();
    let other = nodes
        .iter()
        .find(|n| n.id != leader && n.id != follower.id)
        .unwrap();
    let before = follower.raft.peer_addr(leader).unwrap();
    // An attacker's address for the leader, on a message the sender may send.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap_addr = trap.local_addr().unwrap().to_string();
    let mut heartbeat = Message::default();
    heartbeat.set_msg_type(MessageType::MsgHeartbeatResponse);
    heartbeat.from = other.id;
    heartbeat.to = follower.id;
    let leader_id = leader.to_string();
    let status = post_as(
        &identity(&ca, other.id),
        follower,
        &[heartbeat],
        &[
            ("x-aigrid-raft-from-id", leader_id.as_str()),
            ("x-aigrid-raft-from-addr", trap_addr.as_str()),
        ],
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert_eq!(follower.raft.peer_addr(leader).unwrap(), before);
    // Writes through the follower still reach the leader and commit.
    let applied = follower.raft.propose(&7).await.unwrap();
    assert!(applied >= 1);
    let reached = tokio::time::timeout(Duration::from_millis(300), trap.accept()).await;
    assert!(reached.is_err(), "the trap address was dialled");
}
