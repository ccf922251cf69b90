//! Real replicas over the mutual-TLS peer transport, on loopback.
#![allow(dead_code)] // each test file uses its own part of these helpers

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_consensus::metrics::RaftMetrics;
use aigrid_consensus::testkit::ListMachine;
use aigrid_consensus::transport::PeerLimits;
use aigrid_consensus::{NodeConfig, RaftNode, ReplicaConfig};
use aigrid_tls::{ClusterCa, ServerIdentity};

pub struct Node {
    pub id: u64,
    pub addr: String,
    pub raft: RaftNode<ListMachine>,
    _dir: tempfile::TempDir,
}

pub fn identity(ca: &ClusterCa, id: u64) -> Arc<ServerIdentity> {
    Arc::new(ca.issue_server(id, &["127.0.0.1".into()]).unwrap())
}

/// Starts `n` replicas over the peer transport, each with `replica` (its id set)
/// and `tick`.
pub async fn cluster(ca: &ClusterCa, n: u64, replica: ReplicaConfig, tick: Duration) -> Vec<Node> {
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
                    ..replica.clone()
                },
                tick,
                data_dir: dir.path().to_path_buf(),
                identity: identity(ca, id),
                initial_members: members.clone(),
                request_timeout: Duration::from_secs(5),
                queue_capacity: 1024,
                spin: aigrid_consensus::DEFAULT_SPIN,
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
pub async fn agreed_leader(nodes: &[Node], not: Option<u64>) -> u64 {
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

/// The node every node names as leader, once they agree.
pub async fn leader_node(nodes: &[Node]) -> &Node {
    let leader = agreed_leader(nodes, None).await;
    nodes
        .iter()
        .find(|n| n.id == leader)
        .expect("the leader is a node")
}
