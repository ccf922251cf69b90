//! Real replicas over the mutual-TLS peer transport, played against by servers that
//! hold a valid certificate but speak for someone else, and by an address hijack.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_consensus::metrics::RaftMetrics;
use aigrid_consensus::testkit::ListMachine;
use aigrid_consensus::transport::{encode_batch, PeerLimits, MESSAGES_PATH};
use aigrid_consensus::{NodeConfig, RaftNode, ReplicaConfig};
use aigrid_tls::{ClusterCa, ServerIdentity};
use raft::prelude::{Message, MessageType};

struct Node {
    id: u64,
    addr: String,
    raft: RaftNode<ListMachine>,
    _dir: tempfile::TempDir,
}

fn identity(ca: &ClusterCa, id: u64) -> Arc<ServerIdentity> {
    Arc::new(ca.issue_server(id, &["127.0.0.1".into()]).unwrap())
}

async fn cluster(ca: &ClusterCa, n: u64) -> Vec<Node> {
    let mut listeners = Vec::new();
    for _ in 0..n {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let members: BTreeMap<u64, String> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.local_addr().unwrap().to_string()))
        .collect();
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(RaftMetrics::register(&prometheus::Registry::new()).unwrap());
        let raft = RaftNode::start(
            NodeConfig {
                replica: ReplicaConfig {
                    id,
                    ..ReplicaConfig::default()
                },
                tick: Duration::from_millis(50),
                data_dir: dir.path().to_path_buf(),
                identity: identity(ca, id),
                initial_members: members.clone(),
                request_timeout: Duration::from_secs(5),
                queue_capacity: 1024,
            },
            ListMachine::default(),
            metrics,
        )
        .unwrap();
        raft.serve_peers(listener, PeerLimits::default(), std::future::pending());
        nodes.push(Node {
            id,
            addr: members[&id].clone(),
            raft,
            _dir: dir,
        });
    }
    nodes
}

/// Waits until every node names the same leader (other than `not`); answers it.
async fn agreed_leader(nodes: &[Node], not: Option<u64>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let leaders: Vec<Option<u64>> = nodes.iter().map(|n| n.raft.leader()).collect();
        if let Some(Some(l)) = leaders.first() {
            if leaders.iter().all(|x| *x == Some(*l)) && Some(*l) != not {
                return *l;
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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
    let nodes = cluster(&ca, 3).await;
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
    let nodes = cluster(&ca, 3).await;
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
